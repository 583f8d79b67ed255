"""Read planning: coalescing, limits, splitting, and the benchmark's lower bound."""

from __future__ import annotations

import itertools
import random
from collections import Counter
from collections.abc import Sequence
from typing import Any

import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from drivers.modbus.config import Table
from drivers.modbus.plan import Request, Span, minimum_requests, plan, split, summarize

H = Table.HOLDING
I = Table.INPUT  # noqa: E741 - reads as the table name next to H, C, D
C = Table.COIL
D = Table.DISCRETE_INPUT

TABLE_ORDER = [C, D, H, I]


def spans_at(table: Table, *footprints: tuple[int, int]) -> list[Span]:
    return [Span(i, table, a, n) for i, (a, n) in enumerate(footprints)]


def shape(requests: Sequence[Request]) -> list[tuple[Table, int, int]]:
    return [(r.table, r.start, r.count) for r in requests]


# --- coalescing ----------------------------------------------------------------------------


def test_contiguous_tags_make_one_request() -> None:
    spans = spans_at(H, (100, 1), (101, 2), (103, 1), (104, 4), (108, 4))
    [req] = plan(spans)
    assert (req.table, req.start, req.count) == (H, 100, 12)
    assert req.describe() == "holding 100+12"
    assert [s.index for s in req.spans] == [0, 1, 2, 3, 4]
    assert [req.offset(s) for s in req.spans] == [0, 1, 3, 4, 8]


def test_empty_input_plans_nothing() -> None:
    assert plan([]) == []
    assert minimum_requests([]) == 0
    assert summarize([]) == "0 requests, 0 registers"


def test_gap_up_to_max_gap_is_merged() -> None:
    # 0..1 then 12: the unused gap is 10 registers (2..11).
    assert shape(plan(spans_at(H, (0, 2), (12, 1)), max_gap=10)) == [(H, 0, 13)]


def test_gap_beyond_max_gap_splits() -> None:
    assert shape(plan(spans_at(H, (0, 2), (13, 1)), max_gap=10)) == [(H, 0, 2), (H, 13, 1)]


def test_max_gap_zero_merges_only_adjacent() -> None:
    spans = spans_at(H, (0, 1), (1, 1), (3, 1))
    assert shape(plan(spans, max_gap=0)) == [(H, 0, 2), (H, 3, 1)]


def test_bit_tables_stretch_the_gap_sixteenfold() -> None:
    # max_gap=10 registers of allowance means 160 unused bits.
    assert shape(plan(spans_at(C, (0, 1), (161, 1)), max_gap=10)) == [(C, 0, 162)]
    assert shape(plan(spans_at(C, (0, 1), (162, 1)), max_gap=10)) == [(C, 0, 1), (C, 162, 1)]


def test_130_contiguous_registers_make_125_plus_5() -> None:
    spans = [Span(i, H, 1000 + i, 1) for i in range(130)]
    requests = plan(spans)
    assert shape(requests) == [(H, 1000, 125), (H, 1125, 5)]
    assert summarize(requests) == "2 requests, 130 registers"


def test_multi_register_tag_is_not_cut_at_the_limit() -> None:
    # 62 uint32 fill 124 registers; the 63rd would make 126, so it opens the next request.
    spans = [Span(i, H, 2 * i, 2) for i in range(63)]
    assert shape(plan(spans)) == [(H, 0, 124), (H, 124, 2)]


def test_2000_bit_limit() -> None:
    spans = [Span(i, C, i, 1) for i in range(2010)]
    requests = plan(spans)
    assert shape(requests) == [(C, 0, 2000), (C, 2000, 10)]
    assert summarize(requests) == "2 requests, 2010 bits"


def test_workaround_limit_below_125() -> None:
    spans = [Span(i, I, i, 1) for i in range(100)]
    requests = plan(spans, max_registers=32)
    assert shape(requests) == [(I, 0, 32), (I, 32, 32), (I, 64, 32), (I, 96, 4)]
    bits = plan([Span(i, D, i, 1) for i in range(20)], max_bits=8)
    assert shape(bits) == [(D, 0, 8), (D, 8, 8), (D, 16, 4)]


def test_one_per_tag_never_merges() -> None:
    spans = spans_at(H, (5, 2), (0, 1), (1, 1), (1, 1))
    requests = plan(spans, one_per_tag=True)
    assert shape(requests) == [(H, 0, 1), (H, 1, 1), (H, 1, 1), (H, 5, 2)]
    assert [r.spans[0].index for r in requests] == [1, 2, 3, 0]


def test_one_per_tag_still_rejects_oversized_span() -> None:
    with pytest.raises(ValueError, match="longer than one request"):
        plan([Span(0, H, 0, 10)], max_registers=8, one_per_tag=True)


def test_overlapping_spans_share_a_request() -> None:
    # A uint32 at 10, its low word at 11, and three bits of the status word at 10.
    spans = [
        Span(0, H, 10, 2),
        Span(1, H, 11, 1),
        Span(2, H, 10, 1),
        Span(3, H, 10, 1),
        Span(4, H, 10, 1),
    ]
    [req] = plan(spans, max_gap=0)
    assert (req.start, req.count) == (10, 2)
    # Longer first on a tie, then by tag index.
    assert [s.index for s in req.spans] == [0, 2, 3, 4, 1]
    assert [req.offset(s) for s in req.spans] == [0, 0, 0, 0, 1]


def test_contained_span_does_not_grow_the_request() -> None:
    # A 10-register string with a uint16 inside it, then a tag 10 past the string's end.
    spans = spans_at(H, (0, 10), (3, 1), (20, 1))
    assert shape(plan(spans, max_gap=10)) == [(H, 0, 21)]
    assert shape(plan(spans, max_gap=9)) == [(H, 0, 10), (H, 20, 1)]


def test_mixed_tables_in_protocol_order() -> None:
    spans = [
        Span(0, I, 0, 1),
        Span(1, H, 0, 1),
        Span(2, D, 0, 1),
        Span(3, C, 0, 1),
        Span(4, H, 500, 2),
        Span(5, C, 7, 1),
        Span(6, H, 1, 1),
    ]
    requests = plan(spans)
    assert shape(requests) == [(C, 0, 8), (D, 0, 1), (H, 0, 2), (H, 500, 2), (I, 0, 1)]
    assert summarize(requests) == "5 requests, 5 registers, 9 bits"


def test_same_address_in_different_tables_never_merges() -> None:
    assert len(plan([Span(0, H, 0, 1), Span(1, I, 0, 1)])) == 2


@pytest.mark.parametrize(
    ("span", "kwargs"),
    [
        (Span(0, H, 0, 126), {}),
        (Span(0, I, 0, 17), {"max_registers": 16}),
        (Span(0, C, 0, 2001), {}),
        (Span(0, D, 0, 9), {"max_bits": 8}),
    ],
)
def test_span_beyond_the_limit_is_an_error(span: Span, kwargs: dict[str, Any]) -> None:
    with pytest.raises(ValueError, match="longer than one request"):
        plan([span], **kwargs)
    with pytest.raises(ValueError, match="longer than one request"):
        minimum_requests([span], **kwargs)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"max_registers": 0},
        {"max_registers": 126},
        {"max_bits": 0},
        {"max_bits": 2001},
        {"max_gap": -1},
    ],
)
def test_bad_arguments(kwargs: dict[str, Any]) -> None:
    with pytest.raises(ValueError, match="max_"):
        plan([Span(0, H, 0, 1)], **kwargs)


@pytest.mark.parametrize(("address", "count"), [(-1, 1), (65536, 1), (0, 0), (65535, 2)])
def test_span_outside_the_address_space(address: int, count: int) -> None:
    with pytest.raises(ValueError, match="tag 7"):
        Span(7, H, address, count)


def test_last_address_is_plannable() -> None:
    assert shape(plan([Span(0, H, 65530, 6)])) == [(H, 65530, 6)]


def test_output_is_independent_of_input_order() -> None:
    spans = [
        Span(i, H, a, n)
        for i, (a, n) in enumerate([(0, 2), (1, 1), (30, 4), (33, 1), (90, 2), (140, 1), (0, 1)])
    ]
    spans += [Span(10 + i, C, a, 1) for i, a in enumerate([3, 300, 0, 5000])]
    expected = plan(spans)
    rng = random.Random(1)
    for _ in range(20):
        shuffled = spans[:]
        rng.shuffle(shuffled)
        assert plan(shuffled) == expected


# --- Request -------------------------------------------------------------------------------


def test_offset_rejects_a_foreign_span() -> None:
    [req] = plan(spans_at(H, (10, 2)))
    with pytest.raises(ValueError, match="not inside holding 10\\+2"):
        req.offset(Span(9, H, 11, 2))
    with pytest.raises(ValueError, match="not inside"):
        req.offset(Span(9, I, 10, 1))


def test_request_checks_its_invariants() -> None:
    with pytest.raises(ValueError, match="outside the request"):
        Request(H, 10, 2, (Span(0, H, 11, 2),))
    with pytest.raises(ValueError, match="not sorted"):
        Request(H, 0, 5, (Span(0, H, 3, 1), Span(1, H, 1, 1)))
    with pytest.raises(ValueError, match="is in coil"):
        Request(H, 0, 5, (Span(0, C, 0, 1),))
    with pytest.raises(ValueError, match="count"):
        Request(H, 0, 126, ())


# --- split ---------------------------------------------------------------------------------


def test_split_halves_by_span_count_and_is_tight() -> None:
    [req] = plan(spans_at(H, (0, 1), (4, 2), (10, 1), (15, 3)), max_gap=10)
    assert (req.start, req.count) == (0, 18)
    left, right = split(req)
    assert ((left.start, left.count), (right.start, right.count)) == ((0, 6), (10, 8))
    assert [s.index for s in left.spans] == [0, 1]
    assert [s.index for s in right.spans] == [2, 3]


def test_split_odd_count_puts_the_smaller_half_first() -> None:
    [req] = plan(spans_at(H, (0, 1), (5, 1), (10, 1)))
    assert shape(split(req)) == [(H, 0, 1), (H, 5, 6)]


def test_split_keeps_overlap_groups_together() -> None:
    # Index 0..2 share registers 0..1; a plain cut at two spans would land inside them.
    spans = spans_at(H, (0, 2), (1, 1), (0, 1), (5, 1))
    [req] = plan(spans)
    left, right = split(req)
    assert {s.index for s in left.spans} == {0, 1, 2}
    assert (left.start, left.count) == (0, 2)
    assert [s.index for s in right.spans] == [3]


def test_split_chains_of_overlaps_are_one_group() -> None:
    # 0..1 overlaps 1..2 overlaps 2..3: no register may be cut, so nothing splits.
    [req] = plan(spans_at(H, (0, 2), (1, 2), (2, 2)))
    assert split(req) == [req]


def test_split_single_span_is_unchanged() -> None:
    [req] = plan(spans_at(H, (7, 4)))
    assert split(req) == [req]


def test_repeated_split_ends_in_overlap_groups() -> None:
    spans = spans_at(H, (0, 1), (2, 2), (3, 1), (8, 1), (9, 1), (20, 4))
    pending = plan(spans, max_gap=20)
    done: list[Request] = []
    while pending:
        req = pending.pop()
        parts = split(req)
        if parts == [req]:
            done.append(req)
        else:
            pending.extend(parts)
    assert sorted(shape(done)) == [(H, 0, 1), (H, 2, 2), (H, 8, 1), (H, 9, 1), (H, 20, 4)]


# --- minimum_requests ----------------------------------------------------------------------


def test_minimum_spans_any_gap_without_holes() -> None:
    spans = spans_at(H, (0, 1), (100, 1), (124, 1), (125, 1))
    assert minimum_requests(spans) == 2
    assert shape(plan(spans, max_gap=10)) == [(H, 0, 1), (H, 100, 1), (H, 124, 2)]


def test_minimum_respects_holes() -> None:
    spans = spans_at(H, (0, 1), (100, 1), (124, 1))
    assert minimum_requests(spans, holes=[(H, 50)]) == 2
    # A hole in another table, or outside the spans, changes nothing.
    assert minimum_requests(spans, holes=[(I, 50), (H, 125), (H, 7000)]) == 1
    assert minimum_requests(spans, holes=[(H, 1), (H, 101)]) == 3


def test_minimum_with_limits_and_bits() -> None:
    assert minimum_requests([Span(i, H, i, 1) for i in range(130)]) == 2
    assert minimum_requests([Span(i, H, i, 1) for i in range(130)], max_registers=10) == 13
    assert minimum_requests([Span(0, C, 0, 1), Span(1, C, 1999, 1)]) == 1
    assert minimum_requests([Span(0, C, 0, 1), Span(1, C, 2000, 1)]) == 2
    assert minimum_requests([Span(0, C, 0, 1), Span(1, C, 1999, 1)], max_bits=1000) == 2


def test_minimum_rejects_a_span_on_a_hole() -> None:
    with pytest.raises(ValueError, match="does not serve"):
        minimum_requests(spans_at(H, (10, 4)), holes=[(H, 13)])


def test_gap_limit_can_exceed_the_minimum_in_bit_tables() -> None:
    # With max_gap=124 the gap can never bind in register tables (a gap of 125 alone breaks
    # the 125 limit), but 124 * 16 = 1984 bits is less than the 2000-bit limit.
    spans = [Span(0, C, 0, 1), Span(1, C, 1990, 1)]
    assert minimum_requests(spans) == 1
    assert len(plan(spans, max_gap=124)) == 2
    assert len(plan(spans, max_gap=125)) == 1


# --- properties ----------------------------------------------------------------------------


@st.composite
def scenarios(draw: st.DrawFn) -> tuple[list[Span], int, int]:
    max_registers = draw(st.one_of(st.just(125), st.integers(1, 125)))
    max_bits = draw(st.one_of(st.just(2000), st.integers(1, 2000)))
    n = draw(st.integers(0, 40))
    spans: list[Span] = []
    for i in range(n):
        table = draw(st.sampled_from(TABLE_ORDER))
        limit = max_bits if table.is_bits else max_registers
        # A small base range makes overlaps and merges common; the wide one tests far gaps.
        top = draw(st.sampled_from([40, 400, 5000]))
        address = draw(st.integers(0, top))
        count = draw(st.one_of(st.integers(1, min(4, limit)), st.integers(1, limit)))
        spans.append(Span(i, table, address, count))
    return spans, max_registers, max_bits


def check_cover(
    spans: list[Span], requests: list[Request], max_registers: int, max_bits: int
) -> None:
    # Every span is served by exactly one request (duplicated spans count separately).
    assert Counter(s for r in requests for s in r.spans) == Counter(spans)
    for r in requests:
        assert 1 <= r.count <= (max_bits if r.table.is_bits else max_registers)
        assert r.spans
        assert r.start == r.spans[0].address
        assert r.start + r.count == max(s.address + s.count for s in r.spans)
        assert list(r.spans) == sorted(r.spans, key=lambda s: s.address)
        for s in r.spans:
            assert s.table is r.table
            assert 0 <= r.offset(s) <= r.count - s.count
    keys = [(TABLE_ORDER.index(r.table), r.start) for r in requests]
    assert keys == sorted(keys)


@settings(max_examples=300, deadline=None)
@given(scenarios(), st.integers(0, 130), st.randoms(use_true_random=False))
def test_plan_properties(
    scenario: tuple[list[Span], int, int], max_gap: int, rng: random.Random
) -> None:
    spans, max_registers, max_bits = scenario
    requests = plan(spans, max_registers=max_registers, max_bits=max_bits, max_gap=max_gap)
    check_cover(spans, requests, max_registers, max_bits)
    lower = minimum_requests(spans, max_registers=max_registers, max_bits=max_bits)
    assert lower <= len(requests) <= len(spans)

    # The gap rule holds inside every request.
    for r in requests:
        allowance = max_gap * 16 if r.table.is_bits else max_gap
        end = r.start
        for s in r.spans:
            assert s.address - end <= allowance
            end = max(end, s.address + s.count)

    # Once the gap allowance reaches the limit it can never bind, and plan is the optimum.
    # That happens at max_gap=124 for registers (124 >= 125 - 1) but bits need 125.
    per_table = {t: [s for s in spans if s.table is t] for t in TABLE_ORDER}
    for t, mine in per_table.items():
        limit = max_bits if t.is_bits else max_registers
        if (max_gap * 16 if t.is_bits else max_gap) >= limit - 1:
            got = [r for r in requests if r.table is t]
            assert len(got) == minimum_requests(
                mine, max_registers=max_registers, max_bits=max_bits
            )

    shuffled = spans[:]
    rng.shuffle(shuffled)
    assert (
        plan(shuffled, max_registers=max_registers, max_bits=max_bits, max_gap=max_gap) == requests
    )

    one = plan(spans, max_registers=max_registers, max_bits=max_bits, one_per_tag=True)
    check_cover(spans, one, max_registers, max_bits)
    assert len(one) == len(spans)


@settings(max_examples=300, deadline=None)
@given(scenarios())
def test_plan_with_max_gap_124_reaches_the_minimum_for_registers(
    scenario: tuple[list[Span], int, int],
) -> None:
    spans, max_registers, max_bits = scenario
    registers = [s for s in spans if not s.table.is_bits]
    requests = plan(registers, max_registers=max_registers, max_bits=max_bits, max_gap=124)
    assert len(requests) == minimum_requests(registers, max_registers=max_registers)


@settings(max_examples=300, deadline=None)
@given(scenarios(), st.integers(0, 30))
def test_split_properties(scenario: tuple[list[Span], int, int], max_gap: int) -> None:
    spans, max_registers, max_bits = scenario
    for req in plan(spans, max_registers=max_registers, max_bits=max_bits, max_gap=max_gap):
        parts = split(req)
        assert Counter(s for p in parts for s in p.spans) == Counter(req.spans)
        if parts == [req]:
            # Unsplittable only when every span shares registers with its neighbours.
            end = req.spans[0].address
            for s in req.spans:
                assert s is req.spans[0] or s.address < end
                end = max(end, s.address + s.count)
            continue
        left, right = parts
        n = len(req.spans)
        # No register is read by both halves, so no overlap group was cut.
        assert left.start + left.count <= right.start
        assert left.start == req.start
        assert right.start + right.count == req.start + req.count
        for p in parts:
            assert p.start == p.spans[0].address
            assert p.start + p.count == max(s.address + s.count for s in p.spans)
        # Without overlaps the halves are exact.
        if all(a.address + a.count <= b.address for a, b in itertools.pairwise(req.spans)):
            assert len(left.spans) == n // 2


# A reference for the lower bound: try every partition of the spans into groups whose hull is
# a valid request. A cover by k requests gives such a partition (assign each span to one
# request covering it), so the least k over partitions is the true minimum.
def brute_minimum(spans: list[Span], limit: int, holes: set[int]) -> int:
    def valid(group: list[Span]) -> bool:
        lo = min(s.address for s in group)
        hi = max(s.address + s.count for s in group)
        return hi - lo <= limit and not any(lo <= h < hi for h in holes)

    best = len(spans)

    def assign(i: int, groups: list[list[Span]]) -> None:
        nonlocal best
        if len(groups) >= best:
            return
        if i == len(spans):
            best = len(groups)
            return
        for g in groups:
            g.append(spans[i])
            if valid(g):
                assign(i + 1, groups)
            g.pop()
        groups.append([spans[i]])
        assign(i + 1, groups)
        groups.pop()

    assign(0, [])
    return best


@settings(max_examples=400, deadline=None)
@given(
    st.lists(st.tuples(st.integers(0, 30), st.integers(1, 6)), min_size=1, max_size=7),
    st.integers(6, 20),
    st.sets(st.integers(0, 40), max_size=4),
)
def test_minimum_requests_matches_brute_force(
    footprints: list[tuple[int, int]], limit: int, holes: set[int]
) -> None:
    spans = [Span(i, H, a, n) for i, (a, n) in enumerate(footprints)]
    assume(not any(s.address <= h < s.address + s.count for s in spans for h in holes))
    got = minimum_requests(spans, max_registers=limit, holes=[(H, h) for h in holes])
    assert got == brute_minimum(spans, limit, holes)
    if not holes:
        assert got <= len(plan(spans, max_registers=limit, max_gap=0))

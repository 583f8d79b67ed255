"""Read planning: coalesce a device's tags into as few Modbus read requests as possible.

Pure: stdlib and ``drivers.modbus.config`` only, so the planner can be tested and benchmarked
without a device. The driver turns each tag into a :class:`Span`, calls :func:`plan` once per
configuration, and decodes each response through :meth:`Request.offset`.
"""

from __future__ import annotations

import bisect
from collections.abc import Collection, Iterable, Sequence
from dataclasses import dataclass

from drivers.modbus.config import MAX_BITS_PER_REQUEST, MAX_REGISTERS_PER_REQUEST, Table

__all__ = [
    "Request",
    "Span",
    "minimum_requests",
    "plan",
    "split",
    "summarize",
]

#: One past the last protocol address of every table (addresses are 16-bit on the wire).
_ADDRESS_SPACE = 65536

#: A bit costs far less on the wire than a register, so a gap allowance written in registers is
#: stretched to the same number of bits a register holds; one ``max_gap`` serves both kinds.
_BITS_PER_REGISTER = 16

# Spelled out rather than taken from the enum's member order, so reordering the enum cannot
# silently change the poll order (and with it every benchmark and log line).
_TABLE_ORDER = (Table.COIL, Table.DISCRETE_INPUT, Table.HOLDING, Table.INPUT)


@dataclass(frozen=True, slots=True)
class Span:
    """The footprint of one tag: ``count`` registers (or bits) from ``address`` in ``table``."""

    index: int
    table: Table
    address: int
    count: int

    def __post_init__(self) -> None:
        if not 0 <= self.address < _ADDRESS_SPACE:
            raise ValueError(f"tag {self.index}: address {self.address} is outside 0..65535")
        if self.count < 1:
            raise ValueError(f"tag {self.index}: count {self.count} is not positive")
        if self.end > _ADDRESS_SPACE:
            raise ValueError(
                f"tag {self.index}: {self.table.value} {self.address}+{self.count} "
                "runs past the end of the table (65535)"
            )

    @property
    def end(self) -> int:
        """One past the last address the span occupies."""
        return self.address + self.count


def _sort_key(span: Span) -> tuple[int, int, int]:
    # Longer spans first on a tie, so the span that decides the reach of a request at that
    # address is placed first; the index makes the order total, hence the output deterministic.
    return (span.address, -span.count, span.index)


def _protocol_limit(table: Table) -> int:
    return MAX_BITS_PER_REQUEST if table.is_bits else MAX_REGISTERS_PER_REQUEST


@dataclass(frozen=True, slots=True)
class Request:
    """One read request: ``count`` registers (or bits) from ``start``, serving ``spans``."""

    table: Table
    start: int
    count: int
    spans: tuple[Span, ...]

    def __post_init__(self) -> None:
        # Requests are built once per configuration, so checking the invariants the decoder
        # relies on costs nothing at poll time and turns a planner bug into a clear error.
        limit = _protocol_limit(self.table)
        if not 1 <= self.count <= limit:
            raise ValueError(f"{self.describe()}: count is outside 1..{limit}")
        if self.start < 0 or self.start + self.count > _ADDRESS_SPACE:
            raise ValueError(f"{self.describe()}: outside the address space 0..65535")
        previous = self.start
        for span in self.spans:
            if span.table is not self.table:
                raise ValueError(f"{self.describe()}: tag {span.index} is in {span.table.value}")
            if span.address < self.start or span.end > self.start + self.count:
                raise ValueError(
                    f"{self.describe()}: tag {span.index} "
                    f"({span.address}+{span.count}) lies outside the request"
                )
            if span.address < previous:
                raise ValueError(f"{self.describe()}: spans are not sorted by address")
            previous = span.address

    @property
    def end(self) -> int:
        """One past the last address the request reads."""
        return self.start + self.count

    def offset(self, span: Span) -> int:
        """Where ``span`` starts in this request's response, in registers (or bits)."""
        if span.table is not self.table or span.address < self.start or span.end > self.end:
            raise ValueError(
                f"tag {span.index} ({span.table.value} {span.address}+{span.count}) "
                f"is not inside {self.describe()}"
            )
        return span.address - self.start

    def describe(self) -> str:
        """Short form for logs, e.g. ``holding 100+12``."""
        return f"{self.table.value} {self.start}+{self.count}"


def _check_limits(max_registers: int, max_bits: int) -> None:
    if not 1 <= max_registers <= MAX_REGISTERS_PER_REQUEST:
        raise ValueError(f"max_registers {max_registers} is outside 1..{MAX_REGISTERS_PER_REQUEST}")
    if not 1 <= max_bits <= MAX_BITS_PER_REQUEST:
        raise ValueError(f"max_bits {max_bits} is outside 1..{MAX_BITS_PER_REQUEST}")


def _by_table(spans: Iterable[Span]) -> list[tuple[Table, list[Span]]]:
    groups: dict[Table, list[Span]] = {}
    for span in spans:
        groups.setdefault(span.table, []).append(span)
    return [(t, sorted(groups[t], key=_sort_key)) for t in _TABLE_ORDER if t in groups]


def _check_span_fits(span: Span, limit: int) -> None:
    if span.count > limit:
        unit = "bits" if span.table.is_bits else "registers"
        raise ValueError(
            f"tag {span.index} ({span.table.value} {span.address}+{span.count}) "
            f"is longer than one request may read ({limit} {unit})"
        )


def _tight(table: Table, spans: Sequence[Span]) -> Request:
    start = spans[0].address  # spans are sorted by address
    end = max(s.end for s in spans)
    return Request(table, start, end - start, tuple(spans))


def plan(
    spans: Iterable[Span],
    *,
    max_registers: int = MAX_REGISTERS_PER_REQUEST,
    max_bits: int = MAX_BITS_PER_REQUEST,
    max_gap: int = 10,
    one_per_tag: bool = False,
) -> list[Request]:
    """Coalesce ``spans`` into read requests.

    Within each table, spans are taken by address and appended to the current request while
    the unused gap before the next span is at most ``max_gap`` registers (``max_gap * 16``
    bits in bit tables) and the request stays within ``max_registers`` / ``max_bits``.
    Overlapping spans share a request (it covers their union) unless that would exceed the
    limit. Every request covers its spans tightly: it starts at its first span and ends with
    its last. Requests come in table order coil, discrete_input, holding, input, then by address.

    Raises ``ValueError`` if a span alone exceeds its limit or an argument is out of range.
    """
    _check_limits(max_registers, max_bits)
    if max_gap < 0:
        raise ValueError(f"max_gap {max_gap} is negative")
    requests: list[Request] = []
    for table, ordered in _by_table(spans):
        limit = max_bits if table.is_bits else max_registers
        allowance = max_gap * _BITS_PER_REGISTER if table.is_bits else max_gap
        for span in ordered:
            _check_span_fits(span, limit)
        if one_per_tag:
            requests.extend(Request(table, s.address, s.count, (s,)) for s in ordered)
            continue
        current: list[Span] = []
        start = end = 0
        for span in ordered:
            if current and span.address - end <= allowance and max(end, span.end) - start <= limit:
                current.append(span)
                end = max(end, span.end)
                continue
            if current:
                requests.append(Request(table, start, end - start, tuple(current)))
            current, start, end = [span], span.address, span.end
        if current:
            requests.append(Request(table, start, end - start, tuple(current)))
    return requests


def _overlap_groups(spans: Sequence[Span]) -> list[list[Span]]:
    # Spans arrive sorted by address, so a span shares registers with its group exactly when it
    # starts before the furthest end seen so far in that group.
    groups: list[list[Span]] = []
    end = -1
    for span in spans:
        if groups and span.address < end:
            groups[-1].append(span)
            end = max(end, span.end)
        else:
            groups.append([span])
            end = span.end
    return groups


def split(request: Request) -> list[Request]:
    """Split a request in two after the device rejected it (ILLEGAL DATA ADDRESS).

    The spans are halved by count, but spans that share registers stay together, since a
    shared register cannot be attributed to either half. Each half is tight, so the gap at
    the cut is dropped; splitting repeatedly therefore isolates an unserved address, whether
    it lies in a gap or under a tag. A request holding one span, or one group of overlapping
    spans, cannot be split and is returned unchanged as ``[request]``.
    """
    groups = _overlap_groups(request.spans)
    if len(groups) < 2:
        return [request]
    total = len(request.spans)
    # Candidate cut after each group but the last; pick the one nearest half the span count
    # (the first on a tie, matching ``total // 2``).
    best_cut, best_left, left = 1, len(groups[0]), 0
    for cut in range(1, len(groups)):
        left += len(groups[cut - 1])
        if abs(2 * left - total) < abs(2 * best_left - total):
            best_cut, best_left = cut, left
    first = [s for g in groups[:best_cut] for s in g]
    second = [s for g in groups[best_cut:] for s in g]
    return [_tight(request.table, first), _tight(request.table, second)]


def summarize(requests: Sequence[Request]) -> str:
    """One line for logs and the status page, e.g. ``3 requests, 212 registers, 16 bits``."""
    registers = sum(r.count for r in requests if not r.table.is_bits)
    bits = sum(r.count for r in requests if r.table.is_bits)
    parts = [_plural(len(requests), "request")]
    if registers or not bits:
        parts.append(_plural(registers, "register"))
    if bits:
        parts.append(_plural(bits, "bit"))
    return ", ".join(parts)


def _plural(n: int, word: str) -> str:
    return f"{n} {word}" if n == 1 else f"{n} {word}s"


def minimum_requests(
    spans: Iterable[Span],
    *,
    max_registers: int = MAX_REGISTERS_PER_REQUEST,
    max_bits: int = MAX_BITS_PER_REQUEST,
    holes: Collection[tuple[Table, int]] = (),
) -> int:
    """The fewest requests that can read all ``spans``: the benchmark's lower bound.

    A request may span any gap, but must stay within ``max_registers`` / ``max_bits`` and
    must not include an address of ``holes`` (``(table, address)`` pairs the device does not
    serve). Every span must lie inside one request.

    Computed greedily, per table: take spans by address; open a request at the first span
    that does not fit the current one, and keep it open while later spans fit. This is optimal
    because no valid request can hold two of the spans that opened requests. Suppose one held
    opener ``a`` and a later opener ``b``: it is hole-free and short enough from ``a.address``
    to ``b.end``. The request open just before ``b`` started at or after ``a.address`` and
    ended hole-free, so extending it to ``b.end`` stays inside that valid range (or ``b``
    already lies inside it): ``b`` would have fitted and opened nothing. So the ``k`` openers
    need ``k`` distinct requests in any cover, and greedy uses exactly ``k``.

    Raises ``ValueError`` if a span alone exceeds its limit or covers a hole, since then no
    cover exists.
    """
    _check_limits(max_registers, max_bits)
    hole_lists: dict[Table, list[int]] = {}
    for table, address in holes:
        hole_lists.setdefault(table, []).append(address)
    for addresses in hole_lists.values():
        addresses.sort()

    total = 0
    for table, ordered in _by_table(spans):
        limit = max_bits if table.is_bits else max_registers
        table_holes = hole_lists.get(table, [])

        def has_hole(lo: int, hi: int, table_holes: list[int] = table_holes) -> bool:
            """Whether any hole lies in ``[lo, hi)``."""
            i = bisect.bisect_left(table_holes, lo)
            return i < len(table_holes) and table_holes[i] < hi

        start = end = 0
        opened = False
        for span in ordered:
            _check_span_fits(span, limit)
            if has_hole(span.address, span.end):
                raise ValueError(
                    f"tag {span.index} ({table.value} {span.address}+{span.count}) "
                    "covers an address the device does not serve"
                )
            # The current request [start, end) is already hole-free, so only the stretch it
            # would grow by needs checking.
            if opened and max(end, span.end) - start <= limit and not has_hole(end, span.address):
                end = max(end, span.end)
                continue
            total += 1
            opened, start, end = True, span.address, span.end
    return total

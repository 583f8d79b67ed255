"""Clock synchronisation and step detection, on fake clocks and a fake kernel NTP state."""

from __future__ import annotations

import logging

import pytest

from gateway.clock import (
    STA_UNSYNC,
    TIME_ERROR,
    ClockWatch,
    Step,
    SyncSource,
    Timex,
    probe_sync_source,
    read_adjtimex,
    rebase,
    timedatectl_synced,
)

BOOT_WALL = 1_000_000.0  # a stale clock file's time, long before the real one
UNSYNCED = Timex(TIME_ERROR, STA_UNSYNC, 16_000_000, 16_000_000)
SYNCED = Timex(0, 0x0001, 12_000, 1_500)  # STA_PLL, errors in microseconds


class FakeClock:
    """Wall and monotonic time that advance together, except when the wall clock is stepped."""

    def __init__(self) -> None:
        self.now = BOOT_WALL
        self.mono = 100.0

    def wall(self) -> float:
        return self.now

    def monotonic(self) -> float:
        return self.mono

    def advance(self, seconds: float) -> None:
        self.now += seconds
        self.mono += seconds

    def step(self, delta: float) -> None:
        self.now += delta


class FakeKernel:
    def __init__(self, timex: Timex | None = UNSYNCED) -> None:
        self.timex = timex
        self.calls = 0

    def __call__(self) -> Timex | None:
        self.calls += 1
        return self.timex


def never_called() -> bool | None:
    raise AssertionError("timedatectl must not run when adjtimex works")


def watch_on(
    clock: FakeClock,
    kernel: FakeKernel | None = None,
    *,
    max_steps: int = 64,
    max_offsets: int = 120,
) -> ClockWatch:
    source = probe_sync_source(adjtimex=kernel or FakeKernel(), timedatectl=never_called)
    return ClockWatch(
        source,
        wall=clock.wall,
        mono=clock.monotonic,
        max_steps=max_steps,
        max_offsets=max_offsets,
    )


def test_unsynced_to_synced_transition_follows_the_kernel() -> None:
    clock, kernel = FakeClock(), FakeKernel(UNSYNCED)
    watch = watch_on(clock, kernel)
    assert watch.synced is False
    clock.advance(1)
    assert watch.check() is None
    assert watch.synced is False

    kernel.timex = SYNCED
    clock.advance(1)
    watch.check()
    assert watch.synced is True
    assert watch.as_dict() == {
        "synced": True,
        "source": "adjtimex",
        "steps": 0,
        "last_step_s": None,
        "last_step_at": None,
    }


def test_maxerror_decides_not_the_unsync_flag() -> None:
    # chrony without `rtcsync` keeps STA_UNSYNC (and so TIME_ERROR) while disciplining the clock.
    chrony = Timex(TIME_ERROR, STA_UNSYNC | 0x0001, 20_000, 1_000)
    assert chrony.synced is True
    assert UNSYNCED.synced is False


def test_a_one_hour_step_is_detected_once() -> None:
    clock = FakeClock()
    watch = watch_on(clock)
    clock.advance(1)
    clock.step(3600)
    step = watch.check()
    assert step is not None
    assert step.delta == pytest.approx(3600)
    assert step.at == clock.now
    for _ in range(5):
        clock.advance(1)
        assert watch.check() is None
    assert watch.step_count == 1
    assert watch.as_dict()["steps"] == 1
    assert watch.as_dict()["last_step_s"] == pytest.approx(3600)
    assert watch.as_dict()["last_step_at"] == step.at


def test_a_step_is_logged(caplog: pytest.LogCaptureFixture) -> None:
    clock = FakeClock()
    watch = watch_on(clock)
    clock.step(-42.5)
    with caplog.at_level(logging.WARNING, logger="gateway.clock"):
        watch.check()
    assert "stepped by -42.500 s" in caplog.text


def test_samples_before_a_step_are_rebased_and_after_it_are_not() -> None:
    clock = FakeClock()
    watch = watch_on(clock)
    clock.advance(0.3)
    before = (clock.wall(), clock.monotonic())
    clock.advance(0.7)
    watch.check()
    clock.advance(0.4)
    clock.step(3600)
    clock.advance(0.2)
    after = (clock.wall(), clock.monotonic())
    clock.advance(0.4)
    assert watch.check() is not None

    assert watch.rebase(*before) == pytest.approx(before[0] + 3600)
    assert watch.rebase(*after) == pytest.approx(after[0])
    # A sample is as old as it was: the gap between them is what really elapsed.
    assert watch.rebase(*after) - watch.rebase(*before) == pytest.approx(after[1] - before[1])


def test_a_sample_between_two_checks_is_placed_by_its_own_offset() -> None:
    clock = FakeClock()
    watch = watch_on(clock)
    clock.advance(0.2)
    early = (clock.wall(), clock.monotonic())  # same check interval, before the step
    clock.advance(0.3)
    clock.step(600)
    clock.advance(0.2)
    late = (clock.wall(), clock.monotonic())  # same check interval, after the step
    clock.advance(0.3)
    watch.check()

    assert watch.rebase(*early) == pytest.approx(early[0] + 600)
    assert watch.rebase(*late) == pytest.approx(late[0])


def test_two_steps_add_up_for_the_oldest_samples() -> None:
    clock = FakeClock()
    watch = watch_on(clock)
    first = (clock.wall() - 5, clock.monotonic() - 5)  # taken before the watch started
    clock.advance(1)
    clock.step(3600)
    watch.check()
    clock.advance(1)
    middle = (clock.wall(), clock.monotonic())
    clock.advance(1)
    clock.step(-2.5)
    watch.check()
    clock.advance(1)
    last = (clock.wall(), clock.monotonic())

    assert [s.delta for s in watch.steps] == pytest.approx([3600, -2.5])
    assert watch.rebase(*first) == pytest.approx(first[0] + 3597.5)
    assert watch.rebase(*middle) == pytest.approx(middle[0] - 2.5)
    assert watch.rebase(*last) == pytest.approx(last[0])
    # The pure function agrees with the method.
    assert rebase(*first, watch.steps) == watch.rebase(*first)


def test_slewing_under_the_threshold_is_not_a_step() -> None:
    clock = FakeClock()
    watch = watch_on(clock)
    # NTP slews at most 500 ppm; far faster here, and still never a step.
    for _ in range(100):
        clock.advance(1)
        clock.step(0.05)
        assert watch.check() is None
    assert watch.step_count == 0
    assert watch.as_dict()["last_step_s"] is None
    assert watch.rebase(BOOT_WALL, 100.0) == BOOT_WALL
    # 5 s of drift in total, yet only the change between checks counts.
    assert watch.offsets[-1][1] - watch.offsets[0][1] == pytest.approx(5)


def test_histories_are_bounded_and_say_what_they_no_longer_cover() -> None:
    clock = FakeClock()
    watch = watch_on(clock, max_steps=3, max_offsets=10)
    oldest = (clock.wall(), clock.monotonic())
    for _ in range(50):
        clock.advance(1)
        clock.step(10)
        watch.check()
    assert len(watch.steps) == 3
    assert len(watch.offsets) == 10
    assert watch.step_count == 50
    assert watch.as_dict()["steps"] == 50
    assert not watch.covers(oldest[1])
    assert watch.rebase(*oldest) == pytest.approx(oldest[0] + 30)  # what is left: 3 steps
    recent = watch.steps[0].mono_after
    assert watch.covers(recent)
    assert watch.covers(clock.monotonic())


def test_a_timedatectl_snapshot_goes_stale_at_a_step() -> None:
    source = probe_sync_source(adjtimex=FakeKernel(None), timedatectl=lambda: False)
    assert (source.name, source.live, source.read()) == ("timedatectl", False, False)
    clock = FakeClock()
    watch = ClockWatch(source, wall=clock.wall, mono=clock.monotonic)
    clock.advance(1)
    watch.check()
    assert watch.synced is False
    clock.step(3600)
    watch.check()
    assert watch.synced is None  # most likely NTP's first step, but nothing confirms it


def test_unknown_when_nothing_can_tell() -> None:
    kernel = FakeKernel(None)
    source = probe_sync_source(adjtimex=kernel, timedatectl=lambda: None)
    clock = FakeClock()
    watch = ClockWatch(source, wall=clock.wall, mono=clock.monotonic)
    watch.check()
    assert watch.as_dict()["synced"] is None
    assert watch.as_dict()["source"] == "unknown"


def test_adjtimex_is_read_on_every_check_and_timedatectl_never() -> None:
    clock, kernel = FakeClock(), FakeKernel()
    watch = watch_on(clock, kernel)
    calls = kernel.calls
    for _ in range(3):
        clock.advance(1)
        watch.check()
    assert kernel.calls == calls + 3


def test_step_side_for_a_sample_in_the_window() -> None:
    step = Step(mono_before=10, mono_after=11, offset_before=0, offset_after=100, at=111)
    assert step.precedes(10.5, 10.5)
    assert not step.precedes(110.5, 10.5)
    assert step.precedes(0, 10)
    assert not step.precedes(111, 11)


def test_a_bad_threshold_is_refused() -> None:
    source = SyncSource("unknown", lambda: None)
    with pytest.raises(ValueError, match="threshold"):
        ClockWatch(source, threshold=0)


def test_the_real_kernel_answers_without_raising() -> None:
    timex = read_adjtimex()
    assert timex is None or isinstance(timex.synced, bool)
    source = probe_sync_source()
    assert source.name in {"adjtimex", "timedatectl", "unknown"}
    synced = source.read()
    assert synced is None or isinstance(synced, bool)
    watch = ClockWatch(source)
    assert watch.check() is None or watch.step_count == 1  # unless NTP steps right now
    assert set(watch.as_dict()) == {"synced", "source", "steps", "last_step_s", "last_step_at"}


def test_timedatectl_answers_or_is_unknown_within_its_timeout() -> None:
    assert timedatectl_synced(timeout=5.0) in {True, False, None}

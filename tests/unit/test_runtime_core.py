"""The runner, bus and normalisation, driven through our own Driver interface.

These tests exercise scheduling and quality rules, so the driver here is a scripted one of
ours; the protocol boundary (pymodbus) is tested against real servers in tests/drivers.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import math
import random
from collections.abc import Sequence

import pytest
from hypothesis import given
from hypothesis import strategies as st

from gateway.bus import Bus
from gateway.errors import ConnectionLost, DeviceTimeout
from gateway.model import Quality, RawSample, ReadGroup, Reading, Reason, TagSpec
from gateway.normalize import DeviceNormalizer, normalize
from gateway.runner import Backoff, DeviceRunner
from gateway.status import DeviceState, DeviceStatus


def spec(i: int = 0, **kw: object) -> TagSpec:
    base: dict[str, object] = {
        "index": i,
        "machine": "lathe-1",
        "device": "plc",
        "name": f"t{i}",
        "datatype": "uint16",
    }
    base.update(kw)
    return TagSpec(**base)  # type: ignore[arg-type]


class ScriptedDriver:
    """Answers from a script: a value, an exception to raise, or a delay."""

    def __init__(self, tags: Sequence[TagSpec], groups: Sequence[ReadGroup]) -> None:
        self.name = "plc"
        self.tags = tuple(tags)
        self.groups = tuple(groups)
        self.connect_error: BaseException | None = None
        self.read_error: BaseException | None = None
        self.delay = 0.0
        self.value = 0
        self.reads: list[tuple[int, float]] = []
        self.connects = 0
        self.closes = 0

    async def connect(self) -> None:
        self.connects += 1
        if self.connect_error:
            raise self.connect_error

    async def read(self, group: int) -> Sequence[RawSample]:
        self.reads.append((group, asyncio.get_running_loop().time()))
        if self.delay:
            await asyncio.sleep(self.delay)
        if self.read_error:
            raise self.read_error
        self.value += 1
        return [RawSample(i, self.value) for i in self.groups[group].indices]

    async def close(self) -> None:
        self.closes += 1

    def poll_timeout(self, group: int) -> float:
        return 0.5


def make_runner(driver: ScriptedDriver) -> tuple[DeviceRunner, Bus, DeviceStatus]:
    bus = Bus(10)
    bus.register(driver.tags, 0.0)
    status = DeviceStatus("plc", "lathe-1", "scripted", "here")
    runner = DeviceRunner(
        driver,
        bus,
        status,
        connect_timeout=0.5,
        backoff=Backoff(base=0.02, cap=0.05, rng=random.Random(1)),
        phase=0.0,
    )
    return runner, bus, status


# -- normalisation --------------------------------------------------------------------------


def test_scale_offset_and_range() -> None:
    s = spec(scale=0.1, offset=-5, minimum=0.0, maximum=100.0)
    r = normalize(s, RawSample(0, 250), 10.0, None)
    assert r.value == pytest.approx(20.0)
    assert r.quality is Quality.GOOD
    r = normalize(s, RawSample(0, 2000), 10.0, None)
    assert r.quality is Quality.UNCERTAIN
    assert r.reason is Reason.OUT_OF_RANGE
    assert r.value == pytest.approx(195.0)


def test_unscaled_ints_stay_ints() -> None:
    r = normalize(spec(), RawSample(0, 7), 1.0, None)
    assert r.value == 7
    assert isinstance(r.value, int)


def test_nan_is_bad_and_keeps_last_value_with_its_time() -> None:
    s = spec(datatype="float32")
    good = normalize(s, RawSample(0, 1.5), 100.0, None)
    r = normalize(s, RawSample(0, math.nan), 200.0, good)
    assert r.quality is Quality.BAD
    assert r.reason is Reason.DECODE_ERROR
    assert r.value == 1.5
    assert r.source_ts == 100.0


def test_failed_sample_without_history_has_no_value() -> None:
    r = normalize(spec(), RawSample(0, None, (), Reason.DEVICE_EXCEPTION, "x"), 5.0, None)
    assert (r.value, r.quality, r.reason, r.source_ts) == (
        None,
        Quality.BAD,
        Reason.DEVICE_EXCEPTION,
        5.0,
    )


# -- bus -------------------------------------------------------------------------------------


async def test_bus_drops_oldest_and_counts() -> None:
    bus = Bus(queue_size=2)
    sub = bus.subscribe("slow")
    for i in range(5):
        bus.publish([Reading(f"m/t{i}", i, Quality.GOOD, float(i))])
    assert sub.dropped_batches == 3
    assert sub.dropped_values == 3
    bus.close()
    got = [b[0].value async for b in sub]
    assert got == [3, 4]
    assert bus.latest["m/t4"].value == 4


async def test_bus_marks_stale_good_values_uncertain() -> None:
    bus = Bus()
    bus.register([spec(interval=1.0)], now=0.0)
    assert bus.snapshot(0.0)["lathe-1/t0"].reason is Reason.WAITING
    bus.publish([Reading("lathe-1/t0", 3, Quality.GOOD, 10.0)])
    assert bus.snapshot(11.0)["lathe-1/t0"].quality is Quality.GOOD
    stale = bus.snapshot(14.0)["lathe-1/t0"]
    assert (stale.quality, stale.reason, stale.value) == (Quality.UNCERTAIN, Reason.STALE, 3)


# -- runner ----------------------------------------------------------------------------------


async def test_fixed_rate_schedule_and_per_group_intervals() -> None:
    tags = [spec(0, interval=0.05), spec(1, interval=0.2)]
    driver = ScriptedDriver(tags, [ReadGroup(0.05, (0,)), ReadGroup(0.2, (1,))])
    runner, bus, status = make_runner(driver)
    stop = asyncio.Event()
    task = asyncio.create_task(runner.run(stop), name="driver[plc]")
    await asyncio.sleep(0.43)
    stop.set()
    await task
    fast = [t for g, t in driver.reads if g == 0]
    slow = [t for g, t in driver.reads if g == 1]
    assert 7 <= len(fast) <= 10
    assert 2 <= len(slow) <= 3
    # Fixed rate: the spacing tracks the deadline, not "interval after the last poll ended".
    gaps = [b - a for a, b in itertools.pairwise(fast)]
    assert max(gaps) < 0.09
    assert status.state is DeviceState.STOPPED
    assert bus.latest["lathe-1/t0"].quality is Quality.GOOD
    assert driver.closes >= 1


async def test_overrun_skips_slots_and_counts_them() -> None:
    driver = ScriptedDriver([spec(0)], [ReadGroup(0.05, (0,))])
    driver.delay = 0.12  # each poll takes more than two intervals
    runner, _, status = make_runner(driver)
    stop = asyncio.Event()
    task = asyncio.create_task(runner.run(stop), name="driver[plc]")
    await asyncio.sleep(0.5)
    stop.set()
    await task
    # No pile-up: the polls happen back to back, never in a burst of queued slots.
    assert len(driver.reads) <= 5
    assert status.overruns >= 2 * (len(driver.reads) - 1)


async def test_failure_marks_bad_keeps_last_value_logs_once_then_recovers(
    caplog: pytest.LogCaptureFixture,
) -> None:
    driver = ScriptedDriver([spec(0)], [ReadGroup(0.02, (0,))])
    runner, bus, status = make_runner(driver)
    stop = asyncio.Event()
    caplog.set_level(logging.INFO, logger="gateway.runner")
    task = asyncio.create_task(runner.run(stop), name="driver[plc]")
    await asyncio.sleep(0.1)
    good = bus.latest["lathe-1/t0"]
    assert good.quality is Quality.GOOD

    driver.read_error = DeviceTimeout("no answer")
    driver.connect_error = ConnectionLost("refused")
    await asyncio.sleep(0.4)
    bad = bus.latest["lathe-1/t0"]
    assert bad.quality is Quality.BAD
    assert bad.value == good.value or bad.value is not None
    assert bad.source_ts <= good.source_ts + 0.1
    assert status.state is DeviceState.OFFLINE
    assert status.errors["timeout"] == 1
    assert status.errors["connection"] >= 2  # retried with backoff, counted every time
    failures = [r for r in caplog.records if "failed" in r.getMessage()]
    assert len(failures) == 1

    driver.read_error = None
    driver.connect_error = None
    await asyncio.sleep(0.3)
    stop.set()
    await task
    assert bus.latest["lathe-1/t0"].quality is Quality.GOOD
    recovered = [r for r in caplog.records if "recovered" in r.getMessage()]
    assert len(recovered) == 1


async def test_poll_timeout_cancels_a_hung_read() -> None:
    driver = ScriptedDriver([spec(0)], [ReadGroup(1.0, (0,))])
    driver.delay = 5.0
    runner, bus, status = make_runner(driver)
    with pytest.raises(TimeoutError):
        await runner.poll(0)
    await runner.fail(TimeoutError())
    assert bus.latest["lathe-1/t0"].reason is Reason.TIMEOUT
    assert status.errors["timeout"] == 1


async def test_programming_error_is_not_swallowed() -> None:
    driver = ScriptedDriver([spec(0)], [ReadGroup(0.02, (0,))])
    driver.read_error = ZeroDivisionError("bug")
    runner, _, _ = make_runner(driver)
    with pytest.raises(ZeroDivisionError):
        await runner.run(asyncio.Event())


def test_backoff_grows_with_jitter_and_resets() -> None:
    b = Backoff(base=1.0, cap=8.0, rng=random.Random(3))
    delays = [b.next() for _ in range(6)]
    assert 0.5 <= delays[0] <= 1.0
    assert 4.0 <= delays[5] <= 8.0
    assert len(set(delays)) == 6
    b.reset()
    assert b.next() <= 1.0


# -- the device normaliser is the reference normaliser, only faster -------------------------

_values = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**63), 2**64 - 1),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=4),
)


@given(
    datatype=st.sampled_from(["uint16", "int32", "float32", "bool", "bit", "string"]),
    scale=st.sampled_from([1.0, 0.1, -2.0]),
    offset=st.sampled_from([0.0, 5.0]),
    minimum=st.one_of(st.none(), st.floats(-100, 100)),
    maximum=st.one_of(st.none(), st.floats(-100, 100)),
    value=_values,
    reason=st.sampled_from([Reason.NONE, Reason.DEVICE_EXCEPTION, Reason.DECODE_ERROR]),
    previous=st.one_of(st.none(), _values),
)
def test_device_normalizer_equals_reference(
    datatype: str,
    scale: float,
    offset: float,
    minimum: float | None,
    maximum: float | None,
    value: object,
    reason: Reason,
    previous: object,
) -> None:
    if datatype in ("bool", "bit", "string"):
        scale, offset = 1.0, 0.0  # the config refuses scaling of these types
    s = spec(datatype=datatype, scale=scale, offset=offset, minimum=minimum, maximum=maximum)
    sample = RawSample(0, value, (1, 2), reason, "why" if reason else "")  # type: ignore[arg-type]
    latest = (
        {}
        if previous is None
        else {
            s.key: Reading(s.key, previous, Quality.GOOD, 1.0)  # type: ignore[arg-type]
        }
    )
    [fast] = DeviceNormalizer([s]).apply([sample], 9.0, latest)
    ref = normalize(s, sample, 9.0, latest.get(s.key))
    assert repr(fast) == repr(ref)  # repr: NaN != NaN, but the same text


@pytest.mark.parametrize(
    ("raw", "scale", "offset", "expected"),
    [
        (603, 0.1, 0.0, 60.3),
        (1234, 0.001, 0.0, 1.234),
        (455, 0.1, -10.0, 35.5),
        (7, 0.25, 0.0, 1.75),
        (3, 2.0, 0.5, 6.5),
    ],
)
def test_scaled_integers_have_the_precision_of_their_scale(
    raw: int, scale: float, offset: float, expected: float
) -> None:
    r = normalize(spec(scale=scale, offset=offset), RawSample(0, raw), 1.0, None)
    assert repr(r.value) == repr(expected)


async def test_devices_are_spread_across_the_interval() -> None:
    driver = ScriptedDriver([spec(0)], [ReadGroup(0.2, (0,))])
    bus = Bus()
    bus.register(driver.tags, 0.0)
    runner = DeviceRunner(
        driver, bus, DeviceStatus("plc", "m", "d", "e"), connect_timeout=0.5, phase=0.5
    )
    stop = asyncio.Event()
    task = asyncio.create_task(runner.run(stop), name="driver[plc]")
    await asyncio.sleep(0.75)
    stop.set()
    await task
    times = [t for _, t in driver.reads]
    # First poll at once, the next one half an interval later than fixed rate alone would
    # put it, then fixed rate again.
    assert len(times) >= 3
    assert times[1] - times[0] == pytest.approx(0.3, abs=0.04)
    assert times[2] - times[1] == pytest.approx(0.2, abs=0.04)
    other = DeviceRunner(
        ScriptedDriver([spec(0)], [ReadGroup(1.0, (0,))]),
        bus,
        DeviceStatus("x", "m", "d", "e"),
        connect_timeout=0.5,
    )
    assert 0.0 <= other.phase < 1.0

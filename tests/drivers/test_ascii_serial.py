"""The ASCII serial driver over a real pty pair (socat), against the simulated instruments.

The simulator sits on one end of the pair and the driver on the other: real termios, real
pyserial, real framing. ptys ignore the baud rate and refuse parity, so everything runs 8N1.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest

from drivers.ascii_serial.config import AsciiSerialDevice, check_device
from drivers.ascii_serial.driver import AsciiSerialDriver
from drivers.ascii_serial.simulator import Adam4017, Fault, StreamingScale
from gateway.bus import Bus
from gateway.errors import ConnectionLost, DeviceTimeout
from gateway.model import Quality, Reason
from gateway.runner import Backoff, DeviceRunner
from gateway.status import DeviceStatus
from tests.ptys import PtyPair

pytestmark = pytest.mark.timeout(30)


@pytest.fixture(autouse=True)
async def _join_executor_threads() -> AsyncIterator[None]:
    # pyserial-asyncio-fast opens and closes ports in the loop's default executor. A gateway
    # keeps those threads for its lifetime; a test must join them before the leak check.
    yield
    await asyncio.get_running_loop().shutdown_default_executor()


@pytest.fixture
def ptys(tmp_path: Path) -> Iterator[tuple[str, str]]:
    """Two linked ptys: (instrument end, driver end)."""
    pair = PtyPair(tmp_path)
    pair.start()
    try:
        yield pair.a, pair.b
    finally:
        pair.stop()


ADAM_REGEX = r"(?P<ch0>[+-]\d+\.\d+)(?P<ch1>[+-]\d+\.\d+)(?P<ch2>[+-]\d+\.\d+)"
SCALE_REGEX = r"(?P<status>ST|US),GS,(?P<weight>[+-]?\d+\.\d+) ?kg"


def adam_config(port: str, **over: Any) -> AsciiSerialDevice:
    cfg: dict[str, Any] = {
        "driver": "ascii_serial",
        "name": "oven-adam",
        "machine": "oven",
        "port": port,
        "command": r"#01\r",
        "start": ">",
        "end": r"\r",
        "checksum": "sum",
        "timeout": 0.15,
        "interval": 0.3,
        "regex": ADAM_REGEX,
        "tags": [
            {"name": "zone1", "group": "ch0", "unit": "V"},
            {"name": "pressure", "group": "ch1", "scale": 10, "unit": "bar"},
            {"name": "zone3", "group": "ch2", "scale": 100, "offset": -50, "unit": "degC"},
        ],
    }
    cfg.update(over)
    device = AsciiSerialDevice.model_validate(cfg)
    assert check_device(device) == []
    return device


def scale_config(port: str) -> AsciiSerialDevice:
    device = AsciiSerialDevice.model_validate(
        {
            "driver": "ascii_serial",
            "name": "scale",
            "machine": "packer",
            "port": port,
            "mode": "stream",
            "terminator": "\r\n",
            "checksum": "xor",
            "timeout": 0.15,
            "interval": 0.3,
            "regex": SCALE_REGEX,
            "tags": [
                {"name": "status", "group": "status", "type": "string"},
                {"name": "weight", "group": "weight", "unit": "kg"},
                {"name": "stable", "group": "status", "type": "string"},
            ],
        }
    )
    assert check_device(device) == []
    return device


@pytest.fixture
async def adam(ptys: tuple[str, str]) -> AsyncIterator[Adam4017]:
    sim = Adam4017(ptys[0], values=(1.234, 5.678, 0.725), checksum=True)
    async with sim:
        yield sim


@pytest.fixture
async def adam_driver(ptys: tuple[str, str], adam: Adam4017) -> AsyncIterator[AsciiSerialDriver]:
    driver = AsciiSerialDriver(adam_config(ptys[1]))
    await driver.connect()
    try:
        yield driver
    finally:
        await driver.close()


async def test_request_mode_reads_adam_channels(adam_driver: AsciiSerialDriver) -> None:
    samples = await adam_driver.read(0)
    assert [(s.tag, s.value, s.reason) for s in samples] == [
        (0, 1.234, Reason.NONE),
        (1, 5.678, Reason.NONE),
        (2, 0.725, Reason.NONE),
    ]
    assert [t.datatype for t in adam_driver.tags] == ["float64"] * 3
    assert adam_driver.command == b"#0184\r"  # the ADAM sum checksum goes out too
    assert adam_driver.counters["frames"] == 1
    assert adam_driver.describe_plan()[0].startswith("oven-adam (")


@pytest.mark.parametrize(
    ("fault", "counter", "detail"),
    [
        (Fault.GARBAGE, "garbage", "garbage"),
        (Fault.PARTIAL, "garbage", "incomplete frame"),
        (Fault.BAD_CHECKSUM, "checksum_errors", "checksum (sum) mismatch"),
    ],
)
async def test_request_faults_are_bad_for_that_poll_then_recover(
    adam: Adam4017, adam_driver: AsciiSerialDriver, fault: Fault, counter: str, detail: str
) -> None:
    assert all(s.reason is Reason.NONE for s in await adam_driver.read(0))
    adam.fault = fault
    samples = await adam_driver.read(0)
    assert all(s.value is None and s.reason is Reason.DECODE_ERROR for s in samples)
    assert detail in samples[0].detail
    assert adam_driver.counters[counter] == 1
    adam.fault = Fault.NONE
    assert [s.value for s in await adam_driver.read(0)] == [1.234, 5.678, 0.725]
    assert adam_driver.counters["frames"] == 2


async def test_echo_is_skipped_and_counted(adam: Adam4017, adam_driver: AsciiSerialDriver) -> None:
    adam.fault = Fault.ECHO
    assert [s.value for s in await adam_driver.read(0)] == [1.234, 5.678, 0.725]
    assert adam_driver.counters["echoes"] == 1


async def test_silence_is_a_device_timeout(adam: Adam4017, adam_driver: AsciiSerialDriver) -> None:
    adam.fault = Fault.SILENT
    with pytest.raises(DeviceTimeout, match="no answer"):
        await adam_driver.read(0)
    assert adam_driver.counters["timeouts"] == 1
    adam.fault = Fault.NONE
    assert samples_ok(await adam_driver.read(0))


def samples_ok(samples: Any) -> bool:
    return bool(samples) and all(s.reason is Reason.NONE for s in samples)


async def test_missing_port_is_connection_lost(tmp_path: Path) -> None:
    driver = AsciiSerialDriver(adam_config(str(tmp_path / "nope")))
    with pytest.raises(ConnectionLost, match="cannot open"):
        await driver.connect()
    await driver.close()
    await driver.close()


async def settle(driver: AsciiSerialDriver) -> None:
    """Let lines sent before a fault change pass, so the next poll sees only the new ones."""
    await asyncio.sleep(0.05)
    with contextlib.suppress(DeviceTimeout):
        await driver.read(0)
    await asyncio.sleep(0.1)


async def test_stream_mode_takes_the_newest_line(ptys: tuple[str, str]) -> None:
    scale = StreamingScale(ptys[0], rate=50, weight=12.34, checksum=scale_config("x").checksum)
    driver = AsciiSerialDriver(scale_config(ptys[1]))
    async with scale:
        await driver.connect()
        try:
            samples = await driver.read(0)
            assert [s.value for s in samples] == ["ST", 12.34, "ST"]
            scale.weight, scale.stable = -3.5, False
            await asyncio.sleep(0.1)
            assert [s.value for s in await driver.read(0)] == ["US", -3.5, "US"]
            for fault, counter in [
                # Noise on a checksummed line fails the checksum before it fails the regex.
                (Fault.GARBAGE, "checksum_errors"),
                (Fault.BAD_CHECKSUM, "checksum_errors"),
            ]:
                before = driver.counters[counter]
                scale.fault = fault
                await settle(driver)
                samples = await driver.read(0)
                assert all(s.reason is Reason.DECODE_ERROR for s in samples), fault
                assert driver.counters[counter] > before
            scale.fault = Fault.PARTIAL
            await settle(driver)
            samples = await driver.read(0)
            assert all(s.reason is Reason.DECODE_ERROR for s in samples)
            scale.fault = Fault.SILENT
            await settle(driver)
            with pytest.raises(DeviceTimeout, match="no line"):
                await driver.read(0)
            scale.fault = Fault.NONE
            await asyncio.sleep(0.1)
            assert [s.value for s in await driver.read(0)] == ["US", -3.5, "US"]
            assert driver.counters["timeouts"] >= 1
        finally:
            await driver.close()
    # The reader task is gone with close(); the leak check would fail the test otherwise.


async def test_runner_marks_bad_then_recovers(adam: Adam4017, ptys: tuple[str, str]) -> None:
    """The full runtime path: DeviceRunner + Bus, scaled values with units, silence, recovery."""
    driver = AsciiSerialDriver(adam_config(ptys[1], interval=0.2, timeout=0.1))
    bus = Bus()
    bus.register(driver.tags, time.time())
    status = DeviceStatus(driver.name, "oven", driver.kind, driver.endpoint)
    runner = DeviceRunner(
        driver, bus, status, connect_timeout=1.0, backoff=Backoff(base=0.05, cap=0.1)
    )
    stop = asyncio.Event()
    task = asyncio.create_task(runner.run(stop), name="runner")
    try:

        async def until(pred: Any, seconds: float = 3.0) -> None:
            async with asyncio.timeout(seconds):
                while not pred():  # noqa: ASYNC110 - the runner's bus has no event per tag
                    await asyncio.sleep(0.02)

        def reading(tag: str) -> Any:
            return bus.latest[f"oven/{tag}"]

        await until(lambda: reading("pressure").quality is Quality.GOOD)
        assert reading("pressure").value == pytest.approx(56.78)
        assert reading("zone3").value == pytest.approx(22.5)
        assert bus.specs["oven/pressure"].unit == "bar"
        adam.fault = Fault.SILENT
        await until(lambda: reading("pressure").quality is Quality.BAD)
        assert reading("pressure").reason is Reason.TIMEOUT
        assert reading("pressure").value == pytest.approx(56.78)  # kept, marked Bad
        adam.fault = Fault.NONE
        adam.values = [1.0, 2.0, 1.0]
        await until(lambda: reading("pressure").value == pytest.approx(20.0))
        assert reading("pressure").quality is Quality.GOOD
        assert status.errors["timeout"] >= 1
        assert status.connects >= 2  # the port was reopened after the silence
    finally:
        stop.set()
        await asyncio.wait_for(task, 5)

"""The whole runtime against real pymodbus servers that misbehave.

A misbehaving device yields Bad values and counters; it never crashes the gateway and never
stalls the other devices.
"""

from __future__ import annotations

import asyncio
import itertools
import time
from pathlib import Path

import pytest

from drivers.modbus.config import Table
from drivers.modbus.simulator import RegisterMapDevice
from drivers.modbus.transport import RegisterServer
from gateway.app import Gateway
from gateway.bus import Subscription
from gateway.config import GatewayConfig, LoadedConfig
from gateway.model import Quality, Reason
from gateway.status import DeviceState
from tests.conftest import free_port


class Counter(RegisterMapDevice):
    """Holding 0 counts reads, so every poll yields a new value."""

    def __init__(self) -> None:
        super().__init__(unit_id=1)
        self.serve(Table.HOLDING, 0, 4)

    def tick(self, now: float) -> None:
        self.set(Table.HOLDING, 0, [self.reads & 0xFFFF])


def config(ports: dict[str, int], interval: float = 0.1, timeout: float = 0.05) -> LoadedConfig:
    devices = [
        {
            "name": f"{name}-plc",
            "driver": "modbus_tcp",
            "machine": name,
            "host": "127.0.0.1",
            "port": port,
            "interval": interval,
            "timeout": timeout,
            "connect_timeout": timeout,
            "addressing": "zero_based",
            "tags": [{"name": "count", "table": "holding", "address": 0}],
        }
        for name, port in ports.items()
    ]
    cfg = GatewayConfig.model_validate(
        {"gateway": {"site": "s", "area": "a", "line": "l"}, "devices": devices}
    )
    return LoadedConfig(Path("test.yaml"), cfg)


class Recorder:
    def __init__(self) -> None:
        self.times: dict[str, list[float]] = {}

    async def __call__(self, sub: Subscription) -> None:
        async for batch in sub:
            for r in batch:
                if r.quality is Quality.GOOD:
                    self.times.setdefault(r.key, []).append(time.monotonic())


async def run_for(gw: Gateway, seconds: float, recorder: Recorder) -> None:
    stop = asyncio.Event()
    task = asyncio.create_task(gw.run(stop, sinks=[("rec", recorder)]), name="gateway")
    await asyncio.sleep(seconds)
    stop.set()
    await asyncio.wait_for(task, 5)


@pytest.mark.parametrize("fault", ["silent", "slow", "exception", "down"])
async def test_one_bad_device_does_not_stall_the_others(fault: str) -> None:
    good_dev, bad_dev = Counter(), Counter()
    ports = {"lathe-1": free_port(), "lathe-2": free_port()}
    if fault == "silent":
        bad_dev.faults.silent = True
    elif fault == "slow":
        bad_dev.faults.delay = 0.2  # longer than the 50 ms timeout
    elif fault == "exception":
        bad_dev.faults.exception = 4  # SERVER DEVICE FAILURE on every read
    async with RegisterServer([good_dev], port=ports["lathe-1"]):
        server = RegisterServer([bad_dev], port=ports["lathe-2"])
        if fault != "down":
            await server.start()
        try:
            gw = Gateway(config(ports))
            rec = Recorder()
            await run_for(gw, 1.0, rec)
        finally:
            await server.stop()
    good = rec.times.get("lathe-1/count", [])
    # 10 polls a second: the healthy device keeps its schedule whatever the other one does.
    assert len(good) >= 8, good
    gaps = [b - a for a, b in itertools.pairwise(good)]
    assert max(gaps) < 0.25
    assert gw.statuses["lathe-1-plc"].overruns == 0
    bad = gw.bus.latest["lathe-2/count"]
    assert bad.quality is Quality.BAD
    status = gw.statuses["lathe-2-plc"]
    if fault == "exception":
        # The device answers: it is online, its tag is Bad with the named exception.
        assert bad.reason is Reason.DEVICE_EXCEPTION
        assert "SERVER DEVICE FAILURE" in bad.detail
        assert status.state is DeviceState.STOPPED
        assert status.errors["device_exception"] >= 5
    else:
        assert bad.reason in (Reason.TIMEOUT, Reason.NO_COMMUNICATION)
        assert sum(status.errors.values()) >= 2
        assert status.good_polls == 0


async def test_device_killed_and_restarted_keeps_last_value_bad_then_recovers() -> None:
    dev = Counter()
    port = free_port()
    gw = Gateway(config({"lathe-1": port}))
    rec = Recorder()
    stop = asyncio.Event()
    server = RegisterServer([dev], port=port)
    await server.start()
    task = asyncio.create_task(gw.run(stop, sinks=[("rec", rec)]), name="gateway")
    try:
        await asyncio.sleep(0.5)
        before = gw.bus.latest["lathe-1/count"]
        assert before.quality is Quality.GOOD
        await server.stop()
        await asyncio.sleep(0.5)
        down = gw.bus.latest["lathe-1/count"]
        # Last value kept, marked Bad, with the time it was actually read: never frozen Good.
        assert down.quality is Quality.BAD
        assert down.value is not None
        assert down.source_ts <= time.time() - 0.2
        assert gw.statuses["lathe-1-plc"].state is DeviceState.OFFLINE
        server = RegisterServer([dev], port=port)
        await server.start()
        # Backoff starts at 0.25-0.5 s and grows; recovery within a few seconds.
        for _ in range(60):
            await asyncio.sleep(0.1)
            if gw.bus.latest["lathe-1/count"].quality is Quality.GOOD:
                break
        after = gw.bus.latest["lathe-1/count"]
        assert after.quality is Quality.GOOD
        assert after.source_ts > down.source_ts
        assert gw.statuses["lathe-1-plc"].state is DeviceState.ONLINE
    finally:
        stop.set()
        await asyncio.wait_for(task, 5)
        await server.stop()


async def test_shutdown_stops_drivers_then_drains_sinks() -> None:
    dev = Counter()
    port = free_port()
    gw = Gateway(config({"lathe-1": port}))
    seen_after_stop: list[int] = []
    stop = asyncio.Event()

    async def slow_sink(sub: Subscription) -> None:
        async for batch in sub:
            if stop.is_set():
                seen_after_stop.append(len(batch))
            await asyncio.sleep(0.25)  # slower than the 0.1 s poll: a backlog builds up

    async with RegisterServer([dev], port=port):
        task = asyncio.create_task(gw.run(stop, sinks=[("slow", slow_sink)]), name="gw")
        await asyncio.sleep(0.6)
        stop.set()
        await asyncio.wait_for(task, 5)
    # The sink was behind when stop came, and it drained its queue before the run ended.
    assert seen_after_stop
    assert len(gw.bus.subscriptions[0]) == 0
    assert all(s.state is DeviceState.STOPPED for s in gw.statuses.values())

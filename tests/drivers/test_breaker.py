"""The runner's circuit breaker against a real pymodbus server whose device goes silent.

A silent device must cost ``breaker.failures`` timeouts and then one per open period, not
one per poll slot; its state and counters are what the page and /metrics show.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest
from pydantic import ValidationError

from drivers.modbus.config import Table
from drivers.modbus.simulator import Faults, RegisterMapDevice
from drivers.modbus.transport import RegisterServer
from gateway.app import Gateway
from gateway.config import GatewayConfig, LoadedConfig
from gateway.status import BreakerState, DeviceState
from tests.conftest import free_port


class Counted(RegisterMapDevice):
    """Counts every request that reaches the device, answered or not."""

    def __init__(self) -> None:
        super().__init__(unit_id=1)
        self.serve(Table.HOLDING, 0, 2)
        self.requests = 0

    @property  # type: ignore[override]
    def faults(self) -> Faults:
        # The server looks at the faults first thing for every request it receives.
        self.requests += 1
        return self._faults

    @faults.setter
    def faults(self, value: Faults) -> None:
        self._faults = value


def config(port: int, breaker: dict[str, float]) -> LoadedConfig:
    cfg = GatewayConfig.model_validate(
        {
            "gateway": {"site": "s", "area": "a", "line": "l"},
            "breaker": breaker,
            "devices": [
                {
                    "name": "press-plc",
                    "driver": "modbus_tcp",
                    "machine": "press",
                    "host": "127.0.0.1",
                    "port": port,
                    "interval": 0.05,
                    "timeout": 0.05,
                    "connect_timeout": 0.2,
                    "addressing": "zero_based",
                    "tags": [{"name": "count", "table": "holding", "address": 0}],
                }
            ],
        }
    )
    return LoadedConfig(Path("test.yaml"), cfg)


async def wait_for(predicate: object, seconds: float) -> bool:
    assert callable(predicate)
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if predicate():
            return True
        await asyncio.sleep(0.01)
    return bool(predicate())


async def test_silent_device_opens_the_breaker_then_is_probed_and_recovers() -> None:
    dev = Counted()
    port = free_port()
    gw = Gateway(config(port, {"failures": 3, "open_min": 0.4, "open_max": 0.4}))
    st = gw.statuses["press-plc"]
    stop = asyncio.Event()
    async with RegisterServer([dev], port=port):
        task = asyncio.create_task(gw.run(stop), name="gateway")
        try:
            assert await wait_for(lambda: st.state is DeviceState.ONLINE, 3)
            assert st.breaker is BreakerState.CLOSED
            dev.faults.silent = True
            before = dev.requests
            t0 = time.monotonic()
            assert await wait_for(lambda: st.breaker is BreakerState.OPEN, 3)
            assert st.breaker_trips == 1
            # Exactly the threshold's failures reached the device before it opened.
            assert st.consecutive_failures == 3
            assert dev.requests - before == 3
            assert st.next_probe_ts is not None
            assert st.next_probe_ts > time.time()
            await asyncio.sleep(1.3)
            elapsed = time.monotonic() - t0
            # Open 0.2-0.4 s at a time, each ended by one probe. Without the breaker the
            # device would have been asked every 0.05 s slot plus its 0.05 s timeout.
            attempts = dev.requests - before
            assert attempts <= 3 + st.probes
            assert 2 <= st.probes <= elapsed / 0.2 + 1
            assert attempts < elapsed / 0.1 / 2
            assert st.skipped_polls >= 2 * st.probes
            assert st.breaker_trips == 1  # a failed probe re-opens; it is not a new trip
            snapshot = st.as_dict()
            assert snapshot["breaker"] in ("open", "half_open")
            dev.faults.silent = False
            assert await wait_for(lambda: st.state is DeviceState.ONLINE, 3)
            assert st.breaker is BreakerState.CLOSED
            assert st.next_probe_ts is None
        finally:
            stop.set()
            await asyncio.wait_for(task, 5)


async def test_failures_below_the_threshold_keep_polling_every_slot() -> None:
    dev = Counted()
    port = free_port()
    # A threshold the run cannot reach: the device is asked every slot, as before breakers.
    gw = Gateway(config(port, {"failures": 100, "open_min": 5, "open_max": 5}))
    st = gw.statuses["press-plc"]
    stop = asyncio.Event()
    async with RegisterServer([dev], port=port):
        dev.faults.silent = True
        task = asyncio.create_task(gw.run(stop), name="gateway")
        try:
            await asyncio.sleep(1.0)
        finally:
            stop.set()
            await asyncio.wait_for(task, 5)
    assert st.breaker_trips == 0
    assert st.breaker is BreakerState.CLOSED
    # One 0.05 s timeout plus one 0.05 s slot per attempt: about 10 in a second.
    assert dev.requests >= 6
    assert st.skipped_polls == 0


def test_breaker_config_is_checked() -> None:
    with pytest.raises(ValidationError, match="open_min must not be larger than open_max"):
        config(1, {"open_min": 10, "open_max": 1})
    with pytest.raises(ValidationError, match="failures"):
        config(1, {"failures": 0})

"""Modbus RTU on a shared serial line, and RTU framing over TCP, against real peers.

The serial peer is pymodbus's serial server (``RegisterServer(serial_port=...)``) on one end of
a socat pty pair, serving several simulated slaves; the gateway's driver sits on the other end.
A pty ignores the baud rate and rejects parity, so every serial test runs 8N1 (the Modbus
default is 8E1); the PortOwner still times its silence from the configured baud rate.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Any

import pytest

from drivers.modbus import serial_bus
from drivers.modbus.config import (
    ModbusRtuDevice,
    ModbusRtuOverTcpDevice,
    ModbusTcpDevice,
    Table,
    check_device,
    check_serial_buses,
)
from drivers.modbus.driver import ModbusRtuDriver, ModbusRtuOverTcpDriver
from drivers.modbus.simulator import Faults, RegisterMapDevice
from drivers.modbus.transport import RegisterServer
from gateway.bus import Bus
from gateway.errors import ConnectionLost, DeviceTimeout
from gateway.runner import DeviceRunner
from gateway.status import DeviceState, DeviceStatus
from tests.conftest import free_port
from tests.ptys import SOCAT, PtyPair

pytestmark = pytest.mark.skipif(not Path(SOCAT).exists(), reason="socat is not installed")


@pytest.fixture
async def pty(tmp_path: Path) -> AsyncIterator[PtyPair]:
    pair = PtyPair(tmp_path)
    pair.start()
    try:
        yield pair
    finally:
        pair.stop()


def slave(unit: int, base: int, faults: Faults | None = None) -> RegisterMapDevice:
    dev = RegisterMapDevice(unit, faults=faults)
    dev.serve(Table.HOLDING, 0, 4)
    dev.set(Table.HOLDING, 0, [base + i for i in range(4)])
    return dev


def rtu(name: str, port: str, unit: int, **kw: Any) -> ModbusRtuDevice:
    data: dict[str, Any] = {
        "driver": "modbus_rtu",
        "name": name,
        "machine": name,
        "port": port,
        "unit_id": unit,
        "parity": "N",  # ptys reject parity
        "timeout": 0.1,
        "interval": 0.2,
        "addressing": "zero_based",
        "tags": [{"name": "v", "table": "holding", "address": 0, "count": 1}]
        + [{"name": f"w{i}", "table": "holding", "address": i} for i in (1, 2, 3)],
    }
    data["tags"][0].pop("count")
    data.update(kw)
    return ModbusRtuDevice.model_validate(data)


def values(samples: Sequence[Any]) -> list[Any]:
    return [s.value for s in samples]


async def run_runners(drivers: Sequence[Any], seconds: float) -> list[DeviceStatus]:
    bus = Bus()
    stop = asyncio.Event()
    statuses = [DeviceStatus(d.name, d.name, d.kind, d.endpoint) for d in drivers]
    runners = [
        DeviceRunner(d, bus, s, connect_timeout=1.0, phase=0.0)
        for d, s in zip(drivers, statuses, strict=True)
    ]
    tasks = [asyncio.create_task(r.run(stop), name=f"runner {r.driver.name}") for r in runners]
    try:
        await asyncio.sleep(seconds)
    finally:
        stop.set()
        await asyncio.wait_for(asyncio.gather(*tasks), 5)
    return statuses


async def test_reads_several_units_on_one_bus_one_transaction_at_a_time(pty: PtyPair) -> None:
    devices = [slave(u, 100 * u) for u in (1, 2, 3)]
    async with RegisterServer(devices, serial_port=pty.b):
        drivers = [ModbusRtuDriver(rtu(f"d{u}", pty.a, u)) for u in (1, 2, 3)]
        assert drivers[2].endpoint == f"{pty.a}@19200/8N1 unit 3"
        try:
            for d in drivers:
                await d.connect()
            owner = drivers[0].owner
            assert owner is not None
            assert all(d.owner is owner for d in drivers)
            assert owner.refs == 3
            for _ in range(5):
                # All three at once: the owner must queue them.
                results = await asyncio.gather(*(d.read(0) for d in drivers))
                for u, samples in zip((1, 2, 3), results, strict=True):
                    assert values(samples) == [100 * u + i for i in range(4)]
            assert owner.max_in_flight == 1
            assert owner.transactions == 15
            # 19200 baud: t3.5 = 3.5 * 11 / 19200 s, about 2 ms.
            assert owner.silence == pytest.approx(3.5 * 11 / 19200)
            assert owner.min_gap is not None
            assert owner.min_gap >= owner.silence * 0.99
        finally:
            for d in drivers:
                await d.close()
        assert not serial_bus.owners()
        assert not owner.link.connected


async def test_turnaround_gap_and_fast_baud_silence(pty: PtyPair) -> None:
    assert serial_bus.silence(115200) == 0.00175
    assert serial_bus.silence(9600) == pytest.approx(3.5 * 11 / 9600)
    async with RegisterServer([slave(1, 7)], serial_port=pty.b):
        d = ModbusRtuDriver(rtu("d1", pty.a, 1, turnaround_gap=0.05))
        await d.connect()
        try:
            for _ in range(3):
                assert values(await d.read(0))[0] == 7
            assert d.owner is not None
            assert d.owner.min_gap is not None
            assert d.owner.min_gap >= 0.05
        finally:
            await d.close()


@pytest.mark.parametrize("fault", ["silent", "slow"])
async def test_a_dead_or_slow_slave_does_not_stall_the_bus(pty: PtyPair, fault: str) -> None:
    # Slow: answers after its timeout but before its next poll, so pymodbus discards the
    # late answer. One later than the next poll would be taken for that poll's reply: an RTU
    # frame has no transaction id (answers from another unit id are dropped).
    # Timeouts of 0.25 s: a 2-core CI machine under load has missed 0.1 s ones.
    bad = Faults(silent=True) if fault == "silent" else Faults(delay=0.35)
    devices = [slave(1, 100), slave(2, 200, bad), slave(3, 300)]
    async with RegisterServer(devices, serial_port=pty.b):
        drivers = [
            ModbusRtuDriver(rtu(f"d{u}", pty.a, u, timeout=0.25, interval=0.5)) for u in (1, 2, 3)
        ]
        seconds = 4.0
        good1, dead, good3 = await run_runners(drivers, seconds)
    expected = seconds / 0.5
    for st in (good1, good3):
        # Each polls at its own rate (one 0.5 s interval); the dead one costs the bus only a
        # timeout per attempt: its first three, then one per open period of its breaker.
        assert st.good_polls >= expected * 0.8, st
        assert st.overruns == 0
        assert not st.errors
    assert dead.good_polls == 0
    assert dead.errors["timeout"] >= 2
    # The breaker keeps the dead one from trying every cycle: three failures open it, then
    # one probe per open period.
    assert dead.breaker_trips == 1
    assert dead.polls <= 3 + dead.probes
    assert dead.skipped_polls >= 1
    assert not serial_bus.owners()


async def test_port_vanishes_and_comes_back(pty: PtyPair) -> None:
    devices = [slave(1, 100), slave(2, 200)]
    drivers = [ModbusRtuDriver(rtu(f"d{u}", pty.a, u)) for u in (1, 2)]
    bus = Bus()
    stop = asyncio.Event()
    statuses = [DeviceStatus(d.name, d.name, d.kind, d.endpoint) for d in drivers]
    runners = [
        DeviceRunner(d, bus, s, connect_timeout=1.0, phase=0.0)
        for d, s in zip(drivers, statuses, strict=True)
    ]
    server = RegisterServer(devices, serial_port=pty.b)
    await server.start()
    tasks = [asyncio.create_task(r.run(stop)) for r in runners]
    try:
        await asyncio.sleep(0.8)
        assert all(s.good_polls >= 2 for s in statuses)
        # The adapter is unplugged: the port is gone.
        await server.stop()
        pty.stop()
        await asyncio.sleep(1.0)
        assert all(s.state is DeviceState.OFFLINE for s in statuses), statuses
        assert all(s.errors["connection"] + s.errors["timeout"] >= 1 for s in statuses)
        before = [s.good_polls for s in statuses]
        # Plugged back in, under the same name.
        pty.start()
        await server.start()
        for _ in range(60):
            if all(s.state is DeviceState.ONLINE for s in statuses):
                break
            await asyncio.sleep(0.1)
        await asyncio.sleep(0.5)
        assert all(s.state is DeviceState.ONLINE for s in statuses), statuses
        assert all(s.good_polls > b for s, b in zip(statuses, before, strict=True))
    finally:
        stop.set()
        await asyncio.wait_for(asyncio.gather(*tasks), 5)
        await server.stop()
    assert not serial_bus.owners()


async def test_opening_a_missing_port_is_connection_lost(tmp_path: Path) -> None:
    d = ModbusRtuDriver(rtu("d1", str(tmp_path / "ttyUSB9"), 1))
    with pytest.raises(ConnectionLost):
        await d.connect()
    await d.close()
    assert not serial_bus.owners()


def rtu_over_tcp(name: str, port: int, unit: int) -> ModbusRtuOverTcpDevice:
    return ModbusRtuOverTcpDevice.model_validate(
        {
            "driver": "modbus_rtu_over_tcp",
            "name": name,
            "machine": name,
            "host": "127.0.0.1",
            "port": port,
            "unit_id": unit,
            "timeout": 0.1,
            "interval": 0.2,
            "addressing": "zero_based",
            "tags": [{"name": "v", "table": "holding", "address": 0}],
        }
    )


async def test_rtu_over_tcp_shares_one_connection() -> None:
    port = free_port()
    devices = [slave(1, 11), slave(2, 22), slave(3, 33, Faults(silent=True))]
    async with RegisterServer(devices, port=port, framing="rtu") as server:
        drivers = [ModbusRtuOverTcpDriver(rtu_over_tcp(f"t{u}", port, u)) for u in (1, 2, 3)]
        assert drivers[0].endpoint == f"127.0.0.1:{port} rtu unit 1"
        try:
            for d in drivers:
                await d.connect()
            assert server.active_connections == 1
            for _ in range(3):
                assert values(await drivers[0].read(0)) == [11]
                assert values(await drivers[1].read(0)) == [22]
            with pytest.raises(DeviceTimeout):
                await drivers[2].read(0)
            # The timeout dropped the link; the next transaction reopens it for the others.
            assert values(await drivers[1].read(0)) == [22]
        finally:
            for d in drivers:
                await d.close()
    assert not serial_bus.owners()


async def test_rtu_over_tcp_needs_rtu_framing_on_the_peer() -> None:
    # A Modbus TCP server does not understand RTU frames: the driver must not read garbage.
    port = free_port()
    async with RegisterServer([slave(1, 11)], port=port):
        d = ModbusRtuOverTcpDriver(rtu_over_tcp("t1", port, 1))
        try:
            await d.connect()
            with pytest.raises((DeviceTimeout, ConnectionLost)):
                await d.read(0)
        finally:
            with contextlib.suppress(ConnectionLost):
                await d.close()


# -- config --------------------------------------------------------------------------------


def test_rtu_defaults_follow_the_serial_line_standard() -> None:
    d = ModbusRtuDevice.model_validate(
        {"driver": "modbus_rtu", "name": "a", "machine": "m", "port": "/dev/ttyUSB0"}
        | {"addressing": "modicon"}
    )
    assert (d.baudrate, d.parity, d.stopbits, d.bytesize, d.framing) == (19200, "E", 1, 8, "rtu")
    assert d.line == "19200/8E1"
    assert d.turnaround_gap == 0
    assert ModbusRtuDriver(d).endpoint == "/dev/ttyUSB0@19200/8E1 unit 1"
    for bad in ({"unit_id": 0}, {"unit_id": 248}, {"parity": "X"}, {"bytesize": 7}, {"x": 1}):
        with pytest.raises(ValueError, match="validation error"):
            ModbusRtuDevice.model_validate(
                {"driver": "modbus_rtu", "name": "a", "machine": "m", "port": "/dev/ttyUSB0"}
                | {"addressing": "modicon"}
                | bad
            )


def test_mismatched_line_settings_and_shared_unit_ids_on_one_port() -> None:
    a = rtu("a", "/dev/ttyUSB0", 1)
    b = rtu("b", "/dev/ttyUSB0", 2, baudrate=9600, framing="ascii")
    c = rtu("c", "/dev/ttyUSB0", 1)
    other_port = rtu("d", "/dev/ttyUSB1", 1, baudrate=9600)
    disabled = rtu("e", "/dev/ttyUSB0", 1, enabled=False)
    tcp = ModbusTcpDevice.model_validate(
        {"driver": "modbus_tcp", "name": "t", "machine": "t", "host": "h", "addressing": "modicon"}
    )
    issues = check_serial_buses([tcp, a, b, c, other_port, disabled])
    assert [(i, loc) for i, loc, _ in issues] == [
        (2, ("baudrate",)),
        (2, ("framing",)),
        (3, ("unit_id",)),
    ]
    assert "device 'b' uses baudrate 9600 on /dev/ttyUSB0, but device 'a'" in issues[0][2]
    assert "like device 'a'" in issues[2][2]
    # Behind one serial device server the same rules hold for unit ids.
    t1, t2 = rtu_over_tcp("t1", 4001, 5), rtu_over_tcp("t2", 4001, 5)
    assert [(i, loc) for i, loc, _ in check_serial_buses([t1, t2])] == [(1, ("unit_id",))]


def test_check_device_covers_every_modbus_device() -> None:
    shared = rtu("a", "/dev/ttyUSB0", 1, workarounds={"close_after_poll": True})
    assert [loc for loc, _ in check_device(shared)] == [("workarounds", "close_after_poll")]
    bad_tag = rtu("a", "/dev/ttyUSB0", 1, tags=[{"name": "x", "address": 1}])
    assert [loc for loc, _ in check_device(bad_tag)] == [("tags", 0, "address")]
    assert check_device(rtu_over_tcp("t", 4001, 1)) == []

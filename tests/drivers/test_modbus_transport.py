"""The pymodbus façade against a real peer: a RegisterServer on 127.0.0.1 (a pymodbus server).

No mocks: every test talks Modbus TCP over loopback, so what passes here is what pymodbus
3.16 actually does on the wire.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import struct
import time
from collections.abc import AsyncIterator, Callable, Sequence
from pathlib import Path

import pytest
import yaml

from drivers.modbus.config import (
    REGISTER_WIDTH,
    ModbusTag,
    ModbusTcpDevice,
    Table,
    check_device,
    resolve_address,
)
from drivers.modbus.decode import decode
from drivers.modbus.simulator import (
    Lathe,
    Mill,
    RegisterMapDevice,
    bench_device,
    demo_devices,
    encode,
    serve,
)
from drivers.modbus.transport import ModbusTcpTransport, RegisterServer
from gateway.errors import ConnectionLost, DeviceException, DeviceTimeout

DEMO_CONFIG = Path(__file__).resolve().parents[2] / "config" / "demo.yaml"

HOLDING = [0, 1, 0xFFFF, 1234, 0x8000, 42, 7, 8, 9, 10]
HOLDING_2 = [100, 101, 102, 103, 104]
INPUT = [11, 22, 33, 44]
COILS = [True, False, True, True, False] + [False] * 14 + [True]  # coils 3..22
DISCRETE = [False, True, True, False, True]


def small_device(unit_id: int = 1) -> RegisterMapDevice:
    """Holding 0..9 and 20..24 with a hole between, input 100..103, coils 3..22, DI 0..4."""
    d = RegisterMapDevice(unit_id)
    d.serve(Table.HOLDING, 0, 10)
    d.set(Table.HOLDING, 0, HOLDING)
    d.serve(Table.HOLDING, 20, 5)
    d.set(Table.HOLDING, 20, HOLDING_2)
    d.serve(Table.INPUT, 100, 4)
    d.set(Table.INPUT, 100, INPUT)
    d.serve(Table.COIL, 3, 20)
    d.set(Table.COIL, 3, COILS)
    d.serve(Table.DISCRETE_INPUT, 0, 5)
    d.set(Table.DISCRETE_INPUT, 0, DISCRETE)
    return d


def client(port: int, *, unit_id: int = 1, timeout: float = 0.3) -> ModbusTcpTransport:
    return ModbusTcpTransport(
        host="127.0.0.1",
        port=port,
        unit_id=unit_id,
        timeout=timeout,
        connect_timeout=1.0,
        name="test",
    )


async def eventually(check: Callable[[], bool], within: float = 2.0) -> None:
    deadline = time.monotonic() + within
    while not check():
        if time.monotonic() > deadline:
            pytest.fail("condition not reached in time")
        await asyncio.sleep(0.01)


@pytest.fixture
def device() -> RegisterMapDevice:
    return small_device()


@pytest.fixture
async def server(device: RegisterMapDevice) -> AsyncIterator[RegisterServer]:
    async with RegisterServer([device]) as srv:
        yield srv


@pytest.fixture
async def transport(server: RegisterServer) -> AsyncIterator[ModbusTcpTransport]:
    async with client(server.port) as t:
        yield t


def u64(registers: Sequence[int]) -> int:
    return int.from_bytes(struct.pack(">4H", *registers), "big")


# -- reading ------------------------------------------------------------------------------


async def test_server_binds_loopback_on_an_ephemeral_port(server: RegisterServer) -> None:
    assert server.host == "127.0.0.1"
    assert server.port > 0
    assert server.serving


async def test_reads_every_table_exactly(transport: ModbusTcpTransport) -> None:
    assert await transport.read(Table.HOLDING, 0, 10) == HOLDING
    assert await transport.read(Table.HOLDING, 2, 3) == HOLDING[2:5]
    assert await transport.read(Table.HOLDING, 20, 5) == HOLDING_2
    assert await transport.read(Table.INPUT, 100, 4) == INPUT
    assert await transport.read(Table.COIL, 3, 20) == COILS
    assert await transport.read(Table.COIL, 5, 3) == COILS[2:5]
    assert await transport.read(Table.COIL, 22, 1) == [True]
    assert await transport.read(Table.DISCRETE_INPUT, 0, 5) == DISCRETE
    assert await transport.read(Table.DISCRETE_INPUT, 1, 2) == [True, True]


async def test_bit_reads_return_bools_and_exactly_count_items(
    transport: ModbusTcpTransport,
) -> None:
    # 3 coils arrive in a whole byte; the padding must not leak out.
    bits = await transport.read(Table.COIL, 3, 3)
    assert bits == [True, False, True]
    assert all(type(b) is bool for b in bits)
    registers = await transport.read(Table.HOLDING, 0, 1)
    assert all(type(r) is int for r in registers)


async def test_reads_follow_live_values(
    device: RegisterMapDevice, transport: ModbusTcpTransport
) -> None:
    device.set(Table.HOLDING, 3, [4321])
    device.set(Table.COIL, 4, [True])
    assert (await transport.read(Table.HOLDING, 3, 1)) == [4321]
    assert (await transport.read(Table.COIL, 3, 2)) == [True, True]


async def test_tcp_nodelay_is_set_on_the_client_socket(transport: ModbusTcpTransport) -> None:
    assert transport.tcp_nodelay is True


async def test_invalid_arguments_are_programming_errors(transport: ModbusTcpTransport) -> None:
    with pytest.raises(ValueError):
        await transport.read(Table.HOLDING, 0, 126)
    with pytest.raises(ValueError):
        await transport.read(Table.COIL, 0, 2001)
    with pytest.raises(ValueError):
        await transport.read(Table.HOLDING, 70000, 1)
    assert transport.connected


# -- exception responses ------------------------------------------------------------------


async def test_exception_response_keeps_the_link(
    device: RegisterMapDevice, transport: ModbusTcpTransport
) -> None:
    device.faults.exception = 6
    with pytest.raises(DeviceException) as caught:
        await transport.read(Table.HOLDING, 0, 10)
    assert caught.value.code == 6
    assert caught.value.name == "SERVER DEVICE BUSY"
    assert caught.value.request == "holding 0+10"
    assert transport.connected
    device.faults.exception = None
    assert await transport.read(Table.HOLDING, 0, 10) == HOLDING


@pytest.mark.parametrize(
    ("table", "address", "count"),
    [
        (Table.HOLDING, 8, 3),  # runs into the hole
        (Table.HOLDING, 12, 1),  # inside the hole
        (Table.HOLDING, 25, 1),  # past the last block
        (Table.INPUT, 0, 1),  # before the first block
        (Table.COIL, 2, 2),  # starts before the coils
        (Table.COIL, 22, 2),  # one bit past the coils, inside the same 16-bit word
        (Table.DISCRETE_INPUT, 4, 2),
    ],
)
async def test_unserved_addresses_are_illegal_data_address(
    transport: ModbusTcpTransport, table: Table, address: int, count: int
) -> None:
    with pytest.raises(DeviceException) as caught:
        await transport.read(table, address, count)
    assert caught.value.code == 2
    assert caught.value.name == "ILLEGAL DATA ADDRESS"
    assert caught.value.request == f"{table.value} {address}+{count}"
    assert transport.connected


async def test_a_table_the_device_lacks_is_illegal_data_address() -> None:
    only_holding = RegisterMapDevice(1)
    only_holding.serve(Table.HOLDING, 0, 2)
    async with RegisterServer([only_holding]) as srv, client(srv.port) as t:
        for table in Table:
            if table is Table.HOLDING:
                continue
            with pytest.raises(DeviceException) as caught:
                await t.read(table, 0, 1)
            assert caught.value.code == 2


async def test_unknown_unit_id_is_server_device_failure(server: RegisterServer) -> None:
    async with client(server.port, unit_id=9) as t:
        with pytest.raises(DeviceException) as caught:
            await t.read(Table.HOLDING, 0, 1)
        assert caught.value.code == 4
        assert t.connected


@pytest.mark.parametrize(
    ("code", "name"),
    [
        (1, "ILLEGAL FUNCTION"),
        (3, "ILLEGAL DATA VALUE"),
        (4, "SERVER DEVICE FAILURE"),
        (5, "ACKNOWLEDGE"),
        (10, "GATEWAY PATH UNAVAILABLE"),
        (11, "GATEWAY TARGET DEVICE FAILED TO RESPOND"),
    ],
)
async def test_exception_codes_are_named(
    device: RegisterMapDevice, transport: ModbusTcpTransport, code: int, name: str
) -> None:
    device.faults.exception = code
    with pytest.raises(DeviceException) as caught:
        await transport.read(Table.COIL, 3, 1)
    assert (caught.value.code, caught.value.name) == (code, name)


# -- timeouts -----------------------------------------------------------------------------


async def test_late_answer_is_a_timeout_and_closes_the_link(
    device: RegisterMapDevice, transport: ModbusTcpTransport
) -> None:
    device.faults.delay = 1.0
    started = time.monotonic()
    with pytest.raises(DeviceTimeout):
        await transport.read(Table.HOLDING, 0, 10)
    assert time.monotonic() - started < 0.8
    assert not transport.connected
    with pytest.raises(ConnectionLost):
        await transport.read(Table.HOLDING, 0, 10)
    # After a reconnect the answer that is still on its way cannot be mistaken for ours.
    device.faults.delay = 0
    await transport.connect()
    assert await transport.read(Table.HOLDING, 20, 5) == HOLDING_2


async def test_short_delay_is_answered(
    device: RegisterMapDevice, transport: ModbusTcpTransport
) -> None:
    device.faults.delay = 0.05
    assert await transport.read(Table.INPUT, 100, 4) == INPUT


async def test_silent_device_times_out(
    device: RegisterMapDevice, transport: ModbusTcpTransport
) -> None:
    device.faults.silent = True
    with pytest.raises(DeviceTimeout):
        await transport.read(Table.COIL, 3, 4)
    assert not transport.connected
    await transport.connect()
    with pytest.raises(DeviceTimeout):
        await transport.read(Table.HOLDING, 0, 1)
    device.faults.silent = False
    await transport.connect()
    assert await transport.read(Table.HOLDING, 0, 2) == HOLDING[:2]


async def test_connect_timeout_is_device_timeout() -> None:
    # A listener whose accept queue is full drops further SYNs: the connect hangs.
    listener = socket.socket()
    fillers: list[socket.socket] = []
    try:
        listener.bind(("127.0.0.1", 0))
        listener.listen(0)
        port = listener.getsockname()[1]
        for _ in range(3):
            s = socket.socket()
            fillers.append(s)
            s.setblocking(False)
            with contextlib.suppress(BlockingIOError):
                s.connect(("127.0.0.1", port))
        t = ModbusTcpTransport(
            host="127.0.0.1", port=port, unit_id=1, timeout=0.2, connect_timeout=0.3, name="t"
        )
        with pytest.raises(DeviceTimeout):
            await t.connect()
        assert not t.connected
        await t.close()
    finally:
        for s in fillers:
            s.close()
        listener.close()


async def test_cancelled_read_closes_the_link(
    device: RegisterMapDevice, transport: ModbusTcpTransport
) -> None:
    device.faults.delay = 1.0
    task = asyncio.create_task(transport.read(Table.HOLDING, 0, 1))
    await asyncio.sleep(0.05)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert not transport.connected


# -- connection loss ----------------------------------------------------------------------


async def test_refused_connect_is_connection_lost(port: int) -> None:
    t = client(port)
    with pytest.raises(ConnectionLost):
        await t.connect()
    assert not t.connected
    await t.close()
    await t.close()


async def test_read_before_connect_is_connection_lost(port: int) -> None:
    t = client(port)
    with pytest.raises(ConnectionLost):
        await t.read(Table.HOLDING, 0, 1)
    with pytest.raises(ConnectionLost):
        await t.write_registers(0, [1])
    with pytest.raises(ConnectionLost):
        await t.write_coil(0, True)


async def test_stopped_server_means_connection_lost_and_no_reconnect() -> None:
    device = small_device()
    first = RegisterServer([device])
    await first.start()
    port = first.port
    t = client(port)
    try:
        await t.connect()
        assert first.connections_accepted == 1
        await first.stop()
        await eventually(lambda: not t.connected)
        with pytest.raises(ConnectionLost):
            await t.read(Table.HOLDING, 0, 1)
        with pytest.raises(ConnectionLost):
            await t.connect()

        # The server is back on the same port: pymodbus must not reconnect by itself.
        async with RegisterServer([device], port=port) as second:
            assert second.port == port
            await asyncio.sleep(0.6)
            assert second.connections_accepted == 0
            assert not t.connected
            await t.connect()
            assert second.connections_accepted == 1
            assert await t.read(Table.HOLDING, 0, 10) == HOLDING
    finally:
        await t.close()
        await first.stop()


async def test_restarted_server_keeps_its_port() -> None:
    srv = RegisterServer([small_device()])
    await srv.start()
    port = srv.port
    await srv.stop()
    await srv.start()
    try:
        assert srv.port == port
        async with client(port) as t:
            assert await t.read(Table.INPUT, 100, 1) == INPUT[:1]
    finally:
        await srv.stop()


async def test_port_in_use_is_an_os_error(server: RegisterServer) -> None:
    clash = RegisterServer([small_device()], port=server.port)
    with pytest.raises(OSError):
        await clash.start()
    assert not clash.serving
    await clash.stop()


async def test_dropped_connection_is_connection_lost(
    server: RegisterServer, transport: ModbusTcpTransport
) -> None:
    assert server.active_connections == 1
    await server.drop_connections()
    await eventually(lambda: not transport.connected)
    with pytest.raises(ConnectionLost):
        await transport.read(Table.HOLDING, 0, 1)
    # The server keeps listening.
    await transport.connect()
    assert await transport.read(Table.HOLDING, 0, 1) == HOLDING[:1]
    assert server.connections_accepted == 2


async def test_link_lost_while_waiting_is_connection_lost(
    server: RegisterServer, device: RegisterMapDevice, transport: ModbusTcpTransport
) -> None:
    device.faults.delay = 1.0
    read = asyncio.create_task(transport.read(Table.HOLDING, 0, 1))
    await asyncio.sleep(0.05)
    await server.drop_connections()
    with pytest.raises(ConnectionLost):
        await read
    assert not transport.connected


async def test_close_is_idempotent(transport: ModbusTcpTransport) -> None:
    await transport.close()
    await transport.close()
    assert not transport.connected
    assert transport.tcp_nodelay is False


# -- concurrency --------------------------------------------------------------------------


async def test_two_connections_and_many_sequential_requests_all_answered(
    server: RegisterServer,
) -> None:
    async def hammer(t: ModbusTcpTransport, offset: int) -> int:
        done = 0
        for i in range(150):
            address = (i + offset) % 10
            assert await t.read(Table.HOLDING, address, 1) == [HOLDING[address]]
            bit = (i + offset) % 20
            assert await t.read(Table.COIL, 3 + bit, 1) == [COILS[bit]]
            done += 1
        return done

    async with client(server.port) as a, client(server.port) as b:
        assert server.active_connections == 2
        assert list(await asyncio.gather(hammer(a, 0), hammer(b, 5))) == [150, 150]


async def test_one_server_serves_several_unit_ids() -> None:
    one, two = small_device(1), small_device(2)
    two.set(Table.HOLDING, 0, [999])
    async with (
        RegisterServer([one, two]) as srv,
        client(srv.port, unit_id=1) as t1,
        client(srv.port, unit_id=2) as t2,
    ):
        assert await t1.read(Table.HOLDING, 0, 1) == [0]
        assert await t2.read(Table.HOLDING, 0, 1) == [999]
        two.faults.exception = 6
        assert await t1.read(Table.HOLDING, 0, 1) == [0]
        with pytest.raises(DeviceException):
            await t2.read(Table.HOLDING, 0, 1)


def test_duplicate_unit_ids_are_refused() -> None:
    with pytest.raises(ValueError):
        RegisterServer([small_device(1), small_device(1)])


# -- writes -------------------------------------------------------------------------------


async def test_writes_reach_the_device(
    device: RegisterMapDevice, transport: ModbusTcpTransport
) -> None:
    await transport.write_registers(20, [7, 8])
    assert device.get(Table.HOLDING, 20, 2) == [7, 8]
    assert await transport.read(Table.HOLDING, 20, 3) == [7, 8, HOLDING_2[2]]
    await transport.write_coil(4, True)
    await transport.write_coil(3, False)
    assert device.get(Table.COIL, 3, 2) == [False, True]
    assert await transport.read(Table.COIL, 3, 3) == [False, True, True]


async def test_write_into_a_hole_is_illegal_data_address(
    transport: ModbusTcpTransport,
) -> None:
    with pytest.raises(DeviceException) as caught:
        await transport.write_registers(9, [1, 2])
    assert caught.value.code == 2
    assert caught.value.request == "write holding 9+2"
    with pytest.raises(DeviceException) as caught:
        await transport.write_coil(30, True)
    assert caught.value.code == 2


# -- stop leaves nothing behind -----------------------------------------------------------


async def test_stop_with_answers_still_delayed_leaves_no_task(device: RegisterMapDevice) -> None:
    srv = RegisterServer([device])
    await srv.start()
    t = client(srv.port, timeout=0.1)
    await t.connect()
    device.faults.delay = 30.0
    with pytest.raises(DeviceTimeout):
        await t.read(Table.HOLDING, 0, 1)
    await srv.stop()
    await srv.stop()
    await t.close()
    # The autouse leak check fails this test if the delayed answer's task survives.


# -- the simulated machines ---------------------------------------------------------------


@pytest.fixture
async def machines() -> AsyncIterator[dict[str, ModbusTcpTransport]]:
    async with (
        RegisterServer([Lathe(unit_id=1)]) as lathe,
        RegisterServer([Mill(unit_id=1)]) as mill,
        client(lathe.port) as lt,
        client(mill.port) as ml,
    ):
        yield {"lathe": lt, "mill": ml}


async def test_machines_report_the_time(machines: dict[str, ModbusTcpTransport]) -> None:
    for t in machines.values():
        registers = await t.read(Table.HOLDING, 100, 4)
        assert abs(u64(registers) - time.time() * 1000) < 1000


async def test_machine_values_change_between_reads(
    machines: dict[str, ModbusTcpTransport],
) -> None:
    for t in machines.values():
        first = await t.read(Table.HOLDING, 0, 12)
        first_time = await t.read(Table.HOLDING, 100, 4)
        await asyncio.sleep(0.05)
        second = await t.read(Table.HOLDING, 0, 12)
        second_time = await t.read(Table.HOLDING, 100, 4)
        assert u64(second_time) > u64(first_time)
        # The hydraulic pressure (float32, CDAB) ripples all the time.
        assert first[10:12] != second[10:12]


async def test_machine_maps_have_a_hole_and_a_name(
    machines: dict[str, ModbusTcpTransport],
) -> None:
    for kind, t in machines.items():
        axes = 2 if kind == "lathe" else 3
        await t.read(Table.HOLDING, 0, 12 + 2 * axes)
        with pytest.raises(DeviceException) as caught:
            await t.read(Table.HOLDING, 12 + 2 * axes, 1)
        assert caught.value.code == 2
        with pytest.raises(DeviceException):
            await t.read(Table.HOLDING, 99, 2)
        name = struct.pack(">8H", *await t.read(Table.HOLDING, 104, 8)).decode("ascii")
        assert name == ("LT-250 CNC LATHE" if kind == "lathe" else "VMC-800 CNC MILL")
        assert len(await t.read(Table.INPUT, 0, 3)) == 3
        assert len(await t.read(Table.COIL, 0, 3)) == 3
        assert (await t.read(Table.DISCRETE_INPUT, 0, 4))[1] is True  # e-stop chain OK


async def test_machine_coil_mirrors_status_bit(machines: dict[str, ModbusTcpTransport]) -> None:
    for t in machines.values():
        for _ in range(3):
            status = (await t.read(Table.HOLDING, 0, 1))[0]
            running = (await t.read(Table.COIL, 0, 1))[0]
            if bool(status & 1) == running:
                break
        else:  # a cycle edge may fall between the two reads, but not three times
            pytest.fail("coil 0 does not follow status bit 0")


def test_demo_devices_are_a_lathe_and_a_mill_on_unit_1() -> None:
    demo = demo_devices()
    assert [name for name, _ in demo] == ["lathe-1", "mill-1"]
    assert isinstance(demo[0][1], Lathe)
    assert isinstance(demo[1][1], Mill)
    assert all(d.unit_id == 1 for _, d in demo)


def two_free_ports() -> int:
    """A port p such that p and p + 1 were both free a moment ago."""
    for _ in range(50):
        with socket.socket() as a:
            a.bind(("127.0.0.1", 0))
            p = a.getsockname()[1]
            with socket.socket() as b:
                try:
                    b.bind(("127.0.0.1", p + 1))
                except OSError:
                    continue
                return int(p)
    pytest.fail("no two consecutive free ports")


async def test_serve_runs_the_demo_until_stopped() -> None:
    port = two_free_ports()
    stop = asyncio.Event()
    task = asyncio.create_task(serve("127.0.0.1", port, stop))
    try:
        for p, name in ((port, "LT-250 CNC LATHE"), (port + 1, "VMC-800 CNC MILL")):
            t = client(p)
            deadline = time.monotonic() + 2
            while True:
                try:
                    await t.connect()
                    break
                except ConnectionLost:
                    if time.monotonic() > deadline or task.done():
                        raise
                    await asyncio.sleep(0.02)
            assert abs(u64(await t.read(Table.HOLDING, 100, 4)) - time.time() * 1000) < 1000
            text = struct.pack(">8H", *await t.read(Table.HOLDING, 104, 8)).decode("ascii")
            assert text == name
            await t.close()
    finally:
        stop.set()
        await asyncio.wait_for(task, 2)


def test_encode_orders() -> None:
    assert encode("uint32", 0x01020304, "ABCD") == [0x0102, 0x0304]
    assert encode("uint32", 0x01020304, "CDAB") == [0x0304, 0x0102]
    assert encode("uint32", 0x01020304, "BADC") == [0x0201, 0x0403]
    assert encode("uint32", 0x01020304, "DCBA") == [0x0403, 0x0201]
    assert encode("uint64", 0x0102030405060708, "GHEFCDAB") == [0x0708, 0x0506, 0x0304, 0x0102]
    assert encode("int16", -2, "BADC") == [0xFEFF]
    assert encode("bcd16", 1234) == [0x1234]
    assert encode("float32", 1.0, "CDAB") == [0x0000, 0x3F80]
    assert encode("string", "ABC", count=2) == [0x4142, 0x4300]
    with pytest.raises(ValueError):
        encode("uint16", 70000)


# -- the benchmark device -----------------------------------------------------------------


async def test_bench_device_changes_every_value_on_every_read() -> None:
    device, tags = bench_device(unit_id=3, tags=100, seed=1)
    assert len(tags) == 100
    assert len({t["name"] for t in tags}) == 100
    model = ModbusTcpDevice.model_validate(
        {
            "driver": "modbus_tcp",
            "name": "bench",
            "machine": "bench",
            "host": "127.0.0.1",
            "addressing": "zero_based",
            "tags": tags,
        }
    )
    assert check_device(model) == []
    async with RegisterServer([device]) as srv, client(srv.port, unit_id=3) as t:

        async def snapshot() -> dict[Table, list[int]]:
            out: dict[Table, list[int]] = {}
            for table in (Table.HOLDING, Table.INPUT):
                span = device.span(table)
                assert span is not None
                start, count = span
                words: list[int] = []
                for a in range(start, start + count, 125):
                    n = min(125, start + count - a)
                    words += [int(w) for w in await t.read(table, a, n)]
                out[table] = words
            return out

        snaps = [await snapshot() for _ in range(3)]
    for tag in model.tags:
        table, address = resolve_address(model.addressing, tag.table, tag.address)
        width = {"uint16": 1, "int16": 1, "bit": 1, "int32": 2, "uint32": 2, "float32": 2}.get(
            tag.type.value, 4
        )
        values = [tuple(s[table][address : address + width]) for s in snaps]
        if tag.bit is not None:
            values = [(v[0] >> tag.bit & 1,) for v in values]
        assert values[0] != values[1] != values[2], tag.name


# -- the demo config matches the simulator ------------------------------------------------


def demo_config() -> list[ModbusTcpDevice]:
    raw = yaml.safe_load(DEMO_CONFIG.read_text(encoding="utf-8"))
    return [ModbusTcpDevice.model_validate(d) for d in raw["devices"]]


def tag_width(tag: ModbusTag) -> int:
    if tag.type.value == "string":
        return tag.count or 0
    return 1 if tag.type.value == "bool" else REGISTER_WIDTH[tag.type]


def check_range(where: str, tag: ModbusTag, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return
    scaled = value * tag.scale + tag.offset
    if tag.min is not None:
        assert scaled >= tag.min, (where, tag.name, scaled)
    if tag.max is not None:
        assert scaled <= tag.max, (where, tag.name, scaled)


def test_demo_config_stays_within_min_max_over_whole_cycles() -> None:
    sims = dict(demo_devices())
    for config in demo_config():
        sim = sims[config.machine]
        assert isinstance(sim, Lathe | Mill)
        start = time.time()
        # Two full cycles of the slower machine at an odd step, so every phase is visited.
        for k in range(450):
            now = start + k * 0.7
            sim.tick(now)
            for tag in config.tags:
                table, address = resolve_address(config.addressing, tag.table, tag.address)
                values = sim.get(table, address, tag_width(tag))
                if table.is_bits:
                    continue
                value = decode(tag.type, tag.order, [int(v) for v in values], bit=tag.bit)
                check_range(f"{config.name} at +{k * 0.7:.1f} s", tag, value)
                if tag.name == "clock_ms":
                    assert value == int(now * 1000)


async def test_demo_config_matches_the_simulator() -> None:
    devices = demo_config()
    assert [d.machine for d in devices] == ["lathe-1", "mill-1"]
    sims = dict(demo_devices())
    for config in devices:
        assert check_device(config) == []
        sim = sims[config.machine]
        async with (
            RegisterServer([sim]) as srv,
            client(srv.port, unit_id=config.unit_id) as t,
        ):
            for tag in config.tags:
                table, address = resolve_address(config.addressing, tag.table, tag.address)
                values = await t.read(table, address, tag_width(tag))
                if table.is_bits:
                    value: object = values[0]
                else:
                    value = decode(tag.type, tag.order, [int(v) for v in values], bit=tag.bit)
                check_range(config.name, tag, value)
                if tag.type.value == "string":
                    assert value in ("LT-250 CNC LATHE", "VMC-800 CNC MILL")
        # Every address the machine serves is read by some tag.
        for table in Table:
            covered: set[int] = set()
            for tag in config.tags:
                tag_table, address = resolve_address(config.addressing, tag.table, tag.address)
                if tag_table is table:
                    covered.update(range(address, address + tag_width(tag)))
            span = sim.span(table)
            assert span is not None
            served = {a for a in range(span[0], sum(span)) if sim.valid(table, a, 1)}
            assert covered == served, (config.name, table, sorted(served ^ covered))

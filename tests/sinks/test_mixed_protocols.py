"""Every kind of southbound device in one config, side by side, to every northbound view.

One YAML file names a Modbus TCP CNC, two Modbus RTU slaves sharing one serial line (a socat
pty pair), a chiller behind an RTU-over-TCP serial server and an ADAM-style ASCII module on a
second pty pair. Each is served by a real peer: pymodbus's TCP, serial and RTU-over-TCP
servers, and the ASCII simulator. The gateway publishes to a real mosquitto, serves OPC UA
and the status page; ``retrofit-gw once`` reads the same file.

Every simulated value is fixed, so each view is checked against the exact engineering value.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from asyncua import Client, ua

from drivers.ascii_serial.simulator import Adam4017
from drivers.modbus import serial_bus
from drivers.modbus.config import Table
from drivers.modbus.simulator import RegisterMapDevice
from drivers.modbus.transport import RegisterServer
from gateway import cli
from gateway.app import Gateway, build_sinks
from gateway.bus import Subscription
from gateway.config import load_config
from gateway.model import Quality, Reading
from gateway.status import DeviceState
from tests.conftest import free_port
from tests.ptys import SOCAT, PtyPair
from tests.sinks.conftest import Watcher

pytestmark = [
    pytest.mark.skipif(not Path(SOCAT).exists(), reason="socat is not installed"),
    pytest.mark.timeout(60),
]

TOPIC = "uns/plant-1/machining/line-2"
NAMESPACE = "urn:retrofit-gateway:mixed-gw"

#: (machine, device, tag) -> the engineering value every view must show.
EXPECTED: dict[tuple[str, str, str], float] = {
    ("lathe-1", "lathe-1-cnc", "spindle_speed"): 1800,
    ("lathe-1", "lathe-1-cnc", "hydraulic_pressure"): 35.5,
    ("lathe-1", "lathe-1-meter", "voltage_l1"): 230.5,
    ("lathe-1", "lathe-1-meter", "energy"): 12345.6,
    ("press-2", "press-2-vfd", "output_frequency"): 50.0,
    ("press-2", "press-2-vfd", "motor_current"): 12.3,
    ("chiller-1", "chiller-1-ctrl", "supply_temp"): -5.5,
    ("chiller-1", "chiller-1-ctrl", "return_temp"): 12.0,
    ("oven-1", "oven-1-adam", "zone1"): 1.234,
    ("oven-1", "oven-1-adam", "zone2"): 5.678,
    ("oven-1", "oven-1-adam", "zone3"): 0.725,
}
UNITS = {
    "spindle_speed": "rpm",
    "hydraulic_pressure": "bar",
    "voltage_l1": "V",
    "energy": "kWh",
    "output_frequency": "Hz",
    "motor_current": "A",
    "supply_temp": "degC",
    "return_temp": "degC",
    "zone1": "V",
    "zone2": "V",
    "zone3": "V",
}
DRIVERS = {
    "lathe-1-cnc": "modbus_tcp",
    "lathe-1-meter": "modbus_rtu",
    "press-2-vfd": "modbus_rtu",
    "chiller-1-ctrl": "modbus_rtu_over_tcp",
    "oven-1-adam": "ascii_serial",
}

CONFIG = r"""gateway: {{name: mixed-gw, site: plant-1, area: machining, line: line-2,
          data_dir: {data}}}
{northbound}
devices:
  - name: lathe-1-cnc
    driver: modbus_tcp
    machine: lathe-1
    host: 127.0.0.1
    port: {tcp_port}
    unit_id: 1
    addressing: zero_based
    interval: 1.0
    timeout: 0.5
    tags:
      - {{name: spindle_speed, table: holding, address: 0, type: uint16, unit: rpm}}
      - {{name: hydraulic_pressure, table: holding, address: 2, type: float32, order: CDAB,
         unit: bar}}

  # Two slaves on one RS-485 line: one port owner, one transaction at a time.
  - name: lathe-1-meter
    driver: modbus_rtu
    machine: lathe-1
    port: {rtu_port}
    baudrate: 19200
    parity: N                  # a pty refuses parity
    unit_id: 3
    addressing: modicon
    interval: 1.0
    timeout: 0.5
    tags:
      - {{name: voltage_l1, address: 30001, type: float32, unit: V}}
      - {{name: energy, address: 30003, type: uint32, scale: 0.1, unit: kWh}}
  - name: press-2-vfd
    driver: modbus_rtu
    machine: press-2
    port: {rtu_port}
    baudrate: 19200
    parity: N
    unit_id: 4
    addressing: one_based
    interval: 1.0
    timeout: 0.5
    tags:
      - {{name: output_frequency, table: holding, address: 1, type: uint16, scale: 0.01,
         unit: Hz}}
      - {{name: motor_current, table: holding, address: 2, type: uint16, scale: 0.1, unit: A}}

  - name: chiller-1-ctrl
    driver: modbus_rtu_over_tcp
    machine: chiller-1
    host: 127.0.0.1
    port: {rtu_tcp_port}
    unit_id: 7
    addressing: zero_based
    interval: 1.0
    timeout: 0.5
    tags:
      - {{name: supply_temp, table: holding, address: 0, type: int16, scale: 0.1, unit: degC}}
      - {{name: return_temp, table: holding, address: 1, type: int16, scale: 0.1, unit: degC}}

  - name: oven-1-adam
    driver: ascii_serial
    machine: oven-1
    port: {ascii_port}
    command: '#01\r'
    start: ">"
    end: '\r'
    checksum: sum
    interval: 1.0
    timeout: 0.5
    regex: '(?P<ch0>[+-]\d+\.\d+)(?P<ch1>[+-]\d+\.\d+)(?P<ch2>[+-]\d+\.\d+)'
    tags:
      - {{name: zone1, group: ch0, unit: V}}
      - {{name: zone2, group: ch1, unit: V}}
      - {{name: zone3, group: ch2, unit: V}}
"""

NORTHBOUND = """\
mqtt: {{host: 127.0.0.1, port: {mqtt}, topic_prefix: uns, topic_shape: per_tag}}
opcua: {{host: 127.0.0.1, port: {opcua}, allow_none: true}}
web: {{host: 127.0.0.1, port: {web}}}
"""


@pytest.fixture(autouse=True)
async def _join_executor_threads() -> AsyncIterator[None]:
    # pyserial-asyncio-fast opens and closes ports in the loop's default executor (and `once`
    # runs in a worker thread here). Join those threads before the leak check.
    yield
    await asyncio.get_running_loop().shutdown_default_executor()


def cnc() -> RegisterMapDevice:
    dev = RegisterMapDevice(1)
    dev.serve(Table.HOLDING, 0, 4)
    dev.put(0, "uint16", 1800)
    dev.put(2, "float32", 35.5, "CDAB")
    return dev


def meter() -> RegisterMapDevice:
    dev = RegisterMapDevice(3)
    dev.serve(Table.INPUT, 0, 4)
    dev.put(0, "float32", 230.5, table=Table.INPUT)
    dev.put(2, "uint32", 123456, table=Table.INPUT)
    return dev


def vfd() -> RegisterMapDevice:
    dev = RegisterMapDevice(4)
    dev.serve(Table.HOLDING, 0, 2)
    dev.put(0, "uint16", 5000)
    dev.put(1, "uint16", 123)
    return dev


def chiller() -> RegisterMapDevice:
    dev = RegisterMapDevice(7)
    dev.serve(Table.HOLDING, 0, 2)
    dev.put(0, "int16", -55)
    dev.put(1, "int16", 120)
    return dev


@dataclass
class Plant:
    """The running peers and the config file that points at them."""

    config: Path
    rtu_port: str
    mqtt: int
    opcua: int
    web: int
    adam: Adam4017
    rtu_server: RegisterServer


@contextlib.asynccontextmanager
async def plant(tmp_path: Path, *, mqtt: int | None) -> AsyncIterator[Plant]:
    """Start every peer on 127.0.0.1 / ptys and write the config; stop them all afterwards."""
    (tmp_path / "rtu").mkdir()
    (tmp_path / "ascii").mkdir()
    rtu_line, ascii_line = PtyPair(tmp_path / "rtu"), PtyPair(tmp_path / "ascii")
    opcua, web = free_port(), free_port()
    tcp_port, rtu_tcp_port = free_port(), free_port()
    northbound = "" if mqtt is None else NORTHBOUND.format(mqtt=mqtt, opcua=opcua, web=web)
    config = tmp_path / "gateway.yaml"
    config.write_text(
        CONFIG.format(
            data=tmp_path / "data",
            northbound=northbound,
            tcp_port=tcp_port,
            rtu_port=rtu_line.a,
            rtu_tcp_port=rtu_tcp_port,
            ascii_port=ascii_line.a,
        )
    )
    async with contextlib.AsyncExitStack() as stack:
        for pair in (rtu_line, ascii_line):
            pair.start()
            stack.callback(pair.stop)
        await stack.enter_async_context(RegisterServer([cnc()], port=tcp_port))
        rtu_server = await stack.enter_async_context(
            RegisterServer([meter(), vfd()], serial_port=rtu_line.b, framing="rtu")
        )
        await stack.enter_async_context(
            RegisterServer([chiller()], port=rtu_tcp_port, framing="rtu")
        )
        adam = Adam4017(ascii_line.b, values=(1.234, 5.678, 0.725), checksum=True)
        await stack.enter_async_context(adam)
        yield Plant(config, rtu_line.a, mqtt or 0, opcua, web, adam, rtu_server)


async def eventually(check: Callable[[], object], within: float, what: str) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + within
    while not check():
        if loop.time() > deadline:
            raise AssertionError(f"not within {within} s: {what}")
        await asyncio.sleep(0.05)


def all_good(mq: Watcher) -> bool:
    for machine, _, tag in EXPECTED:
        m = mq.latest(f"{TOPIC}/{machine}/{tag}")
        if m is None or m.json()["quality"] != "good":
            return False
    return True


async def test_every_driver_kind_side_by_side_to_mqtt_opcua_and_the_page(
    tmp_path: Path, mosquitto: int
) -> None:
    async with plant(tmp_path, mqtt=mosquitto) as p:
        gw = Gateway(load_config(p.config))
        assert {n: st.driver for n, st in gw.statuses.items()} == DRIVERS
        stop = asyncio.Event()
        task = asyncio.create_task(gw.run(stop, build_sinks(gw)), name="gateway")
        client = Client(f"opc.tcp://127.0.0.1:{p.opcua}", timeout=5)
        try:
            async with Watcher(mosquitto, f"{TOPIC}/#") as mq:
                await mq.wait(lambda: all_good(mq), 15)

                # MQTT: every tag of every kind of device, Good, with its exact value and unit.
                for (machine, _, tag), value in EXPECTED.items():
                    body = mq.latest(f"{TOPIC}/{machine}/{tag}")
                    assert body is not None
                    payload = body.json()
                    assert payload["quality"] == "good", (tag, payload)
                    assert payload["value"] == pytest.approx(value), (tag, payload)
                    assert payload["unit"] == UNITS[tag], (tag, payload)
                for device, kind in DRIVERS.items():
                    machine = next(m for m, d, _ in EXPECTED if d == device)
                    status = mq.latest(f"{TOPIC}/{machine}/$status/{device}")
                    assert status is not None, device
                    assert status.json()["state"] == "online", (kind, status.json())

                # The two RTU slaves share one line owner: never two frames on the wire at once.
                owners = serial_bus.owners()
                line = owners[("serial", p.rtu_port)]
                assert line.refs == 2
                assert line.max_in_flight == 1
                assert line.transactions >= 2

                # OPC UA: every device's tags Good with the same values, every device online.
                await client.connect()
                ns = await client.get_namespace_index(NAMESPACE)
                for (machine, device, tag), value in EXPECTED.items():
                    node = client.get_node(ua.NodeId(f"{machine}/{device}/{tag}", ns))
                    dv = await node.read_data_value(raise_on_bad_status=False)
                    assert dv.StatusCode is not None
                    assert dv.StatusCode.is_good(), (device, tag, dv.StatusCode)
                    assert dv.Value.Value == pytest.approx(value), (device, tag)
                for machine, device, _ in EXPECTED:
                    online = client.get_node(ua.NodeId(f"{machine}/{device}#online", ns))
                    assert await online.read_value() is True, device
                await client.disconnect()

                # The page: every device online, with its driver; every tag good.
                async with httpx.AsyncClient(timeout=5) as http:
                    devices = (await http.get(f"http://127.0.0.1:{p.web}/api/devices")).json()
                    tags = (await http.get(f"http://127.0.0.1:{p.web}/api/tags")).json()
                assert {d["name"]: (d["driver"], d["state"]) for d in devices} == {
                    name: (kind, "online") for name, kind in DRIVERS.items()
                }
                assert all(d["good_polls"] >= 1 and not d["errors"] for d in devices), devices
                assert len(tags) == len(EXPECTED)
                assert all(t["quality"] == "good" for t in tags), tags

            stop.set()
            await asyncio.wait_for(task, 30)
        finally:
            stop.set()
            if not task.done():
                await asyncio.wait_for(task, 30)
            with contextlib.suppress(Exception):
                await client.disconnect()
        assert not serial_bus.owners()
        assert all(st.state is DeviceState.STOPPED for st in gw.statuses.values())


async def run_once(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    # `once` runs its own event loop (asyncio.run); the peers live in this test's loop, so
    # the command runs in a worker thread while this loop keeps serving them.
    capsys.readouterr()
    code = await asyncio.wait_for(asyncio.to_thread(cli.main, argv), 20)
    out, err = capsys.readouterr()
    return code, out, err


async def test_once_reads_every_driver_kind(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    async with plant(tmp_path, mqtt=None) as p:
        code, out, err = await run_once(["once", str(p.config)], capsys)
        assert code == 0, err
        for machine, _, tag in EXPECTED:
            row = re.search(rf"^{machine}\s+{tag}\s+(\S+)\s.*\bgood\b", out, re.MULTILINE)
            assert row is not None, f"no good row for {machine}/{tag} in:\n{out}"
        assert len(out.strip().splitlines()) == 2 + len(EXPECTED)

        code, out, err = await run_once(["once", "--json", str(p.config)], capsys)
        assert code == 0, err
        rows = [json.loads(line) for line in out.splitlines()]
        got = {(r["machine"], r["device"], r["tag"]): r for r in rows}
        assert set(got) == set(EXPECTED)
        for key, value in EXPECTED.items():
            assert got[key]["quality"] == "good", got[key]
            assert got[key]["value"] == pytest.approx(value), got[key]
        # Raw registers for Modbus tags; an ASCII value has none.
        assert got[("chiller-1", "chiller-1-ctrl", "supply_temp")]["raw"] == [0xFFC9]
        assert got[("oven-1", "oven-1-adam", "zone1")]["raw"] == []
        assert p.adam.requests == 2

        # A slave that stops answering makes `once` say so and exit 1; the others still read.
        p.rtu_server.devices[1].faults.silent = True
        code, out, err = await run_once(["once", "--json", str(p.config)], capsys)
        assert code == 1
        rows = [json.loads(line) for line in out.splitlines()]
        quality = {r["device"]: (r["quality"], r["reason"]) for r in rows}
        assert quality.pop("press-2-vfd") == ("bad", "timeout")
        assert set(quality.values()) == {("good", "")}
        code, out, err = await run_once(["once", str(p.config)], capsys)
        assert code == 1
        assert re.search(r"^press-2\s+motor_current\s+-\s+A\s+bad \(timeout", out, re.MULTILINE)
        assert "press-2-vfd: offline: " in err
        assert "lathe-1-meter" not in err


async def test_modbus_ascii_framing_polled_by_the_gateway(tmp_path: Path) -> None:
    """`framing: ascii` on a modbus_rtu device: Modbus ASCII frames (':' ... LRC CRLF)."""
    line = PtyPair(tmp_path)
    line.start()
    try:
        config = tmp_path / "gateway.yaml"
        config.write_text(
            "gateway: {name: gw, site: s, area: a, line: l}\n"
            "devices:\n"
            + "".join(
                f"  - {{name: {name}, driver: modbus_rtu, machine: press-1, port: {line.a},\n"
                f"     framing: ascii, baudrate: 9600, parity: N, unit_id: {unit},\n"
                "     addressing: zero_based, interval: 0.5, timeout: 0.4,\n"
                f"     tags: [{{name: {tag}, table: holding, address: 0, type: int16,\n"
                "             scale: 0.1, unit: degC}]}\n"
                for name, unit, tag in (("ctl-3", 3, "zone_a"), ("ctl-9", 9, "zone_b"))
            )
        )
        slaves = []
        for unit, value in ((3, 215), (9, -42)):
            dev = RegisterMapDevice(unit)
            dev.serve(Table.HOLDING, 0, 1)
            dev.put(0, "int16", value)
            slaves.append(dev)
        gw = Gateway(load_config(config))
        assert [st.endpoint for st in gw.statuses.values()] == [
            f"{line.a}@9600/8N1 unit 3 (ascii)",
            f"{line.a}@9600/8N1 unit 9 (ascii)",
        ]
        seen: list[Reading] = []

        async def collect(sub: Subscription) -> None:
            async for batch in sub:
                seen.extend(batch)

        async with RegisterServer(slaves, serial_port=line.b, framing="ascii"):
            stop = asyncio.Event()
            task = asyncio.create_task(gw.run(stop, [("collect", collect)]), name="gateway")
            try:
                await eventually(
                    lambda: all(s.good_polls >= 3 for s in gw.statuses.values()),
                    10,
                    "three good polls of each Modbus ASCII slave",
                )
            finally:
                stop.set()
                await asyncio.wait_for(task, 10)
        assert all(not s.errors for s in gw.statuses.values()), gw.statuses
        latest = {r.key: r for r in seen}
        assert latest["press-1/zone_a"].quality is Quality.GOOD
        assert latest["press-1/zone_a"].value == pytest.approx(21.5)
        assert latest["press-1/zone_b"].quality is Quality.GOOD
        assert latest["press-1/zone_b"].value == pytest.approx(-4.2)
        assert all(r.quality is Quality.GOOD for r in seen)
    finally:
        line.stop()

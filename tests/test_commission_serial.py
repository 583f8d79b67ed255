"""``retrofit-gw read`` and ``scan`` on a serial line (RTU, ASCII) and RTU over TCP.

The peers are real: pymodbus's servers (``RegisterServer``) on one end of a socat pty pair,
or on a TCP port with RTU framing (a serial device server's view of its line). The async
tests run server and client in one loop; the CLI tests run the server in a subprocess so that
``main`` can run its own ``asyncio.run``, as in a technician's shell. A pty ignores the baud
rate and refuses parity: every serial test runs 8N1.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any, Literal

import pytest

from drivers.modbus.config import Table
from drivers.modbus.simulator import Faults, RegisterMapDevice, encode
from drivers.modbus.transport import RegisterServer
from gateway.cli import main
from gateway.commission import Endpoint, ScanSpec, UsageError, read_span, scan
from gateway.errors import ConnectionLost, DeviceTimeout
from tests.conftest import free_port
from tests.ptys import SOCAT, PtyPair

pytestmark = pytest.mark.skipif(not Path(SOCAT).exists(), reason="socat is not installed")

ROOT = Path(__file__).resolve().parent.parent


def devices() -> list[RegisterMapDevice]:
    """Two slaves on one line; on a serial line nobody answers any other unit id."""
    d2 = RegisterMapDevice(2)
    d2.serve(Table.HOLDING, 100, 14)
    d2.put(100, "float32", 1450.0, "CDAB")
    d2.serve(Table.INPUT, 0, 3)
    d4 = RegisterMapDevice(4)
    d4.serve(Table.HOLDING, 0, 10)
    d4.set(Table.HOLDING, 0, list(range(40, 50)))
    d4.serve(Table.COIL, 0, 4)
    d4.set(Table.COIL, 0, [True, True, False, True])
    return [d2, d4]


def silent(unit: int) -> RegisterMapDevice:
    """A slave behind a device server that has stopped answering: the server stays silent."""
    dev = RegisterMapDevice(unit, faults=Faults(silent=True))
    dev.serve(Table.HOLDING, 0, 10)
    return dev


_EXPECTED_RANGES = {
    (2, "holding"): [(100, 113)],
    (2, "input"): [(0, 2)],
    (2, "coil"): [],
    (2, "discrete_input"): [],
    (4, "holding"): [(0, 9)],
    (4, "input"): [],
    (4, "coil"): [(0, 3)],
    (4, "discrete_input"): [],
}

# The same devices on a serial line (pty) and, separately, as RTU over TCP. A pymodbus TCP
# server answers SERVER DEVICE FAILURE for an unknown unit id: unit 9 is there to be silent.
_SERVER = """
import asyncio
from drivers.modbus.transport import RegisterServer
from tests.test_commission_serial import devices, silent

async def main():
    async with RegisterServer(devices(), serial_port=SERIAL), RegisterServer(
        [*devices(), silent(9)], port=PORT, framing="rtu"
    ):
        print("ready", flush=True)
        await asyncio.sleep(120)

asyncio.run(main())
"""


@pytest.fixture
async def pty(tmp_path: Path) -> AsyncIterator[PtyPair]:
    pair = PtyPair(tmp_path)
    pair.start()
    try:
        yield pair
    finally:
        pair.stop()


@pytest.fixture(scope="module")
def line(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, int]]:
    """(serial port of the gateway's end, RTU-over-TCP port), served by a subprocess."""
    pair = PtyPair(tmp_path_factory.mktemp("pty"))
    pair.start()
    port = free_port()
    source = _SERVER.replace("SERIAL", repr(pair.b)).replace("PORT", str(port))
    proc = subprocess.Popen(
        [sys.executable, "-c", source], stdout=subprocess.PIPE, text=True, cwd=ROOT
    )
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline().strip() == "ready"
        yield pair.a, port
    finally:
        proc.kill()
        proc.communicate(timeout=10)
        pair.stop()


def _serial(port: str, **kw: Any) -> Endpoint:
    return Endpoint(serial=port, parity="N", **kw)


# -- read, in one loop with the server ---------------------------------------------------------


@pytest.mark.parametrize("framing", ["rtu", "ascii"])
async def test_read_span_over_a_serial_line(pty: PtyPair, framing: Literal["rtu", "ascii"]) -> None:
    async with RegisterServer(devices(), serial_port=pty.b, framing=framing):
        endpoint = _serial(pty.a, framing=framing)
        values = await read_span(endpoint, 2, Table.HOLDING, 100, 2, 0.5)
        assert values == encode("float32", 1450.0, "CDAB")
        assert await read_span(endpoint, 4, Table.COIL, 0, 4, 0.5) == [True, True, False, True]
        assert await read_span(endpoint, 4, Table.HOLDING, 0, 3, 0.5) == [40, 41, 42]
        # The other framing is noise to these slaves: nobody answers, nothing is misread.
        other = _serial(pty.a, framing="ascii" if framing == "rtu" else "rtu")
        with pytest.raises(DeviceTimeout):
            await read_span(other, 2, Table.HOLDING, 100, 2, 0.2)


async def test_read_span_rtu_over_tcp() -> None:
    port = free_port()
    async with RegisterServer(devices(), port=port, framing="rtu"):
        endpoint = Endpoint(host="127.0.0.1", port=port, framing="rtu")
        values = await read_span(endpoint, 2, Table.HOLDING, 100, 2, 0.5)
        assert values == encode("float32", 1450.0, "CDAB")
        # Modbus TCP (MBAP) frames to a device server that expects RTU: no answer to misread.
        with pytest.raises((DeviceTimeout, ConnectionLost)):
            await read_span(Endpoint(host="127.0.0.1", port=port), 2, Table.HOLDING, 100, 2, 0.2)


# -- scan, in one loop with the server ---------------------------------------------------------


async def test_scan_over_a_serial_line_finds_exactly_the_served_units(pty: PtyPair) -> None:
    async with RegisterServer(devices(), serial_port=pty.b):
        # 9600 baud on a pty (which ignores it) makes t3.5 = 4 ms, long enough to measure.
        endpoint = _serial(pty.a, baudrate=9600)
        spec = ScanSpec(endpoint, [1, 2, 3, 4, 5], list(Table), end=119, timeout=0.2)
        spec.check()
        seen: list[str] = []
        result = await scan(spec, seen.append)
    assert {u.unit: u.status for u in result.units} == {
        1: "absent",
        2: "present",
        3: "absent",
        4: "present",
        5: "absent",
    }
    ranges = {(u.unit, t.value): s.ranges for u in result.units for t, s in u.tables.items()}
    assert ranges == _EXPECTED_RANGES
    assert all(s.timeouts == 0 for u in result.units for s in u.tables.values())
    # Requests strictly one after another, the line quiet for t3.5 between them.
    assert endpoint.silence == pytest.approx(3.5 * 11 / 9600)
    assert result.min_gap is not None
    assert result.min_gap >= endpoint.silence * 0.99
    # Discovery: 3 timeouts and 2 answers; ranges: 12 blocks x 4 tables x 2 units, plus
    # first-address probes and edge bisections, within the up-front estimate.
    assert result.requests <= 5 * 4 + 2 * spec.unit_cost()
    assert seen[0] == "unit 1/5 (id 1): found 0 so far"
    assert any(s.startswith("unit 4 (2/2) coil") for s in seen)


# -- the CLI, against a subprocess server ------------------------------------------------------


def test_cli_read_over_a_serial_line(
    line: tuple[str, int], capsys: pytest.CaptureFixture[str]
) -> None:
    serial, _ = line
    argv = ["read", "--serial", serial, "--baudrate", "19200", "--parity", "N"]
    argv += ["--stopbits", "1", "--bytesize", "8", "--framing", "rtu", "--unit", "2", "100"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"{serial}@19200/8N1 rtu unit 2: holding 100+2 (wire addresses)")
    assert "{name: holding_100, table: holding, address: 100, type: float32, order: CDAB}" in out
    assert main([*argv, "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert (data["serial"], data["baudrate"], data["parity"], data["framing"]) == (
        serial,
        19200,
        "N",
        "rtu",
    )
    assert "host" not in data
    assert data["interpretations"]["float32 CDAB"]["value"] == 1450.0


def test_cli_read_rtu_over_tcp(line: tuple[str, int], capsys: pytest.CaptureFixture[str]) -> None:
    _, port = line
    argv = ["read", "--host", "127.0.0.1", "--port", str(port), "--framing", "rtu"]
    assert main([*argv, "--unit", "4", "--json", "0", "3"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert [r["dec"] for r in data["registers"]] == [40, 41, 42]
    assert (data["host"], data["port"], data["framing"]) == ("127.0.0.1", port, "rtu")
    # An absent slave behind the device server: the hint is about its serial side.
    assert main([*argv, "--unit", "9", "--timeout", "0.2", "0"]) == 1
    err = capsys.readouterr().err
    assert f"127.0.0.1:{port} rtu unit 9: no answer to holding 0+2 within 0.2 s" in err
    assert "serial side of the device server" in err


def test_cli_scan_over_a_serial_line_with_progress(
    line: tuple[str, int], capsys: pytest.CaptureFixture[str]
) -> None:
    serial, _ = line
    argv = ["scan", "--serial", serial, "--parity", "N", "--units", "1-5", "--end", "119"]
    assert main([*argv, "--timeout", "0.2", "--json"]) == 0
    captured = capsys.readouterr()
    data = json.loads(captured.out)
    assert {u["unit"]: u["status"] for u in data["units"]} == {
        1: "absent",
        2: "present",
        3: "absent",
        4: "present",
        5: "absent",
    }
    ranges = {
        (u["unit"], table): [tuple(r) for r in t["ranges"]]
        for u in data["units"]
        for table, t in u["tables"].items()
    }
    assert ranges == _EXPECTED_RANGES
    assert (data["serial"], data["framing"]) == (serial, "rtu")
    # Off a terminal, progress is an occasional plain line on stderr.
    assert captured.err.splitlines()[0] == "unit 1/5 (id 1): found 0 so far"

    assert main([*argv, "--timeout", "0.2", "--tables", "holding"]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"{serial}@19200/8N1 rtu: 5 unit id(s), 0-119 in blocks of 10")
    assert [row.split() for row in out.splitlines() if row.startswith(("2 ", "4 "))] == [
        ["2", "holding", "100-113"],
        ["4", "holding", "0-9"],
    ]
    assert "no answer (absent): 1, 3, 5" in out


def test_cli_serial_errors_name_the_serial_options(
    line: tuple[str, int], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    serial, _ = line
    base = ["read", "--serial", serial, "--parity", "N", "--timeout", "0.2"]
    assert main([*base, "--unit", "7", "0"]) == 1
    err = capsys.readouterr().err
    # --timeout plus the frames' 17 characters of 10 bits at 19200 baud.
    assert f"{serial}@19200/8N1 rtu unit 7: no answer to holding 0+2 within 0.209 s" in err
    for flag in ("--serial", "--baudrate", "--parity", "--unit", "--timeout"):
        assert flag in err
    assert "--host" not in err
    assert "--port" not in err
    missing = str(tmp_path / "ttyUSB9")
    assert main(["read", "--serial", missing, "0"]) == 1
    err = capsys.readouterr().err
    assert f"cannot connect to {missing}@19200/8E1" in err
    assert "check --serial" in err
    assert main(["scan", "--serial", missing, "--units", "1"]) == 1
    assert "check --serial" in capsys.readouterr().err


# -- usage -----------------------------------------------------------------------------------


@pytest.mark.parametrize("command", [["read", "0"], ["scan"]])
def test_host_and_serial_together_or_neither_is_a_usage_error(
    command: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exc:
        main([*command, "--host", "127.0.0.1", "--serial", "/dev/ttyUSB0"])
    assert exc.value.code == 2
    assert "argument --serial: not allowed with argument --host" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exc:
        main(command)
    assert exc.value.code == 2
    assert "one of the arguments --host --serial is required" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--serial", "/dev/ttyUSB0", "--port", "502"], "--port is for --host"),
        (["--host", "h", "--baudrate", "9600", "--parity", "N"], "--baudrate, --parity set a"),
        (["--host", "h", "--framing", "ascii"], "--framing ascii is not for --host"),
        (["--serial", "/dev/ttyUSB0", "--framing", "socket"], "--framing socket is not for"),
        (["--serial", "/dev/ttyUSB0", "--bytesize", "7"], "RTU needs 8 data bits"),
        (["--serial", "/dev/ttyUSB0", "--baudrate", "50"], "--baudrate 50 is outside"),
        (["--serial", "/dev/ttyUSB0", "--unit", "0"], "serial line are 1..247, not 0"),
        (["--host", "h", "--framing", "rtu", "--unit", "248"], "1..247, not 248"),
    ],
)
def test_link_options_that_cannot_work_exit_2_before_any_request(
    args: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    # Nothing listens anywhere and /dev/ttyUSB0 is never opened: usage is checked first.
    assert main(["read", *args, "0"]) == 2
    assert message in capsys.readouterr().err


def test_scan_refuses_unit_ids_that_a_serial_line_cannot_have(
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert main(["scan", "--serial", "/dev/ttyUSB0", "--units", "0-5"]) == 2
    assert "--units: slave addresses on a serial line are 1..247" in capsys.readouterr().err
    # Every id of a bus fits the default request limit; a wide range still does not.
    ScanSpec(Endpoint(serial="/dev/ttyUSB0"), list(range(1, 248)), list(Table)).check()
    with pytest.raises(UsageError, match="more than the limit of 5000"):
        ScanSpec(Endpoint(serial="/dev/ttyUSB0"), [1], list(Table), end=65535).check()


def test_endpoint_defaults_and_labels() -> None:
    tcp = Endpoint.from_options(host="10.0.0.5", port=None, serial=None)
    assert (tcp.port, tcp.framing, tcp.label, tcp.silence) == (502, "socket", "10.0.0.5:502", 0)
    rtu_tcp = Endpoint.from_options(host="10.0.0.5", port=4001, serial=None, framing="rtu")
    assert rtu_tcp.label == "10.0.0.5:4001 rtu"
    assert rtu_tcp.silence == 0  # the device server times its own line
    line = Endpoint.from_options(host=None, port=None, serial="/dev/ttyUSB0")
    # The config's defaults for a modbus_rtu device.
    assert line.label == "/dev/ttyUSB0@19200/8E1 rtu"
    assert line.silence == pytest.approx(3.5 * 11 / 19200)
    assert line.json() == {
        "serial": "/dev/ttyUSB0",
        "baudrate": 19200,
        "parity": "E",
        "stopbits": 1,
        "bytesize": 8,
        "framing": "rtu",
    }
    ascii7 = Endpoint(serial="/dev/ttyUSB1", baudrate=9600, bytesize=7, framing="ascii")
    assert ascii7.label == "/dev/ttyUSB1@9600/7E1 ascii"
    # Time on the wire, added to each request's timeout: 1200 baud 8E1 (11 bits a character),
    # a 10-register read is 8 + 25 bytes; in ASCII 17 + 51 characters of 10 bits (7E1).
    slow = Endpoint(serial="/dev/ttyUSB0", baudrate=1200)
    assert slow.wire_time(Table.HOLDING, 10) == pytest.approx(33 * 11 / 1200)
    assert slow.wire_time(Table.COIL, 9) == pytest.approx((8 + 5 + 2) * 11 / 1200)
    assert ascii7.wire_time(Table.HOLDING, 10) == pytest.approx(68 * 10 / 9600)
    assert rtu_tcp.wire_time(Table.HOLDING, 125) == 0  # the device server's own business
    with pytest.raises(UsageError, match="exactly one of --host"):
        Endpoint()

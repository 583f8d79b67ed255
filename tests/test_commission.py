"""``retrofit-gw read`` and ``scan`` against a real Modbus TCP server with known registers.

The server runs in a subprocess (``python -c``) so that the CLI can run in-process with its
own ``asyncio.run``, exactly as a technician's shell would run it.
"""

from __future__ import annotations

import io
import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from drivers.modbus.config import Table
from drivers.modbus.decode import interpretations
from drivers.modbus.simulator import encode
from gateway.cli import main
from gateway.commission import (
    Endpoint,
    Progress,
    ScanSpec,
    UsageError,
    format_ranges,
    parse_tables,
    parse_units,
    reference,
)
from tests.conftest import free_port

ROOT = Path(__file__).resolve().parent.parent

# Unit 1: holding 0-15 and 100-113 (a hole between), input 0-2, coils 0-2.
# Unit 5: holding 20-24, discrete inputs 0-3. Unit 3: present in the server but silent.
# Any other unit id: pymodbus answers SERVER DEVICE FAILURE (4).
_SERVER = """
import asyncio
from drivers.modbus.config import Table
from drivers.modbus.simulator import Faults, RegisterMapDevice
from drivers.modbus.transport import RegisterServer

async def main():
    d1 = RegisterMapDevice(1)
    d1.serve(Table.HOLDING, 0, 16)
    d1.serve(Table.HOLDING, 100, 14)
    d1.put(100, "float32", 1500.0, "CDAB")
    d1.put(102, "float32", 1450.0, "CDAB")
    d1.put(104, "string", "LATHE-3", count=4)
    d1.serve(Table.INPUT, 0, 3)
    d1.serve(Table.COIL, 0, 3)
    d1.set(Table.COIL, 0, [True, False, True])
    d5 = RegisterMapDevice(5)
    d5.serve(Table.HOLDING, 20, 5)
    d5.serve(Table.DISCRETE_INPUT, 0, 4)
    d3 = RegisterMapDevice(3, faults=Faults(silent=True))
    d3.serve(Table.HOLDING, 0, 10)
    async with RegisterServer([d1, d5, d3], port=PORT):
        print("ready", flush=True)
        await asyncio.sleep(120)

asyncio.run(main())
"""


@pytest.fixture(scope="module")
def server() -> Iterator[int]:
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-c", _SERVER.replace("PORT", str(port))],
        stdout=subprocess.PIPE,
        text=True,
        cwd=ROOT,
    )
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline().strip() == "ready"
        yield port
    finally:
        proc.kill()
        proc.communicate(timeout=10)


def _rows(out: str) -> dict[str, str]:
    """Interpretation table rows of ``read``, by type name, as the line printed."""
    lines = out.splitlines()
    head = next(i for i, line in enumerate(lines) if line.startswith("TYPE "))
    return {line[:14].strip(): line for line in lines[head + 2 :]}


def _cell(row: str, header: str, out: str, column: str) -> str:
    start = header.index(column)
    return row[start:].split("  ", maxsplit=1)[0].strip()


def test_read_singles_out_the_plausible_float(
    server: int, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["read", "--host", "127.0.0.1", "--port", str(server), "100"]) == 0
    out = capsys.readouterr().out
    # Raw registers with their addresses, hex and decimal.
    regs = encode("float32", 1500.0, "CDAB")
    assert f"100      {regs[0]:04x}  {regs[0]}" in out
    assert f"101      {regs[1]:04x}  {regs[1]}" in out
    rows = _rows(out)
    header = next(line for line in out.splitlines() if line.startswith("TYPE "))
    cdab = rows["float32 CDAB"]
    assert _cell(cdab, header, out, "VALUE") == "1500"
    assert _cell(cdab, header, out, "NOTE") == ""
    assert "{name: holding_100, table: holding, address: 100, type: float32, order: CDAB}" in cdab
    # Read in the standard order, the same registers are a denormal: marked, no config line.
    abcd = rows["float32 ABCD"]
    assert _cell(abcd, header, out, "NOTE").startswith("? tiny")
    assert "type: float32" not in abcd
    assert len(rows) == len(interpretations(regs))


def test_read_1450_rpm_cdab_is_plausible(server: int, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["read", "--host", "127.0.0.1", "--port", str(server), "102", "2"]) == 0
    out = capsys.readouterr().out
    header = next(line for line in out.splitlines() if line.startswith("TYPE "))
    cdab = _rows(out)["float32 CDAB"]
    assert _cell(cdab, header, out, "VALUE") == "1450"
    assert _cell(cdab, header, out, "NOTE") == ""


def test_read_json_has_every_interpretation(
    server: int, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["read", "--host", "127.0.0.1", "--port", str(server), "100", "4", "--json"]
    assert main(argv) == 0
    data = json.loads(capsys.readouterr().out)
    regs = encode("float32", 1500.0, "CDAB") + encode("float32", 1450.0, "CDAB")
    assert [r["dec"] for r in data["registers"]] == regs
    assert [r["address"] for r in data["registers"]] == [100, 101, 102, 103]
    found = data["interpretations"]
    assert set(found) == set(interpretations(regs))
    assert "float64 GHEFCDAB" in found  # 64-bit types with 4 registers
    assert found["float32 CDAB"]["value"] == 1500.0
    assert found["float32 CDAB"]["plausible"] is True
    assert found["float32 CDAB"]["yaml"].endswith("type: float32, order: CDAB}")
    assert found["float32 ABCD"]["plausible"] is False


def test_read_modicon_reference_names_the_table(
    server: int, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["read", "--host", "127.0.0.1", "--port", str(server), "--addressing", "modicon"]
    assert main([*argv, "40101"]) == 0
    out = capsys.readouterr().out
    assert "40102    101" in out  # the reference and the wire address side by side
    assert "{name: holding_40101, address: 40101, type: float32, order: CDAB}" in out
    # A table that contradicts the reference is a usage error.
    assert main([*argv, "--table", "input", "40101"]) == 2
    assert "is in table holding, not input" in capsys.readouterr().err


def test_read_coils_prints_bits(server: int, capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["read", "--host", "127.0.0.1", "--port", str(server), "--table", "coil", "0", "3"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert [line.split() for line in out.splitlines()[-3:]] == [["0", "1"], ["1", "0"], ["2", "1"]]
    assert main([*argv, "--json"]) == 0
    bits = json.loads(capsys.readouterr().out)["bits"]
    assert [b["value"] for b in bits] == [True, False, True]


def test_read_device_errors_exit_1_with_a_clear_message(
    server: int, capsys: pytest.CaptureFixture[str]
) -> None:
    base = ["read", "--host", "127.0.0.1", "--port", str(server)]
    assert main([*base, "99", "2"]) == 1
    assert capsys.readouterr().err.strip() == (
        "retrofit-gw read: ILLEGAL DATA ADDRESS (2) for holding 99+2: "
        "the device does not serve these addresses"
    )
    assert main([*base, "--unit", "3", "--timeout", "0.2", "0"]) == 1
    err = capsys.readouterr().err
    assert "no answer to holding 0+2 within 0.2 s" in err
    assert "--unit" in err
    assert main(["read", "--host", "127.0.0.1", "--port", str(free_port()), "0"]) == 1
    assert "cannot connect" in capsys.readouterr().err


def test_read_bad_usage_exits_2(capsys: pytest.CaptureFixture[str]) -> None:
    port = str(free_port())  # nothing listens: usage is checked before any connection
    assert main(["read", "--host", "127.0.0.1", "--port", port, "0", "126"]) == 2
    assert "count 126 is outside 1..125" in capsys.readouterr().err
    assert main(["read", "--host", "127.0.0.1", "--port", port, "x1"]) == 2
    with pytest.raises(SystemExit) as exc:
        main(["read", "--port", port, "0"])  # no --host
    assert exc.value.code == 2


def test_scan_finds_units_and_ranges_with_holes(
    server: int, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["scan", "--host", "127.0.0.1", "--port", str(server), "--units", "1-6"]
    assert main([*argv, "--end", "199", "--timeout", "0.3", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    status = {u["unit"]: u["status"] for u in data["units"]}
    assert status == {
        1: "present",
        2: "refused",
        3: "absent",
        4: "refused",
        5: "present",
        6: "refused",
    }
    ranges = {
        (u["unit"], table): [tuple(r) for r in t["ranges"]]
        for u in data["units"]
        for table, t in u["tables"].items()
    }
    assert ranges == {
        (1, "holding"): [(0, 15), (100, 113)],
        (1, "input"): [(0, 2)],
        (1, "coil"): [(0, 2)],
        (1, "discrete_input"): [],
        (5, "holding"): [(20, 24)],
        (5, "input"): [],
        (5, "coil"): [],
        (5, "discrete_input"): [(0, 3)],
    }
    # Discovery (at most 4 per unit id), then 20 blocks per table plus first-address probes
    # and edge bisections.
    assert data["requests"] < 400

    assert main([*argv, "--tables", "holding", "--end", "199"]) == 0
    out = capsys.readouterr().out
    assert [line.split() for line in out.splitlines() if line.startswith(("1 ", "5 "))] == [
        ["1", "holding", "0-15,", "100-113"],
        ["5", "holding", "20-24"],
    ]
    assert "no answer (absent): 3" in out
    assert "2, 4, 6" in out


def test_scan_block_size_decides_what_is_found(
    server: int, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["scan", "--host", "127.0.0.1", "--port", str(server), "--units", "1"]
    argv += ["--tables", "holding", "--end", "127", "--json"]
    # Blocks of 16: 100-113 lies in two refused blocks (96-111, 112-127); the probe of 112
    # answers, so both of its edges are bisected and the whole range is found.
    assert main([*argv, "--block", "16"]) == 0
    unit = json.loads(capsys.readouterr().out)["units"][0]
    assert unit["tables"]["holding"]["ranges"] == [[0, 15], [100, 113]]
    # Blocks of 64: 100-113 sits inside the refused block 64-127 and touches no block edge:
    # it is missed, as documented; the table is still right about 0-15.
    assert main([*argv, "--block", "64"]) == 0
    unit = json.loads(capsys.readouterr().out)["units"][0]
    assert unit["tables"]["holding"]["ranges"] == [[0, 15]]


def test_scan_refuses_a_huge_span_before_sending_anything(
    capsys: pytest.CaptureFixture[str],
) -> None:
    port = str(free_port())
    assert main(["scan", "--host", "127.0.0.1", "--port", port, "--end", "65535"]) == 2
    assert "more than the limit of 5000" in capsys.readouterr().err
    assert main(["scan", "--host", "127.0.0.1", "--port", port, "--units", "1-300"]) == 2
    assert "within 0..255" in capsys.readouterr().err


def test_scan_without_a_server_exits_1(capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["scan", "--host", "127.0.0.1", "--port", str(free_port()), "--units", "1"]
    assert main(argv) == 1
    assert "cannot connect" in capsys.readouterr().err


def test_parsers_and_formatting() -> None:
    assert parse_units("1-3,9, 5") == [1, 2, 3, 5, 9]
    with pytest.raises(UsageError):
        parse_units("3-1")
    with pytest.raises(UsageError):
        parse_units("a")
    assert parse_tables("holding,coil,holding") == [Table.HOLDING, Table.COIL]
    with pytest.raises(UsageError, match="unknown table 'holdings'"):
        parse_tables("holdings")
    assert format_ranges([(0, 15), (100, 113), (200, 200)]) == "0-15, 100-113, 200"
    assert format_ranges([]) == "-"
    spec = ScanSpec(Endpoint(host="h"), [1], [Table.HOLDING], start=0, end=24, block=10)
    assert spec.blocks() == [(0, 10), (10, 10), (20, 5)]


def test_reference_keeps_the_users_numbering() -> None:
    from drivers.modbus.config import Addressing  # noqa: PLC0415

    assert reference(Addressing.MODICON, Table.HOLDING, "40101", 2) == "40103"
    assert reference(Addressing.MODICON, Table.COIL, "000010", 1) == "000011"
    assert reference(Addressing.ONE_BASED, Table.INPUT, "1", 1) == "2"


def test_progress_off_a_terminal_prints_occasional_lines() -> None:
    stream = io.StringIO()
    progress = Progress(stream, period=60)
    progress("unit 1/3")
    progress("unit 2/3")  # within the period: dropped
    progress("unit 3/3", force=True)
    progress.done()
    assert stream.getvalue() == "unit 1/3\nunit 3/3\n"

"""Commissioning tools: ``retrofit-gw read`` (one span, every interpretation) and ``scan``.

Both talk to a device through the Modbus transport façade only, and only with read
functions: commissioning must never change a machine. An :class:`Endpoint` says where: Modbus
TCP to a host, RTU frames through a serial device server (``--host --framing rtu``), or a
serial line with RTU or ASCII framing (``--serial``). One link serves every unit id of a
scan, requests strictly one after another, and on a serial line the inter-frame silence
(t3.5) is kept between them.

``read`` prints the raw registers and every interpretation :func:`decode.interpretations`
knows, marking the implausible ones (tiny denormal floats, NaN/inf, magnitudes over 1e12,
bytes that are not BCD) so that the one reading "1450" stands out, with the config line to
paste for each plausible candidate.

``scan`` runs in two phases, each bounded in requests and time:

1. Unit discovery: one 1-register (1-bit) read per table at ``start``, for each unit id,
   until one is conclusive. Data or an exception response means the unit is present. A
   timeout (or a dropped link) means absent; so do exceptions 10 and 11, with which a
   TCP-to-serial gateway says it has nobody at that id. A unit that answers only SERVER
   DEVICE FAILURE (4) is reported apart as "refused": pymodbus servers (and some gateways)
   answer that for every unit id they do not serve, so counting it as present would make
   every id present.
2. Ranges: for each present unit and table, read ``block`` addresses at a time from
   ``start`` to ``end``. A block either answers in full or not at all, so ranges are known to
   block granularity; where a failed block touches an answering one, the edge is then found
   exactly by bisection (about log2(block) requests per edge, while the request budget
   lasts). A block refused with an exception and not following an answering one is also
   probed at its first address, and its edges bisected when that answers: short tables at
   round addresses (input 0-2) are found too, and a range shorter than two blocks that
   crosses a block boundary. A range that neither starts a block nor touches one that
   answers (in the middle of a block, or of two refused ones) is missed: a smaller
   ``--block`` finds it. Each probe is a read.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, TextIO

from drivers.modbus.config import (
    MAX_REGISTERS_PER_REQUEST,
    Addressing,
    Table,
    resolve_address,
)
from drivers.modbus.decode import interpretations
from drivers.modbus.serial_bus import PortOwner, silence
from drivers.modbus.transport import (
    ClientTransport,
    ModbusRtuOverTcpTransport,
    ModbusSerialTransport,
    ModbusTcpTransport,
)
from gateway.cli import format_table
from gateway.errors import (
    ConnectionLost,
    DecodeError,
    DeviceError,
    DeviceException,
    DeviceTimeout,
)
from gateway.model import Value

__all__ = [
    "DEFAULT_MAX_REQUESTS",
    "Endpoint",
    "Interpretation",
    "Progress",
    "ReadResult",
    "ScanResult",
    "ScanSpec",
    "UsageError",
    "describe_device_error",
    "format_ranges",
    "format_read",
    "format_scan",
    "interpret",
    "parse_tables",
    "parse_units",
    "plan_read",
    "read_json",
    "read_span",
    "reference",
    "scan",
    "scan_json",
]

#: A scan needing more requests than this is refused unless forced (``--force``).
DEFAULT_MAX_REQUESTS = 5000

#: Exception codes with which a TCP-to-serial gateway says nobody answers at that unit id.
_GATEWAY_ABSENT = (10, 11)
_SERVER_DEVICE_FAILURE = 4

#: What each exception code tells a technician reading a span, after its name.
_HINTS: dict[int, str] = {
    1: "the device does not support reading this table",
    2: "the device does not serve these addresses",
    3: "the device refuses this count; try fewer",
    4: "the device failed to answer; some servers answer this for a unit id they do not "
    "serve: check --unit",
    5: "the device accepted the request but has no data yet; try again",
    6: "the device is busy; try again",
    10: "the gateway has no path to this unit id: check --unit",
    11: "the gateway got no answer from this unit id: check --unit and the serial side",
}

_PLAUSIBLE_MIN = 1e-30
_PLAUSIBLE_MAX = 1e12


class UsageError(ValueError):
    """Arguments that make no sense together; the CLI exits 2 with the message."""


# -- where -----------------------------------------------------------------------------------

_TCP_FRAMINGS = ("socket", "rtu")
_SERIAL_FRAMINGS = ("rtu", "ascii")
_SERIAL_OPTIONS = ("baudrate", "parity", "stopbits", "bytesize")


@dataclass(frozen=True)
class Endpoint:
    """Where requests go: ``host`` (Modbus TCP, or RTU frames through a serial device server
    with ``framing="rtu"``) or ``serial``, a serial port with RTU or ASCII framing.

    The serial defaults are the config's (``ModbusRtuDevice``): 19200 baud, 8E1, RTU.
    ``framing`` left empty means socket (Modbus TCP) for a host and rtu for a serial port.
    Raises UsageError for a combination that cannot work.
    """

    host: str = ""
    port: int = 502
    serial: str = ""
    baudrate: int = 19200
    parity: str = "E"
    stopbits: int = 1
    bytesize: int = 8
    framing: str = ""

    def __post_init__(self) -> None:
        if bool(self.host) == bool(self.serial):
            raise UsageError(
                "give exactly one of --host (Modbus TCP, or RTU through a serial device "
                "server) and --serial (a serial port)"
            )
        if not self.framing:
            object.__setattr__(self, "framing", "rtu" if self.serial else "socket")
        if self.host:
            if self.framing not in _TCP_FRAMINGS:
                raise UsageError(
                    f"--framing {self.framing} is not for --host: socket (Modbus TCP) or rtu "
                    "(RTU frames through a serial device server)"
                )
            if not 1 <= self.port <= 65535:
                raise UsageError(f"--port {self.port} is outside 1..65535")
            return
        if self.framing not in _SERIAL_FRAMINGS:
            raise UsageError(f"--framing {self.framing} is not for --serial: rtu or ascii")
        if not 300 <= self.baudrate <= 4_000_000:
            raise UsageError(f"--baudrate {self.baudrate} is outside 300..4000000")
        if self.parity not in ("N", "E", "O"):
            raise UsageError(f"--parity {self.parity} is not N, E or O")
        if self.stopbits not in (1, 2):
            raise UsageError(f"--stopbits {self.stopbits} is not 1 or 2")
        if self.bytesize not in (7, 8) or (self.bytesize == 7 and self.framing != "ascii"):
            raise UsageError(f"--bytesize {self.bytesize}: RTU needs 8 data bits, ASCII 7 or 8")

    @classmethod
    def from_options(
        cls,
        *,
        host: str | None,
        port: int | None,
        serial: str | None,
        baudrate: int | None = None,
        parity: str | None = None,
        stopbits: int | None = None,
        bytesize: int | None = None,
        framing: str | None = None,
    ) -> Endpoint:
        """The endpoint the command-line options name (None: not given)."""
        line = {"baudrate": baudrate, "parity": parity, "stopbits": stopbits, "bytesize": bytesize}
        given: dict[str, Any] = {k: v for k, v in line.items() if v is not None}
        if host and given:
            # A serial device server has its own line settings, set in its web page.
            flags = ", ".join(f"--{k}" for k in given)
            raise UsageError(
                f"{flags} set a serial line (--serial); behind --host the device server's "
                "own settings apply"
            )
        if port is not None:
            if serial:
                raise UsageError("--port is for --host; a serial line is named by --serial")
            given["port"] = port
        return cls(host=host or "", serial=serial or "", framing=framing or "", **given)

    @property
    def on_serial_line(self) -> bool:
        """Unit ids are serial slave addresses (1..247): a port, or a device server."""
        return self.framing != "socket"

    @property
    def silence(self) -> float:
        """Quiet time between transactions; a device server times its own line."""
        return silence(self.baudrate) if self.serial else 0.0

    def wire_time(self, table: Table, count: int) -> float:
        """Seconds a read request and its answer take on the serial wire (0 off a port).

        A response timeout counts from the request being handed to the port: at 1200 baud
        a 10-register read spends 0.3 s on the wire alone.
        """
        if not self.serial:
            return 0.0
        data = -(-count // 8) if table.is_bits else 2 * count
        # Request 8 bytes, answer 5 + data; ASCII sends ':', two hex digits per byte (an LRC
        # byte instead of the CRC) and CR LF.
        binary = 8 + (5 + data)
        chars = (3 + 2 * 7) + (3 + 2 * (4 + data)) if self.framing == "ascii" else binary
        bits = 1 + self.bytesize + (self.parity != "N") + self.stopbits
        return chars * bits / self.baudrate

    @property
    def label(self) -> str:
        """The link as messages and headings name it."""
        if self.serial:
            line = f"{self.baudrate}/{self.bytesize}{self.parity}{self.stopbits}"
            return f"{self.serial}@{line} {self.framing}"
        rtu = " rtu" if self.framing == "rtu" else ""
        return f"{self.host}:{self.port}{rtu}"

    def json(self) -> dict[str, Any]:
        if self.serial:
            return (
                {"serial": self.serial}
                | {k: getattr(self, k) for k in _SERIAL_OPTIONS}
                | {"framing": self.framing}
            )
        return {"host": self.host, "port": self.port, "framing": self.framing}

    def check_unit(self, unit: int, flag: str = "--unit") -> None:
        if self.on_serial_line and not 1 <= unit <= 247:
            # 0 is broadcast on a serial line: slaves act on it without answering.
            raise UsageError(f"{flag}: slave addresses on a serial line are 1..247, not {unit}")
        if not 0 <= unit <= 255:
            raise UsageError(f"{flag} {unit} is outside 0..255")

    def transport(self, unit: int, timeout: float, name: str) -> ClientTransport:
        connect_timeout = max(timeout, 3.0)
        if self.serial:
            return ModbusSerialTransport(
                port=self.serial,
                baudrate=self.baudrate,
                parity=self.parity,
                stopbits=self.stopbits,
                bytesize=self.bytesize,
                framing=self.framing,
                timeout=timeout,
                connect_timeout=connect_timeout,
                name=name,
                unit_id=unit,
            )
        kind = ModbusRtuOverTcpTransport if self.framing == "rtu" else ModbusTcpTransport
        return kind(
            host=self.host,
            port=self.port,
            unit_id=unit,
            timeout=timeout,
            connect_timeout=connect_timeout,
            name=name,
        )


class _Line:
    """The one link of a read or a scan: every unit id goes through it, one at a time.

    On a serial line all slaves share the wire anyway, and pymodbus's async serial client
    sends as soon as it is asked: the line's :class:`PortOwner` keeps it quiet for t3.5
    between transactions, as the gateway's drivers do. Each request waits ``timeout`` plus
    its frames' time on the wire.
    """

    def __init__(self, endpoint: Endpoint, unit: int, timeout: float, name: str) -> None:
        self.endpoint = endpoint
        self.timeout = timeout
        self.transport = endpoint.transport(unit, timeout, name)
        self.owner = PortOwner(
            endpoint.label, self.transport, silence=endpoint.silence, settings=None
        )

    async def connect(self) -> None:
        """Open the link if it is not (a timeout on TCP closes it); raises DeviceError."""
        await self.transport.connect()

    async def read(
        self, unit: int, table: Table, address: int, count: int
    ) -> list[int] | list[bool]:
        transport = self.transport
        # Milliseconds are plenty, and keep "within 0.309 s" readable in messages.
        wait = round(self.timeout + self.endpoint.wire_time(table, count), 3)
        return await self.owner.transaction(
            lambda: transport.read(table, address, count, unit_id=unit, response_timeout=wait)
        )

    async def close(self) -> None:
        await self.transport.close()


# -- read ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Interpretation:
    """One reading of the registers: ``"float32 CDAB"`` -> 1450.0, with a verdict."""

    name: str
    value: Value | str
    note: str  # why it is implausible; "" when plausible
    yaml: str  # the config tag line, "" for implausible readings

    @property
    def plausible(self) -> bool:
        return not self.note


@dataclass(frozen=True)
class ReadResult:
    endpoint: Endpoint
    unit: int
    table: Table
    address: int  # on the wire
    values: list[int] | list[bool]
    addressing: Addressing = Addressing.ZERO_BASED
    given: str = ""  # the address as typed, for the config lines
    interpretations: list[Interpretation] = field(default_factory=list)


def plan_read(
    addressing: Addressing,
    table: Table | None,
    address: str,
    count: int,
    response_timeout: float = 1.0,
) -> tuple[Table, int]:
    """Resolve the typed address as a config would; raise UsageError for a bad request."""
    if not 0 < response_timeout <= 60:
        raise UsageError(f"--timeout {response_timeout:g} is outside (0, 60] seconds")
    try:
        resolved, wire = resolve_address(addressing, table, address)
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    limit = 2000 if resolved.is_bits else MAX_REGISTERS_PER_REQUEST
    if not 1 <= count <= limit:
        raise UsageError(f"count {count} is outside 1..{limit} for table {resolved.value}")
    if wire + count > 65536:
        raise UsageError(f"{resolved.value} {wire}+{count} runs past address 65535")
    return resolved, wire


def reference(addressing: Addressing, table: Table, given: str, offset: int) -> str:
    """The address ``offset`` places after ``given``, written as the user wrote ``given``."""
    text = given.strip()
    if addressing is Addressing.MODICON:
        # Keep the reference's width (and a coil's leading zero): 40101 + 1 -> 40102.
        digits = text if len(text) in (5, 6) else text.zfill(5 if int(text) < 100_000 else 6)
        return digits[0] + str(int(digits[1:]) + offset).zfill(len(digits) - 1)
    return str(int(text) + offset)


def _verdict(name: str, value: Value | str, registers: Sequence[int]) -> str:
    if name == "ascii":
        raw = b"".join(r.to_bytes(2, "big") for r in registers).rstrip(b"\x00")
        return "" if raw and all(0x20 <= b <= 0x7E for b in raw) else "? not text"
    if value == "invalid":
        return "? not BCD"
    if isinstance(value, float):
        if math.isnan(value):
            return "? NaN"
        if math.isinf(value):
            return "? infinite"
        if value != 0 and abs(value) < _PLAUSIBLE_MIN:
            return "? tiny (denormal)"
    if isinstance(value, int | float) and abs(value) > _PLAUSIBLE_MAX:
        return "? huge"
    return ""


def _yaml(name: str, addressing: Addressing, table: Table, given: str, count: int) -> str:
    parts = name.split()
    type_ = parts[0]
    fields = [f"name: {table.value}_{given.strip()}"]
    if addressing is not Addressing.MODICON:
        fields.append(f"table: {table.value}")
    fields.append(f"address: {given.strip()}")
    if type_ == "ascii":
        fields += ["type: string", f"count: {count}"]
    else:
        fields.append(f"type: {type_}")
        if len(parts) > 1:
            # A single register has only its bytes to swap: "BA" is the byte-swapped order.
            order = "BADC" if parts[1] == "BA" else parts[1]
            fields.append(f"order: {order}")
    return "{" + ", ".join(fields) + "}"


def interpret(
    registers: Sequence[int], addressing: Addressing, table: Table, given: str
) -> list[Interpretation]:
    """Every interpretation of the registers from the first, with verdict and config line."""
    out = []
    for name, value in interpretations(registers).items():
        note = _verdict(name, value, registers)
        yaml = "" if note else _yaml(name, addressing, table, given, len(registers))
        out.append(Interpretation(name, value, note, yaml))
    return out


def _fmt(value: Value | str) -> str:
    if isinstance(value, float):
        return f"{value:.6g}"
    if isinstance(value, str) and value != "invalid":
        return repr(value)
    return str(value)


def _dim(text: str, on: bool) -> str:
    return f"\x1b[2m{text}\x1b[0m" if on else text


def format_read(result: ReadResult, *, color: bool = False) -> str:
    """The human-readable answer of ``read``: raw values, then every interpretation."""
    table, given, addressing = result.table, result.given, result.addressing
    wire_too = addressing is not Addressing.ZERO_BASED
    lines = [
        f"{result.endpoint.label} unit {result.unit}: {table.value} "
        f"{result.address}+{len(result.values)} (wire addresses)",
        "",
    ]
    header = ["ADDRESS", *(["WIRE"] if wire_too else [])]
    rows = []
    for i, v in enumerate(result.values):
        cells = [reference(addressing, table, given, i)]
        if wire_too:
            cells.append(str(result.address + i))
        if isinstance(v, bool):
            cells.append("1" if v else "0")
        else:
            cells += [f"{v:04x}", str(v), f"{v:016b}"[:8] + " " + f"{v:016b}"[8:]]
        rows.append(cells)
    header += ["BIT"] if table.is_bits else ["HEX", "DEC", "BINARY"]
    lines.append(format_table(rows, header))
    if table.is_bits:
        return "\n".join(lines)
    lines += [
        "",
        f"Interpretations from {table.value} {reference(addressing, table, given, 0)} "
        "('?' marks implausible values):",
        "",
    ]
    irows = [[i.name, _fmt(i.value), i.note, i.yaml] for i in result.interpretations]
    text = format_table(irows, ["TYPE", "VALUE", "NOTE", "CONFIG"]).split("\n")
    lines += text[:2]
    lines += [
        _dim(line, color and not i.plausible)
        for line, i in zip(text[2:], result.interpretations, strict=True)
    ]
    return "\n".join(lines)


def _json_value(value: Value | str) -> Value | str:
    # JSON has no NaN or infinity: spell them as Python does.
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return value


def read_json(result: ReadResult) -> dict[str, Any]:
    table, given, addressing = result.table, result.given, result.addressing
    out: dict[str, Any] = {
        **result.endpoint.json(),
        "unit": result.unit,
        "table": table.value,
        "address": result.address,
        "addressing": addressing.value,
        "reference": given,
        "count": len(result.values),
    }
    if table.is_bits:
        out["bits"] = [
            {
                "address": result.address + i,
                "reference": reference(addressing, table, given, i),
                "value": bool(v),
            }
            for i, v in enumerate(result.values)
        ]
        return out
    out["registers"] = [
        {
            "address": result.address + i,
            "reference": reference(addressing, table, given, i),
            "hex": f"{v:04x}",
            "dec": v,
        }
        for i, v in enumerate(result.values)
    ]
    out["interpretations"] = {
        i.name: {
            "value": _json_value(i.value),
            "plausible": i.plausible,
            "note": i.note.removeprefix("? "),
            "yaml": i.yaml,
        }
        for i in result.interpretations
    }
    return out


def describe_device_error(exc: DeviceError, endpoint: Endpoint | None = None) -> str:
    """A device error as a technician should read it: what happened, then what it means.

    The hints name the options of the link in use (``--serial`` and its line settings, or
    ``--host`` and ``--port``); without an endpoint, those of Modbus TCP.
    """
    if isinstance(exc, DeviceException):
        hint = _HINTS.get(exc.code, "the device refused the request")
        return f"{exc}: {hint}"
    serial = endpoint is not None and bool(endpoint.serial)
    if isinstance(exc, DeviceTimeout):
        if serial:
            return (
                f"{exc}: nothing answered; check --unit, then --serial, --baudrate, --parity "
                "and --stopbits (a slave ignores frames at other settings), --framing, and the "
                "wiring (swapped A/B lines are common), or raise --timeout"
            )
        if endpoint is not None and endpoint.framing == "rtu":
            return (
                f"{exc}: nothing answered; check --host, --port and --unit, and the serial "
                "side of the device server (its baud rate and parity must match the slave's), "
                "or raise --timeout"
            )
        return (
            f"{exc}: nothing answered; check --host, --port and --unit (a TCP-to-serial "
            f"gateway stays silent for a unit id it does not have), or raise --timeout"
        )
    if isinstance(exc, DecodeError):
        return f"{exc}: the answer does not match the request"
    if serial and isinstance(exc, ConnectionLost):
        return (
            f"{exc}: check --serial: the port must exist (a USB adapter may have a new name "
            "after replugging) and no other program, such as a running gateway, may hold it"
        )
    return str(exc)


async def read_span(
    endpoint: Endpoint,
    unit: int,
    table: Table,
    address: int,
    count: int,
    response_timeout: float,
) -> list[int] | list[bool]:
    """Read one span once; raises the transport's DeviceError."""
    line = _Line(endpoint, unit, response_timeout, f"{endpoint.label} unit {unit}")
    try:
        await line.connect()
        return await line.read(unit, table, address, count)
    finally:
        await line.close()


# -- scan ------------------------------------------------------------------------------------


def parse_units(text: str) -> list[int]:
    """``"1-247"``, ``"1,2,5"`` or both mixed (``"1-3,9"``) -> sorted unit ids 0..255."""
    units: set[int] = set()
    for part in text.split(","):
        first, sep, last = part.strip().partition("-")
        try:
            lo = int(first)
            hi = int(last) if sep else lo
        except ValueError:
            raise UsageError(f"--units wants ids like 1-247 or 1,2,5, not {text!r}") from None
        if not 0 <= lo <= hi <= 255:
            raise UsageError(f"unit ids {part.strip()} are not a range within 0..255")
        units.update(range(lo, hi + 1))
    return sorted(units)


def parse_tables(text: str) -> list[Table]:
    tables = []
    for part in text.split(","):
        try:
            table = Table(part.strip())
        except ValueError:
            names = ", ".join(t.value for t in Table)
            raise UsageError(f"unknown table {part.strip()!r}; tables are {names}") from None
        if table not in tables:
            tables.append(table)
    return tables


def format_ranges(ranges: Sequence[tuple[int, int]]) -> str:
    """Inclusive ``(first, last)`` pairs as ``"0-15, 100-113"``; a single address alone."""
    return ", ".join(str(a) if a == b else f"{a}-{b}" for a, b in ranges) or "-"


@dataclass(frozen=True)
class ScanSpec:
    endpoint: Endpoint
    units: list[int]
    tables: list[Table]
    start: int = 0
    end: int = 999
    block: int = 10
    timeout: float = 0.3
    max_requests: int | None = DEFAULT_MAX_REQUESTS  # None: --force

    def blocks(self) -> list[tuple[int, int]]:
        """``(address, count)`` of each probe block from start to end inclusive."""
        return [
            (a, min(self.block, self.end + 1 - a))
            for a in range(self.start, self.end + 1, self.block)
        ]

    def check(self) -> None:
        if not 0 <= self.start <= self.end <= 65535:
            raise UsageError(
                f"--start {self.start} and --end {self.end} must be 0..65535, in order"
            )
        if not 1 <= self.block <= MAX_REGISTERS_PER_REQUEST:
            raise UsageError(f"--block {self.block} is outside 1..{MAX_REGISTERS_PER_REQUEST}")
        if not 0 < self.timeout <= 60:
            raise UsageError(f"--timeout {self.timeout:g} is outside (0, 60] seconds")
        if not self.units or not self.tables:
            raise UsageError("nothing to scan: no unit ids or no tables")
        for unit in (self.units[0], self.units[-1]):
            self.endpoint.check_unit(unit, "--units")
        limit = self.max_requests
        # Up front, the unit discovery at its worst plus one unit's ranges must fit.
        needed = len(self.units) * len(self.tables) + self.unit_cost()
        if limit is not None and needed > limit:
            raise UsageError(
                f"this scan needs up to {needed} requests, more than the limit of {limit}: "
                "narrow --units, --tables, --start/--end, raise --block, or pass --force"
            )

    def unit_cost(self) -> int:
        """Block probes for one present unit, plus a first-address probe per block (edges
        refined cost a few more, while the budget lasts)."""
        return 2 * len(self.tables) * len(self.blocks())


@dataclass
class TableScan:
    ranges: list[tuple[int, int]] = field(default_factory=list)  # inclusive
    timeouts: int = 0
    exceptions: dict[int, str] = field(default_factory=dict)  # code -> name
    coarse: bool = False  # some edge left at block granularity (request budget)


@dataclass
class UnitScan:
    unit: int
    status: str  # present | absent | refused
    evidence: str  # what the discovery saw
    tables: dict[Table, TableScan] = field(default_factory=dict)


@dataclass
class ScanResult:
    spec: ScanSpec
    units: list[UnitScan] = field(default_factory=list)
    requests: int = 0
    elapsed: float = 0.0
    stopped: str = ""  # why the range phase did not run, if it did not
    #: Shortest quiet time between two requests on the link (on a serial line >= t3.5).
    min_gap: float | None = None


class Progress:
    """One updating line on a terminal; an occasional plain line anywhere else."""

    def __init__(self, stream: TextIO, *, period: float = 5.0) -> None:
        self.stream = stream
        self.tty = stream.isatty()
        self.period = 0.1 if self.tty else period
        self._last = -math.inf
        self._shown = False

    def __call__(self, text: str, *, force: bool = False) -> None:
        now = time.monotonic()
        if not force and now - self._last < self.period:
            return
        self._last = now
        if self.tty:
            self.stream.write("\r\x1b[K" + text)
            self._shown = True
        else:
            self.stream.write(text + "\n")
        self.stream.flush()

    def done(self) -> None:
        if self._shown:
            self.stream.write("\r\x1b[K")
            self.stream.flush()


class _Outcome:
    OK = "ok"
    EXCEPTION = "exception"
    SILENT = "silent"  # timeout or dropped link


class _Prober:
    """Requests for one unit id over the scan's one link, counted against its budget."""

    def __init__(self, line: _Line, unit: int, result: ScanResult) -> None:
        self.line = line
        self.unit = unit
        self.result = result

    async def probe(self, table: Table, address: int, count: int) -> tuple[str, int, str]:
        """``(outcome, exception code, exception name)``; a failed (re)connect raises."""
        # On TCP a timeout closes the link (so a late answer cannot pair with the next
        # request): reconnect before each request. A serial port stays open. Connect errors
        # end the scan: the host or the port is gone.
        await self.line.connect()
        self.result.requests += 1
        try:
            await self.line.read(self.unit, table, address, count)
        except DeviceException as exc:
            return _Outcome.EXCEPTION, exc.code, exc.name
        except DecodeError:
            # An answer, though a wrong one: something is there.
            return _Outcome.EXCEPTION, 0, "malformed answer"
        except DeviceError:
            return _Outcome.SILENT, 0, ""
        return _Outcome.OK, 0, ""

    async def ok(self, table: Table, address: int, count: int) -> bool:
        return (await self.probe(table, address, count))[0] == _Outcome.OK


async def _discover(spec: ScanSpec, prober: _Prober, unit: int) -> UnitScan:
    refusals = []
    for table in spec.tables:
        outcome, code, name = await prober.probe(table, spec.start, 1)
        if outcome == _Outcome.OK:
            return UnitScan(unit, "present", f"data from {table.value} {spec.start}")
        if outcome == _Outcome.SILENT:
            return UnitScan(unit, "absent", "no answer")
        if code in _GATEWAY_ABSENT:
            return UnitScan(unit, "absent", f"{name} ({code})")
        if code != _SERVER_DEVICE_FAILURE:
            return UnitScan(unit, "present", f"{name} ({code}) on {table.value} {spec.start}")
        refusals.append(table.value)
    return UnitScan(unit, "refused", f"SERVER DEVICE FAILURE (4) on {', '.join(refusals)}")


def _merge(spans: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """Half-open spans -> sorted inclusive ranges, touching ones joined."""
    merged: list[tuple[int, int]] = []
    for a, b in sorted(s for s in spans if s[1] > s[0]):
        if merged and a <= merged[-1][1] + 1:
            merged[-1] = (merged[-1][0], max(merged[-1][1], b - 1))
        else:
            merged.append((a, b - 1))
    return merged


async def _scan_table(
    spec: ScanSpec,
    prober: _Prober,
    table: Table,
    progress: Callable[[str], None],
    label: str,
) -> TableScan:
    out = TableScan()
    blocks = spec.blocks()
    outcomes: list[str] = []
    for address, count in blocks:
        progress(f"{label} {table.value} {address}/{spec.end} ({prober.result.requests} requests)")
        outcome, code, name = await prober.probe(table, address, count)
        outcomes.append(outcome)
        if outcome == _Outcome.SILENT:
            out.timeouts += 1
        elif outcome == _Outcome.EXCEPTION:
            out.exceptions[code] = name
    answered = [o == _Outcome.OK for o in outcomes]
    spans = [(a, a + n) for (a, n), ok in zip(blocks, answered, strict=True) if ok]
    limit = spec.max_requests

    def affordable(cost: int) -> bool:
        return limit is None or prober.result.requests + cost <= limit

    # A refused block may still start with a short range (small tables at round addresses
    # are common: input 0-2), or with the tail of one that began in the block before: one
    # request on its first address tells. Not after a timeout, which costs a whole
    # --timeout again, nor after an answering block, whose edge is bisected anyway.
    starts = answered.copy()
    for i, (address, count) in enumerate(blocks):
        if outcomes[i] == _Outcome.EXCEPTION and count > 1 and not (i and answered[i - 1]):
            if not affordable(1):
                out.coarse = True
                break
            starts[i] = await prober.ok(table, address, 1)
    steps = math.ceil(math.log2(spec.block)) if spec.block > 1 else 0
    for i, (address, count) in enumerate(blocks):
        if answered[i]:
            continue
        left = (i > 0 and answered[i - 1]) or starts[i]
        right = i + 1 < len(blocks) and starts[i + 1]
        if count < 2 or not affordable((left + right) * steps):
            out.coarse = out.coarse or (count > 1 and (left or right))
            continue
        if left:
            # Largest k with [address, address+k) answering: lo answers, hi does not.
            lo, hi = 0, count
            while hi - lo > 1:
                mid = (lo + hi) // 2
                if await prober.ok(table, address, mid):
                    lo = mid
                else:
                    hi = mid
            spans.append((address, address + lo))
        if right:
            # Smallest j with [j, stop) answering: hi answers (empty), lo does not.
            stop = address + count
            lo, hi = address, stop
            while hi - lo > 1:
                mid = (lo + hi) // 2
                if await prober.ok(table, mid, stop - mid):
                    hi = mid
                else:
                    lo = mid
            spans.append((hi, stop))
    out.ranges = _merge(spans)
    return out


async def scan(spec: ScanSpec, progress: Callable[[str], None] = lambda _: None) -> ScanResult:
    """Run both phases of a scan (see the module docstring); raises DeviceError only when
    the host cannot be connected to at all."""
    started = time.monotonic()
    result = ScanResult(spec)
    n = len(spec.units)
    line = _Line(spec.endpoint, spec.units[0], spec.timeout, spec.endpoint.label)
    try:
        for k, unit in enumerate(spec.units, 1):
            progress(f"unit {k}/{n} (id {unit}): found {_present(result)} so far")
            result.units.append(await _discover(spec, _Prober(line, unit, result), unit))
        present = [u for u in result.units if u.status == "present"]
        needed = result.requests + len(present) * spec.unit_cost()
        if spec.max_requests is not None and needed > spec.max_requests:
            result.stopped = (
                f"{len(present)} unit(s) answer; scanning their ranges needs about {needed} "
                f"requests in all, more than the limit of {spec.max_requests}: narrow --units, "
                "--tables or --start/--end, raise --block, or pass --force"
            )
        else:
            for k, u in enumerate(present, 1):
                prober = _Prober(line, u.unit, result)
                for table in spec.tables:
                    u.tables[table] = await _scan_table(
                        spec, prober, table, progress, f"unit {u.unit} ({k}/{len(present)})"
                    )
    finally:
        await line.close()
    result.min_gap = line.owner.min_gap
    result.elapsed = time.monotonic() - started
    return result


def _present(result: ScanResult) -> int:
    return sum(u.status == "present" for u in result.units)


def _table_note(t: TableScan) -> str:
    notes = []
    if not t.ranges and set(t.exceptions) == {1}:
        notes.append("table not supported (ILLEGAL FUNCTION)")
    if t.timeouts:
        notes.append(f"{t.timeouts} block(s) not answered")
    if t.coarse:
        notes.append("some edges to block granularity (request limit)")
    return "; ".join(notes)


def _ids(units: Sequence[int]) -> str:
    ranges: list[tuple[int, int]] = []
    for u in units:
        if ranges and u == ranges[-1][1] + 1:
            ranges[-1] = (ranges[-1][0], u)
        else:
            ranges.append((u, u))
    return format_ranges(ranges)


def format_scan(result: ScanResult) -> str:
    spec = result.spec
    lines = [
        f"{spec.endpoint.label}: {len(spec.units)} unit id(s), {spec.start}-{spec.end} in "
        f"blocks of {spec.block}: {result.requests} requests in {result.elapsed:.1f} s",
        "",
    ]
    rows = []
    for u in result.units:
        if u.status != "present":
            continue
        if not u.tables:
            rows.append([str(u.unit), "", "(not scanned)", u.evidence])
        for table, t in u.tables.items():
            rows.append([str(u.unit), table.value, format_ranges(t.ranges), _table_note(t)])
    if rows:
        lines.append(format_table(rows, ["UNIT", "TABLE", "RANGES", "NOTE"]))
    else:
        lines.append("no unit id answered")
    absent = [u.unit for u in result.units if u.status == "absent"]
    refused = [u.unit for u in result.units if u.status == "refused"]
    lines.append("")
    if absent:
        lines.append(f"no answer (absent): {_ids(absent)}")
    if refused:
        lines.append(
            f"answered only SERVER DEVICE FAILURE (4), as servers do for ids they do not "
            f"serve: {_ids(refused)}"
        )
    if result.stopped:
        lines.append(f"ranges not scanned: {result.stopped}")
    return "\n".join(lines).rstrip()


def scan_json(result: ScanResult) -> dict[str, Any]:
    spec = result.spec
    return {
        **spec.endpoint.json(),
        "start": spec.start,
        "end": spec.end,
        "block": spec.block,
        "requests": result.requests,
        "elapsed": round(result.elapsed, 3),
        "stopped": result.stopped or None,
        "units": [
            {
                "unit": u.unit,
                "status": u.status,
                "evidence": u.evidence,
                "tables": {
                    table.value: {
                        "ranges": [list(r) for r in t.ranges],
                        "blocks_not_answered": t.timeouts,
                        "exceptions": {str(c): n for c, n in sorted(t.exceptions.items())},
                        "coarse": t.coarse,
                    }
                    for table, t in u.tables.items()
                },
            }
            for u in result.units
        ],
    }

"""Config models of the Modbus drivers, and the Modbus-specific cross-checks.

Pure: no I/O, no pymodbus. ``gateway.config`` embeds these models in the gateway config and
calls ``check_device`` in its cross-check pass.
"""

from __future__ import annotations

import enum
from collections.abc import Sequence
from typing import Annotated, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field

# One list of tag types for every driver and sink (is_integer/is_numeric live there); the
# Modbus config re-exports it under its old name.
from gateway.model import DataType

__all__ = [
    "MAX_BITS_PER_REQUEST",
    "MAX_REGISTERS_PER_REQUEST",
    "REGISTER_WIDTH",
    "Addressing",
    "ByteOrder",
    "DataType",
    "ModbusDevice",
    "ModbusRtuDevice",
    "ModbusRtuOverTcpDevice",
    "ModbusTag",
    "ModbusTcpDevice",
    "Table",
    "Workarounds",
    "check_device",
    "check_serial_buses",
    "register_count",
    "resolve_address",
]

#: Modbus Application Protocol v1.1b3 §6.3/§6.1: FC3/FC4 read 1..125 registers, FC1/FC2 1..2000.
MAX_REGISTERS_PER_REQUEST = 125
MAX_BITS_PER_REQUEST = 2000

_Name = Annotated[str, Field(min_length=1, max_length=64)]
_Seconds = Annotated[float, Field(gt=0, le=86_400)]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, use_enum_values=False)


class Table(enum.StrEnum):
    COIL = "coil"
    DISCRETE_INPUT = "discrete_input"
    HOLDING = "holding"
    INPUT = "input"

    @property
    def is_bits(self) -> bool:
        return self in (Table.COIL, Table.DISCRETE_INPUT)


class ByteOrder(enum.StrEnum):
    """Where the bytes of a value land in the registers, written as the value's bytes.

    The value's most significant byte is A. ``ABCD`` is the Modbus standard (big-endian bytes,
    high word first). ``CDAB`` swaps the words, ``BADC`` swaps the bytes inside each word and
    ``DCBA`` does both. The 8-letter names say the same for 64-bit values; a 4-letter name on
    a 64-bit value means the same swaps. On 16-bit values only the byte swap matters.
    """

    ABCD = "ABCD"
    BADC = "BADC"
    CDAB = "CDAB"
    DCBA = "DCBA"
    ABCDEFGH = "ABCDEFGH"
    BADCFEHG = "BADCFEHG"
    GHEFCDAB = "GHEFCDAB"
    HGFEDCBA = "HGFEDCBA"

    @property
    def swap_bytes(self) -> bool:
        """Bytes inside each register are little-endian."""
        return self in (ByteOrder.BADC, ByteOrder.DCBA, ByteOrder.BADCFEHG, ByteOrder.HGFEDCBA)

    @property
    def swap_words(self) -> bool:
        """The low word comes first."""
        return self in (ByteOrder.CDAB, ByteOrder.DCBA, ByteOrder.GHEFCDAB, ByteOrder.HGFEDCBA)


class Addressing(enum.StrEnum):
    """How the ``address`` of every tag of a device is written. Never guessed.

    - ``zero_based``: the protocol address on the wire (0..65535); ``table`` is required.
    - ``one_based``: register number 1..65536 within ``table``, as many manuals print it.
    - ``modicon``: the 5- or 6-digit reference (``40001``, ``400001``, ``30001``, ``10001``,
      ``00001``). The leading digit names the table; ``table`` may be given but must agree.
      Coils above 09999 must be written as a quoted 6-digit string (``"012345"``).
    """

    ZERO_BASED = "zero_based"
    ONE_BASED = "one_based"
    MODICON = "modicon"


#: Registers a value of each fixed-width type occupies.
REGISTER_WIDTH: dict[DataType, int] = {
    DataType.BIT: 1,
    DataType.INT16: 1,
    DataType.UINT16: 1,
    DataType.BCD16: 1,
    DataType.INT32: 2,
    DataType.UINT32: 2,
    DataType.FLOAT32: 2,
    DataType.BCD32: 2,
    DataType.INT64: 4,
    DataType.UINT64: 4,
    DataType.FLOAT64: 4,
}


class WriteLimits(_Strict):
    """What a client may write to a writable tag, in engineering units (after scale)."""

    min: float | None = Field(default=None, description="Smallest value a client may write.")
    max: float | None = Field(default=None, description="Largest value a client may write.")
    values: list[bool | int | float] | None = Field(
        default=None, min_length=1, description="The only values a client may write."
    )
    min_interval: float = Field(
        default=1.0, ge=0, le=86_400, description="Seconds between two writes to this tag."
    )


class ModbusTag(_Strict):
    """One value read from a Modbus device."""

    #: Not columns of a CSV register table: a write is allowed in the YAML, beside its limits,
    #: where a reviewer sees it, never by a cell in a spreadsheet export.
    CSV_EXCLUDED: ClassVar[frozenset[str]] = frozenset({"writable", "write"})

    name: _Name
    table: Table | None = Field(
        default=None, description="Register table; optional only with modicon addressing."
    )
    address: int | str = Field(
        description="Address, written as the device's `addressing` says (e.g. 0, 1, 40001)."
    )
    type: DataType = DataType.UINT16
    order: ByteOrder = Field(
        default=ByteOrder.ABCD, description="Byte and word order of multi-byte values."
    )
    bit: int | None = Field(default=None, ge=0, le=15, description="Bit index for type `bit`.")
    count: int | None = Field(
        default=None, ge=1, le=MAX_REGISTERS_PER_REQUEST, description="Registers (strings)."
    )
    scale: float = 1.0
    offset: float = 0.0
    unit: str | None = Field(default=None, max_length=32, description="Engineering unit.")
    description: str = ""
    interval: _Seconds | None = Field(default=None, description="Overrides the device interval.")
    deadband: float | None = Field(default=None, ge=0)
    min: float | None = Field(default=None, description="Expected minimum; below is Uncertain.")
    max: float | None = Field(default=None, description="Expected maximum; above is Uncertain.")
    writable: bool = Field(
        default=False,
        description="Let OPC UA operators, MQTT /set and Sparkplug DCMD write it (needs `write`).",
    )
    write: WriteLimits | None = Field(
        default=None, description="Limits for writes; required with writable: true."
    )


class Workarounds(_Strict):
    """Named quirks of real devices. Each defaults to the behaviour of a well-behaved device."""

    pause_after_connect: float = Field(
        default=0.0, ge=0, le=60, description="Seconds to wait after connecting (slow gateways)."
    )
    pause_between_requests: float = Field(
        default=0.0, ge=0, le=10, description="Seconds of silence between two requests."
    )
    max_registers_per_request: int = Field(default=MAX_REGISTERS_PER_REQUEST, ge=1, le=125)
    max_bits_per_request: int = Field(default=MAX_BITS_PER_REQUEST, ge=1, le=2000)
    one_request_per_tag: bool = Field(
        default=False, description="Never merge tags into one request."
    )
    close_after_poll: bool = Field(
        default=False, description="Disconnect after every poll (devices that drop idle links)."
    )


class _ModbusDevice(_Strict):
    """What every Modbus device has, whatever carries its frames."""

    # Narrowed to one Literal by each device; declared here so that it comes first.
    driver: str
    name: _Name
    machine: _Name = Field(description="The machine this device belongs to, e.g. lathe-3.")
    enabled: bool = True
    timeout: _Seconds = Field(
        default=0.5, description="Seconds to wait for one response; shorter than `interval`."
    )
    connect_timeout: _Seconds = Field(default=3.0, description="Seconds to wait for a connect.")
    interval: _Seconds = Field(default=1.0, description="Poll interval in seconds.")
    addressing: Addressing
    max_gap: int = Field(
        default=10, ge=0, le=124, description="Unused registers a request may span to merge."
    )
    workarounds: Workarounds = Workarounds()
    tags: list[ModbusTag] = Field(default_factory=list)
    tags_csv: str | None = Field(
        default=None, description="CSV register table, relative to this config file."
    )
    profile: str | None = Field(
        default=None,
        description="Device profile: defaults and tags from profiles/<name>.yaml next to this "
        "file, else the built-in config/profiles/.",
    )


#: Serial line addresses: 0 is broadcast (no answer) and 248..255 are reserved.
_SerialUnit = Annotated[int, Field(ge=1, le=247)]


class _OverTcp(_ModbusDevice):
    host: str = Field(min_length=1)
    port: int = Field(default=502, ge=1, le=65535)


class ModbusTcpDevice(_OverTcp):
    """A Modbus TCP server: a PLC, a controller, or a TCP-to-serial gateway (one unit id)."""

    driver: Literal["modbus_tcp"]
    unit_id: int = Field(default=1, ge=0, le=255)


class ModbusRtuOverTcpDevice(_OverTcp):
    """A serial slave behind a transparent serial device server: RTU frames (with CRC) in TCP.

    Every device on one ``host:port`` shares one connection and one request at a time, as
    the serial line behind the server demands.
    """

    driver: Literal["modbus_rtu_over_tcp"]
    unit_id: _SerialUnit = 1


class ModbusRtuDevice(_ModbusDevice):
    """A Modbus RTU (or ASCII) slave on a serial line, e.g. an RS-485 bus shared by several.

    Every device on one ``port`` must agree on the line settings and have its own unit id.
    """

    driver: Literal["modbus_rtu"]
    port: str = Field(min_length=1, description="Serial port, e.g. /dev/ttyUSB0.")
    baudrate: int = Field(default=19200, ge=300, le=4_000_000)
    parity: Literal["N", "E", "O"] = Field(
        default="E", description="N, E or O; the Modbus serial line standard is E (even)."
    )
    stopbits: Literal[1, 2] = 1
    bytesize: Literal[8] = 8
    unit_id: _SerialUnit = 1
    framing: Literal["rtu", "ascii"] = Field(default="rtu", description="Modbus RTU or ASCII.")
    turnaround_gap: float = Field(
        default=0.0,
        ge=0,
        le=10,
        description="Extra seconds of silence after each transaction (slow slaves, converters).",
    )

    @property
    def line(self) -> str:
        """The line settings as on a device's label: ``19200/8E1``."""
        return f"{self.baudrate}/{self.bytesize}{self.parity}{self.stopbits}"


#: Every Modbus device model, for ``check_device`` and the gateway's device union.
ModbusDevice = ModbusTcpDevice | ModbusRtuDevice | ModbusRtuOverTcpDevice


def resolve_address(
    addressing: Addressing, table: Table | None, address: int | str
) -> tuple[Table, int]:
    """Turn a configured address into ``(table, protocol address)``.

    Raises ``ValueError`` with a message fit for the user.
    """
    text = str(address).strip()
    if not text.isdigit():
        raise ValueError(f"address {address!r} is not a whole number")
    number = int(text)
    if addressing is Addressing.MODICON:
        return _resolve_modicon(table, text, number)
    if table is None:
        raise ValueError(f"`table` is required with {addressing.value} addressing")
    if addressing is Addressing.ONE_BASED:
        if not 1 <= number <= 65536:
            raise ValueError(f"one_based address {number} is outside 1..65536")
        return table, number - 1
    if not 0 <= number <= 65535:
        raise ValueError(f"zero_based address {number} is outside 0..65535")
    return table, number


_MODICON_PREFIX = {
    "0": Table.COIL,
    "1": Table.DISCRETE_INPUT,
    "3": Table.INPUT,
    "4": Table.HOLDING,
}


def _resolve_modicon(table: Table | None, text: str, number: int) -> tuple[Table, int]:
    # A bare YAML int loses leading zeros: 1 means 00001 (coil 0). Numbers below 100000 are
    # therefore read as 5-digit references, larger ones as 6-digit; quoted strings keep
    # their length and decide for themselves.
    digits = text if len(text) in (5, 6) else text.zfill(5 if number < 100_000 else 6)
    if len(digits) not in (5, 6):
        raise ValueError(f"modicon address {text} is not a 5- or 6-digit reference")
    prefix, rest = digits[0], int(digits[1:])
    found = _MODICON_PREFIX.get(prefix)
    if found is None:
        raise ValueError(f"modicon address {digits} starts with {prefix}; expected 0, 1, 3 or 4")
    limit = 9999 if len(digits) == 5 else 65536
    if not 1 <= rest <= limit:
        raise ValueError(
            f"modicon address {digits} is outside {prefix}{'0' * (len(digits) - 2)}1"
            f"..{prefix}{limit}"
        )
    if table is not None and table is not found:
        raise ValueError(f"modicon address {digits} is in table {found.value}, not {table.value}")
    return found, rest - 1


def register_count(tag: ModbusTag) -> int:
    """Registers (or bits, for bit tables) the tag occupies."""
    if tag.type is DataType.BOOL:
        return 1
    if tag.type is DataType.STRING:
        return tag.count or 0
    return REGISTER_WIDTH[tag.type]


def check_device(device: ModbusDevice) -> list[tuple[tuple[str | int, ...], str]]:
    """Modbus-specific cross-checks. Returns ``(location under the device, message)`` pairs."""
    issues: list[tuple[tuple[str | int, ...], str]] = []
    if not isinstance(device, ModbusTcpDevice) and device.workarounds.close_after_poll:
        # The link is shared by every device on the line; one device may not drop it.
        issues.append(
            (
                ("workarounds", "close_after_poll"),
                f"close_after_poll does not apply to {device.driver}: the link is shared "
                f"by every device on it",
            )
        )
    for i, tag in enumerate(device.tags):
        here: tuple[str | int, ...] = ("tags", i)
        try:
            table, address = resolve_address(device.addressing, tag.table, tag.address)
        except ValueError as exc:
            issues.append(((*here, "address"), str(exc)))
            continue
        issues.extend(((*here, *loc), msg) for loc, msg in _check_tag(tag, table, address))
    return issues


def _check_write(tag: ModbusTag, table: Table) -> list[tuple[tuple[str, ...], str]]:
    """A machine is written only where the config says so, within limits it states."""
    w = tag.write
    if not tag.writable:
        if w is not None:
            return [(("write",), "write limits are set but writable is not true")]
        return []
    if table not in (Table.HOLDING, Table.COIL):
        return [(("writable",), f"a {table.value} is read-only in Modbus")]
    if tag.type is DataType.STRING:
        return [(("writable",), "string tags are not writable")]
    if tag.type is DataType.BIT:
        # Only a read-modify-write of the whole register could set it: that would race the
        # machine's own changes to the other 15 bits.
        return [(("writable",), "a bit inside a register is not writable; use a coil")]
    if w is None:
        return [(("write",), "writable: true needs `write:` limits (min and max, or values)")]
    out: list[tuple[tuple[str, ...], str]] = []
    if tag.type is DataType.BOOL:
        if w.min is not None or w.max is not None:
            out.append((("write", "min"), "min/max do not apply to a bool; use values"))
        if w.values is not None and not all(isinstance(v, bool) for v in w.values):
            out.append((("write", "values"), "a bool tag's values must be true/false"))
        return out
    if w.values is None and (w.min is None or w.max is None):
        out.append((("write",), "a writable number needs both min and max, or values"))
    if w.min is not None and w.max is not None and w.min > w.max:
        out.append((("write", "min"), f"min {w.min} is greater than max {w.max}"))
    if w.values is not None and any(isinstance(v, bool) for v in w.values):
        out.append((("write", "values"), f"true/false are not values of a {tag.type} tag"))
    return out


def _check_tag(tag: ModbusTag, table: Table, address: int) -> list[tuple[tuple[str, ...], str]]:
    out: list[tuple[tuple[str, ...], str]] = []
    if table.is_bits != (tag.type is DataType.BOOL):
        if table.is_bits:
            out.append((("type",), f"a {table.value} holds one bit: use type bool, not {tag.type}"))
        else:
            out.append(
                (
                    ("type",),
                    f"type bool needs a coil or discrete_input; use type bit "
                    f"with `bit:` for a bit of a {table.value} register",
                )
            )
    if tag.type is DataType.BIT and tag.bit is None:
        out.append((("bit",), "type bit needs `bit:` (0..15)"))
    if tag.bit is not None and tag.type is not DataType.BIT:
        out.append((("bit",), f"`bit:` only applies to type bit, not {tag.type}"))
    if tag.type is DataType.STRING:
        if tag.count is None:
            out.append((("count",), "type string needs `count:` (registers, 2 chars each)"))
    elif tag.count is not None:
        width = 1 if tag.type is DataType.BOOL else REGISTER_WIDTH[tag.type]
        if tag.count != width:
            out.append(
                (("count",), f"type {tag.type} is {width} register(s) wide, not {tag.count}")
            )
    if len(tag.order.value) == 8 and tag.type not in (
        DataType.INT64,
        DataType.UINT64,
        DataType.FLOAT64,
    ):
        out.append((("order",), f"order {tag.order} is for 64-bit types, not {tag.type}"))
    if address + register_count(tag) > 65536:
        out.append((("address",), "the value runs past the end of the table (65535)"))
    out.extend(_check_write(tag, table))
    if tag.min is not None and tag.max is not None and tag.min > tag.max:
        out.append((("min",), f"min {tag.min} is greater than max {tag.max}"))
    if tag.type in (DataType.BOOL, DataType.BIT, DataType.STRING) and (
        tag.min is not None or tag.max is not None
    ):
        out.append(
            (("min" if tag.min is not None else "max",), f"min/max do not apply to type {tag.type}")
        )
    if tag.type in (DataType.BOOL, DataType.BIT, DataType.STRING) and (
        tag.scale != 1.0 or tag.offset != 0.0
    ):
        out.append((("scale",), f"scale/offset do not apply to type {tag.type}"))
    return out


def _bus_key(device: ModbusRtuDevice | ModbusRtuOverTcpDevice) -> str:
    if isinstance(device, ModbusRtuDevice):
        return device.port
    return f"{device.host.lower()}:{device.port}"


def check_serial_buses(
    devices: Sequence[object],
) -> list[tuple[int, tuple[str | int, ...], str]]:
    """Checks across the devices that share one serial line (a port, or a device server).

    Takes the config's whole device list (anything not RTU is skipped, so are disabled
    devices) and returns ``(device index, location under that device, message)``: every
    device on one port agrees on the line settings and framing, and no two share a unit id.
    """
    issues: list[tuple[int, tuple[str | int, ...], str]] = []
    first_on: dict[str, tuple[int, ModbusRtuDevice | ModbusRtuOverTcpDevice]] = {}
    units: dict[tuple[str, int], tuple[int, str]] = {}
    for i, device in enumerate(devices):
        if not isinstance(device, ModbusRtuDevice | ModbusRtuOverTcpDevice) or not device.enabled:
            continue
        key = _bus_key(device)
        j, first = first_on.setdefault(key, (i, device))
        if isinstance(device, ModbusRtuDevice) and isinstance(first, ModbusRtuDevice):
            for field in ("baudrate", "parity", "stopbits", "bytesize", "framing"):
                mine, theirs = getattr(device, field), getattr(first, field)
                if mine != theirs:
                    issues.append(
                        (
                            i,
                            (field,),
                            f"device '{device.name}' uses {field} {mine} on {key}, but device "
                            f"'{first.name}' (devices[{j}]) uses {theirs}; every device on one "
                            f"port must use the same line settings",
                        )
                    )
        elif device.driver != first.driver:
            issues.append((i, ("driver",), f"{key} is also used by device '{first.name}'"))
        taken = units.setdefault((key, device.unit_id), (i, device.name))
        if taken[0] != i:
            issues.append(
                (
                    i,
                    ("unit_id",),
                    f"device '{device.name}' uses unit_id {device.unit_id} on {key}, like "
                    f"device '{taken[1]}' (devices[{taken[0]}]); give each its own unit_id "
                    f"or disable one",
                )
            )
    return issues

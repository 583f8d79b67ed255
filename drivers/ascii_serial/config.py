"""Config model of the ASCII serial driver and its cross-checks.

Pure: no I/O, no pyserial. ``gateway.config`` embeds :class:`AsciiSerialDevice` in the device
union and calls :func:`check_device` in its cross-check pass, like the Modbus driver's.
"""

from __future__ import annotations

import re
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field

from drivers.ascii_serial.framing import ChecksumFormat, ChecksumKind, decode_escapes
from drivers.ascii_serial.parse import ValueType

__all__ = ["AsciiSerialDevice", "AsciiTag", "Parity", "check_device"]

_Name = Annotated[str, Field(min_length=1, max_length=64)]
_Seconds = Annotated[float, Field(gt=0, le=86_400)]
_Chars = Annotated[str, Field(min_length=1, max_length=16)]

Parity = Literal["N", "E", "O"]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, use_enum_values=False)


class AsciiTag(_Strict):
    """One value taken from a line of text: a named regex group or a delimited field."""

    name: _Name
    group: str | None = Field(default=None, description="Named group of the device's `regex`.")
    field: int | None = Field(
        default=None, ge=0, le=255, description="0-based field index with `delimiter`."
    )
    type: ValueType = ValueType.FLOAT
    scale: float = 1.0
    offset: float = 0.0
    unit: str | None = Field(default=None, max_length=32, description="Engineering unit.")
    description: str = ""
    deadband: float | None = Field(default=None, ge=0)
    min: float | None = Field(default=None, description="Expected minimum; below is Uncertain.")
    max: float | None = Field(default=None, description="Expected maximum; above is Uncertain.")


class AsciiSerialDevice(_Strict):
    """An RS-232/485 instrument that speaks lines of text: a gauge, scale, controller, ADAM."""

    driver: Literal["ascii_serial"]
    name: _Name
    machine: _Name = Field(description="The machine this device belongs to, e.g. lathe-3.")
    enabled: bool = True
    port: str = Field(min_length=1, description="Serial port, e.g. /dev/ttyUSB0.")
    baudrate: int = Field(default=9600, ge=50, le=4_000_000)
    parity: Parity = "N"
    stopbits: float = Field(default=1, description="1, 1.5 or 2.")
    bytesize: Literal[5, 6, 7, 8] = 8
    rts_direction_control: bool = Field(
        default=False, description="RS-485: drive the transmitter with RTS (kernel rs485 mode)."
    )
    timeout: _Seconds = Field(
        default=0.5, description="Seconds to wait for one answer (or a streamed line)."
    )
    connect_timeout: _Seconds = Field(default=3.0, description="Seconds to open the port.")
    interval: _Seconds = Field(default=1.0, description="Poll interval in seconds.")
    mode: Literal["request", "stream"] = Field(
        default="request",
        description="request: send `command`, read one answer; stream: the device talks alone.",
    )
    command: str | None = Field(
        default=None, max_length=256, description=r'Request, with escapes, e.g. "#01\r".'
    )
    terminator: _Chars | None = Field(default="\r", description="End of a line (escapes ok).")
    start: _Chars | None = Field(default=None, description="First character of a frame.")
    end: _Chars | None = Field(default=None, description="Last character of a frame.")
    length: int | None = Field(default=None, ge=1, le=1024, description="Fixed frame length.")
    checksum: ChecksumKind = ChecksumKind.NONE
    checksum_format: ChecksumFormat = ChecksumFormat.HEX
    regex: str | None = Field(default=None, description="Regex with a named group per tag.")
    delimiter: _Chars | None = Field(default=None, description="Field separator, e.g. ','.")
    tags: list[AsciiTag] = Field(default_factory=list)

    def wire(self, text: str | None) -> bytes | None:
        """A configured string as the bytes sent or matched on the wire."""
        return None if text is None else decode_escapes(text).encode("latin-1")


def check_device(device: AsciiSerialDevice) -> list[tuple[tuple[str | int, ...], str]]:
    """Cross-checks. Returns ``(location under the device, message)`` pairs."""
    issues: list[tuple[tuple[str | int, ...], str]] = []
    for key in ("command", "terminator", "start", "end", "delimiter"):
        text = getattr(device, key)
        if text is None:
            continue
        try:
            wire = decode_escapes(text).encode("latin-1")
        except (ValueError, UnicodeEncodeError) as exc:
            issues.append(((key,), str(exc)))
            continue
        if not wire:
            issues.append(((key,), "must not be empty"))
    if device.stopbits not in (1, 1.5, 2):
        issues.append((("stopbits",), f"stopbits {device.stopbits:g} is not 1, 1.5 or 2"))
    if device.mode == "request" and not device.command:
        issues.append((("command",), 'request mode needs `command` (e.g. "#01\\r")'))
    if device.mode == "stream" and device.command:
        issues.append((("command",), "stream mode sends nothing; remove `command`"))
    if device.start is not None and device.end is None and device.length is None:
        issues.append((("end",), "`start` needs `end` (or `length`)"))
    if device.length is not None and device.end is not None:
        issues.append((("length",), "use either `length` or `end`, not both"))
    # timeout < interval, at least one tag and unique tag names are checked for every driver
    # by gateway.config's cross-check pass; repeating them here would report them twice.
    issues.extend(_check_parsing(device))
    return issues


def _check_parsing(device: AsciiSerialDevice) -> list[tuple[tuple[str | int, ...], str]]:
    issues: list[tuple[tuple[str | int, ...], str]] = []
    groups: set[str] | None = None
    if (device.regex is None) == (device.delimiter is None):
        issues.append((("regex",), "give exactly one of `regex` (named groups) or `delimiter`"))
    if device.regex is not None:
        try:
            groups = set(re.compile(device.regex).groupindex)
        except re.error as exc:
            issues.append((("regex",), f"does not compile: {exc}"))
    for i, tag in enumerate(device.tags):
        here: tuple[str | int, ...] = ("tags", i)
        if device.regex is not None:
            if tag.field is not None:
                issues.append(
                    ((*here, "field"), "`field` needs `delimiter`; with `regex` use `group`")
                )
            if tag.group is None:
                issues.append(((*here, "group"), "with `regex` every tag needs `group`"))
            elif groups is not None and tag.group not in groups:
                known = ", ".join(sorted(groups)) or "none"
                issues.append(
                    ((*here, "group"), f"group {tag.group!r} is not in the regex (has: {known})")
                )
        elif device.delimiter is not None:
            if tag.group is not None:
                issues.append(
                    ((*here, "group"), "`group` needs `regex`; with `delimiter` use `field`")
                )
            if tag.field is None:
                issues.append(((*here, "field"), "with `delimiter` every tag needs `field`"))
        if tag.min is not None and tag.max is not None and tag.min > tag.max:
            issues.append(((*here, "min"), f"min {tag.min} is greater than max {tag.max}"))
        if tag.type in (ValueType.BOOL, ValueType.STRING):
            if tag.min is not None or tag.max is not None:
                issues.append(((*here, "min"), f"min/max do not apply to type {tag.type}"))
            if tag.scale != 1.0 or tag.offset != 0.0:
                issues.append(((*here, "scale"), f"scale/offset do not apply to type {tag.type}"))
    return issues

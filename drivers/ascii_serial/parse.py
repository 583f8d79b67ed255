"""Turning one frame of text into typed values. Pure: no I/O, no config models.

A :class:`FrameParser` is compiled once per device from (regex | delimiter) and the tags'
(group | field, type). ``parse`` returns one :class:`Field` result per tag; a frame that does
not have the expected shape at all (the regex does not match, too few fields, bytes that are
not printable ASCII) raises :class:`NotAFrame` and is counted as garbage by the driver.
"""

from __future__ import annotations

import enum
import re
from collections.abc import Sequence
from dataclasses import dataclass

__all__ = [
    "FieldRef",
    "FrameParser",
    "NotAFrame",
    "ValueType",
    "convert",
]


class ValueType(enum.StrEnum):
    FLOAT = "float"
    INT = "int"
    BOOL = "bool"
    STRING = "string"


class NotAFrame(ValueError):
    """The frame does not have the configured shape: noise, a partial line, another message."""


#: Words instruments use for on/off states; anything else must be a number.
_TRUE = frozenset({"1", "on", "true", "yes", "y", "t", "high", "closed", "ok"})
_FALSE = frozenset({"0", "off", "false", "no", "n", "f", "low", "open"})


def convert(text: str, kind: ValueType) -> bool | int | float | str:
    """Convert one field. Raises ``ValueError`` with a message naming the text."""
    if kind is ValueType.STRING:
        return text.strip()
    t = text.strip()
    if kind is ValueType.FLOAT:
        # Instruments pad with spaces and signs: "+0012.34", "- 1.5", "1,5" is not accepted
        # because a comma is more often a field separator than a decimal mark.
        try:
            return float(t.replace(" ", ""))
        except ValueError:
            raise ValueError(f"{text!r} is not a number") from None
    if kind is ValueType.INT:
        try:
            return int(t.replace(" ", ""), 10)
        except ValueError:
            raise ValueError(f"{text!r} is not a whole number") from None
    low = t.lower()
    if low in _TRUE:
        return True
    if low in _FALSE:
        return False
    try:
        return float(t) != 0.0
    except ValueError:
        raise ValueError(f"{text!r} is not a boolean") from None


@dataclass(frozen=True, slots=True)
class FieldRef:
    """Where one tag's text is: a named regex group or a 0-based field index."""

    kind: ValueType
    group: str | None = None
    field: int | None = None


class FrameParser:
    """Parse frames into one ``value | ValueError`` per tag, in tag order."""

    def __init__(
        self,
        refs: Sequence[FieldRef],
        *,
        regex: str | None = None,
        delimiter: str | None = None,
        strip: bool = True,
    ) -> None:
        if (regex is None) == (delimiter is None):
            raise ValueError("exactly one of regex or delimiter")
        self.refs = tuple(refs)
        self.pattern = re.compile(regex) if regex is not None else None
        self.delimiter = delimiter
        self.strip = strip
        self.needed_fields = 1 + max((r.field or 0 for r in self.refs), default=0)

    def parse(self, frame: bytes) -> list[bool | int | float | str | ValueError]:
        try:
            text = frame.decode("ascii")
        except UnicodeDecodeError:
            raise NotAFrame(f"not ASCII: {frame[:32]!r}") from None
        if not text.replace("\t", " ").isprintable():
            raise NotAFrame(f"control characters in {text[:32]!r}")
        if self.strip:
            text = text.strip()
        if self.pattern is not None:
            return self._by_regex(text, self.pattern)
        return self._by_field(text)

    def _by_regex(
        self, text: str, pattern: re.Pattern[str]
    ) -> list[bool | int | float | str | ValueError]:
        # fullmatch, not search: a partial line must not pass for a whole one.
        m = pattern.fullmatch(text)
        if m is None:
            raise NotAFrame(f"does not match the regex: {text[:40]!r}")
        out: list[bool | int | float | str | ValueError] = []
        for ref in self.refs:
            assert ref.group is not None
            got = m.group(ref.group)
            if got is None:
                out.append(ValueError(f"group {ref.group!r} did not match in {text[:40]!r}"))
                continue
            try:
                out.append(convert(got, ref.kind))
            except ValueError as exc:
                out.append(ValueError(f"group {ref.group!r}: {exc}"))
        return out

    def _by_field(self, text: str) -> list[bool | int | float | str | ValueError]:
        assert self.delimiter is not None
        fields = text.split(self.delimiter)
        if len(fields) < self.needed_fields:
            raise NotAFrame(f"{len(fields)} field(s), need {self.needed_fields}: {text[:40]!r}")
        out: list[bool | int | float | str | ValueError] = []
        for ref in self.refs:
            assert ref.field is not None
            try:
                out.append(convert(fields[ref.field], ref.kind))
            except ValueError as exc:
                out.append(ValueError(f"field {ref.field}: {exc}"))
        return out

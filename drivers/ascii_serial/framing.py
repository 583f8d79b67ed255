"""Framing and checksums of line-oriented ASCII instruments. Pure: bytes in, frames out.

A frame is cut from the byte stream in one of three ways, chosen by the config:

- ``terminator``: everything up to the terminator (``\\r`` by default);
- ``start``/``end``: from a start character to an end character; a new start character inside
  a frame discards what came before it, so a partial answer cannot glue onto the next one;
- ``length``: a fixed number of bytes, optionally synchronised on a start character.

The frame handed on excludes the start character and the terminator/end; it still carries its
checksum, which :func:`verify` strips.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

__all__ = [
    "MAX_FRAME",
    "ChecksumFormat",
    "ChecksumKind",
    "Framer",
    "append_checksum",
    "checksum",
    "decode_escapes",
    "verify",
]

#: Longest frame we buffer. Line instruments send tens of bytes; a buffer this long without a
#: terminator is noise or a misconfigured terminator, and must not grow without bound.
MAX_FRAME = 1024


class ChecksumKind(enum.StrEnum):
    NONE = "none"
    XOR = "xor"  # XOR of every byte
    SUM = "sum"  # sum of every byte mod 256 (ADAM-4000)
    LRC = "lrc"  # two's complement of the sum mod 256


class ChecksumFormat(enum.StrEnum):
    HEX = "hex"  # two uppercase hex characters
    BINARY = "binary"  # one raw byte


def checksum(kind: ChecksumKind, data: bytes) -> int:
    """The checksum byte of ``data``."""
    if kind is ChecksumKind.XOR:
        out = 0
        for b in data:
            out ^= b
        return out
    if kind is ChecksumKind.SUM:
        return sum(data) & 0xFF
    if kind is ChecksumKind.LRC:
        return -sum(data) & 0xFF
    raise ValueError("checksum kind none has no value")


def _width(fmt: ChecksumFormat) -> int:
    return 2 if fmt is ChecksumFormat.HEX else 1


def append_checksum(kind: ChecksumKind, fmt: ChecksumFormat, data: bytes) -> bytes:
    """``data`` followed by its checksum in ``fmt``."""
    if kind is ChecksumKind.NONE:
        return data
    value = checksum(kind, data)
    return data + (b"%02X" % value if fmt is ChecksumFormat.HEX else bytes([value]))


def verify(
    kind: ChecksumKind, fmt: ChecksumFormat, frame: bytes, *, prefix: bytes = b""
) -> bytes | None:
    """The payload of ``frame`` without its checksum, or None if the checksum is wrong.

    ``prefix`` (the start character) is covered by the checksum but not part of the frame:
    ADAM-4000 sums the leading ``>`` too.
    """
    if kind is ChecksumKind.NONE:
        return frame
    width = _width(fmt)
    if len(frame) < width:
        return None
    payload, got = frame[:-width], frame[-width:]
    value = checksum(kind, prefix + payload)
    if fmt is ChecksumFormat.BINARY:
        return payload if got[0] == value else None
    try:
        # Devices differ in the case of hex digits; the value is what counts.
        return payload if int(got, 16) == value and got.isalnum() else None
    except ValueError:
        return None


_ESCAPES = {"r": "\r", "n": "\n", "t": "\t", "0": "\0", "\\": "\\", "'": "'", '"': '"'}


def decode_escapes(text: str) -> str:
    r"""Resolve ``\r \n \t \0 \\ \xNN`` written literally in a config (plain or single-quoted YAML).

    Raises ``ValueError`` on an unknown escape, so a typo is a config error, not a silent hang.
    """
    out: list[str] = []
    i = 0
    while i < len(text):
        c = text[i]
        if c != "\\":
            out.append(c)
            i += 1
            continue
        nxt = text[i + 1 : i + 2]
        if nxt in _ESCAPES:
            out.append(_ESCAPES[nxt])
            i += 2
        elif nxt == "x" and len(text) >= i + 4:
            try:
                out.append(chr(int(text[i + 2 : i + 4], 16)))
            except ValueError:
                raise ValueError(f"bad escape {text[i : i + 4]!r}") from None
            i += 4
        else:
            raise ValueError(f"unknown escape {text[i : i + 2]!r} (use \\r \\n \\t \\0 \\\\ \\xNN)")
    return "".join(out)


@dataclass
class Framer:
    """Cuts frames out of a byte stream; counts the bytes it had to throw away.

    ``garbage`` counts discard events (noise before a start character, an overlong or
    interrupted frame), not bytes: a technician wants to know how often, not how much.
    """

    terminator: bytes | None = b"\r"
    start: bytes | None = None
    end: bytes | None = None
    length: int | None = None
    garbage: int = 0

    def __post_init__(self) -> None:
        self._buf = bytearray()
        if self.length is None and not (self.end or self.terminator):
            raise ValueError("a framer needs a terminator, an end character or a length")

    def clear(self) -> int:
        """Drop buffered bytes (stale input before a request). Returns how many."""
        n = len(self._buf)
        self._buf.clear()
        return n

    @property
    def pending(self) -> int:
        return len(self._buf)

    @property
    def buffered(self) -> bytes:
        """The bytes of the frame not finished yet."""
        return bytes(self._buf)

    def feed(self, data: bytes) -> list[bytes]:
        """Add received bytes; return every complete frame, oldest first."""
        self._buf += data
        frames: list[bytes] = []
        while True:
            frame = self._next()
            if frame is None:
                break
            if frame:
                frames.append(frame)
        if len(self._buf) > MAX_FRAME:
            self._buf.clear()
            self.garbage += 1
        return frames

    def _sync(self) -> bool:
        """Discard anything before the start character. False if none is buffered yet."""
        assert self.start is not None
        at = self._buf.find(self.start)
        if at < 0:
            if self._buf.strip(b"\r\n"):
                self.garbage += 1
            self._buf.clear()
            return False
        if at > 0:
            if self._buf[:at].strip(b"\r\n"):
                self.garbage += 1
            del self._buf[:at]
        return True

    def _next(self) -> bytes | None:
        buf = self._buf
        if self.start is not None and not self._sync():
            return None
        skip = len(self.start) if self.start else 0
        if self.length is not None:
            if len(buf) < self.length:
                return None
            frame = bytes(buf[skip : self.length])
            del buf[: self.length]
            return frame
        end = self.end or self.terminator
        assert end is not None
        at = buf.find(end, skip)
        if at < 0:
            if self.start is not None:
                self._restart_on_new_start(skip)
            return None
        if self.start is not None:
            again = buf.find(self.start, skip, at)
            if again >= 0:
                # An interrupted frame: a new one began before this one ended.
                self.garbage += 1
                del buf[:again]
                return b""
        frame = bytes(buf[skip:at])
        del buf[: at + len(end)]
        if self.start is None:
            # A CRLF device read with terminator CR leaves the LF at the front of the next
            # line; blank lines carry nothing. Neither is a frame, nor garbage.
            frame = frame.lstrip(b"\r\n")
        return frame

    def _restart_on_new_start(self, skip: int) -> None:
        assert self.start is not None
        again = self._buf.find(self.start, skip)
        if again >= 0:
            self.garbage += 1
            del self._buf[:again]

"""The ASCII serial driver: one line-oriented instrument on one serial port.

Request mode sends ``command`` and reads one answer per poll. Stream mode listens to a device
that talks on its own (a scale printing a line per weighing): a reader task owned by the
driver keeps only the newest parsed frame, and each poll of the runner takes it. Either way
one frame is checksum-checked and parsed into one sample per tag.

Noise never ends a poll early and never crashes: garbage, interrupted lines, the echo of our
own command (half-duplex RS-485 converters hear themselves) and bad checksums are counted in
``counters`` and make the poll's tags Bad with a detail that says which it was. Silence is a
``DeviceTimeout``: the runner marks the device Bad and reopens the port after a backoff.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from drivers.base import Driver

import asyncio
import contextlib
import logging
from collections.abc import Sequence

from drivers.ascii_serial.config import AsciiSerialDevice
from drivers.ascii_serial.framing import (
    ChecksumKind,
    Framer,
    append_checksum,
    decode_escapes,
    verify,
)
from drivers.ascii_serial.parse import FieldRef, FrameParser, NotAFrame, ValueType
from drivers.ascii_serial.transport import SerialLink
from drivers.latency_timer import LatencyTimer, tune_latency_timer
from gateway.errors import ConnectionLost, DeviceError, DeviceTimeout
from gateway.model import RawSample, ReadGroup, Reason, TagSpec

__all__ = ["AsciiSerialDriver"]

log = logging.getLogger("drivers.ascii_serial")

_DATATYPE = {
    ValueType.FLOAT: "float64",
    ValueType.INT: "int64",
    ValueType.BOOL: "bool",
    ValueType.STRING: "string",
}
_COUNTERS = ("frames", "checksum_errors", "garbage", "echoes", "timeouts")


def _show(data: bytes, limit: int = 40) -> str:
    text = repr(data[:limit])
    return text + ("..." if len(data) > limit else "")


def _with_checksum(device: AsciiSerialDevice, command: bytes) -> bytes:
    """The command with the device's checksum before its terminator.

    A device that checksums its answers (ADAM-4000 with checksum on) also ignores commands
    without one, so the checksum setting applies both ways.
    """
    if device.checksum is ChecksumKind.NONE or not command:
        return command
    tail = device.wire(device.end or device.terminator) or b""
    body = command[: -len(tail)] if tail and command.endswith(tail) else command
    rest = command[len(body) :]
    return append_checksum(device.checksum, device.checksum_format, body) + rest


class AsciiSerialDriver:
    """One ASCII instrument. ``AsciiSerialDriver(device)`` is the factory."""

    kind = "ascii_serial"

    def __init__(self, device: AsciiSerialDevice, *, link: SerialLink | None = None) -> None:
        self.device = device
        self.name = device.name
        self.endpoint = device.port
        self.link = link or SerialLink(
            device.port,
            baudrate=device.baudrate,
            parity=device.parity,
            stopbits=device.stopbits,
            bytesize=device.bytesize,
            rts_direction_control=device.rts_direction_control,
        )
        self.tags: tuple[TagSpec, ...] = tuple(
            TagSpec(
                index=i,
                machine=device.machine,
                device=device.name,
                name=tag.name,
                datatype=_DATATYPE[tag.type],
                unit=tag.unit,
                description=tag.description,
                scale=tag.scale,
                offset=tag.offset,
                minimum=tag.min,
                maximum=tag.max,
                deadband=tag.deadband,
                interval=device.interval,
                source=f"group {tag.group}" if tag.group is not None else f"field {tag.field}",
            )
            for i, tag in enumerate(device.tags)
        )
        self.groups: tuple[ReadGroup, ...] = (
            ReadGroup(device.interval, tuple(range(len(self.tags)))),
        )
        self.command = _with_checksum(device, device.wire(device.command) or b"")
        self._start = device.wire(device.start)
        self._framer_args = {
            "terminator": device.wire(device.terminator),
            "start": self._start,
            "end": device.wire(device.end),
            "length": device.length,
        }
        self._framer = Framer(**self._framer_args)  # type: ignore[arg-type]
        self._parser = FrameParser(
            [FieldRef(t.type, t.group, t.field) for t in device.tags],
            regex=device.regex,
            delimiter=None if device.delimiter is None else decode_escapes(device.delimiter),
        )
        self._counts = dict.fromkeys(_COUNTERS, 0)
        # Stream mode: the newest good frame's samples and the newest failure since the poll.
        self._latest: list[RawSample] | None = None
        self._failure: str | None = None
        self._heard = False
        self._arrived = asyncio.Event()
        self._reader: asyncio.Task[None] | None = None
        self._reader_error: DeviceError | None = None
        self._latency: LatencyTimer | None = None

    # -- introspection -------------------------------------------------------------------

    @property
    def counters(self) -> dict[str, int]:
        """frames (good), checksum_errors, garbage, echoes, timeouts since start-up."""
        out = dict(self._counts)
        out["garbage"] += self._framer.garbage
        return out

    def details(self) -> dict[str, object]:
        d = self.device
        out: dict[str, object] = {
            "line": f"{d.port} {d.baudrate} {d.bytesize}{d.parity}{d.stopbits:g}",
            **self.counters,
        }
        if self._latency is not None:
            out.update(self._latency.as_dict())
        return out

    def describe_plan(self) -> list[str]:
        d = self.device
        how = (
            f"send {_show(self.command)} every {d.interval:g} s"
            if d.mode == "request"
            else f"listen, take the newest line every {d.interval:g} s"
        )
        return [
            f"{self.name} ({d.port} {d.baudrate} {d.bytesize}{d.parity}{d.stopbits:g}): "
            f"{how}, {len(self.tags)} tag(s), checksum {d.checksum.value}"
        ]

    # -- Driver --------------------------------------------------------------------------

    async def connect(self) -> None:
        await self.close()
        self._framer = Framer(**self._framer_args)  # type: ignore[arg-type]
        # Every open, not once: a re-plugged USB adapter comes back with its 16 ms default.
        self._latency = tune_latency_timer(self.device.port)
        await self.link.open()
        if self.device.mode == "stream":
            self._latest = self._failure = None
            self._heard = False
            self._reader_error = None
            self._arrived.clear()
            self._reader = asyncio.create_task(self._listen(), name=f"ascii-serial:{self.name}")

    async def close(self) -> None:
        reader, self._reader = self._reader, None
        if reader is not None:
            reader.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await reader
        # The framer's discards live on in the counters after a reconnect.
        self._counts["garbage"] += self._framer.garbage
        self._framer.garbage = 0
        await self.link.close()

    def poll_timeout(self, group: int) -> float:
        # One answer within ``timeout``; the margin covers writing the command.
        return self.device.timeout * 1.5 + 0.05

    async def read(self, group: int) -> Sequence[RawSample]:
        if self.device.mode == "stream":
            return await self._take_streamed()
        return await self._request()

    # -- request mode --------------------------------------------------------------------

    async def _request(self) -> list[RawSample]:
        link, framer = self.link, self._framer
        if link.discard_input() or framer.clear():
            # A late answer or noise since the last poll: never mistake it for this answer.
            self._counts["garbage"] += 1
        await link.write(self.command)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.device.timeout
        echo = self.command
        heard = False
        failure: str | None = None
        garbage_before = framer.garbage
        while (left := deadline - loop.time()) > 0:
            data = await link.read_some(left)
            if not data:
                break
            if echo:
                data, echo = self._strip_echo(data, echo)
                if not data:
                    continue
            heard = True
            for frame in framer.feed(data):
                result = self._examine(frame)
                if isinstance(result, str):
                    failure = result
                    continue
                framer.clear()
                return result
        if not heard:
            self._counts["timeouts"] += 1
            raise DeviceTimeout(
                f"no answer to {_show(self.command)} within {self.device.timeout:g} s"
            )
        if framer.pending:
            failure = failure or f"incomplete frame {_show(framer.buffered)}"
            framer.clear()
            framer.garbage += 1
        elif failure is None:
            failure = (
                "garbage on the line, no frame"
                if framer.garbage > garbage_before
                else ("no frame in the answer")
            )
        return self._all_bad(failure)

    def _strip_echo(self, data: bytes, echo: bytes) -> tuple[bytes, bytes]:
        """Remove our own command from the front of the answer. Returns (rest, echo left)."""
        n = min(len(data), len(echo))
        if data[:n] != echo[:n]:
            return data, b""
        if n == len(echo):
            self._counts["echoes"] += 1
        return data[n:], echo[n:]

    # -- stream mode ---------------------------------------------------------------------

    async def _listen(self) -> None:
        try:
            while True:
                data = await self.link.read_some(3600.0)
                if not data:
                    continue
                self._heard = True
                for frame in self._framer.feed(data):
                    result = self._examine(frame)
                    if isinstance(result, str):
                        self._failure = result
                    else:
                        self._latest = result
                self._arrived.set()
        except DeviceError as exc:
            self._reader_error = exc
            self._arrived.set()

    async def _take_streamed(self) -> list[RawSample]:
        if self._reader is None:
            raise ConnectionLost(f"{self.device.port} is not open")
        if self._latest is None and self._failure is None and self._reader_error is None:
            self._arrived.clear()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self.device.timeout):
                    # Wait for a whole frame, not just for bytes: a line may arrive in pieces.
                    while self._latest is None and self._failure is None:
                        await self._arrived.wait()
                        self._arrived.clear()
                        if self._reader_error is not None:
                            break
        if self._reader_error is not None:
            raise self._reader_error
        latest, failure, heard = self._latest, self._failure, self._heard
        self._latest = self._failure = None
        self._heard = False
        if latest is not None:
            return latest
        if failure is not None:
            return self._all_bad(failure)
        if heard:
            return self._all_bad(f"no complete frame within {self.device.timeout:g} s")
        self._counts["timeouts"] += 1
        raise DeviceTimeout(f"no line from the device within {self.device.timeout:g} s")

    # -- one frame -----------------------------------------------------------------------

    def _examine(self, frame: bytes) -> list[RawSample] | str:
        """Samples of a good frame, or why it is not one (and count it)."""
        if self.command and frame == self.command.rstrip(b"\r\n"):
            self._counts["echoes"] += 1
            return "echo of the command, no answer"
        d = self.device
        payload = verify(d.checksum, d.checksum_format, frame, prefix=self._start or b"")
        if payload is None:
            self._counts["checksum_errors"] += 1
            return f"checksum ({d.checksum.value}) mismatch in {_show(frame)}"
        try:
            values = self._parser.parse(payload)
        except NotAFrame as exc:
            self._counts["garbage"] += 1
            return f"garbage: {exc}"
        self._counts["frames"] += 1
        return [
            RawSample(i, None, (), Reason.DECODE_ERROR, str(v))
            if isinstance(v, ValueError)
            else RawSample(i, v)
            for i, v in enumerate(values)
        ]

    def _all_bad(self, detail: str) -> list[RawSample]:
        return [RawSample(i, None, (), Reason.DECODE_ERROR, detail) for i in range(len(self.tags))]


if TYPE_CHECKING:
    # mypy (strict, in CI) proves each driver satisfies the runtime's Driver protocol.
    def _is_driver_AsciiSerialDriver(d: AsciiSerialDriver) -> Driver:
        return d

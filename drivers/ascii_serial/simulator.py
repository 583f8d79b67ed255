"""Fake ASCII instruments on the far end of a pty, with injectable faults.

Plain ``os.read``/``os.write`` on the pty file descriptor driven by the event loop's
``add_reader``: no serial library, no threads. Two instruments:

- :class:`Adam4017`: answers ``#AA`` (read all channels) with ``>+01.234+05.678...``, in
  engineering-units format, optionally with the ADAM sum checksum as two hex characters;
- :class:`StreamingScale`: prints ``ST,GS,+0012.34 kg\\r\\n`` at a fixed rate.

``fault`` applies to every answer or line while set; tests set it, poll, and clear it.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import os
import termios
import tty
from collections.abc import Sequence

from drivers.ascii_serial.framing import ChecksumFormat, ChecksumKind, append_checksum

__all__ = ["Adam4017", "AsciiInstrument", "Fault", "StreamingScale"]

#: Bytes no ASCII instrument sends: NUL, 0xFF, XON and friends, plus letters that match nothing.
GARBAGE = b"\x00\xff\x13\x11zq%\xfe"


class Fault(enum.StrEnum):
    NONE = "none"
    GARBAGE = "garbage"  # noise in place of the answer
    PARTIAL = "partial"  # the first half of the answer, then nothing
    ECHO = "echo"  # the command echoed back before the answer (half-duplex adapters)
    SILENT = "silent"  # no answer at all
    BAD_CHECKSUM = "bad_checksum"  # a corrupted answer under its original checksum


class AsciiInstrument:
    """Base: owns the pty end, the fault, and writing frames with the fault applied."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.fault = Fault.NONE
        self.written = 0  # frames written, faulty or not
        self._fd: int | None = None

    async def start(self) -> None:
        if self._fd is not None:
            return
        fd = os.open(self.path, os.O_RDWR | os.O_NOCTTY | os.O_NONBLOCK)
        # socat already makes its pty raw; a real device on a real tty needs it too.
        tty.setraw(fd, termios.TCSANOW)
        self._fd = fd
        asyncio.get_running_loop().add_reader(fd, self._readable)

    async def stop(self) -> None:
        fd, self._fd = self._fd, None
        if fd is None:
            return
        asyncio.get_running_loop().remove_reader(fd)
        os.close(fd)

    async def __aenter__(self) -> AsciiInstrument:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    def _readable(self) -> None:
        fd = self._fd
        if fd is None:
            return
        try:
            data = os.read(fd, 4096)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            # EIO: nobody holds the other end of the pty right now.
            return
        self.received(data)

    def received(self, data: bytes) -> None:
        """Bytes from the driver. Request-mode instruments override this."""

    def write(self, data: bytes) -> None:
        fd = self._fd
        if fd is None or not data:
            return
        try:
            os.write(fd, data)
        except (BlockingIOError, OSError):
            # A full pty buffer means nobody is reading: a real line drops the bytes too.
            return

    def emit(self, frame: bytes, corrupt: bytes, *, command: bytes = b"") -> None:
        """Write ``frame`` as the current fault says; ``corrupt`` is its bad-checksum twin."""
        self.written += 1
        fault = self.fault
        if fault is Fault.SILENT:
            return
        if fault is Fault.ECHO:
            self.write(command + frame)
        elif fault is Fault.GARBAGE:
            self.write(GARBAGE + frame[len(frame.rstrip(b"\r\n")) :])
        elif fault is Fault.PARTIAL:
            self.write(frame[: len(frame) // 2])
        elif fault is Fault.BAD_CHECKSUM:
            self.write(corrupt)
        else:
            self.write(frame)


def _corrupt_digit(frame: bytes) -> bytes:
    """Flip the last digit of the payload: a bit error the checksum must catch."""
    data = bytearray(frame)
    for i in range(len(data) - 1, -1, -1):
        if 0x30 <= data[i] <= 0x39:
            data[i] = 0x30 + (data[i] - 0x30 + 1) % 10
            return bytes(data)
    return bytes(data)


class Adam4017(AsciiInstrument):
    """An ADAM-4017-style analog input module: ``#AA\\r`` reads every channel.

    With ``checksum`` the module expects and sends the sum of all characters mod 256 as two
    hex characters before the CR, as ADAM-4000 modules do when checksum is enabled.
    """

    def __init__(
        self,
        path: str,
        *,
        address: int = 1,
        values: Sequence[float] = (1.234, 5.678),
        checksum: bool = False,
    ) -> None:
        super().__init__(path)
        self.address = address
        self.values = list(values)
        self.checksum = checksum
        self.requests = 0
        self._buf = bytearray()

    def _wrap(self, body: bytes) -> bytes:
        if self.checksum:
            body = append_checksum(ChecksumKind.SUM, ChecksumFormat.HEX, body)
        return body + b"\r"

    def received(self, data: bytes) -> None:
        self._buf += data
        while (at := self._buf.find(b"\r")) >= 0:
            line = bytes(self._buf[:at])
            del self._buf[: at + 1]
            self._answer(line)

    def _answer(self, line: bytes) -> None:
        command = line + b"\r"
        if self.checksum:
            if (
                len(line) < 3
                or append_checksum(ChecksumKind.SUM, ChecksumFormat.HEX, line[:-2]) != line
            ):
                return  # a real module ignores a command with a bad checksum
            line = line[:-2]
        if line != b"#%02X" % self.address:
            if line.startswith(b"#%02X" % self.address):
                self.emit(self._wrap(b"?%02X" % self.address), b"", command=command)
            return
        self.requests += 1
        body = b">" + b"".join(b"%+07.3f" % v for v in self.values)
        frame = self._wrap(body)
        corrupt = _corrupt_digit(frame[:-3]) + frame[-3:] if self.checksum else frame
        self.emit(frame, corrupt, command=command)


class StreamingScale(AsciiInstrument):
    """A scale that prints ``ST,GS,+0012.34 kg`` (``US`` while unstable) at ``rate`` Hz.

    With a ``checksum`` the two hex characters of it follow ``kg``, before the CRLF.
    """

    def __init__(
        self,
        path: str,
        *,
        rate: float = 50.0,
        weight: float = 12.34,
        stable: bool = True,
        checksum: ChecksumKind = ChecksumKind.NONE,
    ) -> None:
        super().__init__(path)
        self.rate = rate
        self.weight = weight
        self.stable = stable
        self.checksum = checksum
        self._task: asyncio.Task[None] | None = None

    def line(self) -> tuple[bytes, bytes]:
        body = b"%s,GS,%+08.2f kg" % (b"ST" if self.stable else b"US", self.weight)
        framed = append_checksum(self.checksum, ChecksumFormat.HEX, body)
        corrupt = _corrupt_digit(body) + framed[len(body) :]
        return framed + b"\r\n", corrupt + b"\r\n"

    async def start(self) -> None:
        await super().start()
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name=f"scale:{self.path}")

    async def stop(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        await super().stop()

    async def _run(self) -> None:
        period = 1.0 / self.rate
        loop = asyncio.get_running_loop()
        due = loop.time()
        while True:
            frame, corrupt = self.line()
            self.emit(frame, corrupt)
            due += period
            await asyncio.sleep(max(0.0, due - loop.time()))

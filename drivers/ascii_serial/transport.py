"""The only module of ours that imports pyserial and pyserial-asyncio-fast.

:class:`SerialLink` is one open serial port as a byte pipe: ``write``, ``read_some`` with a
timeout, ``discard_input`` and ``close``. No retries and no reopen of its own (the runner
owns both); every pyserial error leaves this module as a ``gateway.errors`` exception.
"""

from __future__ import annotations

import asyncio
import logging

import serial  # type: ignore[import-untyped]
import serial.rs485  # type: ignore[import-untyped]
import serial_asyncio_fast

from gateway.errors import ConnectionLost

__all__ = ["SerialLink"]

log = logging.getLogger("drivers.ascii_serial")

_PARITY = {"N": serial.PARITY_NONE, "E": serial.PARITY_EVEN, "O": serial.PARITY_ODD}
_STOPBITS = {1: serial.STOPBITS_ONE, 1.5: serial.STOPBITS_ONE_POINT_FIVE, 2: serial.STOPBITS_TWO}


class _Inbox(asyncio.Protocol):
    """Received bytes, buffered until read; tells a waiting reader when more arrive."""

    def __init__(self) -> None:
        self.buffer = bytearray()
        self.error: Exception | None = None
        self.lost = False
        self.closed = asyncio.get_running_loop().create_future()
        self._waiter: asyncio.Future[None] | None = None

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        self._wake()

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True
        self.error = exc
        self._wake()
        if not self.closed.done():
            self.closed.set_result(None)

    def _wake(self) -> None:
        waiter, self._waiter = self._waiter, None
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    async def wait(self) -> None:
        self._waiter = asyncio.get_running_loop().create_future()
        await self._waiter


class SerialLink:
    """One serial port, opened by ``open`` and released by ``close`` (idempotent)."""

    def __init__(
        self,
        port: str,
        *,
        baudrate: int = 9600,
        parity: str = "N",
        stopbits: float = 1,
        bytesize: int = 8,
        rts_direction_control: bool = False,
    ) -> None:
        self.port = port
        self.baudrate = baudrate
        self.parity = parity
        self.stopbits = stopbits
        self.bytesize = bytesize
        self.rts_direction_control = rts_direction_control
        self._transport: asyncio.Transport | None = None
        self._inbox: _Inbox | None = None

    @property
    def connected(self) -> bool:
        return self._transport is not None and not self._transport.is_closing()

    async def open(self) -> None:
        await self.close()
        inbox: _Inbox | None = None

        def protocol() -> _Inbox:
            nonlocal inbox
            inbox = _Inbox()
            return inbox

        try:
            transport, _ = await serial_asyncio_fast.create_serial_connection(
                asyncio.get_running_loop(),
                protocol,
                self.port,
                baudrate=self.baudrate,
                parity=_PARITY[self.parity],
                stopbits=_STOPBITS[self.stopbits],
                bytesize=self.bytesize,
                # Another process on the same port would steal half of every answer.
                exclusive=True,
            )
        except (serial.SerialException, OSError, ValueError) as exc:
            raise ConnectionLost(f"cannot open {self.port}: {exc}") from exc
        assert inbox is not None
        if self.rts_direction_control:
            serial_port = transport.serial
            if serial_port is not None:
                self._set_rs485(serial_port)
        self._transport = transport
        self._inbox = inbox

    def _set_rs485(self, port: serial.Serial) -> None:
        try:
            port.rs485_mode = serial.rs485.RS485Settings(
                rts_level_for_tx=True, rts_level_for_rx=False
            )
        except (ValueError, OSError, AttributeError) as exc:
            # Many USB adapters switch direction in hardware and refuse the ioctl; the port
            # still works, so say so once instead of refusing to run.
            log.warning(
                "%s: RTS direction control not supported by this port (%s); relying on the "
                "adapter's automatic direction control",
                self.port,
                exc,
            )

    def _check(self) -> tuple[asyncio.Transport, _Inbox]:
        transport, inbox = self._transport, self._inbox
        if transport is None or inbox is None:
            raise ConnectionLost(f"{self.port} is not open")
        if inbox.lost:
            raise ConnectionLost(f"{self.port} closed: {inbox.error or 'end of file'}")
        return transport, inbox

    async def write(self, data: bytes) -> None:
        transport, _ = self._check()
        try:
            transport.write(data)
        except (serial.SerialException, OSError) as exc:
            raise ConnectionLost(f"writing to {self.port}: {exc}") from exc

    async def read_some(self, within: float) -> bytes:
        """Whatever arrives within ``within`` seconds (b"" if nothing); raises on a dead port."""
        _, inbox = self._check()
        if not inbox.buffer:
            try:
                async with asyncio.timeout(max(within, 0.0)):
                    await inbox.wait()
            except TimeoutError:
                return b""
        if not inbox.buffer:
            self._check()
            return b""
        data = bytes(inbox.buffer)
        inbox.buffer.clear()
        return data

    def discard_input(self) -> int:
        """Drop bytes received but not read yet (a late answer to an earlier request)."""
        inbox = self._inbox
        if inbox is None:
            return 0
        n = len(inbox.buffer)
        inbox.buffer.clear()
        return n

    async def close(self) -> None:
        transport, inbox = self._transport, self._inbox
        self._transport = self._inbox = None
        if transport is None or inbox is None:
            return
        transport.close()
        try:
            # connection_lost runs after the port is really closed; waiting for it means a
            # reconnect never finds the port still held (exclusive=True).
            async with asyncio.timeout(2.0):
                await asyncio.shield(inbox.closed)
        except TimeoutError:
            log.debug("closing %s: no confirmation within 2 s", self.port)

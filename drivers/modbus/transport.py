"""The only module of ours that imports pymodbus: a Modbus TCP client and server façade.

pymodbus changes its API between minor releases (the pin is ``~=3.16.0``); everything the
gateway, the simulator and the tests need from it goes through the two classes here, and
every pymodbus exception is mapped to ``gateway.errors`` before it leaves this module.

- :class:`ModbusTcpTransport` is the client: one TCP connection to one unit id, one request
  on the wire at a time, no retries and no reconnects of its own (the runner owns both).
- :class:`RegisterServer` serves :class:`~drivers.modbus.simulator.SimulatedDevice` objects
  as a real pymodbus TCP server, with injectable faults; it is the peer of the tests and
  of ``retrofit-gw simulate``.

pymodbus internals used for speed, each covered by tests: the response classes registered on
every client (``_FAST_RESPONSES``), and on a serial line the ``write`` of pymodbus's
``SerialTransport`` (``_write_at_once``: a request leaves when asked, not one loop turn later).
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import logging
import socket
import struct
from collections.abc import Sequence
from types import TracebackType
from typing import Any, Literal, Self

from pymodbus.client import AsyncModbusSerialClient, AsyncModbusTcpClient, ModbusBaseClient
from pymodbus.constants import ExcCodes
from pymodbus.exceptions import (
    ConnectionException,
    ModbusException,
    ModbusIOException,
    NoSuchIdException,
)
from pymodbus.framer import FramerType
from pymodbus.pdu import ExceptionResponse, ModbusPDU
from pymodbus.pdu.bit_message import (
    ReadCoilsRequest,
    ReadCoilsResponse,
    ReadDiscreteInputsRequest,
    ReadDiscreteInputsResponse,
)
from pymodbus.pdu.register_message import (
    ReadHoldingRegistersResponse,
    ReadInputRegistersResponse,
)
from pymodbus.server import ModbusSerialServer, ModbusTcpServer
from pymodbus.simulator import DataType, SimData, SimDevice

from drivers.modbus.config import Table
from drivers.modbus.serial_bus import clock
from drivers.modbus.simulator import SimulatedDevice, WritableDevice
from gateway.errors import (
    BadFrame,
    ConnectionLost,
    DecodeError,
    DeviceException,
    DeviceTimeout,
)

__all__ = [
    "EXCEPTION_NAMES",
    "ClientTransport",
    "ModbusRtuOverTcpTransport",
    "ModbusSerialTransport",
    "ModbusTcpTransport",
    "RegisterServer",
]

# Every failure pymodbus logs (a failed connect as WARNING, each timeout as ERROR with a hex
# dump of the last 20 frames) reaches the runner as a gateway error, which logs and counts
# it: pymodbus's copy would repeat on every poll of a dead device. Left alone if configured
# elsewhere, so ``logging.getLogger("pymodbus").setLevel(logging.DEBUG)`` still shows the
# wire.
_pymodbus_log = logging.getLogger("pymodbus")
if _pymodbus_log.level == logging.NOTSET:
    _pymodbus_log.setLevel(logging.CRITICAL)

#: Modbus Application Protocol v1.1b3 §7.
EXCEPTION_NAMES: dict[int, str] = {
    1: "ILLEGAL FUNCTION",
    2: "ILLEGAL DATA ADDRESS",
    3: "ILLEGAL DATA VALUE",
    4: "SERVER DEVICE FAILURE",
    5: "ACKNOWLEDGE",
    6: "SERVER DEVICE BUSY",
    7: "NEGATIVE ACKNOWLEDGE",
    8: "MEMORY PARITY ERROR",
    10: "GATEWAY PATH UNAVAILABLE",
    11: "GATEWAY TARGET DEVICE FAILED TO RESPOND",
}


def _set_nodelay(transport: asyncio.BaseTransport | None) -> None:
    # Modbus sends one small frame and waits for the answer: Nagle plus delayed ACKs would
    # add ~40 ms to some round trips. asyncio already sets this on TCP transports; setting it
    # here makes it a property of this module rather than of the event loop implementation.
    sock = transport.get_extra_info("socket") if transport is not None else None
    if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


def _write_at_once(transport: asyncio.BaseTransport | None) -> None:
    """Make pymodbus's serial transport write a request when asked, not one loop turn later.

    Its ``write`` queues the frame and registers a writer, so the frame leaves only after the
    next epoll and two epoll_ctl calls: about 0.07 ms of a 5 ms transaction at 115200 baud,
    on top of the t3.5 already kept. Here the frame is written at once when nothing is queued
    (the usual case: one small frame to an empty tty buffer), and what the tty did not take,
    or a write that failed, goes the original way (which reports a failure as pymodbus does).
    Any other transport (Windows' polling one, a pymodbus whose serial transport no longer
    has these attributes) is left alone.
    """
    st: Any = transport
    if (
        getattr(st, "force_poll", True)
        or getattr(st, "sync_serial", None) is None
        or not isinstance(getattr(st, "intern_write_buffer", None), list)
    ):
        return
    queued_write = st.write

    def write(data: bytes) -> None:
        sent = 0
        if not st.intern_write_buffer and st.sync_serial is not None:
            with contextlib.suppress(OSError):  # pyserial's SerialException is an OSError
                sent = st.sync_serial.write(data) or 0
        if sent < len(data):
            queued_write(data[sent:])

    st.write = write


# -- fast response decoding ------------------------------------------------------------------
#
# pymodbus decodes a register response one struct.unpack per register, and its decoder
# formats every response with str() for a debug message even when debug logging is off,
# which prints the whole register list. These classes, registered on each client through
# pymodbus's public register() hook, decode in one unpack_from and print in constant time.

_WORDS: dict[int, struct.Struct] = {n: struct.Struct(f">{n // 2}H") for n in range(0, 252, 2)}
#: Byte value -> its 8 bits, least significant first (the Modbus order of coils in a byte).
_BYTE_BITS: tuple[tuple[bool, ...], ...] = tuple(
    tuple(bool(b >> i & 1) for i in range(8)) for b in range(256)
)


def _decode_registers(pdu: ModbusPDU, data: bytes) -> None:
    size = data[0]
    words = _WORDS.get(size)
    if words is None or size >= len(data):
        raise ModbusIOException(
            f"byte count {size} does not fit {len(data)} bytes", function_code=pdu.function_code
        )
    pdu.registers = list(words.unpack_from(data, 1))


def _decode_bits(pdu: ModbusPDU, data: bytes) -> None:
    table = _BYTE_BITS
    pdu.bits = [bit for byte in data[1 : 1 + data[0]] for bit in table[byte]]


def _short_str(pdu: ModbusPDU) -> str:
    size = len(pdu.registers) or len(pdu.bits)
    return f"{type(pdu).__name__}(dev_id={pdu.dev_id}, tid={pdu.transaction_id}, n={size})"


class _HoldingResponse(ReadHoldingRegistersResponse):
    decode = _decode_registers
    __str__ = _short_str


class _InputResponse(ReadInputRegistersResponse):
    decode = _decode_registers
    __str__ = _short_str


class _CoilsResponse(ReadCoilsResponse):
    decode = _decode_bits
    __str__ = _short_str


class _DiscreteInputsResponse(ReadDiscreteInputsResponse):
    decode = _decode_bits
    __str__ = _short_str


_FAST_RESPONSES = (_HoldingResponse, _InputResponse, _CoilsResponse, _DiscreteInputsResponse)


# -- client ---------------------------------------------------------------------------------


class ClientTransport:
    """One pymodbus client; what the TCP, RTU-over-TCP and serial transports share.

    ``read`` returns exactly ``count`` values or raises a ``gateway.errors.DeviceError``:
    ``DeviceException`` for an exception response (the link stays up), ``DeviceTimeout`` for
    no answer, ``ConnectionLost`` when not connected or the link broke, ``DecodeError`` for an
    answer of the wrong length. Calls must not overlap: the driver (or the serial line's
    ``PortOwner``) awaits each before the next.
    """

    #: Close the link after a timeout, so a late answer can never pair with the next request.
    #: A serial line keeps its port open instead: the other slaves on it need it, and the RTU
    #: framer drops an answer from another unit id.
    close_on_timeout = True

    def __init__(self, *, unit_id: int, timeout: float, connect_timeout: float, name: str) -> None:
        self.unit_id = unit_id
        self.timeout = timeout
        self.connect_timeout = connect_timeout
        self.name = name
        self._client: ModbusBaseClient | None = None
        #: Bytes received since start, counted by pymodbus's trace hook: a request that times
        #: out although bytes arrived met a broken frame (pymodbus 3.16 drops a frame with a
        #: bad CRC silently and lets the request time out).
        self.rx_bytes = 0
        #: ``serial_bus.clock()`` when bytes last arrived and when the last request was handed
        #: to the link (same hook; ``None`` before any, and always on Modbus TCP, which has no
        #: trace hook): a serial line's owner times its silence from the end of the answer,
        #: not from when the request's await resumed, and measures it up to the request.
        self.rx_at: float | None = None
        self.tx_at: float | None = None
        #: No request leaves before this instant (see :meth:`hold_send`).
        self._send_at = 0.0

    def _trace_packet(self, sending: bool, data: bytes) -> bytes:
        if sending:
            # pymodbus calls this with the built frame just before writing it: the last
            # moment to keep the line quiet. The owner hands over at most serial_bus.SPIN
            # early, so this spin is that short (and blocks the loop no longer).
            until, self._send_at = self._send_at, 0.0
            while (now := clock()) < until:
                pass
            self.tx_at = now
        else:
            self.rx_at = clock()
            self.rx_bytes += len(data)
        return data

    def hold_send(self, until: float) -> bool:
        """Keep the next request off the line until ``serial_bus.clock()`` reaches ``until``.

        Only links with the trace hook (serial lines, RTU over TCP) can; the owner of a line
        that can hands the line over up to ``serial_bus.SPIN`` early, so the time pymodbus
        takes to build the request overlaps the end of the silence instead of following it.
        The rest is spun when the request is written: ``until`` must be no further away than
        that when the request is made (the spin blocks the event loop).
        """
        if self._client is None:
            return False
        self._send_at = until
        return True

    @property
    def where(self) -> str:
        """The link, for messages."""
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name} {self.where}/{self.unit_id})"

    def _make_client(self) -> ModbusBaseClient:
        """A fresh client with pymodbus's reconnects and retries off."""
        raise NotImplementedError

    def _on_connected(self, client: ModbusBaseClient) -> None:
        """Tune the fresh link."""

    @property
    def connected(self) -> bool:
        client = self._client
        return client is not None and client.connected

    async def connect(self) -> None:
        """Open the link; a no-op when connected. Raises ConnectionLost or DeviceTimeout."""
        if self.connected:
            return
        await self.close()
        # A fresh client per connection: nothing of a broken link's state carries over.
        client = self._make_client()
        for response_class in _FAST_RESPONSES:
            client.register(response_class)
        loop = asyncio.get_running_loop()
        started = loop.time()
        try:
            ok = await client.connect()
        except BaseException:
            client.close()
            raise
        if not ok:
            client.close()
            # pymodbus reports every failure as False; only the time taken tells a timeout
            # (nobody answered) from a refusal or an unreachable network.
            if loop.time() - started >= self.connect_timeout * 0.95:
                raise DeviceTimeout(
                    f"{self.name}: no connection to {self.where} within {self.connect_timeout:g} s"
                )
            raise ConnectionLost(f"{self.name}: cannot connect to {self.where}")
        # pymodbus has one timeout for connecting and for each response; from now on it is
        # the response timeout.
        client.ctx.comm_params.timeout_connect = self.timeout
        self._on_connected(client)
        self._client = client

    async def close(self) -> None:
        """Close the connection; idempotent and safe after a failed connect."""
        client, self._client = self._client, None
        if client is not None:
            client.close()
            # The transport closes its socket in a callback; let it run so that no socket
            # outlives close() (and no ResourceWarning fires when the loop ends first).
            await asyncio.sleep(0)

    async def __aenter__(self) -> Self:
        await self.connect()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    async def read(
        self,
        table: Table,
        address: int,
        count: int,
        *,
        unit_id: int | None = None,
        response_timeout: float | None = None,
    ) -> list[int] | list[bool]:
        """Read ``count`` registers (ints) or bits (bools) of ``table`` from ``address``.

        ``unit_id`` and ``response_timeout`` override the transport's own for this request: a serial
        line's one transport serves every slave on it, each with its own.
        """
        client = self._client
        if client is None or not client.connected:
            raise ConnectionLost(f"{self.name}: not connected")
        unit = self.unit_id if unit_id is None else unit_id
        wait = self.timeout if response_timeout is None else response_timeout
        client.ctx.comm_params.timeout_connect = wait
        if not (0 <= address <= 0xFFFF and 1 <= count <= (2000 if table.is_bits else 125)):
            raise ValueError(f"{table.value} {address}+{count} is not a valid read")
        if table is Table.HOLDING:
            request = client.read_holding_registers
        elif table is Table.INPUT:
            request = client.read_input_registers
        elif table is Table.COIL:
            request = client.read_coils
        else:
            request = client.read_discrete_inputs
        rx_before = self.rx_bytes
        try:
            response = await request(address, count=count, device_id=unit)
        except ModbusException as exc:
            what = _describe(table, address, count)
            if unit != self.unit_id:
                what += f" of unit {unit}"
            raise self._failed(client, exc, what, wait, garbled=self.rx_bytes - rx_before) from None
        except asyncio.CancelledError:
            # The request may still be answered; the next request must not get that answer.
            self._drop(client)
            raise
        if isinstance(response, ExceptionResponse):
            raise self._refused(response, _describe(table, address, count))
        if table.is_bits:
            # Coils come packed in whole bytes; the padding bits are not ours.
            bits = response.bits
            if len(bits) < count:
                raise DecodeError(
                    f"{self.name}: {len(bits)} bits in the answer to "
                    f"{_describe(table, address, count)}"
                )
            return list(bits[:count])
        registers = response.registers
        if len(registers) != count:
            raise DecodeError(
                f"{self.name}: {len(registers)} registers in the answer to "
                f"{_describe(table, address, count)}"
            )
        return list(registers)

    async def write_registers(
        self, address: int, values: Sequence[int], *, unit_id: int | None = None
    ) -> None:
        """Write holding registers (FC16)."""
        client = self._client
        if client is None or not client.connected:
            raise ConnectionLost(f"{self.name}: not connected")
        if not (0 <= address <= 0xFFFF and 1 <= len(values) <= 123):
            raise ValueError(f"holding {address}+{len(values)} is not a valid write")
        what = f"write {_describe(Table.HOLDING, address, len(values))}"
        try:
            response = await client.write_registers(
                address, list(values), device_id=self.unit_id if unit_id is None else unit_id
            )
        except ModbusException as exc:
            raise self._failed(client, exc, what, self.timeout) from None
        except asyncio.CancelledError:
            self._drop(client)
            raise
        if isinstance(response, ExceptionResponse):
            raise self._refused(response, what)

    async def write_coil(self, address: int, value: bool, *, unit_id: int | None = None) -> None:
        """Write one coil (FC5)."""
        client = self._client
        if client is None or not client.connected:
            raise ConnectionLost(f"{self.name}: not connected")
        if not 0 <= address <= 0xFFFF:
            raise ValueError(f"coil {address} is not a valid address")
        what = f"write {_describe(Table.COIL, address, 1)}"
        try:
            response = await client.write_coil(
                address, value, device_id=self.unit_id if unit_id is None else unit_id
            )
        except ModbusException as exc:
            raise self._failed(client, exc, what, self.timeout) from None
        except asyncio.CancelledError:
            self._drop(client)
            raise
        if isinstance(response, ExceptionResponse):
            raise self._refused(response, what)

    def _failed(
        self,
        client: ModbusBaseClient,
        exc: ModbusException,
        what: str,
        timeout: float,
        *,
        garbled: int = 0,
    ) -> ConnectionLost | DeviceTimeout:
        """Close the link after a failed request (unless it timed out on a serial line)."""
        lost = not client.connected
        if isinstance(exc, ModbusIOException) and not lost:
            # retries=0: pymodbus gave up after one response timeout.
            if self.close_on_timeout:
                self._drop(client)
            if garbled:
                return BadFrame(
                    f"{self.name}: {garbled} byte(s) arrived for {what} but no valid reply "
                    f"within {timeout:g} s (CRC error, noise or two slaves answering)"
                )
            return DeviceTimeout(f"{self.name}: no answer to {what} within {timeout:g} s")
        self._drop(client)
        if isinstance(exc, ModbusIOException | ConnectionException):
            return ConnectionLost(f"{self.name}: link lost during {what}")
        # Anything else pymodbus raises leaves the link in an unknown state.
        return ConnectionLost(f"{self.name}: {what}: {exc}")

    def _refused(self, response: ExceptionResponse, what: str) -> DeviceException:
        code = response.exception_code
        return DeviceException(code, EXCEPTION_NAMES.get(code, f"EXCEPTION {code}"), request=what)

    def _drop(self, client: ModbusBaseClient) -> None:
        client.close()
        if self._client is client:
            self._client = None


class ModbusTcpTransport(ClientTransport):
    """One Modbus TCP connection to one unit id."""

    def __init__(
        self,
        *,
        host: str,
        port: int,
        unit_id: int,
        timeout: float,
        connect_timeout: float,
        name: str,
    ) -> None:
        super().__init__(
            unit_id=unit_id, timeout=timeout, connect_timeout=connect_timeout, name=name
        )
        self.host = host
        self.port = port

    @property
    def where(self) -> str:
        return f"{self.host}:{self.port}"

    def __repr__(self) -> str:
        return f"ModbusTcpTransport({self.name} {self.host}:{self.port}/{self.unit_id})"

    @property
    def tcp_nodelay(self) -> bool:
        """Whether the socket has Nagle's algorithm off, read back from the socket."""
        client = self._client
        transport = client.ctx.transport if client is not None else None
        sock = transport.get_extra_info("socket") if transport is not None else None
        if sock is None:
            return False
        return bool(sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY))

    def _make_client(self) -> ModbusBaseClient:
        # reconnect_delay=0 disables pymodbus's reconnect task (ModbusProtocol.connection_lost
        # only schedules one when it is non-zero) and retries=0 makes one call one request.
        return AsyncModbusTcpClient(
            self.host,
            port=self.port,
            name=self.name,
            framer=self._framer,
            reconnect_delay=0,
            reconnect_delay_max=0,
            timeout=self.connect_timeout,
            retries=0,
            # Counting received bytes costs a call per read; only where a CRC can fail.
            trace_packet=None if self._framer is FramerType.SOCKET else self._trace_packet,
        )

    _framer = FramerType.SOCKET

    def hold_send(self, until: float) -> bool:
        # Modbus TCP clients have no trace hook (see _make_client).
        return self._framer is not FramerType.SOCKET and super().hold_send(until)

    def _on_connected(self, client: ModbusBaseClient) -> None:
        _set_nodelay(client.ctx.transport)


class ModbusRtuOverTcpTransport(ModbusTcpTransport):
    """RTU frames (address, PDU, CRC; no MBAP header) over a TCP socket to a serial server."""

    _framer = FramerType.RTU

    def __repr__(self) -> str:
        return f"ModbusRtuOverTcpTransport({self.name} {self.host}:{self.port}/{self.unit_id})"


class ModbusSerialTransport(ClientTransport):
    """One serial port, RTU or ASCII framing; shared by every slave on the line.

    ``unit_id`` is only the default; the line's owner passes each slave's in ``read``.
    """

    close_on_timeout = False

    def __init__(
        self,
        *,
        port: str,
        baudrate: int,
        parity: str,
        stopbits: int,
        bytesize: int,
        framing: str,
        timeout: float,
        connect_timeout: float,
        name: str,
        unit_id: int = 1,
    ) -> None:
        super().__init__(
            unit_id=unit_id, timeout=timeout, connect_timeout=connect_timeout, name=name
        )
        if framing not in ("rtu", "ascii"):
            raise ValueError(f"framing {framing!r} is not rtu or ascii")
        self.port = port
        self.baudrate = baudrate
        self.parity = parity
        self.stopbits = stopbits
        self.bytesize = bytesize
        self.framing = framing

    @property
    def where(self) -> str:
        return f"{self.port}@{self.baudrate}/{self.bytesize}{self.parity}{self.stopbits}"

    def _make_client(self) -> ModbusBaseClient:
        return AsyncModbusSerialClient(
            self.port,
            framer=FramerType.ASCII if self.framing == "ascii" else FramerType.RTU,
            baudrate=self.baudrate,
            bytesize=self.bytesize,
            parity=self.parity,
            stopbits=self.stopbits,
            name=self.name,
            reconnect_delay=0,
            reconnect_delay_max=0,
            timeout=self.connect_timeout,
            retries=0,
            trace_packet=self._trace_packet,
        )

    def _on_connected(self, client: ModbusBaseClient) -> None:
        _write_at_once(client.ctx.transport)


def _describe(table: Table, address: int, count: int, verb: str = "") -> str:
    text = f"{table.value} {address}+{count}"
    return f"{verb} {text}" if verb else text


# -- server ---------------------------------------------------------------------------------

#: pymodbus hands the action of a coil or discrete input read the number of 16-bit words the
#: read touches, not the number of bits. The request objects below put the exact count here;
#: the action runs in the same task (pymodbus awaits it straight down from the request), so
#: a context variable carries it without any sharing between connections.
_BIT_COUNT: contextvars.ContextVar[int] = contextvars.ContextVar("modbus_bit_count", default=0)


class _ReadCoilsRequest(ReadCoilsRequest):
    async def datastore_update(self, context: object, device_id: int) -> ModbusPDU:
        _BIT_COUNT.set(self.count)
        return await super().datastore_update(context, device_id)  # type: ignore[arg-type]


class _ReadDiscreteInputsRequest(ReadDiscreteInputsRequest):
    async def datastore_update(self, context: object, device_id: int) -> ModbusPDU:
        _BIT_COUNT.set(self.count)
        return await super().datastore_update(context, device_id)  # type: ignore[arg-type]


#: Function code -> the table it addresses (pymodbus's SimRuntime maps them the same way).
_FC_TABLE: dict[int, Table] = {
    1: Table.COIL,
    5: Table.COIL,
    15: Table.COIL,
    2: Table.DISCRETE_INPUT,
    3: Table.HOLDING,
    6: Table.HOLDING,
    16: Table.HOLDING,
    22: Table.HOLDING,
    23: Table.HOLDING,
    4: Table.INPUT,
}

#: pymodbus's non-shared layout: (coils, discrete inputs, holding registers, input registers).
_TABLES = (Table.COIL, Table.DISCRETE_INPUT, Table.HOLDING, Table.INPUT)


_FRAMERS = {"socket": FramerType.SOCKET, "rtu": FramerType.RTU, "ascii": FramerType.ASCII}


class _Responder:
    """The SimDevice ``action`` of one simulated device: faults, holes and live values."""

    def __init__(self, device: SimulatedDevice, owner: RegisterServer) -> None:
        self.device = device
        self.owner = owner

    async def action(
        self,
        function_code: int,
        start_address: int,
        address: int,
        count: int,
        registers: list[int],
        set_values: list[int] | list[bool] | None,
    ) -> ExcCodes | None:
        device = self.device
        faults = device.faults
        if faults.silent:
            # With ignore_missing_devices the request handler drops the request without an
            # answer, exactly what a device that has gone quiet does; nothing is left pending.
            raise NoSuchIdException(f"unit {device.unit_id} is silent")
        if faults.delay > 0:
            await self.owner._sleep(faults.delay)
            if faults.silent:
                raise NoSuchIdException(f"unit {device.unit_id} is silent")
        if faults.exception is not None:
            return ExcCodes(faults.exception)
        table = _FC_TABLE.get(function_code)
        if table is None:
            return ExcCodes.ILLEGAL_FUNCTION
        if set_values is not None:
            # A write: pymodbus stores the values in its image after we return; the device
            # keeps its own copy, since the next read refills the image from the device.
            count = len(set_values)
            if not device.valid(table, address, count):
                return ExcCodes.ILLEGAL_ADDRESS
            if not isinstance(device, WritableDevice):
                return ExcCodes.ILLEGAL_FUNCTION
            device.write(table, address, set_values)
            return None
        if table.is_bits:
            # FC1/FC2 carry their bit count in the context; FC5 reads back its one coil.
            count = _BIT_COUNT.get() if function_code in (1, 2) else 1
            if not device.valid(table, address, count):
                return ExcCodes.ILLEGAL_ADDRESS
            # The image holds 16 bits per word, bit 0 in the least significant bit, and
            # registers[0] holds bits start_address * 16 ... + 15.
            bit = address - start_address * 16
            for value in device.read(table, address, count):
                word, mask = bit >> 4, 1 << (bit & 15)
                registers[word] = (registers[word] | mask) if value else (registers[word] & ~mask)
                bit += 1
            return None
        if not device.valid(table, address, count):
            return ExcCodes.ILLEGAL_ADDRESS
        offset = address - start_address
        registers[offset : offset + count] = device.read(table, address, count)
        return None

    def simdevice(self) -> SimDevice:
        blocks: list[list[SimData]] = []
        for table in _TABLES:
            span = self.device.span(table)
            datatype = DataType.BITS if table.is_bits else DataType.REGISTERS
            if span is None:
                # pymodbus needs at least one block per table. For registers an INVALID one
                # answers ILLEGAL DATA ADDRESS by itself; bit blocks must be BITS, and the
                # action refuses them because the device declares nothing there.
                block = (
                    SimData(address=0, count=1, values=False, datatype=DataType.BITS)
                    if table.is_bits
                    else SimData(address=0, count=1, datatype=DataType.INVALID)
                )
            else:
                start, count = span
                # Bits as one list, not as count=N: pymodbus's block check multiplies the
                # expanded values by count again, which is quadratic for BITS.
                block = (
                    SimData(address=start, values=[False] * count, datatype=datatype)
                    if table.is_bits
                    else SimData(address=start, count=count, values=0, datatype=datatype)
                )
            blocks.append([block])
        # Separate tables (a tuple of four lists) make coils and discrete inputs addressed by
        # bit, as on the wire; pymodbus requires use_bit_addressing=True for that layout.
        return SimDevice(
            id=self.device.unit_id,
            simdata=(blocks[0], blocks[1], blocks[2], blocks[3]),
            use_bit_addressing=True,
            action=self.action,
        )


class RegisterServer:
    """A Modbus server serving one or more simulated devices (by unit id).

    By default a Modbus TCP server on host:port. ``framing="rtu"`` serves RTU frames over
    TCP instead (a serial device server's view of its line); ``serial_port`` (a path, e.g.
    one end of a pty pair) serves the devices as slaves on a serial line, with ``framing``
    ``"rtu"`` or ``"ascii"``.

    The image pymodbus keeps of each table spans the device's ``span()``; the device is asked
    for fresh values on every request, after its faults are applied. A request to an unknown
    unit id is answered SERVER DEVICE FAILURE by pymodbus (on TCP; on a serial line nobody
    answers).
    """

    def __init__(
        self,
        devices: Sequence[SimulatedDevice],
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        serial_port: str | None = None,
        framing: Literal["socket", "rtu", "ascii"] | None = None,
        baudrate: int = 19200,
    ) -> None:
        ids = [d.unit_id for d in devices]
        if not devices or len(set(ids)) != len(ids):
            raise ValueError(f"need one or more devices with distinct unit ids, got {ids}")
        if framing is None:
            framing = "rtu" if serial_port is not None else "socket"
        if serial_port is not None and framing == "socket":
            raise ValueError("a serial line carries rtu or ascii frames, not socket (MBAP)")
        self.devices = list(devices)
        self.host = host
        self._port = port
        self.serial_port = serial_port
        self.framing = framing
        self.baudrate = baudrate
        self._server: ModbusTcpServer | ModbusSerialServer | None = None
        self._pending: set[asyncio.Task[object]] = set()
        self.connections_accepted = 0

    @property
    def port(self) -> int:
        """The bound port once started (an ephemeral one for port=0); kept across restarts."""
        return self._port

    @property
    def serving(self) -> bool:
        return self._server is not None

    @property
    def active_connections(self) -> int:
        server = self._server
        return len(server.active_connections) if server is not None else 0

    async def start(self) -> None:
        if self._server is not None:
            return
        simdevices = [_Responder(d, self).simdevice() for d in self.devices]
        custom = [_ReadCoilsRequest, _ReadDiscreteInputsRequest]
        server: ModbusTcpServer | ModbusSerialServer
        if self.serial_port is not None:
            server = ModbusSerialServer(
                simdevices,
                framer=_FRAMERS[self.framing],
                port=self.serial_port,
                baudrate=self.baudrate,
                ignore_missing_devices=True,
                custom_pdu=custom,  # type: ignore[arg-type]
                trace_pdu=self._absent_slaves_are_silent,  # type: ignore[arg-type]
                trace_connect=self._on_connect,
            )
            where = self.serial_port
        else:
            server = ModbusTcpServer(
                simdevices,
                address=(self.host, self._port),
                framer=_FRAMERS[self.framing],
                ignore_missing_devices=True,
                custom_pdu=custom,  # type: ignore[arg-type]
                trace_connect=self._on_connect,
            )
            where = f"{self.host}:{self._port}"
        self._server = server
        try:
            await server.serve_forever(background=True)
        except RuntimeError as exc:
            # pymodbus logs the OSError and says only that listening failed.
            self._server = None
            await server.shutdown()  # type: ignore[no-untyped-call]
            raise OSError(f"cannot listen on {where}") from exc
        sockets = getattr(server.transport, "sockets", None) or ()
        if sockets:
            self._port = int(sockets[0].getsockname()[1])

    async def stop(self) -> None:
        server, self._server = self._server, None
        if server is None:
            return
        await server.shutdown()  # type: ignore[no-untyped-call]
        await self._cancel_pending()
        # Closed transports release their sockets in a loop callback; let those run.
        await asyncio.sleep(0)

    async def drop_connections(self) -> None:
        """Close every client connection and keep listening (a device that resets links)."""
        server = self._server
        if server is None:
            return
        for handler in list(server.active_connections.values()):
            handler.close()
        # Answers still being delayed belong to the connections just closed.
        await self._cancel_pending()
        await asyncio.sleep(0)

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.stop()

    def _absent_slaves_are_silent(self, sending: bool, pdu: ModbusPDU) -> ModbusPDU | None:
        # pymodbus answers SERVER DEVICE FAILURE for a unit id it does not serve (ids are
        # looked up with a fallback to device 0); on a real bus nobody answers. A request
        # traced to None is dropped unanswered.
        if sending or any(d.unit_id == pdu.dev_id for d in self.devices):
            return pdu
        return None

    def _on_connect(self, connected: bool) -> None:
        server = self._server
        if not connected or server is None:
            return
        self.connections_accepted += 1
        # pymodbus gives no handle on the new connection here; set the option on all of
        # them (setting it twice is harmless).
        for handler in server.active_connections.values():
            _set_nodelay(handler.transport)

    async def _sleep(self, delay: float) -> None:
        # Delayed answers run in tasks pymodbus creates and never awaits: keep track of them
        # so stop() can cancel them instead of leaving them behind.
        task = asyncio.current_task()
        if task is not None:
            self._pending.add(task)
        try:
            await asyncio.sleep(delay)
        finally:
            if task is not None:
                self._pending.discard(task)

    async def _cancel_pending(self) -> None:
        pending = list(self._pending)
        self._pending.clear()
        for task in pending:
            task.cancel()
        if pending:
            await asyncio.gather(*pending, return_exceptions=True)

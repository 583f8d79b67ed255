"""The Modbus drivers (TCP, RTU on a serial line, RTU over TCP): read plan + decoders + façade.

One ``read(group)`` walks the group's requests once. A request that the device refuses with
ILLEGAL DATA ADDRESS is split in halves and retried at once, and the split is remembered for
this device, so one hole in a register map costs its own tag, not every tag of the block.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from drivers.base import Driver

import asyncio
import logging
from collections.abc import Awaitable, Callable, Hashable, Sequence
from typing import NamedTuple, TypeVar, cast

from drivers.latency_timer import LatencyTimer, tune_latency_timer
from drivers.modbus.config import (
    ByteOrder,
    DataType,
    ModbusDevice,
    ModbusRtuDevice,
    ModbusRtuOverTcpDevice,
    ModbusTag,
    ModbusTcpDevice,
    Table,
    register_count,
    resolve_address,
)
from drivers.modbus.decode import Decoder, buffers, compile_decoder, decode, encode
from drivers.modbus.plan import Request, Span, plan, split, summarize
from drivers.modbus.serial_bus import PortOwner, attach, silence
from drivers.modbus.transport import (
    ClientTransport,
    ModbusRtuOverTcpTransport,
    ModbusSerialTransport,
    ModbusTcpTransport,
)
from gateway.errors import ConnectionLost, DecodeError, DeviceException
from gateway.model import RawSample, ReadGroup, Reason, TagSpec, Value, WriteRule

__all__ = ["ModbusRtuDriver", "ModbusRtuOverTcpDriver", "ModbusTcpDriver"]

log = logging.getLogger("drivers.modbus")

T = TypeVar("T")

_new = tuple.__new__
_OK = Reason.NONE

ILLEGAL_DATA_ADDRESS = 2
#: Exception codes that mean "the device behind a gateway is not there": the whole device is
#: down, not one block of it.
_DEVICE_DOWN_CODES = frozenset({10, 11})


class _Where(NamedTuple):
    table: Table
    address: int
    type: DataType
    order: ByteOrder
    width: int
    bit: int | None


def _write_rule(tag: ModbusTag) -> WriteRule | None:
    w = tag.write
    if not tag.writable or w is None:
        return None
    allowed: tuple[Value, ...] = tuple(w.values) if w.values is not None else ()
    if tag.type is DataType.BOOL and not allowed:
        allowed = (False, True)
    return WriteRule(w.min, w.max, allowed, w.min_interval)


def _source(tag: ModbusTag, table: str, address: int) -> str:
    return (
        f"{table} {address}"
        if str(tag.address) == str(address)
        else (f"{table} {address} ({tag.address})")
    )


class _ModbusDriver:
    """The read plan, decoding and ILLEGAL DATA ADDRESS splits; subclasses carry the frames."""

    kind = "modbus"

    def __init__(self, device: ModbusDevice) -> None:
        self.device: ModbusDevice = device
        self.name = device.name
        self.endpoint = ""
        tags: list[TagSpec] = []
        spans: list[Span] = []
        self._decoders: list[Decoder | None] = []
        #: Per tag: where it lives and how it is encoded, for writes and their read-back.
        self._where: list[_Where] = []
        for index, tag in enumerate(device.tags):
            table, address = resolve_address(device.addressing, tag.table, tag.address)
            interval = tag.interval or device.interval
            tags.append(
                TagSpec(
                    index=index,
                    machine=device.machine,
                    device=device.name,
                    name=tag.name,
                    datatype=tag.type.value,
                    unit=tag.unit,
                    description=tag.description,
                    scale=tag.scale,
                    offset=tag.offset,
                    minimum=tag.min,
                    maximum=tag.max,
                    deadband=tag.deadband,
                    interval=interval,
                    source=_source(tag, table.value, address),
                    write=_write_rule(tag),
                )
            )
            self._where.append(
                _Where(table, address, tag.type, tag.order, register_count(tag), tag.bit)
            )
            spans.append(Span(index, table, address, register_count(tag)))
            self._decoders.append(
                None
                if tag.type is DataType.BOOL
                else compile_decoder(tag.type, tag.order, bit=tag.bit, count=tag.count)
            )
        self.tags: tuple[TagSpec, ...] = tuple(tags)
        # From here on the compiled plan is what runs. Keeping the validated tag models would
        # cost about 1.2 KB per tag for nothing, which a 512 MB Pi Zero notices at 10k tags.
        self.device = device.model_copy(update={"tags": []})
        by_interval: dict[float, list[int]] = {}
        for spec in self.tags:
            by_interval.setdefault(spec.interval, []).append(spec.index)
        self.groups: tuple[ReadGroup, ...] = tuple(
            ReadGroup(interval, tuple(indices)) for interval, indices in sorted(by_interval.items())
        )
        w = device.workarounds
        self._plans: list[list[Request]] = [
            plan(
                (spans[i] for i in g.indices),
                max_registers=w.max_registers_per_request,
                max_bits=w.max_bits_per_request,
                max_gap=device.max_gap,
                one_per_tag=w.one_request_per_tag,
            )
            for g in self.groups
        ]
        self.requests_sent = 0
        self.splits = 0
        self._compiled: dict[int, tuple[Request, tuple[tuple[int, int, int, Decoder], ...]]] = {}

    # -- Describable ---------------------------------------------------------------------

    def describe_plan(self) -> list[str]:
        every = [r for p in self._plans for r in p]
        lines = [f"{self.name} ({self.endpoint}): {summarize(every)}"]
        for group, requests in zip(self.groups, self._plans, strict=True):
            lines.append(
                f"  every {group.interval:g} s: " + ", ".join(r.describe() for r in requests)
            )
        return lines

    @property
    def requests_per_cycle(self) -> int:
        return sum(len(p) for p in self._plans)

    async def _read(self, table: Table, address: int, count: int) -> list[int] | list[bool]:
        """One read request on the wire: a poll's, or a write's read-back."""
        raise NotImplementedError

    async def _transfer(self, request: Request) -> list[int] | list[bool]:
        return await self._read(request.table, request.start, request.count)

    async def _write_transfer(self, table: Table, address: int, data: list[int] | bool) -> None:
        raise NotImplementedError

    async def write(self, tag: int, value: Value) -> Value:
        """Write one tag's raw (unscaled) value, encoded with the tag's own type and byte
        order, then read it back. Returns the value read back (decoded the way polls decode
        it), so the caller can verify. Raises DeviceError, or TypeError/ValueError for a
        value the tag's type cannot carry (nothing is sent then)."""
        spec = self.tags[tag]
        if spec.write is None:
            raise PermissionError(f"{self.name}: {spec.name} is not writable")
        w = self._where[tag]
        if w.table is Table.COIL:
            if not isinstance(value, bool):
                raise TypeError(f"value {value!r} is not a bool")
            await self._write_transfer(w.table, w.address, value)
            bits = await self._read(w.table, w.address, 1)
            return bool(bits[0])
        count = w.width if w.type is DataType.STRING else None
        registers = encode(w.type, w.order, value, count=count, bit=w.bit)
        await self._write_transfer(w.table, w.address, registers)
        back = await self._read(w.table, w.address, w.width)
        return decode(w.type, w.order, [int(r) for r in back], bit=w.bit)

    async def _read_group(self, group: int) -> list[RawSample]:
        w = self.device.workarounds
        out: list[RawSample] = []
        requests = self._plans[group]
        replanned: list[Request] = []
        for i, request in enumerate(requests):
            if i and w.pause_between_requests:
                await asyncio.sleep(w.pause_between_requests)
            replanned.extend(await self._read_request(request, out))
        if len(replanned) != len(requests):
            self._plans[group] = replanned
        return out

    async def _read_request(self, request: Request, out: list[RawSample]) -> list[Request]:
        """Read one request into ``out``; returns the request(s) to use from now on."""
        self.requests_sent += 1
        try:
            values = await self._transfer(request)
        except DeviceException as exc:
            if exc.code in _DEVICE_DOWN_CODES:
                raise
            if exc.code == ILLEGAL_DATA_ADDRESS:
                halves = split(request)
                if len(halves) > 1:
                    self.splits += 1
                    log.warning(
                        "%s: %s refused with ILLEGAL DATA ADDRESS; split into %s and kept that way",
                        self.name,
                        request.describe(),
                        ", ".join(h.describe() for h in halves),
                    )
                    kept: list[Request] = []
                    for half in halves:
                        kept.extend(await self._read_request(half, out))
                    return kept
            detail = str(exc)
            out.extend(
                RawSample(s.index, None, (), Reason.DEVICE_EXCEPTION, detail) for s in request.spans
            )
            return [request]
        self._decode(request, values, out)
        return [request]

    def _decode(
        self, request: Request, values: list[int] | list[bool], out: list[RawSample]
    ) -> None:
        append = out.append
        if request.table.is_bits:
            for tag, offset, _, _ in self._items(request):
                bit = values[offset]
                append(_new(RawSample, (tag, bool(bit), (int(bit),), _OK, "")))
            return
        registers = cast("list[int]", values)
        be, le = buffers(registers)
        for tag, offset, count, decoder in self._items(request):
            raw = tuple(registers[offset : offset + count])
            try:
                append(_new(RawSample, (tag, decoder(be, le, offset), raw, _OK, "")))
            except DecodeError as exc:
                append(RawSample(tag, None, raw, Reason.DECODE_ERROR, str(exc)))

    def _items(self, request: Request) -> tuple[tuple[int, int, int, Decoder], ...]:
        """Per span of ``request``: (tag index, offset, count, decoder), computed once.

        Keyed by identity: requests are long-lived plan entries, and hashing a frozen
        request would hash every span on every poll.
        """
        items = self._compiled.get(id(request))
        if items is None or items[0] is not request:
            start = request.start
            items = (
                request,
                tuple(
                    (s.index, s.address - start, s.count, self._decoders[s.index] or _no_decoder)
                    for s in request.spans
                ),
            )
            self._compiled[id(request)] = items
        return items[1]


class ModbusTcpDriver(_ModbusDriver):
    """One Modbus TCP device (one unit id on one endpoint)."""

    kind = "modbus_tcp"

    def __init__(
        self, device: ModbusTcpDevice, *, transport: ModbusTcpTransport | None = None
    ) -> None:
        super().__init__(device)
        self.endpoint = f"{device.host}:{device.port}/{device.unit_id}"
        self.transport = transport or ModbusTcpTransport(
            host=device.host,
            port=device.port,
            unit_id=device.unit_id,
            timeout=device.timeout,
            connect_timeout=device.connect_timeout,
            name=device.name,
        )

    async def _read(self, table: Table, address: int, count: int) -> list[int] | list[bool]:
        return await self.transport.read(table, address, count)

    # pymodbus runs one request at a time per client, so a write waits behind a poll.
    async def _write_transfer(self, table: Table, address: int, data: list[int] | bool) -> None:
        if isinstance(data, bool):
            await self.transport.write_coil(address, data)
        else:
            await self.transport.write_registers(address, data)

    # -- Driver --------------------------------------------------------------------------

    async def connect(self) -> None:
        await self.transport.connect()
        if self.device.workarounds.pause_after_connect:
            # Some serial gateways drop the first request that follows a connect.
            await asyncio.sleep(self.device.workarounds.pause_after_connect)

    async def close(self) -> None:
        await self.transport.close()

    def poll_timeout(self, group: int) -> float:
        n = len(self._plans[group])
        w = self.device.workarounds
        # Every request may take a full timeout, and a split after ILLEGAL DATA ADDRESS may
        # send up to twice as many; a reconnect for close_after_poll adds one connect.
        budget = 2 * n * (self.device.timeout + w.pause_between_requests) + self.device.timeout
        if w.close_after_poll:
            budget += self.device.connect_timeout + w.pause_after_connect
        return budget

    async def read(self, group: int) -> Sequence[RawSample]:
        if not self.transport.connected:
            # Only reached with close_after_poll: the runner connected us for the first poll.
            await self.connect()
        try:
            return await self._read_group(group)
        finally:
            if self.device.workarounds.close_after_poll:
                await self.transport.close()


class _TunedSerialTransport(ModbusSerialTransport):
    """A serial line whose USB adapter's latency timer is lowered at every (re)open."""

    latency: LatencyTimer | None = None

    async def connect(self) -> None:
        # A re-plugged adapter comes back with the 16 ms default, so not just the first time.
        self.latency = tune_latency_timer(self.port)
        await super().connect()


class _SharedLineDriver(_ModbusDriver):
    """A slave on a shared serial line: every request goes through the line's PortOwner."""

    device: ModbusRtuDevice | ModbusRtuOverTcpDevice

    def __init__(self, device: ModbusRtuDevice | ModbusRtuOverTcpDevice) -> None:
        super().__init__(device)
        self.unit_id = device.unit_id
        self._owner: PortOwner | None = None

    # What the line is, and how to open it; the first device to attach opens it.
    def _line(self) -> tuple[Hashable, int | None, object, float]:
        """(registry key, baud rate or None, settings all devices must share, turnaround gap)"""
        raise NotImplementedError

    def _make_link(self) -> ClientTransport:
        raise NotImplementedError

    @property
    def owner(self) -> PortOwner | None:
        """The line's owner while connected (shared with every device on the line)."""
        return self._owner

    def _hold(self) -> float:
        """Longest one transaction of ours may keep the line: a timeout, then silence."""
        _, baudrate, _, gap = self._line()
        return self.device.timeout + silence(baudrate) + gap

    async def connect(self) -> None:
        if self._owner is not None:
            return
        key, baudrate, settings, _ = self._line()
        self._owner = await attach(
            key,
            self._make_link,
            name=self.name,
            hold=self._hold(),
            baudrate=baudrate,
            settings=settings,
        )
        if self.device.workarounds.pause_after_connect:
            await asyncio.sleep(self.device.workarounds.pause_after_connect)

    async def close(self) -> None:
        owner, self._owner = self._owner, None
        if owner is not None:
            await owner.detach(self.name)

    def poll_timeout(self, group: int) -> float:
        n = len(self._plans[group])
        w = self.device.workarounds
        owner = self._owner
        # Each request (twice as many after a split) may wait behind one transaction of every
        # other device on the line, and the line may have to be reopened once.
        queue = owner.wait_allowance(self.name) if owner is not None else 0.0
        per_request = self._hold() + w.pause_between_requests + queue
        return 2 * n * per_request + self.device.timeout + self.device.connect_timeout

    async def read(self, group: int) -> Sequence[RawSample]:
        if self._owner is None:
            raise ConnectionLost(f"{self.name}: not connected")
        return await self._read_group(group)

    def details(self) -> dict[str, object]:
        out: dict[str, object] = {"line": self._line_name()}
        owner = self._owner
        if owner is not None:
            out["line_devices"] = owner.refs
            out["line_transactions"] = owner.transactions
            link = owner.link
            if isinstance(link, _TunedSerialTransport) and link.latency is not None:
                out.update(link.latency.as_dict())
        return out

    def _line_name(self) -> str:
        raise NotImplementedError

    async def _on_line(self, fn: Callable[[ClientTransport], Awaitable[T]]) -> T:
        """``fn`` (one request to our unit) alone on the line, through its owner."""
        owner = self._owner
        if owner is None:
            raise ConnectionLost(f"{self.name}: not connected")
        link = owner.link
        assert isinstance(link, ClientTransport)
        _, _, _, gap = self._line()
        return await owner.transaction(lambda: fn(link), gap=gap)

    async def _read(self, table: Table, address: int, count: int) -> list[int] | list[bool]:
        unit, timeout = self.unit_id, self.device.timeout
        return await self._on_line(
            lambda link: link.read(table, address, count, unit_id=unit, response_timeout=timeout)
        )

    async def _write_transfer(self, table: Table, address: int, data: list[int] | bool) -> None:
        unit = self.unit_id
        if isinstance(data, bool):
            flag = data
            await self._on_line(lambda link: link.write_coil(address, flag, unit_id=unit))
        else:
            regs = data
            await self._on_line(lambda link: link.write_registers(address, regs, unit_id=unit))


class ModbusRtuDriver(_SharedLineDriver):
    """One Modbus RTU (or ASCII) slave on a serial port shared with the other slaves on it."""

    kind = "modbus_rtu"
    device: ModbusRtuDevice

    def __init__(self, device: ModbusRtuDevice) -> None:
        super().__init__(device)
        self.endpoint = f"{device.port}@{device.line} unit {device.unit_id}"
        if device.framing == "ascii":
            self.endpoint += " (ascii)"

    def _line(self) -> tuple[Hashable, int | None, object, float]:
        d = self.device
        settings = (d.baudrate, d.parity, d.stopbits, d.bytesize, d.framing)
        return ("serial", d.port), d.baudrate, settings, d.turnaround_gap

    def _line_name(self) -> str:
        d = self.device
        return f"{d.port} {d.baudrate} {d.bytesize}{d.parity}{d.stopbits} {d.framing}"

    def _make_link(self) -> ClientTransport:
        d = self.device
        return _TunedSerialTransport(
            port=d.port,
            baudrate=d.baudrate,
            parity=d.parity,
            stopbits=d.stopbits,
            bytesize=d.bytesize,
            framing=d.framing,
            timeout=d.timeout,
            connect_timeout=d.connect_timeout,
            name=d.port,
            unit_id=d.unit_id,
        )


class ModbusRtuOverTcpDriver(_SharedLineDriver):
    """One serial slave behind a serial device server, RTU frames over one shared TCP link."""

    kind = "modbus_rtu_over_tcp"
    device: ModbusRtuOverTcpDevice

    def __init__(self, device: ModbusRtuOverTcpDevice) -> None:
        super().__init__(device)
        self.endpoint = f"{device.host}:{device.port} rtu unit {device.unit_id}"

    def _line(self) -> tuple[Hashable, int | None, object, float]:
        d = self.device
        # The device server times its own line; the baud rate is not ours to know.
        return ("tcp", d.host.lower(), d.port), None, None, 0.0

    def _line_name(self) -> str:
        return f"{self.device.host}:{self.device.port} (serial device server)"

    def _make_link(self) -> ClientTransport:
        d = self.device
        return ModbusRtuOverTcpTransport(
            host=d.host,
            port=d.port,
            unit_id=d.unit_id,
            timeout=d.timeout,
            connect_timeout=d.connect_timeout,
            name=f"{d.host}:{d.port}",
        )


def _no_decoder(be: bytes, le: bytes, offset: int) -> bool:
    # Bit tables never call a decoder; this keeps the compiled tuple's type uniform.
    raise AssertionError("bool tags live in bit tables")


if TYPE_CHECKING:
    # mypy (strict, in CI) proves each driver satisfies the runtime's Driver protocol.
    def _is_driver_ModbusTcpDriver(d: ModbusTcpDriver) -> Driver:
        return d

    def _is_driver_ModbusRtuDriver(d: ModbusRtuDriver) -> Driver:
        return d

    def _is_driver_ModbusRtuOverTcpDriver(d: ModbusRtuOverTcpDriver) -> Driver:
        return d

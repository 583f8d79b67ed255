"""The Modbus TCP driver: compiled read plan + decoders + the pymodbus façade.

One ``read(group)`` walks the group's requests once. A request that the device refuses with
ILLEGAL DATA ADDRESS is split in halves and retried at once, and the split is remembered for
this device, so one hole in a register map costs its own tag, not every tag of the block.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from typing import cast

from drivers.modbus.config import (
    DataType,
    ModbusTag,
    ModbusTcpDevice,
    register_count,
    resolve_address,
)
from drivers.modbus.decode import Decoder, buffers, compile_decoder
from drivers.modbus.plan import Request, Span, plan, split, summarize
from drivers.modbus.transport import ModbusTcpTransport
from gateway.errors import DecodeError, DeviceException
from gateway.model import RawSample, ReadGroup, Reason, TagSpec

__all__ = ["ModbusTcpDriver"]

log = logging.getLogger("drivers.modbus")

_new = tuple.__new__
_OK = Reason.NONE

ILLEGAL_DATA_ADDRESS = 2
#: Exception codes that mean "the device behind a gateway is not there": the whole device is
#: down, not one block of it.
_DEVICE_DOWN_CODES = frozenset({10, 11})


def _source(tag: ModbusTag, table: str, address: int) -> str:
    return (
        f"{table} {address}"
        if str(tag.address) == str(address)
        else (f"{table} {address} ({tag.address})")
    )


class ModbusTcpDriver:
    """One Modbus TCP device (one unit id on one endpoint)."""

    kind = "modbus_tcp"

    def __init__(
        self, device: ModbusTcpDevice, *, transport: ModbusTcpTransport | None = None
    ) -> None:
        self.device = device
        self.name = device.name
        self.endpoint = f"{device.host}:{device.port}/{device.unit_id}"
        self.transport = transport or ModbusTcpTransport(
            host=device.host,
            port=device.port,
            unit_id=device.unit_id,
            timeout=device.timeout,
            connect_timeout=device.connect_timeout,
            name=device.name,
        )
        tags: list[TagSpec] = []
        spans: list[Span] = []
        self._decoders: list[Decoder | None] = []
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
                )
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
        w = self.device.workarounds
        if not self.transport.connected:
            # Only reached with close_after_poll: the runner connected us for the first poll.
            await self.connect()
        out: list[RawSample] = []
        requests = self._plans[group]
        replanned: list[Request] = []
        try:
            for i, request in enumerate(requests):
                if i and w.pause_between_requests:
                    await asyncio.sleep(w.pause_between_requests)
                replanned.extend(await self._read_request(request, out))
        finally:
            if w.close_after_poll:
                await self.transport.close()
        if len(replanned) != len(requests):
            self._plans[group] = replanned
        return out

    async def _read_request(self, request: Request, out: list[RawSample]) -> list[Request]:
        """Read one request into ``out``; returns the request(s) to use from now on."""
        self.requests_sent += 1
        try:
            values = await self.transport.read(request.table, request.start, request.count)
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


def _no_decoder(be: bytes, le: bytes, offset: int) -> bool:
    # Bit tables never call a decoder; this keeps the compiled tuple's type uniform.
    raise AssertionError("bool tags live in bit tables")

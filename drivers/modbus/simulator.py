"""Simulated Modbus machines: an old lathe and an old mill, and a benchmark device.

Pure: no pymodbus and no I/O. ``drivers.modbus.transport.RegisterServer`` serves these devices
over Modbus TCP; :func:`serve` wires the two demo machines to it for ``retrofit-gw simulate``.

Every value is computed from the wall clock (``time.time()``) when a request reads it, so two
simulators started apart agree, and a poll sees values that moved since the last one.

Register map of :class:`Lathe` and :class:`Mill` (unit 1, zero-based protocol addresses;
``config/demo.yaml`` has one tag for each row)::

    addr     table     type     order  unit    meaning
    -------  --------  -------  -----  ------  ----------------------------------------------
    0        holding   uint16   -      -       status word: bit 0 cycle running, 1 spindle
                                                 turning, 2 coolant on, 3 door closed,
                                                 4 alarm active, 5 auto mode, 6 work clamped
    1        holding   uint16   -      rpm     spindle speed
    2        holding   uint16   -      %       spindle load, x10 (scale 0.1)
    3        holding   uint16   -      mm/min  feed rate
    4        holding   int16    -      °C      coolant temperature, x10 (scale 0.1)
    5        holding   int16    -      °C      spindle bearing temperature, x10 (scale 0.1)
    6-7      holding   uint32   ABCD   parts   part counter, +1 at the end of every cycle
    8        holding   uint16   -      -       alarm word: bit 0 lube level low, 1 coolant
                                                 level low, 2 spindle over temperature
    9        holding   bcd16    -      -       active tool, BCD ``SSOO``: station SS, offset OO
    10-11    holding   float32  CDAB   bar     hydraulic pressure
    12-13    holding   int32    ABCD   µm      X axis position (scale 0.001 -> mm)
    14-15    holding   int32    ABCD   µm      Lathe: Z axis; Mill: Y axis
    16-17    holding   int32    ABCD   µm      Mill only: Z axis
    16..99   (hole: not served, answers ILLEGAL DATA ADDRESS; 18..99 on the mill)
    100-103  holding   uint64   ABCD   ms      controller clock, ms since the epoch (latency)
    104-111  holding   string   -      -       machine model, 16 ASCII characters
    112      holding   uint16   -      -       running NC program number (O-number)
    113      holding   uint16   -      s       current (or last) cycle time, x10 (scale 0.1)
    0        input     uint16   -      A       spindle motor current, x10 (scale 0.1)
    1        input     int16    -      °C      electrical cabinet temperature, x10 (scale 0.1)
    2        input     uint16   -      V       mains voltage
    0        coil      bool     -      -       cycle running (same as status bit 0)
    1        coil      bool     -      -       coolant pump on
    2        coil      bool     -      -       work light (writable; keeps what is written)
    0        discrete  bool     -      -       door closed
    1        discrete  bool     -      -       emergency stop chain OK
    2        discrete  bool     -      -       work piece clamped
    3        discrete  bool     -      -       lube oil level OK

A cycle (lathe 90 s, mill 150 s) runs its operations, then idles while the part is changed:
the door opens, the clamp releases, the counter has gone up by one. Every 13th cycle the
lube level alarm shows during the idle time, and every 29th the coolant level alarm.
"""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import logging
import math
import random
import struct
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

from drivers.modbus.config import ByteOrder, Table

__all__ = [
    "Faults",
    "Lathe",
    "Mill",
    "RegisterMapDevice",
    "SimulatedDevice",
    "WritableDevice",
    "bench_device",
    "demo_devices",
    "encode",
    "serve",
]

log = logging.getLogger("drivers.modbus.simulator")


@dataclass
class Faults:
    """Misbehaviour to inject; mutable while the device is being served.

    Faults apply to every request of the device, checked in this order: ``silent`` (no answer
    at all), ``delay`` (seconds to wait before answering), ``exception`` (answer with this
    Modbus exception code instead of data; it must be a standard code: 1-8, 10 or 11).
    """

    delay: float = 0.0
    silent: bool = False
    exception: int | None = None


class SimulatedDevice(Protocol):
    """What ``RegisterServer`` needs from a simulated device (one unit id)."""

    unit_id: int
    faults: Faults

    def span(self, table: Table) -> tuple[int, int] | None:
        """``(first address, count)`` enclosing every valid address of ``table``, or None.

        The server allocates its register image for this range only; requests outside it
        are answered ILLEGAL DATA ADDRESS without consulting the device (or its faults).
        """
        ...

    def valid(self, table: Table, address: int, count: int) -> bool:
        """False when any of the addresses is not served (answered ILLEGAL DATA ADDRESS)."""
        ...

    def read(self, table: Table, address: int, count: int) -> list[int] | list[bool]:
        """The values now; called only after :meth:`valid` said yes."""
        ...


@runtime_checkable
class WritableDevice(Protocol):
    """A simulated device that accepts writes; devices without ``write`` refuse them."""

    def write(self, table: Table, address: int, values: Sequence[int] | Sequence[bool]) -> None:
        """Store values written by a client; called only after :meth:`valid` said yes."""
        ...


# -- encoding ------------------------------------------------------------------------------

_STRUCT = {
    "int16": "h",
    "uint16": "H",
    "int32": "i",
    "uint32": "I",
    "int64": "q",
    "uint64": "Q",
    "float32": "f",
    "float64": "d",
}


def _words(data: bytes, order: ByteOrder) -> list[int]:
    # Written independently of drivers.modbus.decode on purpose: the simulator is the
    # reference the decoder is tested against, so it must not share its code.
    words = [int.from_bytes(data[i : i + 2], "big") for i in range(0, len(data), 2)]
    if order.swap_bytes:
        words = [((w & 0xFF) << 8) | (w >> 8) for w in words]
    if order.swap_words:
        words.reverse()
    return words


def encode(
    type: str, value: float | str, order: ByteOrder | str = ByteOrder.ABCD, *, count: int = 0
) -> list[int]:
    """Registers holding ``value`` as ``type`` in ``order``, as a device would store it.

    ``type`` is a config type name (``uint16``, ``float32``, ``bcd16``, ``string``, ...).
    Strings are ASCII, NUL-padded to ``count`` registers. Raises ``ValueError`` when the value
    does not fit.
    """
    order = ByteOrder(order)
    if type == "string":
        data = str(value).encode("ascii")
        if len(data) > 2 * count:
            raise ValueError(f"{value!r} does not fit {count} registers")
        # Inside a string each register holds two characters in reading order; only a byte
        # swap applies, never a word swap.
        order = ByteOrder.BADC if order.swap_bytes else ByteOrder.ABCD
        return _words(data.ljust(2 * count, b"\x00"), order)
    if type in ("bcd16", "bcd32"):
        digits = 4 if type == "bcd16" else 8
        number = int(value)
        if not 0 <= number < 10**digits:
            raise ValueError(f"{value!r} does not fit {type}")
        # The decimal digits read as hex are the BCD nibbles.
        return encode("uint16" if digits == 4 else "uint32", int(str(number), 16), order)
    code = _STRUCT[type]
    try:
        data = struct.pack(">" + code, value if code in "fd" else int(value))
    except struct.error as exc:
        raise ValueError(f"{value!r} does not fit {type}") from exc
    if len(data) == 2:
        # A single register has no words to swap.
        order = ByteOrder.BADC if order.swap_bytes else ByteOrder.ABCD
    return _words(data, order)


# -- a generic register-map device ---------------------------------------------------------


class RegisterMapDevice:
    """A device backed by sparse register images, one per table, and a set of valid ranges.

    ``serve()`` declares a block (valid from then on), ``set()``/``put()`` change values.
    Subclasses override :meth:`tick` to refresh dynamic values; it runs before every read.
    """

    def __init__(self, unit_id: int = 1, *, faults: Faults | None = None) -> None:
        self.unit_id = unit_id
        self.faults = faults if faults is not None else Faults()
        self._words: dict[Table, dict[int, int]] = {Table.HOLDING: {}, Table.INPUT: {}}
        self._bits: dict[Table, dict[int, bool]] = {Table.COIL: {}, Table.DISCRETE_INPUT: {}}
        # Per table: sorted, merged, half-open [start, end) ranges, as two parallel lists so
        # that bisect can search the starts.
        self._starts: dict[Table, list[int]] = {t: [] for t in Table}
        self._ends: dict[Table, list[int]] = {t: [] for t in Table}
        self.reads = 0

    # -- building the map

    def serve(self, table: Table, address: int, count: int) -> None:
        """Make ``count`` addresses from ``address`` valid (initially 0 / False)."""
        if count < 1 or address < 0 or address + count > 65536:
            raise ValueError(f"block {table.value} {address}+{count} is outside 0..65535")
        ranges = [(s, e) for s, e in zip(self._starts[table], self._ends[table], strict=True)]
        ranges.append((address, address + count))
        ranges.sort()
        merged: list[tuple[int, int]] = []
        for start, end in ranges:
            if merged and start <= merged[-1][1]:
                merged[-1] = (merged[-1][0], max(merged[-1][1], end))
            else:
                merged.append((start, end))
        self._starts[table] = [s for s, _ in merged]
        self._ends[table] = [e for _, e in merged]
        if table.is_bits:
            bits = self._bits[table]
            for a in range(address, address + count):
                bits.setdefault(a, False)
        else:
            words = self._words[table]
            for a in range(address, address + count):
                words.setdefault(a, 0)

    def set(self, table: Table, address: int, values: Iterable[int] | Iterable[bool]) -> None:
        """Store raw values (registers or bits) at served addresses."""
        values = list(values)
        if not self.valid(table, address, len(values)):
            raise ValueError(f"{table.value} {address}+{len(values)} is not served")
        if table.is_bits:
            bits = self._bits[table]
            for i, v in enumerate(values):
                bits[address + i] = bool(v)
        else:
            words = self._words[table]
            for i, v in enumerate(values):
                if not 0 <= v <= 0xFFFF:
                    raise ValueError(f"register value {v} is outside 0..65535")
                words[address + i] = int(v)

    def put(
        self,
        address: int,
        type: str,
        value: float | str,
        order: ByteOrder | str = ByteOrder.ABCD,
        *,
        table: Table = Table.HOLDING,
        count: int = 0,
    ) -> None:
        """Store a typed value (see :func:`encode`)."""
        self.set(table, address, encode(type, value, order, count=count))

    def put_bit(self, address: int, bit: int, value: bool, *, table: Table = Table.HOLDING) -> None:
        word = self._words[table][address]
        self._words[table][address] = (word | (1 << bit)) if value else (word & ~(1 << bit))

    def get(self, table: Table, address: int, count: int) -> list[int] | list[bool]:
        """The stored values, without a tick."""
        if table.is_bits:
            bits = self._bits[table]
            return [bits[a] for a in range(address, address + count)]
        words = self._words[table]
        return [words[a] for a in range(address, address + count)]

    def tick(self, now: float) -> None:
        """Refresh dynamic values; ``now`` is ``time.time()``. Called before every read."""

    # -- SimulatedDevice

    def span(self, table: Table) -> tuple[int, int] | None:
        starts = self._starts[table]
        if not starts:
            return None
        return starts[0], self._ends[table][-1] - starts[0]

    def valid(self, table: Table, address: int, count: int) -> bool:
        starts = self._starts[table]
        i = bisect.bisect_right(starts, address) - 1
        return i >= 0 and address + count <= self._ends[table][i] and count >= 1

    def read(self, table: Table, address: int, count: int) -> list[int] | list[bool]:
        self.reads += 1
        self.tick(time.time())
        return self.get(table, address, count)

    # -- WritableDevice

    def write(self, table: Table, address: int, values: Sequence[int] | Sequence[bool]) -> None:
        self.set(table, address, values)


# -- machine tools -------------------------------------------------------------------------

#: Part counters count from here, so they show a plausible lifetime total (2024-01-01 UTC).
_COUNTER_EPOCH = 1_704_067_200.0
#: Seconds a spindle or feed takes to reach a new set point.
_RAMP = 1.5

_STATUS_RUNNING = 0
_STATUS_SPINDLE = 1
_STATUS_COOLANT = 2
_STATUS_DOOR = 3
_STATUS_ALARM = 4
_STATUS_AUTO = 5
_STATUS_CLAMPED = 6

_ALARM_LUBE = 1 << 0
_ALARM_COOLANT_LEVEL = 1 << 1


@dataclass(frozen=True)
class _Op:
    """One machining operation of a cycle."""

    start: float  # seconds into the cycle
    end: float
    rpm: float
    load: float  # % of rated spindle power
    feed: float  # mm/min
    tool: int  # station * 100 + offset, shown as BCD
    passes: int  # tool path repetitions within the operation
    depth: float  # µm of infeed per pass
    length: float  # µm of travel per pass


def _wave(now: float, period: float, phase: float = 0.0) -> float:
    return math.sin(2 * math.pi * now / period + phase)


class _MachineTool(RegisterMapDevice):
    """The shared register map and cycle model of the demo machines."""

    MODEL = ""
    PROGRAM = 0
    PERIOD = 90.0  # seconds per cycle, part change included
    RUN = 72.0  # seconds of machining at the start of each cycle
    OPS: tuple[_Op, ...] = ()
    AXES: tuple[str, ...] = ()
    HYDRAULIC_BAR = 40.0
    RATED_CURRENT = 20.0  # A at 100 % load
    PHASE = 0.0  # seconds to shift the cycle, so machines do not run in lock step

    def __init__(self, unit_id: int = 1, *, faults: Faults | None = None) -> None:
        super().__init__(unit_id, faults=faults)
        self.serve(Table.HOLDING, 0, 12 + 2 * len(self.AXES))
        self.serve(Table.HOLDING, 100, 14)
        self.serve(Table.INPUT, 0, 3)
        self.serve(Table.COIL, 0, 3)
        self.serve(Table.DISCRETE_INPUT, 0, 4)
        self.put(104, "string", self.MODEL, count=8)
        self.put(112, "uint16", self.PROGRAM)
        self.tick(time.time())

    def _operation(self, phase: float) -> tuple[_Op | None, _Op | None]:
        """The operation running at ``phase`` (None when idle) and the one before it."""
        previous: _Op | None = None
        for op in self.OPS:
            if op.start <= phase < op.end:
                return op, previous
            if op.end <= phase:
                previous = op
        return None, previous

    def _path(self, op: _Op, into: float) -> list[float]:
        """Axis positions in µm, ``into`` seconds into ``op``."""
        raise NotImplementedError

    def _home(self) -> list[float]:
        raise NotImplementedError

    def tick(self, now: float) -> None:
        t = now + self.PHASE
        cycle, phase = divmod(t - _COUNTER_EPOCH, self.PERIOD)
        running = phase < self.RUN
        op, previous = self._operation(phase)
        since = phase - op.start if op is not None else phase - self.RUN
        ramp = min(1.0, since / _RAMP)
        # Ramp from the previous operation's speed (or standstill) to this one's (or to 0).
        target_rpm = op.rpm if op is not None else 0.0
        before_rpm = previous.rpm if previous is not None else 0.0
        rpm = before_rpm + (target_rpm - before_rpm) * ramp
        if rpm > 0:
            rpm *= 1 + 0.003 * _wave(now, 1.7) + 0.002 * _wave(now, 0.37)
        feed = (op.feed * ramp) if op is not None else 0.0
        load = 0.0
        if op is not None:
            load = op.load * ramp * (1 + 0.06 * _wave(now, 2.3) + 0.03 * _wave(now, 0.29))
        elif rpm > 1:
            load = 3.0 * rpm / max(before_rpm, 1.0)

        # The door opens and the clamp releases only in the middle of the part change.
        idle = self.PERIOD - self.RUN
        door_closed = running or not (self.RUN + 0.2 * idle <= phase < self.RUN + 0.8 * idle)
        clamped = running or not (self.RUN + 0.3 * idle <= phase < self.RUN + 0.7 * idle)
        alarm = 0
        if not running and int(cycle) % 13 == 7:
            alarm |= _ALARM_LUBE
        if not running and int(cycle) % 29 == 3 and phase >= self.RUN + 0.5 * idle:
            alarm |= _ALARM_COOLANT_LEVEL
        parts = int(cycle) + (0 if running else 1)

        coolant = 21.0 + 2.5 * _wave(now, 5400) + 0.8 * _wave(now, 1300, 1.0)
        coolant += 0.05 * _wave(now, 7.3)
        spindle_temp = 36.0 + 6.0 * _wave(now, 7200, 2.0) + 3.0 * _wave(now, 900)
        spindle_temp += 0.1 * _wave(now, 11.0)
        pressure = self.HYDRAULIC_BAR + 0.6 * _wave(now, 2.9) + 0.25 * _wave(now, 0.41)
        if not clamped:
            pressure -= 4.0

        axes = self._path(op, since) if op is not None else self._home()
        tool = op.tool if op is not None else (previous.tool if previous else self.OPS[-1].tool)

        status = 1 << _STATUS_AUTO
        for bit, on in (
            (_STATUS_RUNNING, running),
            (_STATUS_SPINDLE, rpm >= 1),
            (_STATUS_COOLANT, running),
            (_STATUS_DOOR, door_closed),
            (_STATUS_ALARM, alarm != 0),
            (_STATUS_CLAMPED, clamped),
        ):
            if on:
                status |= 1 << bit

        words = self._words[Table.HOLDING]
        words[0] = status
        words[1] = round(rpm)
        words[2] = round(load * 10)
        words[3] = round(feed)
        self.put(4, "int16", round(coolant * 10))
        self.put(5, "int16", round(spindle_temp * 10))
        self.put(6, "uint32", parts)
        words[8] = alarm
        self.put(9, "bcd16", tool)
        self.put(10, "float32", pressure, ByteOrder.CDAB)
        for i, position in enumerate(axes):
            self.put(12 + 2 * i, "int32", round(position))
        self.put(100, "uint64", int(now * 1000))
        words[113] = round(10 * (phase if running else self.RUN))

        current = 0.4 + self.RATED_CURRENT * load / 100 + 0.05 * _wave(now, 0.53)
        inputs = self._words[Table.INPUT]
        inputs[0] = round(current * 10)
        self.put(1, "int16", round(10 * (31.0 + 3.0 * _wave(now, 3600, 0.5))), table=Table.INPUT)
        inputs[2] = round(400 + 4 * _wave(now, 600) + 1.5 * _wave(now, 3.1))

        coils = self._bits[Table.COIL]
        coils[0] = running
        coils[1] = running
        inputs_bits = self._bits[Table.DISCRETE_INPUT]
        inputs_bits[0] = door_closed
        inputs_bits[1] = True
        inputs_bits[2] = clamped
        inputs_bits[3] = not alarm & _ALARM_LUBE


class Lathe(_MachineTool):
    """A 1990s CNC lathe: X (radius) and Z axes, 90 s cycle of three operations."""

    MODEL = "LT-250 CNC LATHE"
    PROGRAM = 2041
    PERIOD = 90.0
    RUN = 72.0
    AXES = ("x", "z")
    HYDRAULIC_BAR = 35.0
    RATED_CURRENT = 22.0
    OPS = (
        _Op(0.0, 30.0, 1800, 55.0, 250, 101, 6, 1500, 120_000),
        _Op(30.0, 58.0, 2400, 30.0, 120, 303, 2, 200, 120_000),
        _Op(58.0, 72.0, 600, 45.0, 900, 707, 7, 130, 40_000),
    )

    def _path(self, op: _Op, into: float) -> list[float]:
        # Each pass cuts along -Z for 85 % of its time, then rapids back; X steps in.
        duration = (op.end - op.start) / op.passes
        n, within = divmod(into, duration)
        f = within / duration
        z = 2_000 - op.length * (f / 0.85 if f < 0.85 else (1 - (f - 0.85) / 0.15))
        x = 40_000 - op.depth * (n + (1 if f >= 0.85 else 0))
        return [x, z]

    def _home(self) -> list[float]:
        return [120_000, 50_000]


class Mill(_MachineTool):
    """A 1990s vertical machining centre: X, Y and Z axes, 150 s cycle."""

    MODEL = "VMC-800 CNC MILL"
    PROGRAM = 3107
    PERIOD = 150.0
    RUN = 126.0
    AXES = ("x", "y", "z")
    HYDRAULIC_BAR = 62.0
    RATED_CURRENT = 30.0
    PHASE = 37.0
    OPS = (
        _Op(0.0, 40.0, 3500, 40.0, 1200, 101, 4, 1_000, 60_000),
        _Op(40.0, 96.0, 6000, 60.0, 800, 505, 8, 2_500, 40_000),
        _Op(96.0, 126.0, 1200, 25.0, 150, 1212, 12, 0, 20_000),
    )

    def _path(self, op: _Op, into: float) -> list[float]:
        # Circles around the part centre, one Z level per pass, radius growing in each pass.
        duration = (op.end - op.start) / op.passes
        n, within = divmod(into, duration)
        angle = 2 * math.pi * within / min(duration, 6.0)
        radius = op.length * (0.3 + 0.7 * within / duration)
        x = 400_000 + radius * math.cos(angle)
        y = 200_000 + radius * math.sin(angle)
        z = -op.depth * (n + 1) if op.depth else -5_000 - 15_000 * abs(_wave(into, 2.5))
        return [x, y, z]

    def _home(self) -> list[float]:
        return [0, 0, 100_000]


def demo_devices() -> list[tuple[str, SimulatedDevice]]:
    """The demo machines, each to be served on its own port (as on its own IP in a plant)."""
    return [("lathe-1", Lathe(unit_id=1)), ("mill-1", Mill(unit_id=1))]


async def serve(host: str, base_port: int, stop: asyncio.Event) -> None:
    """Serve the demo machines on ``base_port`` and ``base_port + 1`` until ``stop`` is set."""
    # Imported here: the module stays free of pymodbus for everything but serving, and
    # transport imports this module.
    from drivers.modbus.transport import RegisterServer  # noqa: PLC0415

    async with contextlib.AsyncExitStack() as stack:
        for i, (name, device) in enumerate(demo_devices()):
            server = await stack.enter_async_context(
                RegisterServer([device], host=host, port=base_port + i)
            )
            log.info("simulating %s on %s:%d unit %d", name, host, server.port, device.unit_id)
        await stop.wait()


# -- benchmark device ----------------------------------------------------------------------


class _BenchTag:
    """One benchmark value; its own read counter drives it, so every read changes it."""

    __slots__ = ("address", "base", "end", "kind", "n", "pack", "step", "swap_words")

    def __init__(self, address: int, kind: str, order: ByteOrder, base: int, step: int) -> None:
        self.address = address
        self.end = address + _WIDTH[kind]
        self.kind = kind
        self.base = base
        self.step = step
        self.n = 0
        width = _WIDTH[kind]
        value = struct.Struct(">" + _STRUCT.get(kind, "H"))
        words = struct.Struct(("<" if order.swap_bytes else ">") + f"{width}H")
        self.swap_words = order.swap_words and width > 1

        def pack(v: float) -> tuple[int, ...]:
            return words.unpack(value.pack(v))

        self.pack = pack

    def update(self, image: dict[int, int], now_ms: int) -> None:
        self.n += 1
        n, kind = self.n, self.kind
        if kind == "uint16":
            value: float = (self.base + n * self.step) & 0xFFFF
        elif kind == "int16":
            value = self.base + (n * self.step) % 2000 - 1000
        elif kind == "int32":
            value = self.base + (n * self.step) % 2_000_000 - 1_000_000
        elif kind == "uint32":
            value = (self.base + n * self.step) & 0xFFFF_FFFF
        elif kind == "float32":
            # Multiples of 1/8 are exact in float32, so the decoded value moves every time.
            value = self.base + ((n * self.step) % 1000) * 0.125
        elif kind == "uint64":
            value = now_ms
        else:  # a word of bits: every bit flips on every read
            value = 0x5555 if n % 2 else 0xAAAA
        words = self.pack(value)
        if self.swap_words:
            words = words[::-1]
        for i, w in enumerate(words):
            image[self.address + i] = w


class _BenchDevice(RegisterMapDevice):
    """Every value changes on every read, so a benchmark can count changes."""

    def __init__(self, unit_id: int, tags: dict[Table, list[_BenchTag]]) -> None:
        super().__init__(unit_id)
        self._tags = tags
        self._last_ms = 0
        for table, layout in tags.items():
            if layout:
                # Served without holes: the gaps between tags are unused registers that
                # requests may span, as in most real maps.
                self.serve(table, 0, max(t.end for t in layout))
                for tag in layout:
                    tag.update(self._words[table], int(time.time() * 1000))

    def read(self, table: Table, address: int, count: int) -> list[int] | list[bool]:
        # Only the tags in the requested range move: a read costs what it returns.
        self.reads += 1
        # Strictly increasing, so that two reads within one millisecond still differ.
        now_ms = self._last_ms = max(int(time.time() * 1000), self._last_ms + 1)
        image = self._words[table]
        end = address + count
        for tag in self._tags.get(table, ()):
            if tag.address < end and tag.end > address:
                tag.update(image, now_ms)
        return [image[a] for a in range(address, end)]


_WIDTH = {"uint16": 1, "int16": 1, "int32": 2, "uint32": 2, "float32": 2, "uint64": 4, "bits": 1}
_UNITS = {
    "uint16": ("rpm", 1.0),
    "int16": ("°C", 0.1),
    "int32": ("mm", 0.001),
    "uint32": ("parts", 1.0),
    "float32": ("bar", 1.0),
    "uint64": ("ms", 1.0),
}
_ORDERS_16 = (ByteOrder.ABCD, ByteOrder.BADC)
_ORDERS_32 = (ByteOrder.ABCD, ByteOrder.CDAB, ByteOrder.BADC, ByteOrder.DCBA)
_ORDERS_64 = (ByteOrder.ABCDEFGH, ByteOrder.GHEFCDAB)


def bench_device(
    unit_id: int, tags: int = 100, seed: int = 0
) -> tuple[RegisterMapDevice, list[dict[str, object]]]:
    """A device with ``tags`` values of mixed types, and the tag configs that read them.

    Tags are laid out mostly back to back with a few small gaps (served, so requests may span
    them), about four fifths in holding registers and the rest in input registers. The dicts
    follow the YAML tag schema with ``zero_based`` addressing. Every value changes on every
    read of the device.
    """
    rng = random.Random(seed)  # noqa: S311 - a reproducible layout, not a secret
    kinds = ["uint16", "int16", "int32", "uint32", "float32", "uint64", "bits"]
    weights = [30, 20, 15, 8, 15, 2, 10]
    layout: dict[Table, list[_BenchTag]] = {Table.HOLDING: [], Table.INPUT: []}
    configs: list[dict[str, object]] = []
    cursor = {Table.HOLDING: 0, Table.INPUT: 0}
    n_holding = max(1, round(tags * 0.8))
    i = 0
    while i < tags:
        table = Table.HOLDING if i < n_holding else Table.INPUT
        if rng.random() < 0.08:
            cursor[table] += rng.randint(1, 3)
        kind = rng.choices(kinds, weights)[0]
        address = cursor[table]
        cursor[table] += _WIDTH[kind]
        if kind == "bits":
            bits = sorted(rng.sample(range(16), min(rng.randint(1, 4), tags - i)))
            layout[table].append(_BenchTag(address, kind, ByteOrder.ABCD, 0, 0))
            for bit in bits:
                configs.append(
                    {
                        "name": f"t{i:03d}_bit",
                        "table": table.value,
                        "address": address,
                        "type": "bit",
                        "bit": bit,
                        "order": "ABCD",
                        "unit": None,
                        "scale": 1.0,
                    }
                )
                i += 1
            continue
        if kind in ("uint16", "int16"):
            order = rng.choice(_ORDERS_16)
        elif kind == "uint64":
            order = rng.choice(_ORDERS_64)
        else:
            order = rng.choice(_ORDERS_32)
        if kind == "uint16":
            base = rng.randint(0, 60000)
        elif kind == "int16":
            base = rng.randint(-500, 500)
        else:
            base = rng.randint(0, 1000)
        # Odd steps below the wrap-around make every read produce a different value.
        step = rng.randrange(1, 999, 2)
        layout[table].append(_BenchTag(address, kind, order, base, step))
        unit, scale = _UNITS[kind]
        configs.append(
            {
                "name": f"t{i:03d}_{kind}",
                "table": table.value,
                "address": address,
                "type": kind,
                "order": order.value,
                "unit": unit,
                "scale": scale,
            }
        )
        i += 1
    return _BenchDevice(unit_id, layout), configs

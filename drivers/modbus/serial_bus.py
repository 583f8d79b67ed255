"""One owner per serial line: strictly one transaction at a time, and silence between them.

Pure asyncio: the link (a pymodbus client behind ``drivers.modbus.transport``) is handed in,
so this module knows nothing of pymodbus.

Every device on an RS-485 bus (or behind one serial device server) shares the wire. A
:class:`PortOwner` serialises their transactions through one FIFO ``asyncio.Lock`` (fair: a
device waits behind at most one transaction of each other device), and keeps the line quiet
for t3.5 plus the device's ``turnaround_gap`` after every transaction, so slaves see the end
of one frame before the next begins (Modbus over Serial Line v1.02 §2.5.1.1).

Drivers get the owner of their line from :func:`attach` in ``connect()`` and give it back with
:meth:`PortOwner.detach` in ``close()``; the link is opened by the first device to attach and
closed when the last one detaches. A link that dropped is reopened inside the next transaction,
so one device's failure costs the others nothing but that reopen.

The silence is timed from the end of the answer on the line (the link's ``rx_at``), not from
when the awaiting coroutine resumed, and waited for with a timer that wakes the loop to tens of
microseconds (:func:`sleep_until`): at 115200 baud t3.5 is 1.75 ms of a 5 ms transaction, and
asyncio's own sleep, woken by epoll in whole milliseconds, made it about 2.3 ms.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import os
import sys
import time
import weakref
from collections.abc import Awaitable, Callable, Hashable
from typing import Protocol, TypeVar

__all__ = ["Link", "PortOwner", "attach", "char_time", "clock", "owners", "silence", "sleep_until"]

T = TypeVar("T")

#: The clock of every instant here and of a link's ``rx_at``: CLOCK_MONOTONIC on Linux (the
#: clock the timerfd below is armed on, and the one asyncio's loop.time() reads).
clock = time.monotonic

#: The last stretch of a wait is spun on :data:`clock` instead of slept. A timerfd wakes the
#: loop 50-150 µs late, and on a busy machine often much later; at 115200 baud every 50 µs is 1%
#: of the bus. The spin blocks the event loop (other lines, the sinks), hence this bound: at most
#: 0.25 ms per transaction, in practice less (the wake-up's own lateness, and the building of
#: the request, come off it), so a few % of one core on a saturated 115200-baud line and
#: nothing on a quiet one. Where the link can hold the request (``Link.hold_send``), the spin
#: happens there, just before the frame is written, instead of here.
SPIN = 0.00025


class Link(Protocol):
    """What the owner needs of the shared transport."""

    @property
    def connected(self) -> bool: ...

    @property
    def rx_at(self) -> float | None:
        """:data:`clock` when bytes last arrived from the line; ``None`` if not tracked."""
        ...

    @property
    def tx_at(self) -> float | None:
        """:data:`clock` when the last request was handed to the line; ``None`` if not tracked."""
        ...

    def hold_send(self, until: float) -> bool:
        """Write the next request no earlier than ``until`` (spinning for at most :data:`SPIN`).

        False if the link cannot: then the owner waits out the whole silence itself.
        """
        ...

    async def connect(self) -> None: ...

    async def close(self) -> None: ...


def char_time(baudrate: int, bits_per_char: int = 11) -> float:
    """Seconds one character takes on the wire (RTU: start + 8 data + parity/stop + stop)."""
    return bits_per_char / baudrate


class _TimerFd:
    """Linux timerfd through libc: a file descriptor that becomes readable at an instant.

    The event loop's selector sleeps in epoll, whose timeout is whole milliseconds rounded up,
    so ``asyncio.sleep(0.00175)`` returns after 2 ms or more. A timerfd armed on
    CLOCK_MONOTONIC wakes that same epoll at the instant asked, to the kernel's timer slack.
    (ctypes: ``os.timerfd_create`` only exists from Python 3.13.)
    """

    class _Timespec(ctypes.Structure):
        # time_t is a long in the ABI of the plain (not *_time64) symbols, on 32 and 64 bits.
        _fields_ = (("tv_sec", ctypes.c_long), ("tv_nsec", ctypes.c_long))

    class _Itimerspec(ctypes.Structure):
        pass

    _Itimerspec._fields_ = (("it_interval", _Timespec), ("it_value", _Timespec))

    CLOCK_MONOTONIC = 1
    TFD_TIMER_ABSTIME = 1
    TFD_NONBLOCK = 0o4000
    TFD_CLOEXEC = 0o2000000

    def __init__(self) -> None:
        libc = ctypes.CDLL(None, use_errno=True)
        self._create = libc.timerfd_create
        self._create.argtypes = (ctypes.c_int, ctypes.c_int)
        self._create.restype = ctypes.c_int
        self._settime = libc.timerfd_settime
        self._settime.argtypes = (
            ctypes.c_int,
            ctypes.c_int,
            ctypes.POINTER(self._Itimerspec),
            ctypes.c_void_p,
        )
        self._settime.restype = ctypes.c_int

    async def wait(self, at: float) -> bool:
        """Wait until ``clock() >= at``; False (at once) if no timer could be armed."""
        fd = self._create(self.CLOCK_MONOTONIC, self.TFD_NONBLOCK | self.TFD_CLOEXEC)
        if fd < 0:
            return False
        try:
            sec = int(at)
            value = self._Timespec(sec, min(999_999_999, int((at - sec) * 1e9)))
            spec = self._Itimerspec(self._Timespec(0, 0), value)
            if self._settime(fd, self.TFD_TIMER_ABSTIME, ctypes.byref(spec), None) != 0:
                return False
            loop = asyncio.get_running_loop()
            fired = loop.create_future()
            loop.add_reader(fd, _set_done, fired)
            try:
                await fired
            finally:
                loop.remove_reader(fd)
        finally:
            os.close(fd)
        return True


def _set_done(fut: asyncio.Future[None]) -> None:
    if not fut.done():
        fut.set_result(None)


def _make_timer() -> _TimerFd | None:
    # The monotonic clock must be the timerfd's: clock_gettime(CLOCK_MONOTONIC) on Linux.
    if not sys.platform.startswith("linux"):
        return None
    if time.get_clock_info("monotonic").implementation != "clock_gettime(CLOCK_MONOTONIC)":
        return None
    try:
        return _TimerFd()
    except (OSError, AttributeError):
        return None


_TIMER = _make_timer()


async def sleep_until(deadline: float, *, spin: bool = True) -> None:
    """Return when :data:`clock` reaches ``deadline``: never before, usually within 0.05 ms.

    A timerfd wakes the loop :data:`SPIN` before the deadline and the rest is spun (with
    ``spin=False``, returns then: up to SPIN early, for a caller that spins later itself).
    Without a timerfd (not Linux, or a loop with no ``add_reader``), ``asyncio.sleep``: never
    early either, only late by up to a millisecond.
    """
    for _ in range(4):  # one timer wait, then one spin; the rest is belt and braces
        remaining = deadline - clock()
        if remaining <= 0 or (not spin and remaining <= SPIN):
            return
        if remaining <= SPIN:
            while clock() < deadline:  # at most SPIN: see there
                pass
            return
        armed = False
        if _TIMER is not None:
            with contextlib.suppress(NotImplementedError):  # a loop without add_reader
                armed = await _TIMER.wait(deadline - SPIN)
        if not armed:
            await asyncio.sleep(remaining)
    # Not reached: each round above ends at the deadline or SPIN before it.
    await asyncio.sleep(max(0.0, deadline - clock()) + 1e-6)


def silence(baudrate: int | None) -> float:
    """The inter-frame silence t3.5; ``None`` (no serial line of ours) is none at all.

    Above 19200 baud the standard fixes it at 1.75 ms, since 3.5 characters would be shorter
    than most UARTs and operating systems can time.
    """
    if baudrate is None:
        return 0.0
    if baudrate > 19200:
        return 0.00175
    return 3.5 * char_time(baudrate)


class PortOwner:
    """The one owner of one serial line (a port, or one serial device server)."""

    def __init__(self, key: Hashable, link: Link, *, silence: float, settings: object) -> None:
        self.key = key
        self.link = link
        self.silence = silence
        self.settings = settings
        self.refs = 0
        self._lock = asyncio.Lock()
        #: :data:`clock` when the last frame on the line ended, and how long the line must
        #: then stay quiet (t3.5 plus that transaction's gap).
        self._last_end: float | None = None
        self._after = 0.0
        # Instruments, read by the tests and useful on a status page.
        self.transactions = 0
        self.in_flight = 0
        self.max_in_flight = 0
        #: Silence before the latest transaction and the shortest one so far: from the end of
        #: the frame before (as seen by us: the answer's last bytes, or the failure) to the
        #: start of the transaction, before its request is built, so the wire's is longer.
        self.last_gap: float | None = None
        self.min_gap: float | None = None
        #: Worst time one transaction of each attached device may hold the line, by name.
        self.holds: dict[str, float] = {}

    def __repr__(self) -> str:
        return f"PortOwner({self.key!r}, refs={self.refs})"

    def wait_allowance(self, name: str) -> float:
        """Longest a transaction of ``name`` may wait for the others, each holding it once."""
        return sum(hold for who, hold in self.holds.items() if who != name)

    async def transaction(self, fn: Callable[[], Awaitable[T]], *, gap: float = 0.0) -> T:
        """Run ``fn`` (one request and its answer) alone on the line, then keep it quiet.

        ``gap`` is extra silence after this transaction on top of t3.5 (a slow slave's
        turnaround). A dropped link is reopened first; its errors reach the caller.
        """
        async with self._lock:
            if not self.link.connected:
                await self.link.connect()
            await self._keep_quiet()
            start = clock()
            before = self._last_end
            self.in_flight += 1
            self.max_in_flight = max(self.max_in_flight, self.in_flight)
            answered = False
            try:
                result = await fn()
                answered = True
                return result
            finally:
                self.in_flight -= 1
                self.transactions += 1
                end = clock()
                if before is not None:
                    tx = self.link.tx_at
                    since = (tx if tx is not None and tx >= start else start) - before
                    self.last_gap = since
                    self.min_gap = since if self.min_gap is None else min(self.min_gap, since)
                rx = self.link.rx_at
                if answered and rx is not None and start <= rx <= end:
                    # A slave answers only after the request has ended, so its answer was the
                    # last frame on the line: the silence runs from its last bytes, not from
                    # when we got round to noticing (pymodbus's decoding and our wake-up,
                    # 0.1-0.3 ms). Anything else (a timeout, an error) counts from now.
                    end = rx
                self._last_end = end
                self._after = self.silence + gap

    async def _keep_quiet(self) -> None:
        """Wait until the line has been quiet for t3.5 (plus the gap) since the last frame.

        A link that can hold its next request until the deadline gets the line up to
        :data:`SPIN` early, so building the request overlaps the end of the silence.
        """
        if self._last_end is None:
            return
        for _ in range(8):  # bounded: a line that never stops talking is not waited out
            rx = self.link.rx_at
            if rx is not None and rx > self._last_end:
                # Bytes after the last transaction (a late answer, noise): their end counts.
                self._last_end = rx
            deadline = self._last_end + self._after
            if clock() >= deadline:
                return
            held = self.link.hold_send(deadline)
            await sleep_until(deadline, spin=not held)
            rx = self.link.rx_at
            if rx is None or rx <= self._last_end:
                return

    async def _attach(self, name: str, hold: float) -> None:
        self.refs += 1
        self.holds[name] = hold
        try:
            async with self._lock:
                if not self.link.connected:
                    await self.link.connect()
        except BaseException:
            await self.detach(name)
            raise

    async def detach(self, name: str) -> None:
        """Give back one device's share; the last one out closes the link."""
        self.holds.pop(name, None)
        self.refs -= 1
        if self.refs > 0:
            return
        registry = _registry()
        if registry.get(self.key) is self:
            del registry[self.key]
        # No lock: nobody else holds a share, and a transaction cancelled mid-way has
        # already released it.
        await self.link.close()


_OWNERS: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, dict[Hashable, PortOwner]] = (
    weakref.WeakKeyDictionary()
)


def _registry() -> dict[Hashable, PortOwner]:
    # Per event loop: a port is owned by the loop that polls it, and each test has its own.
    return _OWNERS.setdefault(asyncio.get_running_loop(), {})


def owners() -> dict[Hashable, PortOwner]:
    """The owners of the running loop, by key (a copy)."""
    return dict(_registry())


async def attach(
    key: Hashable,
    make_link: Callable[[], Link],
    *,
    name: str,
    hold: float,
    baudrate: int | None,
    settings: object = None,
) -> PortOwner:
    """The owner of line ``key``, created (with ``make_link()``) on first use, link open.

    ``name`` is the attaching device and ``hold`` the longest one transaction of it may take
    (so that the others can budget for waiting behind it). ``settings`` must equal those of
    the devices already attached: two line settings on one port is a config error that the
    config check reports first.
    """
    registry = _registry()
    owner = registry.get(key)
    if owner is None:
        owner = PortOwner(key, make_link(), silence=silence(baudrate), settings=settings)
        registry[key] = owner
    elif owner.settings != settings:
        raise ValueError(f"{name}: {key} is open with {owner.settings}, not {settings}")
    await owner._attach(name, hold)
    return owner

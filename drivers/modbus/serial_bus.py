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
"""

from __future__ import annotations

import asyncio
import weakref
from collections.abc import Awaitable, Callable, Hashable
from typing import Protocol, TypeVar

__all__ = ["Link", "PortOwner", "attach", "char_time", "owners", "silence"]

T = TypeVar("T")


class Link(Protocol):
    """What the owner needs of the shared transport."""

    @property
    def connected(self) -> bool: ...

    async def connect(self) -> None: ...

    async def close(self) -> None: ...


def char_time(baudrate: int, bits_per_char: int = 11) -> float:
    """Seconds one character takes on the wire (RTU: start + 8 data + parity/stop + stop)."""
    return bits_per_char / baudrate


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
        self._quiet_until = 0.0
        self._last_end: float | None = None
        # Instruments, read by the tests and useful on a status page.
        self.transactions = 0
        self.in_flight = 0
        self.max_in_flight = 0
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
        loop = asyncio.get_running_loop()
        async with self._lock:
            wait = self._quiet_until - loop.time()
            if wait > 0:
                await asyncio.sleep(wait)
            if not self.link.connected:
                await self.link.connect()
            start = loop.time()
            if self._last_end is not None:
                since = start - self._last_end
                self.min_gap = since if self.min_gap is None else min(self.min_gap, since)
            self.in_flight += 1
            self.max_in_flight = max(self.max_in_flight, self.in_flight)
            try:
                return await fn()
            finally:
                self.in_flight -= 1
                self.transactions += 1
                end = loop.time()
                self._last_end = end
                self._quiet_until = end + self.silence + gap

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

"""Is the wall clock right yet, and did it jump? Timestamps on boxes without an RTC (issue #5).

A Raspberry Pi has no battery-backed clock: it boots at the last saved time (fake-hwclock,
systemd-timesyncd's clock file) or at 1970, and is stepped to the real time when NTP first
answers, seconds to hours later. Readings stamped before that carry a wrong ``source_ts``.
This module tells the runtime two things, cheaply enough to ask every second:

- **Synchronized?** From the kernel's NTP state (``adjtimex(2)`` with ``modes = 0``, read-only,
  no privileges), the same source ``timedatectl`` reads. ``timedatectl`` itself is asked only
  if ``adjtimex`` cannot be called, and only once, at start-up, bounded by a timeout: a
  subprocess never runs on the hot path. Otherwise the answer is ``None`` (unknown).
- **Stepped?** The offset ``wall - monotonic`` is constant while nobody sets the clock and
  drifts by at most 0.5 ms/s while NTP slews it; when it moves by more than a threshold between
  two checks, the clock was stepped by that much. Each step is kept (bounded) so that a
  timestamp taken before it can be corrected: ``t + delta``.

Meant to be wired like this (not done here; the runtime and the MQTT sink own that)::

    watch = ClockWatch()              # before the loop starts: may run timedatectl once
    # a task in the runtime, every second:
    watch.check()                     # -> Step | None; logs steps and sync changes
    # the runner, per poll, right next to ts = self._wall():
    mono = time.monotonic()           # the same monotonic clock the watch samples
    clock_synced = watch.synced       # stamped on the poll's readings
    # the MQTT outbox, when it finally publishes a buffered message:
    ts = watch.rebase(ts, mono)       # the source timestamp as the current clock counts it
    # the status page:
    watch.as_dict()

Rebasing assumes the clock after a step is the right one, which is what NTP's first step on a
box without an RTC means. A box that has no NTP daemon reports unsynchronized forever, even if
a battery-backed RTC keeps it right: nothing has vouched for the time.

This module imports nothing of ours.
"""

from __future__ import annotations

import ctypes
import functools
import logging
import math
import shutil
import subprocess
import sys
import time
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, NamedTuple

__all__ = [
    "STA_UNSYNC",
    "TIME_ERROR",
    "ClockWatch",
    "Step",
    "SyncSource",
    "Timex",
    "probe_sync_source",
    "read_adjtimex",
    "rebase",
    "timedatectl_synced",
]

log = logging.getLogger("gateway.clock")

#: ``status`` bit: the clock is not disciplined by a time source.
STA_UNSYNC = 0x0040
#: ``adjtimex()`` return value for an unsynchronized clock (or a PPS fault).
TIME_ERROR = 5
#: The kernel caps ``maxerror`` here (NTP_PHASE_LIMIT, 16 s in microseconds) and starts there.
MAXERROR_UNSYNC_US = 16_000_000


class _Timeval(ctypes.Structure):
    _fields_ = (("tv_sec", ctypes.c_long), ("tv_usec", ctypes.c_long))


class _Timex(ctypes.Structure):
    # ``struct timex`` as glibc and musl declare it for the plain ``adjtimex`` symbol: every
    # field is a C long or int, so ctypes gets it right on 64-bit and on 32-bit ARM alike (the
    # time64 variant there is a different symbol). The tail is oversized on purpose: the
    # kernel writes the whole structure, and a too-short buffer would be corrupted memory.
    _fields_ = (
        ("modes", ctypes.c_uint),
        ("offset", ctypes.c_long),
        ("freq", ctypes.c_long),
        ("maxerror", ctypes.c_long),
        ("esterror", ctypes.c_long),
        ("status", ctypes.c_int),
        ("constant", ctypes.c_long),
        ("precision", ctypes.c_long),
        ("tolerance", ctypes.c_long),
        ("time", _Timeval),
        ("tick", ctypes.c_long),
        ("ppsfreq", ctypes.c_long),
        ("jitter", ctypes.c_long),
        ("shift", ctypes.c_int),
        ("stabil", ctypes.c_long),
        ("jitcnt", ctypes.c_long),
        ("calcnt", ctypes.c_long),
        ("errcnt", ctypes.c_long),
        ("stbcnt", ctypes.c_long),
        ("tai", ctypes.c_int),
        ("_reserved", ctypes.c_byte * 256),
    )


class Timex(NamedTuple):
    """What ``adjtimex()`` said about the clock."""

    #: The return value: TIME_OK (0) … TIME_ERROR (5).
    state: int
    status: int
    maxerror_us: int
    esterror_us: int

    @property
    def synced(self) -> bool:
        # maxerror, not STA_UNSYNC or TIME_ERROR: chrony on Linux leaves STA_UNSYNC set unless
        # `rtcsync` is configured (so the kernel does not write the RTC), while every NTP
        # client lowers maxerror when it disciplines the clock and the kernel raises it back to
        # 16 s within hours once nobody does. systemd's NTPSynchronized is this same test.
        return self.maxerror_us < MAXERROR_UNSYNC_US


@functools.cache
def _adjtimex_function() -> Any:
    if not sys.platform.startswith("linux"):
        return None
    try:
        fn = ctypes.CDLL(None, use_errno=True).adjtimex
    except (OSError, AttributeError):
        return None
    fn.argtypes = (ctypes.POINTER(_Timex),)
    fn.restype = ctypes.c_int
    return fn


def read_adjtimex() -> Timex | None:
    """The kernel's NTP state, read-only; ``None`` where ``adjtimex`` cannot be called."""
    fn = _adjtimex_function()
    if fn is None:
        return None
    tx = _Timex()  # modes = 0: read, change nothing, need no capability
    state = int(fn(ctypes.byref(tx)))
    if state < 0:  # a seccomp filter refusing the call, for instance
        return None
    return Timex(state, int(tx.status), int(tx.maxerror), int(tx.esterror))


def timedatectl_synced(timeout: float = 2.0) -> bool | None:
    """``timedatectl show -p NTPSynchronized``, or ``None`` if it cannot say within ``timeout``.

    Blocks for up to ``timeout`` seconds: call it at start-up, never from the event loop.
    """
    exe = shutil.which("timedatectl")
    if exe is None:
        return None
    try:
        done = subprocess.run(  # noqa: S603 - fixed argv from PATH, no shell
            [exe, "show", "-p", "NTPSynchronized", "--value"],
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    if done.returncode != 0:  # no systemd (a container), or timedated not reachable
        return None
    return {"yes": True, "no": False}.get(done.stdout.strip())


@dataclass(frozen=True, slots=True)
class SyncSource:
    """Where ``synced`` comes from: ``read()`` is called on every check, so it must be cheap."""

    name: str
    read: Callable[[], bool | None]
    #: False for a start-up snapshot (timedatectl): a clock step makes it stale.
    live: bool = True


def probe_sync_source(
    *,
    adjtimex: Callable[[], Timex | None] = read_adjtimex,
    timedatectl: Callable[[], bool | None] = timedatectl_synced,
) -> SyncSource:
    """Pick adjtimex, else a one-off timedatectl answer, else unknown. May block (timedatectl)."""
    if adjtimex() is not None:

        def live() -> bool | None:
            tx = adjtimex()
            return None if tx is None else tx.synced

        return SyncSource("adjtimex", live)
    answer = timedatectl()
    if answer is not None:
        return SyncSource("timedatectl", lambda: answer, live=False)
    return SyncSource("unknown", lambda: None)


@dataclass(frozen=True, slots=True)
class Step:
    """The clock was stepped between two checks: ``wall - monotonic`` moved by ``delta``."""

    #: Monotonic time of the last check before the step and of the check that saw it.
    mono_before: float
    mono_after: float
    #: ``wall - monotonic`` at those two checks.
    offset_before: float
    offset_after: float
    #: Wall time (the new clock) at the check that saw it.
    at: float

    @property
    def delta(self) -> float:
        return self.offset_after - self.offset_before

    def precedes(self, ts: float, mono: float) -> bool:
        """Whether the sample ``(ts, mono)`` was taken before this step (so needs ``+delta``)."""
        if mono <= self.mono_before:
            return True
        if mono >= self.mono_after:
            return False
        # Taken between the two checks: its own offset says which side of the step it saw.
        offset = ts - mono
        return abs(offset - self.offset_before) <= abs(offset - self.offset_after)


def rebase(ts: float, mono: float, steps: Iterable[Step]) -> float:
    """The wall time ``ts`` (taken at monotonic ``mono``) as the clock after ``steps`` counts it."""
    return ts + sum(step.delta for step in steps if step.precedes(ts, mono))


class ClockWatch:
    """Watches the wall clock for synchronisation and steps; call :meth:`check` every second.

    ``wall`` and ``mono`` must be the clocks the runner stamps samples with. (CLOCK_MONOTONIC
    stops during suspend, which would look like a forward step; a gateway does not suspend.)
    """

    def __init__(
        self,
        source: SyncSource | None = None,
        *,
        wall: Callable[[], float] = time.time,
        mono: Callable[[], float] = time.monotonic,
        threshold: float = 1.0,
        max_steps: int = 64,
        max_offsets: int = 120,
    ) -> None:
        if not threshold > 0:
            raise ValueError(f"threshold must be positive, got {threshold}")
        if max_steps < 1 or max_offsets < 1:
            raise ValueError("max_steps and max_offsets must be at least 1")
        self.source = source if source is not None else probe_sync_source()
        self.threshold = threshold
        self._wall = wall
        self._mono = mono
        self._steps: deque[Step] = deque(maxlen=max_steps)
        #: (monotonic, wall - monotonic) per check, newest last.
        self._offsets: deque[tuple[float, float]] = deque(maxlen=max_offsets)
        #: Samples older than this may need steps that were dropped from the history.
        self._horizon = -math.inf
        self._snapshot_stale = False
        self.step_count = 0
        self.synced: bool | None = self.source.read()
        self._sample()

    def _sample(self) -> tuple[float, float]:
        wall = self._wall()
        mono = self._mono()
        self._offsets.append((mono, wall - mono))
        return wall, mono

    def check(self) -> Step | None:
        """Sample the clocks and the sync state; return the step seen since the last check."""
        mono_before, offset_before = self._offsets[-1]
        wall, mono = self._sample()
        offset = wall - mono
        step: Step | None = None
        if abs(offset - offset_before) > self.threshold:
            step = Step(mono_before, mono, offset_before, offset, wall)
            if len(self._steps) == self._steps.maxlen:
                self._horizon = self._steps[0].mono_after
            self._steps.append(step)
            self.step_count += 1
            if not self.source.live:
                self._snapshot_stale = True
            log.warning(
                "system clock stepped by %+.3f s (synchronized: %s)", step.delta, self.synced
            )
        synced = None if self._snapshot_stale else self.source.read()
        if synced != self.synced:
            log.info("system clock synchronized: %s -> %s", self.synced, synced)
            self.synced = synced
        return step

    @property
    def steps(self) -> tuple[Step, ...]:
        """The retained steps, oldest first."""
        return tuple(self._steps)

    @property
    def offsets(self) -> tuple[tuple[float, float], ...]:
        """Recent ``(monotonic, wall - monotonic)`` samples, oldest first."""
        return tuple(self._offsets)

    @property
    def last_step(self) -> Step | None:
        return self._steps[-1] if self._steps else None

    @property
    def last_step_s(self) -> float | None:
        return None if not self._steps else self._steps[-1].delta

    def rebase(self, ts: float, mono: float) -> float:
        """``ts`` corrected by every retained step taken after it; see :meth:`covers`."""
        return rebase(ts, mono, self._steps)

    def covers(self, mono: float) -> bool:
        """Whether the history still holds every step that could apply to a sample at ``mono``."""
        return mono >= self._horizon

    def as_dict(self) -> dict[str, Any]:
        last = self.last_step
        return {
            "synced": self.synced,
            "source": self.source.name,
            "steps": self.step_count,
            "last_step_s": None if last is None else last.delta,
            "last_step_at": None if last is None else last.at,
        }

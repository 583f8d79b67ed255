"""systemd's service protocol, stdlib only: ``sd_notify`` and the watchdog.

With ``Type=notify`` systemd passes ``$NOTIFY_SOCKET`` (a path, or ``@name`` for an abstract
socket) and waits for ``READY=1`` before it calls the unit started; with ``WatchdogSec=`` it
passes ``$WATCHDOG_USEC`` (and ``$WATCHDOG_PID``) and restarts the service when no
``WATCHDOG=1`` arrives within that time. Without ``$NOTIFY_SOCKET`` (a terminal, a container,
a test) every call here does nothing.

The watchdog is pinged by a task on the gateway's own event loop rather than a thread: a
thread would keep pinging while the loop hangs, which is the one failure it must catch.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import time
from collections.abc import Mapping

__all__ = ["Notifier", "format_message", "watchdog_interval"]

log = logging.getLogger("gateway.systemd")


def format_message(fields: Mapping[str, str | int]) -> bytes:
    """``KEY=value`` lines, as sd_notify(3) reads them.

    A newline inside a value would start a new assignment, so it is flattened to a space.
    """
    lines = []
    for key, value in fields.items():
        if not key or "=" in key or "\n" in key:
            raise ValueError(f"not a notify key: {key!r}")
        text = str(value).replace("\r", " ").replace("\n", " ")
        lines.append(f"{key}={text}\n")
    return "".join(lines).encode("utf-8")


def watchdog_interval(env: Mapping[str, str], pid: int | None = None) -> float | None:
    """Seconds between pings (half of ``$WATCHDOG_USEC``, as sd_watchdog_enabled(3) advises),
    or None when no watchdog is asked of this process."""
    raw = env.get("WATCHDOG_USEC", "")
    try:
        usec = int(raw)
    except ValueError:
        return None
    if usec <= 0:
        return None
    owner = env.get("WATCHDOG_PID", "")
    if owner:
        # Set by systemd for the main process only; a child that inherited it must not ping.
        try:
            if int(owner) != (os.getpid() if pid is None else pid):
                return None
        except ValueError:
            return None
    return usec / 2 / 1_000_000


def _address(raw: str) -> str | None:
    if not raw:
        return None
    if raw.startswith("@"):
        # Linux abstract namespace: a leading NUL instead of a file.
        return "\0" + raw[1:]
    if raw.startswith("/"):
        return raw
    # vsock: and other schemes are not used on our targets.
    log.warning("NOTIFY_SOCKET=%r is not a unix socket path; systemd is not notified", raw)
    return None


class Notifier:
    """Sends notifications to systemd; a no-op when the process was not started by it."""

    def __init__(self, address: str | None, watchdog: float | None = None) -> None:
        self.address = _address(address or "")
        self.watchdog = watchdog if self.address is not None else None
        self._warned = False

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> Notifier:
        env = os.environ if env is None else env
        return cls(env.get("NOTIFY_SOCKET"), watchdog_interval(env))

    @property
    def enabled(self) -> bool:
        return self.address is not None

    def send(self, **fields: str | int) -> bool:
        """One datagram; True if it was sent. Never blocks and never raises: systemd being
        away or slow must not stop the gateway."""
        if self.address is None:
            return False
        data = format_message(fields)
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
                sock.setblocking(False)
                sock.sendto(data, self.address)
        except OSError as exc:
            if not self._warned:
                self._warned = True
                log.warning("cannot notify systemd at %r: %s", self.address, exc)
            return False
        return True

    def ready(self, status: str) -> bool:
        return self.send(READY=1, STATUS=status)

    def status(self, status: str) -> bool:
        return self.send(STATUS=status)

    def stopping(self, status: str = "stopping") -> bool:
        return self.send(STOPPING=1, STATUS=status)

    def reloading(self, status: str = "reloading the config") -> bool:
        # MONOTONIC_USEC lets Type=notify-reload (systemd 253+) tell this reload from an
        # earlier one; older systemd ignores it.
        usec = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        return self.send(RELOADING=1, MONOTONIC_USEC=usec, STATUS=status)

    async def run_watchdog(self, quit_: asyncio.Event) -> None:
        """Ping every ``watchdog`` seconds until ``quit_`` is set; returns at once without a
        watchdog."""
        interval = self.watchdog
        if interval is None:
            return
        log.info("systemd watchdog: pinging every %.3g s", interval)
        while not quit_.is_set():
            self.send(WATCHDOG=1)
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(interval):
                    await quit_.wait()

"""USB serial adapters' latency timer: read it, lower it to 1 ms where Linux lets us, report.

FTDI-style USB-to-RS-485 adapters hold received bytes for up to ``latency_timer`` ms (16 by
default) before handing them to the host, unless their buffer fills. Every Modbus reply is
short, so every transaction waits out the timer: a bus is capped near 50-60 transactions/s
whatever its baud rate. The Linux ftdi_sio driver exposes the timer as
``/sys/class/tty/<tty>/device/latency_timer``; root (or a udev rule) can set it to 1 ms.

A USB adapter that is unplugged and plugged in again comes back with the default, so this is
applied every time the port is opened, not once. Stdlib only, shared by the serial drivers.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

__all__ = ["UDEV_HINT", "LatencyTimer", "tune_latency_timer"]

log = logging.getLogger("drivers.serial")

#: What the README and the warning tell a technician to do when the gateway may not write it.
UDEV_HINT = (
    'a udev rule: ACTION=="add", SUBSYSTEM=="usb-serial", DRIVER=="ftdi_sio", '
    'ATTR{latency_timer}="1"'
)


@dataclass(frozen=True, slots=True)
class LatencyTimer:
    """What we found on one port, and what we did about it."""

    port: str
    #: The sysfs file, or None when the port has no latency timer (not an FTDI-style adapter).
    path: str | None
    before_ms: int | None
    after_ms: int | None
    #: False when the timer stays above the target: the page shows it as a warning.
    ok: bool
    note: str

    def as_dict(self) -> dict[str, object]:
        return {
            "latency_timer_ms": self.after_ms,
            "latency_timer_ok": self.ok,
            "latency_timer_note": self.note,
        }


#: The last note logged per port: a port that reopens every few seconds (a dead bus, with
#: the breaker probing) must not repeat the same warning each time.
_logged: dict[str, str] = {}


def _log_once(level: int, port: str, note: str) -> None:
    if _logged.get(port) != note:
        _logged[port] = note
        log.log(level, "serial port %s: latency timer %s", port, note)


def _sysfs_file(port: str, sys_root: Path) -> Path:
    # /dev/serial/by-id/... and udev symlinks point at the real ttyUSBn.
    tty = Path(os.path.realpath(port)).name
    return sys_root / "class" / "tty" / tty / "device" / "latency_timer"


def tune_latency_timer(
    port: str, *, target_ms: int = 1, sys_root: Path = Path("/sys")
) -> LatencyTimer:
    """Lower ``port``'s latency timer to ``target_ms`` if it is higher; never raises."""
    path = _sysfs_file(port, sys_root)
    try:
        before = int(path.read_text().strip())
    except FileNotFoundError:
        return LatencyTimer(
            port, None, None, None, True, "no latency timer (not an FTDI-style USB adapter)"
        )
    except (OSError, ValueError) as exc:
        return LatencyTimer(port, str(path), None, None, False, f"cannot read {path}: {exc}")
    if before <= target_ms:
        return LatencyTimer(port, str(path), before, before, True, f"{before} ms")
    try:
        path.write_text(f"{target_ms}\n")
        after = int(path.read_text().strip())
    except (OSError, ValueError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        note = (
            f"{before} ms and cannot be lowered ({reason}): replies wait up to {before} ms, "
            f"about {1000 // before} transactions/s at most; set it to {target_ms} ms "
            f"with {UDEV_HINT}"
        )
        _log_once(logging.WARNING, port, "is " + note)
        return LatencyTimer(port, str(path), before, before, False, note)
    ok = after <= target_ms
    note = f"{after} ms (lowered from {before} ms)" if ok else f"{after} ms (wrote {target_ms})"
    _log_once(logging.INFO, port, note)
    return LatencyTimer(port, str(path), before, after, ok, note)

"""socat pty pairs for serial tests: a real serial line with no hardware.

A pty ignores the baud rate and refuses parity, so serial tests run 8N1 and simulators pace
their own bytes where timing matters.
"""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

__all__ = ["SOCAT", "PtyPair"]

SOCAT = "/usr/bin/socat"


class PtyPair:
    """Two linked ptys from socat: ``a`` for the gateway, ``b`` for the simulated slaves."""

    def __init__(self, where: Path) -> None:
        self.a = str(where / "a")
        self.b = str(where / "b")
        self._proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        # Popen, not asyncio's subprocess: that one starts a child-watcher thread.
        self._proc = subprocess.Popen(
            [SOCAT, "pty,raw,echo=0,link=" + self.a, "pty,raw,echo=0,link=" + self.b],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 5
        while not (Path(self.a).exists() and Path(self.b).exists()):
            if time.monotonic() > deadline or self._proc.poll() is not None:
                self.stop()
                raise RuntimeError("socat did not create the pty pair")
            time.sleep(0.01)

    def stop(self) -> None:
        proc, self._proc = self._proc, None
        if proc is None:
            return
        proc.terminate()
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=5)
        # socat removes its links on exit; wait so that a restart cannot race the removal.
        for _ in range(100):
            if not (Path(self.a).exists() or Path(self.b).exists()):
                break
            time.sleep(0.01)

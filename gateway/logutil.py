"""Log once when something breaks and once when it recovers; count in between."""

from __future__ import annotations

import logging

__all__ = ["OnceLogger"]


class OnceLogger:
    """Home Assistant's rule: a flapping device must not flood the journal of an SD card."""

    def __init__(self, log: logging.Logger, what: str) -> None:
        self._log = log
        self._what = what
        self.failing = False
        self.suppressed = 0

    def failed(self, message: str) -> None:
        if self.failing:
            self.suppressed += 1
            self._log.debug("%s still failing: %s", self._what, message)
            return
        self.failing = True
        self.suppressed = 0
        self._log.warning("%s failed: %s", self._what, message)

    def recovered(self) -> None:
        if not self.failing:
            return
        self.failing = False
        self._log.info(
            "%s recovered (%d further failures were not logged)", self._what, self.suppressed
        )

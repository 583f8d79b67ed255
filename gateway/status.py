"""Per-device health: state and counters, read by the CLI, the log and (later) the sinks."""

from __future__ import annotations

import enum
from collections import Counter
from dataclasses import dataclass, field

__all__ = ["DeviceState", "DeviceStatus"]


class DeviceState(enum.StrEnum):
    STARTING = "starting"
    ONLINE = "online"
    OFFLINE = "offline"
    STOPPED = "stopped"


@dataclass
class DeviceStatus:
    name: str
    machine: str
    driver: str
    endpoint: str
    state: DeviceState = DeviceState.STARTING
    polls: int = 0
    good_polls: int = 0
    errors: Counter[str] = field(default_factory=Counter)
    last_error: str = ""
    last_error_ts: float | None = None
    last_success_ts: float | None = None
    last_duration: float | None = None
    max_duration: float = 0.0
    overruns: int = 0
    connects: int = 0
    consecutive_failures: int = 0

    def as_dict(self) -> dict[str, object]:
        return {
            "name": self.name,
            "machine": self.machine,
            "driver": self.driver,
            "endpoint": self.endpoint,
            "state": self.state.value,
            "polls": self.polls,
            "good_polls": self.good_polls,
            "errors": dict(self.errors),
            "last_error": self.last_error,
            "last_error_ts": self.last_error_ts,
            "last_success_ts": self.last_success_ts,
            "last_duration": self.last_duration,
            "max_duration": self.max_duration,
            "overruns": self.overruns,
            "connects": self.connects,
            "consecutive_failures": self.consecutive_failures,
        }

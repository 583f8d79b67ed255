"""Per-device health: state and counters, read by the CLI, the log and the sinks."""

from __future__ import annotations

import enum
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

__all__ = ["BreakerState", "DeviceState", "DeviceStatus"]


class DeviceState(enum.StrEnum):
    STARTING = "starting"
    ONLINE = "online"
    OFFLINE = "offline"
    STOPPED = "stopped"


class BreakerState(enum.StrEnum):
    """The runner's circuit breaker for one device (the names the page and metrics show).

    ``closed``: polled on schedule. ``open``: failed ``breaker.failures`` times in a row, so
    skipped until ``next_probe_ts``; on a shared serial bus this is what keeps one powered-off
    machine from costing the other devices a timeout every cycle. ``half_open``: one probe
    (connect and one poll) is under way; success closes the breaker, failure opens it again
    for a longer time.
    """

    CLOSED = "closed"
    OPEN = "open"
    HALF_OPEN = "half_open"


def _no_details() -> Mapping[str, object]:
    return {}


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
    breaker: BreakerState = BreakerState.CLOSED
    #: Times the breaker opened.
    breaker_trips: int = 0
    #: Poll slots not attempted while the breaker was open.
    skipped_polls: int = 0
    #: Attempts made with the breaker half open.
    probes: int = 0
    #: Epoch seconds of the next probe while the breaker is open.
    next_probe_ts: float | None = None
    #: What the driver reports about its line (serial port, latency timer, bus counters);
    #: a callable, because the values change under the driver and are read only when shown.
    details: Callable[[], Mapping[str, object]] = _no_details

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
            "breaker": self.breaker.value,
            "breaker_trips": self.breaker_trips,
            "skipped_polls": self.skipped_polls,
            "probes": self.probes,
            "next_probe_ts": self.next_probe_ts,
            "details": dict(self.details()),
        }

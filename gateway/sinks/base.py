"""The contract between the runtime and a sink.

Lifecycle, driven by ``gateway.app.Gateway.run``:

1. ``await sink.start()``: bind or begin connecting. Sinks start *before* any driver, so they
   see the first value. A sink that raises here must leave nothing running behind it. A sink
   whose peer is away (a broker down) must not raise: it reconnects in the background.
2. ``await sink.run(sub)``: consume reading batches until ``sub`` ends. It ends when every
   driver has stopped and the queue is drained, so what was read is still delivered.
3. ``await sink.close()``: release everything; idempotent; runs even after a failed start.

Device state (online/offline, counters) is not in the batches: sinks read
``runtime.statuses`` and wait for changes with ``runtime.bus.wait_status(seen)``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Protocol

from gateway.bus import Bus, Subscription
from gateway.clock import ClockWatch
from gateway.config import GatewayConfig
from gateway.model import TagKey, TagSpec
from gateway.status import DeviceStatus
from gateway.writes import WriteResult

__all__ = ["RuntimeView", "Sink"]


class RuntimeView(Protocol):
    """What a sink may see of the runtime. Read-only by convention, except ``health``."""

    @property
    def config(self) -> GatewayConfig: ...

    @property
    def tags(self) -> Sequence[TagSpec]: ...

    @property
    def statuses(self) -> Mapping[str, DeviceStatus]: ...

    @property
    def bus(self) -> Bus: ...

    @property
    def started_at(self) -> float: ...

    @property
    def data_dir(self) -> Path: ...

    #: Whether the wall clock is synchronised (NTP) and how it stepped: a Pi without an RTC
    #: boots with a stale clock. Sinks that keep readings (the MQTT buffer) re-base them.
    @property
    def clock(self) -> ClockWatch: ...

    #: The latest write audit entries, oldest first (``gateway.writes.AuditLog.recent``):
    #: what the status page shows. Read only.
    @property
    def audit_recent(self) -> Sequence[Mapping[str, object]]: ...

    async def write(self, key: TagKey, value: object, *, user: str, origin: str) -> WriteResult:
        """The only way a sink writes to a machine (gateway.writes): validated, read back,
        audited; raises WriteRefused with a machine-readable code."""
        ...

    def audit_refusal(
        self, key: str, value: object, *, user: str, origin: str, code: str, detail: str
    ) -> None:
        """Record a write the sink refused itself (before :meth:`write`): the audit shows
        every attempt. Sinks call it at most once a minute per user, tag and reason."""
        ...

    #: Sink name -> its state for the status page and /metrics, e.g.
    #: ``{"mqtt": {"connected": True, "queued": 0, "published": 1234, "dropped": 0}}``.
    #: Each sink writes only its own entry; that is how sinks learn of each other.
    @property
    def health(self) -> dict[str, dict[str, object]]: ...


class Sink(Protocol):
    name: str

    async def start(self) -> None: ...

    async def run(self, sub: Subscription) -> None: ...

    async def close(self) -> None: ...

"""The in-process bus: latest value of every tag, and fan-out of batches to subscribers.

Polling must never wait for a consumer. Every subscriber has its own bounded queue; when it is
full the *oldest* batch is dropped and counted, because for telemetry the newest value matters
most. A slow MQTT broker therefore costs MQTT its backlog, never the OPC UA server its values.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import AsyncIterator, Iterable, Sequence

from gateway.model import Quality, Reading, Reason, TagKey, TagSpec

__all__ = ["Bus", "Subscription"]

#: A Good value older than this many of its intervals is reported as Uncertain (stale).
STALE_INTERVALS = 3.0


class Subscription:
    """One consumer's bounded queue of batches. Iterate it with ``async for``."""

    def __init__(self, name: str, maxsize: int) -> None:
        self.name = name
        self.maxsize = maxsize
        self.dropped_batches = 0
        self.dropped_values = 0
        self.delivered_batches = 0
        self._queue: deque[Sequence[Reading]] = deque()
        self._wakeup = asyncio.Event()
        self._closed = False

    def __len__(self) -> int:
        return len(self._queue)

    def put(self, batch: Sequence[Reading]) -> None:
        if len(self._queue) >= self.maxsize:
            old = self._queue.popleft()
            self.dropped_batches += 1
            self.dropped_values += len(old)
        self._queue.append(batch)
        self._wakeup.set()

    def close(self) -> None:
        """No more batches will come; iteration ends once the queue is drained."""
        self._closed = True
        self._wakeup.set()

    async def get(self) -> Sequence[Reading] | None:
        """The next batch, or None once closed and drained."""
        while not self._queue:
            if self._closed:
                return None
            self._wakeup.clear()
            await self._wakeup.wait()
        self.delivered_batches += 1
        return self._queue.popleft()

    async def __aiter__(self) -> AsyncIterator[Sequence[Reading]]:
        while (batch := await self.get()) is not None:
            yield batch


class Bus:
    """Latest values plus fan-out. Lives on one event loop; ``publish`` never awaits."""

    def __init__(self, queue_size: int = 1000) -> None:
        self.queue_size = queue_size
        self.latest: dict[TagKey, Reading] = {}
        self.specs: dict[TagKey, TagSpec] = {}
        self.published_batches = 0
        self.published_values = 0
        self._subscribers: list[Subscription] = []
        self._closed = False
        #: Bumped whenever a device's state or last error changes; see ``wait_status``.
        self.status_version = 0
        self._status_changed = asyncio.Event()

    def register(self, specs: Iterable[TagSpec], now: float) -> None:
        """Declare tags; until first read each is Bad/waiting_for_initial_data with no value."""
        for spec in specs:
            self.specs[spec.key] = spec
            self.latest.setdefault(
                spec.key, Reading(spec.key, None, Quality.BAD, now, Reason.WAITING)
            )

    def subscribe(self, name: str, maxsize: int | None = None) -> Subscription:
        sub = Subscription(name, maxsize or self.queue_size)
        if self._closed:
            sub.close()
        self._subscribers.append(sub)
        return sub

    @property
    def subscriptions(self) -> tuple[Subscription, ...]:
        return tuple(self._subscribers)

    def publish(self, batch: Sequence[Reading]) -> None:
        if not batch:
            return
        latest = self.latest
        for reading in batch:
            latest[reading.key] = reading
        self.published_batches += 1
        self.published_values += len(batch)
        for sub in self._subscribers:
            sub.put(batch)

    def notify_status(self) -> None:
        """A device changed state. State, not events: waiters re-read the statuses."""
        self.status_version += 1
        event, self._status_changed = self._status_changed, asyncio.Event()
        event.set()

    async def wait_status(self, seen: int) -> int:
        """Wait until ``status_version`` differs from ``seen``; return the new version."""
        while self.status_version == seen:
            await self._status_changed.wait()
        return self.status_version

    def close(self) -> None:
        """Producers are done: subscribers drain what is queued, then their iteration ends."""
        self._closed = True
        for sub in self._subscribers:
            sub.close()

    def snapshot(self, now: float) -> dict[TagKey, Reading]:
        """Latest readings, with Good values that stopped refreshing reported as stale."""
        out: dict[TagKey, Reading] = {}
        for key, reading in self.latest.items():
            spec = self.specs.get(key)
            if (
                spec is not None
                and reading.quality is Quality.GOOD
                and now - reading.source_ts > STALE_INTERVALS * spec.interval
            ):
                out[key] = Reading(
                    key,
                    reading.value,
                    Quality.UNCERTAIN,
                    reading.source_ts,
                    Reason.STALE,
                    f"not refreshed for {now - reading.source_ts:.1f} s",
                    reading.raw,
                )
            else:
                out[key] = reading
        return out

"""The Sparkplug sink's PUBACK path: the costly part of the health entry at most every
HEALTH_EVERY_S, the counters exact, the waiting DDEATH still sent at once. No broker: the sink
is driven through its BufferUser hooks."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from gateway.app import Gateway
from gateway.outbox import Message
from gateway.sinks import mqtt as mqtt_sink
from tests.conftest import free_port
from tests.sinks.test_sparkplug_sink import fast_sink, make_config


def test_buffer_acked_reads_the_oldest_age_at_most_every_health_every_s(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The scan of the messages in flight and the SQLite read at most every HEALTH_EVERY_S
    however many PUBACK batches come in; the counters stay exact in between."""
    sink = fast_sink(Gateway(make_config(tmp_path, free_port())))
    box = sink._buffer.outbox
    box.open()
    # Two DDATA waiting for their PUBACK (in memory; the sink is not connected).
    ts = int(time.time() * 1000)
    box.put([Message("t", b"x", 1, False, ts), Message("t", b"y", 1, False, ts)], deliverable=True)
    reads: list[int] = []
    real = box.oldest_ts_ms

    def counted() -> int | None:
        reads.append(1)
        return real()

    monkeypatch.setattr(box, "oldest_ts_ms", counted)
    health: dict[str, object] = sink._buffer.health
    for _ in range(50):  # a burst of PUBACK batches
        sink.buffer_acked()
    assert len(reads) == 1
    assert health.get("queued") == 2
    assert health.get("oldest_age_s") is not None
    sink._buffer._health_at -= mqtt_sink.HEALTH_EVERY_S  # as if that much time had passed
    sink.buffer_acked()
    sink.buffer_acked()
    assert len(reads) == 2
    # One acked: the count follows at once, the age waits for the next full update.
    live = box.next_live(10)
    box.acked([live[0].id])
    sink.buffer_acked()
    assert health.get("queued") == 1
    assert len(reads) == 2
    # The last one acked: nothing queued, no age, without a read.
    box.acked([live[1].id])
    sink.buffer_acked()
    assert health.get("queued") == 0
    assert health.get("oldest_age_s") is None
    assert len(reads) == 2
    box.close()


def test_buffer_acked_still_sends_the_ddeath_that_waited_for_the_buffer(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    sink = fast_sink(Gateway(make_config(tmp_path, free_port())))
    synced: list[bool] = []
    monkeypatch.setattr(sink, "_sync_devices", lambda: synced.append(True))
    sink.buffer_acked()
    assert synced == []  # nothing waits: no device scan per PUBACK batch
    sink._deaths_waiting = True
    sink.buffer_acked()
    sink.buffer_acked()
    assert synced == [True, True]  # every batch, not rate-limited, until it went

"""The buffer driving both MQTT sinks share (``mqtt.BufferedPublisher``), without a broker.

The link is a stand-in that records what it is handed; the sinks' own tests cover the same
object against a real mosquitto. These pin what the two copies it replaced did not agree on,
and what only a crash or a close shows.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from types import SimpleNamespace
from typing import Any, cast

import pytest

from gateway.clock import ClockWatch
from gateway.config import BufferSection
from gateway.outbox import Message, Stored
from gateway.sinks.base import RuntimeView
from gateway.sinks.mqtt import BufferedPublisher, MqttLink, Will

log = logging.getLogger("tests.buffered")


class Link:
    """What the publisher uses of an :class:`MqttLink`, connected to nothing."""

    name = "Test"
    broker = "broker:1883"
    reconnects = 0
    protocol = "3.1.1"
    tls_version = None
    refused = 0
    v5 = False

    def __init__(self) -> None:
        self.connected = True
        self.last_error = ""
        self.queued: list[tuple[bytes, int]] = []
        self.goodbye: Will | None = None
        self.closed = False
        self.mids: Iterator[int] = iter(range(1, 1000))
        self.on_change: Callable[[], None] = lambda: None

    def start(self) -> None:
        pass

    def backlogged(self) -> bool:
        return False

    def room(self, n: int) -> int:
        return n

    def next_mid(self) -> int:
        return next(self.mids)

    def queue_raw(self, data: bytes, count: int) -> None:
        self.queued.append((data, count))

    def idle(self) -> bool:
        return True

    async def close(self, goodbye: Will | None = None) -> None:
        self.goodbye = goodbye
        self.closed = True
        self.connected = False


class User:
    """A sink: ready while told so; rows whose payload is b"bad" cannot be sent."""

    def __init__(self) -> None:
        self.ready = True
        self.acked = 0
        self.buffer: BufferedPublisher | None = None

    def buffer_ready(self) -> bool:
        return self.ready

    def buffer_wire(self, rows: list[Stored]) -> tuple[list[Stored], Callable[[Stored], bytes]]:
        assert self.buffer is not None
        bad = [s.id for s in rows if s.message.payload == b"bad"]
        if bad:
            self.buffer.discard(bad)
        return [s for s in rows if s.id not in bad], lambda s: s.message.payload

    def buffer_acked(self) -> None:
        self.acked += 1

    def buffer_replayed(self) -> None:
        pass

    def buffer_health(self, health: dict[str, object], stats: dict[str, int]) -> None:
        health["mine"] = True


def publisher(tmp_path: Path, *, qos: int = 1) -> tuple[BufferedPublisher, Link, User]:
    runtime = SimpleNamespace(data_dir=tmp_path, clock=ClockWatch())
    link, user = Link(), User()
    buffer = BufferedPublisher(
        cast(RuntimeView, runtime),
        cast(MqttLink, link),
        user,
        file="test-outbox.sqlite",
        buffer=BufferSection(fsync="off"),
        qos=qos,
        logger=log,
        noun="message(s)",
        label="test buffer",
    )
    user.buffer = buffer
    return buffer, link, user


@asynccontextmanager
async def started(
    tmp_path: Path, *, qos: int = 1
) -> AsyncIterator[tuple[BufferedPublisher, Link, User]]:
    buffer, link, user = publisher(tmp_path, qos=qos)
    buffer.start()
    try:
        yield buffer, link, user
    finally:
        await buffer.close(lambda: None)


def message(payload: bytes, qos: int = 1) -> Message:
    return Message("t/x", payload, qos, False, 1_795_243_800_000)


async def until(done: Callable[[], Any]) -> None:
    for _ in range(200):
        if done():
            return
        await asyncio.sleep(0.005)
    raise AssertionError("timed out")


async def test_a_row_is_acked_by_its_own_qos_and_a_puback_once_per_batch(tmp_path: Path) -> None:
    """QoS 0 rows count as delivered once written, QoS 1 rows at their PUBACK: by the row's
    QoS, so a row stored before ``qos`` changed is not left waiting for a PUBACK that never
    comes (the Sparkplug copy went by the sink's QoS)."""
    async with started(tmp_path, qos=1) as (buffer, link, user):
        buffer.offer([message(b"zero", qos=0), message(b"one", qos=1)])
        assert [count for _, count in link.queued] == [2]
        assert buffer.outbox.stats["queued_messages"] == 1  # the QoS 0 one is done
        assert buffer.link_acked(1)
        assert not buffer.link_acked(1)  # known once
        assert not buffer.link_acked(99)  # not ours
        await until(lambda: user.acked)
        assert buffer.outbox.stats["queued_messages"] == 0
        assert user.acked == 1


async def test_not_ready_goes_to_disk_and_a_lost_link_sends_again(tmp_path: Path) -> None:
    async with started(tmp_path) as (buffer, link, user):
        user.ready = False
        buffer.offer([message(b"a")])
        assert link.queued == []
        assert buffer.outbox.stats["stored"] == 1
        user.ready = True
        buffer.offer([message(b"b")])
        assert sum(count for _, count in link.queued) == 1  # live, beside the replay
        # The link drops before the PUBACK: what was handed over goes back to disk.
        buffer.link_down(unsent_raw=1)
        buffer.update_health()
        assert buffer.health["published"] == 0
        assert buffer.outbox.stats["stored"] == 2


async def test_a_row_the_user_cannot_send_is_dropped_and_counted(tmp_path: Path) -> None:
    async with started(tmp_path) as (buffer, link, _):
        buffer.offer([message(b"bad"), message(b"good")])
        assert [count for _, count in link.queued] == [1]
        buffer.update_health()
        h = buffer.health
        assert (h["dropped"], h["published"], h["queued"], h["mine"]) == (1, 1, 1, True)
        assert list(h)[:3] == ["connected", "broker", "mine"]  # the sink's fields lead


async def test_a_crashed_task_says_so_and_close_stops_the_others(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    buffer, link, _ = publisher(tmp_path)
    buffer.start()

    async def broken() -> None:
        raise RuntimeError("boom")

    async def waits() -> None:
        await asyncio.Event().wait()

    forever = buffer.spawn(waits(), "forever")
    crashed = buffer.spawn(broken(), "broken")
    assert crashed.get_name() == "test[broken]"
    with caplog.at_level(logging.ERROR, logger="tests.buffered"):
        await asyncio.wait([crashed])
        await asyncio.sleep(0)
    assert link.last_error == "internal error: RuntimeError('boom')"
    assert buffer.health["last_error"] == link.last_error
    assert "Test: test[broken] stopped by a bug" in caplog.text
    buffer.offer([message(b"kept")])
    link.connected = False  # acks will not come: the message stays for the next start
    goodbye = Will("gw/state", b"offline", 1, True)
    with caplog.at_level(logging.INFO, logger="tests.buffered"):
        await buffer.close(lambda: goodbye)
        await buffer.close(lambda: None)  # idempotent
    assert forever.cancelled()
    assert link.goodbye is goodbye
    assert "Test: 1 undelivered message(s) kept in the buffer for the next start" in caplog.text
    again, _, _ = publisher(tmp_path)
    again.outbox.open()
    try:
        assert again.outbox.stats["stored"] == 1
    finally:
        again.outbox.close()

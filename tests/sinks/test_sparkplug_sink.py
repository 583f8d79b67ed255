"""The Sparkplug B sink against a real mosquitto: every message is decoded as a host would.

Most tests feed the sink through the bus directly (exact readings, exact timing); the ones
about devices going away, and the first one, poll a simulated Modbus device.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import logging
import sys
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

from drivers.modbus.config import Table
from drivers.modbus.simulator import RegisterMapDevice
from drivers.modbus.transport import RegisterServer
from gateway.app import AUDIT_FILE, Gateway, build_sinks
from gateway.config import GatewayConfig, LoadedConfig
from gateway.model import Quality, Reading, Reason, TagSpec
from gateway.runner import Backoff
from gateway.sinks.sparkplug import OUTBOX_FILE, SparkplugSink
from gateway.sparkplug import (
    BDSEQ,
    NAMESPACE,
    QUALITY,
    REBIRTH,
    DataType,
    EdgeNode,
    Metric,
    Payload,
    SparkplugError,
    decode,
    encode,
    sequenced,
)
from gateway.sparkplug import Message as SpMessage
from gateway.status import DeviceState
from tests.conftest import free_port
from tests.drivers.test_writes import Recording
from tests.sinks.conftest import Message, Mosquitto, Watcher
from tests.unit.test_sparkplug import js_decode

GROUP = "plant1"
EDGE = "gw-test"
DEVICE = "lathe-1-plc"
CLIENT_ID = "gw-test-sparkplug"
HOST = "scada-1"
STATE = f"{NAMESPACE}/STATE/{HOST}"
NCMD = f"{NAMESPACE}/{GROUP}/NCMD/{EDGE}"

TAGS: list[dict[str, Any]] = [
    {"name": "speed", "table": "holding", "address": 0, "type": "uint16", "unit": "rpm"},
    {"name": "temp", "table": "holding", "address": 1, "type": "int16", "scale": 0.1},
    {"name": "count", "table": "holding", "address": 2, "type": "uint16"},
    {"name": "model", "table": "holding", "address": 3, "type": "string", "count": 2},
    {"name": "running", "table": "coil", "address": 0, "type": "bool"},
]  # fmt: skip


class Machine(RegisterMapDevice):
    """speed 1450 rpm, temp 21.5, a counter that moves on every read, a model, a coil."""

    def __init__(self) -> None:
        super().__init__(unit_id=1)
        self.serve(Table.HOLDING, 0, 5)
        self.serve(Table.COIL, 0, 1)
        self.set(Table.HOLDING, 0, [1450, 215])
        self.put(3, "string", "AB", count=2)
        self.set(Table.COIL, 0, [True])

    def tick(self, now: float) -> None:
        self.set(Table.HOLDING, 2, [self.reads & 0xFFFF])


def make_config(
    tmp_path: Path, broker_port: int, device_port: int = 0, **sparkplug: Any
) -> LoadedConfig:
    data: dict[str, Any] = {
        "gateway": {"name": EDGE, "site": "s", "area": "a", "line": "l"},
        "breaker": {"failures": 1, "open_min": 0.1, "open_max": 0.2},
        "sparkplug": {
            "port": broker_port,
            "group_id": GROUP,
            "buffer": {"fsync": "off"},
            **sparkplug,
        },
        "devices": [
            {
                "name": DEVICE,
                "driver": "modbus_tcp",
                "machine": "lathe-1",
                "host": "127.0.0.1",
                "port": device_port or free_port(),
                "interval": 0.05,
                "timeout": 0.025,
                "connect_timeout": 0.2,
                "addressing": "zero_based",
                "tags": TAGS,
            }
        ],
    }
    path = tmp_path / "gateway.yaml"
    path.write_text(yaml.safe_dump(data), encoding="utf-8")
    return LoadedConfig(path, GatewayConfig.model_validate(data))


def fast_sink(gw: Gateway, backoff: Backoff | None = None) -> SparkplugSink:
    assert gw.config.sparkplug is not None
    return SparkplugSink(gw, gw.config.sparkplug, backoff=backoff or Backoff(base=0.1, cap=0.4))


@asynccontextmanager
async def running(gw: Gateway, sink: SparkplugSink) -> AsyncIterator[None]:
    """The whole gateway: drivers polling the simulated device, the sink publishing."""
    stop = asyncio.Event()
    task = asyncio.create_task(gw.run(stop, sinks=[sink]), name="gateway")
    try:
        yield
    finally:
        stop.set()
        await asyncio.wait_for(task, 15)


class Driven:
    """The sink alone, fed by the test through the bus (:func:`feed`)."""

    def __init__(self, gw: Gateway, sink: SparkplugSink) -> None:
        self.gw = gw
        self.sink = sink
        self.sub = gw.bus.subscribe(sink.name)
        self.task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        await self.sink.start()
        self.task = asyncio.create_task(self.sink.run(self.sub), name="sparkplug-run")

    async def stop(self) -> None:
        """End of data, then close: the sink publishes its NDEATH. Idempotent."""
        self.sub.close()
        try:
            if self.task is not None:
                await asyncio.wait_for(self.task, 10)
        finally:
            await self.sink.close()


@asynccontextmanager
async def driven(gw: Gateway, sink: SparkplugSink) -> AsyncIterator[Driven]:
    d = Driven(gw, sink)
    try:
        await d.start()
        yield d
    finally:
        await d.stop()


@asynccontextmanager
async def watched(port: int, gw: Gateway, sink: SparkplugSink) -> AsyncIterator[Watcher]:
    """A subscriber to everything Sparkplug, then the sink (as :func:`driven`); on the way
    out the subscriber waits for the NDEATH that closing the sink publishes."""
    async with Watcher(port, f"{NAMESPACE}/#") as w:
        async with driven(gw, sink):
            yield w
            deaths = count(w, "NDEATH")
        await w.wait(lambda: count(w, "NDEATH") > deaths)


def gate_connects(sink: SparkplugSink) -> asyncio.Event:
    """An event the link waits for before each connection attempt (set: no wait), so that a
    test can have its subscriber ready before the sink's next session starts."""
    gate = asyncio.Event()
    gate.set()
    link = sink._link
    original = link._connect_once

    async def gated() -> None:
        await gate.wait()
        await original()

    link._connect_once = gated  # type: ignore[method-assign]
    return gate


def reading(name: str, value: Any, ts: float | None = None, **kw: Any) -> Reading:
    return Reading(
        f"lathe-1/{name}", value, kw.pop("quality", Quality.GOOD), ts or time.time(), **kw
    )


async def feed(gw: Gateway, *batches: list[Reading]) -> None:
    for batch in batches:
        gw.bus.publish(batch)
        await asyncio.sleep(0)


async def wait_for(done: Callable[[], object], seconds: float = 5.0) -> None:
    deadline = time.monotonic() + seconds
    while not done():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.02)


@dataclass
class Sp:
    """One Sparkplug message of our edge node, decoded as a host would."""

    kind: str
    device: str | None
    payload: Payload
    raw: Message

    @property
    def seq(self) -> int | None:
        return self.payload.seq

    def metric(self, name: str) -> Metric:
        return next(m for m in self.payload.metrics if m.name == name)


def sp(w: Watcher) -> list[Sp]:
    """Our edge node's messages (not the commands and STATE the test itself published)."""
    out = []
    for m in w.messages:
        parts = m.topic.split("/")
        if parts[:2] != [NAMESPACE, GROUP] or parts[2] in ("NCMD", "DCMD"):
            continue
        assert parts[3] == EDGE
        out.append(Sp(parts[2], parts[4] if len(parts) > 4 else None, decode(m.payload), m))
    return out


def kinds(msgs: list[Sp]) -> list[str]:
    return [m.kind for m in msgs]


def count(w: Watcher, kind: str) -> int:
    return sum(1 for m in sp(w) if m.kind == kind)


def names_by_alias(msgs: list[Sp]) -> dict[int, str]:
    """What a host learns from the DBIRTHs: alias -> metric name."""
    return {
        m.alias: m.name
        for s in msgs
        if s.kind == "DBIRTH"
        for m in s.payload.metrics
        if m.alias is not None and m.name is not None
    }


def values(msg: Sp, aliases: dict[int, str]) -> dict[str, Any]:
    return {aliases[m.alias]: m.value for m in msg.payload.metrics if m.alias is not None}


def assert_one_session(msgs: list[Sp]) -> None:
    """NBIRTH first with seq 0; every following message one more, 255 followed by 0."""
    assert msgs[0].kind == "NBIRTH", kinds(msgs)
    assert msgs[0].seq == 0
    for before, after in itertools.pairwise(msgs):
        assert after.seq == ((before.seq or 0) + 1) % 256, (before.kind, before.seq, after.kind)


def sessions(msgs: list[Sp]) -> list[list[Sp]]:
    """Split at every NBIRTH; NDEATH (which has no seq) ends a session."""
    out: list[list[Sp]] = []
    for m in msgs:
        if m.kind == "NBIRTH":
            out.append([])
        if out and m.kind != "NDEATH":
            out[-1].append(m)
    return out


def bdseq(msg: Sp) -> int:
    value = msg.metric(BDSEQ).value
    assert isinstance(value, int)
    return value


def state(online: bool, ts: int) -> bytes:
    return json.dumps({"online": online, "timestamp": ts}).encode()


# -- against mosquitto -------------------------------------------------------------------------


async def test_births_then_data_by_exception_then_ndeath_on_a_clean_stop(
    tmp_path: Path, mosquitto_broker: Mosquitto
) -> None:
    dev_port = free_port()
    gw = Gateway(make_config(tmp_path, mosquitto_broker.port, dev_port))
    sink = fast_sink(gw)
    async with Watcher(mosquitto_broker.port, f"{NAMESPACE}/#") as w:
        async with RegisterServer([Machine()], port=dev_port), running(gw, sink):
            await w.wait(lambda: count(w, "DDATA") >= 6)
            health = gw.health["sparkplug"]
            assert health["connected"] is True
            assert health["bdseq"] == 0
            assert health["births"] == 1
            assert health["host_online"] is None
        await w.wait(lambda: count(w, "NDEATH") == 1)
    msgs = sp(w)
    nbirth, dbirth = msgs[0], msgs[1]
    assert (nbirth.kind, dbirth.kind, dbirth.device) == ("NBIRTH", "DBIRTH", DEVICE)
    # A fresh data directory: the first CONNECT's bdSeq is 0; the NDEATH carries the same.
    assert bdseq(nbirth) == 0
    assert nbirth.metric(REBIRTH).value is False
    assert msgs[-1].kind == "NDEATH"
    assert msgs[-1].seq is None
    assert bdseq(msgs[-1]) == 0
    assert_one_session(msgs[:-1])
    # Sparkplug edge messages are QoS 0 and never retained; NDEATH is QoS 1. DDATA is QoS 1
    # here on purpose (qos_data, see the sink's docstring).
    assert not any(m.raw.retain for m in msgs)
    assert {m.raw.qos for m in msgs if m.kind in ("NBIRTH", "DBIRTH")} == {0}
    assert {m.raw.qos for m in msgs if m.kind in ("DDATA", "NDEATH")} == {1}
    # DBIRTH: every tag, with name, alias, datatype and Quality.
    assert [m.name for m in dbirth.payload.metrics] == [t["name"] for t in TAGS]
    types = {m.name: m.datatype for m in dbirth.payload.metrics}
    assert types == {
        "speed": DataType.UINT16,
        "temp": DataType.DOUBLE,
        "count": DataType.UINT16,
        "model": DataType.STRING,
        "running": DataType.BOOLEAN,
    }
    assert all(QUALITY in m.properties for m in dbirth.payload.metrics)
    # DDATA: aliases only, report by exception: the counter moves, the rest was sent once.
    aliases = names_by_alias(msgs)
    ddata = [m for m in msgs if m.kind == "DDATA"]
    assert all(
        m.name is None and m.datatype is DataType.UNKNOWN for d in ddata for m in d.payload.metrics
    )
    sent = [name for d in ddata for name in values(d, aliases)]
    assert sent.count("count") >= 5
    latest: dict[str, Any] = {m.name: m.value for m in dbirth.payload.metrics}
    for d in ddata:
        latest.update(values(d, aliases))
    assert sent.count("speed") <= 1
    assert (latest["speed"], latest["temp"], latest["model"], latest["running"]) == (
        1450,
        21.5,
        "AB",
        True,
    )
    # A clean DISCONNECT after the NDEATH: the Will was not needed.
    assert f"Client {CLIENT_ID} disconnected." in mosquitto_broker.log_text()
    assert f"Client {CLIENT_ID} closed its connection." not in mosquitto_broker.log_text()


async def test_the_will_is_the_ndeath_of_the_session_and_the_next_has_the_next_bdseq(
    tmp_path: Path, mosquitto_broker: Mosquitto
) -> None:
    mosquitto = mosquitto_broker.port
    gw = Gateway(make_config(tmp_path, mosquitto))
    sink = fast_sink(gw)
    async with watched(mosquitto, gw, sink) as w:
        await w.wait(lambda: count(w, "DBIRTH") == 1)
        await feed(gw, [reading("count", 1)], [reading("count", 2)])
        await w.wait(lambda: count(w, "DDATA") == 2)
        # Acknowledged, so nothing is sent twice (at least once: see the broker restart test).
        await wait_for(lambda: gw.health["sparkplug"]["queued"] == 0)
        # The socket closes without a DISCONNECT: the broker publishes the Will.
        sink._link.hard_close()
        await w.wait(lambda: count(w, "NBIRTH") == 2)
        await feed(gw, [reading("count", 3)])
        await w.wait(lambda: count(w, "DDATA") == 3)
    msgs = sp(w)
    assert kinds(msgs) == [
        "NBIRTH", "DBIRTH", "DDATA", "DDATA", "NDEATH", "NBIRTH", "DBIRTH", "DDATA", "NDEATH",
    ]  # fmt: skip
    first, will, second, bye = msgs[0], msgs[4], msgs[5], msgs[8]
    assert (bdseq(first), bdseq(will)) == (0, 0)  # the Will of the first session
    assert will.seq is None
    assert will.raw.qos == 1
    assert (bdseq(second), bdseq(bye)) == (1, 1)  # one CONNECT later: one more
    for session in sessions(msgs):
        assert_one_session(session)
    assert f"Client {CLIENT_ID} closed its connection." in mosquitto_broker.log_text()


@pytest.mark.parametrize("qos", [1, 0])
async def test_seq_counts_every_message_and_wraps_after_255(
    tmp_path: Path, mosquitto: int, qos: int
) -> None:
    gw = Gateway(make_config(tmp_path, mosquitto, qos_data=qos))
    sink = fast_sink(gw)
    n = 300
    async with watched(mosquitto, gw, sink) as w:
        await w.wait(lambda: count(w, "DBIRTH") == 1)
        for i in range(n):
            await feed(gw, [reading("count", i + 1)])
        await w.wait(lambda: count(w, "DDATA") == n, 10)
        await wait_for(lambda: gw.health["sparkplug"]["queued"] == 0)
        assert gw.health["sparkplug"]["seq"] == (n + 1) % 256
    msgs = sp(w)[:-1]  # without the NDEATH
    assert_one_session(msgs)
    assert {m.raw.qos for m in msgs if m.kind == "DDATA"} == {qos}
    assert [m.seq for m in msgs[:3]] == [0, 1, 2]
    assert [m.seq for m in msgs[255:259]] == [255, 0, 1, 2]
    aliases = names_by_alias(msgs)
    assert [values(m, aliases)["count"] for m in msgs[2:]] == list(range(1, n + 1))


async def test_ddeath_when_the_device_stops_and_dbirth_when_it_is_back(
    tmp_path: Path, mosquitto: int
) -> None:
    dev_port = free_port()
    gw = Gateway(make_config(tmp_path, mosquitto, dev_port))
    sink = fast_sink(gw)
    server = RegisterServer([Machine()], port=dev_port)
    await server.start()
    again = RegisterServer([Machine()], port=dev_port)
    try:
        async with Watcher(mosquitto, f"{NAMESPACE}/#") as w:
            async with running(gw, sink):
                await w.wait(lambda: count(w, "DDATA") >= 3)
                await server.stop()
                await w.wait(lambda: count(w, "DDEATH") == 1)
                await again.start()
                await w.wait(lambda: count(w, "DBIRTH") == 2)
                await w.wait(lambda: kinds(sp(w))[-1] == "DDATA")
            await w.wait(lambda: count(w, "NDEATH") == 1)
    finally:
        await server.stop()
        await again.stop()
    msgs = sp(w)
    assert msgs[-1].kind == "NDEATH"
    msgs = msgs[:-1]
    assert_one_session(msgs)  # one session: DDEATH and DBIRTH share the node's seq
    death = kinds(msgs).index("DDEATH")
    rebirth = kinds(msgs).index("DBIRTH", death)
    assert msgs[death].device == DEVICE
    assert msgs[death].payload.metrics == ()
    # Nothing of the device between its DDEATH and its DBIRTH.
    assert rebirth == death + 1
    reborn = {m.name: m for m in msgs[rebirth].payload.metrics}
    assert reborn["speed"].value == 1450
    assert reborn["speed"].properties[QUALITY].value == 192


async def test_births_and_deaths_across_a_broker_restart(
    tmp_path: Path, mosquitto_broker: Mosquitto
) -> None:
    port = mosquitto_broker.port
    gw = Gateway(make_config(tmp_path, port))
    sink = fast_sink(gw)
    gate = gate_connects(sink)
    health = gw.health["sparkplug"]
    async with driven(gw, sink) as d:
        async with Watcher(port, f"{NAMESPACE}/#") as before:
            await before.wait(lambda: count(before, "DBIRTH") == 1)
            await feed(gw, [reading("count", 1)])
            await before.wait(lambda: count(before, "DDATA") == 1)
        # No new session until this test's next subscriber listens.
        gate.clear()
        await mosquitto_broker.astop()
        await wait_for(lambda: not health["connected"])
        # Meanwhile the values go to disk, without seq.
        await feed(gw, *([reading("count", i)] for i in range(2, 6)))
        await wait_for(lambda: health["buffered"] == 4)
        await mosquitto_broker.astart()
        async with Watcher(port, f"{NAMESPACE}/#") as after:
            gate.set()
            await after.wait(lambda: count(after, "DDATA") == 4)
            await wait_for(lambda: health["buffered"] == 0)
            await feed(gw, [reading("count", 6)])
            await after.wait(lambda: count(after, "DDATA") == 5)
            await d.stop()
            await after.wait(lambda: count(after, "NDEATH") == 1)
    old, new = sp(before), sp(after)
    assert kinds(old) == ["NBIRTH", "DBIRTH", "DDATA"]
    # The broker went away with the old session: no Will reaches anyone. The new session
    # has the next bdSeq (its Will's), births first, then the buffer, flagged, then live.
    assert kinds(new) == ["NBIRTH", "DBIRTH", "DDATA", "DDATA", "DDATA", "DDATA", "DDATA", "NDEATH"]
    assert bdseq(new[0]) == bdseq(old[0]) + 1 == bdseq(new[-1])
    assert_one_session(new[:-1])
    aliases = names_by_alias(new)
    replayed, live = new[2:6], new[6]
    assert [values(m, aliases)["count"] for m in replayed] == [2, 3, 4, 5]
    assert all(x.is_historical for m in replayed for x in m.payload.metrics)
    assert values(live, aliases) == {"count": 6}
    assert not any(x.is_historical for x in live.payload.metrics)
    assert health["replayed"] == 4
    assert health["dropped"] == 0


async def test_rebirth_on_ncmd_and_a_dcmd_to_a_read_only_tag_is_refused(
    tmp_path: Path, mosquitto: int, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="gateway.sinks.sparkplug")
    gw = Gateway(make_config(tmp_path, mosquitto))
    sink = fast_sink(gw)
    now_ms = round(time.time() * 1000)

    def command(value: bool) -> bytes:
        rebirth = Metric(name=REBIRTH, datatype=DataType.BOOLEAN, value=value)
        return encode(Payload(timestamp=now_ms, metrics=(rebirth,)))

    write = Metric(name="speed", datatype=DataType.UINT16, value=1)
    async with watched(mosquitto, gw, sink) as w:
        await w.wait(lambda: count(w, "DBIRTH") == 1)
        await feed(gw, [reading("count", 1)])
        await w.wait(lambda: count(w, "DDATA") == 1)
        w.client.publish(NCMD, command(False), qos=1)
        w.client.publish(
            f"{NAMESPACE}/{GROUP}/DCMD/{EDGE}/{DEVICE}",
            encode(Payload(timestamp=now_ms, metrics=(write,))),
            qos=1,
        )
        w.client.publish(NCMD, b"\xff\xff not protobuf", qos=1)
        w.client.publish(NCMD, command(True), qos=1)
        await w.wait(lambda: count(w, "NBIRTH") == 2)
        await feed(gw, [reading("count", 2)])
        await w.wait(lambda: count(w, "DDATA") == 2)
    msgs = sp(w)
    assert kinds(msgs) == ["NBIRTH", "DBIRTH", "DDATA", "NBIRTH", "DBIRTH", "DDATA", "NDEATH"]
    # The same MQTT session: the same bdSeq, seq from 0 again.
    assert bdseq(msgs[0]) == bdseq(msgs[3]) == bdseq(msgs[6]) == 0
    assert [m.seq for m in msgs[:-1]] == [0, 1, 2, 0, 1, 2]
    # The new DBIRTH holds the newest value: a host needs nothing from before.
    assert msgs[4].metric("count").value == 1
    assert gw.health["sparkplug"]["births"] == 2
    text = caplog.text
    # A DCMD is a write like any other: speed is not writable, so it is refused and audited.
    assert "write lathe-1/speed = 1 by sparkplug" in text
    assert "lathe-1/speed is read-only" in text
    audit = (tmp_path / "data" / AUDIT_FILE).read_text().splitlines()
    assert [json.loads(a)["result"] for a in audit] == ["not_writable"]
    assert "NCMD ignored: not a Sparkplug B payload" in text
    assert "rebirth requested by NCMD" in text


async def test_primary_host_offline_means_buffered_and_online_means_births_then_replay(
    tmp_path: Path, mosquitto_broker: Mosquitto
) -> None:
    mosquitto = mosquitto_broker.port
    gw = Gateway(make_config(tmp_path, mosquitto, primary_host_id=HOST))
    sink = fast_sink(gw)
    health = gw.health["sparkplug"]
    t1 = round(time.time() * 1000)
    async with watched(mosquitto, gw, sink) as w:
        await wait_for(lambda: health["connected"])
        await feed(gw, *([reading("count", i)] for i in (1, 2, 3)))
        await wait_for(lambda: health["buffered"] == 3)
        await w.settle(0.3)
        # Connected, but no host has said it is online: nothing is published.
        assert sp(w) == []
        assert health["host_online"] is None
        # The host comes online (a host's STATE is retained, QoS 1).
        w.client.publish(STATE, state(True, t1), qos=1, retain=True)
        await w.wait(lambda: count(w, "DDATA") == 3)
        assert health["host_online"] is True
        await feed(gw, [reading("count", 4)])
        await w.wait(lambda: count(w, "DDATA") == 4)
        # The host goes offline (its Will carries its birth's timestamp): NDEATH, disconnect,
        # connect again, and wait for the host once more.
        w.client.publish(STATE, state(False, t1), qos=1, retain=True)
        await w.wait(lambda: count(w, "NDEATH") == 1)
        await wait_for(lambda: health["reconnects"] == 1 and health["connected"])
        await wait_for(lambda: health["host_online"] is False)  # the retained STATE
        await feed(gw, [reading("count", 5)], [reading("count", 6)])
        await wait_for(lambda: health["buffered"] == 2)
        # An online STATE older than the newest seen is stale: ignored.
        w.client.publish(STATE, state(True, t1 - 1000), qos=1)
        await w.settle(0.3)
        assert count(w, "NBIRTH") == 1
        w.client.publish(STATE, state(True, t1 + 1000), qos=1, retain=True)
        await w.wait(lambda: count(w, "DDATA") == 6)
    msgs = sp(w)
    assert kinds(msgs) == [
        "NBIRTH", "DBIRTH", "DDATA", "DDATA", "DDATA", "DDATA", "NDEATH",
        "NBIRTH", "DBIRTH", "DDATA", "DDATA", "NDEATH",
    ]  # fmt: skip
    first, second = sessions(msgs)
    assert [m.seq for m in first] == [0, 1, 2, 3, 4, 5]
    assert [m.seq for m in second] == [0, 1, 2, 3]
    # The NDEATH the node published itself has the session's bdSeq; the next session one more.
    assert bdseq(msgs[0]) == bdseq(msgs[6]) == 0
    assert bdseq(msgs[7]) == bdseq(msgs[11]) == 1
    aliases = names_by_alias(msgs)
    for m, value, historical in [
        (msgs[2], 1, True), (msgs[3], 2, True), (msgs[4], 3, True), (msgs[5], 4, False),
        (msgs[9], 5, True), (msgs[10], 6, True),
    ]:  # fmt: skip
        assert values(m, aliases) == {"count": value}
        assert [x.is_historical for x in m.payload.metrics] == [historical]
    # The births state the newest value; the replayed history does not replace it.
    assert msgs[8].metric("count").value == 6
    assert f"Client {CLIENT_ID} disconnected." in mosquitto_broker.log_text()


async def test_buffered_data_survives_a_gateway_restart(tmp_path: Path) -> None:
    broker = Mosquitto(tmp_path / "mosquitto", free_port())
    loaded = make_config(tmp_path, broker.port)
    gw = Gateway(loaded)
    sink = fast_sink(gw)
    t0 = time.time() - 60
    async with driven(gw, sink):
        await feed(gw, *([reading("count", i, t0 + i)] for i in range(1, 5)))
        await wait_for(lambda: gw.health["sparkplug"]["buffered"] == 4)
    assert (tmp_path / "data" / OUTBOX_FILE).is_file()
    await broker.astart()
    try:
        gw = Gateway(loaded)  # the restart: same config, same data directory
        sink = fast_sink(gw)
        async with watched(broker.port, gw, sink) as w:
            await w.wait(lambda: count(w, "DDATA") == 4)
            await wait_for(lambda: gw.health["sparkplug"]["queued"] == 0)
    finally:
        await broker.astop()
    msgs = sp(w)
    assert kinds(msgs) == ["NBIRTH", "DBIRTH", "DDATA", "DDATA", "DDATA", "DDATA", "NDEATH"]
    assert bdseq(msgs[0]) == sink.node.bdseq
    assert_one_session(msgs[:-1])
    aliases = names_by_alias(msgs)
    for i, m in enumerate(msgs[2:6], start=1):
        assert values(m, aliases) == {"count": i}
        (metric,) = m.payload.metrics
        assert metric.is_historical
        assert metric.timestamp == round((t0 + i) * 1000)  # the source time, kept
    # The restarted node knew nothing yet: its DBIRTH says so, and history does not change it.
    assert msgs[1].metric("count").value is None


async def test_every_message_decodes_with_tahus_javascript_library(
    tmp_path: Path, mosquitto: int
) -> None:
    """NBIRTH, DBIRTH, replayed and live DDATA, DDEATH and NDEATH through Eclipse Tahu's
    decoder, field by field."""
    gw = Gateway(make_config(tmp_path, mosquitto, primary_host_id=HOST))
    sink = fast_sink(gw)
    health = gw.health["sparkplug"]
    t0 = time.time() - 10
    status = gw.statuses[DEVICE]
    async with watched(mosquitto, gw, sink) as w:
        await wait_for(lambda: health["connected"])
        await feed(
            gw,
            [reading("speed", 1450, t0), reading("temp", -2.5, t0), reading("model", "Ø1", t0)],
        )
        await wait_for(lambda: health["buffered"] == 1)
        w.client.publish(STATE, state(True, round(time.time() * 1000)), qos=1, retain=True)
        await w.wait(lambda: count(w, "DDATA") == 1)
        await feed(
            gw,
            [
                reading("running", None, quality=Quality.BAD, reason=Reason.TIMEOUT),
                reading("temp", 99.5, quality=Quality.UNCERTAIN, reason=Reason.OUT_OF_RANGE),
            ],
        )
        await w.wait(lambda: count(w, "DDATA") == 2)
        status.state = DeviceState.OFFLINE
        gw.bus.notify_status()
        await w.wait(lambda: count(w, "DDEATH") == 1)
        status.state = DeviceState.ONLINE
        gw.bus.notify_status()
        await w.wait(lambda: count(w, "DBIRTH") == 2)
    ours = sp(w)
    assert kinds(ours) == ["NBIRTH", "DBIRTH", "DDATA", "DDATA", "DDEATH", "DBIRTH", "NDEATH"]
    js = js_decode([SpMessage(m.raw.topic, m.raw.payload) for m in ours])
    assert [j["decoded"].get("seq") for j in js] == ["0", "1", "2", "3", "4", "5", None]
    nbirth, dbirth, replayed, live, ddeath, dbirth2, ndeath = (j["decoded"] for j in js)
    assert {m["name"]: m["value"] for m in nbirth["metrics"]} == {BDSEQ: "0", REBIRTH: False}
    assert [m["value"] for m in ndeath["metrics"]] == ["0"]
    assert [(m["name"], m["type"]) for m in dbirth["metrics"]] == [
        ("speed", "UInt16"), ("temp", "Double"), ("count", "UInt16"), ("model", "String"),
        ("running", "Boolean"),
    ]  # fmt: skip
    by_alias = {m["alias"]: m["name"] for m in dbirth["metrics"]}
    old = {by_alias[m["alias"]]: m for m in replayed["metrics"]}
    assert {k: m["value"] for k, m in old.items()} == {"speed": 1450, "temp": -2.5, "model": "Ø1"}
    assert all(m["isHistorical"] for m in old.values())
    assert all(m["timestamp"] == str(round(t0 * 1000)) for m in old.values())
    new = {by_alias[m["alias"]]: m for m in live["metrics"]}
    assert new["running"]["value"] is None
    assert new["running"]["properties"]["Quality"]["value"] == 0
    assert (new["temp"]["value"], new["temp"]["properties"]["Quality"]["value"]) == (99.5, 500)
    assert not any(m.get("isHistorical") for m in new.values())
    assert ddeath["metrics"] == []
    again = {m["name"]: m["value"] for m in dbirth2["metrics"]}
    assert again == {"speed": 1450, "temp": 99.5, "count": None, "model": "Ø1", "running": None}
    # DATA carries aliases only; the raw protobuf has neither name nor datatype.
    for j in js[2:4]:
        assert all("name" not in m and "datatype" not in m for m in j["raw"]["metrics"])


async def test_a_ddeath_waits_for_buffered_data_of_the_device(
    tmp_path: Path, mosquitto: int
) -> None:
    """A device that died while the node was offline: its buffered DDATA is replayed after
    the DBIRTH of the new session, and only then comes its DDEATH."""
    gw = Gateway(make_config(tmp_path, mosquitto, primary_host_id=HOST))
    sink = fast_sink(gw)
    health = gw.health["sparkplug"]
    async with watched(mosquitto, gw, sink) as w:
        await wait_for(lambda: health["connected"])
        await feed(gw, [reading("count", 1)], [reading("count", 2, quality=Quality.BAD)])
        gw.statuses[DEVICE].state = DeviceState.OFFLINE
        gw.bus.notify_status()
        await wait_for(lambda: health["buffered"] == 2)
        w.client.publish(STATE, state(True, round(time.time() * 1000)), qos=1, retain=True)
        await w.wait(lambda: count(w, "DDEATH") == 1)
    msgs = sp(w)
    assert kinds(msgs) == ["NBIRTH", "DBIRTH", "DDATA", "DDATA", "DDEATH", "NDEATH"]
    assert_one_session(msgs[:-1])


# -- no broker needed ----------------------------------------------------------------------------


def _spec(index: int, name: str, datatype: str) -> TagSpec:
    return TagSpec(index, "lathe-1", DEVICE, name, datatype)


def test_a_buffered_ddata_gets_its_seq_and_current_aliases_when_sent(tmp_path: Path) -> None:
    before = EdgeNode(GROUP, EDGE, tmp_path / "a")
    before.add_device(DEVICE, [_spec(0, "a", "uint16"), _spec(1, "b", "int16")])
    before.connect()
    # Offline: the change is kept for a buffer, with names and datatypes, without seq.
    kept = before.ddata(DEVICE, [reading("a", 1, 1.0), reading("b", -2, 1.0)], store=True)
    assert kept is not None
    stored = decode(kept.payload)
    assert stored.seq is None
    assert [(m.name, m.datatype) for m in stored.metrics] == [
        ("a", DataType.UINT16),
        ("b", DataType.INT16),
    ]
    # Unchanged since: nothing more to keep.
    assert before.ddata(DEVICE, [reading("a", 1, 2.0)], store=True) is None
    # Another configuration by the time it is sent: b moved, a is gone, c is new.
    after = EdgeNode(GROUP, EDGE, tmp_path / "b")
    after.add_device(DEVICE, [_spec(0, "c", "bool"), _spec(1, "d", "bool"), _spec(2, "b", "int16")])
    after.connect()
    after.births()
    metrics = after.metrics(DEVICE)
    wire = sequenced(
        kept.payload, after.take_seq(), metrics=metrics, timestamp=5000, historical=True,
        shift_ms=250,
    )  # fmt: skip
    assert wire is not None
    sent = decode(wire, datatypes=after.datatypes(DEVICE))
    assert (sent.seq, sent.timestamp) == (2, 5000)
    (b,) = sent.metrics
    assert (b.name, b.alias, b.value, b.is_historical, b.timestamp) == (
        None,
        metrics["b"][0],
        -2,
        True,
        1250,
    )
    assert b.alias != stored.metrics[1].alias
    # A datatype that changed leaves nothing to send.
    other = {"a": (metrics["b"][0], DataType.FLOAT), "b": (metrics["b"][0], DataType.INT32)}
    assert sequenced(kept.payload, 3, metrics=other) is None
    with pytest.raises(SparkplugError):
        sequenced(b"\xff\xff", 0, metrics=metrics)
    with pytest.raises(SparkplugError):
        sequenced(kept.payload, 256, metrics=metrics)


def test_live_ddata_of_a_dead_device_waits_for_its_dbirth(tmp_path: Path) -> None:
    node = EdgeNode(GROUP, EDGE, tmp_path)
    node.add_device(DEVICE, [_spec(0, "a", "uint16")])
    node.connect()
    node.births()
    node.ddeath(DEVICE)
    assert not node.born(DEVICE)
    assert node.ddata(DEVICE, [reading("a", 7)], store=True) is None
    birth = node.dbirth(DEVICE)
    assert decode(birth.payload).metrics[0].value == 7
    node.offline()
    assert not node.online
    with pytest.raises(SparkplugError):
        node.take_seq()


def test_config_defaults_and_the_sink_is_built(tmp_path: Path) -> None:
    loaded = make_config(tmp_path, free_port())
    section = loaded.config.sparkplug
    assert section is not None
    assert (section.edge_node_id, section.primary_host_id, section.qos_data) == (None, None, 1)
    gw = Gateway(loaded)
    (sink,) = build_sinks(gw)
    assert isinstance(sink, SparkplugSink)
    assert sink._link.client_id == CLIENT_ID
    assert (sink.node.group_id, sink.node.edge_node_id) == (GROUP, EDGE)
    assert gw.health["sparkplug"]["connected"] is False


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ({"group_id": "plant/1"}, "sparkplug.group_id: group_id 'plant/1' may not contain '/'"),
        (
            {"edge_node_id": "gw+1"},
            "sparkplug.edge_node_id: edge_node_id 'gw+1' may not contain '+'",
        ),
        ({"primary_host_id": "#"}, "sparkplug.primary_host_id: primary_host_id '#' may not"),
        ({"group_id": "STATE"}, "sparkplug.group_id: group_id 'STATE' is taken"),
        ({"password_env": "X"}, "sparkplug.username: a password needs a username"),
        ({"client_id": EDGE}, "sparkplug.client_id: client_id 'gw-test' is the mqtt: section's"),
    ],
)
def test_config_refuses_what_sparkplug_cannot_carry(
    tmp_path: Path, extra: dict[str, Any], message: str
) -> None:
    from gateway.config import load_config  # noqa: PLC0415
    from gateway.errors import ConfigError  # noqa: PLC0415

    port = free_port()
    loaded = make_config(tmp_path, port, **extra)
    data = yaml.safe_load(loaded.path.read_text())
    data["mqtt"] = {"port": port}
    loaded.path.write_text(yaml.safe_dump(data))
    with pytest.raises(ConfigError) as err:
        load_config(loaded.path)
    lines = [str(issue) for issue in err.value.issues]
    assert any(message in line for line in lines), lines
    assert all(line.startswith(f"{loaded.path}:") for line in lines)


def test_the_status_page_shows_a_sparkplug_card(tmp_path: Path) -> None:
    from gateway.config import WebSection  # noqa: PLC0415
    from gateway.sinks.web import WebSink  # noqa: PLC0415

    gw = Gateway(make_config(tmp_path, free_port(), primary_host_id=HOST))
    assert gw.config.sparkplug is not None
    SparkplugSink(gw, gw.config.sparkplug)
    page = "".join(WebSink(gw, WebSection(port=free_port())).iter_page(time.time()))
    card = page[page.index('data-sink="sparkplug"') :]
    card = card[: card.index("</div></div>")]
    assert "Sparkplug B" in card
    assert f"{GROUP}/{EDGE}" in card
    assert 'data-f="bdseq"' in card
    assert 'data-f="host_online"' in card
    assert 'data-f="buffered"' in card
    # Without a sparkplug: section the page has no such card.
    loaded = make_config(tmp_path, free_port())
    plain = Gateway(LoadedConfig(loaded.path, loaded.config.model_copy(update={"sparkplug": None})))
    page = "".join(WebSink(plain, WebSection(port=free_port())).iter_page(time.time()))
    assert 'data-sink="sparkplug"' not in page


async def test_a_dcmd_writes_a_writable_tag_and_the_next_ddata_shows_it(
    tmp_path: Path, mosquitto: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    writable = [
        {**TAGS[0], "writable": True, "write": {"min": 0, "max": 3000, "min_interval": 0}},
        *TAGS[1:],
    ]
    monkeypatch.setattr(sys.modules[__name__], "TAGS", writable)
    dev = Recording()
    port = free_port()
    gw = Gateway(make_config(tmp_path, mosquitto, port))
    sink = fast_sink(gw)
    now_ms = round(time.time() * 1000)
    dcmd = f"{NAMESPACE}/{GROUP}/DCMD/{EDGE}/{DEVICE}"
    async with (
        RegisterServer([dev], port=port),
        Watcher(mosquitto, f"{NAMESPACE}/#") as w,
        running(gw, sink),
    ):
        await w.wait(lambda: count(w, "DBIRTH") == 1)
        alias = next(m.alias for m in sp(w)[1].payload.metrics if m.name == "speed")
        # By alias, as a host that has seen the DBIRTH sends it.
        write = Metric(alias=alias, datatype=DataType.UINT16, value=1450)
        w.client.publish(dcmd, encode(Payload(timestamp=now_ms, metrics=(write,))), qos=1)
        await w.wait(
            lambda: any(
                m.kind == "DDATA" and any(x.alias == alias and x.value == 1450
                                          for x in m.payload.metrics)
                for m in sp(w)
            )
        )  # fmt: skip
    assert dev.writes == [(Table.HOLDING, 0, [1450])]
    (entry,) = [json.loads(a) for a in (tmp_path / "data" / AUDIT_FILE).read_text().splitlines()]
    assert (entry["result"], entry["user"], entry["tag"]) == ("ok", "sparkplug", "lathe-1/speed")

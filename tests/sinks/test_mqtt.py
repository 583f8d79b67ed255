"""The MQTT sink against a real mosquitto and real simulated Modbus devices."""

from __future__ import annotations

import asyncio
import json
import logging
import math
import signal
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
import yaml

from drivers.modbus.config import Table
from drivers.modbus.simulator import RegisterMapDevice
from drivers.modbus.transport import RegisterServer
from gateway.app import FunctionSink, Gateway
from gateway.bus import Subscription
from gateway.clock import ClockWatch, SyncSource
from gateway.config import GatewayConfig, LoadedConfig
from gateway.model import Quality, Reading, Reason
from gateway.runner import Backoff
from gateway.sinks.base import Sink
from gateway.sinks.mqtt import MAX_PENDING_WRITES, MqttSink, encode_publishes, value_json
from tests.conftest import free_port
from tests.sinks.conftest import Message, Mosquitto, Watcher

BASE = "uns/s/a/l"
LATHE = f"{BASE}/lathe-1"
GATEWAY_TOPIC = f"{BASE}/$gateway/gw-test"
DEVICE_STATUS = f"{LATHE}/$status/lathe-1-plc"
MACHINE_STATUS = f"{LATHE}/$status"

TAGS: list[dict[str, Any]] = [
    {"name": "speed", "table": "holding", "address": 0, "type": "uint16", "unit": "rpm"},
    {"name": "temp", "table": "holding", "address": 1, "type": "int16", "scale": 0.1,
     "unit": "°C", "deadband": 0.5},
    {"name": "count", "table": "holding", "address": 2, "type": "uint16"},
    {"name": "model", "table": "holding", "address": 3, "type": "string", "count": 2},
    {"name": "running", "table": "coil", "address": 0, "type": "bool"},
]  # fmt: skip


class Machine(RegisterMapDevice):
    """speed 1450 rpm, temp 21.5 °C, a counter that moves on every read, a model, a coil."""

    def __init__(self, counters: int = 1) -> None:
        super().__init__(unit_id=1)
        self.counters = counters
        self.serve(Table.HOLDING, 0, 5 + counters)
        self.serve(Table.COIL, 0, 1)
        self.set(Table.HOLDING, 0, [1450, 215])
        self.put(3, "string", 'A"', count=2)
        self.set(Table.COIL, 0, [True])

    def tick(self, now: float) -> None:
        count = self.reads & 0xFFFF
        self.set(Table.HOLDING, 2, [count])
        for i in range(1, self.counters):
            self.set(Table.HOLDING, 4 + i, [count])


def make_config(
    tmp_path: Path,
    device_port: int,
    mqtt: dict[str, Any],
    *,
    interval: float = 0.05,
    tags: list[dict[str, Any]] | None = None,
) -> LoadedConfig:
    data = {
        "gateway": {"name": "gw-test", "site": "s", "area": "a", "line": "l"},
        "mqtt": mqtt,
        "devices": [
            {
                "name": "lathe-1-plc",
                "driver": "modbus_tcp",
                "machine": "lathe-1",
                "host": "127.0.0.1",
                "port": device_port,
                "interval": interval,
                "timeout": min(0.2, interval / 2),
                "connect_timeout": 0.2,
                "addressing": "zero_based",
                "tags": TAGS if tags is None else tags,
            }
        ],
    }
    path = tmp_path / "gateway.yaml"
    path.write_text(yaml.safe_dump(data), encoding="utf-8")
    return LoadedConfig(path, GatewayConfig.model_validate(data))


def fast_sink(gw: Gateway) -> MqttSink:
    assert gw.config.mqtt is not None
    return MqttSink(gw, gw.config.mqtt, backoff=Backoff(base=0.1, cap=0.4))


@asynccontextmanager
async def running(gw: Gateway, *sinks: Sink) -> AsyncIterator[asyncio.Event]:
    stop = asyncio.Event()
    task = asyncio.create_task(gw.run(stop, sinks=list(sinks)), name="gateway")
    try:
        yield stop
    finally:
        stop.set()
        await asyncio.wait_for(task, 15)


async def wait_for(done: Any, seconds: float = 5.0) -> None:
    deadline = time.monotonic() + seconds
    while not done():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.02)


def values(messages: list[Message]) -> list[Any]:
    return [m.json()["value"] for m in messages]


# -- payload encoding, no broker needed -------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (0, 0),
        (-7, -7),
        (2**63, 2**63),
        (1.5, 1.5),
        (0.1 * 3, 0.1 * 3),
        (1e300, 1e300),
        (-0.0, -0.0),
        (math.inf, None),
        (-math.inf, None),
        (math.nan, None),
        (True, True),
        (False, False),
        (None, None),
        ("", ""),
        ('a"b\\c\n\x01é€😀', 'a"b\\c\n\x01é€😀'),
    ],
)
def test_value_json_is_valid_json(value: Any, expected: Any) -> None:
    assert json.loads(value_json(value)) == expected


def _decode_publishes(data: bytes) -> list[tuple[str, bytes, int]]:
    """Split concatenated MQTT 3.1.1 PUBLISH packets into (topic, payload, flags)."""
    out = []
    i = 0
    while i < len(data):
        first = data[i]
        assert first & 0xF0 == 0x30
        i += 1
        length, mult = 0, 1
        while True:
            byte = data[i]
            i += 1
            length += (byte & 0x7F) * mult
            mult *= 128
            if not byte & 0x80:
                break
        packet = data[i : i + length]
        i += length
        tlen = int.from_bytes(packet[:2], "big")
        # QoS 1 and 2 carry a packet id after the topic.
        body = 2 + tlen + (2 if first & 0x06 else 0)
        out.append((packet[2 : 2 + tlen].decode(), bytes(packet[body:]), first & 0x0F))
    return out


def test_encoded_packets_are_valid_mqtt_and_json(tmp_path: Path) -> None:
    """Odd units, values and details all end up as well-formed packets with valid JSON."""
    tags = [
        {"name": "f", "table": "holding", "address": 0, "type": "float32", "unit": 'in"/s\\'},
        {"name": "i", "table": "holding", "address": 2, "type": "int16"},
        {"name": "s", "table": "holding", "address": 3, "type": "string", "count": 2,
         "unit": "°C"},
        {"name": "b", "table": "coil", "address": 0, "type": "bool"},
    ]  # fmt: skip
    gw = Gateway(make_config(tmp_path, free_port(), {"port": free_port()}, tags=tags))
    sink = fast_sink(gw)
    sink._build_topics()
    ts = 1795243800.1234
    big = "x" * 300  # a payload over 127 bytes: a two-byte remaining length
    batch = [
        Reading("lathe-1/f", 1.25, Quality.GOOD, ts),
        Reading("lathe-1/i", -3, Quality.UNCERTAIN, ts, Reason.OUT_OF_RANGE, "below min 0"),
        Reading("lathe-1/s", 'q"\\é' + big, Quality.GOOD, ts),
        Reading("lathe-1/b", None, Quality.BAD, ts, Reason.TIMEOUT, 'no "answer"\n'),
    ]
    box = sink._outbox
    box.open()
    sink._on_batch_per_tag(batch)
    # Not connected: every message waits in the buffer, on disk.
    assert box.stats["stored"] == 4
    mids = iter(range(100, 200))
    data, sent = encode_publishes(box.next_live(10) + box.next_replay(10), mids.__next__, {})
    assert [mid for mid, _ in sent] == [100, 101, 102, 103]
    packets = _decode_publishes(data)
    got = {topic: (json.loads(payload), flags) for topic, payload, flags in packets}
    assert got[f"{LATHE}/f"] == (
        {
            "seq": 1,
            "historical": True,
            "value": 1.25,
            "unit": 'in"/s\\',
            "quality": "good",
            "ts": "2026-11-21T06:50:00.123Z",
            "ts_ms": 1795243800123,
        },
        2,  # QoS 1, and not retained: a replayed value must not replace a newer one
    )
    i = got[f"{LATHE}/i"][0]
    assert (i["value"], i["unit"], i["quality"], i["reason"], i["detail"]) == (
        -3,
        None,
        "uncertain",
        "out_of_range",
        "below min 0",
    )
    assert got[f"{LATHE}/s"][0]["value"] == 'q"\\é' + big
    assert got[f"{LATHE}/s"][0]["unit"] == "°C"
    b = got[f"{LATHE}/b"][0]
    assert (b["value"], b["quality"], b["reason"], b["detail"]) == (
        None,
        "bad",
        "timeout",
        'no "answer"\n',
    )
    # Unchanged: nothing new. Same value, new quality: published.
    sink._on_batch_per_tag(batch)
    assert box.stats["queued_messages"] == 4
    sink._on_batch_per_tag([Reading("lathe-1/f", 1.25, Quality.BAD, ts, Reason.TIMEOUT, "t")])
    assert box.stats["queued_messages"] == 5
    box.close()


# -- against mosquitto --------------------------------------------------------------------------


async def test_topics_payloads_and_retained_state_then_clean_shutdown(
    tmp_path: Path, mosquitto_broker: Mosquitto
) -> None:
    mosquitto = mosquitto_broker.port
    dev_port = free_port()
    gw = Gateway(make_config(tmp_path, dev_port, {"port": mosquitto}))
    sink = fast_sink(gw)
    async with RegisterServer([Machine()], port=dev_port), running(gw, sink):
        await wait_for(lambda: gw.health["mqtt"]["connected"])
        sock = sink._link.client.socket() if sink._link.client else None
        assert isinstance(sock, socket.socket)
        assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) != 0
        await asyncio.sleep(0.4)
        # A late subscriber gets the current state from retained messages alone.
        async with Watcher(mosquitto, f"{BASE}/#") as w:
            wanted = [f"{LATHE}/{t['name']}" for t in TAGS]
            wanted += [DEVICE_STATUS, MACHINE_STATUS, GATEWAY_TOPIC]
            await w.wait(lambda: all(w.latest(t) for t in wanted))
            speed = w.latest(f"{LATHE}/speed")
            assert speed is not None
            assert speed.retain
            doc = speed.json()
            # A value from the buffer carries its seq; the restatement of retained values
            # after a connect does not (it is not new data).
            assert list(doc) in (
                ["seq", "value", "unit", "quality", "ts", "ts_ms"],
                ["value", "unit", "quality", "ts", "ts_ms"],
            )
            assert (doc["value"], doc["unit"], doc["quality"]) == (1450, "rpm", "good")
            assert abs(doc["ts_ms"] / 1000 - time.time()) < 5
            assert doc["ts"].endswith("Z")
            assert doc["ts"][:19] == time.strftime(
                "%Y-%m-%dT%H:%M:%S", time.gmtime(doc["ts_ms"] // 1000)
            )
            latest = {t["name"]: w.latest(f"{LATHE}/{t['name']}") for t in TAGS}
            assert {k: m.json()["value"] for k, m in latest.items() if m} | {"count": 0} == {
                "speed": 1450,
                "temp": 21.5,
                "count": 0,
                "model": 'A"',
                "running": True,
            }
            assert latest["temp"] is not None
            assert latest["temp"].json()["unit"] == "°C"
            status = w.latest(DEVICE_STATUS)
            assert status is not None
            assert status.retain
            assert status.qos == 1
            assert status.json()["state"] == "online"
            assert status.json()["last_error"] is None
            assert status.json()["last_success_ts"].endswith("Z")
            assert status.json()["errors"] == {}
            assert w.latest(MACHINE_STATUS).json() == {"state": "online"}  # type: ignore[union-attr]
            assert w.latest(GATEWAY_TOPIC).json() == {"state": "online"}  # type: ignore[union-attr]
        health = gw.health["mqtt"]
        assert health["broker"] == f"127.0.0.1:{mosquitto}"
        assert isinstance(health["published"], int)
        assert health["published"] > 10
        assert health["dropped"] == 0
        assert health["reconnects"] == 0
    # Clean shutdown: the gateway says offline, the device is stopped, the machine offline.
    async with Watcher(mosquitto, f"{BASE}/#") as w:
        await w.wait(lambda: w.latest(GATEWAY_TOPIC) and w.latest(DEVICE_STATUS))
        assert w.latest(GATEWAY_TOPIC).json() == {"state": "offline"}  # type: ignore[union-attr]
        assert w.latest(DEVICE_STATUS).json()["state"] == "stopped"  # type: ignore[union-attr]
        assert w.latest(MACHINE_STATUS).json() == {"state": "offline"}  # type: ignore[union-attr]
    assert gw.health["mqtt"]["connected"] is False
    assert sink._link.fd is None
    # A clean MQTT DISCONNECT, so the "offline" above is ours, not the Last Will.
    assert "Client gw-test disconnected." in mosquitto_broker.log_text()
    assert "Client gw-test closed its connection." not in mosquitto_broker.log_text()
    await sink.close()  # idempotent


async def test_report_by_exception_with_deadband(tmp_path: Path, mosquitto: int) -> None:
    dev_port = free_port()
    dev = Machine()
    gw = Gateway(make_config(tmp_path, dev_port, {"port": mosquitto}))
    async with (
        Watcher(mosquitto, f"{BASE}/#") as w,
        RegisterServer([dev], port=dev_port),
        running(gw, fast_sink(gw)),
    ):
        temp, speed = f"{LATHE}/temp", f"{LATHE}/speed"
        await w.wait(lambda: len(w.on(f"{LATHE}/count")) >= 5)
        # [None, 21.5] when connected before the first poll (the waiting state, then the
        # value); [21.5, 21.5] when the first poll was queued (the queue, then the snapshot).
        assert values(w.on(temp))[-1] == 21.5
        n_temp, n_speed = len(w.on(temp)), len(w.on(speed))
        dev.set(Table.HOLDING, 1, [218])  # +0.3 °C: within the 0.5 deadband
        await w.settle(0.3)
        assert len(w.on(temp)) == n_temp
        dev.set(Table.HOLDING, 1, [222])  # +0.7 °C from the last *published* value
        await w.wait(lambda: len(w.on(temp)) == n_temp + 1)
        assert values(w.on(temp))[-1] == pytest.approx(22.2)
        dev.set(Table.HOLDING, 0, [1451])  # no deadband: any change
        await w.wait(lambda: len(w.on(speed)) == n_speed + 1)
        await w.settle(0.2)
        assert values(w.on(speed))[n_speed - 1 :] == [1450, 1451]
        counts = values(w.on(f"{LATHE}/count"))
        assert counts[1:] == sorted(counts[1:])


async def test_heartbeat_republishes_unchanged_values(tmp_path: Path, mosquitto: int) -> None:
    dev_port = free_port()
    gw = Gateway(make_config(tmp_path, dev_port, {"port": mosquitto, "heartbeat": 0.2}))
    async with (
        Watcher(mosquitto, f"{BASE}/#") as w,
        RegisterServer([Machine()], port=dev_port),
        running(gw, fast_sink(gw)),
    ):
        await w.wait(lambda: len(w.on(f"{LATHE}/speed")) >= 2)
        await w.settle(1.0)
    speeds = values(w.on(f"{LATHE}/speed"))
    # The first value, then ~5 heartbeats in a second; the schedule is loose, so ask for 3.
    assert speeds.count(1450) >= 4
    assert set(speeds) <= {None, 1450}


async def test_qos1_values_without_retain(tmp_path: Path, mosquitto: int) -> None:
    """The paho publish() path: values at QoS 1, not retained; states stay retained."""
    dev_port = free_port()
    mqtt = {"port": mosquitto, "qos_values": 1, "retain_values": False, "qos_state": 0}
    gw = Gateway(make_config(tmp_path, dev_port, mqtt))
    async with RegisterServer([Machine()], port=dev_port), running(gw, fast_sink(gw)):
        async with Watcher(mosquitto, f"{BASE}/#") as live:
            await live.wait(lambda: len(live.on(f"{LATHE}/count")) >= 3)
            # Values from the buffer (with a seq) go at QoS 1; the restatement after a
            # connect or a replay (no seq) is QoS 0 and may come last.
            buffered = [m for m in live.on(f"{LATHE}/speed") if "seq" in m.json()]
            assert buffered
            assert all(m.qos == 1 for m in buffered)
            assert buffered[-1].json()["value"] == 1450
        async with Watcher(mosquitto, f"{BASE}/#") as late:
            await late.wait(lambda: late.latest(DEVICE_STATUS) and late.latest(GATEWAY_TOPIC))
            await late.settle(0.1)
            status = late.latest(DEVICE_STATUS)
            assert status is not None
            assert status.retain
            assert status.qos == 0
            assert not [
                m
                for m in late.messages
                if m.topic.startswith(f"{LATHE}/") and m.retain and "$" not in m.topic
            ]


async def test_per_device_shape(tmp_path: Path, mosquitto: int) -> None:
    dev_port = free_port()
    mqtt = {"port": mosquitto, "topic_shape": "per_device"}
    gw = Gateway(make_config(tmp_path, dev_port, mqtt))
    topic = f"{LATHE}/$device/lathe-1-plc"
    async with (
        Watcher(mosquitto, f"{BASE}/#") as w,
        RegisterServer([Machine()], port=dev_port),
        running(gw, fast_sink(gw)),
    ):
        await w.wait(lambda: len(w.on(topic)) >= 6)
    msgs = w.on(topic)
    assert not any(m.retain for m in msgs)
    assert not w.on(f"{LATHE}/speed")  # no per-tag topics in this shape
    docs = [m.json() for m in msgs]
    assert all(d["device"] == "lathe-1-plc" for d in docs)
    # First every tag (the waiting state, or the first poll if it came before the
    # connection), then the first good values of every tag...
    assert set(docs[0]["values"]) == {t["name"] for t in TAGS}
    if docs[0]["values"]["speed"]["quality"] == "bad":
        assert docs[0]["values"]["speed"]["reason"] == "waiting_for_initial_data"
        assert docs[0]["values"]["speed"]["value"] is None
    first_good = next(d for d in docs if d["values"].get("speed", {}).get("quality") == "good")
    assert first_good["values"]["speed"] == {
        "value": 1450,
        "quality": "good",
        "ts_ms": first_good["ts_ms"],
    }
    assert first_good["values"]["model"]["value"] == 'A"'
    # ...then only what changed: the counter.
    assert set(docs[-1]["values"]) == {"count"}
    assert docs[-1]["ts_ms"] >= first_good["ts_ms"]


async def test_device_going_offline_updates_status_topics(tmp_path: Path, mosquitto: int) -> None:
    dev_port = free_port()
    gw = Gateway(make_config(tmp_path, dev_port, {"port": mosquitto}))
    server = RegisterServer([Machine()], port=dev_port)
    await server.start()
    try:
        async with Watcher(mosquitto, f"{BASE}/#") as w, running(gw, fast_sink(gw)):
            await w.wait(lambda: w.latest(MACHINE_STATUS) is not None)
            await w.wait(lambda: w.latest(MACHINE_STATUS).json()["state"] == "online")  # type: ignore[union-attr]
            await server.stop()

            def offline() -> bool:
                m = w.latest(DEVICE_STATUS)
                return m is not None and m.json()["state"] == "offline"

            await w.wait(offline)
            doc = w.latest(DEVICE_STATUS).json()  # type: ignore[union-attr]
            assert doc["last_error"]
            assert doc["last_error_ts"].endswith("Z")
            assert sum(doc["errors"].values()) >= 1
            await w.wait(lambda: w.latest(MACHINE_STATUS).json()["state"] == "offline")  # type: ignore[union-attr]
            await w.wait(lambda: w.latest(f"{LATHE}/speed").json()["quality"] == "bad")  # type: ignore[union-attr]
            speed = w.latest(f"{LATHE}/speed").json()  # type: ignore[union-attr]
            # The last value stays, marked Bad, with why.
            assert speed["value"] == 1450
            assert speed["reason"] in {"no_communication", "timeout"}
            assert speed["detail"]
    finally:
        await server.stop()


class Recorder:
    def __init__(self) -> None:
        self.times: list[float] = []

    async def __call__(self, sub: Subscription) -> None:
        async for batch in sub:
            if any(r.quality is Quality.GOOD for r in batch):
                self.times.append(time.monotonic())


async def test_broker_outage_never_stalls_polling_and_state_is_current_after(
    tmp_path: Path, mosquitto_broker: Mosquitto, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="gateway.sinks.mqtt")
    dev_port = free_port()
    tags = [
        {"name": f"c{i}", "table": "holding", "address": 2 if i == 0 else 4 + i, "type": "uint16"}
        for i in range(4)
    ]
    mqtt = {"port": mosquitto_broker.port}
    gw = Gateway(make_config(tmp_path, dev_port, mqtt, interval=0.02, tags=tags))
    rec = Recorder()
    async with (
        RegisterServer([Machine(counters=4)], port=dev_port),
        running(gw, fast_sink(gw), FunctionSink("rec", rec)),
    ):
        health: dict[str, Any] = gw.health["mqtt"]
        await wait_for(lambda: health["connected"] and health["published"] > 20)
        await mosquitto_broker.astop()
        await wait_for(lambda: not health["connected"])
        # 4 tags x 50 polls/s go to the buffer on disk meanwhile; nothing is dropped.
        await wait_for(lambda: health["buffered"] > 50, 3)
        assert health["last_error"]
        await asyncio.sleep(0.3)
        await mosquitto_broker.astart()
        await wait_for(lambda: health["connected"], 5)
        assert health["reconnects"] == 1
        await wait_for(lambda: health["buffered"] == 0 and health["replayed"] > 50)
        assert health["dropped"] == 0
        restarted = time.time()
        await asyncio.sleep(0.2)
        # mosquitto kept nothing (persistence false): all retained state is republished.
        async with Watcher(mosquitto_broker.port, f"{BASE}/#") as w:
            await w.wait(lambda: w.latest(f"{LATHE}/c3") and w.latest(GATEWAY_TOPIC))
            assert w.latest(GATEWAY_TOPIC).json() == {"state": "online"}  # type: ignore[union-attr]
            assert w.latest(DEVICE_STATUS).json()["state"] == "online"  # type: ignore[union-attr]
            doc = w.latest(f"{LATHE}/c3").json()  # type: ignore[union-attr]
            assert doc["quality"] == "good"
            assert doc["ts_ms"] / 1000 > restarted - 0.5
    gaps = [b - a for a, b in zip(rec.times, rec.times[1:], strict=False)]
    # Enough polls to judge the gaps; the count itself depends on how loaded the machine is.
    assert len(rec.times) > 20
    assert max(gaps) < 0.25, max(gaps)
    messages = [r.getMessage() for r in caplog.records if r.name == "gateway.sinks.mqtt"]
    assert sum("failed" in m for m in messages) == 1, messages
    assert sum("recovered" in m for m in messages) == 1, messages


async def test_stalled_broker_keeps_memory_bounded(
    tmp_path: Path, mosquitto_broker: Mosquitto
) -> None:
    """A broker that stops reading (SIGSTOP) fills the socket, then paho's write queue (to a
    bound), then the buffer's in-memory window, then the buffer on disk; once it reads again,
    everything drains and the retained value is the newest."""
    mqtt = {"port": mosquitto_broker.port, "buffer": {"inflight": 100}}
    gw = Gateway(make_config(tmp_path, free_port(), mqtt))
    sink = fast_sink(gw)
    await sink.start()
    proc = mosquitto_broker.proc
    assert proc is not None
    try:
        await wait_for(lambda: sink._connected)
        client = sink._link.client
        assert client is not None
        proc.send_signal(signal.SIGSTOP)
        pad = "x" * 4000
        most = 0
        for i in range(6000):  # 24 MB: more than the kernel buffers of both ends hold
            reading = Reading("lathe-1/model", f"{i:06d}{pad}", Quality.GOOD, time.time())
            gw.bus.publish([reading])  # the latest value, which a restatement sends
            sink._on_batch_per_tag([reading])
            most = max(most, len(client._out_packet))
            if i % 20 == 0:
                await asyncio.sleep(0)
        # Connected all along: the buffer filled because paho's write queue was at its bound.
        assert sink._connected
        # paho's write queue stays bounded (the buffer's window may bind first).
        assert 0 < most <= MAX_PENDING_WRITES + 1
        st = sink._outbox.stats
        assert st["pending"] + st["in_flight"] <= 2 * 100  # live window + replay window
        assert st["stored"] > 1000
        assert st["dropped_full"] == st["dropped_age"] == 0
        proc.send_signal(signal.SIGCONT)
        await wait_for(
            lambda: sink._outbox.stats["queued_messages"] == 0 and not client.want_write(), 20
        )
        assert sink._link.reconnects == 0
        async with Watcher(mosquitto_broker.port, f"{LATHE}/model") as w:
            await w.wait(lambda: w.latest(f"{LATHE}/model"))
            assert w.latest(f"{LATHE}/model").json()["value"] == f"{5999:06d}{pad}"  # type: ignore[union-attr]
    finally:
        proc.send_signal(signal.SIGCONT)
        await sink.close()


async def test_two_gateways_sharing_a_client_id_do_not_flap_fast(
    tmp_path: Path, mosquitto: int, caplog: pytest.LogCaptureFixture
) -> None:
    """The broker hands the session to whoever connected last: without damping, the two
    would take it from each other several times a second, forever."""
    caplog.set_level(logging.WARNING, logger="gateway.sinks.mqtt")
    sinks = []
    for i in range(2):
        # Each its own data directory: two gateways never share one buffer file (it is locked).
        (tmp_path / str(i)).mkdir()
        gw = Gateway(make_config(tmp_path / str(i), free_port(), {"port": mosquitto}))
        assert gw.config.mqtt is not None
        sinks.append(MqttSink(gw, gw.config.mqtt, backoff=Backoff(base=0.2, cap=5.0)))
    try:
        for sink in sinks:
            await sink.start()
        await asyncio.sleep(2.5)
        # Undamped: ~16 in all. Damped: at most 4 each, as 0.1+0.2+0.4+0.8+1.6 s > 2.5 s.
        assert sum(s._link.reconnects for s in sinks) <= 8, [s._link.reconnects for s in sinks]
        assert any(s._link.reconnects >= 1 for s in sinks)
        assert "is another client using the client id 'gw-test'?" in caplog.text
    finally:
        for sink in sinks:
            await sink.close()


async def test_broker_down_at_start_does_not_block(tmp_path: Path) -> None:
    broker = Mosquitto(tmp_path / "mosquitto", free_port())
    gw = Gateway(make_config(tmp_path, free_port(), {"port": broker.port}))
    sink = fast_sink(gw)
    t0 = time.monotonic()
    await sink.start()
    assert time.monotonic() - t0 < 0.1
    try:
        health: dict[str, Any] = gw.health["mqtt"]
        await wait_for(lambda: health["last_error"] == "connection refused")
        assert health["connected"] is False
        await broker.astart()
        await wait_for(lambda: health["connected"], 5)
        assert health["reconnects"] == 0  # the first connection is not a reconnection
        assert health["last_error"] == ""
    finally:
        await sink.close()
        await sink.close()
        broker.stop()


def log_tail(path: Path) -> str:
    return path.read_text(errors="replace")[-3000:]


async def _start_gateway_process(
    loaded: LoadedConfig, w: Watcher, log_path: Path
) -> subprocess.Popen[bytes]:
    """``retrofit-gw run`` in a subprocess; returns once its values are on the broker."""
    with log_path.open("wb") as log_file:
        # Not asyncio's subprocess: in 3.11 it watches the child from a thread, and the
        # suite fails any test that leaves a thread behind.
        proc = subprocess.Popen(  # noqa: ASYNC220
            [sys.executable, "-m", "gateway", "run", str(loaded.path)],
            stdout=log_file,
            stderr=subprocess.STDOUT,
        )
    try:
        await w.wait(
            lambda: (
                proc.poll() is not None
                or (
                    (m := w.latest(GATEWAY_TOPIC)) is not None
                    and m.json()["state"] == "online"
                    and (s := w.latest(DEVICE_STATUS)) is not None
                    and s.json()["state"] == "online"
                )
            ),
            20,
        )
        assert proc.poll() is None, log_tail(log_path)
    except BaseException:
        proc.kill()
        proc.wait(5)
        raise
    return proc


async def test_gateway_process_says_offline_on_sigterm_and_by_will_on_kill(
    tmp_path: Path, mosquitto_broker: Mosquitto
) -> None:
    mosquitto = mosquitto_broker.port
    dev_port = free_port()
    loaded = make_config(tmp_path, dev_port, {"port": mosquitto, "keepalive": 5})
    async with RegisterServer([Machine()], port=dev_port), Watcher(mosquitto, f"{BASE}/#") as w:
        # SIGTERM: a clean stop publishes the final device state and "offline" itself.
        proc = await _start_gateway_process(loaded, w, tmp_path / "run1.log")
        try:
            proc.terminate()
            for _ in range(500):
                if proc.poll() is not None:
                    break
                await asyncio.sleep(0.02)
            assert proc.returncode == 0, log_tail(tmp_path / "run1.log")
            await w.wait(lambda: w.latest(GATEWAY_TOPIC).json()["state"] == "offline")  # type: ignore[union-attr]
            assert w.latest(DEVICE_STATUS).json()["state"] == "stopped"  # type: ignore[union-attr]
            assert "Client gw-test disconnected." in mosquitto_broker.log_text()
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait(5)
        # SIGKILL: no chance to say goodbye; the broker publishes the Last Will instead.
        proc = await _start_gateway_process(loaded, w, tmp_path / "run2.log")
        try:
            proc.kill()
            proc.wait(5)
            await w.wait(lambda: w.latest(GATEWAY_TOPIC).json()["state"] == "offline")  # type: ignore[union-attr]
            # Nobody said "stopped": the device status is as the gateway last saw it.
            assert w.latest(DEVICE_STATUS).json()["state"] == "online"  # type: ignore[union-attr]
            assert "Client gw-test closed its connection." in mosquitto_broker.log_text()
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait(5)
    async with Watcher(mosquitto, GATEWAY_TOPIC) as late:
        await late.wait(lambda: late.latest(GATEWAY_TOPIC))
        msg = late.latest(GATEWAY_TOPIC)
        assert msg is not None
        assert msg.retain
        assert msg.json() == {"state": "offline"}


async def test_credentials(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    broker = Mosquitto(tmp_path / "mosquitto", free_port(), users={"gw": "s3cret"})
    await broker.astart()
    try:
        cases = [
            ({"password_env": "GW_MQTT_PASSWORD"}, "wrong", False),
            ({"password_env": "GW_MQTT_PASSWORD"}, "s3cret", True),
            ({"password_file": "secrets/mqtt.txt"}, "s3cret\n", True),
            ({}, "", False),  # no password at all
        ]
        for extra, password, ok in cases:
            monkeypatch.setenv("GW_MQTT_PASSWORD", password)
            (tmp_path / "secrets").mkdir(exist_ok=True)
            (tmp_path / "secrets" / "mqtt.txt").write_text(password)
            mqtt = {"port": broker.port, "username": "gw", **extra}
            # The file is found relative to the config file, not the working directory.
            gw = Gateway(make_config(tmp_path, free_port(), mqtt))
            sink = fast_sink(gw)
            await sink.start()
            try:
                health: dict[str, Any] = gw.health["mqtt"]
                if ok:
                    await wait_for(lambda h=health: h["connected"])
                else:
                    await wait_for(lambda h=health: h["last_error"])
                    assert "not authori" in str(health["last_error"]).lower(), health
                    assert not health["connected"]
            finally:
                await sink.close()
        monkeypatch.delenv("GW_MQTT_PASSWORD")
        gw = Gateway(
            make_config(
                tmp_path,
                free_port(),
                {"port": broker.port, "username": "gw", "password_env": "GW_MQTT_PASSWORD"},
            )
        )
        sink = fast_sink(gw)
        await sink.start()
        try:
            await wait_for(lambda: gw.health["mqtt"]["last_error"])
            assert "GW_MQTT_PASSWORD is not set" in str(gw.health["mqtt"]["last_error"])
        finally:
            await sink.close()
    finally:
        await broker.astop()
    assert "s3cret" not in caplog.text


def test_readings_stamped_before_the_clock_was_set_are_rebased_when_it_steps(
    tmp_path: Path,
) -> None:
    """A Pi without an RTC boots an hour (or years) behind until NTP steps the clock. What was
    buffered meanwhile is marked, exempt from the age bound, and shifted by the measured step
    before it is replayed."""
    offset = [-3600.0]
    synced = [False]
    wall = lambda: time.time() + offset[0]  # noqa: E731
    gw = Gateway(make_config(tmp_path, free_port(), {"port": free_port()}))
    gw.clock = ClockWatch(SyncSource("injected", lambda: synced[0]), wall=wall)
    sink = fast_sink(gw)
    sink._build_topics()
    box = sink._outbox
    box.open()
    try:
        stale = wall()
        sink._on_batch_per_tag([Reading("lathe-1/speed", 1450, Quality.GOOD, stale)])
        assert box.stats["stored"] == 1
        # NTP arrives: the clock steps forward by an hour and is synchronised.
        offset[0] = 0.0
        synced[0] = True
        step = gw.clock.check()
        assert step is not None
        assert round(step.delta) == 3600
        sink._rebase_on_steps()
        sink._rebase_on_steps()  # once per step, however often it is asked
        fresh = time.time()
        sink._on_batch_per_tag([Reading("lathe-1/speed", 1451, Quality.GOOD, fresh)])
        data, _ = encode_publishes(box.next_replay(10), iter(range(1, 10)).__next__, {})
        docs = [json.loads(payload) for _, payload, _ in _decode_publishes(data)]
        first, second = docs
        assert first["value"] == 1450
        assert first["ts_ms"] == round(stale * 1000) + 3_600_000
        assert abs(first["ts_ms"] / 1000 - fresh) < 5  # now it tells the real time
        assert (
            first["ts"]
            == time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(first["ts_ms"] // 1000))
            + f".{first['ts_ms'] % 1000:03d}Z"
        )
        assert "clock_synced" not in first  # re-based: the time is right now
        assert second["value"] == 1451
        assert second["ts_ms"] == round(fresh * 1000)
        assert (first["seq"], second["seq"]) == (1, 2)
    finally:
        box.close()


def test_readings_from_an_unsynchronised_clock_say_so(tmp_path: Path) -> None:
    gw = Gateway(make_config(tmp_path, free_port(), {"port": free_port()}))
    gw.clock = ClockWatch(SyncSource("injected", lambda: False))
    sink = fast_sink(gw)
    sink._build_topics()
    box = sink._outbox
    box.open()
    try:
        sink._on_batch_per_tag([Reading("lathe-1/speed", 1450, Quality.GOOD, time.time())])
        data, _ = encode_publishes(box.next_replay(10), iter(range(1, 10)).__next__, {})
        (doc,) = [json.loads(payload) for _, payload, _ in _decode_publishes(data)]
        assert doc["clock_synced"] is False
        assert gw.clock.as_dict()["synced"] is False
    finally:
        box.close()

"""The Sparkplug B sink: the gateway as one Sparkplug B 3.0 edge node, each device a device.

Topics (``G`` = ``group_id``, ``E`` = ``edge_node_id``, default the gateway's name; ``D`` = a
device's name; metric names are tag names)::

    spBv1.0/G/NBIRTH/E     bdSeq and Node Control/Rebirth, at the start of every session
    spBv1.0/G/DBIRTH/E/D   every tag of the device: name, alias, datatype, value, Quality
    spBv1.0/G/DDATA/E/D    what changed since (report by exception), aliases only
    spBv1.0/G/DDEATH/E/D   the device went offline (DBIRTH again when it is back)
    spBv1.0/G/NDEATH/E     the Last Will (QoS 1), and published before a clean DISCONNECT
    subscribed, QoS 1:     spBv1.0/G/NCMD/E, spBv1.0/G/DCMD/E/+, spBv1.0/STATE/<primary host>

What a message holds, seq and bdSeq, aliases and the Quality property are
:class:`gateway.sparkplug.EdgeNode`'s business; this module is its MQTT I/O, over its own
:class:`gateway.sinks.mqtt.MqttLink` (clean session, client id ``<gateway>-sparkplug`` unless
configured). The Will is asked for before every CONNECT, so that it carries that session's
bdSeq. A session: CONNECT, SUBSCRIBE, then NBIRTH (seq 0) and a DBIRTH per device, then DDATA.
A device whose state goes offline (or stopped) gets a DDEATH, one that comes back a DBIRTH.
An NCMD with ``Node Control/Rebirth`` true repeats the births (same bdSeq, seq from 0). A
DCMD's metrics are writes through the runtime (``gateway.writes``: only tags with
``writable: true``, within their limits, read back and audited as user "sparkplug"); the
value read back shows in the next DDATA.

Primary host (``primary_host_id``): births wait until ``spBv1.0/STATE/<id>`` says
``{"online":true,"timestamp":...}``; a STATE older than the newest one seen is ignored. When
the host goes offline after our births, the node publishes its NDEATH, disconnects and
connects again (Sparkplug 3.0 §5, tck-id-message-flow-edge-node-birth-publish-phid-offline),
and waits for the host as at the start.

Store and forward: every DDATA goes through a :class:`gateway.outbox.Outbox` of its own
(``sparkplug-outbox.sqlite`` in the data directory, bounded by ``buffer:``), driven by
:class:`gateway.sinks.mqtt.BufferedPublisher` as the UNS sink's buffer is. It is sent at
once while the node is born (connected, and the primary host online); otherwise it goes to
disk. seq belongs to the session that sends a message, so a buffered DDATA has none: it is
stamped when it leaves the buffer (``payload.sequenced``), with the current aliases (it keeps
metric names and datatypes until then, so a changed configuration cannot misplace a value).
After the births of a new session, what waited is replayed oldest first at
``buffer.replay_rate``, beside live data, every metric ``is_historical``. Births and deaths
describe one session and are never buffered. A DDATA leaves the buffer on the broker's
PUBACK (``qos_data: 1``, the default, which Sparkplug's tck-id-topics-ddata-mqtt does not
allow: it asks for QoS 0) or once written to the connection (``qos_data: 0``). While
buffered DDATA waits, a dead device's DDEATH waits too: a DDATA after its DDEATH would make a
host ask for a rebirth; the device's metrics are Bad meanwhile.

Health ``runtime.health["sparkplug"]``: ``connected``, ``broker``, ``node`` (group/edge),
``bdseq``, ``seq`` (the last one sent), ``births``, ``host_online`` (None without a primary
host or before its STATE), ``queued``, ``buffered``, ``oldest_age_s``, ``published``,
``replayed``, ``dropped`` (and by cause), ``reconnects``, ``last_error``.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Callable, Sequence

from gateway.bus import Subscription
from gateway.config import SparkplugSection
from gateway.errors import WriteRefused
from gateway.logutil import OnceLogger
from gateway.model import Reading, TagKey, TagSpec
from gateway.outbox import Message, Stored
from gateway.runner import Backoff
from gateway.sinks.base import RuntimeView
from gateway.sinks.mqtt import BufferedPublisher, MqttLink, Will, encode_publishes
from gateway.sparkplug import (
    NAMESPACE,
    DataType,
    EdgeNode,
    MessageType,
    SparkplugError,
    command_subscriptions,
    decode,
    parse_command_topic,
    sequenced,
)
from gateway.sparkplug import Message as SpMessage
from gateway.status import DeviceState

__all__ = ["OUTBOX_FILE", "SparkplugSink"]

log = logging.getLogger("gateway.sinks.sparkplug")

#: The buffer's file in the data directory; fixed, like the UNS sink's.
OUTBOX_FILE = "sparkplug-outbox.sqlite"
#: How long the end of run() waits for queued DDATA to be written and acknowledged.
FLUSH_TIMEOUT = 5.0
#: A device in these states has (or gets) a DBIRTH; in the others a DDEATH. A device not yet
#: polled is born with null values, so that its first values can follow as DDATA.
_ALIVE = frozenset({DeviceState.ONLINE, DeviceState.STARTING})


class SparkplugSink:
    """Publishes every device as a Sparkplug B device of one edge node; see the module doc."""

    name = "sparkplug"

    def __init__(
        self, runtime: RuntimeView, section: SparkplugSection, *, backoff: Backoff | None = None
    ) -> None:
        self.runtime = runtime
        self.section = section
        gw = runtime.config.gateway
        self.node = EdgeNode(section.group_id, section.edge_node_id or gw.name, runtime.data_dir)
        # Registration fixes the aliases: config order, every device, every tag.
        specs: dict[str, list[TagSpec]] = {device: [] for device in runtime.statuses}
        for spec in runtime.tags:
            specs.setdefault(spec.device, []).append(spec)
        self._device_of: dict[TagKey, str] = {}
        self._machine_of: dict[str, str] = {}
        self._metrics: dict[str, dict[str, tuple[int, DataType]]] = {}
        for device, device_specs in specs.items():
            self.node.add_device(device, device_specs)
            self._metrics[device] = self.node.metrics(device)
            for spec in device_specs:
                self._device_of[spec.key] = device
                self._machine_of[device] = spec.machine
        self._ddata_prefix = f"{NAMESPACE}/{self.node.group_id}/{MessageType.DDATA}/"
        self._ddata_prefix += f"{self.node.edge_node_id}/"
        self._host_id = section.primary_host_id
        self._state_topic = None if self._host_id is None else f"{NAMESPACE}/STATE/{self._host_id}"
        #: The primary host as its STATE last said, in this session; None before it spoke.
        self._host_online: bool | None = None
        #: Timestamp of the newest STATE accepted, kept across sessions: an older one is stale.
        self._host_ts: int | None = None
        ncmd, dcmd = command_subscriptions(self.node.group_id, self.node.edge_node_id)
        subscriptions = [(ncmd, 1), (dcmd, 1)]
        if self._state_topic is not None:
            subscriptions.append((self._state_topic, 1))
        self._qos = section.qos_data
        self._deaths_waiting = False
        self._topic_parts: dict[str, bytes] = {}
        self._link = MqttLink(
            runtime,
            section,
            self,
            client_id=section.client_id or f"{gw.name}-sparkplug",
            will=self._will,
            subscriptions=subscriptions,
            backoff=backoff,
            name="Sparkplug",
        )
        self._buffer = BufferedPublisher(
            runtime,
            self._link,
            self,
            file=OUTBOX_FILE,
            buffer=section.buffer,
            qos=self._qos,
            logger=log,
            noun="DDATA",
            label="Sparkplug DDATA buffer",
        )
        self._once_bad = OnceLogger(log, "Sparkplug buffer")
        self._unknown_keys: set[TagKey] = set()
        self.births = 0
        self._buffer.update_health()
        runtime.health[self.name] = self._buffer.health

    # -- lifecycle -----------------------------------------------------------------------

    async def start(self) -> None:
        """Open the buffer, then connect in the background: never waits for the broker."""
        if self._buffer.started or self._buffer.closed:
            return
        self._buffer.start()

    async def run(self, sub: Subscription) -> None:
        buffer = self._buffer
        watcher = buffer.spawn(self._watch_status(), "status")
        try:
            while (batch := await sub.get()) is not None:
                self._on_batch(batch)
                buffer.update_health(force=False)
        finally:
            watcher.cancel()
            await asyncio.wait([watcher])
        # Drivers have stopped: send what is live in memory; what waits on disk stays there
        # for the next start. The NDEATH at close() says the devices are gone.
        await buffer.stop_replay()
        await buffer.flush(FLUSH_TIMEOUT)

    async def close(self) -> None:
        """NDEATH, DISCONNECT (bounded), release everything. Idempotent."""
        await self._buffer.close(self._goodbye)

    def _goodbye(self) -> Will | None:
        """The NDEATH of a session still up, published before the DISCONNECT."""
        if not (self._link.connected and self.node.bdseq is not None):
            return None
        death = self.node.ndeath()
        return Will(death.topic, death.payload, death.qos, death.retain)

    # -- the session ---------------------------------------------------------------------

    def _will(self) -> Will:
        """Before every CONNECT: the next bdSeq, and the NDEATH that carries it as the Will."""
        death = self.node.connect()
        self._buffer.update_health()
        return Will(death.topic, death.payload, death.qos, death.retain)

    def _born(self) -> bool:
        """The node's births hold: DDATA may go out."""
        return self._link.connected and self.node.online

    def _birth(self) -> None:
        """NBIRTH and every DBIRTH, then what waits: live DDATA, then the replay."""
        # DDATA still in memory was made against the previous BIRTHs; after the new ones,
        # whose values are newer, it may only go out as history.
        self._buffer.store_pending()
        self._publish_now(self.node.births())
        self.births += 1
        self._sync_devices()
        self._buffer.resume()
        self._buffer.update_health()

    def _publish_now(self, messages: Sequence[SpMessage]) -> None:
        """Births and deaths: straight to the connection, in seq order, never buffered.

        Raw like the DDATA, so that they keep their place among them in paho's write queue;
        and paho would send an unacknowledged QoS 1 NDEATH of its own again in the next
        session, whose bdSeq it does not carry.
        """
        stored = [
            Stored(0, Message(m.topic, m.payload, m.qos, m.retain, 0), False) for m in messages
        ]
        data, _ = encode_publishes(
            stored,
            self._link.next_mid,
            self._topic_parts,
            lambda s: s.message.payload,
            v5=self._link.v5,
        )
        self._buffer.send_raw(data, len(stored))

    def _sync_devices(self) -> None:
        """DBIRTH for each device that is back, DDEATH for each that went away.

        A DDEATH waits while buffered DDATA does: it may be that device's, and a DDATA
        after the DDEATH would be a protocol error to the host.
        """
        self._deaths_waiting = False
        if not self._born():
            return
        node = self.node
        out: list[SpMessage] = []
        for device, st in self.runtime.statuses.items():
            if device not in self._metrics:
                continue
            alive = st.state in _ALIVE
            born = node.born(device)
            if alive and not born:
                out.append(node.dbirth(device))
            elif born and not alive:
                if self._buffer.waiting():
                    self._deaths_waiting = True
                    continue
                out.append(node.ddeath(device))
        if out:
            self._publish_now(out)
            self._buffer.update_health()

    async def _watch_status(self) -> None:
        bus = self.runtime.bus
        seen = bus.status_version
        self._sync_devices()
        while True:
            seen = await bus.wait_status(seen)
            self._sync_devices()

    def _end_session(self, why: str) -> None:
        """NDEATH, DISCONNECT, and the link connects again (a new session, a new bdSeq)."""
        self._publish_now([self.node.ndeath()])
        self._link.end_session(why)

    # -- what the link tells us (LinkUser) -----------------------------------------------

    def link_up(self) -> None:
        """Subscribed; births now, or once the primary host says it is online."""
        self._host_online = None
        if self._host_id is None:
            self._birth()
        else:
            log.info(
                "Sparkplug: connected; waiting for primary host %s to be online", self._host_id
            )
        self._buffer.update_health()

    def link_down(self, unsent_raw: int) -> None:
        self._buffer.link_down(unsent_raw)
        self.node.offline()
        self._buffer.update_health()

    def link_writable(self) -> None:
        self._buffer.link_writable()

    def link_acked(self, mid: int) -> bool:
        return self._buffer.link_acked(mid)

    def link_message(self, topic: str, payload: bytes) -> None:
        if topic == self._state_topic:
            self._on_state(payload)
            return
        try:
            command = parse_command_topic(topic)
        except SparkplugError:
            return
        if (command.group_id, command.edge_node_id) != (self.node.group_id, self.node.edge_node_id):
            return
        if command.message_type is MessageType.NCMD:
            self._on_ncmd(payload)
        elif command.device_id is not None:
            self._buffer.spawn(
                self._on_dcmd(command.device_id, topic, payload), f"dcmd {command.device_id}"
            )

    async def _on_dcmd(self, device_id: str, topic: str, payload: bytes) -> None:
        """A DCMD: each metric (by name or alias) is a write through the runtime, with the
        same guard rails as every other write (gateway.writes). Sparkplug has no reply
        message: the result shows in the next DDATA (the value read back) and in the audit
        and log."""
        metrics = self._metrics.get(device_id)
        if metrics is None:
            log.warning("Sparkplug: DCMD for unknown device %s ignored", device_id)
            return
        by_alias = {alias: name for name, (alias, _) in metrics.items()}
        try:
            command = decode(payload, datatypes=dict(metrics.values()))
        except SparkplugError as exc:
            log.warning("Sparkplug: DCMD for %s does not decode: %s", device_id, exc)
            return
        machine = self._machine_of.get(device_id, device_id)
        for metric in command.metrics:
            name = metric.name or (by_alias.get(metric.alias) if metric.alias else None)
            if name is None or name not in metrics:
                log.warning("Sparkplug: DCMD for %s names no metric of it: %r", device_id, metric)
                continue
            key = f"{machine}/{name}"
            try:
                await self.runtime.write(
                    key, metric.value, user="sparkplug", origin=f"sparkplug {topic}"
                )
            except WriteRefused:
                continue  # audited and logged by the write service

    def _on_ncmd(self, payload: bytes) -> None:
        try:
            rebirth = self.node.rebirth_requested(payload)
        except SparkplugError as exc:
            log.warning("Sparkplug: NCMD ignored: %s", exc)
            return
        if not rebirth:
            log.info("Sparkplug: NCMD without a rebirth request ignored (read-only gateway)")
        elif not self._born():
            log.info("Sparkplug: rebirth requested before the births of this session; ignored")
        else:
            log.info("Sparkplug: rebirth requested by NCMD")
            self._birth()

    def _on_state(self, payload: bytes) -> None:
        """The primary host's STATE: Sparkplug 3.0 JSON ``{"online":bool,"timestamp":ms}``."""
        state = _parse_state(payload)
        if state is None:
            log.warning(
                "Sparkplug: STATE of primary host %s is not Sparkplug 3.0 JSON: %r; ignored",
                self._host_id,
                payload[:100],
            )
            return
        online, ts = state
        # The host's Will carries the timestamp of its online STATE, so equal is current.
        if self._host_ts is not None and ts < self._host_ts:
            log.info("Sparkplug: stale STATE of primary host %s ignored", self._host_id)
            return
        self._host_ts = ts
        was, self._host_online = self._host_online, online
        if online:
            if was is not True:
                log.info("Sparkplug: primary host %s is online", self._host_id)
            if self._link.connected and not self.node.online:
                self._birth()
        elif self._born():
            log.warning(
                "Sparkplug: primary host %s went offline: NDEATH, disconnect, connect again"
                " and wait for it; data is buffered meanwhile",
                self._host_id,
            )
            self._end_session(f"primary host {self._host_id} went offline")
        elif was is not False:
            log.info(
                "Sparkplug: primary host %s is offline; data is buffered until it is online",
                self._host_id,
            )
        self._buffer.update_health()

    # -- data ----------------------------------------------------------------------------

    def _on_batch(self, batch: Sequence[Reading]) -> None:
        """One poll of one device, usually: its DDATA of what changed, into the buffer."""
        by_device: dict[str, list[Reading]] = {}
        device_of = self._device_of
        for reading in batch:
            device = device_of.get(reading.key)
            if device is None:
                self._unknown(reading.key)
                continue
            group = by_device.get(device)
            if group is None:
                group = by_device[device] = []
            group.append(reading)
        synced = self.runtime.clock.synced is not False
        out: list[Message] = []
        for device, readings in by_device.items():
            ddata = self.node.ddata(device, readings, store=True)
            if ddata is None:
                continue
            ts_ms = round(max(r.source_ts for r in readings) * 1000)
            out.append(Message(ddata.topic, ddata.payload, self._qos, False, ts_ms, synced))
        if out:
            self._buffer.offer(out)

    def _unknown(self, key: TagKey) -> None:
        if key not in self._unknown_keys:
            self._unknown_keys.add(key)
            log.warning("Sparkplug: tag %s is not in the NBIRTH; its values are not sent", key)

    # -- what the buffer asks of the sink (BufferUser) -----------------------------------

    def buffer_ready(self) -> bool:
        return self._born()

    def buffer_wire(self, rows: list[Stored]) -> tuple[list[Stored], Callable[[Stored], bytes]]:
        """Buffered DDATA, each stamped with the next seq as it goes (seq belongs to the
        session that sends it), with this session's aliases."""
        node = self.node
        now_ms = round(time.time() * 1000)
        wire: dict[int, bytes] = {}
        ready: list[Stored] = []
        unusable: list[int] = []
        for s in rows:
            m = s.message
            payload = None
            device = m.topic[len(self._ddata_prefix) :]
            metrics = self._metrics.get(device) if m.topic.startswith(self._ddata_prefix) else None
            if metrics is not None:
                try:
                    payload = sequenced(
                        m.payload,
                        node.seq,
                        metrics=metrics,
                        timestamp=now_ms,
                        historical=s.historical,
                        shift_ms=m.rebased_ms,
                    )
                except SparkplugError as exc:
                    self._once_bad.failed(f"a buffered DDATA is unreadable ({exc}); dropped")
            if payload is None:
                # Another edge node's, a device or tags no longer configured, or corrupt.
                unusable.append(s.id)
                continue
            node.take_seq()
            wire[s.id] = payload
            ready.append(s)
        if unusable:
            self._buffer.discard(unusable)
        return ready, lambda s: wire[s.id]

    def buffer_acked(self) -> None:
        if self._deaths_waiting:
            # A DDEATH that waited for the buffered DDATA goes as soon as that is acked;
            # _sync_devices updates the health entry itself when it sends one.
            self._sync_devices()
        # Once per batch of PUBACKs: the full entry at most every HEALTH_EVERY_S, like the
        # other busy paths (its oldest age scans the messages in flight and reads SQLite);
        # in between only the counters, so "queued", "seq" and the rest stay exact.
        self._buffer.update_health(force=False, counters=True)

    def buffer_replayed(self) -> None:
        if self._deaths_waiting:
            self._sync_devices()

    def buffer_health(self, health: dict[str, object], stats: dict[str, int]) -> None:
        node = self.node
        health["node"] = f"{node.group_id}/{node.edge_node_id}"
        health["bdseq"] = node.bdseq
        health["seq"] = (node.seq - 1) % 256 if node.online else None
        health["births"] = self.births
        health["primary_host"] = self._host_id
        health["host_online"] = self._host_online
        health["dropped_unusable"] = self._buffer.discarded


def _parse_state(payload: bytes) -> tuple[bool, int] | None:
    """``(online, timestamp)`` of a Sparkplug 3.0 STATE payload, or None if it is not one."""
    try:
        doc = json.loads(payload)
    except ValueError:
        return None
    if not isinstance(doc, dict):
        return None
    online, ts = doc.get("online"), doc.get("timestamp")
    if type(online) is not bool or type(ts) is not int:
        return None
    return online, ts

"""The MQTT sink: every tag as a Unified Namespace topic, published by exception.

Topics (``P`` = ``<topic_prefix>/<site>/<area>/<line>``, ``M`` = ``P/<machine>``)::

    M/<tag>                  one tag's value (topic_shape per_tag), retained if retain_values
    M/$device/<device>       every changed tag of one poll of one device (per_device), never
                             retained
    M/$status/<device>       the device's state and error counters, retained
    M/$status                "online" when every device of the machine is online, retained
    P/$gateway/<name>        "online" while connected, "offline" on a clean close and as the
                             Last Will, retained

Payloads are compact UTF-8 JSON::

    M/<tag>            {"value":1450,"unit":"rpm","quality":"good",
                        "ts":"2026-11-21T06:50:00.123Z","ts_ms":1795243800123}
                       not good: "quality":"bad"|"uncertain" plus "reason" and "detail";
                       "unit" is null for a tag without one; "value" is null before the first
                       read (and never a non-finite float).
    M/$device/<dev>    {"device":"lathe-1-cnc","ts_ms":...,"values":{"<tag>":{"value":...,
                        "quality":"good","ts_ms":...}, ...}} (not good: plus reason, detail)
    M/$status/<dev>    {"state":"online","last_error":null,"last_error_ts":null,
                        "last_success_ts":"2026-...Z","errors":{"timeout":3}}
    M/$status          {"state":"online"}  (or "offline")
    P/$gateway/<name>  {"state":"online"}  (or "offline")

A tag is published when its value moved by more than its deadband (any change without one),
when its quality or reason changed, and every ``heartbeat`` seconds if configured.

Nothing lost: every value message goes through one buffer (``gateway.outbox``). While the
broker keeps up it stays in memory until the broker's PUBACK (QoS 1, the default); while the
connection is down, or more than ``buffer.inflight`` messages await their PUBACK, messages go
to a SQLite file in the data directory (``mqtt-outbox.sqlite``), in one transaction per poll.
On reconnect they are replayed oldest first at ``buffer.replay_rate`` beside the live data,
with ``"historical":true`` and never retained (a replayed value must not replace a newer
one); once the replay is done the retained topics are restated. Every message from the
buffer carries ``"seq"``: its buffer id, increasing in the order the values were read and
kept across restarts, so a subscriber sees gaps and duplicates (at least once: a message
sent when the connection broke is sent again). The refresh after every (re)connect (the
gateway "online", every status, every tag's latest value, retained) is not buffered data
and carries no seq. Status topics are state, not history: published on change while
connected, restated on every connect, never buffered. The health entry
``runtime.health["mqtt"]`` holds ``connected``, ``broker``, ``queued`` (not yet acked),
``buffered`` and ``buffered_bytes`` (on disk), ``oldest_age_s``, ``published``, ``replayed``,
``dropped`` (and by cause: ``dropped_full``, ``dropped_age``, ``dropped_io``),
``reconnects`` and ``last_error``. A relative ``password_file`` is read relative to the
config file's directory, at every attempt.

Why not paho's own loop: its ``loop_start()`` thread, its blocking ``connect()`` and its
reconnect loop would each stall or race the event loop that polls the machines. Here paho
is a protocol engine only: asyncio makes the TCP connection and watches the socket (the
``on_socket_*`` callbacks, as aiomqtt does), and this module owns retries with the same
jittered backoff as the device runners.

Why raw packets: ``Client.publish()`` costs ~19 µs per message (a Condition object, a lock,
a send() per packet). Value messages are therefore encoded here from precomputed topic bytes
and handed to paho's write queue as one buffer per poll; QoS 1 packet ids come from paho's
own sequence and the PUBACKs are routed back here by a hook (``_Client._handle_pubackcomp``).
Status messages go through ``publish()`` as usual.

TLS (``tls:``, shared by the ``mqtt:`` and ``sparkplug:`` sections): TLS 1.2 or newer, the
broker's certificate checked against ``ca_file`` (default: the system's CAs) and its name
against ``server_name`` (default: ``host``); ``cert_file``/``key_file`` for a broker that
asks for a client certificate. The context is built from the files at every attempt (kept
while they are unchanged), so renewed certificates take effect without a restart; relative
paths are relative to the config file. The handshake runs on the event loop, non-blocking
and bounded by CONNECT_TIMEOUT, and paho is handed the finished ``ssl.SSLSocket``.
``tls.insecure_skip_verify``, ``tls.verify_hostname: false`` and plain TCP to a broker not on
loopback each log a WARNING at every start.

MQTT version (``protocol``): ``auto`` (default) sends an MQTT 5 CONNECT; a broker that
answers "unsupported protocol version", closes the connection before any CONNACK, or says
nothing for V5_CONNACK_TIMEOUT is asked again at once in 3.1.1, and once that works the link
stays on 3.1.1 until the process restarts. In MQTT 5 the raw PUBLISH packets carry an empty
property list, a PUBACK's reason code is read (>= 0x80: the broker refused the message; it
is dropped, and logged once per connection), and the broker's Receive Maximum is shared
between our raw QoS 1 packets and paho's own publishes, so that the two never exceed it
together.

paho internals relied on (paho-mqtt is pinned to ~=2.2.0; check each on an upgrade):

- ``_create_socket_connection``, overridden: returns the socket asyncio connected (with TLS
  already done). paho's ``_ssl`` stays False, or its ``_create_socket`` would wrap the
  socket again with a blocking handshake.
- ``loop_read`` reads one packet per call and does not look at ``SSLSocket.pending()``
  (only paho's own select loop ``_loop`` does, paho issue #131): with TLS, what is left of a
  record waits decrypted inside the SSL object, invisible to the event loop, so the reader
  here drains it.
- ``_sock_recv``/``_sock_send``, overridden to keep the ``ssl.SSLError`` that paho logs and
  turns into a lost connection (a TLS alert after the handshake: a client certificate the
  broker refused under TLS 1.3), so that the error says what happened.
- ``_handle_pubackcomp`` and ``_in_packet["packet"]``: a PUBACK's packet id (the first two
  bytes, in 3.1.1 and 5) and MQTT 5 reason code (the third byte, if any).
- ``_packet_queue`` and ``_mid_generate``: raw packets in paho's write queue, with packet ids
  from paho's own sequence.
- ``_out_packet`` and ``_out_messages``: the bounds of what waits in paho.
- ``_max_inflight_messages``, set in ``on_connect`` (the public setter refuses on an open
  connection): paho's part of the broker's Receive Maximum, from that CONNACK.
- ``_sock_close``: dropping the socket after a failure.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import json
import logging
import math
import os
import socket
import ssl
import time
from collections.abc import Callable, Coroutine, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion, MQTTErrorCode
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.reasoncodes import ReasonCode

from gateway.bus import Subscription
from gateway.clock import ClockWatch
from gateway.config import BrokerSection, BufferSection, MqttSection
from gateway.errors import WriteRefused
from gateway.logutil import OnceLogger
from gateway.model import DataType, Quality, Reading, Reason, TagKey, TagSpec, Value
from gateway.outbox import Message, Outbox, Stored
from gateway.runner import Backoff
from gateway.sinks.base import RuntimeView
from gateway.status import DeviceState, DeviceStatus

__all__ = [
    "BufferUser",
    "BufferedPublisher",
    "LinkUser",
    "MqttLink",
    "MqttSink",
    "Will",
    "encode_publishes",
    "rebase_buffer",
    "replay_stored",
    "value_json",
    "wait_until",
]

log = logging.getLogger("gateway.sinks.mqtt")

#: TCP connect plus CONNACK.
CONNECT_TIMEOUT = 10.0
#: How long a TLS 1.3 connect waits after the handshake for the broker's verdict on our client
#: certificate (session tickets or an alert) before sending CONNECT; see _after_handshake.
TLS13_SETTLE = 0.2
#: protocol auto: how long an MQTT 5 CONNECT waits for its CONNACK before 3.1.1 is tried. A
#: 3.1.1-only broker may neither answer nor close (amqtt, the demo's broker, does that).
V5_CONNACK_TIMEOUT = 3.0
#: How long close() waits for "offline" to be acknowledged and the DISCONNECT to be written.
CLOSE_TIMEOUT = 2.0
#: How long the end of run() waits for queued messages to be written.
FLUSH_TIMEOUT = 5.0
#: Queued messages are handed to paho in buffers of about this size: paho re-slices a
#: partly sent buffer, so one huge buffer would be copied once per send() call.
CHUNK_BYTES = 64 * 1024
#: Above this many buffers waiting in paho's write queue (a slow broker or link), new
#: messages go to our bounded queue instead, so memory stays bounded while connected too.
MAX_PENDING_WRITES = 64
#: The same for QoS 1 messages waiting for their PUBACK.
MAX_PENDING_ACKS = 1000
#: The buffer's file in the data directory. Fixed, so that a changed client id or topic
#: layout never orphans what was buffered under the old one.
OUTBOX_FILE = "mqtt-outbox.sqlite"
#: Packets read per readable event before other callbacks get a turn.
READ_BURST = 4096
#: The health entry (and the oldest message's age, a SQLite read) at most this often.
HEALTH_EVERY_S = 0.25
#: Live messages handed to the connection per step, and replayed ones per step.
PUMP_CHUNK = 2000
REPLAY_CHUNK = 500
#: A connection that lasted this long was a good one: the retry backoff starts over. One
#: that broke sooner keeps the backoff growing, so a flapping link (two gateways sharing a
#: client id take the session from each other) settles at one attempt per backoff cap
#: instead of a reconnect, a full republish and two log lines several times a second.
STABLE_AFTER = 10.0

#: paho's own QoS 1 publishes (states) in flight, unless the broker's Receive Maximum is less.
PAHO_INFLIGHT = 100

_PUBLISH = 0x30
_KEEPALIVE_TIMEOUT = 141  # MQTT 5 reason code; paho uses it for a missed PINGRESP
# CONNACK reason codes (MQTT 5 §3.2.2.2); paho maps a 3.1.1 broker's answers onto them.
_UNSUPPORTED_VERSION = 132
_BAD_LOGIN = frozenset({134, 135})  # bad user name or password, not authorized
_ONLINE = b'{"state":"online"}'
_OFFLINE = b'{"state":"offline"}'
_QUALITY = {Quality.GOOD: "good", Quality.UNCERTAIN: "uncertain", Quality.BAD: "bad"}


def _json_str(text: str) -> str:
    return json.dumps(text, ensure_ascii=False)


def _unchanged(
    tag: _Tag, value: object, quality: Quality, reason: Reason, now: float, heartbeat: float
) -> bool:
    """Report by exception, the one rule for both topic shapes: True if nothing to send.

    Unchanged means same quality and reason, the heartbeat not yet due, and the value equal
    to the last *sent* one or, for numbers, within the tag's deadband of it (so slow drift is
    still reported once it adds up).
    """
    if quality is not tag.quality or reason is not tag.reason or now - tag.sent >= heartbeat:
        return False
    last = tag.value
    if value == last:
        return True
    band = tag.deadband
    return (
        band is not None
        and isinstance(value, int | float)
        and isinstance(last, int | float)
        and -band <= value - last <= band
    )


def value_json(value: Value | None) -> str:
    """A reading's value as a JSON literal; None and non-finite floats become null."""
    kind = type(value)
    if kind is int:
        return str(value)
    if kind is float:
        # x - x is 0.0 for every finite float and nan for inf and nan: cheaper than isfinite.
        return repr(value) if value - value == 0.0 else "null"  # type: ignore[operator]
    if kind is bool:
        return "true" if value else "false"
    if value is None:
        return "null"
    if isinstance(value, str):
        return _json_str(value)
    if isinstance(value, int):  # an int subclass (an IntEnum from a custom driver)
        return str(int(value))
    if isinstance(value, float):
        return repr(float(value)) if math.isfinite(value) else "null"
    return _json_str(str(value))


def _iso_ms(ts_ms: int) -> str:
    secs, ms = divmod(ts_ms, 1000)
    return f"{time.strftime('%Y-%m-%dT%H:%M:%S', time.gmtime(secs))}.{ms:03d}Z"


def _iso(ts: float | None) -> str | None:
    return None if ts is None else _iso_ms(round(ts * 1000))


def _remaining_length(n: int) -> bytes:
    out = bytearray()
    while True:
        byte, n = n & 0x7F, n >> 7
        out.append(byte | 0x80 if n else byte)
        if not n:
            return bytes(out)


def _packet(first: int, topic_part: bytes, payload: bytes, v5: bool = False) -> bytes:
    """One PUBLISH packet without packet id (QoS 0); in MQTT 5 with an empty property list."""
    if v5:
        topic_part += b"\x00"
    return (
        bytes((first,)) + _remaining_length(len(topic_part) + len(payload)) + topic_part + payload
    )


def _topic_part(topic: str) -> bytes:
    data = topic.encode()
    return len(data).to_bytes(2, "big") + data


def _wire_payload(s: Stored) -> bytes:
    """The payload as sent: ``seq`` (the buffer's id: gaps and duplicates are visible to a
    subscriber), ``historical`` when replayed, ``clock_synced: false`` when stamped before
    the clock was set, and the timestamps shifted when the buffer re-based them."""
    m = s.message
    payload = m.payload
    if m.rebased_ms:
        payload = _rebased(payload, m.rebased_ms)
    head = b'{"seq":%d,' % s.id
    if s.historical:
        head += b'"historical":true,'
    if not m.clock_synced:
        head += b'"clock_synced":false,'
    return head + payload[1:]


def encode_publishes(
    stored: Sequence[Stored],
    next_mid: Callable[[], int],
    topic_parts: dict[str, bytes],
    wire: Callable[[Stored], bytes] = _wire_payload,
    *,
    v5: bool = False,
) -> tuple[bytes, list[tuple[int, int]]]:
    """Buffered messages as concatenated PUBLISH packets, and for the QoS 1 ones (packet id,
    outbox id). ``topic_parts`` caches each topic's encoded form; ``wire`` makes the payload
    as sent (the UNS JSON's by default; Sparkplug stamps its seq). ``v5``: MQTT 5 packets,
    whose variable header ends with a property list (empty here, MQTT 5 §3.3.2.3)."""
    props = b"\x00" if v5 else b""
    extra = len(props)
    parts: list[bytes] = []
    add = parts.append
    mids: list[tuple[int, int]] = []
    for s in stored:
        m = s.message
        topic_part = topic_parts.get(m.topic)
        if topic_part is None:
            if len(topic_parts) > 100_000:
                topic_parts.clear()
            topic_part = topic_parts[m.topic] = _topic_part(m.topic)
        payload = wire(s)
        # Historical messages are never retained: they would replace a newer value.
        retain = m.retain and not s.historical
        if m.qos:
            mid = next_mid()
            mids.append((mid, s.id))
            length = len(topic_part) + 2 + extra + len(payload)
            add(bytes((0x32 | retain,)) + _remaining_length(length))
            add(topic_part)
            add(mid.to_bytes(2, "big") + props)
        else:
            add(bytes((0x30 | retain,)) + _remaining_length(len(topic_part) + extra + len(payload)))
            add(topic_part)
            if extra:
                add(props)
        add(payload)
    return b"".join(parts), mids


def _rebased(payload: bytes, offset_ms: int) -> bytes:
    """Every ``ts_ms`` (and the ``ts`` beside it) moved by the measured clock step."""
    doc = json.loads(payload)

    def shift(node: object) -> None:
        if isinstance(node, dict):
            if isinstance(node.get("ts_ms"), int):
                node["ts_ms"] += offset_ms
                if "ts" in node:
                    node["ts"] = _iso_ms(node["ts_ms"])
            for child in node.values():
                shift(child)

    shift(doc)
    return json.dumps(doc, ensure_ascii=False, separators=(",", ":")).encode()


class _Tag:
    """Per-tag precomputed strings and the last state published, for report by exception."""

    __slots__ = (
        "deadband",
        "dev_head",
        "device",
        "good",
        "name",
        "quality",
        "reason",
        "sent",
        "topic",
        "topic_part",
        "unit_q",
        "value",
    )

    def __init__(self, spec: TagSpec, topic: str) -> None:
        self.name = spec.name
        self.device = spec.device
        self.topic = topic
        self.topic_part = _topic_part(topic)
        unit = "null" if spec.unit is None else _json_str(spec.unit)
        self.good = f',"unit":{unit},"quality":"good"'
        self.unit_q = f',"unit":{unit},"quality":"'
        self.dev_head = f'{_json_str(spec.name)}:{{"value":'
        datatype = DataType.of(spec.datatype)
        self.deadband = spec.deadband if datatype is not None and datatype.is_numeric else None
        # Nothing published yet: the first reading always differs (quality None).
        self.value: Value | None = None
        self.quality: Quality | None = None
        self.reason: Reason | None = None
        self.sent = -math.inf


class _Client(mqtt.Client):
    """paho's client, handed a connection that asyncio made (paho's connect blocks)."""

    next_socket: socket.socket | None = None
    #: Called with the packet id and reason code (0 in 3.1.1) of every PUBACK; True means it
    #: was one of our raw QoS 1 packets (paho never saw them, so its own bookkeeping must not
    #: run).
    raw_acked: Callable[[int, int], bool] | None = None
    #: The TLS failure that ended the connection, if one did.
    tls_error: ssl.SSLError | None = None

    def _create_socket_connection(self) -> socket.socket:
        sock, self.next_socket = self.next_socket, None
        if sock is None:
            raise ConnectionError("no connected socket to hand to paho")
        return sock

    def _sock_recv(self, bufsize: int) -> bytes:
        try:
            return super()._sock_recv(bufsize)
        except ssl.SSLError as exc:
            self._keep(exc)
            raise

    def _sock_send(self, buf: bytes | bytearray) -> int:
        try:
            return super()._sock_send(buf)
        except ssl.SSLError as exc:
            self._keep(exc)
            raise

    def _keep(self, exc: ssl.SSLError) -> None:
        # paho has already turned want-read/want-write into BlockingIOError: this is a real
        # failure, which paho would only log. An EOF is the peer closing: said elsewhere.
        if self.tls_error is None and not isinstance(exc, ssl.SSLEOFError):
            self.tls_error = exc

    def _handle_pubackcomp(self, cmd: Any) -> MQTTErrorCode:
        hook = self.raw_acked
        if hook is not None and cmd == "PUBACK":
            packet = self._in_packet["packet"]
            # The packet id first (3.1.1 §3.4.2); MQTT 5 may follow it with a reason code,
            # absent meaning success (5 §3.4.2.1).
            mid = int.from_bytes(packet[:2], "big")
            if hook(mid, packet[2] if len(packet) > 2 else 0):
                return MQTTErrorCode.MQTT_ERR_SUCCESS
        return super()._handle_pubackcomp(cmd)


class _Refused(Exception):
    """The broker answered CONNACK with an error, or closed before answering; or the
    connection could not be set up (TLS, credentials)."""

    def __init__(self, message: str, *, version: bool = False) -> None:
        super().__init__(message)
        #: Worth asking again in MQTT 3.1.1: the broker refused the version, or closed the
        #: connection before answering (what a broker without MQTT 5 may do).
        self.version = version


class LinkUser(Protocol):
    """What a sink on an :class:`MqttLink` hears from it; every call runs in the event loop."""

    def link_up(self) -> None:
        """CONNACK arrived: publish what a new connection needs (births, states)."""

    def link_down(self, unsent_raw: int) -> None:
        """The socket closed; ``unsent_raw`` raw messages were still in paho's write queue."""

    def link_writable(self) -> None:
        """paho's write queue ran empty: room for what waits."""

    def link_acked(self, mid: int) -> bool:
        """A PUBACK arrived for ``mid``, a packet id from :meth:`MqttLink.next_mid` (the
        result is not used)."""

    def link_message(self, topic: str, payload: bytes) -> None:
        """A message arrived on a subscribed topic."""


@dataclass(frozen=True, slots=True)
class Will:
    topic: str
    payload: bytes
    qos: int
    retain: bool


class MqttLink:
    """One MQTT connection, driven from the event loop: connect, hold, reconnect with backoff.

    paho is used as a protocol engine only (see the module docstring). The link publishes
    nothing by itself; its user (:class:`LinkUser`) is told when the connection comes and
    goes, and sends through :meth:`queue_raw` (with :meth:`next_mid` for QoS 1) and
    :meth:`publish`. The Last Will is asked for before every connect, because a Sparkplug
    edge node's changes per session (its bdSeq).
    """

    def __init__(
        self,
        runtime: RuntimeView,
        section: BrokerSection,
        user: LinkUser,
        *,
        client_id: str,
        will: Callable[[], Will | None],
        subscriptions: Sequence[tuple[str, int]] = (),
        backoff: Backoff | None = None,
        name: str = "MQTT",
    ) -> None:
        self.runtime = runtime
        self.section = section
        self.user = user
        self.client_id = client_id
        self.broker = f"{section.host}:{section.port}"
        self.name = name
        self._will = will
        self._subscriptions = list(subscriptions)
        # Capped at 5 s, not the devices' 30: a connect attempt costs the broker one TCP
        # handshake, and every second the broker is back but we are not, the buffer grows.
        # Measured: a 30 s cap reconnected 26.5 s after a 60 s outage ended.
        self._backoff = backoff or Backoff(base=0.5, cap=5.0)
        self.client: _Client | None = None
        self.info = mqtt.MQTTMessageInfo(0)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._task: asyncio.Task[None] | None = None
        self.fd: int | None = None
        #: paho has something to write (its register_write); a write is scheduled or waits
        #: for the socket. ``_writer``: an event-loop writer is added for the rest.
        self._writing = False
        self._writer = False
        self._lost = asyncio.Event()
        self._connack: asyncio.Future[None] | None = None
        self._lost_reason = ""
        self.connected = False
        self._ever_connected = False
        self.closed = False
        self._once = OnceLogger(log, f"{name} broker {self.broker}")
        self.reconnects = 0
        self.last_error = ""
        self._ended = False
        self.on_change: Callable[[], None] = lambda: None
        #: The MQTT version and TLS version of the current (or last) connection.
        self.protocol: str | None = None
        self.tls_version: str | None = None
        #: auto: the broker refused MQTT 5 and took 3.1.1; kept until the process ends.
        self._v311_learned = False
        self._client_v5: bool | None = None
        # Raw QoS 1 packet ids sent and not yet acknowledged, and how many the broker's
        # Receive Maximum leaves for them (None: no limit).
        self._raw_mids: set[int] = set()
        self._raw_quota: int | None = None
        self.refused = 0
        self._refusal_logged = False
        self._tls_cache: tuple[object, ssl.SSLContext] | None = None

    # -- lifecycle -----------------------------------------------------------------------

    def start(self) -> None:
        """Connect in the background; never waits for the broker."""
        if self._task is not None or self.closed:
            return
        self._loop = asyncio.get_running_loop()
        self._warn_if_insecure()
        self._client_for(self._want_v5())
        self._task = asyncio.create_task(self._maintain(), name=f"{self.name.lower()}[link]")
        self._task.add_done_callback(self._crashed)

    async def close(self, goodbye: Will | None = None) -> None:
        """Publish ``goodbye`` (bounded wait for its ack), DISCONNECT, release. Idempotent."""
        if self.closed:
            return
        self.closed = True
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            await asyncio.wait([task])
        client = self.client
        if client is not None and self.connected:
            if goodbye is not None:
                info = client.publish(goodbye.topic, goodbye.payload, goodbye.qos, goodbye.retain)
                await wait_until(
                    lambda: info.is_published() and not client.want_write(), CLOSE_TIMEOUT
                )
            client.disconnect()
            await wait_until(lambda: self.fd is None, CLOSE_TIMEOUT)
        self.hard_close()
        self.connected = False

    def _crashed(self, task: asyncio.Task[None]) -> None:
        """A bug in a background task must not leave MQTT silently dead: say so, loudly."""
        if task.cancelled() or task.exception() is None:
            return
        self.last_error = f"internal error: {task.exception()!r}"
        self.on_change()
        log.error("%s: %s stopped by a bug", self.name, task.get_name(), exc_info=task.exception())

    def _warn_if_insecure(self) -> None:
        """Every start, so that an insecure setting is never forgotten in a running plant."""
        sec = self.section
        tls = sec.tls
        where = f"{self.name}: {self.broker}"
        if tls is None:
            if not _loopback(sec.host):
                what = "the password and every message" if sec.username else "every message"
                log.warning(
                    "%s: no TLS: %s cross the network in clear text, readable and forgeable "
                    "on the way; configure %s.tls (see the README)",
                    where,
                    what,
                    self.name.lower(),
                )
        elif tls.insecure_skip_verify:
            log.warning(
                "%s: tls.insecure_skip_verify is on: the broker's certificate is not checked, "
                "so anyone on the network path can pose as the broker and read what is sent",
                where,
            )
        elif not tls.verify_hostname:
            log.warning(
                "%s: tls.verify_hostname is off: any certificate the CA signed is taken as "
                "the broker's",
                where,
            )

    def _make_client(self, v5: bool) -> _Client:
        client = _Client(
            CallbackAPIVersion.VERSION2,
            client_id=self.client_id,
            # A clean session either way: MQTT 5's clean start, with no session expiry.
            clean_session=None if v5 else True,
            protocol=mqtt.MQTTv5 if v5 else mqtt.MQTTv311,
            reconnect_on_failure=False,
        )
        client.max_inflight_messages_set(PAHO_INFLIGHT)
        client.raw_acked = self._raw_acked
        client.on_connect = self._on_connect
        client.on_disconnect = self._on_disconnect
        client.on_message = self._on_message
        client.on_socket_open = self._on_socket_open
        client.on_socket_close = self._on_socket_close
        client.on_socket_register_write = self._on_socket_register_write
        client.on_socket_unregister_write = self._on_socket_unregister_write
        # Stores host, port and keepalive only; the connection is made in _connect_once.
        if v5:
            client.connect_async(
                self.section.host, self.section.port, self.section.keepalive, clean_start=True
            )
        else:
            client.connect_async(self.section.host, self.section.port, self.section.keepalive)
        return client

    def _config_path(self, name: str) -> Path:
        """A file named in the config: relative to the config file, as the schema says."""
        path = Path(name)
        if not path.is_absolute():
            loaded = getattr(self.runtime, "loaded", None)
            base = getattr(loaded, "path", None)
            path = (Path(base).parent if base is not None else Path.cwd()) / path
        return path

    def _password(self) -> str | None:
        """Read at every attempt, so that a fixed password file takes effect without restart."""
        sec = self.section
        if sec.password_env:
            value = os.environ.get(sec.password_env)
            if value is None:
                raise _Refused(f"environment variable {sec.password_env} is not set")
            return value
        if sec.password_file:
            path = self._config_path(sec.password_file)
            try:
                return path.read_text(encoding="utf-8").rstrip("\r\n")
            except OSError as exc:
                raise _Refused(f"cannot read password file {path}: {exc.strerror}") from None
        return None

    def _tls_name(self) -> str:
        tls = self.section.tls
        return (tls.server_name if tls is not None else None) or self.section.host

    def _tls_context(self) -> ssl.SSLContext | None:
        """The client context from ``tls:``, rebuilt when one of its files changed."""
        tls = self.section.tls
        if tls is None:
            return None
        files: list[tuple[str, Path]] = []
        if tls.ca_file is not None and not tls.insecure_skip_verify:
            files.append(("tls.ca_file", self._config_path(tls.ca_file)))
        if tls.cert_file is not None:
            files.append(("tls.cert_file", self._config_path(tls.cert_file)))
        if tls.key_file is not None:
            files.append(("tls.key_file", self._config_path(tls.key_file)))
        stamp: list[object] = []
        for field, path in files:
            try:
                st = path.stat()
            except OSError as exc:
                raise _Refused(f"TLS: cannot read {field} {path}: {exc.strerror}") from None
            stamp.append((path, st.st_mtime_ns, st.st_size, st.st_ino))
        if self._tls_cache is not None and self._tls_cache[0] == stamp:
            return self._tls_cache[1]
        paths = dict(files)
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)  # CERT_REQUIRED, check_hostname
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        if tls.insecure_skip_verify:
            ctx.check_hostname = False
            ctx.verify_mode = ssl.CERT_NONE
        else:
            ctx.check_hostname = tls.verify_hostname
            ca = paths.get("tls.ca_file")
            if ca is None:
                ctx.load_default_certs()
            else:
                try:
                    ctx.load_verify_locations(cafile=ca)
                except ssl.SSLError as exc:
                    raise _Refused(
                        f"TLS: tls.ca_file {ca} holds no usable CA certificate (PEM expected; "
                        f"{exc.reason or exc})"
                    ) from None
                except OSError as exc:
                    raise _Refused(f"TLS: cannot read tls.ca_file {ca}: {exc.strerror}") from None
        cert = paths.get("tls.cert_file")
        if cert is not None:
            key = paths.get("tls.key_file")
            env = tls.key_password_env

            def password() -> str:
                # Without a callback OpenSSL would ask on the terminal for an encrypted key.
                if env is None:
                    raise _Refused(
                        f"TLS: the key {key or cert} is encrypted: set tls.key_password_env"
                    )
                value = os.environ.get(env)
                if value is None:
                    raise _Refused(f"environment variable {env} is not set")
                return value

            try:
                ctx.load_cert_chain(cert, key, password)
            except ssl.SSLError as exc:
                raise _Refused(
                    f"TLS: cannot use the client certificate {cert}"
                    f"{f' with the key {key}' if key else ''} ({exc.reason or exc}: a PEM "
                    "certificate and its own key expected, and the key's password if any)"
                ) from None
            except OSError as exc:
                raise _Refused(f"TLS: cannot read {cert}: {exc.strerror}") from None
        self._tls_cache = (stamp, ctx)
        return ctx

    # -- sending -------------------------------------------------------------------------

    @property
    def v5(self) -> bool:
        """The connection speaks MQTT 5: what raw packets must be encoded for."""
        return self.protocol == "5"

    def backlogged(self) -> bool:
        client = self.client
        assert client is not None
        return (
            len(client._out_packet) > MAX_PENDING_WRITES
            or len(client._out_messages) > MAX_PENDING_ACKS
        )

    def room(self, n: int) -> int:
        """How many of ``n`` raw QoS 1 messages may be sent now: the broker's Receive
        Maximum (MQTT 5) binds how many wait for their PUBACK. Not a backlog: what waits
        for room stays in the buffer's memory, in order, and goes as PUBACKs come in."""
        quota = self._raw_quota
        return n if quota is None else max(0, min(n, quota - len(self._raw_mids)))

    def queue_raw(self, data: bytes, count: int) -> None:
        """Hand ready PUBLISH packets (``count`` messages) to paho's write queue as one entry.

        The entry's "mid" is the message count, so that :meth:`_on_socket_close` can count
        what a broken connection took with it.
        """
        client = self.client
        assert client is not None
        client._packet_queue(_PUBLISH, data, count, 0, self.info)

    def next_mid(self) -> int:
        """A packet id for a raw QoS 1 packet, from paho's own sequence so that ours and
        paho's never collide; its PUBACK goes to :meth:`LinkUser.link_acked`."""
        client = self.client
        assert client is not None
        mid = client._mid_generate()
        self._raw_mids.add(mid)
        return mid

    def publish(self, topic: str, payload: bytes, qos: int, retain: bool) -> None:
        client = self.client
        assert client is not None
        client.publish(topic, payload, qos, retain)

    def end_session(self, why: str) -> None:
        """DISCONNECT on purpose, after whatever is queued; the link connects again after its
        backoff, as after a lost connection. For a Sparkplug edge node whose primary host
        went offline. A goodbye is best queued raw (:meth:`queue_raw`) first: paho would send
        its own unacknowledged QoS 1 messages again on the next connection."""
        client = self.client
        if client is None or not self.connected:
            return
        self._lost_reason = why
        self._ended = True
        client.disconnect()

    def idle(self) -> bool:
        """Everything handed over has been written, and paho's own QoS 1 messages acked."""
        client = self.client
        return client is None or (not client.want_write() and not client._out_messages)

    # -- the connection ------------------------------------------------------------------

    async def _maintain(self) -> None:
        """Connect, hold, reconnect: forever, until cancelled by close()."""
        while True:
            try:
                await self._connect_once()
            except (OSError, TimeoutError, _Refused) as exc:
                self._failed(_describe(exc))
                self.hard_close()
                await asyncio.sleep(self._backoff.next())
                continue
            if self._ever_connected:
                self.reconnects += 1
            else:
                log.info(
                    "%s: connected to %s as %s (MQTT %s%s)",
                    self.name,
                    self.broker,
                    self.client_id,
                    self.protocol,
                    f", {self.tls_version}" if self.tls_version else ", no TLS",
                )
            self._ever_connected = True
            self._once.recovered()
            self.connected = True
            self.last_error = ""
            client = self.client
            assert client is not None
            for topic, qos in self._subscriptions:
                client.subscribe(topic, qos)
            self.user.link_up()
            self.on_change()
            since = time.monotonic()
            await self._hold()
            self.connected = False
            ended, self._ended = self._ended, False
            lasted = time.monotonic() - since
            why = f"connection lost: {self._lost_reason or 'closed'}"
            if lasted >= STABLE_AFTER:
                self._backoff.reset()
            elif lasted < 2.0 and not ended:
                why += (
                    f" {lasted:.1f} s after connecting (is another client using the client"
                    f" id {self.client_id!r}?)"
                )
            self._failed(why)
            await asyncio.sleep(self._backoff.next())

    def _want_v5(self) -> bool:
        protocol = self.section.protocol
        return protocol == "5" or (protocol == "auto" and not self._v311_learned)

    def _client_for(self, v5: bool) -> _Client:
        """paho fixes the MQTT version when a client is made: a new one to change it."""
        if self.client is None or self._client_v5 != v5:
            self.hard_close()
            self.client = self._make_client(v5)
            self._client_v5 = v5
        return self.client

    async def _connect_once(self) -> None:
        v5 = self._want_v5()
        try:
            await self._attempt(v5)
        except _Refused as exc:
            if not (v5 and exc.version and self.section.protocol == "auto"):
                raise
            log.info(
                "%s: %s did not take MQTT 5 (%s): trying MQTT 3.1.1", self.name, self.broker, exc
            )
            self.hard_close()
            await self._attempt(False)
            self._v311_learned = True
            log.info("%s: %s speaks MQTT 3.1.1: used until restart", self.name, self.broker)

    async def _attempt(self, v5: bool) -> None:
        """One connection: TCP, TLS if configured, CONNECT, CONNACK."""
        loop = self._loop
        assert loop is not None
        client = self._client_for(v5)
        password = self._password()
        context = self._tls_context()
        if self.section.username is not None:
            client.username_pw_set(self.section.username, password)
        will = self._will()
        if will is None:
            client.will_clear()
        else:
            client.will_set(will.topic, will.payload, will.qos, will.retain)
        sock = await self._open_socket(loop)
        if context is not None:
            sock = await self._handshake(loop, sock, context)
        self.protocol = "5" if v5 else "3.1.1"
        self.tls_version = sock.version() if isinstance(sock, ssl.SSLSocket) else None
        self._lost.clear()
        self._lost_reason = ""
        self._raw_mids.clear()
        self._raw_quota = None
        self._refusal_logged = False
        self._connack = loop.create_future()
        client.tls_error = None
        client.next_socket = sock
        try:
            client.reconnect()
        except BaseException:
            client.next_socket = None
            sock.close()
            raise
        if v5 and self.section.protocol == "auto":
            try:
                async with asyncio.timeout(V5_CONNACK_TIMEOUT):
                    await self._connack
            except TimeoutError:
                raise _Refused(
                    f"no answer to an MQTT 5 CONNECT within {V5_CONNACK_TIMEOUT:g} s", version=True
                ) from None
        else:
            async with asyncio.timeout(CONNECT_TIMEOUT):
                await self._connack

    async def _handshake(
        self, loop: asyncio.AbstractEventLoop, sock: socket.socket, context: ssl.SSLContext
    ) -> ssl.SSLSocket:
        """TLS over the connected socket without blocking the event loop."""
        name = self._tls_name()
        try:
            tls = context.wrap_socket(sock, server_hostname=name, do_handshake_on_connect=False)
        except BaseException:
            sock.close()
            raise
        try:
            async with asyncio.timeout(CONNECT_TIMEOUT):
                while True:
                    try:
                        tls.do_handshake()
                    except ssl.SSLWantReadError:
                        await _ready(loop, tls.fileno(), writable=False)
                    except ssl.SSLWantWriteError:
                        await _ready(loop, tls.fileno(), writable=True)
                    else:
                        break
            if tls.version() == "TLSv1.3":
                await self._after_handshake(loop, tls)
        except (ssl.SSLEOFError, ssl.SSLZeroReturnError, ConnectionError):
            tls.close()
            raise _Refused(
                f"TLS: {self.broker} closed the connection during the handshake (a plain MQTT "
                "port, or no TLS version or cipher in common?)"
            ) from None
        except ssl.SSLError as exc:
            tls.close()
            raise _Refused(_tls_problem(exc, name, self.broker)) from None
        except BaseException:
            tls.close()
            raise
        return tls

    async def _after_handshake(self, loop: asyncio.AbstractEventLoop, tls: ssl.SSLSocket) -> None:
        """In TLS 1.3 the broker judges our client certificate (or its absence) after the
        handshake and answers with session tickets or an alert, then closes. A CONNECT sent
        at once races that close: the broker's reset can discard the alert unread, and the
        reason would be lost ("closed without answering"). So wait briefly for what comes
        first. Nothing of MQTT can arrive before our CONNECT, so a read here only takes TLS
        records."""
        try:
            async with asyncio.timeout(TLS13_SETTLE):
                await _ready(loop, tls.fileno(), writable=False)
        except TimeoutError:
            return  # a broker that sends no tickets: nothing to wait for
        try:
            tls.recv(1)
        except ssl.SSLWantReadError:
            return  # session tickets only
        except ssl.SSLEOFError:
            # Closed after a complete handshake, before any MQTT: not "a plain MQTT port".
            raise _Refused(self._silent_close()) from None
        except ssl.SSLError as exc:
            raise _Refused(_tls_problem(exc, self._tls_name(), self.broker)) from None

    def _silent_close(self) -> str:
        """Why the broker may have closed the connection without an MQTT answer."""
        tls = self.section.tls
        if tls is None:
            return (
                "the broker closed the connection without answering (a TLS port? then "
                "configure tls:)"
            )
        if tls.cert_file is None:
            # A TLS 1.3 broker that wants a client certificate says so in an alert after the
            # handshake and closes; the alert can be lost to the reset that follows (see
            # _after_handshake). Say the likely cause rather than nothing.
            return (
                "TLS: the broker closed the connection right after the handshake without "
                "answering: it may require a client certificate (set tls.cert_file and "
                "tls.key_file)"
            )
        return "the broker closed the connection without answering"

    async def _open_socket(self, loop: asyncio.AbstractEventLoop) -> socket.socket:
        host, port = self.section.host, self.section.port
        try:
            ip = ipaddress.ip_address(host)
        except ValueError:
            # A name: resolving may block, so asyncio runs it in its executor. Every address
            # is tried in turn: "localhost" may resolve to ::1 first, with the broker on IPv4.
            infos = await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM)
            targets = [(family, addr) for family, _, _, _, addr in infos]
        else:
            targets = [(socket.AF_INET6 if ip.version == 6 else socket.AF_INET, (host, port))]
        error: OSError = OSError(f"cannot resolve {host}")
        for family, addr in targets:
            sock = socket.socket(family, socket.SOCK_STREAM)
            try:
                sock.setblocking(False)
                # Without it, Nagle holds small publishes back for the broker's delayed
                # ACK: p99 latency grows by ~40 ms.
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                async with asyncio.timeout(CONNECT_TIMEOUT):
                    await loop.sock_connect(sock, addr)
            except OSError as exc:  # TimeoutError included
                sock.close()
                error = exc
                continue
            except BaseException:
                sock.close()
                raise
            return sock
        raise error

    async def _hold(self) -> None:
        """Drive paho's keepalive until the connection is lost."""
        client = self.client
        assert client is not None
        while not self._lost.is_set():
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(1.0):
                    await self._lost.wait()
            if not self._lost.is_set():
                client.loop_misc()

    def _failed(self, message: str) -> None:
        self.last_error = message
        self._once.failed(message)
        self.on_change()

    def hard_close(self) -> None:
        """Drop the socket without the MQTT goodbye (after a failure, or on close)."""
        client = self.client
        if client is None:
            return
        sock = client.next_socket
        if sock is not None:
            client.next_socket = None
            sock.close()
        if client.socket() is not None:
            client._sock_close()
        self._remove_fd()

    def _remove_fd(self) -> None:
        fd, self.fd = self.fd, None
        if fd is not None and self._loop is not None:
            self._loop.remove_reader(fd)
            self._loop.remove_writer(fd)
        self._writing = False
        self._writer = False

    # -- paho callbacks (run inside loop_read / loop_write / reconnect) --------------------

    def _on_socket_open(self, client: mqtt.Client, userdata: Any, sock: Any) -> None:
        assert self._loop is not None
        self.fd = sock.fileno()
        self._loop.add_reader(self.fd, self._read, client, sock)

    def _read(self, client: mqtt.Client, sock: socket.socket) -> None:
        """Every packet that has arrived, not one per readable event.

        paho's loop_read() reads as many packets as *it* has in flight, and our raw QoS 1
        publishes are not among them: one PUBACK per event-loop turn (three recv() calls
        each) capped a replay at ~3,100 msgs/s. Reading until the socket says EAGAIN took
        it to the replay_rate cap. Under TLS, bytes already decrypted wait in the SSL object
        where the event loop cannot see them, so EAGAIN with pending() bytes reads on.
        """
        for _ in range(READ_BURST):
            if client.socket() is not sock:
                return
            rc = client._packet_read()
            if rc == MQTTErrorCode.MQTT_ERR_AGAIN:
                if isinstance(sock, ssl.SSLSocket) and sock.pending():
                    continue
                return
            if rc > 0:
                client._loop_rc_handle(rc)
                return
        # Still more: the rest after other callbacks had their turn (a plain socket stays
        # readable for the selector; TLS bytes may sit in the SSL object).
        if self._loop is not None and client.socket() is sock:
            self._loop.call_soon(self._read, client, sock)

    def _on_socket_close(self, client: mqtt.Client, userdata: Any, sock: Any) -> None:
        # At once, not when _maintain wakes up: a batch in between must be kept by the user,
        # not left in paho's write queue, which the next reconnect() discards.
        self.connected = False
        unsent = sum(p["mid"] for p in client._out_packet if p["info"] is self.info)
        self._remove_fd()
        self._raw_mids.clear()
        self._lost.set()
        tls_error = getattr(client, "tls_error", None)
        if tls_error is not None and not self._lost_reason:
            self._lost_reason = _tls_problem(tls_error, self._tls_name(), self.broker)
        connack = self._connack
        if connack is not None and not connack.done():
            if self._lost_reason:
                connack.set_exception(_Refused(self._lost_reason))
            else:
                connack.set_exception(_Refused(self._silent_close(), version=True))
        self.user.link_down(unsent)

    def _on_socket_register_write(self, client: mqtt.Client, userdata: Any, sock: Any) -> None:
        # Written in this turn of the event loop, not after the selector says writable: the
        # socket almost always is, and a writer costs two epoll_ctl calls and a select
        # wake-up per message. Only what the socket did not take waits for a writer.
        # call_soon, not now: paho calls this from inside its own code (and our batch may be
        # half done), where a write's failure must not close the connection under it.
        if self.fd is not None and self._loop is not None and not self._writing:
            self._writing = True
            self._loop.call_soon(self._write_soon, client, sock)

    def _write_soon(self, client: mqtt.Client, sock: Any) -> None:
        if not self._writing or client.socket() is not sock:
            return  # closed meanwhile
        client.loop_write()
        # Still registered with paho (it does not call us again): the rest waits for a writer.
        if self._writing and not self._writer and client.socket() is sock and self.fd is not None:
            assert self._loop is not None
            self._writer = True
            self._loop.add_writer(self.fd, client.loop_write)

    def _on_socket_unregister_write(self, client: mqtt.Client, userdata: Any, sock: Any) -> None:
        if self._writing:
            self._writing = False
            if self._writer and self.fd is not None and self._loop is not None:
                self._loop.remove_writer(self.fd)
            self._writer = False
        if self.connected:
            self.user.link_writable()

    def _on_connect(
        self, client: mqtt.Client, userdata: Any, flags: Any, reason: Any, properties: Any
    ) -> None:
        connack = self._connack
        if connack is None or connack.done():
            return
        if reason.is_failure:
            self._lost_reason = f"refused: {reason}"
            connack.set_exception(
                _Refused(_connack_problem(reason), version=reason.value == _UNSUPPORTED_VERSION)
            )
            return
        receive_maximum = getattr(properties, "ReceiveMaximum", None)
        if isinstance(receive_maximum, int) and receive_maximum > 0:
            # Ours and paho's QoS 1 publishes share the broker's quota: a fixed split, so
            # that neither can push the sum over it (a broker may disconnect for that).
            # paho's setter refuses once connected; here, before paho sends what it queued
            # for this session, the attribute is what its setter would have set.
            own = max(1, min(PAHO_INFLIGHT, receive_maximum // 4))
            client._max_inflight_messages = own
            self._raw_quota = max(1, receive_maximum - own)
        else:
            client._max_inflight_messages = PAHO_INFLIGHT
        connack.set_result(None)

    def _raw_acked(self, mid: int, reason: int) -> bool:
        if mid not in self._raw_mids:
            return False  # one of paho's own
        self._raw_mids.discard(mid)
        if reason >= 0x80:
            # MQTT 5 only (3.1.1 cannot refuse a publish): sending it again would not help.
            self.refused += 1
            if not self._refusal_logged:
                self._refusal_logged = True
                log.warning(
                    "%s: %s refused a message (PUBACK: %s); it is dropped (more on this "
                    "connection are counted, not logged). Does the broker's ACL let %s publish?",
                    self.name,
                    self.broker,
                    ReasonCode(PacketTypes.PUBACK, identifier=reason),
                    self.client_id,
                )
        self.user.link_acked(mid)
        return True

    def _on_disconnect(
        self, client: mqtt.Client, userdata: Any, flags: Any, reason: Any, properties: Any
    ) -> None:
        if self._lost_reason:
            return
        # paho reports every closed socket as "Unspecified error"; say what happened.
        if getattr(reason, "value", None) == _KEEPALIVE_TIMEOUT:
            self._lost_reason = "no answer to keepalive pings"
        elif getattr(reason, "is_failure", False) and str(reason) != "Unspecified error":
            self._lost_reason = str(reason)
        else:
            self._lost_reason = "closed by the broker or the network"

    def _on_message(self, client: mqtt.Client, userdata: Any, message: Any) -> None:
        self.user.link_message(message.topic, bytes(message.payload))


async def replay_stored(
    box: Outbox,
    link: MqttLink,
    *,
    qos: int,
    may_send: Callable[[], bool],
    send: Callable[[list[Stored]], None],
    sent: Callable[[], None],
) -> None:
    """Hand what waits on disk to ``send``, oldest first, while ``may_send()``: the replay
    of every sink with a buffer (UNS values, Sparkplug DDATA).

    Whole chunks: one or two messages per turn (what a spent token bucket or a window freed
    by single acks allows) pay a batch's fixed cost each; measured by bench/outage.py.
    """
    while box.to_replay > 0 and may_send():
        n = link.room(REPLAY_CHUNK) if qos else REPLAY_CHUNK
        want = min(REPLAY_CHUNK, box.to_replay)
        if min(n, box.replay_allowance()) < min(want, link.room(want)):
            await asyncio.sleep(0.005)
            continue
        batch = box.next_replay(n)
        if not batch:
            await asyncio.sleep(0.005)
            continue
        send(batch)
        sent()
        await asyncio.sleep(0)


def rebase_buffer(clock: ClockWatch, seen: int, box: Outbox, what: str) -> int:
    """Shift what ``box`` holds stamped before the clock was set by each step measured since
    step number ``seen``; returns the new ``seen`` (each step applied once)."""
    new = clock.step_count - seen
    if new > 0:
        for step in list(clock.steps)[-new:]:
            log.info("%s: clock stepped by %+.3f s: re-basing it", what, step.delta)
            box.rebase(round(step.delta * 1000))
    return clock.step_count


async def wait_until(done: Callable[[], bool], seconds: float) -> bool:
    """Poll ``done`` every 10 ms for up to ``seconds``; what it returned last."""
    deadline = time.monotonic() + seconds
    while not done():
        if time.monotonic() >= deadline:
            return False
        await asyncio.sleep(0.01)
    return True


class BufferUser(Protocol):
    """What a sink tells the :class:`BufferedPublisher` that drives its buffer: the part of
    the buffer driving that differs between the UNS and the Sparkplug sink. Every call runs
    in the event loop."""

    def buffer_ready(self) -> bool:
        """Buffered messages may go out now, the link's backlog aside (connected; for a
        Sparkplug edge node, born as well)."""

    def buffer_wire(self, rows: list[Stored]) -> tuple[list[Stored], Callable[[Stored], bytes]]:
        """The rows about to be sent, and each one's payload as sent. A row that cannot be
        sent is left out and handed to :meth:`BufferedPublisher.discard`."""

    def buffer_acked(self) -> None:
        """A batch of PUBACKs was applied and the live messages waiting on it pumped."""

    def buffer_replayed(self) -> None:
        """A replay pass ended: the disk is drained, or sending has to wait."""

    def buffer_health(self, health: dict[str, object], stats: dict[str, int]) -> None:
        """The sink's own fields of its health entry; ``stats``: the outbox's counters."""


class BufferedPublisher:
    """A sink's buffered messages, from its durable outbox onto its :class:`MqttLink`.

    One object for both sinks with a buffer (UNS values, Sparkplug DDATA), because two copies
    drifted: it owns the outbox, the raw QoS 1 packets in flight (packet id -> outbox id),
    ack batching, the live pump, the replay task, the clock re-base, the sink's background
    tasks and what happens when one of them crashes, the close sequence and the health
    entry. What differs (how a row becomes a packet, whether the sink may send, what follows
    acks and a replay, the sink's own health fields) comes from its :class:`BufferUser`.

    A message stays in memory until the broker's PUBACK (QoS 1) or until written (QoS 0);
    while the sink may not send, or more than ``buffer.inflight`` await their PUBACK, it
    goes to disk, to be replayed oldest first at ``buffer.replay_rate`` beside live data.
    The sink stays the link's :class:`LinkUser` and hands :meth:`link_down`,
    :meth:`link_writable` and :meth:`link_acked` on.
    """

    def __init__(
        self,
        runtime: RuntimeView,
        link: MqttLink,
        user: BufferUser,
        *,
        file: str,
        buffer: BufferSection,
        qos: int,
        logger: logging.Logger,
        noun: str,
        label: str,
    ) -> None:
        """``file``: the outbox in the data directory; ``qos``: the sink's for new messages
        (stored rows keep their own); ``logger``, ``noun`` ("message(s)", "DDATA") and
        ``label`` (the buffer, in the re-base line): the sink's words in the log."""
        self.runtime = runtime
        self.link = link
        self._user = user
        self.outbox = Outbox(
            runtime.data_dir / file,
            max_bytes=int(buffer.max_mb * 1e6),
            max_age_s=buffer.max_age_h * 3600,
            when_full=buffer.when_full,
            fsync=buffer.fsync,
            window=buffer.inflight,
            replay_rate=buffer.replay_rate,
        )
        self._qos = qos
        self._log = logger
        self._noun = noun
        self._label = label
        self._in_flight: dict[int, int] = {}  # packet id -> outbox id
        self._acks: list[int] = []
        self._acks_scheduled = False
        self._topic_parts: dict[str, bytes] = {}
        self._replay_wake = asyncio.Event()
        self._replay_task: asyncio.Task[None] | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._steps_seen = runtime.clock.step_count
        self._loop: asyncio.AbstractEventLoop | None = None
        self.closed = False
        #: Messages written to the connection, buffered or not (births, the refresh).
        self.published = 0
        #: Rows the user could not make into a message: acked unsent, counted as dropped.
        self.discarded = 0
        self._health_at = -math.inf
        self.health: dict[str, object] = {}
        link.on_change = self.update_health

    @property
    def started(self) -> bool:
        return self._loop is not None

    # -- lifecycle -----------------------------------------------------------------------

    def start(self) -> None:
        """Open the outbox, start the replay, connect in the background."""
        self._loop = asyncio.get_running_loop()
        # Opened before anything is published: a buffer that cannot be opened (locked by a
        # second gateway on the same data directory, a newer schema) fails the start loudly.
        self.outbox.open()
        stored = self.outbox.stats["stored"]
        if stored:
            self._log.info(
                "%s: %d buffered %s from before the restart to replay",
                self.link.name,
                stored,
                self._noun,
            )
        self._replay_task = self.spawn(self._replay(), "replay")
        self.link.start()

    def spawn(self, coro: Coroutine[Any, Any, None], what: str) -> asyncio.Task[None]:
        """A background task of the sink: its crash is reported (:meth:`crashed`), and
        :meth:`close` cancels it if it still runs."""
        task = asyncio.get_running_loop().create_task(
            coro, name=f"{self.link.name.lower()}[{what}]"
        )
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        task.add_done_callback(self.crashed)
        return task

    async def stop_replay(self) -> None:
        task, self._replay_task = self._replay_task, None
        if task is not None:
            task.cancel()
            await asyncio.wait([task])

    async def close(self, goodbye: Callable[[], Will | None]) -> None:
        """Stop the sink's tasks, publish ``goodbye()`` and disconnect (bounded), put what
        was not acknowledged on disk for the next start. Idempotent."""
        if self.closed:
            return
        self.closed = True
        # Everything that may publish stops before the goodbye: the commands, the replay.
        tasks = [task for task in self._tasks if task is not self._replay_task]
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.wait(tasks)
        await self.stop_replay()
        await self.link.close(goodbye())
        self._flush_acks()
        self._in_flight.clear()
        kept = self.outbox.stats["queued_messages"]
        self.update_health()
        # Unacknowledged messages go to disk and are sent again after the next start.
        self.outbox.close()
        if kept:
            self._log.info(
                "%s: %d undelivered %s kept in the buffer for the next start",
                self.link.name,
                kept,
                self._noun,
            )

    def crashed(self, task: asyncio.Task[None]) -> None:
        """A bug in a background task must not leave the sink silently dead: say so, loudly."""
        if task.cancelled() or task.exception() is None:
            return
        self.link.last_error = f"internal error: {task.exception()!r}"
        self.update_health()
        self._log.error(
            "%s: %s stopped by a bug", self.link.name, task.get_name(), exc_info=task.exception()
        )

    # -- what the link tells the sink, handed on -----------------------------------------

    def link_down(self, unsent_raw: int) -> None:
        # Acks that arrived before the drop are real; everything else handed over and not
        # acknowledged goes back to the buffer (on disk) and is sent again: at least once.
        self.published -= unsent_raw
        acks, self._acks = self._acks, []
        if acks:
            self.outbox.acked(acks)
        self._in_flight.clear()
        self.outbox.spill()

    def link_writable(self) -> None:
        # Not from inside loop_write's own bookkeeping, hence call_soon.
        if not self._acks_scheduled and self._loop is not None:
            self._acks_scheduled = True
            self._loop.call_soon(self._flush_acks)

    def link_acked(self, mid: int) -> bool:
        id_ = self._in_flight.pop(mid, None)
        if id_ is None:
            return False
        # Applied once per read from the socket, not once per PUBACK.
        self._acks.append(id_)
        if not self._acks_scheduled and self._loop is not None:
            self._acks_scheduled = True
            self._loop.call_soon(self._flush_acks)
        return True

    # -- the buffer and the wire ---------------------------------------------------------

    def deliverable(self) -> bool:
        return self._user.buffer_ready() and not self.link.backlogged()

    def offer(self, messages: list[Message]) -> None:
        """Every buffered message comes in here: in memory while the broker keeps up, on disk
        while it cannot."""
        deliverable = self.deliverable()
        self.outbox.put(messages, deliverable=deliverable)
        if deliverable:
            self.pump()

    def resume(self) -> None:
        """The sink may send (again): what waits in memory now, then the replay."""
        self.pump()
        if self.outbox.to_replay:
            # Only with something to replay: this runs after every write and every batch of
            # acks, and a woken replay task costs a timeout set up and torn down each time.
            # Its half-second tick does the rest (clock steps, health).
            self._replay_wake.set()

    def pump(self) -> None:
        """Live messages waiting in memory, to the connection."""
        if self.deliverable():
            n = self.link.room(PUMP_CHUNK) if self._qos else PUMP_CHUNK
            live = self.outbox.next_live(n)
            if live:
                self._send(live)

    def store_pending(self) -> None:
        """What waits in memory goes to disk, to be replayed as history."""
        self.outbox.put([], deliverable=False)

    def waiting(self) -> bool:
        """Messages not yet handed to the connection: in memory, or on disk to replay."""
        return bool(self.outbox.stats["pending"] or self.outbox.to_replay)

    def discard(self, ids: list[int]) -> None:
        """Rows that cannot be sent: out of the buffer, counted as dropped."""
        self.discarded += len(ids)
        self.outbox.acked(ids)

    def send_raw(self, data: bytes, count: int) -> None:
        """Ready PUBLISH packets that bypass the buffer (a refresh, births and deaths), in
        their place in the write queue; counted as published."""
        self.link.queue_raw(data, count)
        self.published += count

    def _send(self, stored: list[Stored]) -> None:
        """Buffered messages as raw PUBLISH packets, one write-queue entry for all of them.

        QoS 1 packets take their packet id from paho's sequence and are tracked here (not by
        paho, whose per-message bookkeeping costs ~19 us); the PUBACK hook hands the id back.
        """
        rows, wire = self._user.buffer_wire(stored)
        if not rows:
            return
        link = self.link
        data, mids = encode_publishes(rows, link.next_mid, self._topic_parts, wire, v5=link.v5)
        self._in_flight.update(mids)
        self.send_raw(data, len(rows))
        # QoS 0: written to the connection is as acknowledged as it gets. By the row's own
        # QoS, which is what it was sent with: a row stored before qos changed keeps its own.
        unacked = [s.id for s in rows if not s.message.qos]
        if unacked:
            self.outbox.acked(unacked)

    def _flush_acks(self) -> None:
        self._acks_scheduled = False
        acks, self._acks = self._acks, []
        if acks:
            self.outbox.acked(acks)
        self.resume()
        self._user.buffer_acked()

    async def _replay(self) -> None:
        """What waited on disk, oldest first, at ``buffer.replay_rate``, beside live data."""
        box = self.outbox
        wake = self._replay_wake
        while True:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(0.5):
                    await wake.wait()
            wake.clear()
            self.rebase_on_steps()
            # At least every half second, so an idle sink's page is current too.
            self.update_health(force=False)
            await replay_stored(
                box,
                self.link,
                qos=self._qos,
                may_send=self.deliverable,
                send=self._send,
                sent=lambda: self.update_health(force=False),
            )
            self._user.buffer_replayed()

    def rebase_on_steps(self) -> None:
        self._steps_seen = rebase_buffer(
            self.runtime.clock, self._steps_seen, self.outbox, self._label
        )

    async def flush(self, seconds: float) -> None:
        """Wait (bounded) until every live message handed over is written and acknowledged."""
        if not self._user.buffer_ready():
            return
        self.pump()
        link = self.link

        def done() -> bool:
            return not link.connected or (
                link.idle() and self.outbox.stats["pending"] == 0 and not self._in_flight
            )

        await wait_until(done, seconds)
        self._flush_acks()
        self.update_health()

    # -- health --------------------------------------------------------------------------

    def update_health(self, *, force: bool = True, counters: bool = False) -> None:
        """The sink's health entry; ``force=False`` from the hot paths: at most every
        HEALTH_EVERY_S (the oldest message's age scans the messages in flight and is a
        SQLite read). With ``counters`` as well, the calls in between still bring the
        counters up to date, keeping the oldest age of the last full update (None at once
        when nothing is queued, which costs nothing to know)."""
        age = True
        if not force:
            now = time.monotonic()
            if now - self._health_at < HEALTH_EVERY_S:
                if not counters:
                    return
                age = False
            else:
                self._health_at = now
        h = self.health
        link = self.link
        st = self.outbox.stats
        h["connected"] = link.connected
        h["broker"] = link.broker
        self._user.buffer_health(h, st)
        h["queued"] = st["queued_messages"]
        h["buffered"] = st["stored"]
        if not st["queued_messages"]:
            h["oldest_age_s"] = None
        elif age:
            oldest = self.outbox.oldest_ts_ms()
            h["oldest_age_s"] = None if oldest is None else round(time.time() - oldest / 1000, 1)
        h["published"] = self.published
        h["replayed"] = st["replayed"]
        h["dropped"] = st["dropped_full"] + st["dropped_age"] + st["dropped_io"] + self.discarded
        h["dropped_full"] = st["dropped_full"]
        h["dropped_age"] = st["dropped_age"]
        h["dropped_io"] = st["dropped_io"]
        h["reconnects"] = link.reconnects
        h["protocol"] = link.protocol
        h["tls"] = link.tls_version
        h["refused"] = link.refused
        h["last_error"] = link.last_error or self.outbox.last_error


class MqttSink:
    """Publishes readings and device states to one MQTT broker; see the module docstring."""

    name = "mqtt"

    def __init__(
        self, runtime: RuntimeView, section: MqttSection, *, backoff: Backoff | None = None
    ) -> None:
        self.runtime = runtime
        self.section = section
        gw = runtime.config.gateway
        self._base = f"{section.topic_prefix}/{gw.site}/{gw.area}/{gw.line}"
        self._gateway_topic = f"{self._base}/$gateway/{gw.name}"
        self._per_device = section.topic_shape == "per_device"
        self._qos_values = section.qos_values
        self._qos_state = section.qos_state
        self._value_first = _PUBLISH | (0 if self._per_device else int(section.retain_values))
        self._retain_values = section.retain_values and not self._per_device
        self._heartbeat = section.heartbeat or math.inf
        self._tags: dict[TagKey, _Tag] = {}
        self._device_topics: dict[str, str] = {}
        self._device_heads: dict[str, str] = {}
        self._tails: dict[float, tuple[str, str, int]] = {}
        self._details: dict[str, str] = {}
        self._replayed_topics: set[str] = set()
        self._status_sent: dict[str, bytes] = {}
        # Commands: only the writable tags' topics are subscribed, so a config without
        # writable tags does not even listen.
        self._set_topics: dict[str, TagKey] = {
            f"{self._base}/{t.machine}/{t.name}/set": t.key
            for t in runtime.tags
            if t.write is not None
        }
        self._bad_commands: dict[str, float] = {}
        self._link = MqttLink(
            runtime,
            section,
            self,
            client_id=section.client_id or gw.name,
            will=self._offline,
            subscriptions=[(topic, 1) for topic in self._set_topics],
            backoff=backoff,
        )
        self._buffer = BufferedPublisher(
            runtime,
            self._link,
            self,
            file=OUTBOX_FILE,
            buffer=section.buffer,
            qos=self._qos_values,
            logger=log,
            noun="message(s)",
            label="MQTT buffer",
        )
        self._buffer.update_health()
        runtime.health[self.name] = self._buffer.health

    @property
    def _connected(self) -> bool:
        return self._link.connected

    @property
    def _outbox(self) -> Outbox:
        return self._buffer.outbox

    # -- lifecycle -----------------------------------------------------------------------

    async def start(self) -> None:
        """Build every topic, then connect in the background: never waits for the broker."""
        if self._buffer.started or self._buffer.closed:
            return
        self._build_topics()
        self._buffer.start()

    async def run(self, sub: Subscription) -> None:
        buffer = self._buffer
        watcher = buffer.spawn(self._watch_status(), "status")
        handle = self._on_batch_per_device if self._per_device else self._on_batch_per_tag
        try:
            while (batch := await sub.get()) is not None:
                handle(batch)
                buffer.update_health(force=False)
        finally:
            watcher.cancel()
            await asyncio.wait([watcher])
        # Drivers have stopped: publish their final state, then the live messages still in
        # memory. What waits on disk stays there for the next start.
        await buffer.stop_replay()
        self._sync_status()
        await buffer.flush(FLUSH_TIMEOUT)

    async def close(self) -> None:
        """Publish "offline", disconnect cleanly (bounded), release everything. Idempotent."""
        await self._buffer.close(self._offline)

    def _offline(self) -> Will:
        """The gateway "offline", retained: the Last Will, and the goodbye of a clean close."""
        return Will(self._gateway_topic, _OFFLINE, self._qos_state, True)

    # -- set-up --------------------------------------------------------------------------

    def _build_topics(self) -> None:
        for spec in self.runtime.tags:
            self._add_tag(spec)
        for device, status in self.runtime.statuses.items():
            self._device_topic(device, status.machine)

    def _add_tag(self, spec: TagSpec) -> _Tag:
        tag = _Tag(spec, f"{self._base}/{spec.machine}/{spec.name}")
        self._tags[spec.key] = tag
        self._device_topic(spec.device, spec.machine)
        return tag

    def _device_topic(self, device: str, machine: str) -> None:
        if device not in self._device_topics:
            self._device_topics[device] = f"{self._base}/{machine}/$device/{device}"
            self._device_heads[device] = f'{{"device":{_json_str(device)},"ts_ms":'

    # -- what the link tells us (LinkUser) -----------------------------------------------

    def link_up(self) -> None:
        """Gateway online, statuses, the queue (oldest first), then every tag's latest value."""
        self._link.publish(self._gateway_topic, _ONLINE, self._qos_state, True)
        self._status_sent.clear()
        self._sync_status()
        self._publish_all()
        self._buffer.resume()
        self._buffer.update_health()

    def link_down(self, unsent_raw: int) -> None:
        self._buffer.link_down(unsent_raw)

    def link_writable(self) -> None:
        self._buffer.link_writable()

    def link_acked(self, mid: int) -> bool:
        return self._buffer.link_acked(mid)

    def link_message(self, topic: str, payload: bytes) -> None:
        """``<tag topic>/set`` with ``{"value": ...}`` (and an optional ``"id"`` echoed back):
        a write through the runtime; the answer goes to ``<tag topic>/set/result``."""
        key = self._set_topics.get(topic)
        if key is None or self._buffer.closed:
            return
        self._buffer.spawn(self._command(topic, key, payload), f"set {key}")

    async def _command(self, topic: str, key: TagKey, payload: bytes) -> None:
        reply: dict[str, object] = {"tag": key}
        try:
            body = json.loads(payload)
        except ValueError:
            body = None
        if isinstance(body, dict) and "id" in body:
            reply["id"] = body["id"]
        if not isinstance(body, dict) or "value" not in body or set(body) - {"value", "id"}:
            reply |= {
                "ok": False,
                "code": "bad_request",
                "error": 'the payload must be a JSON object {"value": ..., "id": optional}',
            }
            now = time.monotonic()
            if now - self._bad_commands.get(topic, -math.inf) >= 60:
                # Once a minute per topic, logged and audited: a publisher in a loop must not
                # fill the card.
                self._bad_commands[topic] = now
                log.warning("MQTT: refused %s: not a JSON object with a value", topic)
                self.runtime.audit_refusal(
                    key,
                    payload[:200].decode("utf-8", "replace"),
                    user="mqtt",
                    origin=f"mqtt {self._link.broker} {topic}",
                    code="bad_request",
                    detail="not a JSON object with a value",
                )
        else:
            # MQTT 3.1.1 does not say who published: broker ACLs decide who may write here.
            try:
                result = await self.runtime.write(
                    key, body["value"], user="mqtt", origin=f"mqtt {self._link.broker} {topic}"
                )
            except WriteRefused as exc:
                reply |= {"ok": False, "code": exc.code, "error": str(exc)}
            else:
                reply |= {"ok": True, "value": result.value, "read_back": result.read_back}
        if self._connected:
            data = json.dumps(reply, ensure_ascii=False, separators=(",", ":")).encode()
            self._link.publish(f"{topic}/result", data, 1, False)

    # -- value messages ------------------------------------------------------------------

    def _tail(self, ts: float) -> tuple[str, str, int]:
        """``,"ts":"...","ts_ms":N}``, ``N`` and N for a source timestamp; a poll shares one."""
        ts_ms = round(ts * 1000)
        triple = (f',"ts":"{_iso_ms(ts_ms)}","ts_ms":{ts_ms}}}', str(ts_ms), ts_ms)
        if len(self._tails) > 1024:
            self._tails.clear()
        self._tails[ts] = triple
        return triple

    def _bad_part(self, quality: Quality, reason: Reason, detail: str) -> str:
        """``bad","reason":"timeout","detail":"..."``: after ``"quality":"``."""
        text = self._details.get(detail)
        if text is None:
            if len(self._details) > 1024:
                self._details.clear()
            text = self._details[detail] = _json_str(detail)
        return f'{_QUALITY[quality]}","reason":"{reason.value}","detail":{text}'

    def _late_tag(self, key: TagKey) -> _Tag | None:
        spec = self.runtime.bus.specs.get(key)
        return None if spec is None else self._add_tag(spec)

    def _on_batch_per_tag(self, batch: Sequence[Reading], *, everything: bool = False) -> None:
        """Report by exception, one message per changed tag; the hot path of the sink.

        ``everything``: the refresh after a connect, straight to the connection (QoS 0, not
        through the buffer): it restates retained topics, it is not new data.
        """
        tails = self._tails
        good = Quality.GOOD
        synced = self._clock_synced()
        qos = self._qos_values
        retain = self._retain_values
        v5 = self._link.v5
        out: list[Message] = []
        refresh: list[bytes] = []
        # The readings of one poll share their timestamp: format it once.
        last_ts = math.nan
        tail = ""
        ts_ms = 0
        for tag, (_key, value, quality, ts, reason, detail, _raw) in self._to_send(
            batch, everything
        ):
            if ts != last_ts:
                last_ts = ts
                tail, _, ts_ms = tails.get(ts) or self._tail(ts)
            text = value_json(value)
            if quality is good:
                body = f'{{"value":{text}{tag.good}{tail}'
            else:
                body = (
                    f'{{"value":{text}{tag.unit_q}{self._bad_part(quality, reason, detail)}{tail}'
                )
            if everything:
                refresh.append(_packet(self._value_first, tag.topic_part, body.encode(), v5))
            else:
                out.append(Message(tag.topic, body.encode(), qos, retain, ts_ms, synced))
        if refresh:
            self._refresh(refresh)
        if out:
            self._buffer.offer(out)

    def _to_send(
        self, batch: Sequence[Reading], everything: bool
    ) -> Iterator[tuple[_Tag, Reading]]:
        """The readings of ``batch`` to publish, each with its tag's state already updated.

        One place for report by exception, whatever the topic shape.
        """
        tags = self._tags
        heartbeat = self._heartbeat
        now = time.monotonic()
        for reading in batch:
            key, value, quality, _ts, reason, _detail, _raw = reading
            tag = tags.get(key)
            if tag is None and (tag := self._late_tag(key)) is None:
                continue
            if not everything and _unchanged(tag, value, quality, reason, now, heartbeat):
                continue
            tag.value = value
            tag.quality = quality
            tag.reason = reason
            tag.sent = now
            yield tag, reading

    def _on_batch_per_device(self, batch: Sequence[Reading], *, everything: bool = False) -> None:
        """One message per device of the batch with every changed tag (a poll is one device)."""
        tails = self._tails
        good = Quality.GOOD
        # device -> [items]; a batch is one poll of one device, so the lookup is rare.
        groups: dict[str, list[str]] = {}
        newest: dict[str, float] = {}
        device = ""
        items: list[str] = []
        top = 0.0  # newest source_ts of the current device
        last_ts = math.nan
        ms = ""
        for tag, (_key, value, quality, ts, reason, detail, _raw) in self._to_send(
            batch, everything
        ):
            if ts != last_ts:
                last_ts = ts
                ms = (tails.get(ts) or self._tail(ts))[1]
            text = value_json(value)
            if quality is good:
                item = f'{tag.dev_head}{text},"quality":"good","ts_ms":{ms}}}'
            else:
                item = (
                    f'{tag.dev_head}{text},"quality":"{self._bad_part(quality, reason, detail)}'
                    f',"ts_ms":{ms}}}'
                )
            if tag.device != device:
                if device:
                    newest[device] = top
                device = tag.device
                items = groups.setdefault(device, [])
                top = newest.get(device, ts)
            items.append(item)
            top = ts if ts > top else top
        if not groups:
            return
        newest[device] = top
        synced = self._clock_synced()
        out: list[Message] = []
        refresh: list[bytes] = []
        for device, items in groups.items():
            ts_ms = round(newest[device] * 1000)
            body = f'{self._device_heads[device]}{ts_ms},"values":{{{",".join(items)}}}}}'
            topic = self._device_topics[device]
            if everything:
                refresh.append(_packet(_PUBLISH, _topic_part(topic), body.encode(), self._link.v5))
            else:
                out.append(Message(topic, body.encode(), self._qos_values, False, ts_ms, synced))
        if refresh:
            self._refresh(refresh)
        if out:
            self._buffer.offer(out)

    def _publish_all(self, topics: set[str] | None = None) -> None:
        """Every tag's latest value (or those of ``topics``), as if it had changed: after a
        (re)connect, and after a replay."""
        latest = self.runtime.bus.latest
        tags = self._tags
        if topics is None:
            batch = [latest[key] for key in tags if key in latest]
        else:
            batch = [
                latest[key]
                for key, tag in tags.items()
                if key in latest
                and (tag.topic in topics or self._device_topics.get(tag.device) in topics)
            ]
        if self._per_device:
            by_device: dict[str, list[Reading]] = {}
            for reading in batch:
                by_device.setdefault(self._tags[reading.key].device, []).append(reading)
            for readings in by_device.values():
                self._on_batch_per_device(readings, everything=True)
        else:
            step = 400  # buffers of about CHUNK_BYTES
            for i in range(0, len(batch), step):
                self._on_batch_per_tag(batch[i : i + step], everything=True)

    def _clock_synced(self) -> bool:
        # Unknown (no adjtimex, no timedatectl) counts as synchronised: nothing to re-base by.
        return self.runtime.clock.synced is not False

    def _rebase_on_steps(self) -> None:
        self._buffer.rebase_on_steps()

    # -- the buffer and the wire ---------------------------------------------------------

    def _refresh(self, packets: list[bytes]) -> None:
        if self._connected:
            self._buffer.send_raw(b"".join(packets), len(packets))

    # -- what the buffer asks of the sink (BufferUser) -----------------------------------

    def buffer_ready(self) -> bool:
        return self._connected

    def buffer_wire(self, rows: list[Stored]) -> tuple[list[Stored], Callable[[Stored], bytes]]:
        """Every row as it is, ``seq`` and ``historical`` in the JSON; what is replayed is
        noted, for the restatement after the replay."""
        replayed = self._replayed_topics
        for s in rows:
            if s.historical:
                replayed.add(s.message.topic)
        return rows, _wire_payload

    def buffer_acked(self) -> None:
        """Nothing of the UNS sink waits for acks (the buffer pumps what waits in it)."""

    def buffer_replayed(self) -> None:
        if self._replayed_topics and self._outbox.to_replay == 0 and self._connected:
            # Replayed values are not retained, so the retained topics of what went to
            # disk may be behind the newest value: restate those (not every tag: a small
            # overflow under load must not be answered with 10,000 more messages).
            topics, self._replayed_topics = self._replayed_topics, set()
            self._publish_all(topics)

    def buffer_health(self, health: dict[str, object], stats: dict[str, int]) -> None:
        health["buffered_bytes"] = stats["stored_bytes"]

    # -- device and machine states -------------------------------------------------------

    async def _watch_status(self) -> None:
        bus = self.runtime.bus
        seen = bus.status_version
        self._sync_status()
        while True:
            seen = await bus.wait_status(seen)
            self._sync_status()

    def _status_payloads(self) -> dict[str, bytes]:
        out: dict[str, bytes] = {}
        machines: dict[str, bool] = {}
        for device, st in self.runtime.statuses.items():
            out[f"{self._base}/{st.machine}/$status/{device}"] = _device_status(st)
            online = st.state is DeviceState.ONLINE
            machines[st.machine] = machines.get(st.machine, True) and online
        for machine, online in machines.items():
            out[f"{self._base}/{machine}/$status"] = _ONLINE if online else _OFFLINE
        return out

    def _sync_status(self) -> None:
        """Publish every status topic whose payload differs from what this connection sent."""
        if self._link.client is None or not self._connected:
            return
        sent = self._status_sent
        for topic, payload in self._status_payloads().items():
            if sent.get(topic) != payload:
                self._link.publish(topic, payload, self._qos_state, True)
                sent[topic] = payload


def _device_status(st: DeviceStatus) -> bytes:
    return json.dumps(
        {
            "state": st.state.value,
            "last_error": st.last_error or None,
            "last_error_ts": _iso(st.last_error_ts),
            "last_success_ts": _iso(st.last_success_ts),
            "errors": dict(st.errors),
        },
        ensure_ascii=False,
        separators=(",", ":"),
    ).encode()


def _loopback(host: str) -> bool:
    if host == "localhost" or host.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


async def _ready(loop: asyncio.AbstractEventLoop, fd: int, *, writable: bool) -> None:
    """Until ``fd`` is readable (or writable)."""
    done: asyncio.Future[None] = loop.create_future()

    def wake() -> None:
        if not done.done():
            done.set_result(None)

    if writable:
        loop.add_writer(fd, wake)
    else:
        loop.add_reader(fd, wake)
    try:
        await done
    finally:
        if writable:
            loop.remove_writer(fd)
        else:
            loop.remove_reader(fd)


#: OpenSSL verify codes (x509_vfy.h): the certificate's issuer is not a trusted CA.
_UNTRUSTED = frozenset({2, 18, 19, 20, 21})
_NAME_MISMATCH = frozenset({62, 64})  # hostname, IP address
_EXPIRED = 10
#: TLS alerts with which a broker refuses our client certificate.
_CLIENT_CERT_REFUSED = frozenset(
    {
        "SSLV3_ALERT_BAD_CERTIFICATE",
        "SSLV3_ALERT_CERTIFICATE_UNKNOWN",
        "SSLV3_ALERT_CERTIFICATE_EXPIRED",
        "SSLV3_ALERT_CERTIFICATE_REVOKED",
        "SSLV3_ALERT_UNSUPPORTED_CERTIFICATE",
        "TLSV1_ALERT_UNKNOWN_CA",
        "TLSV1_ALERT_ACCESS_DENIED",
        "TLSV1_ALERT_DECRYPT_ERROR",
    }
)


def _tls_problem(exc: ssl.SSLError, name: str, broker: str) -> str:
    """What a TLS failure means, in the terms of the ``tls:`` settings that fix it."""
    if isinstance(exc, ssl.SSLCertVerificationError):
        why = (exc.verify_message or str(exc)).rstrip(".")
        if exc.verify_code in _NAME_MISMATCH:
            return (
                f"TLS: the broker's certificate is not valid for {name!r} ({why}): connect by "
                "a name the certificate holds, or set tls.server_name to one"
            )
        if exc.verify_code in _UNTRUSTED:
            return (
                f"TLS: the broker's certificate is not signed by a trusted CA ({why}): is "
                "tls.ca_file the CA that issued it?"
            )
        if exc.verify_code == _EXPIRED:
            return f"TLS: the broker's certificate has expired ({why})"
        return f"TLS: the broker's certificate was not accepted ({why})"
    reason = exc.reason or ""
    if reason == "TLSV13_ALERT_CERTIFICATE_REQUIRED":
        return (
            "TLS: the broker requires a client certificate (alert certificate required): set "
            "tls.cert_file and tls.key_file"
        )
    if reason in _CLIENT_CERT_REFUSED:
        return f"TLS: the broker refused our client certificate ({reason})"
    if reason == "WRONG_VERSION_NUMBER":
        return f"TLS: {broker} does not answer in TLS (a plain MQTT port?)"
    return f"TLS: {reason or exc}"


def _connack_problem(reason: Any) -> str:
    if reason.value in _BAD_LOGIN:
        return (
            f"the broker refused the connection: not authorised ({reason}): check username "
            "and password"
        )
    if reason.value == _UNSUPPORTED_VERSION:
        return (
            f"the broker refused the connection: {reason} (it takes MQTT 3.1.1 only: "
            "protocol: auto or 3.1.1)"
        )
    return f"the broker refused the connection: {reason}"


def _describe(exc: BaseException) -> str:
    if isinstance(exc, TimeoutError):
        return "no answer within the connect timeout"
    if isinstance(exc, ConnectionRefusedError):
        return "connection refused"
    return str(exc) or type(exc).__name__

"""One Sparkplug B edge node's session state, and the messages it publishes. No MQTT I/O.

The MQTT sink drives an :class:`EdgeNode` and publishes the :class:`Message` values it returns:

    node = EdgeNode("plant1", "shop-gw", data_dir)
    node.add_device("lathe-1-cnc", specs)      # aliases are fixed here, in this order
    will = node.connect()                      # before every MQTT CONNECT: the Will (NDEATH)
    # CONNECT with will, clean session; subscribe to command_subscriptions() at QoS 1; then:
    for message in node.births(): ...          # NBIRTH, then one DBIRTH per device
    message = node.ddata("lathe-1-cnc", readings)      # None when nothing changed
    kept = node.ddata("lathe-1-cnc", readings, store=True)   # for a buffer, see below
    sequenced(kept.payload, node.take_seq(), metrics=node.metrics("lathe-1-cnc"))  # when sent
    if node.rebirth_requested(ncmd_payload): node.births()
    node.ddeath("lathe-1-cnc"); node.dbirth("lathe-1-cnc")   # device lost and back
    node.ndeath()                              # before an intentional DISCONNECT

Rules applied (Eclipse Sparkplug 3.0.0; tck ids from chapters 4-6):

- seq (§6.4.5; tck-id-payloads-sequence-num-zero-nbirth, -incrementing, tck-id-topics-nbirth-
  seq-num): one counter for every NBIRTH, DBIRTH, NDATA, DDATA and DDEATH of the node; NBIRTH
  has 0, each following message one more, 255 is followed by 0. NDEATH has none
  (tck-id-topics-ndeath-seq).
- bdSeq (§4.2.2 NBIRTH/NDEATH payloads; tck-id-topics-nbirth-bdseq-increment, -matching,
  tck-id-payloads-ndeath-bdseq): 0 on the first CONNECT, one more on every new CONNECT, after
  255 back to 0; the Will's NDEATH and the NBIRTH of the same session carry the same value. It
  is kept in a file in the data directory so that a restart continues the count: a host
  ignores an NDEATH whose bdSeq is not the one of the current NBIRTH, so a late Will from the
  previous process cannot mark the new session offline. A rebirth (NCMD ``Node Control/
  Rebirth``) stays in the same MQTT session, so it keeps the bdSeq and restarts seq at 0.
- NBIRTH (tck-id-topics-nbirth-metric-reqs, -bdseq-included, -rebirth-metric): every node
  metric with name, alias, datatype, value and timestamp, including ``bdSeq`` (Int64, as Eclipse
  Tahu sends it) and ``Node Control/Rebirth`` (Boolean, false).
- Aliases (§6.4.6; tck-id-payloads-alias-uniqueness, -birth-requirement, -data-cmd-
  requirement): unique across the node's metrics, node and devices alike, both name and alias
  in BIRTHs, the alias alone in DATA. They are numbered from 1 in registration order, so the
  same configuration gives the same aliases in every session; 0 is skipped because some
  decoders treat a zero field as absent.
- DATA (tck-id-topics-ndata-payload, tck-id-topics-ddata-payload): only the metrics that
  changed since the last BIRTH or DATA, each with its own timestamp; no datatype
  (tck-id-payloads-metric-datatype-not-req). "Changed" is the MQTT sink's report-by-exception
  rule: another quality or reason, or a value that moved by more than the tag's deadband.
- Quality (§6.4.9 "Quality Codes"; tck-id-payloads-propertyset-quality-value-type/-value): a
  property ``Quality`` of type Int32 whose value MUST be 0 (BAD), 192 (GOOD) or 500 (STALE).
  The specification has no code for OPC UA's Uncertain, so Uncertain (out of range, or not
  refreshed for a while) is sent as 500: the value is there but is not to be trusted as
  current. BIRTHs state every metric's quality; DATA states it when it is not GOOD or has
  just become GOOD again. A value never read is ``is_null``.
- Historical (§6.4.6 ``is_historical``): replayed readings are sent as they are, flagged, and
  leave the live state (what BIRTH and report by exception compare with) untouched.
- Store and forward: seq belongs to the session that sends a message, so a DDATA meant for a
  buffer (``ddata(store=True)``) is built without one and stamped with :meth:`EdgeNode.take_seq`
  when it leaves the buffer. While the node is offline such a DDATA still reports what
  changed (there is no BIRTH to catch up with it); the sender flags it historical when it
  replays it after the next BIRTHs.
- MQTT flags (tck-id-topics-nbirth-mqtt and siblings; tck-id-payloads-ndeath-will-message-qos):
  every edge message QoS 0 and not retained, except NDEATH: QoS 1.
"""

from __future__ import annotations

import contextlib
import enum
import json
import logging
import os
import tempfile
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote

from gateway.model import Quality, Reading, Reason, TagKey, TagSpec, Value
from gateway.sparkplug.payload import (
    DataType,
    Metric,
    MetricValue,
    Payload,
    PropertyValue,
    SparkplugError,
    decode,
    encode,
    fits,
)
from gateway.sparkplug.topics import MessageType, check_id, topic

__all__ = [
    "BDSEQ",
    "QUALITY",
    "REBIRTH",
    "BdSeqFile",
    "EdgeNode",
    "Message",
    "QualityCode",
    "datatype_of",
    "quality_code",
]

log = logging.getLogger("gateway.sparkplug")

BDSEQ = "bdSeq"
REBIRTH = "Node Control/Rebirth"
QUALITY = "Quality"


class QualityCode(enum.IntEnum):
    """§6.4.9 "Quality Codes": the only values the ``Quality`` property may have."""

    BAD = 0
    GOOD = 192
    STALE = 500


_QUALITY_CODES: Mapping[Quality, QualityCode] = {
    Quality.GOOD: QualityCode.GOOD,
    Quality.UNCERTAIN: QualityCode.STALE,
    Quality.BAD: QualityCode.BAD,
}


def quality_code(quality: Quality) -> QualityCode:
    return _QUALITY_CODES[quality]


#: Our register and field types (drivers/modbus DataType, the ASCII driver's value types) to
#: Sparkplug's. BCD registers hold unsigned decimal digits.
_DATATYPES: Mapping[str, DataType] = {
    "bool": DataType.BOOLEAN,
    "bit": DataType.BOOLEAN,
    "int16": DataType.INT16,
    "uint16": DataType.UINT16,
    "int32": DataType.INT32,
    "uint32": DataType.UINT32,
    "int64": DataType.INT64,
    "uint64": DataType.UINT64,
    "float32": DataType.FLOAT,
    "float64": DataType.DOUBLE,
    "bcd16": DataType.UINT16,
    "bcd32": DataType.UINT32,
    "string": DataType.STRING,
}
_NON_NUMERIC = frozenset({DataType.BOOLEAN, DataType.STRING})


def datatype_of(spec: TagSpec) -> DataType:
    """The tag's Sparkplug datatype; scaled numbers are Double, as in the OPC UA sink.

    Scaling turns the register's integer into a float (normalize.py), so the register type
    no longer describes the value.
    """
    try:
        datatype = _DATATYPES[spec.datatype]
    except KeyError:
        raise SparkplugError(
            f"tag {spec.key}: no Sparkplug datatype for {spec.datatype!r}"
        ) from None
    if datatype not in _NON_NUMERIC and (spec.scale != 1.0 or spec.offset != 0.0):
        return DataType.DOUBLE
    return datatype


@dataclass(frozen=True, slots=True)
class Message:
    """One MQTT message to publish (or, for NDEATH from :meth:`EdgeNode.connect`, to register
    as the Will). Sparkplug edge messages are never retained."""

    topic: str
    payload: bytes
    qos: int = 0
    retain: bool = False


class BdSeqFile:
    """The next bdSeq of one edge node, in a small JSON file written atomically.

    Written before each CONNECT, so a power cut can at worst skip a number (hosts accept any
    new value), never reuse the one a broker still holds as a Will.
    """

    def __init__(self, data_dir: Path, group_id: str, edge_node_id: str) -> None:
        # "/" cannot occur in the ids and quote() escapes it, so two nodes never share a file.
        name = quote(f"{group_id}/{edge_node_id}", safe="")
        self.path = Path(data_dir) / f"sparkplug-bdseq-{name}.json"
        self._ids = {"group_id": group_id, "edge_node_id": edge_node_id}

    def load(self) -> int:
        """The stored value, 0 if there is none; an unreadable file is logged and restarts at 0."""
        try:
            data = json.loads(self.path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            return 0
        except (OSError, ValueError) as exc:
            log.warning("Sparkplug bdSeq file %s unreadable (%s); starting at 0", self.path, exc)
            return 0
        value = data.get("next_bdseq") if isinstance(data, dict) else None
        if type(value) is not int or not 0 <= value <= 255:
            log.warning("Sparkplug bdSeq file %s holds no bdSeq 0..255; starting at 0", self.path)
            return 0
        return value

    def save(self, value: int) -> None:
        """Replace the file atomically: temporary file, fsync, rename, fsync of the directory."""
        directory = self.path.parent
        directory.mkdir(parents=True, exist_ok=True)
        text = json.dumps({**self._ids, "next_bdseq": value}, ensure_ascii=False) + "\n"
        fd, tmp = tempfile.mkstemp(dir=directory, prefix=f".{self.path.name}.", suffix=".tmp")
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as file:
                file.write(text)
                file.flush()
                os.fsync(file.fileno())
            os.replace(tmp, self.path)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise
        # The rename is durable only once the directory entry is on disk too.
        dir_fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)


class _Metric:
    """A registered metric: its identity, and the live state BIRTH and DATA compare with."""

    __slots__ = (
        "alias",
        "datatype",
        "deadband",
        "name",
        "quality",
        "reason",
        "sent_quality",
        "sent_reason",
        "sent_value",
        "timestamp",
        "value",
    )

    def __init__(self, name: str, alias: int, datatype: DataType, deadband: float | None) -> None:
        self.name = name
        self.alias = alias
        self.datatype = datatype
        self.deadband = deadband if datatype not in _NON_NUMERIC else None
        # Current state: never read yet, as the bus says before the first poll.
        self.value: MetricValue = None
        self.quality = Quality.BAD
        self.reason = Reason.WAITING
        self.timestamp: int | None = None
        # Last published state, for report by exception; reset by every BIRTH.
        self.sent_value: MetricValue = None
        self.sent_quality = Quality.BAD
        self.sent_reason = Reason.WAITING

    def set(self, value: MetricValue, quality: Quality, reason: Reason, ts_ms: int) -> None:
        self.value = value
        self.quality = quality
        self.reason = reason
        self.timestamp = ts_ms

    def changed(self) -> bool:
        if self.quality is not self.sent_quality or self.reason is not self.sent_reason:
            return True
        value, last = self.value, self.sent_value
        if value == last:
            return False
        band = self.deadband
        return not (
            band is not None
            and isinstance(value, int | float)
            and isinstance(last, int | float)
            and -band <= value - last <= band
        )

    def mark_sent(self) -> None:
        self.sent_value = self.value
        self.sent_quality = self.quality
        self.sent_reason = self.reason


class _Device:
    __slots__ = ("born", "device_id", "metrics")

    def __init__(self, device_id: str) -> None:
        self.device_id = device_id
        self.metrics: dict[TagKey, _Metric] = {}
        self.born = False


def _ms(seconds: float) -> int:
    return round(seconds * 1000)


def _value(datatype: DataType, value: Value | None) -> MetricValue:
    """A reading's value as its metric carries it: a Double tag may read a whole number."""
    if (
        (datatype is DataType.DOUBLE or datatype is DataType.FLOAT)
        and isinstance(value, int)
        and not isinstance(value, bool)
    ):
        return float(value)
    return value


class EdgeNode:
    """One edge node's Sparkplug session state; see the module docstring.

    ``clock`` returns wall-clock seconds (the payload timestamps); tests pass a fixed one.
    """

    def __init__(
        self,
        group_id: str,
        edge_node_id: str,
        data_dir: Path,
        *,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.group_id = check_id("group id", group_id)
        self.edge_node_id = check_id("edge node id", edge_node_id)
        self._clock = clock
        self._bdseq_file = BdSeqFile(data_dir, group_id, edge_node_id)
        self._next_bdseq = self._bdseq_file.load()
        #: The current session's bdSeq; None before the first connect().
        self.bdseq: int | None = None
        self._seq = 0
        self.online = False
        self._next_alias = 1
        self._node: dict[str, _Metric] = {}
        self._devices: dict[str, _Device] = {}
        self._device_of: dict[TagKey, _Device] = {}
        self._names: dict[int, str] = {}
        self._misfits: set[int] = set()
        self._add_node(BDSEQ, DataType.INT64)
        self._add_node(REBIRTH, DataType.BOOLEAN)

    # -- registration -------------------------------------------------------------------------

    def _alias(self, label: str) -> int:
        alias = self._next_alias
        self._next_alias += 1
        self._names[alias] = label
        return alias

    def _add_node(self, name: str, datatype: DataType) -> _Metric:
        metric = _Metric(name, self._alias(name), datatype, None)
        self._node[name] = metric
        return metric

    def add_node_metric(
        self, name: str, datatype: DataType, value: MetricValue = None, *, timestamp: float = 0.0
    ) -> int:
        """Register a metric of the node itself (say ``Properties/Version``); its alias.

        Only before the NBIRTH: a node metric missing from it is unknown to hosts.
        """
        if self.online:
            raise SparkplugError(f"node metric {name!r}: register node metrics before births()")
        if not name or name in self._node:
            raise SparkplugError(f"node metric {name!r}: empty or registered twice")
        if not fits(datatype, value):
            raise SparkplugError(f"node metric {name!r}: {value!r} does not fit {datatype.name}")
        metric = self._add_node(name, datatype)
        if value is not None:
            metric.set(value, Quality.GOOD, Reason.NONE, _ms(timestamp or self._clock()))
        return metric.alias

    def add_device(self, device_id: str, specs: Sequence[TagSpec]) -> dict[TagKey, int]:
        """Register a device and its tags (metric name = tag name); the aliases by tag key.

        A device added while online is announced by :meth:`dbirth`.
        """
        check_id("device id", device_id)
        if device_id in self._devices:
            raise SparkplugError(f"device {device_id!r} registered twice")
        names: set[str] = set()
        datatypes: list[DataType] = []
        for spec in specs:
            if spec.name in names:
                raise SparkplugError(f"device {device_id!r}: metric {spec.name!r} twice")
            if spec.key in self._device_of:
                raise SparkplugError(f"tag {spec.key} registered in two devices")
            names.add(spec.name)
            datatypes.append(datatype_of(spec))
        # Aliases only once everything is valid: a refused device leaves no gap in them.
        device = _Device(device_id)
        for spec, datatype in zip(specs, datatypes, strict=True):
            device.metrics[spec.key] = _Metric(
                spec.name, self._alias(f"{device_id}:{spec.name}"), datatype, spec.deadband
            )
        self._devices[device_id] = device
        for key in device.metrics:
            self._device_of[key] = device
        return {key: metric.alias for key, metric in device.metrics.items()}

    @property
    def aliases(self) -> Mapping[int, str]:
        """Every alias with ``name`` (node metrics) or ``device:name``."""
        return dict(self._names)

    def born(self, device_id: str) -> bool:
        """True while the device's DBIRTH of this session holds (no DDEATH since)."""
        return self.online and self._device(device_id).born

    def metrics(self, device_id: str) -> dict[str, tuple[int, DataType]]:
        """Metric name to (alias, datatype) of one device: what ``payload.sequenced`` needs
        to re-alias a DDATA kept by a buffer."""
        return {m.name: (m.alias, m.datatype) for m in self._device(device_id).metrics.values()}

    def datatypes(self, device_id: str | None = None) -> dict[int, DataType]:
        """Alias to datatype of the node's (or one device's) metrics, as its BIRTH declares."""
        metrics = (
            self._node.values() if device_id is None else self._device(device_id).metrics.values()
        )
        return {m.alias: m.datatype for m in metrics}

    def _device(self, device_id: str) -> _Device:
        try:
            return self._devices[device_id]
        except KeyError:
            raise SparkplugError(f"device {device_id!r} is not registered") from None

    # -- session ------------------------------------------------------------------------------

    def _take_seq(self) -> int:
        seq = self._seq
        self._seq = (seq + 1) % 256
        return seq

    @property
    def seq(self) -> int:
        """The seq the next message of this session will carry."""
        return self._seq

    def take_seq(self) -> int:
        """The seq for a message built without one (``ddata(store=True)``), as it is sent."""
        self._require_online("take_seq")
        return self._take_seq()

    def _now(self) -> int:
        return _ms(self._clock())

    def _death(self) -> Message:
        assert self.bdseq is not None
        now = self._now()
        # Name only, no alias: a host matches the NDEATH's bdSeq by name.
        metric = Metric(name=BDSEQ, timestamp=now, datatype=DataType.INT64, value=self.bdseq)
        payload = encode(Payload(timestamp=now, metrics=(metric,)))
        return Message(topic(MessageType.NDEATH, self.group_id, self.edge_node_id), payload, 1)

    def connect(self) -> Message:
        """Start a new MQTT session: the next bdSeq, and the NDEATH to register as the Will.

        Call it right before every CONNECT, successful or not. The next value is stored
        before this returns.
        """
        self.bdseq = self._next_bdseq
        self._next_bdseq = (self.bdseq + 1) % 256
        self._bdseq_file.save(self._next_bdseq)
        self.online = False
        for device in self._devices.values():
            device.born = False
        return self._death()

    def ndeath(self) -> Message:
        """The NDEATH to publish before an intentional DISCONNECT; the node is offline after."""
        if self.bdseq is None:
            raise SparkplugError("ndeath() before connect()")
        self.offline()
        return self._death()

    def offline(self) -> None:
        """The session ended without an NDEATH of ours (the connection broke, the broker sent
        the Will): no BIRTH holds any more, and data is for the buffer until the next one."""
        self.online = False
        for device in self._devices.values():
            device.born = False

    def nbirth(self) -> Message:
        """The NBIRTH, seq 0: every node metric with its current value."""
        if self.bdseq is None:
            raise SparkplugError("nbirth() before connect(): no bdSeq for this session")
        now = self._now()
        self._node[BDSEQ].set(self.bdseq, Quality.GOOD, Reason.NONE, now)
        self._node[REBIRTH].set(False, Quality.GOOD, Reason.NONE, now)
        self._seq = 0
        metrics = tuple(self._birth_metric(m, now, quality=False) for m in self._node.values())
        payload = Payload(timestamp=now, metrics=metrics, seq=self._take_seq())
        self.online = True
        return Message(topic(MessageType.NBIRTH, self.group_id, self.edge_node_id), encode(payload))

    def dbirth(self, device_id: str) -> Message:
        """One device's DBIRTH: every metric, name and alias, current value and quality."""
        device = self._device(device_id)
        self._require_online("dbirth")
        now = self._now()
        metrics = tuple(self._birth_metric(m, now, quality=True) for m in device.metrics.values())
        payload = Payload(timestamp=now, metrics=metrics, seq=self._take_seq())
        device.born = True
        return Message(
            topic(MessageType.DBIRTH, self.group_id, self.edge_node_id, device_id),
            encode(payload),
        )

    def births(self) -> list[Message]:
        """NBIRTH and then a DBIRTH per registered device, in registration order."""
        return [self.nbirth(), *(self.dbirth(d) for d in self._devices)]

    def rebirth(self) -> list[Message]:
        """The answer to ``Node Control/Rebirth``: the same session (same bdSeq), seq from 0."""
        return self.births()

    def ddeath(self, device_id: str) -> Message:
        """The device is unreachable: its DDEATH; it needs a :meth:`dbirth` before more DDATA."""
        device = self._device(device_id)
        self._require_online("ddeath")
        device.born = False
        payload = Payload(timestamp=self._now(), seq=self._take_seq())
        return Message(
            topic(MessageType.DDEATH, self.group_id, self.edge_node_id, device_id),
            encode(payload),
        )

    def _require_online(self, what: str) -> None:
        if not self.online:
            raise SparkplugError(f"{what}() before the NBIRTH of this session")

    # -- data ---------------------------------------------------------------------------------

    def _birth_metric(self, metric: _Metric, now: int, *, quality: bool) -> Metric:
        metric.mark_sent()
        return Metric(
            name=metric.name,
            alias=metric.alias,
            timestamp=metric.timestamp if metric.timestamp is not None else now,
            datatype=metric.datatype,
            value=metric.value,
            properties=_quality_property(metric.quality) if quality else {},
        )

    def ddata(
        self,
        device_id: str,
        readings: Iterable[Reading],
        *,
        historical: bool = False,
        store: bool = False,
    ) -> Message | None:
        """The DDATA for these readings of one device, or None when there is nothing to send.

        Live readings update the device's state and only those that changed are sent.
        ``historical`` readings (replayed from a buffer) are all sent, flagged
        ``is_historical``, and change no state. Nothing is sent while the device is not born
        or the node is offline: live readings are then kept for the next DBIRTH, historical
        ones stay the caller's to replay.

        ``store``: the DDATA is for a store-and-forward buffer. It carries no seq (the sender
        stamps one from :meth:`take_seq` when it sends it) but every metric's name and
        datatype, so that a later session, perhaps of another configuration, can check them
        and re-alias it (``payload.sequenced`` strips both). While the node is offline what
        changed is returned all the same, for the buffer to keep; a device that is not born
        while the node is online still keeps its readings for its DBIRTH.
        """
        device = self._device(device_id)
        live = device.born and self.online
        keep = live or (store and not self.online and not historical)
        metrics: list[Metric] = []
        now = self._now()
        for reading in readings:
            metric = device.metrics.get(reading.key)
            if metric is None:
                raise SparkplugError(f"tag {reading.key} is not a metric of device {device_id!r}")
            value, quality, reason = self._checked(metric, reading)
            ts = _ms(reading.source_ts)
            if historical:
                metrics.append(
                    Metric(
                        alias=metric.alias,
                        timestamp=ts,
                        datatype=metric.datatype,
                        value=value,
                        is_historical=True,
                        properties=_quality_property(quality),
                    )
                )
                continue
            metric.set(value, quality, reason, ts)
            if keep and metric.changed():
                metrics.append(self._data_metric(metric, named=store))
        if not metrics or not keep:
            return None
        seq = None if store else self._take_seq()
        payload = Payload(timestamp=now, metrics=tuple(metrics), seq=seq)
        return Message(
            topic(MessageType.DDATA, self.group_id, self.edge_node_id, device_id),
            encode(payload, with_datatypes=store),
        )

    def _checked(self, metric: _Metric, reading: Reading) -> tuple[MetricValue, Quality, Reason]:
        """The reading's value, quality and reason, or Bad if its value cannot be the datatype.

        Drivers produce values of their tag's type, but a value that does not fit (an ASCII
        field beyond Int64) must cost one metric, not the whole DDATA.
        """
        value = _value(metric.datatype, reading.value)
        if fits(metric.datatype, value):
            return value, reading.quality, reading.reason
        if metric.alias not in self._misfits:
            self._misfits.add(metric.alias)
            log.warning(
                "Sparkplug metric %s: %r does not fit %s; sent as Bad",
                self._names[metric.alias],
                reading.value,
                metric.datatype.name,
            )
        return None, Quality.BAD, Reason.DECODE_ERROR

    def ndata(self, values: Mapping[str, MetricValue]) -> Message | None:
        """The NDATA for changed node metrics (registered with :meth:`add_node_metric`)."""
        self._require_online("ndata")
        now = self._now()
        metrics: list[Metric] = []
        for name, value in values.items():
            metric = self._node.get(name)
            if metric is None or name in (BDSEQ, REBIRTH):
                raise SparkplugError(f"{name!r} is not a node metric this node can update")
            metric.set(value, Quality.GOOD, Reason.NONE, now)
            if metric.changed():
                metrics.append(self._data_metric(metric, quality=False))
        if not metrics:
            return None
        payload = Payload(timestamp=now, metrics=tuple(metrics), seq=self._take_seq())
        return Message(
            topic(MessageType.NDATA, self.group_id, self.edge_node_id),
            encode(payload, with_datatypes=False),
        )

    def _data_metric(self, metric: _Metric, *, quality: bool = True, named: bool = False) -> Metric:
        # A GOOD that follows a non-GOOD is stated, or the host would keep the old quality.
        state = quality and (
            metric.quality is not Quality.GOOD or metric.sent_quality is not Quality.GOOD
        )
        metric.mark_sent()
        return Metric(
            name=metric.name if named else None,
            alias=metric.alias,
            timestamp=metric.timestamp,
            datatype=metric.datatype,
            value=metric.value,
            properties=_quality_property(metric.quality) if state else {},
        )

    # -- commands -----------------------------------------------------------------------------

    def rebirth_requested(self, ncmd_payload: bytes) -> bool:
        """True if an NCMD payload sets ``Node Control/Rebirth`` (by name or alias) to true.

        A payload that does not decode is a :class:`SparkplugError`.
        """
        alias = self._node[REBIRTH].alias
        payload = decode(ncmd_payload, datatypes=self.datatypes())
        return any(
            (m.name == REBIRTH or (m.name is None and m.alias == alias)) and m.value is True
            for m in payload.metrics
        )


def _quality_property(quality: Quality) -> dict[str, PropertyValue]:
    return {QUALITY: PropertyValue(DataType.INT32, int(quality_code(quality)))}

"""Sparkplug B payloads as plain Python values, and their protobuf encoding (the façade).

This is the only module that touches the generated protobuf code (``sparkplug_b_pb2``, made
from ``sparkplug_b.proto``); the rest of the gateway speaks :class:`Payload` and :class:`Metric`.

Rules applied here (Eclipse Sparkplug 3.0.0, chapter 6 "Payloads"):

- §6.4.16 "Datatype Details": which protobuf field carries which datatype. Int8/16/32 and
  UInt8/16/32 travel in ``int_value`` (uint32), signed ones as their 32-bit two's complement;
  Int64, UInt64 and DateTime in ``long_value`` (uint64), Int64 as its 64-bit two's complement;
  Float, Double, Boolean in their own fields; String, Text and UUID in ``string_value``; Bytes
  and File in ``bytes_value``. DataSet, Template and the array types are not produced by the
  gateway and are refused.
- §6.4.6 "Metric": ``is_null`` says a value is absent (the value field is then left empty);
  ``is_historical`` marks replayed data that must not overwrite the live value.
- §6.4.8/§6.4.9 "PropertySet"/"PropertyValue": keys and values are parallel arrays; every
  property value carries its type.
- tck-id-payloads-metric-datatype-req / -not-req: the datatype MUST be in BIRTH metrics and
  SHOULD NOT be in DATA and CMD metrics, so :func:`encode` can leave it out
  (``with_datatypes=False``) while still using it to place the value.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass, field

from gateway.sparkplug import sparkplug_b_pb2 as pb

__all__ = [
    "DataType",
    "Metric",
    "MetricValue",
    "Payload",
    "PropertyValue",
    "SparkplugError",
    "decode",
    "encode",
    "fits",
    "sequenced",
]

#: What a metric or property value can be in Python; None is Sparkplug's ``is_null``.
MetricValue = bool | int | float | str | bytes | None


class SparkplugError(ValueError):
    """A value, id or payload that Sparkplug B cannot carry or that does not decode."""


class DataType(enum.IntEnum):
    """Sparkplug 3.0 §6.4.16: the numbers in ``Metric.datatype`` and ``PropertyValue.type``."""

    UNKNOWN = 0
    INT8 = 1
    INT16 = 2
    INT32 = 3
    INT64 = 4
    UINT8 = 5
    UINT16 = 6
    UINT32 = 7
    UINT64 = 8
    FLOAT = 9
    DOUBLE = 10
    BOOLEAN = 11
    STRING = 12
    DATETIME = 13
    TEXT = 14
    UUID = 15
    DATASET = 16
    BYTES = 17
    FILE = 18
    TEMPLATE = 19
    PROPERTY_SET = 20
    PROPERTY_SET_LIST = 21
    INT8_ARRAY = 22
    INT16_ARRAY = 23
    INT32_ARRAY = 24
    INT64_ARRAY = 25
    UINT8_ARRAY = 26
    UINT16_ARRAY = 27
    UINT32_ARRAY = 28
    UINT64_ARRAY = 29
    FLOAT_ARRAY = 30
    DOUBLE_ARRAY = 31
    BOOLEAN_ARRAY = 32
    STRING_ARRAY = 33
    DATETIME_ARRAY = 34


@dataclass(frozen=True, slots=True)
class PropertyValue:
    """One entry of a metric's PropertySet (§6.4.9); ``value`` None is ``is_null``."""

    type: DataType
    value: MetricValue


@dataclass(frozen=True, slots=True)
class Metric:
    """One metric (§6.4.6). ``timestamp`` is milliseconds since the epoch, UTC.

    ``datatype`` is always known on our side: it decides the value's field even when
    :func:`encode` leaves it off the wire. ``value`` None means ``is_null``.
    """

    name: str | None = None
    alias: int | None = None
    timestamp: int | None = None
    datatype: DataType = DataType.UNKNOWN
    value: MetricValue = None
    is_historical: bool = False
    is_transient: bool = False
    properties: Mapping[str, PropertyValue] = field(default_factory=dict)

    @property
    def is_null(self) -> bool:
        return self.value is None


@dataclass(frozen=True, slots=True)
class Payload:
    """A whole payload (§6.4.5). ``timestamp`` in ms UTC; ``seq`` None only for NDEATH/CMD."""

    timestamp: int | None = None
    metrics: tuple[Metric, ...] = ()
    seq: int | None = None
    uuid: str | None = None
    body: bytes | None = None


# -- value placement (§6.4.16) -------------------------------------------------------------------

_U32 = 0xFFFF_FFFF
_U64 = 0xFFFF_FFFF_FFFF_FFFF
#: Integer datatypes: (field, lowest, highest). Signed ones are stored as two's complement.
_INTS: Mapping[DataType, tuple[str, int, int]] = {
    DataType.INT8: ("int_value", -(2**7), 2**7 - 1),
    DataType.INT16: ("int_value", -(2**15), 2**15 - 1),
    DataType.INT32: ("int_value", -(2**31), 2**31 - 1),
    DataType.INT64: ("long_value", -(2**63), 2**63 - 1),
    DataType.UINT8: ("int_value", 0, 2**8 - 1),
    DataType.UINT16: ("int_value", 0, 2**16 - 1),
    DataType.UINT32: ("int_value", 0, _U32),
    DataType.UINT64: ("long_value", 0, _U64),
    DataType.DATETIME: ("long_value", 0, _U64),
}
_SIGNED_BITS: Mapping[DataType, int] = {
    DataType.INT8: 32,
    DataType.INT16: 32,
    DataType.INT32: 32,
    DataType.INT64: 64,
}
_STRINGS = frozenset({DataType.STRING, DataType.TEXT, DataType.UUID})
_BYTES = frozenset({DataType.BYTES, DataType.FILE})
#: What a PropertyValue may be typed as (§6.4.9): the basic types; sets are not produced here.
_PROPERTY_TYPES = frozenset(_INTS) | {
    DataType.FLOAT,
    DataType.DOUBLE,
    DataType.BOOLEAN,
    *_STRINGS,
}

_PbValue = pb.Payload.Metric | pb.Payload.PropertyValue


#: The value field of every datatype the gateway encodes.
_FIELDS: Mapping[DataType, str] = {
    **{datatype: spec[0] for datatype, spec in _INTS.items()},
    DataType.FLOAT: "float_value",
    DataType.DOUBLE: "double_value",
    DataType.BOOLEAN: "boolean_value",
    **dict.fromkeys(_STRINGS, "string_value"),
    **dict.fromkeys(_BYTES, "bytes_value"),
}


def _misfit(datatype: DataType, value: bool | int | float | str | bytes) -> str | None:
    """Why ``value`` cannot be carried as ``datatype`` (§6.4.16), or None if it can."""
    kind = type(value)
    if datatype in _INTS:
        _, low, high = _INTS[datatype]
        if kind is bool or not isinstance(value, int):
            return f"{datatype.name} needs an int, got {value!r}"
        if not low <= value <= high:
            return f"{value} is outside {datatype.name} ({low}..{high})"
        return None
    if datatype is DataType.FLOAT or datatype is DataType.DOUBLE:
        if kind is bool or not isinstance(value, int | float):
            return f"{datatype.name} needs a number, got {value!r}"
        return None
    if datatype is DataType.BOOLEAN:
        return None if kind is bool else f"BOOLEAN needs a bool, got {value!r}"
    if datatype in _STRINGS:
        return None if isinstance(value, str) else f"{datatype.name} needs a str, got {value!r}"
    if datatype in _BYTES:
        return None if isinstance(value, bytes) else f"{datatype.name} needs bytes, got {value!r}"
    return f"datatype {datatype.name} is not supported here"


def fits(datatype: DataType, value: MetricValue) -> bool:
    """True if :func:`encode` can carry ``value`` as ``datatype`` (None always: is_null)."""
    return value is None or _misfit(datatype, value) is None


def _set_value(
    target: _PbValue, datatype: DataType, value: bool | int | float | str | bytes
) -> None:
    """Put ``value`` in the field §6.4.16 assigns to ``datatype``; refuse what does not fit."""
    problem = _misfit(datatype, value)
    if problem is not None:
        raise SparkplugError(problem)
    name = _FIELDS[datatype]
    if name == "int_value":
        value = int(value) & _U32  # two's complement for the signed types
    elif name == "long_value":
        value = int(value) & _U64
    elif name in {"float_value", "double_value"}:
        value = float(value)
    setattr(target, name, value)


def _signed(raw: int, bits: int) -> int:
    return raw - (1 << bits) if raw >> (bits - 1) & 1 else raw


def _get_value(source: _PbValue, datatype: DataType | None) -> MetricValue:
    """The value of a decoded metric or property, converted by its datatype when known.

    Without a datatype (a CMD metric sent with an alias only) the raw field is returned:
    unsigned integers, since the sign lives in the datatype.
    """
    which = source.WhichOneof("value")
    if which is None:
        return None
    raw = getattr(source, which)
    if not isinstance(raw, bool | int | float | str | bytes):
        raise SparkplugError(f"value field {which} is not supported here")
    bits = _SIGNED_BITS.get(datatype) if datatype is not None else None
    if bits is not None and isinstance(raw, int) and type(raw) is not bool:
        return _signed(raw & ((1 << bits) - 1), bits)
    return raw


# -- encode --------------------------------------------------------------------------------------


def _fill_properties(
    target: pb.Payload.PropertySet, properties: Mapping[str, PropertyValue]
) -> None:
    for key, prop in properties.items():
        if prop.type not in _PROPERTY_TYPES:
            raise SparkplugError(f"property {key!r}: type {prop.type.name} is not supported here")
        target.keys.append(key)
        value = target.values.add()
        value.type = prop.type
        if prop.value is None:
            value.is_null = True
        else:
            try:
                _set_value(value, prop.type, prop.value)
            except SparkplugError as exc:
                raise SparkplugError(f"property {key!r}: {exc}") from None


def _fill_metric(target: pb.Payload.Metric, metric: Metric, with_datatype: bool) -> None:
    if metric.name is not None:
        target.name = metric.name
    if metric.alias is not None:
        target.alias = metric.alias
    if metric.timestamp is not None:
        target.timestamp = metric.timestamp
    if with_datatype:
        target.datatype = metric.datatype
    if metric.is_historical:
        target.is_historical = True
    if metric.is_transient:
        target.is_transient = True
    if metric.properties:
        _fill_properties(target.properties, metric.properties)
    if metric.value is None:
        target.is_null = True
    else:
        _set_value(target, metric.datatype, metric.value)


def encode(payload: Payload, *, with_datatypes: bool = True) -> bytes:
    """The payload as Sparkplug B protobuf bytes.

    ``with_datatypes`` False leaves ``Metric.datatype`` off the wire (DATA and CMD messages).
    Raises :class:`SparkplugError` for a value that does not fit its datatype.
    """
    message = pb.Payload()
    if payload.timestamp is not None:
        message.timestamp = payload.timestamp
    if payload.seq is not None:
        message.seq = payload.seq
    if payload.uuid is not None:
        message.uuid = payload.uuid
    if payload.body is not None:
        message.body = payload.body
    for metric in payload.metrics:
        try:
            _fill_metric(message.metrics.add(), metric, with_datatypes)
        except SparkplugError as exc:
            label = metric.name if metric.name is not None else f"alias {metric.alias}"
            raise SparkplugError(f"metric {label}: {exc}") from None
    return message.SerializeToString()


# -- decode --------------------------------------------------------------------------------------


def _datatype(number: int) -> DataType:
    try:
        return DataType(number)
    except ValueError:
        raise SparkplugError(f"unknown datatype {number}") from None


def _decode_metric(source: pb.Payload.Metric, known: Mapping[int, DataType]) -> Metric:
    alias = source.alias if source.HasField("alias") else None
    if source.HasField("datatype"):
        datatype = _datatype(source.datatype)
    else:
        datatype = known.get(alias, DataType.UNKNOWN) if alias is not None else DataType.UNKNOWN
    properties: dict[str, PropertyValue] = {}
    if source.HasField("properties"):
        props = source.properties
        if len(props.keys) != len(props.values):
            raise SparkplugError("PropertySet keys and values differ in length")
        for key, prop in zip(props.keys, props.values, strict=True):
            ptype = _datatype(prop.type)
            properties[key] = PropertyValue(
                ptype, None if prop.is_null else _get_value(prop, ptype)
            )
    return Metric(
        name=source.name if source.HasField("name") else None,
        alias=alias,
        timestamp=source.timestamp if source.HasField("timestamp") else None,
        datatype=datatype,
        value=None if source.is_null else _get_value(source, datatype),
        is_historical=source.is_historical,
        is_transient=source.is_transient,
        properties=properties,
    )


def decode(data: bytes, *, datatypes: Mapping[int, DataType] | None = None) -> Payload:
    """Parse Sparkplug B protobuf bytes (for instance an NCMD from the network).

    ``datatypes`` maps aliases to datatypes, as a BIRTH declared them, for metrics that arrive
    without one. Raises :class:`SparkplugError` for bytes that are not a Sparkplug payload.
    """
    message = pb.Payload()
    try:
        message.ParseFromString(data)
    # protobuf raises its DecodeError, whose module only the generated code may import here.
    except Exception as exc:
        raise SparkplugError(f"not a Sparkplug B payload: {exc}") from None
    known = datatypes or {}
    return Payload(
        timestamp=message.timestamp if message.HasField("timestamp") else None,
        metrics=tuple(_decode_metric(m, known) for m in message.metrics),
        seq=message.seq if message.HasField("seq") else None,
        uuid=message.uuid if message.HasField("uuid") else None,
        body=message.body if message.HasField("body") else None,
    )


# -- store and forward ---------------------------------------------------------------------------


def sequenced(
    data: bytes,
    seq: int,
    *,
    metrics: Mapping[str, tuple[int, DataType]],
    timestamp: int | None = None,
    historical: bool = False,
    shift_ms: int = 0,
) -> bytes | None:
    """A DATA payload kept by a buffer, as it is finally sent; None if no metric is left.

    The buffered payload has no seq and names every metric with its datatype
    (``EdgeNode.ddata(store=True)``). Here it gets the sending session's ``seq`` (§6.4.5:
    seq counts one session's messages, so it cannot be set before); each metric gets its
    alias from ``metrics`` (name -> alias and datatype now, as the BIRTH of the sending
    session declares them) and loses its name and datatype (DATA carries aliases only,
    §6.4.6, tck-id-payloads-metric-datatype-not-req); a metric that is gone, or whose
    datatype changed (another configuration since), is left out. ``timestamp`` replaces the
    payload's (the time of publishing); ``historical`` flags every metric ``is_historical``
    (replayed data must not overwrite the live value); ``shift_ms`` moves every metric
    timestamp by a clock step measured after it was stamped.

    Works on the protobuf message itself: it only moves fields, never re-places a value.
    """
    if not 0 <= seq <= 255:
        raise SparkplugError(f"seq {seq} is outside 0..255")
    message = pb.Payload()
    try:
        message.ParseFromString(data)
    except Exception as exc:  # protobuf's DecodeError; see decode()
        raise SparkplugError(f"not a Sparkplug B payload: {exc}") from None
    kept: list[pb.Payload.Metric] = []
    for metric in message.metrics:
        now = metrics.get(metric.name) if metric.HasField("name") else None
        if now is None or not metric.HasField("datatype") or metric.datatype != now[1]:
            continue
        metric.alias = now[0]
        metric.ClearField("name")
        metric.ClearField("datatype")
        if historical:
            metric.is_historical = True
        if shift_ms and metric.HasField("timestamp"):
            metric.timestamp = max(0, metric.timestamp + shift_ms)
        kept.append(metric)
    if not kept:
        return None
    if len(kept) < len(message.metrics):
        survivors = [pb.Payload.Metric() for _ in kept]
        for copy, metric in zip(survivors, kept, strict=True):
            copy.CopyFrom(metric)
        del message.metrics[:]
        message.metrics.extend(survivors)
    message.seq = seq
    if timestamp is not None:
        message.timestamp = timestamp
    return message.SerializeToString()

"""OPC UA server sink: every tag as a variable with units, ranges and quality; operators may
write the tags that have a write rule (see "Writes" below).

Address space, under our own namespace (``section.namespace_uri`` or
``urn:retrofit-gateway:<gateway name>``, index ``ns``; NodeIds below are ``ns=<ns>;s=...``)::

    Objects/<site>                   FolderType          s=#site
      <machine>                      FolderType          s=<machine>
        <device>                     BaseObjectType      s=<machine>/<device>
          <tag>                      see below           s=<machine>/<device>/<tag>
            0:EngineeringUnits       PropertyType        s=<machine>/<device>/<tag>#EngineeringUnits
            0:EURange                PropertyType        s=<machine>/<device>/<tag>#EURange
          online, error_count,       BaseDataVariable    s=<machine>/<device>#online ...
          last_error, last_success

NodeIds are strings made of the configured names, so a client's bookmarks survive restarts
and config reorderings. The config forbids ``/``, ``#`` and ``+`` in names, so the ids cannot
collide. A tag is an AnalogItemType when it has both ``min`` and ``max`` (they are its
EURange), a BaseAnalogType when it only has a unit, otherwise a BaseDataVariableType. Should
a tag share its name with a device diagnostic variable, the diagnostic's browse name gets a
leading ``_`` (its NodeId is unaffected).

DataType: bool/bit Boolean, int16 Int16, uint16 UInt16, int32 Int32, uint32 UInt32, int64
Int64, uint64 UInt64, float32 Float, float64 Double, bcd16 UInt16, bcd32 UInt32, string
String; any number with ``scale != 1`` or ``offset != 0`` is Double.

StatusCode from the reading's quality and reason:

=========  ========================  =================  ==================================
quality    reason                    value served       StatusCode
=========  ========================  =================  ==================================
Good       -                         the value          Good
Uncertain  out_of_range              the value          Uncertain_EngineeringUnitsExceeded
Uncertain  stale                     last value         Uncertain_LastUsableValue
Bad        waiting_for_initial_data  null               Bad_WaitingForInitialData
Bad        no_communication/timeout  null (never read)  Bad_NoCommunication
Bad        no_communication/timeout  last value kept    Bad_CommunicationError
Bad        device_exception          last value/null    Bad_DeviceFailure
Bad        decode_error              last value/null    Bad_ConfigurationError
either     anything else             as read            Uncertain / Bad
=========  ========================  =================  ==================================

``device_exception`` (the device answered with a Modbus exception) and ``decode_error`` (the
bytes do not decode as configured, NaN included) are not communication failures, so they get
the closest specific codes instead of one from the communication family. ``stale`` is never in
a batch: every few seconds the sink compares each Good variable with the bus and marks those
not refreshed for ``STALE_INTERVALS`` intervals, as ``Bus.snapshot`` does.

A Bad value keeps the last value, as the gateway's data model does everywhere: OPC UA Part 4
§7.7.1 says the value should be null when the status is Bad, but a technician looking at a
machine that just went offline wants the last number, and its SourceTimestamp says how old
it is. asyncua's own ``write_attribute_value`` enforces the null, so this sink writes the
attribute itself (see "fast path" below).

SourceTimestamp is the reading's ``source_ts`` (poll completion). An update whose value and
StatusCode equal what is served is not written at all, so SourceTimestamp is not bumped by
an unchanged value, and subscribers see changes only. A Bad reading that keeps the last
value carries the time that value was last read; one without a value, the time of the
failure. ServerTimestamp is the time the change was written.

Engineering units follow UNECE Recommendation 20 (see ``UNITS``) with
``UnitId`` computed from the common code as OPC 10000-8 §5.6.3.3 describes. An unknown unit
text gets ``UnitId = -1``, our namespace URI, and the text as DisplayName.

Security: the certificate and key are made on first start (RSA 2048, SHA-256, self-signed,
ApplicationUri, host names, loopback and the bound or the host's IPs in the SAN; see
``gateway.certs``) in ``<data_dir>/pki/own`` and reused while valid. Endpoints: the configured
``security`` list (Basic256Sha256, Aes128_Sha256_RsaOaep, Aes256_Sha256_RsaPss, each Sign
and/or SignAndEncrypt), and None only with ``allow_none``.

``_Gatekeeper`` (a UserManager, consulted at every ActivateSession, reconnects included)
decides who gets a session, from the certificate of the secure channel and the identity
token. With ``trust: list`` a client certificate must be in ``<data_dir>/pki/trusted/``, read
again at each activation so that ``retrofit-gw certs trust`` needs no restart; a refused one
is written to ``pki/rejected/``. Sessions whose certificate leaves trusted/ are disconnected at
the next status refresh. Logins: anonymous when allowed, and the configured users
(``gateway.auth`` hashes); ``SessionUser.access`` records reader or operator for the write
path.

asyncua 2.1 accepts a session on a SecurityPolicy#None channel even when no None endpoint is
offered (its channel starts as None and ``select_policy`` keeps it). The gatekeeper refuses
sessions without a client certificate unless ``allow_none``; discovery over None
(GetEndpoints) still works, as it must.

Fast path and the asyncua internals it uses (asyncua is pinned to 2.1.x):

- Nodes are built as ``NodeData`` straight into the address space, about 4x faster than the
  ``add_nodes`` service with identical nodes (a test holds them together): 10,000 tags take
  seconds on a Pi either way, and ``start()`` is on the gateway's start-up path.
- Values are written by setting the Value ``AttributeValue`` and awaiting its
  ``datachange_callbacks`` (the monitored items), which is what
  ``AddressSpace.write_attribute_value`` does minus the lookups and the null-on-Bad rule, with
  a cheaper type check (``_misfit``: a value asyncua cannot encode would fail every Publish
  that carries it, and a failed Publish ends the client's subscription).
- Each DataValue is a ``_DataValue``, whose deep copy is itself. asyncua deep-copies every
  DataValue for every monitored item (37 us each), which alone would cost a third of a core at
  10,000 values/s with one subscriber; this sink never mutates a DataValue it has written.
- Monitored items are notified by ``_notify_plain``: asyncua's own steps minus a 6 us detour
  per notification, and without three bugs of asyncua 2.1's deadband check (a null value
  crashes it, losing the notification; a status change within the deadband is dropped; the
  deadband is measured from the previous sample, so a slow drift is never reported).
- asyncua's ``init()`` builds its standard address space in ``asyncio.to_thread``;
  ``_fill_standard_nodes_in`` runs the same work in a thread that ``start()`` joins, so no
  idle executor thread outlives it, and loads it from asyncua's shelf in the data dir when
  one is there (``_StandardNodes``, which calls ``AddressSpace.make_aspace_shelf`` and
  ``load_aspace_shelf`` itself). The shelf is closed by ``_stop``. The shelf is made in a
  child process (``_make_shelf_in_child``), which imports asyncua through this module.
- Active sessions are counted from ``InternalServer._external_sessions``, which holds the
  sessions of connected clients (and, for a while, of disconnected ones with subscriptions).
- Connections whose certificate is no longer trusted are found through
  ``BinaryServer.clients`` and each one's ``UaProcessor`` (its session and the channel's
  ``security_policy.peer_certificate``).
- Writes: ``InternalServer.attribute_service`` is replaced by ``_WriteGate``, an
  ``AttributeService`` whose async ``write(params, user)`` asyncua's ``InternalSession.write``
  awaits with the session's user (our ``SessionUser``; asyncua's own internal session is the
  only Admin, and gets asyncua's write). The channel a write arrived on is the
  ``OPCUAProtocol`` in ``BinaryServer.clients`` whose ``_task`` is the current task (asyncua
  handles a connection's requests in that one task): its ``peer_name`` and
  ``processor._connection.security_policy`` (``URI``, ``Mode``). No match, no write.
- UserAccessLevel per user: a ``CallbackType.PostRead`` listener (``InternalSession.read``
  dispatches it with the user and the results list, which it then returns) rewrites the
  results for writable variables.

Writes: a client writes a machine only through ``runtime.write`` (``gateway.writes``), and
only the Value of a tag with a write rule. Those variables have AccessLevel CurrentRead |
CurrentWrite; every other variable is CurrentRead only. UserAccessLevel is stored as
CurrentRead and shown with CurrentWrite only to an operator on a Sign or SignAndEncrypt
channel (a PostRead server callback rewrites that one attribute in Read results; Read has no
user otherwise). ``_WriteGate`` replaces asyncua's AttributeService for every client session:
its ``write`` is async and awaited by the session's request handling, so a write waits for the
device without blocking the loop. It does hold up that connection's next requests, which
asyncua handles one at a time, until the device answers (each device call is bounded by
``gateway.writes.WRITE_TIMEOUT``, 10 s; a client whose request timeout is shorter may give up
on a write that still completes, and the audit has the outcome). In order:

========================================================  =================================
the write                                                 StatusCode
========================================================  =================================
a node that does not exist                                BadNodeIdUnknown
any other node, a read-only tag, an attribute not Value   BadNotWritable
by a reader or anonymously                                BadUserAccessDenied
an operator on a None channel (even with allow_none)      BadSecurityModeInsufficient
an IndexRange (every tag is a scalar)                     BadIndexRangeInvalid
a StatusCode other than Good with the value               BadWriteNotSupported
then ``runtime.write``: ok                                Good
``out_of_range``, ``not_allowed``, ``not_representable``  BadOutOfRange
``bad_type``                                              BadTypeMismatch
``rate_limited``                                          BadResourceUnavailable
``not_writable``                                          BadNotWritable
``device`` (no answer, link down, exception reply)        BadCommunicationError
``verify_failed`` (written, read back differs)            BadDeviceFailure
========================================================  =================================

The refusals above the ``runtime.write`` line never reach the write service (they are logged
and counted, not audited). The value goes to ``runtime.write`` as the client's Variant holds
it, whatever its numeric type: the write service checks the kind and converts exactly or
refuses, so an Int64 ``1450`` for a UInt16 tag is fine and ``12.34`` for a tag of 0.1 steps is
BadOutOfRange. Timestamps sent with the value are ignored: asyncua's client sends a
SourceTimestamp with every write, and the machine has no use for one. The written value is
never stored in the node: what the node shows is the next poll's read-back, and a refused
write leaves it as it was. ``rate_limited`` is BadResourceUnavailable because
BadTooManyOperations means too many operations in one request. The audit names the operator,
and ``opcua <address>:<port> <policy>_<mode> cert <id>`` as the origin.

Health, in ``runtime.health["opcua"]``: ``endpoint``, ``sessions`` (activated, refreshed
with the device diagnostics), ``updates`` (values written), ``started_in_s`` (``start()``),
``first_value_s`` (from ``start()`` to the first Good value served), ``variables``,
``refused`` (sessions and logins refused), ``certificates_pending`` (in pki/rejected/),
``writes`` (client writes done) and ``writes_refused`` (refused, by us or the write service).
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import functools
import gc
import hmac
import json
import logging
import math
import os
import pickle
import secrets
import shelve
import shutil
import signal
import socket
import sys
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Final, Literal

import asyncua
from asyncua import Server, ua
from asyncua.common.callback import CallbackType, ServerItemCallback
from asyncua.crypto.permission_rules import User, UserRole
from asyncua.crypto.validator import CertificateValidatorMethod
from asyncua.server.address_space import (
    AddressSpace,
    AttributeService,
    AttributeValue,
    NodeData,
    NodeManagementService,
)
from asyncua.server.binary_server_asyncio import OPCUAProtocol
from asyncua.server.internal_server import InternalServer
from asyncua.server.monitored_item_service import MonitoredItemService

import gateway
from gateway import auth
from gateway.bus import STALE_INTERVALS, Subscription
from gateway.certs import TrustList, describe, load_or_create_certificate, sha256_of
from gateway.config import OpcUaSection, OpcUaUser
from gateway.errors import GatewayError, WriteRefused
from gateway.model import Quality, Reading, Reason, TagKey, TagSpec
from gateway.sinks.base import RuntimeView
from gateway.status import DeviceState, DeviceStatus

__all__ = [
    "UNITS",
    "UNITS_NAMESPACE",
    "WRITE_STATUS",
    "OpcUaSink",
    "SessionUser",
    "count_sessions",
    "eu_information",
    "status_code",
    "unit_id",
    "variant_type",
]

log = logging.getLogger("gateway.sinks.opcua")

#: How often device diagnostics and staleness are refreshed without a status change.
STATUS_REFRESH_S: Final = 2.0
#: After a start without a shelf of the standard address space, when to make one (in a
#: child process; see ``_StandardNodes``): once the start-up rush is over.
#: ``$RETROFIT_GW_SHELF_DELAY_S`` overrides it for bench/startup.py; it is not a setting (not
#: in the config, not documented for users).
SHELF_DELAY_S = 60.0
with contextlib.suppress(ValueError):
    SHELF_DELAY_S = max(0.0, float(os.environ.get("RETROFIT_GW_SHELF_DELAY_S", SHELF_DELAY_S)))
UNITS_NAMESPACE: Final = "http://www.opcfoundation.org/UA/units/un/cefact"

_SC = ua.StatusCodes


# --- status codes ---------------------------------------------------------------------------------


def _code(value: int) -> ua.StatusCode:
    return ua.StatusCode(value)


_GOOD: Final = _code(_SC.Good)
_UNCERTAIN: Final = _code(_SC.Uncertain)
_BAD: Final = _code(_SC.Bad)
_WAITING: Final = _code(_SC.BadWaitingForInitialData)
_STALE: Final = _code(_SC.UncertainLastUsableValue)
_CONFIG_ERROR: Final = _code(_SC.BadConfigurationError)


def _build_codes() -> dict[tuple[Quality, Reason, bool], ua.StatusCode]:
    """(quality, reason, has a value) -> the one shared StatusCode object for that case."""
    codes: dict[tuple[Quality, Reason, bool], ua.StatusCode] = {}
    for has_value in (False, True):
        codes[(Quality.GOOD, Reason.NONE, has_value)] = _GOOD
        codes[(Quality.UNCERTAIN, Reason.OUT_OF_RANGE, has_value)] = _code(
            _SC.UncertainEngineeringUnitsExceeded
        )
        codes[(Quality.UNCERTAIN, Reason.STALE, has_value)] = _STALE
        codes[(Quality.BAD, Reason.WAITING, has_value)] = _WAITING
        lost = _code(_SC.BadCommunicationError if has_value else _SC.BadNoCommunication)
        codes[(Quality.BAD, Reason.NO_COMMUNICATION, has_value)] = lost
        codes[(Quality.BAD, Reason.TIMEOUT, has_value)] = lost
        codes[(Quality.BAD, Reason.BAD_FRAME, has_value)] = lost
        codes[(Quality.BAD, Reason.DEVICE_EXCEPTION, has_value)] = _code(_SC.BadDeviceFailure)
        codes[(Quality.BAD, Reason.DECODE_ERROR, has_value)] = _CONFIG_ERROR
    return codes


_CODES: Final = _build_codes()
_FALLBACK: Final = {Quality.GOOD: _GOOD, Quality.UNCERTAIN: _UNCERTAIN, Quality.BAD: _BAD}


def status_code(quality: Quality, reason: Reason, has_value: bool) -> ua.StatusCode:
    """The StatusCode served for a reading (the table in the module docstring)."""
    return _CODES.get((quality, reason, has_value)) or _FALLBACK[quality]


#: ``WriteRefused.code`` -> the StatusCode a client's write gets (see "Writes" above).
WRITE_STATUS: Final[Mapping[str, int]] = {
    "unknown_tag": _SC.BadNodeIdUnknown,
    "not_writable": _SC.BadNotWritable,
    "bad_type": _SC.BadTypeMismatch,
    "out_of_range": _SC.BadOutOfRange,
    "not_allowed": _SC.BadOutOfRange,
    "not_representable": _SC.BadOutOfRange,
    "rate_limited": _SC.BadResourceUnavailable,
    "device": _SC.BadCommunicationError,
    "verify_failed": _SC.BadDeviceFailure,
}


# --- engineering units ----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Unit:
    code: str  # UNECE Rec 20 common code
    symbol: str  # DisplayName
    name: str  # Description


#: Unit text as written in configs -> UNECE Rec 20 unit. Exact match: "mm" and "Mm" differ.
#: Codes checked against the Rec 20 code list (RPM, CEL, MMT, H81, BAR, AMP, VLT, KWT, P1,
#: C62, H87, HUR, SEC, 2X, L2 and the rest are its "common code" column).
UNITS: Final[Mapping[str, Unit]] = {
    alias: unit
    for unit, aliases in (
        (Unit("RPM", "r/min", "revolutions per minute"), ("rpm", "RPM", "r/min", "1/min")),
        (Unit("RPS", "r/s", "revolutions per second"), ("r/s", "rps")),
        (Unit("HTZ", "Hz", "hertz"), ("Hz", "hz")),
        (Unit("KHZ", "kHz", "kilohertz"), ("kHz",)),
        (Unit("CEL", "°C", "degree Celsius"), ("°C", "degC", "C", "℃")),
        (Unit("FAH", "°F", "degree Fahrenheit"), ("°F", "degF", "F", "℉")),
        (Unit("KEL", "K", "kelvin"), ("K",)),
        (Unit("MMT", "mm", "millimetre"), ("mm",)),
        (Unit("CMT", "cm", "centimetre"), ("cm",)),
        (Unit("MTR", "m", "metre"), ("m",)),
        (Unit("4H", "µm", "micrometre (micron)"), ("µm", "um", "μm")),
        (Unit("MMK", "mm²", "square millimetre"), ("mm²", "mm2", "mm^2")),
        (Unit("H81", "mm/min", "millimetre per minute"), ("mm/min",)),
        (Unit("C16", "mm/s", "millimetre per second"), ("mm/s",)),
        (Unit("2X", "m/min", "metre per minute"), ("m/min",)),
        (Unit("MTS", "m/s", "metre per second"), ("m/s",)),
        (Unit("DD", "°", "degree [unit of angle]"), ("°", "deg")),
        (Unit("BAR", "bar", "bar [unit of pressure]"), ("bar",)),
        (Unit("MBR", "mbar", "millibar"), ("mbar",)),
        (Unit("PAL", "Pa", "pascal"), ("Pa",)),
        (Unit("KPA", "kPa", "kilopascal"), ("kPa",)),
        (Unit("MPA", "MPa", "megapascal"), ("MPa",)),
        (Unit("PS", "psi", "pound-force per square inch"), ("psi",)),
        (Unit("AMP", "A", "ampere"), ("A",)),
        (Unit("4K", "mA", "milliampere"), ("mA",)),
        (Unit("VLT", "V", "volt"), ("V",)),
        (Unit("2Z", "mV", "millivolt"), ("mV",)),
        (Unit("KVT", "kV", "kilovolt"), ("kV",)),
        (Unit("WTT", "W", "watt"), ("W",)),
        (Unit("KWT", "kW", "kilowatt"), ("kW", "kw")),
        (Unit("KWH", "kW·h", "kilowatt hour"), ("kWh", "kW·h", "kW*h")),
        (Unit("NEW", "N", "newton"), ("N",)),
        (Unit("NU", "N·m", "newton metre"), ("Nm", "N·m", "N*m")),
        (Unit("P1", "%", "percent"), ("%", "percent")),
        (Unit("C62", "1", "one"), ("count", "counts", "1")),
        (Unit("H87", "pce", "piece"), ("pcs", "pce", "parts", "pieces", "piece")),
        (Unit("HUR", "h", "hour"), ("h", "hr")),
        (Unit("MIN", "min", "minute [unit of time]"), ("min",)),
        (Unit("SEC", "s", "second [unit of time]"), ("s", "sec")),
        (Unit("C26", "ms", "millisecond"), ("ms",)),
        (Unit("B98", "µs", "microsecond"), ("µs", "us", "μs")),
        (Unit("LTR", "l", "litre"), ("l", "L")),
        (Unit("L2", "l/min", "litre per minute"), ("l/min", "L/min")),
        (Unit("MTQ", "m³", "cubic metre"), ("m³", "m3")),
        (Unit("MQH", "m³/h", "cubic metre per hour"), ("m³/h", "m3/h")),
        (Unit("KGM", "kg", "kilogram"), ("kg",)),
        (Unit("GRM", "g", "gram"), ("g",)),
    )
    for alias in aliases
}


def unit_id(common_code: str) -> int:
    """OPC 10000-8 §5.6.3.3: the common code's characters, shifted into an Int32."""
    value = 0
    for char in common_code[:4]:
        value = (value << 8) | ord(char)
    return value


def eu_information(text: str, namespace_uri: str) -> ua.EUInformation:
    """EUInformation for a configured unit text; unknown units keep their text, UnitId -1."""
    unit = UNITS.get(text.strip())
    if unit is None:
        return ua.EUInformation(
            NamespaceUri=namespace_uri,
            UnitId=-1,
            DisplayName=ua.LocalizedText(text),
            Description=ua.LocalizedText(text),
        )
    return ua.EUInformation(
        NamespaceUri=UNITS_NAMESPACE,
        UnitId=unit_id(unit.code),
        DisplayName=ua.LocalizedText(unit.symbol),
        Description=ua.LocalizedText(unit.name),
    )


# --- data types -----------------------------------------------------------------------------------

_VT = ua.VariantType
_DATATYPES: Final[Mapping[str, ua.VariantType]] = {
    "bool": _VT.Boolean,
    "bit": _VT.Boolean,
    "int16": _VT.Int16,
    "uint16": _VT.UInt16,
    "int32": _VT.Int32,
    "uint32": _VT.UInt32,
    "int64": _VT.Int64,
    "uint64": _VT.UInt64,
    "float32": _VT.Float,
    "float64": _VT.Double,
    "bcd16": _VT.UInt16,
    "bcd32": _VT.UInt32,
    "string": _VT.String,
}
_NON_NUMERIC: Final = frozenset({_VT.Boolean, _VT.String})


def variant_type(spec: TagSpec) -> ua.VariantType:
    """The tag's OPC UA type; scaled numbers are Double whatever their register type."""
    try:
        vtype = _DATATYPES[spec.datatype]
    except KeyError:
        raise ValueError(
            f"tag {spec.key}: no OPC UA type for data type {spec.datatype!r}"
        ) from None
    if vtype not in _NON_NUMERIC and (spec.scale != 1.0 or spec.offset != 0.0):
        return _VT.Double
    return vtype


# --- the hot path's pieces ------------------------------------------------------------------------


class _DataValue(ua.DataValue):  # type: ignore[misc]  # asyncua is Any to mypy
    """A DataValue that is never changed after it is written, so a deep copy is itself.

    asyncua deep-copies the value for every monitored item on every change; for a DataValue
    that nobody mutates that copy is pure cost.
    """

    __slots__ = ()

    def __copy__(self) -> _DataValue:
        return self

    def __deepcopy__(self, memo: dict[int, Any]) -> _DataValue:
        return self


_NULL: Final = ua.Variant(None, _VT.Null)


#: The Python type a variable of each OPC UA type takes, and the range of the integer ones.
_PYTYPES: Final[Mapping[ua.VariantType, tuple[type, int | None, int]]] = {
    _VT.Boolean: (bool, None, 0),
    _VT.Int16: (int, -(2**15), 2**15 - 1),
    _VT.UInt16: (int, 0, 2**16 - 1),
    _VT.Int32: (int, -(2**31), 2**31 - 1),
    _VT.UInt32: (int, 0, 2**32 - 1),
    _VT.Int64: (int, -(2**63), 2**63 - 1),
    _VT.UInt64: (int, 0, 2**64 - 1),
    _VT.Float: (float, None, 0),
    _VT.Double: (float, None, 0),
    _VT.String: (str, None, 0),
}


class _Var:
    """One served tag: its Value attribute and what was last written to it."""

    __slots__ = (
        "attr",
        "code",
        "high",
        "interval",
        "key",
        "low",
        "ptype",
        "source_ts",
        "value",
        "vtype",
    )

    def __init__(self, key: TagKey, attr: AttributeValue, vtype: ua.VariantType, interval: float):
        self.key = key
        self.attr = attr
        self.vtype = vtype
        ptype, self.low, self.high = _PYTYPES[vtype]
        # Any: with a type here, mypy narrows a value compared by class to ``object``.
        self.ptype: Any = ptype
        self.interval = interval
        self.value: object = None
        self.code: ua.StatusCode = _WAITING
        self.source_ts = 0.0


@dataclass(slots=True)
class _DeviceVars:
    """A device's diagnostic variables, and what they show now."""

    name: str
    online: AttributeValue
    error_count: AttributeValue
    last_error: AttributeValue
    last_success: AttributeValue
    shown: tuple[bool, int, str, float | None] | None = None


_DIAGNOSTICS: Final = (
    ("online", _VT.Boolean, "True while the device answers polls."),
    ("error_count", _VT.UInt32, "Failed polls and bad tag reads since start-up."),
    ("last_error", _VT.String, "The most recent error, or empty."),
    ("last_success", _VT.DateTime, "When the device last answered a poll."),
)


async def _notify(attr: AttributeValue, dv: ua.DataValue) -> None:
    """Tell the monitored items of ``attr``; one that fails must not stop the others."""
    # A copy: a client may delete its monitored item while we await another one.
    for handle, callback in list(attr.datachange_callbacks.items()):
        try:
            if not await _notify_plain(handle, callback, dv):
                await callback(handle, dv)
        except Exception:
            log.exception("OPC UA monitored item %s failed on a value change", handle)


_MonitoredItemNotification = ua.MonitoredItemNotification
_DISABLED: Final = ua.MonitoringMode.Disabled
_TRIGGER_STATUS: Final = ua.DataChangeTrigger.Status
_TRIGGER_TIMESTAMP: Final = ua.DataChangeTrigger.StatusValueTimestamp
_ABSOLUTE: Final = ua.DeadbandType.Absolute


async def _notify_plain(handle: int, callback: Any, dv: ua.DataValue) -> bool:
    """``MonitoredItemService.datachange_callback``, 3x cheaper and right about deadbands.

    Same steps: skip a disabled item, remember the value, queue a notification when it changed
    as the item's DataChangeFilter says. What it saves is asyncua building every notification
    through a default ``DataValue()`` (6 us, mostly a failed enum lookup) and the deep copy.
    Unlike asyncua 2.1 it always reports a status change (Part 4 §7.22.2: a deadband applies
    to the value), measures the deadband from the last *reported* value (so a slow drift is
    reported once it adds up), and a null value never crashes the deadband check. Returns False
    for what it does not know (a percent deadband, another kind of callback): asyncua does it.
    """
    service = getattr(callback, "__self__", None)
    if not isinstance(service, MonitoredItemService):
        return False
    mid = service._monitored_datachange.get(handle)
    item = service._monitored_items.get(mid) if mid is not None else None
    if item is None:
        return False
    # No filter arrives as an empty ExtensionObject, which is falsy.
    flt = item.filter or None
    deadband = 0.0
    if flt is not None:
        # By name: asyncua decodes into uaprotocol_auto's class, ua.DataChangeFilter is another.
        if type(flt).__name__ != "DataChangeFilter" or flt.DeadbandType not in (0, _ABSOLUTE):
            return False
        if flt.DeadbandType == _ABSOLUTE:
            deadband = flt.DeadbandValue
    if item.mode == _DISABLED:
        return True
    values = item.mvalue
    old = values.current_dvalue  # the last value reported to this item
    if old is not None and old.StatusCode == dv.StatusCode:
        trigger = flt.Trigger if flt is not None else None
        if trigger == _TRIGGER_STATUS:
            return True
        if old.Value == dv.Value:
            if trigger != _TRIGGER_TIMESTAMP or old.SourceTimestamp == dv.SourceTimestamp:
                return True
        elif deadband and _within(old.Value.Value, dv.Value.Value, deadband):
            return True
    values.old_dvalue = old
    values.current_dvalue = dv
    event = _MonitoredItemNotification(ClientHandle=item.client_handle, Value=dv)
    await service.isub.enqueue_datachange_event(mid, event, item.queue_size)
    return True


def _within(old: object, new: object, deadband: float) -> bool:
    """True when two numbers differ by no more than the deadband (bools and text never are)."""
    numbers = (int, float)
    if isinstance(old, bool) or isinstance(new, bool):
        return False
    if isinstance(old, numbers) and isinstance(new, numbers):
        return abs(new - old) <= deadband
    return False


# --- address space builder ------------------------------------------------------------------------

_A = ua.AttributeIds
_READ_WRITE: Final = ua.AccessLevel.CurrentRead.mask | ua.AccessLevel.CurrentWrite.mask


def _dv(value: Any, vtype: ua.VariantType) -> ua.DataValue:
    return ua.DataValue(ua.Variant(value, vtype))


class _Builder:
    """Adds nodes to an address space the way asyncua's ``add_nodes`` does, minus its checks.

    ``add_nodes`` spends most of its 230 us per node re-deriving what is fixed here (type
    names, parent lookups, timestamp-stamped attributes, a scan of the parent's properties).
    Values that many nodes share (access levels, an empty description, a unit, the reference
    back to a parent) are made once: asyncua replaces attribute values, it never mutates them.
    """

    def __init__(self, aspace: AddressSpace) -> None:
        self._aspace = aspace
        self._read = _dv(ua.AccessLevel.CurrentRead.mask, _VT.Byte)
        self._read_write = _dv(_READ_WRITE, _VT.Byte)
        self._zero32 = _dv(0, _VT.UInt32)
        self._scalar = _dv(ua.ValueRank.Scalar, _VT.Int32)
        self._false = _dv(False, _VT.Boolean)
        self._variable = _dv(ua.NodeClass.Variable, _VT.Int32)
        self._object = _dv(ua.NodeClass.Object, _VT.Int32)
        self._no_events = _dv(0, _VT.Byte)
        self._no_dimensions = ua.DataValue(ua.Variant(None, _VT.UInt32, is_array=True))
        self._shared: dict[tuple[ua.VariantType, object], ua.DataValue] = {}
        self._type_refs: dict[int, ua.ReferenceDescription] = {}
        self._back_refs: dict[tuple[ua.NodeId, int], ua.ReferenceDescription] = {}
        self._type_of: dict[ua.NodeId, ua.NodeId] = {}

    def shared(self, value: object, vtype: ua.VariantType, key: object = None) -> ua.DataValue:
        """One DataValue for every node with this value (``key`` when the value is unhashable)."""
        cache_key = (vtype, value if key is None else key)
        dv = self._shared.get(cache_key)
        if dv is None:
            dv = self._shared[cache_key] = _dv(value, vtype)
        return dv

    def _type_ref(self, type_id: int) -> ua.ReferenceDescription:
        """The HasTypeDefinition reference, described as asyncua describes it."""
        ref = self._type_refs.get(type_id)
        if ref is None:
            nodeid = ua.NodeId(type_id)
            data = self._aspace[nodeid]
            ref = self._type_refs[type_id] = ua.ReferenceDescription(
                ReferenceTypeId=ua.NodeId(ua.ObjectIds.HasTypeDefinition),
                IsForward=True,
                NodeId=nodeid,
                BrowseName=_attr_value(data, _A.BrowseName),
                DisplayName=_attr_value(data, _A.DisplayName),
                NodeClass=_attr_value(data, _A.NodeClass),
            )
        return ref

    def _back_ref(self, parent: ua.NodeId, reference: int) -> ua.ReferenceDescription:
        """The inverse reference from a child to ``parent``, the same for all its children."""
        ref = self._back_refs.get((parent, reference))
        if ref is None:
            data = self._aspace[parent]
            parent_type = self._type_of.get(parent)
            if parent_type is None:
                parent_type = next(
                    (
                        r.NodeId
                        for r in data.references
                        if r.IsForward
                        and r.ReferenceTypeId.Identifier == ua.ObjectIds.HasTypeDefinition
                    ),
                    ua.NodeId(),
                )
            ref = self._back_refs[(parent, reference)] = ua.ReferenceDescription(
                ReferenceTypeId=ua.NodeId(reference),
                IsForward=False,
                NodeId=parent,
                BrowseName=_attr_value(data, _A.BrowseName),
                DisplayName=_attr_value(data, _A.DisplayName),
                NodeClass=_attr_value(data, _A.NodeClass),
                TypeDefinition=parent_type,
            )
        return ref

    def _link(
        self,
        node: NodeData,
        node_class: ua.NodeClass,
        parent: ua.NodeId,
        reference: int,
        type_id: int,
        browse_name: ua.QualifiedName,
        display_name: ua.LocalizedText,
    ) -> None:
        if node.nodeid in self._aspace:
            raise ValueError(f"OPC UA node {node.nodeid.to_string()} is defined twice")
        back = self._back_ref(parent, reference)
        type_ref = self._type_ref(type_id)
        node.references = [back, type_ref]
        self._aspace[parent].references.append(
            ua.ReferenceDescription(
                ReferenceTypeId=back.ReferenceTypeId,
                IsForward=True,
                NodeId=node.nodeid,
                BrowseName=browse_name,
                DisplayName=display_name,
                NodeClass=node_class,
                TypeDefinition=type_ref.NodeId,
            )
        )
        self._type_of[node.nodeid] = type_ref.NodeId
        self._aspace[node.nodeid] = node

    def _description(self, text: str) -> ua.DataValue:
        return self.shared(ua.LocalizedText(text), _VT.LocalizedText, key=("description", text))

    def add_object(
        self,
        nodeid: ua.NodeId,
        parent: ua.NodeId,
        reference: int,
        type_id: int,
        name: str,
        description: str = "",
    ) -> None:
        browse = ua.QualifiedName(name, nodeid.NamespaceIndex)
        display = ua.LocalizedText(name)
        node = NodeData(nodeid)
        node.attributes = {
            _A.NodeId: AttributeValue(_dv(nodeid, _VT.NodeId)),
            _A.BrowseName: AttributeValue(_dv(browse, _VT.QualifiedName)),
            _A.NodeClass: AttributeValue(self._object),
            _A.Description: AttributeValue(self._description(description)),
            _A.DisplayName: AttributeValue(_dv(display, _VT.LocalizedText)),
            _A.EventNotifier: AttributeValue(self._no_events),
            _A.UserWriteMask: AttributeValue(self._zero32),
            _A.WriteMask: AttributeValue(self._zero32),
        }
        self._link(node, ua.NodeClass.Object, parent, reference, type_id, browse, display)

    def add_variable(
        self,
        nodeid: ua.NodeId,
        parent: ua.NodeId,
        reference: int,
        type_id: int,
        browse: ua.QualifiedName,
        datatype: int,
        value: ua.DataValue,
        description: str = "",
        sampling_ms: float | None = None,
        *,
        writable: bool = False,
    ) -> AttributeValue:
        """A variable; ``writable``: AccessLevel says so, UserAccessLevel is still read-only
        (``OpcUaSink._on_read`` shows CurrentWrite to those who may write)."""
        display = ua.LocalizedText(browse.Name)
        value_attr = AttributeValue(value)
        node = NodeData(nodeid)
        node.attributes = {
            _A.NodeId: AttributeValue(_dv(nodeid, _VT.NodeId)),
            _A.BrowseName: AttributeValue(_dv(browse, _VT.QualifiedName)),
            _A.NodeClass: AttributeValue(self._variable),
            _A.AccessLevel: AttributeValue(self._read_write if writable else self._read),
            _A.ArrayDimensions: AttributeValue(self._no_dimensions),
            _A.DataType: AttributeValue(
                self.shared(ua.NodeId(datatype), _VT.NodeId, key=("datatype", datatype))
            ),
            _A.Description: AttributeValue(self._description(description)),
            _A.DisplayName: AttributeValue(_dv(display, _VT.LocalizedText)),
            _A.Historizing: AttributeValue(self._false),
            _A.UserAccessLevel: AttributeValue(self._read),
            _A.UserWriteMask: AttributeValue(self._zero32),
            _A.ValueRank: AttributeValue(self._scalar),
            _A.WriteMask: AttributeValue(self._zero32),
            _A.Value: value_attr,
        }
        if sampling_ms is not None:
            node.attributes[_A.MinimumSamplingInterval] = AttributeValue(
                self.shared(sampling_ms, _VT.Double)
            )
        self._link(node, ua.NodeClass.Variable, parent, reference, type_id, browse, display)
        return value_attr


def _attr_value(node: NodeData, attr: ua.AttributeIds) -> Any:
    dv = node.attributes[attr].value
    return dv.Value.Value if dv is not None and dv.Value is not None else None


# --- the sink -------------------------------------------------------------------------------------


@dataclass
class SessionUser(User):  # type: ignore[misc]  # asyncua is Any to mypy
    """Who an activated session belongs to (``InternalSession.user``).

    ``role`` is asyncua's: ``UserRole.User`` for everyone, which lets a session browse, read
    and subscribe. ``access`` is ours, for the write path to check: anonymous sessions are
    readers. ``name`` is the username (None when anonymous); ``certificate_id`` the client
    application's certificate id (None on a None channel).
    """

    access: Literal["reader", "operator"] = "reader"
    certificate_id: str | None = None


class _OncePer:
    """One log line per key and minute, however often a client retries."""

    def __init__(self, period_s: float = 60.0) -> None:
        self.period_s = period_s
        self._last: dict[str, float] = {}

    def __call__(self, key: str) -> bool:
        now = time.monotonic()
        if now - self._last.get(key, -self.period_s) < self.period_s:
            return False
        if len(self._last) > 1000:  # keys include client-chosen usernames
            self._last.clear()
        self._last[key] = now
        return True


class _Accounts:
    """The configured users and their password checks, cheap enough for the event loop.

    asyncua asks for the user synchronously, inside ActivateSession, so a check blocks the
    loop for one scrypt run (50 ms here, a few hundred on a Pi). Two things bound that: a
    password that verified once is remembered (as an HMAC under a key that lives only in this
    process), so a client reconnecting costs nothing; and after a failed check the next
    unremembered one within ``FAILURE_PAUSE_S`` is refused without hashing, so guessing costs
    the loop at most one scrypt run per pause. An unknown username is checked against a decoy
    hash, so that the time taken does not tell which usernames exist.
    """

    FAILURE_PAUSE_S: Final = 1.0

    def __init__(self, users: Sequence[OpcUaUser]) -> None:
        self._users = {u.name: (str(auth.parse_hash(u.password_hash)), u.role) for u in users}
        self._decoy = str(
            auth.PasswordHash(
                auth.N, auth.R, auth.P, secrets.token_bytes(16), secrets.token_bytes(32)
            )
        )
        self._key = secrets.token_bytes(32)
        self._verified: dict[str, bytes] = {}
        self._paused_until = 0.0
        self._once = _OncePer()
        self.failed = 0

    def check(self, name: str, password: str, client: str) -> Literal["reader", "operator"] | None:
        user = self._users.get(name)
        tag = hmac.digest(self._key, password.encode("utf-8", "surrogatepass"), "sha256")
        if user is not None and hmac.compare_digest(self._verified.get(name, b""), tag):
            return user[1]
        if time.monotonic() < self._paused_until:
            self.failed += 1
            if self._once("paused"):
                log.warning(
                    "OPC UA: refused a login as %r from %s unchecked: another login failed "
                    "less than %g s ago (%d failed logins so far)",
                    name,
                    client,
                    self.FAILURE_PAUSE_S,
                    self.failed,
                )
            return None
        ok = auth.verify_password(password, user[0] if user is not None else self._decoy)
        if ok and user is not None:
            self._verified[name] = tag
            return user[1]
        self._paused_until = time.monotonic() + self.FAILURE_PAUSE_S
        self.failed += 1
        if self._once(f"failed:{name}"):
            why = "wrong password" if user is not None else "no such user"
            log.warning(
                "OPC UA: refused a login as %r from %s: %s (%d failed logins so far)",
                name,
                client,
                why,
                self.failed,
            )
        return None


class _Gatekeeper:
    """An asyncua UserManager, consulted at every ActivateSession: channel, certificate, login.

    ``certificate`` is the client's certificate from the secure channel; on a None channel it
    is empty (asyncua passes ``b""``), on a Sign or SignAndEncrypt one it cannot be. It is
    checked here rather than in asyncua's ``certificate_validator`` hook, because that hook
    sees the certificate the client *names* in CreateSession, which need not be the one its
    channel was opened with (the one it proved it holds the key of), and it cannot tell a
    None channel, where a certificate proves nothing, from a secure one.

    In order: a None channel is refused unless ``allow_none``; an untrusted certificate is
    refused with BadCertificateUntrusted and kept in rejected/ (``trust`` is None for
    ``trust: any``); an expired one with BadCertificateTimeInvalid; then the identity token:
    anonymous when allowed, else a configured user with the right password
    (BadUserAccessDenied otherwise). asyncua itself refuses token types not offered
    (BadIdentityTokenRejected): anonymous when it is off.
    """

    def __init__(
        self,
        allow_none: bool,
        trust: TrustList | None,
        accounts: _Accounts,
        anonymous: bool,
    ) -> None:
        self.allow_none = allow_none
        self.trust = trust
        self.accounts = accounts
        self.anonymous = anonymous
        self.refused = 0
        self._once = _OncePer()

    def get_user(
        self,
        iserver: InternalServer,
        username: str | None = None,
        password: str | None = None,
        certificate: Any = None,
    ) -> User | None:
        if not certificate:
            if not self.allow_none:
                self.refused += 1
                if self._once("unsecured"):
                    log.warning(
                        "OPC UA: refused a session on an unsecured channel (allow_none is off; "
                        "%d refused so far)",
                        self.refused,
                    )
                return None
            cert_id, client = None, "a client without a certificate"
        else:
            cert_id, client = self._check_certificate(bytes(certificate))
        if username is None:
            if not self.anonymous:
                self.refused += 1
                return None
            return SessionUser(role=UserRole.User, certificate_id=cert_id)
        access = self.accounts.check(username, password or "", client)
        if access is None:
            self.refused += 1
            return None
        return SessionUser(role=UserRole.User, name=username, access=access, certificate_id=cert_id)

    def _check_certificate(self, der: bytes) -> tuple[str, str]:
        """(id, a description for the log) of a certificate that may connect; else raises."""
        try:
            info = describe(der)
        except ValueError:
            self.refused += 1
            raise ua.uaerrors.BadCertificateInvalid from None
        client = f"certificate {info.id} ({info.common_name or info.subject})"
        if self.trust is not None and not self.trust.is_trusted(der):
            self.refused += 1
            try:
                kept, new = self.trust.refuse(der)
            except OSError as exc:
                kept, new = info, False
                log.error("OPC UA: cannot keep refused %s in rejected/: %s", client, exc)  # noqa: TRY400
            if new or self._once(f"untrusted:{info.id}"):
                log.warning(
                    "OPC UA: refused client %s, application %s: not trusted; it is in %s. "
                    "If it is yours: retrofit-gw certs trust CONFIG %s",
                    client,
                    info.application_uri or "(none named)",
                    kept.path or self.trust.rejected_dir,
                    info.id,
                )
            raise ua.uaerrors.BadCertificateUntrusted
        if problem := info.time_problem():
            self.refused += 1
            if self._once(f"time:{info.id}"):
                log.warning("OPC UA: refused client %s: %s", client, problem)
            raise ua.uaerrors.BadCertificateTimeInvalid
        return info.id, client


@dataclass(frozen=True, slots=True)
class _Channel:
    """The secure channel a request arrived on, as the audit names it."""

    peer: str  # "127.0.0.1:50312"
    policy: str  # "Basic256Sha256_SignAndEncrypt", or "None"
    secure: bool  # Sign or SignAndEncrypt


_SECURE_MODES: Final = (ua.MessageSecurityMode.Sign, ua.MessageSecurityMode.SignAndEncrypt)


def _peer(name: Any) -> str:
    if isinstance(name, tuple) and len(name) >= 2:
        host, port = name[0], name[1]
        return f"[{host}]:{port}" if ":" in str(host) else f"{host}:{port}"
    return str(name)


def _current_channel(server: Server | None) -> _Channel | None:
    """The channel of the request being handled: asyncua handles each connection's requests
    one at a time in that connection's own task, so the current task names the connection."""
    bserver = server.bserver if server is not None else None
    if bserver is None:
        return None
    task = asyncio.current_task()
    client: OPCUAProtocol
    for client in bserver.clients:
        if client._task is not task or client.processor is None:
            continue
        policy = client.processor._connection.security_policy
        secure = policy.Mode in _SECURE_MODES
        name = f"{policy.URI.rsplit('#', 1)[-1]}_{policy.Mode.name}" if secure else "None"
        return _Channel(_peer(client.peer_name), name, secure)
    return None


_ClientWrite = Callable[[Any, User], Awaitable[ua.StatusCode]]


def _attribute_name(attribute: int) -> str:
    try:
        return str(ua.AttributeIds(attribute).name)
    except ValueError:
        return str(attribute)


def _may_write(user: object) -> bool:
    """An operator whose session was activated on a secure channel (it had a certificate)."""
    return (
        isinstance(user, SessionUser)
        and user.access == "operator"
        and user.certificate_id is not None
    )


#: UserAccessLevel as an operator's session reads it on a writable tag.
_OPERATOR_ACCESS: Final = ua.DataValue(ua.Variant(_READ_WRITE, _VT.Byte))


class _WriteGate(AttributeService):  # type: ignore[misc]  # asyncua is Any to mypy
    """asyncua's AttributeService, except that a client's writes go to ``client_write``.

    asyncua's own check (AccessLevel and UserAccessLevel bits) would store the value in the
    node, which must show what the machine holds; and its UserAccessLevel is one for all.
    """

    def __init__(self, aspace: AddressSpace, client_write: _ClientWrite) -> None:
        super().__init__(aspace)
        self._client_write = client_write

    async def write(self, params: ua.WriteParameters, user: User) -> list[ua.StatusCode]:
        if user.role is UserRole.Admin and not isinstance(user, SessionUser):
            # asyncua's internal session (server-side calls): not a client.
            return await super().write(params, user)  # type: ignore[no-any-return]
        # One at a time: two writes in one request are two device round trips in order.
        return [await self._client_write(wv, user) for wv in params.NodesToWrite]


#: Config name -> asyncua's endpoint type. The names are the SecurityPolicy URIs' own.
_POLICIES: Final[Mapping[str, ua.SecurityPolicyType]] = {
    "Basic256Sha256_Sign": ua.SecurityPolicyType.Basic256Sha256_Sign,
    "Basic256Sha256_SignAndEncrypt": ua.SecurityPolicyType.Basic256Sha256_SignAndEncrypt,
    "Aes128_Sha256_RsaOaep_Sign": ua.SecurityPolicyType.Aes128Sha256RsaOaep_Sign,
    "Aes128_Sha256_RsaOaep_SignAndEncrypt": (
        ua.SecurityPolicyType.Aes128Sha256RsaOaep_SignAndEncrypt
    ),
    "Aes256_Sha256_RsaPss_Sign": ua.SecurityPolicyType.Aes256Sha256RsaPss_Sign,
    "Aes256_Sha256_RsaPss_SignAndEncrypt": ua.SecurityPolicyType.Aes256Sha256RsaPss_SignAndEncrypt,
}


class OpcUaSink:
    """Serves every tag over OPC UA. See the module docstring for the address space."""

    name = "opcua"

    def __init__(
        self,
        runtime: RuntimeView,
        section: OpcUaSection,
        *,
        certificate_validator: CertificateValidatorMethod | None = None,
    ) -> None:
        self._rt = runtime
        self._section = section
        self._validator = certificate_validator
        gw = runtime.config.gateway
        self.namespace_uri = section.namespace_uri or f"urn:retrofit-gateway:{gw.name}"
        self.application_uri = (
            section.application_uri or f"urn:retrofit-gateway:{socket.gethostname()}:{gw.name}"
        )
        self.endpoint = f"opc.tcp://{_url_host(section.host)}:{section.port}"
        self.pki_dir = runtime.data_dir / "pki" / "own"
        self.cert_path = self.pki_dir / "server_cert.der"
        self.key_path = self.pki_dir / "server_key.pem"
        self.trust = TrustList(runtime.data_dir) if section.trust == "list" else None
        # Parsed here: a malformed hash fails the start, it never waits for the first login.
        self._gate = _Gatekeeper(
            section.allow_none, self.trust, _Accounts(section.users), section.anonymous_allowed
        )
        self.namespace_index = 0
        self._server: Server | None = None
        self._vars: dict[TagKey, _Var] = {}
        #: NodeId -> spec of each tag with a write rule: the only nodes a client may write.
        self._writable: dict[ua.NodeId, TagSpec] = {}
        self._devices: list[_DeviceVars] = []
        self._writes = 0
        self._writes_refused = 0
        self._once = _OncePer()
        self._updates = 0
        self._t_start = 0.0
        self._first_value_s: float | None = None
        self._misfits: set[TagKey] = set()
        self._standard: _StandardNodes | None = None
        self.health: dict[str, object] = {
            "endpoint": self.endpoint,
            "sessions": 0,
            "updates": 0,
            "started_in_s": None,
            "first_value_s": None,
            "variables": 0,
            "refused": 0,
            "certificates_pending": 0,
            "writes": 0,
            "writes_refused": 0,
        }
        runtime.health[self.name] = self.health

    # -- lifecycle -----------------------------------------------------------------------------

    async def start(self) -> None:
        self._t_start = t0 = time.monotonic()
        self._vars, self._devices, self._first_value_s = {}, [], None
        self._writable = {}
        server = self._new_server()
        standard = self._standard = _StandardNodes(self._rt.data_dir)
        # Our own thread rather than the loop's default executor: asyncua would leave an idle
        # pool thread behind for the life of the process; this one is joined before we return.
        pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="opcua-start")
        loop = asyncio.get_running_loop()
        try:
            cert, key = await loop.run_in_executor(
                pool,
                load_or_create_certificate,
                self.pki_dir,
                self.application_uri,
                self._section.host,
                self._rt.config.gateway.name,
            )
            t_init = time.monotonic()
            _fill_standard_nodes_in(server.iserver, pool, standard, use_shelf=True)
            try:
                await server.init()
            except Exception as exc:
                if standard.source != "shelf":
                    raise
                # The shelf passed its checks and still failed (a damaged node): remove it,
                # start again without it; the next start makes a new one.
                standard.problem = f"cannot use {standard.folder}: {_reason(exc)}"
                await _stop(server)
                await loop.run_in_executor(pool, standard.discard)
                server = self._new_server()
                standard.source = "built"
                _fill_standard_nodes_in(server.iserver, pool, standard, use_shelf=False)
                await server.init()
            init_s = time.monotonic() - t_init
            if standard.problem:
                log.warning(
                    "OPC UA: %s; the standard address space was built from asyncua's code "
                    "instead (the slow way), and the shelf is made again",
                    standard.problem,
                )
            await server.set_build_info(
                server.product_uri,
                server.manufacturer_name,
                server.name,
                gateway.__version__,
                gateway.__version__,
                datetime.now(UTC),
            )
            await server.set_application_uri(self.application_uri)
            server.set_endpoint(self.endpoint)
            server.iserver.certificate = cert
            server.iserver.private_key = key
            policies = [_POLICIES[p] for p in self._section.security]
            if self._section.allow_none:
                policies.append(ua.SecurityPolicyType.NoSecurity)
            server.set_security_policy(policies)
            tokens: list[type] = []
            if self._gate.anonymous:
                tokens.append(ua.AnonymousIdentityToken)
            if self._section.users:
                tokens.append(ua.UserNameIdentityToken)
            server.set_identity_tokens(tokens)
            server.iserver.set_user_manager(self._gate)
            server.allow_remote_admin(False)
            if self.trust is not None:
                await loop.run_in_executor(pool, self.trust.make_folders)
            if self._validator is not None:
                server.set_certificate_validator(self._validator)
            self.namespace_index = await server.register_namespace(self.namespace_uri)
            t_build = time.monotonic()
            # The build adds ~15 objects per variable to a heap asyncua already filled with
            # half a million: each full collection it triggers walks them all. A third faster.
            collecting = gc.isenabled()
            gc.disable()
            try:
                await self._build(server)
            finally:
                if collecting:
                    gc.enable()
            build_s = time.monotonic() - t_build
            await self._apply(list(self._rt.bus.latest.values()))
            await self._listen(server)
            await self._refresh()
        except BaseException:
            self._server = None
            await _stop(server)
            raise
        finally:
            # Waits only if start() was cancelled while the pool thread still works.
            pool.shutdown(wait=True)
        started = time.monotonic() - t0
        self.health["started_in_s"] = round(started, 3)
        self.health["variables"] = len(self._vars)
        log.info(
            "OPC UA server on %s started in %.2f s (asyncua init %.2f s, standard nodes %s; "
            "%d variables in %.2f s); namespace %s (ns=%d), application %s",
            self.endpoint,
            started,
            init_s,
            _SOURCES[standard.source],
            len(self._vars),
            build_s,
            self.namespace_uri,
            self.namespace_index,
            self.application_uri,
        )
        self._log_security()

    def _new_server(self) -> Server:
        server = Server()
        self._server = server
        server.iserver.attribute_service = _WriteGate(server.iserver.aspace, self._client_write)
        server.subscribe_server_callback(CallbackType.PostRead, self._on_read)
        gw = self._rt.config.gateway
        # Before init(), which writes them into BuildInfo.
        server.name = f"retrofit-gateway {gw.name}"
        server.product_uri = "urn:retrofit-gateway"
        server.manufacturer_name = "retrofit-gateway"
        return server

    async def _listen(self, server: Server) -> None:
        """``server.start()``, with a port that cannot be bound as one GatewayError (asyncua
        would log its own traceback of the OSError first: left out, the error says it all)."""
        quiet = _QuietStartFailure(server)
        asyncua_log = logging.getLogger("asyncua.server.server")
        asyncua_log.addFilter(quiet)
        try:
            await server.start()
        except OSError as exc:
            reason = os.strerror(exc.errno) if exc.errno else str(exc)
            host, port = self._section.host, self._section.port
            raise GatewayError(f"OPC UA: cannot listen on {host}:{port}: {reason}") from exc
        finally:
            asyncua_log.removeFilter(quiet)

    def _log_security(self) -> None:
        section = self._section
        if section.allow_none:
            log.warning("OPC UA: the unencrypted None endpoint is enabled (allow_none)")
        if self.trust is None:
            log.warning(
                "OPC UA: trust: any: every client certificate is accepted, the trust list in "
                "%s is not consulted",
                self._rt.data_dir / "pki" / "trusted",
            )
        else:
            log.info(
                "OPC UA: client certificates must be in %s; refused ones are kept in %s",
                self.trust.trusted_dir,
                self.trust.rejected_dir,
            )
        logins = [f"user {u.name!r} ({u.role})" for u in section.users]
        if self._gate.anonymous:
            logins.insert(0, "anonymous")
        if logins:
            log.info("OPC UA logins: %s", ", ".join(logins))
        else:
            log.error("OPC UA: anonymous is off and no users are configured: nobody can log in")

    async def run(self, sub: Subscription) -> None:
        status = asyncio.create_task(self._status_loop(), name="opcua[status]")
        shelf = None
        if self._standard is not None and self._standard.wanted:
            shelf = asyncio.create_task(self._make_shelf(self._standard), name="opcua[shelf]")
        try:
            async for batch in sub:
                await self._apply(batch)
        finally:
            status.cancel()
            await _join_cancelled(status)
            if shelf is not None:
                shelf.cancel()
                await _join_cancelled(shelf)
            if self._server is not None:
                await self._refresh()

    async def _make_shelf(self, standard: _StandardNodes) -> None:
        """``SHELF_DELAY_S`` from now, make the shelf that later starts load the standard
        address space from, in a child process (``_make_shelf_in_child``). Cancelled, it kills
        the child, reaps it and removes what it had written."""
        await asyncio.sleep(SHELF_DELAY_S)
        if not standard.wanted:
            return
        try:
            made = await _make_shelf_in_child(standard.folder.parent)
        except _ShelfStopped:
            log.info(
                "OPC UA: the process making %s was stopped; the next start makes it",
                standard.folder,
            )
        except Exception as exc:
            log.warning(
                "OPC UA: cannot write %s: %s; every start builds the standard address space "
                "(the slow way)",
                standard.folder,
                _reason(exc),
            )
        else:
            log.info(
                "OPC UA: wrote the standard address space to %s in %.1f s (child process, "
                "peak %.0f MB): later starts load it from there",
                made["folder"],
                made["seconds"],
                made["peak_mb"],
            )

    async def close(self) -> None:
        server, self._server = self._server, None
        if server is not None:
            await _stop(server)
            log.info("OPC UA server on %s stopped", self.endpoint)
        self.health["sessions"] = 0

    # -- building ------------------------------------------------------------------------------

    async def _build(self, server: Server) -> None:
        ns = self.namespace_index
        builder = _Builder(server.iserver.aspace)
        gw = self._rt.config.gateway
        site = ua.NodeId("#site", ns)
        builder.add_object(
            site,
            ua.NodeId(ua.ObjectIds.ObjectsFolder),
            ua.ObjectIds.Organizes,
            ua.ObjectIds.FolderType,
            gw.site,
            f"ISA-95 site {gw.site}, area {gw.area}, line {gw.line}",
        )
        by_device: dict[str, list[TagSpec]] = {}
        for spec in self._rt.tags:
            by_device.setdefault(spec.device, []).append(spec)
        machines: set[str] = set()
        statuses = self._rt.statuses
        for device, specs in by_device.items():
            machine = specs[0].machine
            if machine not in machines:
                machines.add(machine)
                builder.add_object(
                    ua.NodeId(machine, ns),
                    site,
                    ua.ObjectIds.Organizes,
                    ua.ObjectIds.FolderType,
                    machine,
                )
            status = statuses.get(device)
            about = f"{status.driver} device at {status.endpoint}" if status is not None else ""
            device_id = ua.NodeId(f"{machine}/{device}", ns)
            builder.add_object(
                device_id,
                ua.NodeId(machine, ns),
                ua.ObjectIds.Organizes,
                ua.ObjectIds.BaseObjectType,
                device,
                about,
            )
            for spec in specs:
                self._add_tag(builder, device_id, spec)
            self._devices.append(self._add_diagnostics(builder, device_id, device, specs))
            # 10,000 tags take seconds on a Pi: let the other sinks start meanwhile.
            await asyncio.sleep(0)

    def _add_tag(self, builder: _Builder, device_id: ua.NodeId, spec: TagSpec) -> None:
        ns = self.namespace_index
        vtype = variant_type(spec)
        numeric = vtype not in _NON_NUMERIC
        has_range = numeric and spec.minimum is not None and spec.maximum is not None
        unit = spec.unit if numeric and spec.unit else None
        if has_range:
            type_id = ua.ObjectIds.AnalogItemType
        elif unit is not None:
            type_id = ua.ObjectIds.BaseAnalogType
        else:
            type_id = ua.ObjectIds.BaseDataVariableType
        nodeid = ua.NodeId(f"{device_id.Identifier}/{spec.name}", ns)
        writable = spec.write is not None
        if writable:
            self._writable[nodeid] = spec
        attr = builder.add_variable(
            nodeid,
            device_id,
            ua.ObjectIds.HasComponent,
            type_id,
            ua.QualifiedName(spec.name, ns),
            vtype.value,
            _DataValue(_NULL, _WAITING, None, datetime.now(UTC)),
            spec.description,
            spec.interval * 1000.0,
            writable=writable,
        )
        if unit is not None:
            builder.add_variable(
                ua.NodeId(f"{nodeid.Identifier}#EngineeringUnits", ns),
                nodeid,
                ua.ObjectIds.HasProperty,
                ua.ObjectIds.PropertyType,
                ua.QualifiedName("EngineeringUnits", 0),
                ua.ObjectIds.EUInformation,
                builder.shared(
                    eu_information(unit, self.namespace_uri), _VT.ExtensionObject, key=unit
                ),
            )
        if has_range:
            assert spec.minimum is not None
            assert spec.maximum is not None
            builder.add_variable(
                ua.NodeId(f"{nodeid.Identifier}#EURange", ns),
                nodeid,
                ua.ObjectIds.HasProperty,
                ua.ObjectIds.PropertyType,
                ua.QualifiedName("EURange", 0),
                ua.ObjectIds.Range,
                builder.shared(
                    ua.Range(spec.minimum, spec.maximum),
                    _VT.ExtensionObject,
                    key=("range", spec.minimum, spec.maximum),
                ),
            )
        self._vars[spec.key] = _Var(spec.key, attr, vtype, spec.interval)

    def _add_diagnostics(
        self, builder: _Builder, device_id: ua.NodeId, device: str, specs: Sequence[TagSpec]
    ) -> _DeviceVars:
        ns = self.namespace_index
        taken = {s.name for s in specs}
        attrs: list[AttributeValue] = []
        now = datetime.now(UTC)
        for name, vtype, about in _DIAGNOSTICS:
            browse = name
            while browse in taken:
                browse = f"_{browse}"
            attrs.append(
                builder.add_variable(
                    ua.NodeId(f"{device_id.Identifier}#{name}", ns),
                    device_id,
                    ua.ObjectIds.HasComponent,
                    ua.ObjectIds.BaseDataVariableType,
                    ua.QualifiedName(browse, ns),
                    vtype.value,
                    _DataValue(_NULL, _WAITING, None, now),
                    about,
                )
            )
        return _DeviceVars(device, *attrs)

    # -- values --------------------------------------------------------------------------------

    async def _apply(self, batch: Sequence[Reading]) -> None:
        """Write the changed readings of one batch. Called for every batch: keep it lean."""
        vars_ = self._vars
        codes = _CODES
        good_q = Quality.GOOD
        good = _GOOD
        variant = ua.Variant
        datavalue = _DataValue
        fromts = datetime.fromtimestamp
        now = datetime.now(UTC)
        written = 0
        for reading in batch:
            var = vars_.get(reading[0])
            if var is None:
                continue
            value: Any = reading[1]
            quality = reading[2]
            if quality is good_q:
                code = good
            else:
                code = codes.get((quality, reading[4], value is not None)) or _FALLBACK[quality]
            if value is not None and (
                value.__class__ is not var.ptype
                or (var.low is not None and not var.low <= value <= var.high)
            ):
                value, code = self._misfit(var, value, code)
            if code is var.code and value == var.value:
                continue
            ts = reading[3]
            var.value = value
            var.code = code
            var.source_ts = ts
            dv = datavalue(
                _NULL if value is None else variant(value, var.vtype), code, fromts(ts, UTC), now
            )
            attr = var.attr
            attr.value = dv
            if attr.datachange_callbacks:
                await _notify(attr, dv)
            written += 1
            if code is good and self._first_value_s is None:
                self._note_first_value()
        if written:
            self._updates += written
            self.health["updates"] = self._updates

    def _misfit(self, var: _Var, value: Any, code: ua.StatusCode) -> tuple[Any, ua.StatusCode]:
        """A value not of the variable's type: a driver bug that must not reach the encoder.

        asyncua would fail to encode it in every Publish and Read that includes it, and a
        failed Publish ends the client's subscription. An int for a float is fine.
        """
        if var.ptype is float and value.__class__ is int:
            return float(value), code
        if var.key not in self._misfits:
            self._misfits.add(var.key)
            log.error(
                "OPC UA: tag %s got %r, which is not a valid %s; served as Bad_ConfigurationError",
                var.key,
                value,
                var.vtype.name,
            )
        return None, _CONFIG_ERROR

    def _note_first_value(self) -> None:
        self._first_value_s = time.monotonic() - self._t_start
        self.health["first_value_s"] = round(self._first_value_s, 3)
        log.info("OPC UA: first value served %.2f s after start began", self._first_value_s)

    async def _mark_stale(self, now: float) -> None:
        """Good values the bus has not refreshed for STALE_INTERVALS intervals -> Uncertain."""
        latest = self._rt.bus.latest
        server_ts = datetime.now(UTC)
        for var in self._vars.values():
            if var.code is not _GOOD:
                continue
            reading = latest.get(var.key)
            if reading is None or now - reading.source_ts <= STALE_INTERVALS * var.interval:
                continue
            var.code = _STALE
            dv = _DataValue(
                ua.Variant(var.value, var.vtype),
                _STALE,
                datetime.fromtimestamp(var.source_ts, UTC),
                server_ts,
            )
            var.attr.value = dv
            if var.attr.datachange_callbacks:
                await _notify(var.attr, dv)

    # -- writes --------------------------------------------------------------------------------

    def _on_read(self, event: ServerItemCallback, dispatcher: object) -> None:
        """PostRead: a session that may write sees CurrentWrite in a writable tag's
        UserAccessLevel; everyone else sees the stored, read-only one."""
        if not self._writable or not _may_write(event.user):
            return
        writable = self._writable
        results = event.response_params
        for i, rv in enumerate(event.request_params.NodesToRead):
            if rv.AttributeId == _A.UserAccessLevel and rv.NodeId in writable:
                results[i] = _OPERATOR_ACCESS

    async def _client_write(self, wv: Any, user: User) -> ua.StatusCode:
        """One WriteValue of a client session: refused here, or a write through the runtime."""
        spec = self._writable.get(wv.NodeId)
        channel = _current_channel(self._server)
        if spec is None or wv.AttributeId != _A.Value:
            server = self._server
            if server is None or wv.NodeId not in server.iserver.aspace:
                return self._refuse(_SC.BadNodeIdUnknown, wv, user, channel, "no such node")
            return self._refuse(_SC.BadNotWritable, wv, user, channel, "not writable")
        if not isinstance(user, SessionUser) or user.access != "operator" or user.name is None:
            return self._refuse(
                _SC.BadUserAccessDenied, wv, user, channel, "only operators may write"
            )
        # Both: the certificate at activation and the channel of this very request.
        if user.certificate_id is None or channel is None or not channel.secure:
            return self._refuse(
                _SC.BadSecurityModeInsufficient, wv, user, channel, "not on a secure channel"
            )
        if wv.IndexRange:
            return self._refuse(_SC.BadIndexRangeInvalid, wv, user, channel, "an IndexRange")
        dv = wv.Value
        status = dv.StatusCode
        if status is not None and not status.is_good():
            # A Bad or Uncertain value is no value to put into a machine.
            return self._refuse(_SC.BadWriteNotSupported, wv, user, channel, "a status")
        value = dv.Value.Value if dv.Value is not None else None
        origin = f"opcua {channel.peer} {channel.policy} cert {user.certificate_id}"
        try:
            await self._rt.write(spec.key, value, user=user.name, origin=origin)
        except WriteRefused as exc:
            # Already logged and audited by the write service.
            self._count_write(ok=False)
            return _code(WRITE_STATUS.get(exc.code, _SC.Bad))
        except Exception:
            log.exception(
                "OPC UA: the write of %s by %s from %s failed", spec.key, user.name, origin
            )
            self._count_write(ok=False)
            return _code(_SC.BadInternalError)
        self._count_write(ok=True)
        return _GOOD

    def _refuse(
        self, code: int, wv: Any, user: User, channel: _Channel | None, why: str
    ) -> ua.StatusCode:
        self._count_write(ok=False)
        who = (
            f"user {user.name!r}"
            if isinstance(user, SessionUser) and user.name
            else "an anonymous session"
        )
        where = (
            f"{channel.peer} ({channel.policy})" if channel is not None else "an unknown channel"
        )
        node = wv.NodeId.to_string()
        if self._once(f"{who}|{node}|{code}"):
            log.warning(
                "OPC UA: refused a write of %s (attribute %s) by %s from %s: %s; %s",
                node,
                _attribute_name(wv.AttributeId),
                who,
                where,
                why,
                ua.StatusCode(code).name,
            )
            # Bounded like the log line: a client retrying in a loop must not fill the card.
            name = user.name if isinstance(user, SessionUser) and user.name else "anonymous"
            try:
                requested = wv.Value.Value.Value if wv.Value and wv.Value.Value else None
            except AttributeError:
                requested = None
            self._rt.audit_refusal(
                node,
                requested if isinstance(requested, bool | int | float | str) else None,
                user=name,
                origin=f"opcua {where}",
                code=ua.StatusCode(code).name,
                detail=why,
            )
        return _code(code)

    def _count_write(self, *, ok: bool) -> None:
        if ok:
            self._writes += 1
            self.health["writes"] = self._writes
        else:
            self._writes_refused += 1
            self.health["writes_refused"] = self._writes_refused

    # -- device status -------------------------------------------------------------------------

    async def _status_loop(self) -> None:
        bus = self._rt.bus
        seen = bus.status_version
        while True:
            try:
                await self._refresh()
            except Exception:
                # Values matter more than diagnostics: keep serving them, say so loudly.
                log.exception("OPC UA: refreshing device diagnostics failed")
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(STATUS_REFRESH_S):
                    seen = await bus.wait_status(seen)

    async def _refresh(self) -> None:
        server = self._server
        if server is None:
            return
        statuses = self._rt.statuses
        now = datetime.now(UTC)
        for dev in self._devices:
            status = statuses.get(dev.name)
            if status is not None:
                await self._show_status(dev, status, now)
        await self._mark_stale(time.time())
        self.health["sessions"] = count_sessions(server.iserver)
        self.health["refused"] = self._gate.refused
        if self.trust is not None:
            self._drop_untrusted(server, self.trust)
            self.health["certificates_pending"] = self.trust.pending()

    def _drop_untrusted(self, server: Server, trust: TrustList) -> None:
        """Close the connections of activated sessions whose certificate is trusted no more.

        ``certs reject`` takes effect here, within STATUS_REFRESH_S. Connections still being
        set up are left alone: their ActivateSession checks the certificate anyway, and
        closing one would cost its client the clear BadCertificateUntrusted.
        """
        bserver = server.bserver
        if bserver is None:
            return
        trusted: set[str] | None = None
        client: OPCUAProtocol
        for client in list(bserver.clients):
            processor, transport = client.processor, client.transport
            if processor is None or transport is None or transport.is_closing():
                continue
            session = processor.session
            peer = processor._connection.security_policy.peer_certificate
            if not peer or session is None or not session.is_activated():
                continue
            if trusted is None:
                trusted = trust.trusted()
            if sha256_of(bytes(peer)) not in trusted:
                log.warning(
                    "OPC UA: closing the connection of %s: its certificate %s is no longer trusted",
                    client.peer_name,
                    sha256_of(bytes(peer))[:16],
                )
                transport.close()

    async def _show_status(self, dev: _DeviceVars, status: DeviceStatus, now: datetime) -> None:
        shown = (
            status.state is DeviceState.ONLINE,
            min(sum(status.errors.values()), 0xFFFFFFFF),
            status.last_error,
            status.last_success_ts,
        )
        previous = dev.shown
        dev.shown = shown
        success = None if shown[3] is None else datetime.fromtimestamp(shown[3], UTC)
        values = (
            (dev.online, ua.Variant(shown[0], _VT.Boolean)),
            (dev.error_count, ua.Variant(shown[1], _VT.UInt32)),
            (dev.last_error, ua.Variant(shown[2], _VT.String)),
            (dev.last_success, ua.Variant(success, _VT.DateTime)),
        )
        for i, (attr, variant) in enumerate(values):
            if previous is not None and previous[i] == shown[i]:
                continue
            dv = _DataValue(variant, _GOOD, now, now)
            attr.value = dv
            if attr.datachange_callbacks:
                await _notify(attr, dv)


# --- helpers --------------------------------------------------------------------------------------


class _StandardNodes:
    """Fills a server's standard address space, from the shelf in the data dir when it can.

    asyncua builds the standard address space (6,000 nodes: 3 s and 50 MB here, five to ten
    times slower on a Pi) from generated code at every start. Its answer for small devices is
    a shelf (``AddressSpace.make_aspace_shelf``/``load_aspace_shelf``): the nodes pickled into
    a ``shelve``, opened read-only, each unpickled when first used (a server touches a few
    dozen). This class drives ``load_aspace_shelf`` itself and writes the shelf the way
    ``make_aspace_shelf`` does, rather than passing ``shelf_file`` to ``init()``:

    - asyncua looks for the shelf as ``<path>`` or ``<path>.db``, which is right for dbm.gnu
      and Berkeley DB only; with dbm.dumb (``.dat``/``.dir``, the one dbm of Pythons built
      without gdbm) it never finds it and builds and rewrites it at every start (asyncua
      issue #1732).
    - asyncua writes the shelf in place during ``init()``: a process killed meanwhile leaves a
      partial shelf that the next start trusts, and pickling every node costs the start
      another 2 s here (10-20 s on a Pi).

    So the shelf is a folder, ``<data_dir>/opcua-aspace-asyncua<version>-py<x.y>/`` (a new
    asyncua or Python makes a new one; the others are removed), holding the shelve's files and
    ``manifest.json`` (versions, node count, each file's size). ``make()`` builds a fresh
    standard address space of its own (the server's has changed since its build) in a child
    process (``python -P -c``, nice 10, its own session, stdout and stderr to the gateway),
    ``SHELF_DELAY_S`` after a start that had none, writes it to a hidden temporary folder,
    flushes it to disk (fsync) and renames it into place: the shelf is there complete or not
    at all, whatever kills either process or the power. Two processes making it at once both
    rename; the second finds the first's folder and drops its own. In a thread of the gateway
    the build cost it ~50 MB of RSS for good (CPython keeps the memory; 194 -> 243 MB on
    arm64) and competed with the event loop for the GIL; the child's memory goes back to the
    system when it exits, and the gateway stops, kills and reaps it if it stops meanwhile.

    A shelf is used only if its manifest matches and a few nodes unpickle; otherwise the
    start builds the nodes from asyncua's code as before, with one warning, and a broken
    shelf is removed (to be made again). The shelf is only ever read once made: values
    written at run time live in memory, in the nodes asyncua has loaded.
    """

    def __init__(self, data_dir: Path) -> None:
        self.folder = data_dir / SHELF_NAME
        #: How this start got its nodes: "shelf" or "built".
        self.source = "built"
        #: Why the shelf was not used, for the one warning.
        self.problem: str | None = None

    @property
    def wanted(self) -> bool:
        """No usable shelf yet: one should be made."""
        return self.source == "built" and not self.folder.exists()

    def fill(self, iserver: InternalServer, *, use_shelf: bool = True) -> None:
        aspace = iserver.aspace
        if use_shelf:
            try:
                if self._load(aspace):
                    self.source = "shelf"
                    return
            except Exception as exc:
                aspace._nodes = {}
                self.problem = f"cannot use {self.folder}: {_reason(exc)}"
                self.discard()
        _fill_from_code(iserver.node_mgt_service)

    def _load(self, aspace: AddressSpace) -> bool:
        folder = self.folder
        try:
            text = (folder / _SHELF_MANIFEST).read_text(encoding="utf-8")
        except FileNotFoundError:
            if folder.exists():
                raise ValueError("it has no manifest") from None
            return False
        manifest = json.loads(text)
        expected = _shelf_versions()
        if {k: manifest.get(k) for k in expected} != expected:
            raise ValueError(f"made for {manifest!r}, not {expected!r}")
        for name, size in manifest["files"].items():
            actual = (folder / name).stat().st_size
            if actual != size:
                raise ValueError(f"{name} has {actual} bytes, not {size}")
        aspace.load_aspace_shelf(folder / _SHELF_BASE)
        try:
            _check_shelf(aspace._nodes, manifest["nodes"])
        except BaseException:
            aspace._nodes.source.close()
            raise
        return True

    def make(self, tmp: Path | None = None) -> float:
        """Build the standard address space afresh and write it as the shelf, through the
        temporary folder ``tmp`` (made here; by default a new name); the seconds it took.
        Called in the child process of ``_make_shelf_in_child``, whose memory goes back to the
        system when it ends; a failure or SIGTERM (``_shelf_child``) leaves nothing behind, and
        after a SIGKILL the parent removes ``tmp``."""
        t0 = time.monotonic()
        folder = self.folder
        parent = folder.parent
        if tmp is None:
            tmp = parent / f".{folder.name}.tmp-{os.getpid()}-{secrets.token_hex(4)}"
        tmp.mkdir()
        try:
            aspace = AddressSpace()
            _fill_from_code(NodeManagementService(aspace))
            # What AddressSpace.make_aspace_shelf does, atomically.
            nodes = aspace._nodes
            # Pickles only what this process built; read back by asyncua from the data dir,
            # which is the service's own (0700), as the private key is.
            path, protocol = str(tmp / _SHELF_BASE), pickle.HIGHEST_PROTOCOL
            with shelve.open(path, "n", protocol=protocol) as db:  # noqa: S301
                for nodeid, ndata in nodes.items():
                    db[nodeid.to_string()] = ndata
            files = {path.name: _fsync(path) for path in sorted(tmp.iterdir())}
            manifest = {**_shelf_versions(), "nodes": len(nodes), "files": files}
            (tmp / _SHELF_MANIFEST).write_text(json.dumps(manifest, indent=1), encoding="utf-8")
            _fsync(tmp / _SHELF_MANIFEST)
            _fsync(tmp)
            try:
                tmp.rename(folder)
            except OSError as exc:
                # Another process made it meanwhile (a full folder cannot be replaced).
                if exc.errno not in (errno.EEXIST, errno.ENOTEMPTY):
                    raise
            _fsync(parent)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
        self._remove_others(parent)
        return time.monotonic() - t0

    def _remove_others(self, parent: Path) -> None:
        """Shelves of other asyncua or Python versions, and temporary folders of processes
        killed while making one (an hour old: a live one takes a minute at most)."""
        now = time.time()
        for path in parent.glob(f"*{_SHELF_PREFIX}*"):
            if path.name == self.folder.name or not path.is_dir():
                continue
            if path.name.startswith(_SHELF_PREFIX):
                shutil.rmtree(path, ignore_errors=True)
            elif path.name.startswith(f".{_SHELF_PREFIX}") and ".tmp-" in path.name:
                with contextlib.suppress(OSError):
                    if now - path.stat().st_mtime > 3600:
                        shutil.rmtree(path, ignore_errors=True)

    def discard(self) -> None:
        """Remove an unusable shelf (renamed aside first: a half-removed folder is never
        taken for a shelf)."""
        folder = self.folder
        trash = folder.parent / f".{folder.name}.tmp-{os.getpid()}-{secrets.token_hex(4)}"
        with contextlib.suppress(OSError):
            folder.rename(trash)
        shutil.rmtree(trash, ignore_errors=True)


# --- the shelf's child process ---------------------------------------------------------------

#: How long the child process making the shelf may take (5 s on a 2-core x86 VM, 29 s on arm64
#: under qemu; a Pi Zero is slower still) before it is killed; the next start tries again.
SHELF_TIMEOUT_S = 600.0
#: The child's exit status when SIGTERM stopped it (systemd stopping the service signals every
#: process of its cgroup): it has removed its temporary folder.
_SHELF_CHILD_STOPPED: Final = 128 + signal.SIGTERM
#: Run by ``python -P -c`` with the folder our package was imported from, the data dir and the
#: temporary folder: lowers its priority before anything else (its imports included), then
#: imports our package from where this process did (asyncua only through this module).
_SHELF_CHILD: Final = (
    "import os, sys\n"
    "os.nice(10)\n"
    "if sys.argv[1] not in sys.path:\n"
    "    sys.path.insert(0, sys.argv[1])\n"
    "from gateway.sinks.opcua import _shelf_child\n"
    "raise SystemExit(_shelf_child(sys.argv[2:]))\n"
)
#: Where this process imported our package from (a site-packages, or a source checkout).
_PACKAGE_ROOT: Final = os.path.dirname(os.path.dirname(os.path.abspath(gateway.__file__)))
#: The service's own: systemd's notify socket and watchdog, socket activation.
_NOT_FOR_THE_CHILD: Final = frozenset(
    {"NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID", "LISTEN_FDS", "LISTEN_PID", "LISTEN_FDNAMES"}
)


class _ShelfStopped(Exception):
    """The child process making the shelf was stopped by someone else (SIGTERM)."""


async def _make_shelf_in_child(data_dir: Path) -> dict[str, Any]:
    """Make the shelf of the standard address space in ``data_dir`` in a child process, at a
    low priority: building ~6,000 nodes costs the process that does it ~50 MB that CPython
    keeps (a gateway that grows by that much a minute after its start looks like a leak) and
    seconds of CPU that would hold the GIL against the event loop.

    Returns the child's report (``folder``, ``seconds``, ``peak_mb``). Raises with the reason
    when it fails (exit status, the last line of its stderr) or takes over
    ``SHELF_TIMEOUT_S``. Cancelled or timed out, the child is killed and reaped and its
    temporary folder removed before this returns.
    """
    tmp = data_dir / f".{SHELF_NAME}.tmp-{os.getpid()}-{secrets.token_hex(4)}"
    env = {k: v for k, v in os.environ.items() if k not in _NOT_FOR_THE_CHILD}
    try:
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-P",
            "-c",
            _SHELF_CHILD,
            _PACKAGE_ROOT,
            str(data_dir),
            str(tmp),
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            env=env,
            # Not in the terminal's process group: a Ctrl-C stops the gateway, which kills it.
            start_new_session=True,
        )
        try:
            async with asyncio.timeout(SHELF_TIMEOUT_S):
                out, err = await proc.communicate()
        except TimeoutError:
            await _kill(proc)
            raise TimeoutError(f"not done after {SHELF_TIMEOUT_S:g} s, killed") from None
        except BaseException:
            await _kill(proc)
            raise
    finally:
        # The child removes it itself unless killed.
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    code = await proc.wait()  # at once: communicate() waited
    if code in (_SHELF_CHILD_STOPPED, -signal.SIGTERM):
        raise _ShelfStopped
    if code != 0:
        lines = err.decode(errors="replace").strip().splitlines()
        said = f": {lines[-1]}" if lines else ""
        how = f"killed by signal {-code}" if code < 0 else f"exit status {code}"
        with contextlib.suppress(ValueError):
            how = f"killed by {signal.Signals(-code).name}" if code < 0 else how
        raise RuntimeError(f"the child process ended ({how}){said}")
    made: dict[str, Any] = json.loads(out.decode().strip().splitlines()[-1])
    return made


async def _kill(proc: asyncio.subprocess.Process) -> None:
    """Kill a child process and wait for it and its pipes (no zombie, no open transport), even
    if cancelled again meanwhile (then re-raised once it is done)."""
    with contextlib.suppress(ProcessLookupError):
        proc.kill()
    # communicate() rather than wait(): it drains the pipes, which a full one would block.
    reaped = asyncio.ensure_future(proc.communicate())
    cancelled = False
    while not reaped.done():
        try:
            await asyncio.shield(reaped)
        except asyncio.CancelledError:
            cancelled = True
    with contextlib.suppress(Exception):
        reaped.result()
    if cancelled:
        raise asyncio.CancelledError


def _shelf_child(argv: Sequence[str]) -> int:
    """The child process of ``_make_shelf_in_child``: ``argv`` is the data dir and the
    temporary folder. Prints a JSON line when the shelf is made, the reason on stderr when
    not; SIGTERM ends it with ``_SHELF_CHILD_STOPPED`` after removing the temporary folder."""

    def stopped(signum: int, frame: object) -> None:
        raise SystemExit(_SHELF_CHILD_STOPPED)

    signal.signal(signal.SIGTERM, stopped)
    standard = _StandardNodes(Path(argv[0]))
    try:
        seconds = standard.make(Path(argv[1]))
    except Exception as exc:
        print(_reason(exc), file=sys.stderr)
        return 1
    made = {"folder": str(standard.folder), "seconds": round(seconds, 2), "peak_mb": _peak_mb()}
    print(json.dumps(made))
    return 0


def _peak_mb() -> float:
    """This process's peak RSS: VmHWM (getrusage's ru_maxrss would include the parent's RSS at
    the fork, which Linux carries over the exec)."""
    with contextlib.suppress(OSError, ValueError):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return math.nan


def _fill_from_code(service: Any) -> None:
    # Imported here: the generated module alone takes 0.5 s to import, and a start from the
    # shelf never needs it (nor the memory its code takes).
    from asyncua.server.standard_address_space import (  # noqa: PLC0415
        standard_address_space,
    )

    standard_address_space.fill_address_space(service)


#: The shelf folder's name prefix in the data dir; the full name adds the versions.
_SHELF_PREFIX: Final = "opcua-aspace"
SHELF_NAME: Final = (
    f"{_SHELF_PREFIX}-asyncua{asyncua.__version__}-py{sys.version_info[0]}.{sys.version_info[1]}"
)
_SHELF_BASE: Final = "aspace"  # the shelve's name in the folder; dbm adds its own suffixes
_SHELF_MANIFEST: Final = "manifest.json"
#: Unpickled when a shelf is opened: the nodes every start reads first.
_SHELF_PROBES: Final = (
    ua.ObjectIds.RootFolder,
    ua.ObjectIds.Server,
    ua.ObjectIds.Server_NamespaceArray,
)


def _check_shelf(nodes: Any, count: int) -> None:
    """``nodes``: the LazyLoadingDict of ``load_aspace_shelf``, over the shelf in ``source``."""
    if len(nodes.source) != count:
        raise ValueError(f"{len(nodes.source)} nodes, not {count}")
    # Unpickled now, so that a shelf that cannot be read fails here and not in the middle of
    # a client's Browse.
    for probe in _SHELF_PROBES:
        nodes[ua.NodeId(probe)]


def _shelf_versions() -> dict[str, object]:
    return {
        "format": 1,
        "asyncua": asyncua.__version__,
        "python": f"{sys.version_info[0]}.{sys.version_info[1]}",
    }


def _fsync(path: Path) -> int:
    """Flush a file or folder to disk; the file's size."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        return os.fstat(fd).st_size
    finally:
        os.close(fd)


def _reason(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__


def _fill_standard_nodes_in(
    iserver: InternalServer, pool: ThreadPoolExecutor, nodes: _StandardNodes, *, use_shelf: bool
) -> None:
    """Make ``iserver.init()`` fill the standard address space in ``pool`` (see
    ``_StandardNodes``) instead of asyncua's own ``load_standard_address_space``.

    asyncua does it in ``asyncio.to_thread``, i.e. the loop's default executor. Same work,
    same thread safety (nothing else touches this server yet), only the thread differs.
    """

    async def load(shelf_file: Path | None = None) -> None:
        await asyncio.get_running_loop().run_in_executor(
            pool, functools.partial(nodes.fill, iserver, use_shelf=use_shelf)
        )

    iserver.load_standard_address_space = load


def _close_shelf(iserver: InternalServer) -> None:
    """Close the shelf an address space reads its standard nodes from, if it has one."""
    source = getattr(iserver.aspace._nodes, "source", None)
    if isinstance(source, shelve.Shelf):
        with contextlib.suppress(Exception):
            source.close()


_SOURCES: Final = {"shelf": "from the shelf", "built": "built"}


class _QuietStartFailure(logging.Filter):
    """Drops asyncua's "error starting server" record of one server's OSError."""

    def __init__(self, server: Server) -> None:
        super().__init__()
        self._server = server

    def filter(self, record: logging.LogRecord) -> bool:
        args = record.args
        return not (
            isinstance(args, tuple)
            and len(args) > 0
            and args[0] is self._server
            and record.exc_info is not None
            and isinstance(record.exc_info[1], OSError)
        )


def count_sessions(iserver: InternalServer) -> int:
    """Activated client sessions (asyncua keeps them by authentication token)."""
    return sum(1 for s in iserver._external_sessions.values() if s.is_activated())


async def _stop(server: Server) -> None:
    """Stop an asyncua server, started or not, and everything it left running."""
    try:
        await server.stop()
    except Exception:
        log.exception("stopping the OPC UA server failed")
    iserver = server.iserver
    # Closed connections end in tasks and, for sessions with subscriptions, in sessions kept
    # for a reconnect (Part 4 §6.7) with their own timers: none may outlive the server.
    for _ in range(3):
        await asyncio.sleep(0)
    if server.bserver is not None:
        await server.bserver._close_tasks()
    for session in list(iserver._external_sessions.values()):
        with contextlib.suppress(Exception):
            await session.close_session(True)
    for sub in list(iserver.subscription_service.subscriptions.values()):
        with contextlib.suppress(Exception):
            await sub.stop()
    iserver.subscription_service.subscriptions.clear()
    _close_shelf(iserver)


async def _join_cancelled(task: asyncio.Task[None]) -> None:
    """Wait for a task we cancelled, without swallowing a cancellation of our own."""
    try:
        await task
    except asyncio.CancelledError:
        current = asyncio.current_task()
        if current is not None and current.cancelling():
            raise
    except Exception:
        log.exception("OPC UA status task failed")


def _url_host(host: str) -> str:
    return f"[{host}]" if ":" in host else host

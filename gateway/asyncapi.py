"""An AsyncAPI 3.0 document of one installation's MQTT interface (``retrofit-gw asyncapi``).

Pure: it takes the validated config and the tags the drivers compiled from it (``TagSpec``)
and returns a plain dict (JSON/YAML-ready); no I/O, no broker. Everything in it follows what
``gateway/sinks/mqtt.py`` and ``gateway/sinks/sparkplug.py`` actually publish:

- one server per broker (``mqtt``, or ``secure-mqtt`` with ``tls:``), with the Last Will in
  the server's mqtt binding;
- one channel per topic: every tag topic (``topic_shape: per_tag``) or every
  ``$device/<device>`` topic (``per_device``), ``$status/<device>`` and the machine's
  ``$status``, ``$gateway/<name>``, and ``<tag>/set`` and ``<tag>/set/result`` for every
  writable tag; with ``sparkplug:`` the Sparkplug B topics of the edge node and its devices;
- messages with JSON Schemas of the payloads (the value's type from the tag's datatype and
  scale, the unit as a const, quality and reason enums, ``seq``, ``historical``,
  ``clock_synced``, ``ts``/``ts_ms``); Sparkplug payloads are protobuf, described in words
  and by an ``x-sparkplug-metrics`` list (name, Sparkplug datatype, writable);
- QoS and retain as mqtt operation bindings (``bindingVersion`` 0.2.0).

Actions are the gateway's: ``send`` for what it publishes, ``receive`` for what it
subscribes to (``/set``, Sparkplug NCMD/DCMD and the primary host's STATE).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

import gateway
from gateway.config import BrokerSection, GatewayConfig, MqttSection, SparkplugSection
from gateway.model import Reason, TagSpec
from gateway.sparkplug.node import datatype_of

__all__ = [
    "ASYNCAPI_VERSION",
    "ERROR_KINDS",
    "QUALITIES",
    "REASONS",
    "WRITE_CODES",
    "build",
    "value_schema",
]

ASYNCAPI_VERSION = "3.0.0"
_BINDING = "0.2.0"

QUALITIES = ["good", "uncertain", "bad"]
#: Every reason a value that is not good carries (``gateway.model.Reason`` without "").
REASONS = [r.value for r in Reason if r.value]
#: The ``code`` of a refused ``/set`` (``gateway.writes``), and ``bad_request`` from the sink.
WRITE_CODES = [
    "bad_request",
    "unknown_tag",
    "not_writable",
    "not_allowed",
    "out_of_range",
    "not_representable",
    "bad_type",
    "rate_limited",
    "device",
    "verify_failed",
]
#: Keys of a device status's ``errors`` counters: failure kinds of whole polls
#: (``gateway.runner``/``gateway.errors``) and reasons of single tags in a good poll.
ERROR_KINDS = [
    "timeout",
    "bad_frame",
    "connection",
    "exception",
    "decode",
    "error",
    "device_exception",
    "decode_error",
]

_INTEGER = frozenset({"int16", "uint16", "int32", "uint32", "int64", "uint64", "bcd16", "bcd32"})
_ID = re.compile(r"[^A-Za-z0-9_.\-]")


def value_schema(spec: TagSpec, *, nullable: bool = True) -> dict[str, Any]:
    """The JSON Schema of a tag's ``value``: from its datatype, and Double once scaled."""
    dt = spec.datatype
    scaled = spec.scale != 1.0 or spec.offset != 0.0
    if dt in ("bool", "bit"):
        kind = "boolean"
    elif dt == "string":
        kind = "string"
    elif dt in _INTEGER and not scaled:
        kind = "integer"
    else:
        kind = "number"
    out: dict[str, Any] = {"type": [kind, "null"] if nullable else kind}
    out["description"] = f"{dt}" + (f" x {spec.scale:g} + {spec.offset:g}" if scaled else "")
    if nullable:
        out["description"] += "; null before the first read and for a non-finite number"
    if spec.write is not None and not nullable:
        rule = spec.write
        if rule.allowed:
            out["enum"] = list(rule.allowed)
        else:
            if rule.minimum is not None:
                out["minimum"] = rule.minimum
            if rule.maximum is not None:
                out["maximum"] = rule.maximum
    return out


def _ref(name: str) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{name}"}


def _components() -> dict[str, Any]:
    """Schemas shared by every installation."""
    return {
        "Quality": {
            "type": "string",
            "enum": QUALITIES,
            "description": "good: read now, in range. uncertain: out_of_range or stale. "
            "bad: no usable reading now (the value is the last one read, or null).",
        },
        "Reason": {
            "type": "string",
            "enum": REASONS,
            "description": "Why a value is not good; see docs/technician-guide.md.",
        },
        "Seq": {
            "type": "integer",
            "minimum": 1,
            "description": "The gateway buffer's id: increasing in reading order, kept across "
            "restarts. Gaps mean lost messages, repeats are duplicates (at least once). "
            "Absent on the refresh after every connect (a restatement, not new data).",
        },
        "Historical": {
            "const": True,
            "description": "Replayed from the buffer after an outage; never retained.",
        },
        "ClockSynced": {
            "const": False,
            "description": "Stamped before the system clock was synchronised; the timestamps "
            "were re-based when it was set.",
        },
        "TsMs": {"type": "integer", "description": "Source timestamp: Unix ms of the poll."},
        "Ts": {
            "type": "string",
            "pattern": r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$",
            "description": "The same instant as ts_ms, ISO 8601 UTC with milliseconds.",
        },
        "DeviceStatus": {
            "type": "object",
            "additionalProperties": False,
            "required": ["state", "last_error", "last_error_ts", "last_success_ts", "errors"],
            "properties": {
                "state": {"type": "string", "enum": ["starting", "online", "offline", "stopped"]},
                "last_error": {"type": ["string", "null"]},
                "last_error_ts": {"type": ["string", "null"]},
                "last_success_ts": {"type": ["string", "null"]},
                "errors": {
                    "type": "object",
                    "additionalProperties": {"type": "integer", "minimum": 0},
                    "description": "Failures counted since start, by kind: "
                    + ", ".join(ERROR_KINDS),
                },
            },
        },
        "State": {
            "type": "object",
            "additionalProperties": False,
            "required": ["state"],
            "properties": {"state": {"type": "string", "enum": ["online", "offline"]}},
        },
        "SetResult": {
            "type": "object",
            "additionalProperties": False,
            "required": ["tag", "ok"],
            "properties": {
                "tag": {"type": "string", "description": "<machine>/<tag>"},
                "id": {"description": "The request's id, echoed."},
                "ok": {"type": "boolean"},
                "value": {"description": "ok: the value written."},
                "read_back": {"description": "ok: the value read back after the write."},
                "code": {"type": "string", "enum": WRITE_CODES},
                "error": {"type": "string"},
            },
        },
    }


def _meta() -> dict[str, Any]:
    """The keys every buffered value message may start with."""
    return {
        "seq": _ref("Seq"),
        "historical": _ref("Historical"),
        "clock_synced": _ref("ClockSynced"),
    }


def _not_good() -> dict[str, Any]:
    return {
        "if": {"properties": {"quality": {"enum": ["uncertain", "bad"]}}},
        "then": {"required": ["reason", "detail"]},
        "else": {"not": {"anyOf": [{"required": ["reason"]}, {"required": ["detail"]}]}},
    }


def tag_payload(spec: TagSpec) -> dict[str, Any]:
    """``M/<tag>`` (per_tag)."""
    return {
        "type": "object",
        "additionalProperties": False,
        "required": ["value", "unit", "quality", "ts", "ts_ms"],
        "properties": {
            **_meta(),
            "value": value_schema(spec),
            "unit": {"const": spec.unit},
            "quality": _ref("Quality"),
            "reason": _ref("Reason"),
            "detail": {"type": "string"},
            "ts": _ref("Ts"),
            "ts_ms": _ref("TsMs"),
        },
        **_not_good(),
    }


def device_payload(device: str, specs: Sequence[TagSpec]) -> dict[str, Any]:
    """``M/$device/<device>`` (per_device): the changed tags of one poll."""
    values = {
        s.name: {
            "type": "object",
            "additionalProperties": False,
            "required": ["value", "quality", "ts_ms"],
            "description": s.description or s.name,
            "properties": {
                "value": value_schema(s),
                "quality": _ref("Quality"),
                "reason": _ref("Reason"),
                "detail": {"type": "string"},
                "ts_ms": _ref("TsMs"),
            },
            **_not_good(),
        }
        for s in specs
    }
    return {
        "type": "object",
        "additionalProperties": False,
        "required": ["device", "ts_ms", "values"],
        "properties": {
            **_meta(),
            "device": {"const": device},
            "ts_ms": _ref("TsMs"),
            "values": {
                "type": "object",
                "additionalProperties": False,
                "properties": values,
                "description": "Only the tags that changed in this poll (report by exception); "
                "units are not repeated here.",
            },
        },
    }


class _Doc:
    def __init__(self) -> None:
        self.channels: dict[str, Any] = {}
        self.operations: dict[str, Any] = {}
        self._ids: set[str] = set()

    def _unique(self, raw: str) -> str:
        base = _ID.sub("_", raw) or "channel"
        name, n = base, 2
        while name in self._ids:
            name, n = f"{base}_{n}", n + 1
        self._ids.add(name)
        return name

    def add(
        self,
        label: str,
        address: str,
        server: str,
        *,
        action: str,
        qos: int,
        retain: bool,
        summary: str,
        payload: dict[str, Any],
        message_name: str,
        content_type: str = "application/json",
        examples: list[dict[str, Any]] | None = None,
        extra: dict[str, Any] | None = None,
    ) -> None:
        cid = self._unique(label)
        message: dict[str, Any] = {
            "name": message_name,
            "contentType": content_type,
            "summary": summary,
            "payload": payload,
        }
        if examples:
            message["examples"] = [{"payload": e} for e in examples]
        if extra:
            message.update(extra)
        self.channels[cid] = {
            "address": address,
            "servers": [{"$ref": f"#/servers/{server}"}],
            "messages": {message_name: message},
        }
        self.operations[f"{action}_{cid}"] = {
            "action": action,
            "channel": {"$ref": f"#/channels/{cid}"},
            "summary": summary,
            "messages": [{"$ref": f"#/channels/{cid}/messages/{message_name}"}],
            "bindings": {"mqtt": {"qos": qos, "retain": retain, "bindingVersion": _BINDING}},
        }


def _server(
    section: BrokerSection, client_id: str, will: dict[str, Any], desc: str
) -> tuple[dict[str, Any], dict[str, Any]]:
    """The server object and the security schemes it uses."""
    server: dict[str, Any] = {
        "host": f"{section.host}:{section.port}",
        "protocol": "secure-mqtt" if section.tls is not None else "mqtt",
        "protocolVersion": "3.1.1" if section.protocol == "3.1.1" else "5",
        "description": desc
        + (
            " protocol auto: MQTT 5, or 3.1.1 if the broker refuses 5."
            if section.protocol == "auto"
            else ""
        ),
        "bindings": {
            "mqtt": {
                "clientId": client_id,
                "cleanSession": True,
                "keepAlive": section.keepalive,
                "lastWill": will,
                "bindingVersion": _BINDING,
            }
        },
    }
    schemes: dict[str, Any] = {}
    if section.username:
        schemes["userPassword"] = {
            "type": "userPassword",
            "description": f"username {section.username!r}; the password is the gateway's "
            "secret (password_file or password_env)",
        }
    if section.tls is not None and section.tls.cert_file:
        schemes["X509"] = {"type": "X509", "description": "TLS client certificate (mTLS)."}
    if schemes:
        server["security"] = [{"$ref": f"#/components/securitySchemes/{k}"} for k in schemes]
    return server, schemes


def _by_device(tags: Sequence[TagSpec]) -> dict[str, list[TagSpec]]:
    out: dict[str, list[TagSpec]] = {}
    for spec in tags:
        out.setdefault(spec.device, []).append(spec)
    return out


def _example(spec: TagSpec) -> Any:
    kind = value_schema(spec)["type"][0]
    return {"boolean": True, "string": "text", "integer": 42, "number": 12.5}[kind]


def _uns(doc: _Doc, cfg: GatewayConfig, mqtt: MqttSection, tags: Sequence[TagSpec]) -> None:
    gw = cfg.gateway
    base = f"{mqtt.topic_prefix}/{gw.site}/{gw.area}/{gw.line}"
    qv, qs = mqtt.qos_values, mqtt.qos_state
    per_device = mqtt.topic_shape == "per_device"
    machines: dict[str, list[str]] = {}
    for d in cfg.devices:
        if d.enabled:
            machines.setdefault(d.machine, []).append(d.name)
    by_device = _by_device(tags)
    doc.add(
        "gateway",
        f"{base}/$gateway/{gw.name}",
        "uns",
        action="send",
        qos=qs,
        retain=True,
        summary="The gateway: online at connect; offline on a clean stop and as Last Will.",
        payload=_ref("State"),
        message_name="gatewayState",
        examples=[{"state": "online"}],
    )
    for machine, devices in machines.items():
        doc.add(
            f"status-{machine}",
            f"{base}/{machine}/$status",
            "uns",
            action="send",
            qos=qs,
            retain=True,
            summary=f"Machine {machine}: online only while every device of it is online.",
            payload=_ref("State"),
            message_name="machineState",
            examples=[{"state": "online"}],
        )
        for device in devices:
            doc.add(
                f"status-{machine}-{device}",
                f"{base}/{machine}/$status/{device}",
                "uns",
                action="send",
                qos=qs,
                retain=True,
                summary=f"Device {device}: state and error counters, published on change.",
                payload=_ref("DeviceStatus"),
                message_name="deviceStatus",
                examples=[
                    {
                        "state": "online",
                        "last_error": None,
                        "last_error_ts": None,
                        "last_success_ts": "2026-11-21T06:50:00.123Z",
                        "errors": {"timeout": 3},
                    }
                ],
            )
            specs = by_device.get(device, [])
            if per_device and specs:
                first = specs[0]
                doc.add(
                    f"device-{machine}-{device}",
                    f"{base}/{machine}/$device/{device}",
                    "uns",
                    action="send",
                    qos=qv,
                    retain=False,
                    summary=f"Every changed tag of one poll of {device}.",
                    payload=device_payload(device, specs),
                    message_name="deviceValues",
                    examples=[
                        {
                            "seq": 812,
                            "device": device,
                            "ts_ms": 1795243800123,
                            "values": {
                                first.name: {
                                    "value": _example(first),
                                    "quality": "good",
                                    "ts_ms": 1795243800123,
                                }
                            },
                        }
                    ],
                )
    for spec in tags:
        topic = f"{base}/{spec.machine}/{spec.name}"
        if not per_device:
            doc.add(
                f"tag-{spec.machine}-{spec.name}",
                topic,
                "uns",
                action="send",
                qos=qv,
                retain=mqtt.retain_values,
                summary=(spec.description or spec.name)
                + (f" [{spec.unit}]" if spec.unit else "")
                + (f" ({spec.source})" if spec.source else ""),
                payload=tag_payload(spec),
                message_name="tagValue",
                examples=[
                    {
                        "seq": 812,
                        "value": _example(spec),
                        "unit": spec.unit,
                        "quality": "good",
                        "ts": "2026-11-21T06:50:00.123Z",
                        "ts_ms": 1795243800123,
                    }
                ],
            )
        if spec.write is None:
            continue
        doc.add(
            f"set-{spec.machine}-{spec.name}",
            f"{topic}/set",
            "uns",
            action="receive",
            qos=1,
            retain=False,
            summary=f"Write {spec.key}: checked against its limits, written, read back, "
            "audited as user mqtt. The broker's ACL decides who may publish here.",
            payload={
                "type": "object",
                "additionalProperties": False,
                "required": ["value"],
                "properties": {
                    "value": value_schema(spec, nullable=False),
                    "id": {"description": "Optional; echoed in the result."},
                },
            },
            message_name="setCommand",
            examples=[{"value": _example(spec), "id": "req-1"}],
        )
        doc.add(
            f"result-{spec.machine}-{spec.name}",
            f"{topic}/set/result",
            "uns",
            action="send",
            qos=1,
            retain=False,
            summary=f"The outcome of each write to {spec.key}.",
            payload=_ref("SetResult"),
            message_name="setResult",
            examples=[
                {"tag": spec.key, "id": "req-1", "ok": True, "value": 1, "read_back": 1},
                {"tag": spec.key, "ok": False, "code": "out_of_range", "error": "..."},
            ],
        )


_PROTOBUF = {
    "type": "string",
    "contentEncoding": "binary",
    "description": "A Sparkplug B 3.0 Payload protobuf (org.eclipse.tahu.protobuf.Payload; "
    "gateway/sparkplug/sparkplug_b.proto), not JSON.",
}


def _sparkplug(
    doc: _Doc, cfg: GatewayConfig, sp: SparkplugSection, tags: Sequence[TagSpec]
) -> None:
    group = sp.group_id
    edge = sp.edge_node_id or cfg.gateway.name
    node = f"spBv1.0/{group}"
    ct = "application/vnd.google.protobuf"

    def metrics(specs: Sequence[TagSpec]) -> dict[str, Any]:
        return {
            "x-sparkplug-metrics": [
                {
                    "name": s.name,
                    "datatype": datatype_of(s).name.title().replace("_", ""),
                    "unit": s.unit,
                    "writable": s.write is not None,
                }
                for s in specs
            ]
        }

    def payload(text: str) -> dict[str, Any]:
        return {**_PROTOBUF, "description": f"{_PROTOBUF['description']} {text}"}

    doc.add(
        "spb-NBIRTH",
        f"{node}/NBIRTH/{edge}",
        "sparkplug",
        action="send",
        qos=0,
        retain=False,
        summary="Node birth, first in every session.",
        payload=payload("Metrics bdSeq (Int64) and Node Control/Rebirth (Boolean); seq 0."),
        message_name="nbirth",
        content_type=ct,
    )
    doc.add(
        "spb-NDEATH",
        f"{node}/NDEATH/{edge}",
        "sparkplug",
        action="send",
        qos=1,
        retain=False,
        summary="Node death: the Last Will, and published before a clean disconnect.",
        payload=payload("Metric bdSeq of the session it ends; no seq."),
        message_name="ndeath",
        content_type=ct,
    )
    doc.add(
        "spb-NCMD",
        f"{node}/NCMD/{edge}",
        "sparkplug",
        action="receive",
        qos=1,
        retain=False,
        summary="Node command: Node Control/Rebirth = true repeats every birth.",
        payload=payload("Metric Node Control/Rebirth (Boolean)."),
        message_name="ncmd",
        content_type=ct,
    )
    for device, specs in _by_device(tags).items():
        extra = metrics(specs)
        doc.add(
            f"spb-DBIRTH-{device}",
            f"{node}/DBIRTH/{edge}/{device}",
            "sparkplug",
            action="send",
            qos=0,
            retain=False,
            summary=f"Device birth of {device}: every tag with name, alias, datatype, value and "
            "a Quality property (192 good, 500 uncertain, 0 bad).",
            payload=payload("One metric per tag (x-sparkplug-metrics)."),
            message_name="dbirth",
            content_type=ct,
            extra=extra,
        )
        doc.add(
            f"spb-DDATA-{device}",
            f"{node}/DDATA/{edge}/{device}",
            "sparkplug",
            action="send",
            qos=sp.qos_data,
            retain=False,
            summary=f"Changed tags of {device}, by alias; replayed ones is_historical.",
            payload=payload("Metrics by alias, as announced in the DBIRTH."),
            message_name="ddata",
            content_type=ct,
            extra=extra,
        )
        doc.add(
            f"spb-DDEATH-{device}",
            f"{node}/DDEATH/{edge}/{device}",
            "sparkplug",
            action="send",
            qos=0,
            retain=False,
            summary=f"{device} went offline or stopped.",
            payload=payload("No metrics; seq only."),
            message_name="ddeath",
            content_type=ct,
        )
        writable = [s for s in specs if s.write is not None]
        doc.add(
            f"spb-DCMD-{device}",
            f"{node}/DCMD/{edge}/{device}",
            "sparkplug",
            action="receive",
            qos=1,
            retain=False,
            summary=f"Writes to {device}'s writable tags (by name or alias); the result is the "
            "next DDATA. Writable: " + (", ".join(s.name for s in writable) or "none"),
            payload=payload("One metric per tag to write."),
            message_name="dcmd",
            content_type=ct,
            extra=metrics(writable),
        )
    if sp.primary_host_id is not None:
        doc.add(
            "spb-STATE",
            f"spBv1.0/STATE/{sp.primary_host_id}",
            "sparkplug",
            action="receive",
            qos=1,
            retain=True,
            summary="The primary host application's state; births wait for online.",
            payload={
                "type": "object",
                "required": ["online", "timestamp"],
                "properties": {"online": {"type": "boolean"}, "timestamp": {"type": "integer"}},
            },
            message_name="hostState",
        )


def build(config: GatewayConfig, tags: Sequence[TagSpec]) -> dict[str, Any]:
    """The AsyncAPI 3.0 document of ``config``'s MQTT and Sparkplug interfaces."""
    gw = config.gateway
    doc = _Doc()
    servers: dict[str, Any] = {}
    schemes: dict[str, Any] = {}
    if config.mqtt is not None:
        mqtt = config.mqtt
        base = f"{mqtt.topic_prefix}/{gw.site}/{gw.area}/{gw.line}"
        will = {
            "topic": f"{base}/$gateway/{gw.name}",
            "qos": mqtt.qos_state,
            "message": '{"state":"offline"}',
            "retain": True,
        }
        servers["uns"], more = _server(
            mqtt, mqtt.client_id or gw.name, will, "The Unified Namespace broker (mqtt:)."
        )
        schemes.update(more)
        _uns(doc, config, mqtt, tags)
    if config.sparkplug is not None:
        sp = config.sparkplug
        edge = sp.edge_node_id or gw.name
        will = {
            "topic": f"spBv1.0/{sp.group_id}/NDEATH/{edge}",
            "qos": 1,
            "message": "(Sparkplug B protobuf NDEATH with the session's bdSeq)",
            "retain": False,
        }
        servers["sparkplug"], more = _server(
            sp, sp.client_id or f"{gw.name}-sparkplug", will, "The Sparkplug B broker (sparkplug:)."
        )
        schemes.update(more)
        _sparkplug(doc, config, sp, tags)
    components: dict[str, Any] = {"schemas": _components()}
    if schemes:
        components["securitySchemes"] = schemes
    return {
        "asyncapi": ASYNCAPI_VERSION,
        "info": {
            "title": f"retrofit-gateway {gw.name}: MQTT interface",
            "version": gateway.__version__,
            "description": f"The topics of gateway {gw.name!r} (site {gw.site}, area "
            f"{gw.area}, line {gw.line}), generated from its config by "
            "`retrofit-gw asyncapi`. Payload semantics: docs/mes-contract.md.",
        },
        "defaultContentType": "application/json",
        "servers": servers,
        "channels": doc.channels,
        "operations": doc.operations,
        "components": components,
    }

"""docs/integrator-reference.md, generated from the config models so that it never drifts.

``python -m gateway.docs`` rewrites the file; ``python -m gateway.docs --check`` exits 1 when
the committed file differs (``tests/test_docs.py`` does the same). ``render`` is pure: it
takes the built-in profiles as data and returns the Markdown; only ``main`` reads and writes
files.
"""

from __future__ import annotations

import argparse
import collections.abc
import enum
import json
import sys
import types
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Literal, Union, get_args, get_origin

import yaml
from annotated_types import Ge, Gt, Le, Lt, MaxLen, MinLen
from pydantic import BaseModel
from pydantic.fields import FieldInfo
from pydantic_core import PydanticUndefined

from drivers.ascii_serial.config import AsciiSerialDevice, AsciiTag
from drivers.modbus.config import (
    ByteOrder,
    DataType,
    ModbusRtuDevice,
    ModbusRtuOverTcpDevice,
    ModbusTag,
    ModbusTcpDevice,
)
from drivers.modbus.decode import decode, encode
from drivers.plugins import PluginDevice
from gateway.config import GatewayConfig

__all__ = ["byte_order_rows", "main", "render"]

OUTPUT = "docs/integrator-reference.md"
COMMAND = "python -m gateway.docs"
#: The worked example of the byte-order guide.
EXAMPLE_VALUE = 1450.0

#: Examples for keys whose default says nothing (required, or None by default).
_EXAMPLES: dict[str, str] = {
    "name": "lathe-3-plc",
    "site": "plant1",
    "area": "machining",
    "line": "line-a",
    "machine": "lathe-3",
    "host": "192.0.2.10",
    "port": "/dev/ttyUSB0",
    "address": "40001",
    "table": "holding",
    "unit": "rpm",
    "username": "gateway",
    "password_env": "GW_MQTT_PASS",
    "password_file": "mqtt-password",
    "client_id": "shop-gw",
    "group_id": "plant1",
    "edge_node_id": "shop-gw",
    "primary_host_id": "scada-1",
    "ca_file": "certs/plant-ca.pem",
    "cert_file": "certs/gateway.pem",
    "key_file": "certs/gateway.key",
    "key_password_env": "GW_MQTT_KEY_PASS",
    "server_name": "broker.plant.local",
    "heartbeat": "300",
    "namespace_uri": "urn:retrofit-gateway:shop-gw",
    "application_uri": "urn:retrofit-gateway:box1:shop-gw",
    "password_hash": '"scrypt$16384$8$1$..."',
    "token_hash": '"scrypt$16384$8$1$..."',
    "tags_csv": "lathe3.csv",
    "profile": "eastron_sdm630",
    "bit": "3",
    "count": "8",
    "interval": "5.0",
    "deadband": "0.5",
    "min": "0",
    "max": "250",
    "values": "[0, 1, 2]",
    "anonymous": "false",
    "command": '"#01\\r"',
    "regex": "'>(?P<ch0>[+-]\\d+\\.\\d+)'",
    "group": "ch0",
    "field": "2",
    "delimiter": '","',
    "start": '">"',
    "end": '"\\r"',
    "length": "16",
    "tls": "{ca_file: certs/plant-ca.pem}",
    "write": "{min: 0, max: 3000}",
    "users": "[{name: scada, password_hash: ..., role: reader}]",
    "tokens": "[{name: mes, token_hash: ...}]",
}


#: Descriptions of keys whose model field has none (the models' own win).
_DESCRIPTIONS: dict[str, str] = {
    "version": "Config file format version.",
    "devices": "The devices to poll (at least one); `driver:` chooses the kind.",
    "driver": "The kind of device, and with it the keys below.",
    "name": "Unique name (a topic level and an OPC UA browse name: no `+ # /`, no leading `$`).",
    "enabled": "false: keep the device in the file but do not poll it.",
    "addressing": "How `address:` is written for every tag: zero_based (the wire address, "
    "needs `table:`), one_based (register number in `table:`), modicon (40001-style).",
    "tags": "The device's tags (see Tags).",
    "baudrate": "Bits per second of the serial line.",
    "stopbits": "Stop bits (2 is usual with parity N).",
    "bytesize": "Data bits.",
    "unit_id": "Modbus unit (slave) id.",
    "port": "TCP port.",
    "host": "IP address or name of the device (or of its serial device server).",
    "type": "Data type of the value.",
    "scale": "value = raw x scale + offset.",
    "offset": "value = raw x scale + offset.",
    "description": "Free text, shown on the page and as the OPC UA Description.",
    "deadband": "Publish only changes larger than this (engineering units).",
    "username": "Broker login name.",
    "qos_state": "QoS of the status and gateway topics.",
    "retain_values": "Retain tag topics (per_tag), so a late subscriber gets the last value.",
    "buffer": "Store and forward on disk (see the sub-table).",
    "log_level": "Log verbosity.",
    "role": "reader: browse, read, subscribe; operator: also write writable tags.",
    "max_registers_per_request": "Cap on registers per read request (some devices take less "
    "than 125).",
    "max_bits_per_request": "Cap on coils/discrete inputs per read request.",
    "gateway": "Who this gateway is (see the section).",
    "bus": "Queues between polling and the sinks.",
    "breaker": "When a failing device is skipped, and for how long.",
    "mqtt": "MQTT Unified Namespace publisher; absent: off.",
    "sparkplug": "Sparkplug B edge node; absent: off.",
    "opcua": "OPC UA server; absent: off.",
    "web": "Status page and JSON API; absent: off.",
    "workarounds": "Quirks of real devices (see the sub-table).",
    "parity": "N, E or O.",
}


def _type_name(tp: Any) -> str:
    origin = get_origin(tp)
    if origin is Annotated:
        return _type_name(get_args(tp)[0])
    if origin is Literal:
        return " | ".join(f"`{a}`" for a in get_args(tp))
    if origin in (Union, types.UnionType):
        parts = [_type_name(a) for a in get_args(tp) if a is not type(None)]
        nullable = type(None) in get_args(tp)
        return " or ".join(parts) + (" or null" if nullable else "")
    if origin in (list, collections.abc.Sequence):
        return f"list of {_type_name(get_args(tp)[0])}"
    if isinstance(tp, type) and issubclass(tp, enum.Enum):
        return " | ".join(f"`{m.value}`" for m in tp)
    if isinstance(tp, type) and issubclass(tp, BaseModel):
        return f"mapping ({tp.__name__})"
    return {int: "integer", float: "number", str: "text", bool: "true/false"}.get(
        tp, getattr(tp, "__name__", str(tp))
    )


def _bounds(field: FieldInfo) -> str:
    meta = list(field.metadata)
    tp = field.annotation
    while get_origin(tp) in (Union, types.UnionType, Annotated):
        args = [a for a in get_args(tp) if a is not type(None)]
        if get_origin(tp) is Annotated:
            meta += [m for a in args[1:] for m in getattr(a, "metadata", [a])]
            tp = args[0]
        elif len(args) == 1:
            tp = args[0]
        else:
            break
    words = []
    for m in meta:
        if isinstance(m, Ge):
            words.append(f"≥ {m.ge}")
        elif isinstance(m, Gt):
            words.append(f"> {m.gt}")
        elif isinstance(m, Le):
            words.append(f"≤ {m.le}")
        elif isinstance(m, Lt):
            words.append(f"< {m.lt}")
        elif isinstance(m, MinLen) and m.min_length > 1:
            words.append(f"at least {m.min_length} long")
        elif isinstance(m, MaxLen):
            words.append(f"at most {m.max_length} long")
    return ", ".join(words)


def _default(field: FieldInfo) -> str:
    if field.is_required():
        return "**required**"
    factory = field.default_factory
    value = factory() if factory is not None else field.default  # type: ignore[call-arg]
    if value is PydanticUndefined:
        return ""
    if isinstance(value, BaseModel):
        return "see below"
    if isinstance(value, enum.Enum):
        value = value.value
    if isinstance(value, list) and len(value) > 3:
        return f"all {len(value)}"
    return f"`{json.dumps(value, ensure_ascii=False)}`"


def _example(key: str, field: FieldInfo) -> str:
    if key in _EXAMPLES:
        return f"`{key}: {_EXAMPLES[key]}`"
    value = None if field.is_required() or field.default is PydanticUndefined else field.default
    if isinstance(value, enum.Enum):
        value = value.value
    if value is None or isinstance(value, BaseModel | list):
        tp = field.annotation
        options = [a for a in get_args(tp) if a is not type(None)]
        if get_origin(tp) is Literal and options:
            value = options[-1]
        else:
            return ""
    text = yaml.safe_dump({key: value}, default_flow_style=True).strip()
    return f"`{text[1:-1]}`"


def _cell(text: str) -> str:
    return " ".join(text.split()).replace("|", "\\|")


def _table(model: type[BaseModel]) -> list[str]:
    lines = ["| key | type | default | description | example |", "|---|---|---|---|---|"]
    for key, field in model.model_fields.items():
        kind = _type_name(field.annotation)
        bounds = _bounds(field)
        if bounds:
            kind += f" ({bounds})"
        desc = field.description or _DESCRIPTIONS.get(key, "")
        lines.append(
            f"| `{key}` | {_cell(kind)} | {_cell(_default(field))} | {_cell(desc)} | "
            f"{_cell(_example(key, field))} |"
        )
    return lines


def _nested(model: type[BaseModel]) -> list[type[BaseModel]]:
    out: list[type[BaseModel]] = []

    def walk(tp: Any) -> None:
        if isinstance(tp, type) and issubclass(tp, BaseModel):
            if tp not in out:
                out.append(tp)
            return
        for arg in get_args(tp):
            walk(arg)

    for field in model.model_fields.values():
        walk(field.annotation)
    return out


def _section(
    title: str, model: type[BaseModel], level: str = "###", seen: set[type] | None = None
) -> list[str]:
    seen = set() if seen is None else seen
    seen.add(model)
    doc = " ".join((model.__doc__ or "").split())
    lines = [f"{level} {title}", ""]
    if doc:
        lines += [doc, ""]
    lines += [*_table(model), ""]
    for sub in _nested(model):
        if sub in (ModbusTag, AsciiTag) or sub in seen:
            continue  # their own sections, or shown above
        lines += _section(f"{title} → {sub.__name__}", sub, level + "#", seen)
    return lines


def byte_order_rows(
    type_: DataType, orders: list[ByteOrder], value: float
) -> list[tuple[str, list[int]]]:
    """Each order with the registers that hold ``value``, checked by decoding them back."""
    rows = []
    for order in orders:
        regs = [int(r) for r in encode(type_, order, value)]
        assert decode(type_, order, regs) == value
        rows.append((order.value, regs))
    return rows


def _byte_guide() -> list[str]:
    v = EXAMPLE_VALUE
    lines = [
        "## Byte and word order",
        "",
        "A Modbus register holds 16 bits, sent high byte first. A 32-bit value takes two "
        "registers, a 64-bit one four, and devices disagree on which byte goes where. The "
        "order is written as the value's own bytes, most significant first (A), in the order "
        "they sit in the registers. The examples below are "
        f"**{v} as float32** (IEEE 754: bytes `44 B5 40 00`, A=`44` B=`B5` C=`40` D=`00`) and "
        f"**{v} as float64** (bytes `40 96 A8 00 00 00 00 00`); every register pair is "
        "generated by the gateway's own encoder and decoded back by its decoder.",
        "",
        "```",
        "order   register n      register n+1    reads as",
        "        hi    lo        hi    lo",
    ]
    names = {
        "ABCD": "Modbus standard: big-endian bytes, high word first",
        "CDAB": "word swap: low word first (very common: many PLCs, meters)",
        "BADC": "byte swap inside each register",
        "DCBA": "both: fully little-endian",
    }
    for order, regs in byte_order_rows(DataType.FLOAT32, list(ByteOrder)[:4], v):
        cells = "  ".join(f"{r >> 8:02X}    {r & 0xFF:02X}    " for r in regs)
        lines.append(f"{order}    {cells}{names[order]}")
    lines += ["```", ""]
    lines += [
        "Registers as `retrofit-gw read` prints them (hex, one per register):",
        "",
        "| order | float32 1450.0 | float64 order | float64 1450.0 |",
        "|---|---|---|---|",
    ]
    rows32 = byte_order_rows(DataType.FLOAT32, list(ByteOrder)[:4], v)
    rows64 = byte_order_rows(DataType.FLOAT64, list(ByteOrder)[4:], v)
    for (o32, r32), (o64, r64) in zip(rows32, rows64, strict=True):
        hex32 = " ".join(f"{r:04X}" for r in r32)
        hex64 = " ".join(f"{r:04X}" for r in r64)
        lines.append(f"| `{o32}` | `{hex32}` | `{o64}` | `{hex64}` |")
    lines += [
        "",
        "How to find a device's order: read the registers with `retrofit-gw read --host H "
        "ADDRESS 2` (or 4 for 64-bit values) while the value is known (a setpoint, a mains "
        "voltage near 230): `read` prints every type in every order, marks implausible ones "
        "and prints the config line of each plausible one. The four 8-letter names are the "
        "same swaps for 64-bit values (`GHEFCDAB`: word swap, `BADCFEHG`: byte swap, "
        "`HGFEDCBA`: both); a 4-letter name on a 64-bit tag means the same swaps. On 16-bit "
        "values only the byte swap (`BADC`/`DCBA`) changes anything.",
        "",
    ]
    return lines


def _profiles(profiles: Mapping[str, Mapping[str, Any]]) -> list[str]:
    lines = [
        "## Device profiles",
        "",
        "Built-in register maps in `config/profiles/`; use one with `profile: <name>` on a "
        "device. The device's own keys win over the profile's (nested ones key by key), a "
        "device tag with a profile tag's name replaces it, other device tags are added; a "
        "`profiles/<name>.yaml` beside the config file is found before the built-in one.",
        "",
        "| profile | drivers | tags | what it is |",
        "|---|---|---|---|",
    ]
    for name, data in sorted(profiles.items()):
        drivers = ", ".join(f"`{d}`" for d in data.get("drivers", []))
        tags = len(data.get("tags", []))
        desc = _cell(str(data.get("description", "")))
        lines.append(f"| `{name}` | {drivers} | {tags} | {desc} |")
    lines.append("")
    for name, data in sorted(profiles.items()):
        source = data.get("source") or {}
        lines += [
            f"### `{name}`",
            "",
            f"Source: {_cell(str(source.get('manual', 'not recorded')))}.",
            "",
            "| tag | address / group | type | order | unit |",
            "|---|---|---|---|---|",
        ]
        for tag in data.get("tags", []):
            where = tag.get("address", tag.get("group", tag.get("field", "")))
            lines.append(
                f"| `{tag['name']}` | {where} | {tag.get('type', '')} | {tag.get('order', '')} "
                f"| {_cell(str(tag.get('unit', '') or ''))} |"
            )
        lines.append("")
    return lines


_PLUGINS = """\
## Adding a driver

A driver is either built into this source tree or shipped as a **plugin**: a distribution of
its own, installed into the gateway's environment, that declares an entry point in the
group `retrofit_gateway.drivers`. Both kinds are configured, validated, located in error
messages, listed by `retrofit-gw schema` and run the same way; this reference lists the
built-in drivers only (it is the same on every installation), `retrofit-gw schema` prints
the keys of the plugins installed where it runs.

### Built in

1. `drivers/<protocol>/` with a pydantic config model (`driver: Literal["<kind>"]`,
   `extra="forbid"`), pure `plan`/`decode` modules and **one** transport module that is the
   only importer of the protocol library (`tests/test_architecture.py` enforces it).
2. The `drivers.base.Driver` protocol: `name`, `tags` (`TagSpec`s), `groups`
   (`ReadGroup`s by interval), `connect()`, `read(group)` returning one `RawSample` per
   tag, `close()`, `poll_timeout(group)`; optionally `describe_plan()` and a `write`.
3. Register it in `drivers.BUILTIN` (`"module:factory"`, imported lazily by
   `drivers.plugins.factory`) and add its config model to `DeviceConfig` in
   `gateway/config.py`; driver-specific cross-checks return `(location, message)` pairs.
4. Test it against a real peer on 127.0.0.1.

### As a plugin

The plugin's `pyproject.toml` names the gateway as a dependency and declares the entry
point; its name is the config's `driver:` value:

```toml
[project]
name = "tcp-value-plugin"
version = "0.1"
dependencies = ["retrofit-gateway"]

[project.entry-points."retrofit_gateway.drivers"]
tcp_value = "tcp_value:describe"
```

`describe()` takes no arguments and returns a `drivers.plugins.DriverPlugin(name, model,
factory, check=None)`:

- `name` is the entry point's name: lower-case letters, digits and `_`, starting with a
  letter, and not a built-in driver's name.
- `model` is the device's config model: a subclass of `drivers.plugins.PluginDevice` with
  `driver: Literal["<name>"]`, `tags` a list of a `drivers.plugins.PluginTag` subclass, and
  `extra="forbid"` kept (inherited from the base), for the device and the tags. The base
  gives every device the keys the gateway itself relies on (below); the gateway's own
  cross-checks (unique device and tag names, `timeout` shorter than `interval`, at least one
  tag) apply to plugin devices too.
- `factory(device)` builds a `drivers.base.Driver` from one validated device. It must not
  touch the device: `retrofit-gw check` builds every driver. Each `TagSpec.datatype` is one
  of `bool`, `bit`, `int16`, `uint16`, `int32`, `uint32`, `int64`, `uint64`, `float32`,
  `float64`, `bcd16`, `bcd32`, `string`; a failure of the whole device raises a
  `gateway.errors.DeviceError` (`ConnectionLost`, `DeviceTimeout`, ...), a failure of one
  tag is its `RawSample.reason`.
- `check(device)`, optional, returns the driver's own cross-checks as
  `(location under the device, message)` pairs; `retrofit-gw check` prints them with file
  and line.

Keys every plugin device has (`PluginDevice`):

@PLUGIN_DEVICE_TABLE@

What the gateway does with the entry points: it reads
`importlib.metadata.entry_points(group="retrofit_gateway.drivers")` once per process, when
a command first loads a config (or prints the schema), imports each plugin and checks what
its `describe()` returns. The config model of that process is then the built-in device
union plus the plugins' models, and the driver registry the built-in factories plus the
plugins'. A plugin is **refused** when its module cannot be imported, `describe()` raises
or returns anything but a valid `DriverPlugin` (wrong name, model not a `PluginDevice`,
`driver` not the one Literal, unknown keys allowed, tags not `PluginTag`s, no JSON Schema),
its name is not a valid `driver:` value, is a built-in driver's, or is claimed by two
entry points. A refused plugin is logged once as a warning
(`driver plugin 'x' (x = pkg.mod:describe (from pkg 0.1)) is refused: <reason>; skipped`)
and skipped: a config that does not use it loads as before. A config whose `driver:` names
it fails `retrofit-gw check` (and `once`, `run`) with exit code 2 and that reason at the
`driver:` line; so does a config naming a built-in driver that a plugin also claims, since
which one is meant is unclear. A factory that raises when the gateway starts ends the
process with the traceback, noted with the plugin's name; one that returns no `Driver`, or
a tag of an unknown datatype, raises a `TypeError` naming the plugin.

Installing, upgrading or removing a plugin takes a restart: a reload (SIGHUP) reads the
config again, not the entry points. A plugin runs inside the gateway process with its
rights: install only plugins you would install as part of the gateway itself.

A complete plugin (`tests/data/tcp_value_plugin/tcp_value.py`, which `tests/test_plugins.py`
installs as a real distribution and runs `check`, `schema`, `once` and `run` on): it asks
a TCP server for each tag's value, one line each way.

```python
@PLUGIN_EXAMPLE@```

and a device of it:

```yaml
devices:
  - name: counter-box
    driver: tcp_value
    machine: press-1
    host: 192.0.2.20
    port: 7000
    tags:
      - {name: count, type: int}
      - {name: temperature, unit: degC, min: -20, max: 120}
```
"""

#: The example plugin of the section above, as in tests/data/tcp_value_plugin/tcp_value.py
#: after its docstring (tests/test_plugins.py keeps the two identical).
PLUGIN_EXAMPLE = r'''from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Sequence
from typing import Literal

from pydantic import Field

from drivers.plugins import DriverPlugin, Issues, PluginDevice, PluginTag
from gateway.errors import ConnectionLost
from gateway.model import RawSample, ReadGroup, Reason, TagSpec


class ValueTag(PluginTag):
    type: Literal["float", "int"] = "float"
    unit: str | None = Field(default=None, max_length=32)
    min: float | None = None
    max: float | None = None


class TcpValueDevice(PluginDevice):
    """A server that answers a tag's name with its value, one line each."""

    driver: Literal["tcp_value"]
    host: str = Field(min_length=1)
    port: int = Field(ge=1, le=65535)
    tags: list[ValueTag] = Field(default_factory=list)


class TcpValueDriver:
    """Implements ``drivers.base.Driver``. Building it must not touch the device."""

    def __init__(self, device: TcpValueDevice) -> None:
        self.device = device
        self.name = device.name
        self.endpoint = f"{device.host}:{device.port}"
        self.tags: tuple[TagSpec, ...] = tuple(
            TagSpec(
                index=i,
                machine=device.machine,
                device=device.name,
                name=tag.name,
                datatype="float64" if tag.type == "float" else "int64",
                unit=tag.unit,
                minimum=tag.min,
                maximum=tag.max,
                interval=device.interval,
                source=f"line {tag.name}",
            )
            for i, tag in enumerate(device.tags)
        )
        self.groups = (ReadGroup(device.interval, tuple(range(len(self.tags)))),)
        self._link: tuple[asyncio.StreamReader, asyncio.StreamWriter] | None = None

    async def connect(self) -> None:
        await self.close()
        try:
            self._link = await asyncio.open_connection(self.device.host, self.device.port)
        except OSError as exc:
            raise ConnectionLost(f"{self.endpoint}: {exc}") from exc

    async def read(self, group: int) -> Sequence[RawSample]:
        if self._link is None:
            raise ConnectionLost(f"{self.endpoint}: not connected")
        reader, writer = self._link
        samples = []
        for i in self.groups[group].indices:
            tag = self.device.tags[i]
            writer.write(f"{tag.name}\n".encode())
            await writer.drain()
            line = await reader.readline()
            if not line:
                raise ConnectionLost(f"{self.endpoint} closed the connection")
            text = line.decode(errors="replace").strip()
            try:
                value = float(text) if tag.type == "float" else int(text)
            except ValueError:
                samples.append(RawSample(i, None, reason=Reason.DECODE_ERROR, detail=text))
            else:
                samples.append(RawSample(i, value))
        return samples

    def poll_timeout(self, group: int) -> float:
        # One answer per tag, each within the device's timeout.
        return self.device.timeout * len(self.groups[group].indices) + 0.1

    async def close(self) -> None:
        link, self._link = self._link, None
        if link is not None:
            link[1].close()
            with contextlib.suppress(OSError):
                await link[1].wait_closed()


def check(device: TcpValueDevice) -> Issues:
    """The driver's own cross-checks, located under the device."""
    for k, tag in enumerate(device.tags):
        if tag.min is not None and tag.max is not None and tag.min > tag.max:
            yield ("tags", k, "min"), f"min {tag.min:g} is larger than max {tag.max:g}"


def describe() -> DriverPlugin[TcpValueDevice]:
    """The entry point: ``tcp_value = "tcp_value:describe"``."""
    return DriverPlugin("tcp_value", TcpValueDevice, TcpValueDriver, check)
'''


def render(profiles: Mapping[str, Mapping[str, Any]]) -> str:
    """The whole reference, from the config models and the given built-in profiles."""
    lines = [
        "# Integrator reference",
        "",
        f"<!-- Generated by `{COMMAND}` from the config models; do not edit by hand. "
        "tests/test_docs.py fails when it is out of date. -->",
        "",
        "Every key of a gateway config file, with its type, default, description and an "
        "example. `retrofit-gw schema` prints the same as a JSON Schema for editors, and "
        "`retrofit-gw check CONFIG` validates a file and names the line of every mistake. "
        "[`config/demo.yaml`](../config/demo.yaml) is a commented example; "
        "[`config/production.example.yaml`](../config/production.example.yaml) a locked-down "
        "start.",
        "",
        "Contents: [top level](#top-level) · [sections](#sections) · [devices](#devices) · "
        "[tags](#tags) · [byte and word order](#byte-and-word-order) · "
        "[profiles](#device-profiles) · [adding a driver](#adding-a-driver)",
        "",
        "## Top level",
        "",
        *_table(GatewayConfig),
        "",
        "## Sections",
        "",
    ]
    seen: set[type] = set()
    for key in ("gateway", "bus", "breaker", "mqtt", "sparkplug", "opcua", "web"):
        model = _nested_one(GatewayConfig.model_fields[key])
        lines += _section(f"`{key}:`", model, seen=seen)
    lines += [
        "## Devices",
        "",
        "`devices:` is a list; `driver:` chooses the kind and with it the keys.",
        "",
    ]
    for model in (ModbusTcpDevice, ModbusRtuDevice, ModbusRtuOverTcpDevice, AsciiSerialDevice):
        kind = get_args(model.model_fields["driver"].annotation)[0]
        lines += _section(f"`driver: {kind}`", model, seen=seen)
    lines += ["## Tags", ""]
    title = "Modbus tags (`modbus_tcp`, `modbus_rtu`, `modbus_rtu_over_tcp`)"
    lines += _section(title, ModbusTag, seen=seen)
    lines += _section("ASCII tags (`ascii_serial`)", AsciiTag, seen=seen)
    lines += _byte_guide()
    lines += _profiles(profiles)
    plugins = _PLUGINS.replace("@PLUGIN_EXAMPLE@", PLUGIN_EXAMPLE)
    plugins = plugins.replace("@PLUGIN_DEVICE_TABLE@", "\n".join(_table(PluginDevice)))
    lines += plugins.splitlines()
    return "\n".join(lines).rstrip() + "\n"


def _nested_one(field: FieldInfo) -> type[BaseModel]:
    found = _nested_type(field.annotation)
    assert found is not None
    return found


def _nested_type(tp: Any) -> type[BaseModel] | None:
    if isinstance(tp, type) and issubclass(tp, BaseModel):
        return tp
    for arg in get_args(tp):
        if (found := _nested_type(arg)) is not None:
            return found
    return None


def load_profiles(directory: Path) -> dict[str, dict[str, Any]]:
    """The built-in profiles as data (I/O: for ``main`` and the drift test)."""
    return {
        path.stem: yaml.safe_load(path.read_text(encoding="utf-8"))
        for path in sorted(directory.glob("*.yaml"))
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog=COMMAND, description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="exit 1 if the file is stale")
    parser.add_argument("--root", default=".", help="the checkout (default: .)")
    args = parser.parse_args(argv)
    root = Path(args.root)
    text = render(load_profiles(root / "config" / "profiles"))
    out = root / OUTPUT
    if args.check:
        if not out.is_file() or out.read_text(encoding="utf-8") != text:
            print(f"{out} is out of date; run `{COMMAND}`", file=sys.stderr)
            return 1
        return 0
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text, encoding="utf-8")
    print(f"{out}: written")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The gateway config: its models, and a loader that reports every mistake with file and line.

The people who write these files are technicians and integrators editing YAML by hand, so a
bad config must never end in a traceback or in the first error only. ``load_config`` builds the
data from the YAML node tree itself (not ``yaml.safe_load``) so that it can remember the line of
every key, catch duplicate keys that PyYAML would silently drop, and merge ``tags_csv`` rows
with their own CSV line numbers. Every problem becomes a ``ConfigIssue`` like::

    config/gateway.yaml:14: devices[0].tags[1].type: Input should be 'bool', ... (got 'floatt')
"""

from __future__ import annotations

import copy
import csv
import difflib
import functools
import re
import sys
import types
import unicodedata
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal, Union, get_args, get_origin

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    create_model,
    model_validator,
)
from pydantic_core import ErrorDetails
from yaml.nodes import MappingNode, Node, ScalarNode, SequenceNode

from drivers.ascii_serial.config import AsciiSerialDevice, AsciiTag
from drivers.ascii_serial.config import check_device as check_ascii_device
from drivers.modbus.config import (
    ModbusRtuDevice,
    ModbusRtuOverTcpDevice,
    ModbusTag,
    ModbusTcpDevice,
    check_device,
    check_serial_buses,
)
from drivers.plugins import installed as installed_plugins
from gateway.auth import PasswordHashError, parse_hash
from gateway.errors import ConfigError, ConfigIssue

__all__ = [
    "BrokerSection",
    "BusSection",
    "DeviceConfig",
    "GatewayConfig",
    "GatewaySection",
    "LoadedConfig",
    "MqttSection",
    "OpcUaSection",
    "OpcUaUser",
    "SparkplugSection",
    "TlsSection",
    "WebSection",
    "WebToken",
    "config_model",
    "format_issues",
    "json_schema",
    "load_config",
]

#: A key path into the config data, e.g. ``("devices", 0, "tags", 3, "type")``.
Loc = tuple[str | int, ...]
#: Key path -> (file, 1-based line). CSV rows map to the CSV file and its line.
SourceMap = dict[Loc, tuple[str, int]]


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class GatewaySection(_Section):
    """Who this gateway is, and where it sits in the ISA-95 hierarchy (the MQTT topic path)."""

    name: str = Field(default="retrofit-gw", min_length=1, description="The gateway's id.")
    site: str = Field(min_length=1, description="ISA-95 site (enterprise/site/area/line).")
    area: str = Field(min_length=1, description="ISA-95 area.")
    line: str = Field(min_length=1, description="ISA-95 line.")
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    data_dir: str = Field(
        default="data", description="State directory (certificates); relative to this file."
    )


class BusSection(_Section):
    queue_size: int = Field(
        default=1000, ge=1, le=1_000_000, description="Batches buffered per subscriber queue."
    )


class BreakerSection(_Section):
    """When the runner stops polling a failing device, and how often it probes it again."""

    failures: int = Field(
        default=3,
        ge=1,
        le=100,
        description="Failed polls in a row that open a device's breaker (stop polling it).",
    )
    open_min: float = Field(
        default=1.0,
        gt=0,
        le=3600,
        description="Seconds the breaker stays open the first time (jittered: half to all).",
    )
    open_max: float = Field(
        default=30.0,
        gt=0,
        le=3600,
        description="Cap in seconds: the open time doubles per failed probe up to this.",
    )

    @model_validator(mode="after")
    def _ordered(self) -> BreakerSection:
        if self.open_min > self.open_max:
            raise ValueError("open_min must not be larger than open_max")
        return self


# A discriminated union on ``driver`` of the built-in drivers. pydantic accepts a
# discriminator on a single model, and the error for an unknown ``driver:`` then already names
# the valid values; a new built-in driver is added as ``ModbusTcpDevice | ModbusRtuDevice``
# inside the Annotated. Driver plugins (``drivers.plugins``) join it in ``config_model()``.
DeviceConfig = Annotated[
    ModbusTcpDevice | ModbusRtuDevice | ModbusRtuOverTcpDevice | AsciiSerialDevice,
    Field(discriminator="driver"),
]


class BufferSection(_Section):
    """Store and forward: what the broker has not acknowledged is kept, on disk while it
    cannot be delivered, and replayed oldest first once it can (see gateway/outbox.py)."""

    max_mb: float = Field(
        default=256,
        gt=0,
        le=100_000,
        description="Disk space for undelivered messages, MB (~175 B each on disk).",
    )
    max_age_h: float = Field(
        default=168, gt=0, le=87_600, description="Older undelivered messages are dropped, h."
    )
    when_full: Literal["drop_oldest", "drop_newest"] = Field(
        default="drop_oldest", description="What gives way when max_mb is reached."
    )
    fsync: Literal["off", "normal", "full"] = Field(
        default="normal",
        description="normal: survives a crash or kill, consistent after a power cut (may lose "
        "the last seconds); full: survives a power cut too, one fsync per poll while the "
        "broker is away (SD card wear); off: tests only.",
    )
    replay_rate: float = Field(
        default=50_000,
        gt=0,
        le=1_000_000,
        description="Messages per second replayed after an outage, beside the live ones.",
    )
    inflight: int = Field(
        default=2000,
        ge=10,
        le=100_000,
        description="Messages sent and not yet acknowledged; more wait on disk.",
    )


class TlsSection(_Section):
    """TLS to the broker: TLS 1.2 or newer, its certificate checked against ``ca_file`` and
    its name unless explicitly switched off. Files are relative to this config file."""

    ca_file: str | None = Field(
        default=None,
        description="PEM file with the CA(s) that signed the broker's certificate. Default: "
        "the system's CAs.",
    )
    cert_file: str | None = Field(
        default=None, description="Our client certificate (PEM), for a broker that asks for one."
    )
    key_file: str | None = Field(
        default=None, description="The client certificate's key (PEM); default: in cert_file."
    )
    key_password_env: str | None = Field(
        default=None, description="Environment variable holding the key's password, if any."
    )
    verify_hostname: bool = Field(
        default=True,
        description="The certificate must name host (or server_name). Off: any certificate the "
        "CA signed is taken as the broker's; a warning at every start.",
    )
    server_name: str | None = Field(
        default=None,
        min_length=1,
        description="The name checked in the certificate and sent as SNI. Default: host.",
    )
    insecure_skip_verify: bool = Field(
        default=False,
        description="Accept any certificate: still encrypted, but anyone on the network path "
        "can pose as the broker. Tests only; a warning at every start.",
    )

    @model_validator(mode="after")
    def _client_cert(self) -> TlsSection:
        if (self.key_file or self.key_password_env) and not self.cert_file:
            raise ValueError("key_file and key_password_env belong to a cert_file")
        return self


class BrokerSection(_Section):
    """How to reach an MQTT broker: shared by the ``mqtt:`` and ``sparkplug:`` sections."""

    host: str = Field(default="127.0.0.1", min_length=1, description="Broker host.")
    port: int = Field(default=1883, ge=1, le=65535)
    client_id: str | None = Field(default=None, description="Default: the gateway's name.")
    username: str | None = None
    password_env: str | None = Field(
        default=None, description="Name of an environment variable that holds the password."
    )
    password_file: str | None = Field(
        default=None, description="File holding the password, relative to this config file."
    )
    keepalive: int = Field(default=30, ge=5, le=3600, description="Seconds.")
    tls: TlsSection | None = Field(
        default=None,
        description="TLS to the broker. Absent: plain TCP, with a warning at every start "
        "unless the broker is on loopback.",
    )
    protocol: Literal["auto", "5", "3.1.1"] = Field(
        default="auto",
        description="MQTT version. auto: 5, or 3.1.1 from the first time the broker refuses 5 "
        "until the gateway restarts.",
    )

    @model_validator(mode="before")
    @classmethod
    def _protocol_text(cls, data: Any) -> Any:
        # YAML reads `protocol: 5` as a number.
        if isinstance(data, dict) and type(data.get("protocol")) is int:
            return {**data, "protocol": str(data["protocol"])}
        return data


class MqttSection(BrokerSection):
    """Publish every reading to an MQTT broker as a Unified Namespace. Absent: no MQTT."""

    topic_prefix: str = Field(
        default="uns", min_length=1, description="First topic level, before site/area/line."
    )
    topic_shape: Literal["per_tag", "per_device"] = Field(
        default="per_tag",
        description="per_tag: one retained topic per tag; per_device: one message per poll "
        "with every changed tag of the device (for high rates).",
    )
    qos_values: Literal[0, 1] = Field(
        default=1,
        description="1: a value leaves the buffer when the broker acknowledges it; 0: when it "
        "is written to the connection (lost if the connection breaks then).",
    )
    qos_state: Literal[0, 1] = 1
    retain_values: bool = True
    heartbeat: float | None = Field(
        default=None, gt=0, le=86_400, description="Republish unchanged values every N s."
    )
    buffer: BufferSection = BufferSection()


class SparkplugSection(BrokerSection):
    """Publish every device as a Sparkplug B 3.0 device of one edge node. Absent: no Sparkplug.

    Topics ``spBv1.0/<group_id>/<type>/<edge_node_id>[/<device>]``; see
    gateway/sinks/sparkplug.py.
    """

    client_id: str | None = Field(
        default=None,
        description="Default: <gateway name>-sparkplug. Must differ from the mqtt: section's "
        "on the same broker: the broker drops the older of two sessions with one client id.",
    )
    group_id: str = Field(min_length=1, description="Sparkplug group id (no + / #).")
    edge_node_id: str | None = Field(
        default=None, min_length=1, description="Default: the gateway's name (no + / #)."
    )
    primary_host_id: str | None = Field(
        default=None,
        min_length=1,
        description="Host application that must say online on spBv1.0/STATE/<id> before "
        "births and data are published; until it does, data waits in the buffer.",
    )
    qos_data: Literal[0, 1] = Field(
        default=1,
        description="1: a DDATA leaves the buffer when the broker acknowledges it (not what "
        "Sparkplug 3.0 says: tck-id-topics-ddata-mqtt asks for 0); 0: when it is written to "
        "the connection, as the specification asks (lost if the connection breaks then).",
    )
    buffer: BufferSection = BufferSection()


#: OPC UA endpoints: the SecurityPolicy URI's name, then the MessageSecurityMode.
OpcUaSecurity = Literal[
    "Basic256Sha256_Sign",
    "Basic256Sha256_SignAndEncrypt",
    "Aes128_Sha256_RsaOaep_Sign",
    "Aes128_Sha256_RsaOaep_SignAndEncrypt",
    "Aes256_Sha256_RsaPss_Sign",
    "Aes256_Sha256_RsaPss_SignAndEncrypt",
]


class OpcUaUser(_Section):
    """One OPC UA login. reader: browse, read, subscribe; operator: also write (where a tag
    allows it)."""

    name: str = Field(min_length=1, description="The username a client logs in with.")
    password_hash: str = Field(
        min_length=1, description="scrypt hash from `retrofit-gw passwd`, never the password."
    )
    role: Literal["reader", "operator"] = "reader"


class OpcUaSection(_Section):
    """Serve every tag as an OPC UA variable. Absent: no OPC UA server."""

    host: str = Field(
        default="127.0.0.1",
        description="Address to listen on. 0.0.0.0 exposes the server to the network.",
    )
    port: int = Field(default=4840, ge=1, le=65535)
    namespace_uri: str | None = Field(
        default=None, description="Default: urn:retrofit-gateway:<gateway name>."
    )
    application_uri: str | None = Field(
        default=None, description="Default: urn:retrofit-gateway:<hostname>:<gateway name>."
    )
    security: list[OpcUaSecurity] = Field(
        default=list(get_args(OpcUaSecurity)),
        min_length=1,
        description="Endpoints offered: <policy>_<mode>; default all six.",
    )
    allow_none: bool = Field(
        default=False, description="Also offer the unencrypted None endpoint (demo only)."
    )
    trust: Literal["list", "any"] = Field(
        default="list",
        description="list: only client certificates in <data_dir>/pki/trusted/ connect (refused "
        "ones land in pki/rejected/, see `retrofit-gw certs`); any: every client certificate "
        "(a warning is logged at every start).",
    )
    users: list[OpcUaUser] = Field(
        default=[], description="Username/password logins; hashes from `retrofit-gw passwd`."
    )
    anonymous: bool | None = Field(
        default=None,
        description="Anonymous login. Default: on when no users are configured, else off.",
    )

    @property
    def anonymous_allowed(self) -> bool:
        return self.anonymous if self.anonymous is not None else not self.users


class WebToken(_Section):
    """A bearer token for an API client (``Authorization: Bearer <token>``)."""

    name: str = Field(min_length=1, description="Who uses it; shown in the log.")
    token_hash: str = Field(
        min_length=1,
        description="scrypt hash of the token from `retrofit-gw passwd`, never the token.",
    )


class WebSection(_Section):
    """The local status page and JSON API. Absent: no web server."""

    host: str = Field(
        default="127.0.0.1",
        description="Address to listen on. Anything but loopback needs password_hash: "
        "without one the page listens on 127.0.0.1 only, and says so at every start.",
    )
    port: int = Field(default=8080, ge=1, le=65535)
    password_hash: str | None = Field(
        default=None,
        description="scrypt hash from `retrofit-gw passwd`, never the password. Set: every "
        "page and API but /healthz needs a login, on any host.",
    )
    tokens: list[WebToken] = Field(
        default=[], description="Bearer tokens for API clients (hashes only)."
    )
    session_hours: float = Field(
        default=12, gt=0, le=24 * 90, description="A login lasts this long."
    )


class GatewayConfig(_Section):
    """The whole gateway config file.

    ``devices`` is typed with the built-in drivers' models. When driver plugins are
    installed, configs are validated by ``config_model()``, a subclass whose ``devices`` also
    admits the plugins' models (``drivers.plugins.PluginDevice`` subclasses, which have the
    keys every device shares: ``driver``, ``name``, ``machine``, ``enabled``, ``timeout``,
    ``connect_timeout``, ``interval`` and ``tags`` with a ``name`` each).
    """

    version: Literal[1] = 1
    gateway: GatewaySection
    bus: BusSection = BusSection()
    breaker: BreakerSection = BreakerSection()
    mqtt: MqttSection | None = None
    sparkplug: SparkplugSection | None = None
    opcua: OpcUaSection | None = None
    web: WebSection | None = None
    devices: list[DeviceConfig] = Field(min_length=1)


@dataclass(frozen=True)
class LoadedConfig:
    path: Path
    config: GatewayConfig


@functools.cache
def config_model() -> type[GatewayConfig]:
    """The model that validates config files on this installation: ``GatewayConfig`` itself,
    or, with driver plugins installed, a subclass whose device union includes them."""
    plugins = installed_plugins().loaded
    if not plugins:
        return GatewayConfig
    members = (*_BUILTIN_DRIVERS.values(), *(p.model for p in plugins.values()))
    # Built at run time, so neither `|` (it needs two operands) nor a static annotation.
    union: Any = Annotated[Union[members], Field(discriminator="driver")]  # noqa: UP007
    devices_field: Any = (list[union], Field(min_length=1))
    model = create_model(
        _PLUGIN_CONFIG,
        __base__=GatewayConfig,
        __module__=__name__,
        __doc__=GatewayConfig.__doc__,
        devices=devices_field,
    )
    # Findable by name, as pickle needs (gateway.service keeps the running config pickled).
    setattr(sys.modules[__name__], _PLUGIN_CONFIG, model)
    return model


#: The name of ``config_model()``'s subclass, a module attribute once it is made.
_PLUGIN_CONFIG = "PluginGatewayConfig"


def json_schema() -> dict[str, Any]:
    """JSON Schema of the config file, for editors (YAML language server) and docs; it
    includes the installed driver plugins."""
    schema = config_model().model_json_schema()
    schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    schema["title"] = "retrofit-gateway config"
    return schema


def format_issues(err: ConfigError) -> str:
    """All issues, one per line, and a count, ready to print for the user."""
    count = len(err.issues)
    noun = "problem" if count == 1 else "problems"
    return "\n".join([*(str(i) for i in err.issues), f"{count} {noun} in the config"])


def load_config(path: str | Path) -> LoadedConfig:
    """Read, validate and cross-check a config file. Raises ``ConfigError`` with every issue."""
    path = Path(path)
    file = str(path)
    try:
        text = path.read_text(encoding="utf-8-sig")
    except OSError as exc:
        reason = exc.strerror or str(exc)
        raise ConfigError(
            [ConfigIssue(file, None, "", f"cannot read the file: {reason}")]
        ) from None
    except UnicodeDecodeError as exc:
        raise ConfigError(
            [ConfigIssue(file, None, "", f"the file is not UTF-8 text ({exc.reason})")]
        ) from None

    loader = _Loader(file)
    root = loader.compose(text)
    if root is None:
        raise ConfigError(
            [ConfigIssue(file, 1, "", "the file is empty; it needs `gateway:` and `devices:`")]
        )
    data = loader.build(root, ())
    if not isinstance(data, dict):
        raise ConfigError(
            [
                ConfigIssue(
                    file,
                    loader.where.get((), (file, 1))[1],
                    "",
                    f"the top level must be a mapping with `gateway:` and `devices:` "
                    f"(got {_show(data)})",
                )
            ]
        )
    csv_failed = loader.merge_csv_tags(data, path.parent)
    # After the CSV rows, so that a CSV row overrides a profile tag like a YAML tag does.
    # A device whose profile could not be used lacks what the profile would have given it:
    # report the profile, not each missing key.
    profile_failed = loader.merge_profiles(data, path.parent)
    loader.refused_plugins(data)

    try:
        config = config_model().model_validate(data)
    except ValidationError as exc:
        loader.issues.extend(_validation_issues(exc, data, loader, profile_failed))
    else:
        # Cross-checks need a typed config, so they only run once the shapes are right.
        loader.issues.extend(_cross_check(config, loader, csv_failed | profile_failed))
        if not loader.issues:
            return LoadedConfig(path=path, config=config)
    raise ConfigError(_ordered(loader.issues, file))


# --- YAML -> data with a source map -----------------------------------------------------------

_MERGE_TAG = "tag:yaml.org,2002:merge"
_INT_TAG = "tag:yaml.org,2002:int"
# YAML 1.1 (PyYAML) reads a plain 0-prefixed number as octal: 012345 becomes 5349.
_OCTAL = re.compile(r"[-+]?0[0-7_]+")


class _Loader:
    """Builds plain data from YAML nodes while recording where every key came from."""

    def __init__(self, file: str) -> None:
        self.file = file
        self.where: SourceMap = {}
        self.issues: list[ConfigIssue] = []
        self._yaml: yaml.SafeLoader | None = None
        # ids of the nodes on the current path: an alias to an ancestor would recurse forever.
        self._active: set[int] = set()

    def issue(self, where: tuple[str, int | None], loc: Loc, message: str) -> None:
        self.issues.append(ConfigIssue(where[0], where[1], _render_loc(loc), message))

    def locate(self, loc: Loc) -> tuple[str, int | None]:
        """The nearest known location at or above ``loc`` (defaults have no line of their own)."""
        for n in range(len(loc), -1, -1):
            hit = self.where.get(loc[:n])
            if hit is not None:
                return hit
        return (self.file, None)

    def describe(self, loc: Loc, from_file: str) -> str:
        """``line 12`` in the same file, ``lathe3.csv:7`` in another: for "first at ..." hints."""
        file, line = self.locate(loc)
        if file == from_file:
            return f"line {line}"
        return f"{file}:{line}"

    def refused_plugins(self, data: dict[str, Any]) -> None:
        """A device whose ``driver:`` names a refused driver plugin gets the plugin's reason
        (validation would only say that the driver is unknown)."""
        refused = installed_plugins().refused
        devices = data.get("devices")
        if not refused or not isinstance(devices, list):
            return
        for i, device in enumerate(devices):
            driver = device.get("driver") if isinstance(device, dict) else None
            if not isinstance(driver, str) or driver not in refused:
                continue
            loc: Loc = ("devices", i, "driver")
            plugin = refused[driver]
            if driver in _BUILTIN_DRIVERS:
                message = (
                    f"driver '{driver}' is built in, and the plugin entry point {plugin.origin} "
                    f"claims the same name, so which one is meant is unclear; uninstall the "
                    f"plugin or have its entry point renamed"
                )
            else:
                message = f"{plugin}; fix or uninstall the plugin"
            self.issue(self.locate(loc), loc, message)

    def compose(self, text: str) -> Node | None:
        try:
            self._yaml = yaml.SafeLoader(text)
            return self._yaml.get_single_node()
        except yaml.MarkedYAMLError as exc:
            raise ConfigError([_yaml_issue(self.file, exc)]) from None
        except yaml.reader.ReaderError as exc:
            line = text.count("\n", 0, int(exc.position)) + 1
            char = exc.character
            shown = f"U+{char:04X}" if isinstance(char, int) else repr(char)
            message = f"YAML syntax error: {exc.reason} (found {shown})"
            raise ConfigError([ConfigIssue(self.file, line, "", message)]) from None

    def build(self, node: Node, loc: Loc) -> Any:
        if not loc:
            self.where[()] = (self.file, _line(node))
        if id(node) in self._active:
            self.issue(self.locate(loc), loc, "an alias (*name) refers to itself")
            return None
        self._active.add(id(node))
        try:
            if isinstance(node, MappingNode):
                return self._mapping(node, loc)
            if isinstance(node, SequenceNode):
                return self._sequence(node, loc)
            return self._scalar(node, loc)
        finally:
            self._active.discard(id(node))

    def _scalar(self, node: Node, loc: Loc) -> Any:
        assert self._yaml is not None
        try:
            value = self._yaml.construct_object(node, deep=True)
        except yaml.MarkedYAMLError as exc:
            self.issue((self.file, _line(node)), loc, exc.problem or "cannot read this value")
            return None
        if (
            node.tag == _INT_TAG
            and isinstance(node, ScalarNode)
            and not node.style
            and _OCTAL.fullmatch(node.value)
            and value != int(node.value.replace("_", ""), 10)
        ):
            self.issue(
                self.where.get(loc, (self.file, _line(node))),
                loc,
                f"{node.value} has a leading zero, so YAML reads it as the octal number {value}; "
                f'quote it ("{node.value}") to keep the digits as written, or write '
                f"{int(node.value.replace('_', ''), 10)} for the decimal number",
            )
        return value

    def _sequence(self, node: SequenceNode, loc: Loc) -> list[Any]:
        out: list[Any] = []
        for i, item in enumerate(node.value):
            self.where[(*loc, i)] = (self.file, _line(item))
            out.append(self.build(item, (*loc, i)))
        return out

    def _mapping(self, node: MappingNode, loc: Loc) -> dict[str, Any]:
        out: dict[str, Any] = {}
        first: dict[str, int] = {}
        merges: list[Node] = []
        for key_node, value_node in node.value:
            line = _line(key_node)
            if key_node.tag == _MERGE_TAG:
                merges.append(value_node)
                continue
            if not isinstance(key_node, ScalarNode):
                self.issue(
                    (self.file, line), loc, "a key must be plain text, not a list or mapping"
                )
                continue
            key = self._key(key_node)
            if key in first:
                self.issue(
                    (self.file, line), loc, f"duplicate key '{key}' (first at line {first[key]})"
                )
                continue
            first[key] = line
            self.where[(*loc, key)] = (self.file, line)
            out[key] = self.build(value_node, (*loc, key))
        for merge in merges:
            self._merge(merge, loc, out)
        return out

    def _key(self, node: ScalarNode) -> str:
        # Keys are names: `yes:` or `1:` are meant as text, so keep what was written rather
        # than YAML's bool or int.
        assert self._yaml is not None
        try:
            value = self._yaml.construct_object(node, deep=True)
        except yaml.MarkedYAMLError:
            return str(node.value)
        return value if isinstance(value, str) else str(node.value)

    def _merge(self, node: Node, loc: Loc, out: dict[str, Any]) -> None:
        """``<<: *defaults``: keys written in the mapping itself win, then earlier sources."""
        sources = node.value if isinstance(node, SequenceNode) else [node]
        for source in sources:
            if not isinstance(source, MappingNode):
                self.issue(
                    (self.file, _line(source)), loc, "`<<:` needs a mapping or a list of mappings"
                )
                continue
            outer, self.where = self.where, {}
            try:
                merged = self.build(source, loc)
            finally:
                inner, self.where = self.where, outer
            for key, value in merged.items():
                if key in out:
                    continue
                out[key] = value
                prefix = (*loc, key)
                self.where.update(
                    (sub, at) for sub, at in inner.items() if sub[: len(prefix)] == prefix
                )

    # --- tags_csv ---------------------------------------------------------------------------

    def merge_csv_tags(self, data: dict[str, Any], base: Path) -> set[int]:
        """Append each device's ``tags_csv`` rows to its ``tags``. Returns devices whose CSV
        could not be used, so that "no tags" is not reported on top of the real problem."""
        failed: set[int] = set()
        devices = data.get("devices")
        if not isinstance(devices, list):
            return failed
        for i, device in enumerate(devices):
            if not isinstance(device, dict) or not isinstance(device.get("tags_csv"), str):
                continue
            tag_model = _tag_model(device.get("driver"))
            tags = device.setdefault("tags", [])
            if tag_model is None or not isinstance(tags, list):
                continue  # validation reports the unknown driver or the malformed `tags:`
            if not self._merge_csv(("devices", i), base / device["tags_csv"], tag_model, tags):
                failed.add(i)
        return failed

    def _merge_csv(
        self, here: Loc, csv_path: Path, tag_model: type[BaseModel], tags: list[Any]
    ) -> bool:
        csv_file = str(csv_path)
        key_loc = (*here, "tags_csv")
        try:
            text = csv_path.read_text(encoding="utf-8-sig")
        except OSError as exc:
            self.issue(self.locate(key_loc), key_loc, f"cannot read {csv_file}: {exc.strerror}")
            return False
        except UnicodeDecodeError:
            self.issue(
                self.locate(key_loc),
                key_loc,
                f"{csv_file} is not UTF-8 text; save it as 'CSV UTF-8'",
            )
            return False

        rows = list(_csv_rows(text))
        if not rows:
            self.issue((csv_file, 1), key_loc, "the CSV file is empty; it needs a header row")
            return False
        header_line, header = rows[0]
        excluded: frozenset[str] = getattr(tag_model, "CSV_EXCLUDED", frozenset())
        fields = [f for f in tag_model.model_fields if f not in excluded]
        columns: list[str | None] = []  # None: a column we ignore (already reported, or blank)
        for cell in header:
            name = cell.strip().lower()
            if not name:
                columns.append(None)
            elif name not in fields:
                self.issue(
                    (csv_file, header_line),
                    key_loc,
                    f"unknown column '{cell.strip()}' in the CSV header"
                    f"{_did_you_mean(name, fields)} (columns: {', '.join(fields)})",
                )
                columns.append(None)
            elif name in columns:
                self.issue((csv_file, header_line), key_loc, f"column '{name}' appears twice")
                columns.append(None)
            else:
                columns.append(name)
        required = [n for n, f in tag_model.model_fields.items() if f.is_required()]
        if missing := [n for n in required if n not in columns]:
            # One issue for the header instead of one "missing key" per row.
            self.issue(
                (csv_file, header_line),
                key_loc,
                "the CSV header lacks the required column(s): "
                + ", ".join(f"'{n}'" for n in missing),
            )
            return False

        for line, cells in rows[1:]:
            if not any(c.strip() for c in cells):
                continue
            index = len(tags)
            row_loc = (*here, "tags", index)
            self.where[row_loc] = (csv_file, line)
            row: dict[str, Any] = {}
            for n, cell in enumerate(cells):
                text_cell = cell.strip()
                if not text_cell:
                    continue  # empty means "not given", so the model's default applies
                column = columns[n] if n < len(columns) else None
                if column is None:
                    if n >= len(columns) or not header[n].strip():
                        self.issue(
                            (csv_file, line),
                            row_loc,
                            f"cell {n + 1} ({text_cell!r}) has no column name in the header",
                        )
                    continue
                row[column] = _csv_value(tag_model, column, text_cell)
                self.where[(*row_loc, column)] = (csv_file, line)
            tags.append(row)
        return True

    # --- profiles ---------------------------------------------------------------------------

    def merge_profiles(self, data: dict[str, Any], base: Path) -> set[int]:
        """Fill each device that names a ``profile:`` with that profile's keys and tags.

        The device's own keys win; a mapping (``workarounds``) is merged key by key. The
        device's tags are added to the profile's, and one with a profile tag's name takes that
        tag's place. Keys that came from the profile keep the profile file's lines. Returns
        the devices whose profile could not be used.
        """
        failed: set[int] = set()
        devices = data.get("devices")
        if not isinstance(devices, list):
            return failed
        dirs = [base / "profiles", *([d] if (d := builtin_profiles_dir()) else [])]
        cache: dict[Path, tuple[dict[str, Any], SourceMap] | None] = {}
        for i, device in enumerate(devices):
            if not isinstance(device, dict) or "profile" not in device:
                continue
            here: Loc = ("devices", i)
            name = device["profile"]
            driver = device.get("driver")
            model = _drivers().get(driver) if isinstance(driver, str) else None
            if model is None or "profile" not in model.model_fields:
                # Drivers without the field (ascii_serial) still use profiles: the key is only
                # an instruction to this loader.
                device.pop("profile")
            if name is None:
                continue
            if not isinstance(name, str) or not _PROFILE_NAME.fullmatch(name):
                self.issue(
                    self.locate((*here, "profile")),
                    (*here, "profile"),
                    f"a profile is a plain name such as eastron_sdm630 (got {_show(name)})",
                )
                failed.add(i)
                continue
            found = next((d / f"{name}.yaml" for d in dirs if (d / f"{name}.yaml").is_file()), None)
            if found is None:
                available = sorted({p.stem for d in dirs if d.is_dir() for p in d.glob("*.yaml")})
                self.issue(
                    self.locate((*here, "profile")),
                    (*here, "profile"),
                    f"unknown profile '{name}'{_did_you_mean(name, available)} "
                    f"(available: {', '.join(available) or 'none'}; looked in "
                    f"{', '.join(str(d) for d in dirs)})",
                )
                failed.add(i)
                continue
            if found not in cache:
                cache[found] = self._read_profile(found)
            loaded = cache[found]
            if loaded is None or not self._apply_profile(device, here, name, *loaded):
                failed.add(i)
        return failed

    def _read_profile(self, path: Path) -> tuple[dict[str, Any], SourceMap] | None:
        file = str(path)
        try:
            text = path.read_text(encoding="utf-8-sig")
        except (OSError, UnicodeDecodeError) as exc:
            self.issues.append(ConfigIssue(file, None, "", f"cannot read the profile: {exc}"))
            return None
        sub = _Loader(file)
        try:
            root = sub.compose(text)
        except ConfigError as err:
            self.issues.extend(err.issues)
            return None
        data = sub.build(root, ()) if root is not None else None
        self.issues.extend(sub.issues)
        if not isinstance(data, dict):
            self.issues.append(
                ConfigIssue(file, 1, "", "a profile must be a mapping of device keys and `tags:`")
            )
            return None
        for key in _PROFILE_RESERVED & data.keys():
            self.issues.append(
                ConfigIssue(
                    file,
                    sub.where[(key,)][1],
                    key,
                    f"a profile may not set `{key}`; every device gives its own"
                    + ("; list the drivers it fits under `drivers:`" if key == "driver" else ""),
                )
            )
            del data[key]
        return data, sub.where

    def _apply_profile(
        self,
        device: dict[str, Any],
        here: Loc,
        name: str,
        profile: dict[str, Any],
        where: SourceMap,
    ) -> bool:
        drivers = profile.get("drivers")
        driver = device.get("driver")
        # Without a (known) driver, validation names the driver problem itself.
        if isinstance(drivers, list) and driver in _drivers() and driver not in drivers:
            file, line = where[("drivers",)]
            self.issue(
                self.locate((*here, "profile")),
                (*here, "profile"),
                f"profile '{name}' ({file}:{line}) is for driver "
                f"{' or '.join(map(str, drivers))}, not {driver}",
            )
            return False

        def adopt(src: Loc, dst: Loc) -> None:
            """Copy the profile's source map under ``src`` to the device's ``dst``."""
            self.where.update(
                ((*dst, *loc[len(src) :]), at)
                for loc, at in where.items()
                if loc[: len(src)] == src
            )

        def fill(mine: dict[str, Any], theirs: dict[str, Any], src: Loc, dst: Loc) -> None:
            for key, value in theirs.items():
                if key not in mine:
                    mine[key] = copy.deepcopy(value)
                    adopt((*src, key), (*dst, key))
                elif isinstance(mine[key], dict) and isinstance(value, dict):
                    fill(mine[key], value, (*src, key), (*dst, key))

        keys = {k: v for k, v in profile.items() if k not in _PROFILE_META and k != "tags"}
        fill(device, keys, (), here)

        theirs = profile.get("tags")
        if theirs is None:
            return True
        if not isinstance(theirs, list):
            self.issue(where[("tags",)], ("tags",), "a profile's `tags:` must be a list")
            return False
        mine = device.get("tags", [])
        if not isinstance(mine, list):
            return True  # validation reports the device's malformed `tags:`
        by_name: dict[str, int] = {}
        for k, tag in enumerate(mine):
            if isinstance(tag, dict) and isinstance(tag.get("name"), str):
                by_name.setdefault(tag["name"], k)
        # (source list, index) of every tag in its merged position.
        order: list[tuple[bool, int]] = []
        for k, tag in enumerate(theirs):
            name_ = tag.get("name") if isinstance(tag, dict) else None
            hit = by_name.pop(name_, None) if isinstance(name_, str) else None
            order.append((False, hit) if hit is not None else (True, k))
        used = {k for from_profile, k in order if not from_profile}
        order.extend((False, k) for k in range(len(mine)) if k not in used)

        tags_loc: Loc = (*here, "tags")
        old = {loc: at for loc, at in self.where.items() if loc[: len(tags_loc)] == tags_loc}
        for loc in old:
            del self.where[loc]
        self.where[tags_loc] = old.get(tags_loc, where[("tags",)])
        merged: list[Any] = []
        for new, (from_profile, k) in enumerate(order):
            dst = (*tags_loc, new)
            if from_profile:
                merged.append(copy.deepcopy(theirs[k]))
                adopt(("tags", k), dst)
            else:
                merged.append(mine[k])
                src = (*tags_loc, k)
                self.where.update(
                    ((*dst, *loc[len(src) :]), at)
                    for loc, at in old.items()
                    if loc[: len(src)] == src
                )
        device["tags"] = merged
        return True


#: A profile's own description; never part of a device.
_PROFILE_META = frozenset({"description", "source", "drivers"})
#: What only a device can say: who it is, how it talks, and what else it reads.
_PROFILE_RESERVED = frozenset({"name", "machine", "driver", "profile", "tags_csv"})
_PROFILE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")


def builtin_profiles_dir() -> Path | None:
    """The shipped ``config/profiles``: beside the package in a checkout, else in the wheel's
    share dir (as ``gateway.cli`` finds the demo config)."""
    candidates = [
        Path(__file__).resolve().parent.parent / "config" / "profiles",
        Path(sys.prefix) / "share" / "retrofit-gateway" / "config" / "profiles",
    ]
    return next((p for p in candidates if p.is_dir()), None)


def _line(node: Node) -> int:
    return int(node.start_mark.line) + 1


def _yaml_issue(file: str, exc: yaml.MarkedYAMLError) -> ConfigIssue:
    mark = exc.problem_mark or exc.context_mark
    what = exc.problem or exc.context or "invalid YAML"
    if exc.context and exc.problem:
        where = ""
        if exc.context_mark is not None and mark is not None and exc.context_mark.line != mark.line:
            where = f" that starts at line {exc.context_mark.line + 1}"
        if exc.problem.startswith("but "):
            # PyYAML splits one sentence: "expected a single document" + "but found another".
            what = f"{exc.context}, {exc.problem}"
        else:
            what = f"{what} ({exc.context}{where})"
    if "\\t" in what:
        what += "; indent with spaces, not tabs"
    return ConfigIssue(file, mark.line + 1 if mark else None, "", f"YAML syntax error: {what}")


def _csv_rows(text: str) -> Iterator[tuple[int, list[str]]]:
    """Rows with the line they start on; `#` comment lines and blank lines are skipped."""
    lines = [(n, s) for n, s in enumerate(text.splitlines(), 1) if not s.lstrip().startswith("#")]
    header = next((s for _, s in lines if s.strip()), "")
    # Spreadsheets in comma-decimal locales export with ';'.
    delimiter = ";" if ";" in header and "," not in header else ","
    consumed: list[int] = []

    def feed() -> Iterator[str]:
        for n, s in lines:
            consumed.append(n)
            yield s

    reader = csv.reader(feed(), delimiter=delimiter)
    mark = 0
    for cells in reader:
        start = consumed[mark]
        mark = len(consumed)
        yield start, cells


def _csv_value(model: type[BaseModel], column: str, text: str) -> Any:
    """Numbers for numeric columns; a column that takes text or a number (``address``) keeps
    leading-zero text such as the modicon coil reference ``012345`` as text."""
    kinds = _leaf_types(model.model_fields[column].annotation)
    if not kinds & {int, float}:
        return text
    if str in kinds and len(text) > 1 and text.startswith("0") and text.isdigit():
        return text
    for convert in (int, float):
        try:
            return convert(text)
        except ValueError:
            pass
    return text


def _leaf_types(annotation: Any) -> set[Any]:
    origin = get_origin(annotation)
    if origin is Annotated:
        return _leaf_types(get_args(annotation)[0])
    if origin in (Union, types.UnionType):
        return set().union(*(_leaf_types(a) for a in get_args(annotation)))
    return {annotation}


# --- pydantic errors -> issues ----------------------------------------------------------------


def _driver_models() -> dict[str, type[BaseModel]]:
    inner = get_args(DeviceConfig)[0]
    members = get_args(inner) if get_origin(inner) in (Union, types.UnionType) else (inner,)
    return {get_args(m.model_fields["driver"].annotation)[0]: m for m in members}


_BUILTIN_DRIVERS = _driver_models()


@functools.cache
def _drivers() -> dict[str, type[BaseModel]]:
    """Every driver's config model by ``driver:`` value: the built-in ones, then plugins."""
    plugins = installed_plugins().loaded
    return {**_BUILTIN_DRIVERS, **{name: p.model for name, p in plugins.items()}}


def _tag_model(driver: Any) -> type[BaseModel] | None:
    model = _drivers().get(driver) if isinstance(driver, str) else None
    if model is None:
        return None
    return _model_at(get_args(model.model_fields["tags"].annotation)[0], ())


def _model_at(start: Any, loc: Loc) -> type[BaseModel] | None:
    """The model class that validates the data at pydantic's ``loc`` (union tags included)."""
    drivers = _drivers()
    tp = start
    for seg in loc:
        tp = _unwrap(tp)
        if isinstance(tp, type) and issubclass(tp, BaseModel):
            if isinstance(seg, str) and seg in tp.model_fields:
                tp = tp.model_fields[seg].annotation
            elif seg not in drivers or drivers[seg] is not tp:
                return None
        elif get_origin(tp) in (list, Sequence) and isinstance(seg, int):
            tp = get_args(tp)[0]
        elif get_origin(tp) in (Union, types.UnionType) and seg in drivers:
            tp = drivers[seg]
        else:
            return None
    tp = _unwrap(tp)
    return tp if isinstance(tp, type) and issubclass(tp, BaseModel) else None


def _unwrap(tp: Any) -> Any:
    while True:
        if get_origin(tp) is Annotated:
            tp = get_args(tp)[0]
        elif get_origin(tp) in (Union, types.UnionType):
            args = [a for a in get_args(tp) if a is not type(None)]
            if len(args) != 1:
                return tp
            tp = args[0]
        else:
            return tp


def _clean_loc(raw: tuple[str | int, ...], data: Any, missing: bool) -> tuple[Loc, str | None]:
    """Map pydantic's loc onto the data: drop the ``driver`` union tag, and cut off the member
    label of a plain union (``address``'s ``int``/``str``), returning that label."""
    out: list[str | int] = []
    cur = data
    drivers = _drivers()
    for n, seg in enumerate(raw):
        if (
            len(out) == 2
            and out[0] == "devices"
            and isinstance(cur, dict)
            and seg in drivers
            and cur.get("driver") == seg
        ):
            continue
        in_dict = isinstance(cur, dict) and seg in cur
        if in_dict or (isinstance(cur, list) and isinstance(seg, int) and 0 <= seg < len(cur)):
            cur = cur[seg]
        elif not (missing and n == len(raw) - 1):
            return tuple(out), str(seg)
        out.append(seg)
    return tuple(out), None


_LABELS = {"int": "a whole number", "float": "a number", "str": "text", "bool": "true or false"}


def _validation_issues(
    exc: ValidationError, data: Any, loader: _Loader, failed: set[int] | None = None
) -> list[ConfigIssue]:
    """Issues for pydantic's errors; ``failed`` devices (whose profile could not be used,
    already reported) get no "missing required key" on top."""
    failed = failed or set()
    issues: list[ConfigIssue] = []
    # Errors of the members of one plain union (int | str) become one issue.
    unions: dict[Loc, tuple[list[str], Any]] = {}
    refused = installed_plugins().refused
    for err in exc.errors(include_url=False):
        kind = err["type"]
        if kind == "union_tag_invalid" and str(err.get("ctx", {}).get("tag")) in refused:
            continue  # reported with the plugin's reason by _Loader.refused_plugins
        loc, label = _clean_loc(err["loc"], data, kind == "missing")
        if kind == "missing" and len(loc) == 3 and loc[0] == "devices" and loc[1] in failed:
            continue
        if label is not None:
            unions.setdefault(loc, ([], err["input"]))[0].append(label)
            continue
        issues.append(_one_issue(err, loc, loader))
    for loc, (labels, given) in unions.items():
        wanted = " or ".join(_LABELS.get(x, x) for x in dict.fromkeys(labels))
        loader_where = loader.locate(loc)
        issues.append(
            ConfigIssue(*loader_where, _render_loc(loc), f"expected {wanted} (got {_show(given)})")
        )
    return issues


def _one_issue(err: ErrorDetails, loc: Loc, loader: _Loader) -> ConfigIssue:
    kind = err["type"]
    given = err["input"]
    ctx = err.get("ctx", {})
    if kind in ("missing", "extra_forbidden"):
        parent, key = loc[:-1], str(loc[-1])
        if kind == "missing":
            hint = _choices_hint(_model_at(config_model(), err["loc"][:-1]), key)
            return _at(loader, loc, parent, f"missing required key '{key}'{hint}")
        model = _model_at(config_model(), err["loc"][:-1])
        known = list(model.model_fields) if model else []
        return _at(loader, loc, parent, f"unknown key '{key}'{_did_you_mean(key, known)}")
    if kind == "union_tag_not_found":
        names = ", ".join(_drivers())
        return _at(loader, loc, loc, f"missing required key 'driver' (one of: {names})")
    if kind == "union_tag_invalid":
        tag = str(ctx.get("tag", ""))
        drivers = list(_drivers())
        message = f"driver '{tag}' is not one of: {', '.join(drivers)}"
        return _at(
            loader, (*loc, "driver"), (*loc, "driver"), message + _did_you_mean(tag, drivers)
        )
    if kind in ("enum", "literal_error"):
        choices = re.findall(r"'([^']*)'", str(ctx.get("expected", "")))
        hint = _did_you_mean(str(given), choices) if isinstance(given, str) else ""
        return _at(loader, loc, loc, f"{err['msg']} (got {_show(given)}){hint}")
    if kind in ("model_type", "model_attributes_type", "dict_type"):
        return _at(loader, loc, loc, f"expected a mapping of `key: value` (got {_show(given)})")
    if kind == "too_short" and loc == ("devices",):
        return _at(loader, loc, loc, "at least one device is needed (got an empty list)")
    return _at(loader, loc, loc, f"{err['msg']} (got {_show(given)})")


def _at(loader: _Loader, where: Loc, key: Loc, message: str) -> ConfigIssue:
    file, line = loader.locate(where)
    return ConfigIssue(file, line, _render_loc(key), message)


def _choices_hint(model: type[BaseModel] | None, key: str) -> str:
    """``(one of: zero_based, one_based, modicon)`` for a missing key that takes a fixed set."""
    if model is None or key not in model.model_fields:
        return ""
    tp = _unwrap(model.model_fields[key].annotation)
    if get_origin(tp) is Literal:
        values = [str(v) for v in get_args(tp)]
    elif isinstance(tp, type) and issubclass(tp, str) and hasattr(tp, "__members__"):
        values = [str(m.value) for m in tp.__members__.values()]
    else:
        return ""
    return f" (one of: {', '.join(values)})"


def _did_you_mean(word: str, choices: list[str]) -> str:
    # Every choice with the best score: 'floatt' is as close to float32 as to float64, and
    # naming only one would be a guess.
    scored = [(difflib.SequenceMatcher(None, word.lower(), c.lower()).ratio(), c) for c in choices]
    best = max((score for score, _ in scored), default=0.0)
    if best < 0.6:
        return ""
    close = [f"'{c}'" for score, c in scored if score == best][:3]
    return f"; did you mean {' or '.join(close)}?"


def _show(value: Any) -> str:
    """A value as the user wrote it, in YAML terms."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, dict):
        return "a mapping"
    if isinstance(value, list):
        return "a list"
    return repr(value)


def _render_loc(loc: Loc) -> str:
    """``("devices", 0, "tags", 3, "type")`` -> ``devices[0].tags[3].type``."""
    out = ""
    for seg in loc:
        out += f"[{seg}]" if isinstance(seg, int) else (f".{seg}" if out else str(seg))
    return out


# --- cross-checks on a validated config -------------------------------------------------------

_FORBIDDEN = {"+": "MQTT wildcard", "#": "MQTT wildcard", "/": "MQTT topic separator"}


def _name_problem(what: str, value: str) -> str | None:
    """Names become MQTT topic levels and OPC UA browse names."""
    for char, why in _FORBIDDEN.items():
        if char in value:
            return f"{what} {value!r} may not contain '{char}' ({why})"
    if any(unicodedata.category(c) == "Cc" for c in value):
        return f"{what} {value!r} may not contain control characters"
    if value.startswith("$"):
        return f"{what} {value!r} may not start with '$' (reserved for MQTT system topics)"
    return None


def _sparkplug_id_problem(field: str, value: str) -> str | None:
    """Sparkplug 3.0 §4.1: ids are topic levels, so no ``+ / #``
    (tck-id-topic-structure-namespace-valid-group-id and its siblings)."""
    bad = " or ".join(f"'{c}'" for c in "+/#" if c in value)
    if bad:
        return f"{field} {value!r} may not contain {bad} (a Sparkplug id is one topic level)"
    if field == "group_id" and value == "STATE":
        return "group_id 'STATE' is taken: spBv1.0/STATE/<host> is the host applications' topic"
    return None


def _opcua_logins(opcua: OpcUaSection, loader: _Loader) -> list[ConfigIssue]:
    issues: list[ConfigIssue] = []
    names: dict[str, int] = {}
    for i, user in enumerate(opcua.users):
        here: Loc = ("opcua", "users", i)
        try:
            parse_hash(user.password_hash)
        except PasswordHashError as exc:
            # The message never repeats the value: it may be a password pasted by mistake.
            issues.append(_at(loader, (*here, "password_hash"), (*here, "password_hash"), str(exc)))
        if user.name in names:
            first = loader.describe(
                ("opcua", "users", names[user.name], "name"), loader.locate((*here, "name"))[0]
            )
            message = f"user '{user.name}' is already defined (first at {first})"
            issues.append(_at(loader, (*here, "name"), (*here, "name"), message))
        else:
            names[user.name] = i
    if opcua.anonymous is False and not opcua.users:
        issues.append(
            _at(
                loader,
                ("opcua", "anonymous"),
                ("opcua", "anonymous"),
                "anonymous: false and no users: nobody could log in; add users (hashes from "
                "`retrofit-gw passwd`) or set anonymous: true",
            )
        )
    return issues


def _web_logins(web: WebSection, loader: _Loader) -> list[ConfigIssue]:
    issues: list[ConfigIssue] = []
    hashes: list[tuple[Loc, str]] = []
    if web.password_hash is not None:
        hashes.append((("web", "password_hash"), web.password_hash))
    names: dict[str, int] = {}
    for i, token in enumerate(web.tokens):
        here: Loc = ("web", "tokens", i)
        hashes.append(((*here, "token_hash"), token.token_hash))
        if token.name in names:
            message = f"token '{token.name}' is already defined (tokens[{names[token.name]}])"
            issues.append(_at(loader, (*here, "name"), (*here, "name"), message))
        else:
            names[token.name] = i
    for loc, hashed in hashes:
        try:
            parse_hash(hashed)
        except PasswordHashError as exc:
            # The message never repeats the value: it may be a password pasted by mistake.
            issues.append(_at(loader, loc, loc, str(exc)))
    return issues


def _cross_check(config: GatewayConfig, loader: _Loader, csv_failed: set[int]) -> list[ConfigIssue]:
    issues: list[ConfigIssue] = []

    def add(loc: Loc, message: str) -> None:
        issues.append(_at(loader, loc, loc, message))

    def first_at(first: Loc, here: Loc) -> str:
        return loader.describe(first, loader.locate(here)[0])

    gw = config.gateway
    for field in ("name", "site", "area", "line"):
        if problem := _name_problem(f"gateway {field}", getattr(gw, field)):
            add(("gateway", field), problem)

    if config.mqtt is not None:
        for part in config.mqtt.topic_prefix.split("/"):
            if problem := _name_problem("topic_prefix level", part):
                add(("mqtt", "topic_prefix"), problem)
    for name in ("mqtt", "sparkplug"):
        broker: BrokerSection | None = getattr(config, name)
        if broker is None:
            continue
        if broker.password_env and broker.password_file:
            add(
                (name, "password_file"),
                "give the password in password_env or password_file, not both",
            )
        if (broker.password_env or broker.password_file) and not broker.username:
            add((name, "username"), "a password needs a username")
    if config.sparkplug is not None:
        sp = config.sparkplug
        for field in ("group_id", "edge_node_id", "primary_host_id"):
            value = getattr(sp, field)
            if value is not None and (problem := _sparkplug_id_problem(field, value)):
                add(("sparkplug", field), problem)
        if config.mqtt is not None and (sp.host, sp.port) == (config.mqtt.host, config.mqtt.port):
            uns_id = config.mqtt.client_id or gw.name
            if (sp.client_id or f"{gw.name}-sparkplug") == uns_id:
                add(
                    ("sparkplug", "client_id"),
                    f"client_id '{uns_id}' is the mqtt: section's too, on the same broker: "
                    "each connection would end the other's; give sparkplug: its own",
                )
    if config.opcua is not None:
        issues.extend(_opcua_logins(config.opcua, loader))
    if config.web is not None:
        issues.extend(_web_logins(config.web, loader))
    servers: dict[tuple[str, int], Loc] = {}
    for section in ("opcua", "web"):
        sec = getattr(config, section)
        if sec is None:
            continue
        if (sec.host, sec.port) in servers:
            add(
                (section, "port"),
                f"{sec.host}:{sec.port} is already used by {servers[(sec.host, sec.port)][0]}",
            )
        servers[(sec.host, sec.port)] = (section, "port")

    device_names: dict[str, Loc] = {}
    tag_keys: dict[str, Loc] = {}
    endpoints: dict[tuple[str, int, int], tuple[Loc, str]] = {}
    for i, device in enumerate(config.devices):
        here: Loc = ("devices", i)
        for field, what in (("name", "device name"), ("machine", "machine name")):
            if problem := _name_problem(what, getattr(device, field)):
                add((*here, field), problem)
        if device.name in device_names:
            first = device_names[device.name]
            add(
                (*here, "name"),
                f"device name '{device.name}' is already used "
                f"(first at {first_at((*first, 'name'), (*here, 'name'))})",
            )
        else:
            device_names[device.name] = here

        # Serial lines (and RTU behind a device server) are checked by check_serial_buses.
        if device.enabled and isinstance(device, ModbusTcpDevice):
            endpoint = (device.host.lower(), device.port, device.unit_id)
            if endpoint in endpoints:
                first, other = endpoints[endpoint]
                add(
                    (*here, "unit_id"),
                    f"device '{device.name}' polls {device.host}:{device.port} unit_id "
                    f"{device.unit_id}, like device '{other}' "
                    f"(at {first_at(first, (*here, 'unit_id'))}); give each its own unit_id "
                    f"or disable one",
                )
            else:
                endpoints[endpoint] = (here, device.name)

        # Strictly shorter: a timeout as long as the interval means a silent device overruns
        # every single slot.
        if device.timeout >= device.interval:
            add(
                (*here, "timeout"),
                f"timeout {device.timeout:g} s must be shorter than the poll interval "
                f"{device.interval:g} s; a silent device would hold up every poll",
            )
        if not device.tags and i not in csv_failed:
            add(
                (*here, "tags"),
                f"device '{device.name}' has no tags; list them under `tags:` "
                f"or name a CSV file in `tags_csv:`",
            )
        tags: Sequence[ModbusTag | AsciiTag] = device.tags
        for k, tag in enumerate(tags):
            tag_loc: Loc = (*here, "tags", k)
            if problem := _name_problem("tag name", tag.name):
                add((*tag_loc, "name"), problem)
            key = f"{device.machine}/{tag.name}"
            if key in tag_keys:
                add(
                    (*tag_loc, "name"),
                    f"tag '{key}' is already defined "
                    f"(first at {first_at((*tag_keys[key], 'name'), (*tag_loc, 'name'))}); "
                    f"tag names must be unique per machine",
                )
            else:
                tag_keys[key] = tag_loc
            interval = getattr(tag, "interval", None)  # ASCII tags share the device's
            if interval is not None and device.timeout >= interval:
                add(
                    (*tag_loc, "interval"),
                    f"interval {interval:g} s must be longer than the device timeout "
                    f"{device.timeout:g} s; raise it or lower the device's `timeout:`",
                )
        # Each driver adds its own checks here, keyed by its model type.
        if isinstance(device, ModbusTcpDevice | ModbusRtuDevice | ModbusRtuOverTcpDevice):
            for loc, message in check_device(device):
                add((*here, *loc), message)
        elif isinstance(device, AsciiSerialDevice):
            for loc, message in check_ascii_device(device):
                add((*here, *loc), message)
        else:
            for loc, message in _plugin_check(device):
                add((*here, *loc), message)
    for i, loc, message in check_serial_buses(config.devices):
        add(("devices", i, *loc), message)
    return issues


def _plugin_check(device: Any) -> list[tuple[Loc, str]]:
    """A driver plugin's own cross-checks of one device; a check that crashes is reported as
    the plugin's fault rather than ending ``check`` in a traceback."""
    plugin = installed_plugins().loaded.get(device.driver)
    if plugin is None or plugin.check is None:
        return []
    try:
        return [(tuple(loc), str(message)) for loc, message in plugin.check(device)]
    except Exception as exc:
        return [
            (
                ("driver",),
                f"the cross-check of driver plugin '{plugin.name}' failed: "
                f"{type(exc).__name__}: {exc}",
            )
        ]


def _ordered(issues: list[ConfigIssue], main_file: str) -> list[ConfigIssue]:
    """File order: the config file first, then CSV files; duplicates (merged anchors) once."""
    unique = list(dict.fromkeys(issues))
    return sorted(unique, key=lambda i: (i.file != main_file, i.file, i.line or 0))

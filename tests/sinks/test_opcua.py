"""The OPC UA sink against a real asyncua client and a gateway polling a simulated device."""

from __future__ import annotations

import asyncio
import logging
import socket
import stat
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from asyncua import Client, ua
from asyncua.crypto.cert_gen import generate_private_key, generate_self_signed_app_certificate
from asyncua.crypto.security_policies import SecurityPolicyBasic256Sha256
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.x509.oid import ExtendedKeyUsageOID

from drivers.modbus.config import Table
from drivers.modbus.simulator import RegisterMapDevice
from drivers.modbus.transport import RegisterServer
from gateway.app import Gateway
from gateway.bus import Subscription
from gateway.config import GatewayConfig, LoadedConfig
from gateway.errors import GatewayError
from gateway.model import Quality, Reading, Reason
from gateway.sinks.opcua import (
    UNITS_NAMESPACE,
    OpcUaSink,
    _Builder,
    count_sessions,
    eu_information,
    status_code,
    unit_id,
    variant_type,
)
from tests.conftest import free_port

SC = ua.StatusCodes
VT = ua.VariantType


class Machine(RegisterMapDevice):
    """Static values of every type, plus holding 0 that counts reads (a new value each poll)."""

    def __init__(self) -> None:
        super().__init__(unit_id=1)
        self.serve(Table.HOLDING, 0, 32)
        self.serve(Table.COIL, 0, 1)
        self.put(1, "uint16", 1200)
        self.put(2, "int16", 215)
        self.put(3, "uint16", 50)
        self.put(4, "uint16", 7)
        self.put(5, "int32", -70000)
        self.put(7, "uint32", 3_000_000_000)
        self.put(9, "int64", -(2**40))
        self.put(13, "uint64", 2**63 + 5)
        self.put(17, "float32", 32.5)
        self.put(19, "float64", 1.0 / 3.0)
        self.put(23, "bcd16", 101)
        self.put(24, "bcd32", 12345678)
        self.put(26, "string", "LT-200", count=4)
        self.put(30, "uint16", 0b10)
        self.put(31, "uint16", 1)
        self.set(Table.COIL, 0, [True])

    def tick(self, now: float) -> None:
        self.set(Table.HOLDING, 0, [self.reads & 0xFFFF])


#: (name, tag config, expected DataType)
TAGS: list[tuple[str, dict[str, Any], Any]] = [
    ("count", {"address": 0, "type": "uint16", "description": "Reads so far"}, VT.UInt16),
    (
        "speed",
        {"address": 1, "type": "uint16", "unit": "rpm", "min": 0, "max": 4000},
        VT.UInt16,
    ),
    (
        "temp",
        {"address": 2, "type": "int16", "scale": 0.1, "unit": "°C", "min": 5, "max": 40},
        VT.Double,
    ),
    ("load", {"address": 3, "type": "uint16", "unit": "%"}, VT.UInt16),
    ("odd", {"address": 4, "type": "uint16", "unit": "furlongs"}, VT.UInt16),
    ("position", {"address": 5, "type": "int32"}, VT.Int32),
    ("total", {"address": 7, "type": "uint32"}, VT.UInt32),
    ("big", {"address": 9, "type": "int64"}, VT.Int64),
    ("ubig", {"address": 13, "type": "uint64"}, VT.UInt64),
    (
        "pressure",
        {"address": 17, "type": "float32", "unit": "bar", "min": 25, "max": 45},
        VT.Float,
    ),
    ("precise", {"address": 19, "type": "float64"}, VT.Double),
    ("tool", {"address": 23, "type": "bcd16"}, VT.UInt16),
    ("bcdbig", {"address": 24, "type": "bcd32"}, VT.UInt32),
    ("model", {"address": 26, "type": "string", "count": 4}, VT.String),
    ("spindle_on", {"address": 30, "type": "bit", "bit": 1}, VT.Boolean),
    ("door", {"address": 0, "type": "bool", "table": "coil"}, VT.Boolean),
    ("offset_only", {"address": 3, "type": "uint16", "offset": 1}, VT.Double),
    # Same name as a device diagnostic variable: the diagnostic gives way.
    ("online", {"address": 31, "type": "uint16"}, VT.UInt16),
]


def make_config(
    tmp_path: Path,
    opcua_port: int,
    devices: dict[str, int],
    *,
    allow_none: bool = True,
    security: list[str] | None = None,
    interval: float = 0.1,
) -> LoadedConfig:
    """One device per entry of ``devices`` (machine name -> Modbus port), each with TAGS."""
    tags = [{"name": name, "table": "holding", **cfg} for name, cfg, _ in TAGS]
    opcua: dict[str, Any] = {"host": "127.0.0.1", "port": opcua_port, "allow_none": allow_none}
    if security is not None:
        opcua["security"] = security
    cfg = GatewayConfig.model_validate(
        {
            "gateway": {"name": "gw-test", "site": "plant", "area": "a", "line": "l"},
            "opcua": opcua,
            "devices": [
                {
                    "name": f"{machine}-plc",
                    "driver": "modbus_tcp",
                    "machine": machine,
                    "host": "127.0.0.1",
                    "port": port,
                    "interval": interval,
                    "timeout": 0.08,
                    "connect_timeout": 0.08,
                    "addressing": "zero_based",
                    "tags": tags,
                }
                for machine, port in devices.items()
            ],
        }
    )
    return LoadedConfig(tmp_path / "gateway.yaml", cfg)


class Recorder:
    """Every reading the bus delivers, per tag, in order."""

    def __init__(self) -> None:
        self.readings: dict[str, list[tuple[Any, float, Quality]]] = {}

    async def __call__(self, sub: Subscription) -> None:
        async for batch in sub:
            for r in batch:
                self.readings.setdefault(r.key, []).append((r.value, r.source_ts, r.quality))


async def wait_for(done: Callable[[], object], within: float = 5.0) -> None:
    deadline = time.monotonic() + within
    while not done():
        assert time.monotonic() < deadline, f"condition not met within {within} s"
        await asyncio.sleep(0.02)


@asynccontextmanager
async def running(
    loaded: LoadedConfig, recorder: Recorder | None = None
) -> AsyncIterator[tuple[Gateway, OpcUaSink]]:
    gw = Gateway(loaded)
    assert loaded.config.opcua is not None
    sink = OpcUaSink(gw, loaded.config.opcua)
    stop = asyncio.Event()
    sinks: list[Any] = [sink]
    if recorder is not None:
        sinks.append(("rec", recorder))
    task = asyncio.create_task(gw.run(stop, sinks=sinks), name="gateway")
    try:
        await wait_for(lambda: sink.health["started_in_s"] is not None or task.done(), 30)
        if task.done():
            task.result()
        yield gw, sink
    finally:
        stop.set()
        await asyncio.wait_for(task, 10)


def nid(sink: OpcUaSink, ident: str) -> ua.NodeId:
    return ua.NodeId(ident, sink.namespace_index)


async def read(client: Client, sink: OpcUaSink, ident: str) -> ua.DataValue:
    return await client.get_node(nid(sink, ident)).read_data_value(raise_on_bad_status=False)


def to_ts(value: datetime) -> float:
    return value.replace(tzinfo=value.tzinfo or UTC).timestamp()


# --- pure functions ----------------------------------------------------------------------


def test_unit_id_follows_part_8() -> None:
    assert unit_id("CEL") == 4408652
    assert unit_id("MMT") == 5066068
    assert unit_id("P1") == (ord("P") << 8) | ord("1")
    assert unit_id("2X") == 0x3258


def test_eu_information_known_and_unknown() -> None:
    rpm = eu_information("rpm", "urn:ns")
    assert (rpm.NamespaceUri, rpm.UnitId, rpm.DisplayName.Text) == (
        UNITS_NAMESPACE,
        unit_id("RPM"),
        "r/min",
    )
    assert eu_information("degC", "urn:ns").UnitId == unit_id("CEL")
    assert eu_information("mm/min", "urn:ns").UnitId == unit_id("H81")
    odd = eu_information("furlongs", "urn:ns")
    assert (odd.NamespaceUri, odd.UnitId, odd.DisplayName.Text) == ("urn:ns", -1, "furlongs")


def test_status_code_table() -> None:
    def code(q: Quality, r: Reason, has_value: bool) -> int:
        return int(status_code(q, r, has_value).value)

    assert code(Quality.GOOD, Reason.NONE, True) == SC.Good
    assert code(Quality.BAD, Reason.WAITING, False) == SC.BadWaitingForInitialData
    assert code(Quality.BAD, Reason.NO_COMMUNICATION, False) == SC.BadNoCommunication
    assert code(Quality.BAD, Reason.TIMEOUT, False) == SC.BadNoCommunication
    assert code(Quality.BAD, Reason.NO_COMMUNICATION, True) == SC.BadCommunicationError
    assert code(Quality.BAD, Reason.TIMEOUT, True) == SC.BadCommunicationError
    assert code(Quality.BAD, Reason.DEVICE_EXCEPTION, True) == SC.BadDeviceFailure
    assert code(Quality.BAD, Reason.DECODE_ERROR, False) == SC.BadConfigurationError
    assert (
        code(Quality.UNCERTAIN, Reason.OUT_OF_RANGE, True) == SC.UncertainEngineeringUnitsExceeded
    )
    assert code(Quality.UNCERTAIN, Reason.STALE, True) == SC.UncertainLastUsableValue
    assert code(Quality.BAD, Reason.NONE, True) == SC.Bad


# --- the server --------------------------------------------------------------------------


async def test_tree_types_units_ranges_and_good_values(tmp_path: Path) -> None:
    dev, modbus_port, port = Machine(), free_port(), free_port()
    rec = Recorder()
    async with (
        RegisterServer([dev], port=modbus_port),
        running(make_config(tmp_path, port, {"lathe-1": modbus_port}), rec) as (gw, sink),
    ):
        await wait_for(lambda: all(r.good for r in gw.bus.latest.values()))
        async with Client(sink.endpoint) as client:
            ns = await client.get_namespace_index(sink.namespace_uri)
            assert ns == sink.namespace_index
            objects = client.nodes.objects
            site = await objects.get_child(f"{ns}:plant")
            assert site.nodeid == nid(sink, "#site")
            machine = await site.get_child(f"{ns}:lathe-1")
            assert machine.nodeid == nid(sink, "lathe-1")
            device = await machine.get_child(f"{ns}:lathe-1-plc")
            assert device.nodeid == nid(sink, "lathe-1/lathe-1-plc")
            children = {(await c.read_browse_name()).Name: c for c in await device.get_children()}
            for name, cfg, vtype in TAGS:
                node = children[name]
                assert node.nodeid == nid(sink, f"lathe-1/lathe-1-plc/{name}")
                assert (await node.read_data_type()) == ua.NodeId(vtype.value), name
                assert (await node.read_description()).Text == cfg.get("description", "")
                assert await node.read_attribute(ua.AttributeIds.AccessLevel) is not None
                access = (await node.read_attribute(ua.AttributeIds.UserAccessLevel)).Value
                assert access.Value == ua.AccessLevel.CurrentRead.mask
                dv = await node.read_data_value()
                assert dv.StatusCode.is_good(), name
                assert dv.Value.VariantType == vtype, name
            # The diagnostic named like a tag gave way; its NodeId is its own.
            assert {"_online", "error_count", "last_error", "last_success"} <= children.keys()
            assert children["_online"].nodeid == nid(sink, "lathe-1/lathe-1-plc#online")
            assert await children["_online"].read_value() is True

            speed = children["speed"]
            assert await speed.read_type_definition() == ua.NodeId(ua.ObjectIds.AnalogItemType)
            eu = await (await speed.get_child("0:EngineeringUnits")).read_value()
            assert (eu.UnitId, eu.DisplayName.Text, eu.NamespaceUri) == (
                unit_id("RPM"),
                "r/min",
                UNITS_NAMESPACE,
            )
            rng = await (await speed.get_child("0:EURange")).read_value()
            assert (rng.Low, rng.High) == (0, 4000)
            temp_eu = await (await children["temp"].get_child("0:EngineeringUnits")).read_value()
            assert (temp_eu.UnitId, temp_eu.DisplayName.Text) == (unit_id("CEL"), "°C")
            load = children["load"]
            assert await load.read_type_definition() == ua.NodeId(ua.ObjectIds.BaseAnalogType)
            assert [(await p.read_browse_name()).Name for p in await load.get_properties()] == [
                "EngineeringUnits"
            ]
            odd = await (await children["odd"].get_child("0:EngineeringUnits")).read_value()
            assert (odd.UnitId, odd.DisplayName.Text) == (-1, "furlongs")
            assert await children["count"].get_properties() == []

            values = {name: (await children[name].read_value()) for name, _, _ in TAGS}
            assert values["speed"] == 1200
            assert values["temp"] == pytest.approx(21.5)
            assert values["position"] == -70000
            assert values["ubig"] == 2**63 + 5
            assert values["pressure"] == 32.5
            assert values["tool"] == 101
            assert values["model"] == "LT-200"
            assert values["spindle_on"] is True
            assert values["door"] is True

            # SourceTimestamp is the time of the reading that carried the value.
            dv = await children["count"].read_data_value()
            seen = {v: ts for v, ts, _ in rec.readings["lathe-1/count"]}
            assert to_ts(dv.SourceTimestamp) == pytest.approx(seen[dv.Value.Value], abs=1e-5)
            # An unchanged value keeps the SourceTimestamp of its first reading.
            await wait_for(lambda: len(rec.readings["lathe-1/speed"]) >= 3)
            dv = await children["speed"].read_data_value()
            first = rec.readings["lathe-1/speed"][0][1]
            assert to_ts(dv.SourceTimestamp) == pytest.approx(first, abs=1e-5)
            gw.bus.notify_status()  # sessions are counted with each status refresh
            await wait_for(lambda: sink.health["sessions"] == 1)
            server = sink._server
            assert server is not None
            assert count_sessions(server.iserver) == 1
        health = gw.health["opcua"]
        assert health["endpoint"] == f"opc.tcp://127.0.0.1:{port}"
        assert isinstance(health["updates"], int)
        assert health["updates"] >= len(TAGS)
        assert isinstance(health["started_in_s"], float)


@asynccontextmanager
async def watching(
    sink: OpcUaSink, ident: str, handler: Any, deadband: float | None = None
) -> AsyncIterator[None]:
    """A client of its own subscribed to one variable (two subscriptions on one asyncua client
    race: the first notification of the second one can arrive before the client knows it)."""
    async with Client(sink.endpoint) as client:
        sub = await client.create_subscription(20, handler)
        node = client.get_node(nid(sink, ident))
        if deadband is None:
            await sub.subscribe_data_change(node)
        else:
            await sub.deadband_monitor(node, deadband)
        yield
        await sub.delete()


class Changes:
    """A subscription handler that keeps (value, SourceTimestamp, StatusCode) of each change."""

    def __init__(self) -> None:
        self.seen: list[tuple[Any, float, int]] = []

    def datachange_notification(self, node: Any, val: Any, data: Any) -> None:
        dv = data.monitored_item.Value
        ts = to_ts(dv.SourceTimestamp) if dv.SourceTimestamp else 0.0
        self.seen.append((dv.Value.Value, ts, dv.StatusCode.value))

    def good(self) -> list[tuple[Any, float]]:
        return [(v, ts) for v, ts, code in self.seen if code == SC.Good]


async def test_subscription_receives_every_change(tmp_path: Path) -> None:
    dev, modbus_port, port = Machine(), free_port(), free_port()
    rec = Recorder()
    # Items without a filter take the sink's own notification path, items with one asyncua's.
    plain, filtered = Changes(), Changes()

    def good_since(first: float) -> list[tuple[Any, float]]:
        readings = rec.readings["m/count"]
        return [(v, ts) for v, ts, q in readings if q is Quality.GOOD and ts >= first]

    async with (
        RegisterServer([dev], port=modbus_port),
        running(make_config(tmp_path, port, {"m": modbus_port}), rec) as (_, sink),
        watching(sink, "m/m-plc/count", plain),
        watching(sink, "m/m-plc/count", filtered, deadband=0.0),
    ):
        await wait_for(lambda: plain.good() and filtered.good())
        # Less a microsecond: SourceTimestamp is the float rounded to 100 ns.
        first = max(plain.good()[0][1], filtered.good()[0][1]) - 1e-5
        # Every poll changes the counter: watch ten of them.
        await wait_for(lambda: len(good_since(first)) >= 10)
        expected = good_since(first)
        for handler in (plain, filtered):

            def since_first(h: Changes = handler) -> list[tuple[Any, float]]:
                return [(v, ts) for v, ts in h.good() if ts >= first]

            await wait_for(lambda: len(since_first()) >= len(expected))
            got = since_first()[: len(expected)]
            assert [v for v, _ in got] == [v for v, _ in expected]
            assert [ts for _, ts in got] == pytest.approx([ts for _, ts in expected], abs=1e-5)


async def test_quality_codes_reach_subscribers(tmp_path: Path) -> None:
    """Readings published on the bus, as the runner would, arrive with the mapped codes."""
    loaded = make_config(tmp_path, free_port(), {"m": free_port()})
    gw = Gateway(loaded)
    assert loaded.config.opcua is not None
    sink = OpcUaSink(gw, loaded.config.opcua)
    await sink.start()
    run = asyncio.create_task(sink.run(gw.bus.subscribe("opcua")), name="opcua-run")
    try:
        changes, banded = Changes(), Changes()
        async with (
            watching(sink, "m/m-plc/speed", changes),
            watching(sink, "m/m-plc/speed", banded, deadband=50.0),
        ):
            # The initial BadWaitingForInitialData
            await wait_for(lambda: changes.seen and banded.seen)
            now = time.time()
            key = "m/speed"
            steps = [
                Reading(key, 100, Quality.GOOD, now),
                Reading(key, 100, Quality.GOOD, now + 0.1),  # unchanged: not sent
                Reading(key, 130, Quality.GOOD, now + 0.2),  # within the deadband of 100
                Reading(key, 160, Quality.GOOD, now + 0.3),  # 60 from the last one reported
                Reading(key, 5000, Quality.UNCERTAIN, now + 0.4, Reason.OUT_OF_RANGE),
                Reading(key, 5000, Quality.BAD, now + 0.4, Reason.DEVICE_EXCEPTION),
                Reading(key, 5000, Quality.BAD, now + 0.4, Reason.DECODE_ERROR),
                # Read a while ago and never refreshed: soon stale.
                Reading(key, 4990, Quality.GOOD, now - 10),
            ]
            for reading in steps:
                gw.bus.publish([reading])
                await asyncio.sleep(0.05)
            gw.bus.notify_status()  # the staleness check runs with the status refresh
            await wait_for(lambda: len(changes.seen) >= 9 and len(banded.seen) >= 8)
            everything = [
                (None, 0.0, SC.BadWaitingForInitialData),
                (100, pytest.approx(now), SC.Good),
                (130, pytest.approx(now + 0.2), SC.Good),
                (160, pytest.approx(now + 0.3), SC.Good),
                (5000, pytest.approx(now + 0.4), SC.UncertainEngineeringUnitsExceeded),
                (5000, pytest.approx(now + 0.4), SC.BadDeviceFailure),
                (5000, pytest.approx(now + 0.4), SC.BadConfigurationError),
                # A status change is reported whatever the deadband.
                (4990, pytest.approx(now - 10), SC.Good),
                (4990, pytest.approx(now - 10), SC.UncertainLastUsableValue),
            ]
            assert changes.seen == everything
            assert banded.seen == everything[:2] + everything[3:]

        # A value that does not fit the variable's type is refused, not served.
        gw.bus.publish(
            [
                Reading("m/load", "oops", Quality.GOOD, now),  # load is UInt16
                Reading("m/total", -1, Quality.GOOD, now),  # total is UInt32
                Reading("m/temp", 21, Quality.GOOD, now),  # an int for a Double is fine
            ]
        )
        await asyncio.sleep(0.05)
        async with Client(sink.endpoint) as client:
            for ident in ("m/m-plc/load", "m/m-plc/total"):
                dv = await read(client, sink, ident)
                assert (dv.StatusCode.value, dv.Value.Value) == (SC.BadConfigurationError, None)
            dv = await read(client, sink, "m/m-plc/temp")
            assert (dv.StatusCode.value, dv.Value.Value, dv.Value.VariantType) == (
                SC.Good,
                21.0,
                VT.Double,
            )
    finally:
        gw.bus.close()
        await asyncio.wait_for(run, 5)
        await sink.close()


async def test_device_down_bad_with_last_value_and_offline(tmp_path: Path) -> None:
    dev, modbus_port, never_port, port = Machine(), free_port(), free_port(), free_port()
    loaded = make_config(tmp_path, port, {"up": modbus_port, "never": never_port})
    server = RegisterServer([dev], port=modbus_port)
    await server.start()
    try:
        async with running(loaded) as (gw, sink), Client(sink.endpoint) as client:
            await wait_for(lambda: gw.bus.latest["up/speed"].good)
            # A device never reached: no value at all.
            await wait_for(lambda: gw.bus.latest["never/speed"].reason is Reason.NO_COMMUNICATION)
            dv = await read(client, sink, "never/never-plc/speed")
            assert dv.StatusCode.value == SC.BadNoCommunication
            assert dv.Value.Value is None
            assert await client.get_node(nid(sink, "never/never-plc#online")).read_value() is False

            good = await read(client, sink, "up/up-plc/speed")
            assert good.StatusCode.is_good()
            await server.stop()
            await wait_for(lambda: not gw.bus.latest["up/speed"].good)
            await wait_for(lambda: gw.statuses["up-plc"].state.value == "offline")
            await asyncio.sleep(0.1)  # the status task picks the change up
            bad = await read(client, sink, "up/up-plc/speed")
            assert bad.StatusCode.value == SC.BadCommunicationError
            assert bad.Value.Value == 1200
            # The kept value carries the time it was last read, not the time of the failure.
            last_read = gw.bus.latest["up/speed"].source_ts
            assert to_ts(bad.SourceTimestamp) == pytest.approx(last_read, abs=1e-5)
            assert to_ts(good.SourceTimestamp) <= last_read + 1e-5 < time.time() - 0.05
            diag = "up/up-plc#"
            assert await client.get_node(nid(sink, diag + "online")).read_value() is False
            assert await client.get_node(nid(sink, diag + "error_count")).read_value() >= 1
            assert await client.get_node(nid(sink, diag + "last_error")).read_value() != ""
            last_ok = await client.get_node(nid(sink, diag + "last_success")).read_value()
            assert isinstance(last_ok, datetime)
    finally:
        await server.stop()


def client_certificate(uri: str) -> tuple[bytes, bytes]:
    """DER certificate and key, as bytes: asyncua reads paths through anyio worker threads."""
    key = generate_private_key()
    cert = generate_self_signed_app_certificate(
        key,
        "test client",
        {},
        [x509.UniformResourceIdentifier(uri), x509.DNSName(socket.gethostname())],
        [ExtendedKeyUsageOID.CLIENT_AUTH],
    )
    der_key = key.private_bytes(
        serialization.Encoding.DER,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    return cert.public_bytes(serialization.Encoding.DER), der_key


async def test_sign_and_encrypt_only_and_none_refused(tmp_path: Path) -> None:
    dev, modbus_port, port = Machine(), free_port(), free_port()
    loaded = make_config(
        tmp_path,
        port,
        {"m": modbus_port},
        allow_none=False,
        security=["Basic256Sha256_SignAndEncrypt"],
    )
    async with RegisterServer([dev], port=modbus_port), running(loaded) as (gw, sink):
        await wait_for(lambda: gw.bus.latest["m/speed"].good)
        client = Client(sink.endpoint)
        client.application_uri = "urn:retrofit-gateway:test-client"
        cert, key = client_certificate(client.application_uri)
        trusted = gw.data_dir / "pki" / "trusted"
        (trusted / "test-client.der").write_bytes(cert)  # the trust list is on by default
        await client.set_security(
            SecurityPolicyBasic256Sha256,
            cert,
            key,
            mode=ua.MessageSecurityMode.SignAndEncrypt,
        )
        async with client:
            assert await client.get_node(nid(sink, "m/m-plc/speed")).read_value() == 1200
            endpoints = await client.get_endpoints()
            assert {(e.SecurityPolicyUri.split("#")[1], e.SecurityMode) for e in endpoints} == {
                ("Basic256Sha256", ua.MessageSecurityMode.SignAndEncrypt)
            }

        # A client without security finds no endpoint for it...
        with pytest.raises(ua.UaError):
            async with Client(sink.endpoint):
                pass
        # ...and one that skips that check gets no session on a None channel.
        raw = Client(sink.endpoint)
        await raw.connect_socket()
        try:
            await raw.send_hello()
            await raw.open_secure_channel()  # discovery over None must keep working
            assert await raw.uaclient.get_endpoints(ua.GetEndpointsParameters())
            params = ua.CreateSessionParameters(
                ClientNonce=b"n" * 32, RequestedSessionTimeout=5000, SessionName="raw"
            )
            await raw.uaclient.create_session(params)
            activate = ua.ActivateSessionParameters(
                UserIdentityToken=ua.AnonymousIdentityToken(PolicyId="anonymous")
            )
            with pytest.raises(ua.uaerrors.BadUserAccessDenied):
                await raw.uaclient.activate_session(activate)
        finally:
            raw.disconnect_socket()


async def test_none_endpoint_when_allowed_and_restart_keeps_cert_and_node_ids(
    tmp_path: Path,
) -> None:
    loaded = make_config(tmp_path, free_port(), {"m": free_port()})
    snapshots = []
    for _ in range(2):
        gw = Gateway(loaded)
        assert loaded.config.opcua is not None
        sink = OpcUaSink(gw, loaded.config.opcua)
        await sink.start()
        try:
            async with Client(sink.endpoint) as client:  # no security: allow_none is on
                ns = sink.namespace_index
                ids = []
                stack = [await client.nodes.objects.get_child(f"{ns}:plant")]
                while stack:
                    node = stack.pop()
                    ids.append(node.nodeid.to_string())
                    stack.extend(await node.get_children())
                speed = await read(client, sink, "m/m-plc/speed")
                assert speed.StatusCode.value == SC.BadWaitingForInitialData
                assert speed.Value.Value is None
            server = sink._server
            assert server is not None
            check_builder_matches_add_nodes(server, ns)
        finally:
            await sink.close()
            await sink.close()  # idempotent
        der = sink.cert_path.read_bytes()
        snapshots.append((sorted(ids), der))
    (ids1, der1), (ids2, der2) = snapshots
    assert ids1 == ids2
    assert len(ids1) > len(TAGS)
    assert f"ns={sink.namespace_index};s=m/m-plc/temp#EURange" in ids1
    assert der1 == der2
    cert = x509.load_der_x509_certificate(der1)
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert sink.application_uri in san.get_values_for_type(x509.UniformResourceIdentifier)
    assert socket.gethostname() in san.get_values_for_type(x509.DNSName)
    assert "127.0.0.1" in {str(a) for a in san.get_values_for_type(x509.IPAddress)}
    assert cert.public_key().key_size == 2048  # type: ignore[union-attr]
    assert isinstance(cert.signature_hash_algorithm, hashes.SHA256)
    assert stat.S_IMODE(sink.key_path.stat().st_mode) == 0o600


def check_builder_matches_add_nodes(server: Any, ns: int) -> None:
    """The fast builder makes the same nodes as asyncua's AddNodes service."""
    aspace = server.iserver.aspace
    parent = ua.NodeId("m/m-plc", ns)
    item = ua.AddNodesItem()
    item.RequestedNewNodeId = ua.NodeId("ref", ns)
    item.BrowseName = ua.QualifiedName("ref", ns)
    item.NodeClass = ua.NodeClass.Variable
    item.ParentNodeId = parent
    item.ReferenceTypeId = ua.NodeId(ua.ObjectIds.HasComponent)
    item.TypeDefinition = ua.NodeId(ua.ObjectIds.AnalogItemType)
    attrs = ua.VariableAttributes()
    attrs.DisplayName = ua.LocalizedText("ref")
    attrs.Description = ua.LocalizedText("d")
    attrs.DataType = ua.NodeId(ua.ObjectIds.Double)
    attrs.ValueRank = ua.ValueRank.Scalar
    attrs.Value = ua.Variant(1.5, VT.Double)
    attrs.AccessLevel = ua.AccessLevel.CurrentRead.mask
    attrs.UserAccessLevel = ua.AccessLevel.CurrentRead.mask
    attrs.WriteMask = 0
    attrs.UserWriteMask = 0
    attrs.Historizing = False
    attrs.MinimumSamplingInterval = 100.0
    item.NodeAttributes = attrs
    [result] = server.iserver.node_mgt_service.add_nodes([item])
    result.StatusCode.check()
    _Builder(aspace).add_variable(
        ua.NodeId("mine", ns),
        parent,
        ua.ObjectIds.HasComponent,
        ua.ObjectIds.AnalogItemType,
        ua.QualifiedName("mine", ns),
        ua.ObjectIds.Double,
        ua.DataValue(ua.Variant(1.5, VT.Double)),
        "d",
        100.0,
    )
    ref, mine = aspace[ua.NodeId("ref", ns)], aspace[ua.NodeId("mine", ns)]

    def values(node: Any) -> dict[Any, Any]:
        skip = (ua.AttributeIds.NodeId, ua.AttributeIds.BrowseName, ua.AttributeIds.DisplayName)
        return {a: v.value.Value for a, v in node.attributes.items() if a not in skip}

    assert values(ref) == values(mine)
    assert ref.references == mine.references
    parent_refs = {r.NodeId.Identifier: r for r in aspace[parent].references}
    mine_ref, ref_ref = parent_refs["mine"], parent_refs["ref"]
    assert (mine_ref.ReferenceTypeId, mine_ref.NodeClass, mine_ref.TypeDefinition) == (
        ref_ref.ReferenceTypeId,
        ref_ref.NodeClass,
        ref_ref.TypeDefinition,
    )


async def test_start_fails_cleanly_when_the_port_is_taken(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        loaded = make_config(tmp_path, port, {"m": free_port()})
        gw = Gateway(loaded)
        assert loaded.config.opcua is not None
        sink = OpcUaSink(gw, loaded.config.opcua)
        with caplog.at_level(logging.DEBUG), pytest.raises(GatewayError) as raised:
            await sink.start()
        assert (
            str(raised.value)
            == f"OPC UA: cannot listen on 127.0.0.1:{port}: Address already in use"
        )
        assert isinstance(raised.value.__cause__, OSError)
        # One error, ours: asyncua's own traceback of the bind is left out.
        assert not [r for r in caplog.records if r.levelno >= logging.ERROR], caplog.text
        assert not logging.getLogger("asyncua.server.server").filters
        assert sink._server is None
        await sink.close()


def test_variant_types() -> None:
    from gateway.model import TagSpec  # noqa: PLC0415

    for name, cfg, vtype in TAGS:
        spec = TagSpec(
            0,
            "m",
            "d",
            name,
            cfg["type"],
            scale=cfg.get("scale", 1.0),
            offset=cfg.get("offset", 0.0),
        )
        assert variant_type(spec) == vtype, name
    with pytest.raises(ValueError, match="no OPC UA type"):
        variant_type(TagSpec(0, "m", "d", "x", "complex128"))

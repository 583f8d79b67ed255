"""Writes over OPC UA, against a real asyncua Client with certificates and logins, and a
recording simulated device: only operators, only on a secure channel, only tags with a write
rule, within their limits; the client gets the write's StatusCode and the node shows what the
machine read back. Nothing refused reaches the machine."""

from __future__ import annotations

import asyncio
import json
import struct
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
from asyncua import Client, ua

from drivers.modbus.config import Table
from drivers.modbus.transport import RegisterServer
from gateway import auth
from gateway.app import AUDIT_FILE
from gateway.sinks.opcua import OpcUaSink
from tests.conftest import free_port
from tests.drivers.test_writes import Recording
from tests.sinks.test_opcua_security import App, running, session, trust_file, wait_for

SC = ua.StatusCodes
VT = ua.VariantType
READ = ua.AccessLevel.CurrentRead.mask
READ_WRITE = READ | ua.AccessLevel.CurrentWrite.mask
READER_PW = "reader pass"
OPERATOR_PW = "operator pass"

TAGS: list[dict[str, Any]] = [
    {"name": "speed", "table": "holding", "address": 0, "type": "uint16", "scale": 0.1,
     "writable": True, "write": {"min": 0, "max": 3000, "min_interval": 0}},
    # Word-swapped float32 with a scale: the encoded registers prove the tag's own order.
    {"name": "feed", "table": "holding", "address": 1, "type": "float32", "order": "CDAB",
     "scale": 0.5, "writable": True, "write": {"min": 0, "max": 150, "min_interval": 0}},
    {"name": "mode", "table": "holding", "address": 3, "type": "int16", "writable": True,
     "write": {"values": [1, 2, 5], "min_interval": 0}},
    {"name": "coolant", "table": "coil", "address": 1, "type": "bool", "writable": True,
     "write": {"min_interval": 0}},
    {"name": "slow", "table": "holding", "address": 5, "type": "uint16", "writable": True,
     "write": {"min": 0, "max": 100, "min_interval": 60}},
    # The device ignores writes to holding 6: written, but read back unchanged.
    {"name": "stuck", "table": "holding", "address": 6, "type": "uint16", "writable": True,
     "write": {"min": 0, "max": 1000, "min_interval": 0}},
    {"name": "count", "table": "holding", "address": 4, "type": "uint16"},
]  # fmt: skip


class Machine(Recording):
    """A recording device with a register that keeps its value whatever is written."""

    def write(self, table: Table, address: int, values: Any) -> None:
        if table is Table.HOLDING and address == 6:
            self.writes.append((table, address, list(values)))
            return
        super().write(table, address, values)


def write_config(tmp_path: Path, modbus: int) -> Path:
    reader = auth.hash_password(READER_PW)
    operator = auth.hash_password(OPERATOR_PW)
    config = {
        "gateway": {"name": "gw-writes", "site": "plant", "area": "a", "line": "l"},
        "opcua": {
            "host": "127.0.0.1",
            "port": free_port(),
            "allow_none": True,
            "anonymous": True,
            "users": [
                {"name": "hmi", "password_hash": reader},
                {"name": "setter", "password_hash": operator, "role": "operator"},
            ],
        },
        "devices": [
            {
                "name": "press-plc",
                "driver": "modbus_tcp",
                "machine": "press",
                "host": "127.0.0.1",
                "port": modbus,
                "interval": 0.2,
                "timeout": 0.15,
                "addressing": "zero_based",
                "tags": TAGS,
            }
        ],
    }
    path = tmp_path / "gateway.yaml"
    path.write_text(json.dumps(config))  # JSON is YAML
    return path


@asynccontextmanager
async def plant(tmp_path: Path) -> AsyncIterator[tuple[OpcUaSink, Machine, App]]:
    """The device, the gateway with its OPC UA server polling it, and a trusted client app."""
    dev = Machine()
    modbus = free_port()
    async with (
        RegisterServer([dev], port=modbus),
        running(write_config(tmp_path, modbus)) as (
            gw,
            sink,
        ),
    ):
        await wait_for(lambda: all(r.good for r in gw.bus.latest.values()))
        app = App("writer")
        trust_file(gw, app)
        yield sink, dev, app


def node_of(client: Client, sink: OpcUaSink, tag: str) -> Any:
    return client.get_node(ua.NodeId(f"press/press-plc/{tag}", sink.namespace_index))


def audit(tmp_path: Path) -> list[dict[str, Any]]:
    path = tmp_path / "data" / AUDIT_FILE
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines()]


async def access_levels(node: Any) -> tuple[int, int]:
    dvs = await node.read_attributes([ua.AttributeIds.AccessLevel, ua.AttributeIds.UserAccessLevel])
    return dvs[0].Value.Value, dvs[1].Value.Value


async def shows(node: Any, value: object, within: float = 5.0) -> None:
    """The node's value becomes ``value`` (through a poll) within ``within`` seconds."""
    deadline = time.monotonic() + within
    while (got := await node.read_value()) != value:
        assert time.monotonic() < deadline, f"node shows {got!r}, not {value!r}"
        await asyncio.sleep(0.05)


async def test_operator_writes_the_machine_and_the_node_shows_the_read_back(
    tmp_path: Path,
) -> None:
    async with (
        plant(tmp_path) as (sink, dev, app),
        session(sink, app, user="setter", password=OPERATOR_PW) as client,
    ):
        speed = node_of(client, sink, "speed")
        assert await access_levels(speed) == (READ_WRITE, READ_WRITE)
        assert await access_levels(node_of(client, sink, "count")) == (READ, READ)

        # As the variable's own type, and as a plain Python number (Int64, Double): the value
        # decides, converted exactly or refused.
        await speed.write_value(ua.Variant(1450.5, VT.Double))
        assert dev.writes == [(Table.HOLDING, 0, [14505])]
        await node_of(client, sink, "feed").write_value(87.5)
        hi, lo = struct.unpack(">HH", struct.pack(">f", 175.0))  # 87.5 / 0.5, CDAB
        assert dev.writes[-1] == (Table.HOLDING, 1, [lo, hi])
        await node_of(client, sink, "mode").write_value(5)  # Int64 for an Int16 tag
        assert dev.writes[-1] == (Table.HOLDING, 3, [5])
        await node_of(client, sink, "coolant").write_value(True)
        assert dev.writes[-1] == (Table.COIL, 1, [True])

        # What the node shows comes from the poll that read the machine.
        await shows(speed, 1450.5)
        await shows(node_of(client, sink, "feed"), 87.5)
        await shows(node_of(client, sink, "coolant"), True)
        assert sink.health["writes"] == 4

    entries = audit(tmp_path)
    assert [(e["tag"], e["result"], e["user"]) for e in entries] == [
        ("press/speed", "ok", "setter"),
        ("press/feed", "ok", "setter"),
        ("press/mode", "ok", "setter"),
        ("press/coolant", "ok", "setter"),
    ]
    origin = entries[0]["origin"]
    assert origin.startswith("opcua 127.0.0.1:"), origin
    assert f" Basic256Sha256_SignAndEncrypt cert {app.id}" in origin, origin
    assert (entries[0]["old"], entries[0]["requested"], entries[0]["read_back"]) == (
        0.0,
        1450.5,
        1450.5,
    )


async def test_readers_anonymous_and_none_channels_cannot_write(tmp_path: Path) -> None:
    async with plant(tmp_path) as (sink, dev, app):
        before = await read_speed(sink, app)
        attempts: list[tuple[dict[str, Any], int]] = [
            ({"user": "hmi", "password": READER_PW}, SC.BadUserAccessDenied),
            ({}, SC.BadUserAccessDenied),  # anonymous, on a secure channel
            # The operator on a None channel (allow_none is on): it reads, it may not write.
            ({"app": None, "user": "setter", "password": OPERATOR_PW},
             SC.BadSecurityModeInsufficient),
            ({"app": None}, SC.BadUserAccessDenied),  # anonymous on None
        ]  # fmt: skip
        for how, code in attempts:
            kwargs = {"app": app, **how}
            async with session(sink, **kwargs) as client:
                speed = node_of(client, sink, "speed")
                assert await access_levels(speed) == (READ_WRITE, READ), how
                with pytest.raises(ua.uaerrors.UaStatusCodeError) as info:
                    await speed.write_value(ua.Variant(100.0, VT.Double))
                assert info.value.code == code, (how, info.value)
                assert await speed.read_value() == before
        assert sink.health["writes_refused"] == len(attempts)
    assert dev.writes == []
    # Refused by the sink itself, before the write service: audited all the same.
    entries = audit(tmp_path)
    # Once a minute per user, node and reason: the anonymous one on a None channel repeats
    # the anonymous one before it.
    assert [e["result"] for e in entries] == [ua.StatusCode(code).name for _, code in attempts[:-1]]
    assert all(e["tag"].endswith("press/press-plc/speed") for e in entries)
    assert [e["user"] for e in entries][:2] == ["hmi", "anonymous"]


async def read_speed(sink: OpcUaSink, app: App) -> object:
    async with session(sink, app, user="hmi", password=READER_PW) as client:
        return await node_of(client, sink, "speed").read_value()


async def write_status(node: Any, value: Any) -> int:
    """The StatusCode of a write of ``value`` (a Variant or DataValue as it is sent)."""
    try:
        await node.write_value(value)
    except ua.uaerrors.UaStatusCodeError as exc:
        return int(exc.code)
    return int(SC.Good)


async def test_guard_rails_answer_with_status_codes_and_write_nothing(tmp_path: Path) -> None:
    async with (
        plant(tmp_path) as (sink, dev, app),
        session(sink, app, user="setter", password=OPERATOR_PW) as client,
    ):
        speed, mode = node_of(client, sink, "speed"), node_of(client, sink, "mode")
        cases: list[tuple[Any, Any, int]] = [
            (speed, ua.Variant(3000.1, VT.Double), SC.BadOutOfRange),
            (speed, ua.Variant(-1, VT.Int32), SC.BadOutOfRange),
            (speed, ua.Variant(12.34, VT.Double), SC.BadOutOfRange),  # not a 0.1 step
            (mode, ua.Variant(3, VT.Int16), SC.BadOutOfRange),  # not one of the values
            (speed, ua.Variant("50", VT.String), SC.BadTypeMismatch),
            (speed, ua.Variant(True, VT.Boolean), SC.BadTypeMismatch),
            (speed, ua.Variant([1.0, 2.0], VT.Double, is_array=True), SC.BadTypeMismatch),
            (node_of(client, sink, "coolant"), ua.Variant(1, VT.Int32), SC.BadTypeMismatch),
        ]
        for node, value, code in cases:
            assert await write_status(node, value) == code, (node, value)
        # Refused before the write service (audited by the sink).
        early: list[tuple[Any, Any, int]] = [
            # A read-only tag, a device diagnostic, a standard node, a node that is not there.
            (node_of(client, sink, "count"), ua.Variant(1, VT.UInt16), SC.BadNotWritable),
            (client.get_node(ua.NodeId("press/press-plc#online", sink.namespace_index)),
             ua.Variant(False, VT.Boolean), SC.BadNotWritable),
            (client.get_node(ua.ObjectIds.Server_ServiceLevel), ua.Variant(1, VT.Byte),
             SC.BadNotWritable),
            (client.get_node(ua.NodeId("press/nothing", sink.namespace_index)),
             ua.Variant(1, VT.UInt16), SC.BadNodeIdUnknown),
            (speed, ua.DataValue(ua.Variant(10.0, VT.Double),
                                 StatusCode=ua.StatusCode(SC.UncertainLastUsableValue)),
             SC.BadWriteNotSupported),
        ]  # fmt: skip
        for node, value, code in early:
            assert await write_status(node, value) == code, (node, value)
        # An attribute other than Value.
        with pytest.raises(ua.uaerrors.BadNotWritable):
            await speed.write_attribute(
                ua.AttributeIds.DisplayName, ua.DataValue(ua.Variant(ua.LocalizedText("x")))
            )
        assert dev.writes == []
        assert await speed.read_value() == 0.0

        # Each write of a request gets its own answer; an IndexRange has nothing to index.
        params = ua.WriteParameters()
        for value, index_range in ((ua.Variant(2, VT.Int16), "0"), (ua.Variant(2, VT.Int16), None)):
            wv = ua.WriteValue()
            wv.NodeId = mode.nodeid
            wv.AttributeId = ua.AttributeIds.Value
            wv.IndexRange = index_range
            wv.Value = ua.DataValue(value)
            params.NodesToWrite.append(wv)
        results = await client.uaclient.write(params)
        assert [r.value for r in results] == [SC.BadIndexRangeInvalid, SC.Good]
        assert dev.writes == [(Table.HOLDING, 3, [2])]

        # Once a minute for this tag: the second write is refused.
        slow = node_of(client, sink, "slow")
        assert await write_status(slow, ua.Variant(10, VT.UInt16)) == SC.Good
        assert await write_status(slow, ua.Variant(11, VT.UInt16)) == SC.BadResourceUnavailable
        assert dev.writes[-1] == (Table.HOLDING, 5, [10])
        assert len(dev.writes) == 2

        # Written, but the machine kept its value: BadDeviceFailure, and the node never
        # shows what was asked for.
        stuck = node_of(client, sink, "stuck")
        assert await write_status(stuck, ua.Variant(200, VT.UInt16)) == SC.BadDeviceFailure
        assert dev.writes[-1] == (Table.HOLDING, 6, [200])
        assert await stuck.read_value() == 0
    entries = audit(tmp_path)
    early_results = [e["result"] for e in entries if e["result"].startswith("Bad")]
    assert early_results == [
        "BadNotWritable",
        "BadNotWritable",
        "BadNotWritable",
        "BadNodeIdUnknown",
        "BadWriteNotSupported",
        "BadNotWritable",  # DisplayName
        "BadIndexRangeInvalid",
    ]
    results = [(e["tag"], e["result"]) for e in entries if not e["result"].startswith("Bad")]
    assert results == [
        ("press/speed", "out_of_range"),
        ("press/speed", "out_of_range"),
        ("press/speed", "not_representable"),
        ("press/mode", "not_allowed"),
        ("press/speed", "bad_type"),
        ("press/speed", "bad_type"),
        ("press/speed", "bad_type"),
        ("press/coolant", "bad_type"),
        ("press/mode", "ok"),
        ("press/slow", "ok"),
        ("press/slow", "rate_limited"),
        ("press/stuck", "verify_failed"),
    ]


async def test_a_device_that_is_gone(tmp_path: Path) -> None:
    dev = Machine()
    modbus = free_port()
    server = RegisterServer([dev], port=modbus)
    await server.start()
    try:
        async with running(write_config(tmp_path, modbus)) as (gw, sink):
            await wait_for(lambda: all(r.good for r in gw.bus.latest.values()))
            app = App("writer")
            trust_file(gw, app)
            async with session(sink, app, user="setter", password=OPERATOR_PW) as client:
                await server.stop()
                speed = node_of(client, sink, "speed")
                code = await write_status(speed, ua.Variant(10.0, VT.Double))
                assert code == SC.BadCommunicationError
    finally:
        await server.stop()
    assert [e["result"] for e in audit(tmp_path)] == ["device"]

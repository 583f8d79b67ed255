"""Writes to machines through the whole path (runtime -> driver -> pymodbus -> a simulated
device), with the guard rails: only writable tags, only within limits, read back, audited.
Nothing refused may reach the machine."""

from __future__ import annotations

import asyncio
import json
import struct
from pathlib import Path
from typing import Any

import pytest

from drivers.modbus.config import Table
from drivers.modbus.simulator import RegisterMapDevice
from drivers.modbus.transport import RegisterServer
from gateway.app import AUDIT_FILE, Gateway
from gateway.config import ConfigError, GatewayConfig, LoadedConfig, load_config
from gateway.errors import WriteRefused
from tests.conftest import free_port
from tests.ptys import PtyPair


class Recording(RegisterMapDevice):
    """Remembers every write that reached it."""

    def __init__(self, unit_id: int = 1) -> None:
        super().__init__(unit_id)
        self.serve(Table.HOLDING, 0, 20)
        self.serve(Table.COIL, 0, 4)
        self.writes: list[tuple[Table, int, list[Any]]] = []

    def write(self, table: Table, address: int, values: Any) -> None:
        self.writes.append((table, address, list(values)))
        super().write(table, address, values)


TAGS: list[dict[str, Any]] = [
    # A float32 set point in word-swapped order (CDAB), with a scale: the case that peers got
    # wrong for years (their writes ignored the configured order).
    {"name": "feed_override", "table": "holding", "address": 0, "type": "float32",
     "order": "CDAB", "scale": 0.5, "writable": True, "write": {"min": 0, "max": 150}},
    {"name": "spindle_rpm", "table": "holding", "address": 2, "type": "uint16", "scale": 0.1,
     "writable": True, "write": {"min": 0, "max": 3000, "min_interval": 0}},
    {"name": "mode", "table": "holding", "address": 3, "type": "int16", "writable": True,
     "write": {"values": [1, 2, 5], "min_interval": 0}},
    {"name": "coolant", "table": "coil", "address": 1, "type": "bool", "writable": True,
     "write": {"min_interval": 0}},
    {"name": "counter", "table": "holding", "address": 4, "type": "uint32"},
]  # fmt: skip


def config(tmp_path: Path, devices: list[dict[str, Any]]) -> LoadedConfig:
    cfg = GatewayConfig.model_validate(
        {"gateway": {"site": "s", "area": "a", "line": "l"}, "devices": devices}
    )
    return LoadedConfig(tmp_path / "gw.yaml", cfg)


def tcp_device(port: int) -> dict[str, Any]:
    return {
        "name": "press-plc",
        "driver": "modbus_tcp",
        "machine": "press",
        "host": "127.0.0.1",
        "port": port,
        "interval": 0.1,
        "timeout": 0.5,
        "addressing": "zero_based",
        "tags": TAGS,
    }


async def running(gw: Gateway, stop: asyncio.Event) -> asyncio.Task[None]:
    task = asyncio.create_task(gw.run(stop), name="gateway")
    for _ in range(100):
        if all(s.state.value == "online" for s in gw.statuses.values()):
            return task
        await asyncio.sleep(0.05)
    raise AssertionError("devices did not come online")


def audit(tmp_path: Path) -> list[dict[str, Any]]:
    path = tmp_path / "data" / AUDIT_FILE
    return [json.loads(line) for line in path.read_text().splitlines()]


async def test_writes_use_the_tags_own_order_and_scale_and_are_read_back(tmp_path: Path) -> None:
    dev = Recording()
    port = free_port()
    gw = Gateway(config(tmp_path, [tcp_device(port)]))
    stop = asyncio.Event()
    async with RegisterServer([dev], port=port):
        task = await running(gw, stop)
        try:
            result = await gw.write("press/feed_override", 87.5, user="op1", origin="test")
            assert result.read_back == 87.5
            # 87.5 / scale 0.5 = 175.0 as float32 0x432F0000, words swapped (CDAB).
            hi, lo = struct.unpack(">HH", struct.pack(">f", 175.0))
            assert dev.writes[-1] == (Table.HOLDING, 0, [lo, hi])
            r = await gw.write("press/spindle_rpm", 1450.5, user="op1", origin="test")
            assert (r.read_back, dev.writes[-1]) == (1450.5, (Table.HOLDING, 2, [14505]))
            await gw.write("press/mode", 5, user="op1", origin="test")
            assert dev.writes[-1] == (Table.HOLDING, 3, [5])
            await gw.write("press/coolant", True, user="op1", origin="test")
            assert dev.writes[-1] == (Table.COIL, 1, [True])
            # The next poll shows what was written.
            await asyncio.sleep(0.3)
            assert gw.bus.latest["press/feed_override"].value == 87.5
            assert gw.bus.latest["press/coolant"].value is True
        finally:
            stop.set()
            await asyncio.wait_for(task, 5)
    entries = audit(tmp_path)
    assert [e["result"] for e in entries] == ["ok"] * 4
    first = entries[0]
    assert (first["user"], first["origin"], first["tag"]) == ("op1", "test", "press/feed_override")
    assert (first["old"], first["requested"], first["read_back"]) == (0.0, 87.5, 87.5)


@pytest.mark.parametrize(
    ("key", "value", "code"),
    [
        ("press/nothing", 1, "unknown_tag"),
        ("press/counter", 1, "not_writable"),
        ("press/feed_override", 151, "out_of_range"),
        ("press/feed_override", -0.5, "out_of_range"),
        ("press/feed_override", "50", "bad_type"),
        ("press/feed_override", True, "bad_type"),
        ("press/feed_override", float("nan"), "bad_type"),
        ("press/feed_override", None, "bad_type"),
        ("press/spindle_rpm", 12.34, "not_representable"),
        ("press/mode", 3, "not_allowed"),
        ("press/mode", True, "bad_type"),
        ("press/coolant", 1, "bad_type"),
        ("press/coolant", "true", "bad_type"),
    ],
)
async def test_invalid_writes_are_refused_audited_and_never_reach_the_machine(
    tmp_path: Path, key: str, value: object, code: str
) -> None:
    dev = Recording()
    port = free_port()
    gw = Gateway(config(tmp_path, [tcp_device(port)]))
    stop = asyncio.Event()
    async with RegisterServer([dev], port=port):
        task = await running(gw, stop)
        try:
            with pytest.raises(WriteRefused) as info:
                await gw.write(key, value, user="mallory", origin="test")
        finally:
            stop.set()
            await asyncio.wait_for(task, 5)
    assert info.value.code == code, info.value
    assert dev.writes == []
    (entry,) = audit(tmp_path)
    assert (entry["result"], entry["user"], entry["tag"]) == (code, "mallory", key)
    assert entry["detail"]


async def test_rate_limit_and_a_device_that_is_gone(tmp_path: Path) -> None:
    dev = Recording()
    port = free_port()
    gw = Gateway(config(tmp_path, [tcp_device(port)]))
    stop = asyncio.Event()
    server = RegisterServer([dev], port=port)
    await server.start()
    task = await running(gw, stop)
    try:
        await gw.write("press/feed_override", 10, user="op", origin="test")
        # min_interval defaults to 1 s for this tag.
        with pytest.raises(WriteRefused) as info:
            await gw.write("press/feed_override", 11, user="op", origin="test")
        assert info.value.code == "rate_limited"
        assert len(dev.writes) == 1
        await server.stop()
        with pytest.raises(WriteRefused) as info:
            await gw.write("press/mode", 2, user="op", origin="test")
        assert info.value.code == "device"
    finally:
        stop.set()
        await asyncio.wait_for(task, 5)
        await server.stop()
    assert [e["result"] for e in audit(tmp_path)] == ["ok", "rate_limited", "device"]


async def test_a_write_on_a_shared_rtu_line(tmp_path: Path) -> None:
    pty = PtyPair(tmp_path)
    pty.start()
    try:
        devices = [Recording(1), Recording(2)]
        rtu = [
            {
                "name": f"drive-{u}",
                "driver": "modbus_rtu",
                "machine": f"lathe-{u}",
                "port": pty.a,
                "unit_id": u,
                "parity": "N",  # ptys refuse parity
                "interval": 0.2,
                "timeout": 0.3,
                "addressing": "zero_based",
                "tags": TAGS[1:3],
            }
            for u in (1, 2)
        ]
        gw = Gateway(config(tmp_path, rtu))
        stop = asyncio.Event()
        async with RegisterServer(devices, serial_port=pty.b):
            task = await running(gw, stop)
            try:
                r = await gw.write("lathe-2/spindle_rpm", 800, user="op", origin="test")
                assert r.read_back == 800
            finally:
                stop.set()
                await asyncio.wait_for(task, 5)
        assert devices[0].writes == []
        assert devices[1].writes == [(Table.HOLDING, 2, [8000])]
    finally:
        pty.stop()


@pytest.mark.parametrize(
    ("tag", "message"),
    [
        ({"table": "input", "writable": True, "write": {"min": 0, "max": 1}}, "read-only"),
        ({"table": "holding", "writable": True}, "needs `write:` limits"),
        ({"table": "holding", "write": {"min": 0, "max": 1}}, "writable is not true"),
        ({"table": "holding", "writable": True, "write": {"min": 0}}, "both min and max"),
        ({"table": "holding", "type": "bit", "bit": 3, "writable": True,
          "write": {"values": [True]}}, "use a coil"),
        ({"table": "holding", "type": "string", "count": 4, "writable": True,
          "write": {"values": [1]}}, "not writable"),
    ],
)  # fmt: skip
def test_writable_config_is_checked(tmp_path: Path, tag: dict[str, Any], message: str) -> None:
    body = {"name": "t", "address": 0, **tag}
    path = tmp_path / "gw.yaml"
    path.write_text(
        json.dumps(
            {
                "gateway": {"site": "s", "area": "a", "line": "l"},
                "devices": [
                    {"name": "d", "driver": "modbus_tcp", "machine": "m", "host": "127.0.0.1",
                     "addressing": "zero_based", "tags": [body]}
                ],
            }
        )
    )  # fmt: skip
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert message in str(info.value), str(info.value)


async def test_a_sinks_own_refusal_is_audited_like_a_refused_write(tmp_path: Path) -> None:
    """WriteService builds every audit entry: a refusal the sink made itself (a read-only
    session, a malformed command) has the same keys as one the service made."""
    gw = Gateway(config(tmp_path, [tcp_device(free_port())]))
    with pytest.raises(WriteRefused):
        await gw.write("press/mode", 3, user="op", origin="opcua 10.0.0.5")
    gw.audit_refusal(
        "press/mode", 2, user="op", origin="opcua 10.0.0.5", code="forbidden", detail="reader"
    )
    service, sink = audit(tmp_path)
    assert service.keys() == sink.keys()
    assert (sink["result"], sink["detail"], sink["requested"]) == ("forbidden", "reader", 2)
    assert sink["old"] is None
    assert list(gw.audit_recent)[-1] == sink

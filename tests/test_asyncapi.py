"""``retrofit-gw asyncapi``: the document is valid AsyncAPI 3.0, has exactly the installation's
topics, and real payloads of a running gateway (captured at a real mosquitto) validate
against its message schemas.

The AsyncAPI 3.0.0 JSON Schema is ``tests/data/asyncapi-3.0.0.schema.json``: the file
``schemas/3.0.0-without-$id.json`` of the npm package ``@asyncapi/specs`` 6.11.1 (Apache-2.0,
Copyright 2016-2025 AsyncAPI Initiative), vendored so that the test needs no network.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml
from referencing import Registry, Resource
from referencing.jsonschema import DRAFT7

from drivers.modbus.config import Table
from drivers.modbus.simulator import RegisterMapDevice
from drivers.modbus.transport import RegisterServer
from gateway import asyncapi
from gateway.app import Gateway
from gateway.cli import main
from gateway.config import GatewayConfig, LoadedConfig, load_config
from gateway.runner import Backoff
from gateway.sinks.mqtt import MqttSink
from gateway.sparkplug.node import EdgeNode
from tests.conftest import free_port
from tests.sinks.conftest import Mosquitto, Watcher

ROOT = Path(__file__).resolve().parent.parent
SPEC = json.loads((ROOT / "tests/data/asyncapi-3.0.0.schema.json").read_text())
BASE = "uns/s/a/l"

TAGS: list[dict[str, Any]] = [
    {"name": "speed", "table": "holding", "address": 0, "type": "uint16", "unit": "rpm",
     "min": 0, "max": 1000},  # 1450: uncertain, out_of_range
    {"name": "temp", "table": "holding", "address": 1, "type": "int16", "scale": 0.1,
     "unit": "°C"},
    {"name": "setpoint", "table": "holding", "address": 2, "type": "uint16", "unit": "rpm",
     "writable": True, "write": {"min": 0, "max": 3000, "min_interval": 0}},
    {"name": "model", "table": "holding", "address": 3, "type": "string", "count": 2},
    {"name": "pressure", "table": "holding", "address": 5, "type": "float32", "order": "CDAB",
     "unit": "bar"},
    {"name": "running", "table": "coil", "address": 0, "type": "bool"},
    {"name": "missing", "table": "input", "address": 50, "type": "uint16"},  # not served: bad
]  # fmt: skip


def config_data(
    mqtt_port: int, dev_port: int, shape: str, *, sparkplug: bool = False
) -> dict[str, Any]:
    data: dict[str, Any] = {
        "gateway": {"name": "gw-test", "site": "s", "area": "a", "line": "l"},
        "mqtt": {"port": mqtt_port, "topic_shape": shape, "qos_values": 1},
        "devices": [
            {
                "name": "lathe-1-plc",
                "driver": "modbus_tcp",
                "machine": "lathe-1",
                "host": "127.0.0.1",
                "port": dev_port,
                "interval": 0.1,
                "timeout": 0.05,
                "connect_timeout": 0.2,
                "addressing": "zero_based",
                "tags": TAGS,
            }
        ],
    }
    if sparkplug:
        data["sparkplug"] = {"port": mqtt_port, "group_id": "plant1", "primary_host_id": "scada"}
    return data


def loaded(tmp_path: Path, data: dict[str, Any]) -> LoadedConfig:
    path = tmp_path / "gateway.yaml"
    path.write_text(yaml.safe_dump(data), encoding="utf-8")
    return LoadedConfig(path, GatewayConfig.model_validate(data))


def spec_errors(doc: dict[str, Any]) -> list[str]:
    validator = jsonschema.Draft7Validator(SPEC)
    return [f"{list(e.absolute_path)}: {e.message[:200]}" for e in validator.iter_errors(doc)]


class Payloads:
    """Validates a payload against the message of the channel whose address is its topic."""

    def __init__(self, doc: dict[str, Any]) -> None:
        self.registry: Registry[Any] = Registry().with_resource(
            "urn:doc", Resource.from_contents(doc, default_specification=DRAFT7)
        )
        self.by_topic = {
            ch["address"]: (cid, next(iter(ch["messages"]))) for cid, ch in doc["channels"].items()
        }

    def validate(self, topic: str, payload: Any) -> None:
        cid, name = self.by_topic[topic]
        ref = {"$ref": f"urn:doc#/channels/{cid}/messages/{name}/payload"}
        jsonschema.Draft7Validator(ref, registry=self.registry).validate(payload)


def structural_invariants(doc: dict[str, Any]) -> None:
    """What the AsyncAPI schema cannot see: every reference resolves, ids are unique."""
    addresses = [ch["address"] for ch in doc["channels"].values()]
    assert len(addresses) == len(set(addresses))
    for op in doc["operations"].values():
        cid = op["channel"]["$ref"].removeprefix("#/channels/")
        assert cid in doc["channels"]
        for m in op["messages"]:
            _, _, c, _, name = m["$ref"].split("/")
            assert c == cid
            assert name in doc["channels"][cid]["messages"]
        assert op["bindings"]["mqtt"]["qos"] in (0, 1)
    for ch in doc["channels"].values():
        for server in ch["servers"]:
            assert server["$ref"].removeprefix("#/servers/") in doc["servers"]


# -- generated documents ------------------------------------------------------------------------


def test_demo_config_document_is_valid_asyncapi(tmp_path: Path) -> None:
    out = tmp_path / "demo.json"
    assert main(["asyncapi", str(ROOT / "config/demo.yaml"), "-o", str(out)]) == 0
    doc = json.loads(out.read_text())
    assert spec_errors(doc) == []
    structural_invariants(doc)
    cfg = load_config(ROOT / "config/demo.yaml")
    tags = Gateway(cfg).tags
    addresses = {ch["address"] for ch in doc["channels"].values()}
    base = "uns/demo-plant/machining/line-1"
    expected = {f"{base}/{t.machine}/{t.name}" for t in tags}
    expected |= {f"{base}/$gateway/demo-gw", f"{base}/lathe-1/$status", f"{base}/mill-1/$status"}
    expected |= {f"{base}/lathe-1/$status/lathe-1-cnc", f"{base}/mill-1/$status/mill-1-cnc"}
    assert addresses == expected  # demo: per_tag, nothing writable, no Sparkplug
    assert doc["servers"]["uns"]["protocol"] == "mqtt"
    speed = next(
        ch for ch in doc["channels"].values() if ch["address"] == f"{base}/lathe-1/spindle_speed"
    )
    payload = speed["messages"]["tagValue"]["payload"]
    assert payload["properties"]["unit"] == {"const": "rpm"}
    assert payload["properties"]["value"]["type"] == ["integer", "null"]
    ops = [
        op for op in doc["operations"].values() if op["channel"]["$ref"].endswith("spindle_speed")
    ]
    assert ops[0]["bindings"]["mqtt"] == {"qos": 0, "retain": True, "bindingVersion": "0.2.0"}
    # YAML by default, and the same document.
    assert main(["asyncapi", str(ROOT / "config/demo.yaml"), "-o", str(tmp_path / "d.yaml")]) == 0
    assert yaml.safe_load((tmp_path / "d.yaml").read_text()) == doc


def test_per_device_sparkplug_writable_document(tmp_path: Path) -> None:
    data = config_data(1883, 5020, "per_device", sparkplug=True)
    data["mqtt"] |= {"username": "gw", "password_env": "X", "tls": {"ca_file": "ca.pem"}}
    cfg = loaded(tmp_path, data)
    doc = asyncapi.build(cfg.config, Gateway(cfg).tags)
    assert spec_errors(doc) == []
    structural_invariants(doc)
    addresses = {ch["address"] for ch in doc["channels"].values()}
    m = f"{BASE}/lathe-1"
    node = "spBv1.0/plant1"
    assert addresses == {
        f"{BASE}/$gateway/gw-test",
        f"{m}/$status",
        f"{m}/$status/lathe-1-plc",
        f"{m}/$device/lathe-1-plc",
        f"{m}/setpoint/set",
        f"{m}/setpoint/set/result",
        f"{node}/NBIRTH/gw-test",
        f"{node}/NDEATH/gw-test",
        f"{node}/NCMD/gw-test",
        f"{node}/DBIRTH/gw-test/lathe-1-plc",
        f"{node}/DDATA/gw-test/lathe-1-plc",
        f"{node}/DDEATH/gw-test/lathe-1-plc",
        f"{node}/DCMD/gw-test/lathe-1-plc",
        "spBv1.0/STATE/scada",
    }
    uns = doc["servers"]["uns"]
    assert uns["protocol"] == "secure-mqtt"
    assert uns["bindings"]["mqtt"]["lastWill"]["topic"] == f"{BASE}/$gateway/gw-test"
    assert doc["servers"]["sparkplug"]["bindings"]["mqtt"]["clientId"] == "gw-test-sparkplug"
    assert "userPassword" in doc["components"]["securitySchemes"]
    dbirth = next(
        ch for ch in doc["channels"].values() if ch["address"].startswith(f"{node}/DBIRTH")
    )
    metrics = {x["name"]: x for x in dbirth["messages"]["dbirth"]["x-sparkplug-metrics"]}
    assert metrics["temp"]["datatype"] == "Double"  # scaled
    assert metrics["speed"]["datatype"] == "Uint16"
    assert metrics["setpoint"]["writable"] is True
    set_ch = next(ch for ch in doc["channels"].values() if ch["address"] == f"{m}/setpoint/set")
    value = set_ch["messages"]["setCommand"]["payload"]["properties"]["value"]
    assert (value["type"], value["minimum"], value["maximum"]) == ("integer", 0, 3000)
    receives = {
        op["channel"]["$ref"] for op in doc["operations"].values() if op["action"] == "receive"
    }
    assert len(receives) == 4  # /set, NCMD, DCMD, STATE


def test_validator_catches_a_broken_document(tmp_path: Path) -> None:
    """The check above is not vacuous."""
    cfg = loaded(tmp_path, config_data(1883, 5020, "per_tag"))
    doc = asyncapi.build(cfg.config, Gateway(cfg).tags)
    cid = next(iter(doc["channels"]))
    doc["channels"][cid]["bogus"] = 1
    del doc["info"]["version"]
    assert len(spec_errors(doc)) >= 2


# -- real payloads ------------------------------------------------------------------------------


class Machine(RegisterMapDevice):
    def __init__(self) -> None:
        super().__init__(unit_id=1)
        self.serve(Table.HOLDING, 0, 7)
        self.serve(Table.COIL, 0, 1)
        self.set(Table.HOLDING, 0, [1450, 215, 100])
        self.put(3, "string", "AB", count=2)
        self.put(5, "float32", 1450.0, order="CDAB")
        self.set(Table.COIL, 0, [True])


@pytest.mark.parametrize("shape", ["per_tag", "per_device"])
async def test_real_payloads_validate_against_the_document(tmp_path: Path, shape: str) -> None:
    broker = Mosquitto(tmp_path / "mosquitto", free_port())
    await broker.astart()
    try:
        dev_port = free_port()
        cfg = loaded(tmp_path, config_data(broker.port, dev_port, shape))
        doc = asyncapi.build(cfg.config, Gateway(cfg).tags)
        payloads = Payloads(doc)
        gw = Gateway(cfg)
        assert gw.config.mqtt is not None
        sink = MqttSink(gw, gw.config.mqtt, backoff=Backoff(base=0.1, cap=0.4))
        stop = asyncio.Event()
        set_topic = f"{BASE}/lathe-1/setpoint/set"
        async with (
            Watcher(broker.port, f"{BASE}/#") as w,
            RegisterServer([Machine()], port=dev_port),
        ):
            task = asyncio.create_task(gw.run(stop, sinks=[sink]), name="gateway")
            try:
                await w.wait(lambda: gw.health["mqtt"]["connected"], 5)
                await w.wait(lambda: len(w.messages) >= 6, 5)
                w.client.publish(set_topic, json.dumps({"value": 1200, "id": "a"}), qos=1)
                w.client.publish(set_topic, json.dumps({"value": 99999}), qos=1)
                w.client.publish(set_topic, b"not json", qos=1)
                await w.wait(lambda: len(w.on(f"{set_topic}/result")) >= 3, 5)
            finally:
                stop.set()
                await asyncio.wait_for(task, 15)
            w.pump()
        seen: dict[str, int] = {}
        kinds: set[str] = set()
        # Our own commands: the good one fits the document, the refused ones do not.
        payloads.validate(set_topic, {"value": 1200, "id": "a"})
        with pytest.raises(jsonschema.ValidationError):
            payloads.validate(set_topic, {"value": 99999})
        for msg in w.messages:
            if msg.topic == set_topic:
                continue
            payload = msg.json()
            payloads.validate(msg.topic, payload)  # raises with the schema path if not
            seen[msg.topic] = seen.get(msg.topic, 0) + 1
            if "values" in payload:
                kinds |= {v["quality"] for v in payload["values"].values()}
            elif "quality" in payload:
                kinds.add(payload["quality"])
        assert {"good", "uncertain", "bad"} <= kinds
        results = [m.json() for m in w.on(f"{set_topic}/result")]
        assert sorted(r["ok"] for r in results) == [False, False, True]
        assert {r.get("code") for r in results} == {None, "out_of_range", "bad_request"}
        assert f"{BASE}/$gateway/gw-test" in seen
        assert f"{BASE}/lathe-1/$status/lathe-1-plc" in seen
        # A payload the schema must refuse.
        some = next(t for t in seen if t.endswith("/temp") or "$device" in t)
        with pytest.raises(jsonschema.ValidationError):
            payloads.validate(some, {"value": 1, "quality": "fine", "ts_ms": 1})
    finally:
        await broker.astop()


def test_cli_refuses_a_config_without_mqtt(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data = config_data(1883, 5020, "per_tag")
    del data["mqtt"]
    path = tmp_path / "g.yaml"
    path.write_text(yaml.safe_dump(data))
    assert main(["asyncapi", str(path)]) == 2
    assert "no MQTT interface" in capsys.readouterr().err


def test_sparkplug_sink_is_what_the_document_says(tmp_path: Path) -> None:
    """The document's Sparkplug datatypes are the sink's own (same ``datatype_of``)."""
    cfg = loaded(tmp_path, config_data(1883, 5020, "per_tag", sparkplug=True))
    gw = Gateway(cfg)
    node = EdgeNode("plant1", "gw-test", tmp_path)
    node.add_device("lathe-1-plc", gw.tags)
    doc = asyncapi.build(cfg.config, gw.tags)
    dbirth = next(c for c in doc["channels"].values() if "/DBIRTH/" in c["address"])
    listed = {m["name"]: m["datatype"] for m in dbirth["messages"]["dbirth"]["x-sparkplug-metrics"]}
    sink_types = {
        name: dt.name.title().replace("_", "")
        for name, (_alias, dt) in node.metrics("lathe-1-plc").items()
    }
    assert listed == sink_types

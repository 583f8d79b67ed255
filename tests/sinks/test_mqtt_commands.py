"""Writes over MQTT: ``<tag topic>/set`` with a JSON body, the answer on ``.../set/result``,
against mosquitto and a recording simulated device. Bad commands get a clear refusal and
nothing reaches the machine."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from drivers.modbus.config import Table
from drivers.modbus.transport import RegisterServer
from gateway.app import AUDIT_FILE, Gateway
from tests.conftest import free_port
from tests.drivers.test_writes import Recording
from tests.sinks.conftest import Watcher
from tests.sinks.test_mqtt import LATHE, fast_sink, make_config, running

TAGS: list[dict[str, Any]] = [
    {"name": "speed", "table": "holding", "address": 0, "type": "uint16", "unit": "rpm",
     "writable": True, "write": {"min": 0, "max": 3000, "min_interval": 0}},
    {"name": "count", "table": "holding", "address": 4, "type": "uint16"},
]  # fmt: skip

SET = f"{LATHE}/speed/set"


async def test_set_writes_the_machine_and_answers(tmp_path: Path, mosquitto: int) -> None:
    dev = Recording()
    port = free_port()
    gw = Gateway(make_config(tmp_path, port, {"port": mosquitto}, interval=0.1, tags=TAGS))
    async with (
        RegisterServer([dev], port=port),
        running(gw, fast_sink(gw)),
        Watcher(mosquitto, f"{LATHE}/#") as w,
    ):
        await w.wait(lambda: gw.health["mqtt"]["connected"] and w.latest(f"{LATHE}/speed"))
        commands: list[tuple[bytes, dict[str, Any]]] = [
            (b'{"value": 1450, "id": "a1"}', {"ok": True, "value": 1450, "read_back": 1450}),
            (b'{"value": 9999, "id": "a2"}', {"ok": False, "code": "out_of_range"}),
            (b'{"value": "fast", "id": "a3"}', {"ok": False, "code": "bad_type"}),
            (b"1450", {"ok": False, "code": "bad_request"}),
            (b"{not json", {"ok": False, "code": "bad_request"}),
            (b'{"value": 5, "force": true}', {"ok": False, "code": "bad_request"}),
        ]
        for n, (body, expected) in enumerate(commands, 1):
            w.client.publish(SET, body, qos=1)
            await w.wait(lambda n=n: len(w.on(f"{SET}/result")) >= n)  # type: ignore[misc]
            got = w.on(f"{SET}/result")[-1].json()
            assert {k: got[k] for k in expected} == expected, (body, got)
            assert got["tag"] == "lathe-1/speed"
            if b'"id"' in body:
                assert got["id"] == json.loads(body)["id"]
            if not got["ok"]:
                assert got["error"]
        # A read-only tag has no command topic: nothing listens, nothing answers.
        w.client.publish(f"{LATHE}/count/set", b'{"value": 1}', qos=1)
        await w.settle(0.5)
        assert w.on(f"{LATHE}/count/set/result") == []
        # The next poll publishes the written value.
        await w.wait(lambda: (m := w.latest(f"{LATHE}/speed")) and m.json()["value"] == 1450)
    # Exactly the one valid command reached the machine.
    assert dev.writes == [(Table.HOLDING, 0, [1450])]
    audit = [json.loads(x) for x in (tmp_path / "data" / AUDIT_FILE).read_text().splitlines()]
    # Every attempt; malformed ones once a minute per topic (the later two are only answered).
    assert [(a["result"], a["user"]) for a in audit] == [
        ("ok", "mqtt"),
        ("out_of_range", "mqtt"),
        ("bad_type", "mqtt"),
        ("bad_request", "mqtt"),
    ]
    assert audit[3]["requested"] == "1450"
    assert audit[0]["origin"].endswith(SET)

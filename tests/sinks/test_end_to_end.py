"""End to end: simulated machines -> gateway -> mosquitto subscriber, OPC UA client, the page.

One machine is killed mid-run and restarted: every northbound view must say so, keep the last
value as Bad meanwhile, and come back Good on its own.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from pathlib import Path

import httpx
from asyncua import Client, ua

from drivers.modbus.simulator import Lathe, Mill
from drivers.modbus.transport import RegisterServer
from gateway.app import Gateway, build_sinks
from gateway.config import LoadedConfig, load_config
from tests.conftest import free_port
from tests.sinks.conftest import Watcher

DEMO = Path(__file__).resolve().parents[2] / "config" / "demo.yaml"
TOPIC = "uns/demo-plant/machining/line-1"


def demo_on_free_ports(tmp_path: Path, lathe: int, mill: int, broker: int) -> LoadedConfig:
    loaded = load_config(DEMO)
    cfg = loaded.config
    assert cfg.mqtt is not None
    assert cfg.opcua is not None
    assert cfg.web is not None
    ports = {"lathe-1-cnc": lathe, "mill-1-cnc": mill}
    devices = [d.model_copy(update={"port": ports[d.name]}) for d in cfg.devices]
    cfg = cfg.model_copy(
        update={
            "devices": devices,
            "gateway": cfg.gateway.model_copy(update={"data_dir": str(tmp_path / "data")}),
            "mqtt": cfg.mqtt.model_copy(update={"port": broker}),
            "opcua": cfg.opcua.model_copy(update={"port": free_port()}),
            "web": cfg.web.model_copy(update={"port": free_port()}),
        }
    )
    return LoadedConfig(tmp_path / "gateway.yaml", cfg)


async def eventually(check: Callable[[], object], within: float, what: str) -> None:
    deadline = time.monotonic() + within
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {within} s: {what}")
        await asyncio.sleep(0.1)


async def get_json(url: str) -> object:
    # Async: the page is served by the same event loop as this test.
    async with httpx.AsyncClient(timeout=5) as http:
        return (await http.get(url)).json()


async def test_machine_killed_and_restarted_mid_run(tmp_path: Path, mosquitto: int) -> None:
    lathe_port, mill_port = free_port(), free_port()
    loaded = demo_on_free_ports(tmp_path, lathe_port, mill_port, mosquitto)
    assert loaded.config.opcua is not None
    assert loaded.config.web is not None
    opc_url = f"opc.tcp://127.0.0.1:{loaded.config.opcua.port}"
    web = f"http://127.0.0.1:{loaded.config.web.port}"
    lathe = Lathe(unit_id=1)
    lathe_server = RegisterServer([lathe], port=lathe_port)
    await lathe_server.start()
    mill_server = RegisterServer([Mill(unit_id=1)], port=mill_port)
    await mill_server.start()
    gw = Gateway(loaded)
    stop = asyncio.Event()
    task = asyncio.create_task(gw.run(stop, build_sinks(gw)), name="gateway")
    client = Client(opc_url, timeout=5)
    try:
        async with Watcher(mosquitto, f"{TOPIC}/#") as mq:
            clock = f"{TOPIC}/lathe-1/clock_ms"
            await mq.wait(lambda: (m := mq.latest(clock)) and m.json()["quality"] == "good", 15)
            await client.connect()
            ns = await client.get_namespace_index("urn:retrofit-gateway:demo-gw")
            clock_node = client.get_node(ua.NodeId("lathe-1/lathe-1-cnc/clock_ms", ns))
            online_node = client.get_node(ua.NodeId("lathe-1/lathe-1-cnc#online", ns))

            # All three views agree the machine is up and its clock is current.
            dv = await clock_node.read_data_value(raise_on_bad_status=False)
            assert dv.StatusCode is not None
            assert dv.StatusCode.is_good()
            assert abs(dv.Value.Value / 1000 - time.time()) < 5
            assert await online_node.read_value() is True
            mq_clock = mq.latest(clock)
            assert mq_clock is not None
            assert mq_clock.retain is False or mq_clock.retain is True  # live or retained
            assert abs(mq_clock.json()["value"] / 1000 - time.time()) < 5
            devices = await get_json(f"{web}/api/devices")
            assert isinstance(devices, list)
            assert {d["name"]: d["state"] for d in devices} == {
                "lathe-1-cnc": "online",
                "mill-1-cnc": "online",
            }

            # Kill the lathe.
            await lathe_server.stop()
            await mq.wait(lambda: (m := mq.latest(clock)) and m.json()["quality"] == "bad", 10)
            bad = mq.latest(clock)
            assert bad is not None
            body = bad.json()
            assert body["value"] is not None  # last value kept ...
            assert body["reason"] in ("no_communication", "timeout")  # ... and why it is Bad
            status = mq.latest(f"{TOPIC}/lathe-1/$status")
            assert status is not None
            assert status.json()["state"] == "offline"

            async def opc_bad() -> bool:
                dv = await clock_node.read_data_value(raise_on_bad_status=False)
                return dv.StatusCode is not None and dv.StatusCode.is_bad()

            for _ in range(50):
                if await opc_bad():
                    break
                await asyncio.sleep(0.1)
            dv = await clock_node.read_data_value(raise_on_bad_status=False)
            assert dv.StatusCode is not None
            assert dv.StatusCode.is_bad()
            assert dv.Value.Value is not None
            assert await online_node.read_value() is False
            devices = await get_json(f"{web}/api/devices")
            assert isinstance(devices, list)
            assert {d["name"]: d["state"] for d in devices}["lathe-1-cnc"] == "offline"
            # The other machine never noticed.
            mill = mq.latest(f"{TOPIC}/mill-1/clock_ms")
            assert mill is not None
            assert mill.json()["quality"] == "good"

            # Restart it: everything recovers on its own (backoff is at most a few seconds).
            lathe_server = RegisterServer([lathe], port=lathe_port)
            await lathe_server.start()
            await mq.wait(lambda: (m := mq.latest(clock)) and m.json()["quality"] == "good", 20)
            recovered = mq.latest(clock)
            assert recovered is not None
            assert recovered.json()["ts_ms"] > body["ts_ms"]
            for _ in range(50):
                dv = await clock_node.read_data_value(raise_on_bad_status=False)
                if dv.StatusCode is not None and dv.StatusCode.is_good():
                    break
                await asyncio.sleep(0.1)
            assert dv.StatusCode is not None
            assert dv.StatusCode.is_good()
            assert await online_node.read_value() is True
            status = mq.latest(f"{TOPIC}/lathe-1/$status")
            assert status is not None
            assert status.json()["state"] == "online"

            await client.disconnect()
            stop.set()
            await asyncio.wait_for(task, 30)
            await mq.settle(0.5)
            gateway_state = mq.latest(f"{TOPIC}/$gateway/demo-gw")
            assert gateway_state is not None
            assert gateway_state.json()["state"] == "offline"
    finally:
        stop.set()
        if not task.done():
            await asyncio.wait_for(task, 30)
        await lathe_server.stop()
        await mill_server.stop()

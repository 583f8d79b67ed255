"""The status page sink against its real uvicorn server, a real Gateway and simulated machines.

Every test binds 127.0.0.1 on a free port. The browser test drives Debian's chromium through
Playwright (never a downloaded browser) and leaves screenshots in ``artifacts/``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import signal
import socket
import threading
import time
from collections.abc import AsyncGenerator, AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from drivers.modbus.config import Table
from drivers.modbus.simulator import Lathe, Mill, RegisterMapDevice
from drivers.modbus.transport import RegisterServer
from gateway import __version__
from gateway.app import Gateway
from gateway.config import GatewayConfig, LoadedConfig, WebSection, load_config
from gateway.errors import GatewayError
from gateway.sinks.web import WebSink, _is_loopback
from gateway.status import DeviceState
from tests.conftest import free_port

ROOT = Path(__file__).resolve().parents[2]
ARTIFACTS = ROOT / "artifacts"
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--headless=new",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
HAVE_CHROMIUM = Path(CHROMIUM).exists()
METRIC_LINE = re.compile(
    r'^[a-zA-Z_:][a-zA-Z0-9_:]*(\{([a-zA-Z_][a-zA-Z0-9_]*="([^"\\\n]|\\.)*",?)*\})? '
    r"(-?[0-9.eE+-]+|NaN|[+-]Inf)$"
)


@dataclass
class Running:
    gw: Gateway
    sink: WebSink
    url: str
    lathe: RegisterServer
    mill: RegisterServer


def demo_config(web_port: int, lathe_port: int, mill_port: int) -> LoadedConfig:
    """config/demo.yaml (it matches the simulator's register map) on test ports, web only."""
    loaded = load_config(ROOT / "config" / "demo.yaml")
    cfg = loaded.config
    ports = {"lathe-1": lathe_port, "mill-1": mill_port}
    devices = [d.model_copy(update={"port": ports[d.machine]}) for d in cfg.devices]
    cfg = cfg.model_copy(
        update={
            "devices": devices,
            "web": WebSection(host="127.0.0.1", port=web_port),
            "mqtt": None,
            "opcua": None,
        }
    )
    return LoadedConfig(loaded.path, cfg)


@contextlib.asynccontextmanager
async def running_gateway(web_port: int) -> AsyncIterator[Running]:
    lathe = RegisterServer([Lathe(unit_id=1)], port=free_port())
    mill = RegisterServer([Mill(unit_id=1)], port=free_port())
    await lathe.start()
    await mill.start()
    gw = Gateway(demo_config(web_port, lathe.port, mill.port))
    assert gw.config.web is not None
    sink = WebSink(gw, gw.config.web)
    stop = asyncio.Event()
    task = asyncio.create_task(gw.run(stop, sinks=[sink]), name="gateway")
    try:
        url = f"http://127.0.0.1:{web_port}"
        await wait_until_online(gw, url)
        yield Running(gw, sink, url, lathe, mill)
    finally:
        stop.set()
        await asyncio.wait_for(task, 10)
        await lathe.stop()
        await mill.stop()


async def wait_until_online(gw: Gateway, url: str) -> None:
    async with httpx.AsyncClient(base_url=url, timeout=2) as client:
        for _ in range(100):
            with contextlib.suppress(httpx.TransportError):
                r = await client.get("/healthz")
                if r.status_code == 200 and all(
                    s.state is DeviceState.ONLINE for s in gw.statuses.values()
                ):
                    return
            await asyncio.sleep(0.05)
    raise AssertionError("gateway did not come online")


def handlers() -> tuple[object, object]:
    return signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)


async def test_api_against_the_real_server(port: int) -> None:
    before = handlers()
    async with (
        running_gateway(port) as rt,
        httpx.AsyncClient(base_url=rt.url, timeout=5) as client,
    ):
        # uvicorn.Server.serve would have installed its own handlers by now.
        assert handlers() == before

        r = await client.get("/api/status")
        assert r.status_code == 200
        status = r.json()
        assert status["gateway"]["name"] == "demo-gw"
        assert status["gateway"]["line"] == "line-1"
        assert status["gateway"]["version"] == __version__
        assert 0 < status["gateway"]["uptime_s"] < 30
        assert status["devices"] == {
            "total": 2,
            "online": 2,
            "offline": 0,
            "starting": 0,
            "stopped": 0,
        }
        assert status["tags"]["total"] == len(rt.gw.tags)
        assert status["healthy"] is True
        assert status["sinks"]["web"]["listening"] is True

        r = await client.get("/api/devices")
        devices = {d["name"]: d for d in r.json()}
        assert set(devices) == {"lathe-1-cnc", "mill-1-cnc"}
        lathe = devices["lathe-1-cnc"]
        assert lathe["state"] == "online"
        assert lathe["good_polls"] >= 1
        assert lathe["machine"] == "lathe-1"
        assert set(lathe) == set(rt.gw.statuses["lathe-1-cnc"].as_dict())

        r = await client.get("/api/tags", params={"machine": "lathe-1"})
        tags = r.json()
        assert {t["machine"] for t in tags} == {"lathe-1"}
        assert len(tags) == sum(1 for t in rt.gw.tags if t.machine == "lathe-1")
        by_name = {t["name"]: t for t in tags}
        speed = by_name["spindle_speed"]
        assert speed["unit"] == "rpm"
        assert speed["quality"] == "good"
        assert speed["device"] == "lathe-1-cnc"
        assert isinstance(speed["value"], int)
        assert 0 <= speed["age_s"] < 5
        assert by_name["model"]["value"] == "LT-250 CNC LATHE"
        assert isinstance(by_name["door_closed"]["value"], bool)
        assert set(speed) == {
            "key",
            "machine",
            "device",
            "name",
            "value",
            "unit",
            "quality",
            "reason",
            "detail",
            "source_ts",
            "age_s",
        }
        everything = (await client.get("/api/tags")).json()
        assert len(everything) == len(rt.gw.tags)
        r = await client.get("/api/tags", params={"machine": "lathe-9"})
        assert r.status_code == 404
        assert "lathe-1" in r.json()["detail"]

        schema = (await client.get("/openapi.json")).json()
        for path in ("/api/status", "/api/devices", "/api/tags", "/healthz", "/metrics"):
            assert path in schema["paths"], path
        tag_schema = schema["components"]["schemas"]["TagOut"]["properties"]
        assert "quality" in tag_schema
        assert "age_s" in tag_schema

        r = await client.get("/healthz")
        assert (r.status_code, r.json()) == (200, {"status": "ok"})

        # What the MQTT and OPC UA sinks keep in their health entries.
        rt.gw.health["mqtt"] = {"connected": True, "queued": 3, "published": 10, "dropped": 1}
        rt.gw.health["opcua"] = {"endpoint": "opc.tcp://127.0.0.1:4840", "sessions": 2}
        r = await client.get("/metrics")
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/plain; version=0.0.4")
        metrics = parse_metrics(r.text)
        labels = 'device="lathe-1-cnc",machine="lathe-1"'
        assert metrics[f"retrofit_gw_device_polls_total{{{labels}}}"] >= 1
        assert metrics[f"retrofit_gw_device_good_polls_total{{{labels}}}"] >= 1
        assert metrics[f"retrofit_gw_device_up{{{labels}}}"] == 1
        assert f"retrofit_gw_device_last_poll_duration_seconds{{{labels}}}" in metrics
        assert metrics[f"retrofit_gw_device_overruns_total{{{labels}}}"] == 0
        assert metrics[f'retrofit_gw_device_breaker_state{{{labels},state="closed"}}'] == 1
        assert metrics[f'retrofit_gw_device_breaker_state{{{labels},state="open"}}'] == 0
        assert metrics[f"retrofit_gw_device_breaker_trips_total{{{labels}}}"] == 0
        assert metrics[f"retrofit_gw_device_skipped_polls_total{{{labels}}}"] == 0
        assert metrics["retrofit_gw_bus_published_values_total"] > 0
        assert metrics['retrofit_gw_bus_dropped_batches_total{subscriber="web"}'] == 0
        assert "# TYPE retrofit_gw_device_polls_total counter" in r.text
        assert metrics["retrofit_gw_mqtt_connected"] == 1
        assert metrics["retrofit_gw_mqtt_queued"] == 3
        assert metrics["retrofit_gw_mqtt_published_total"] == 10
        assert metrics["retrofit_gw_mqtt_dropped_total"] == 1
        assert metrics["retrofit_gw_opcua_sessions"] == 2

        r = await client.get("/")
        assert r.status_code == 200
        assert "script-src 'self'" in r.headers["content-security-policy"]
        assert 'data-k="lathe-1/spindle_speed"' in r.text
        assert "demo-plant / machining / line-1" in r.text
        assert "opc.tcp://127.0.0.1:4840" in r.text
        assert "CONNECTED" in r.text
        assert handlers() == before
    assert handlers() == before


def parse_metrics(text: str) -> dict[str, float]:
    out: dict[str, float] = {}
    helped: set[str] = set()
    for line in text.splitlines():
        if line.startswith("# HELP "):
            helped.add(line.split()[2])
            continue
        if line.startswith("#"):
            continue
        assert METRIC_LINE.match(line), line
        name, _, value = line.rpartition(" ")
        assert name.split("{")[0] in helped, line
        out[name] = float(value)
    return out


async def test_stream_sends_a_snapshot_then_only_what_changed(port: int) -> None:
    async with (
        running_gateway(port) as rt,
        httpx.AsyncClient(base_url=rt.url, timeout=5) as client,
        client.stream("GET", "/api/stream") as r,
    ):
        assert r.headers["content-type"].startswith("text/event-stream")
        events = sse_events(r.aiter_lines())
        first = await anext(events)
        assert set(first["g"]) == {t.key for t in rt.gw.tags}
        assert first["s"] == {"on": 2, "n": 2}
        update = await anext(events)
        assert "lathe-1/clock_ms" in update["g"]
        text, quality, reason, _detail, ts = update["g"]["lathe-1/clock_ms"]
        assert int(text) > 0
        assert (quality, reason) == (0, "")
        assert ts > time.time() - 5
        # A machine that stops answering: its tags turn Bad once, then nothing changes.
        await rt.mill.stop()
        quiet = None
        for _ in range(8):
            update = await asyncio.wait_for(anext(events), 3)
            mill_tags = [k for k in update["g"] if k.startswith("mill-1/")]
            if update["d"].get("mill-1-cnc", {}).get("state") == "offline":
                assert update["g"]["mill-1/spindle_speed"][1] == 2
            elif not mill_tags and "mill-1-cnc" not in update["d"]:
                quiet = update
                break
        assert quiet is not None, "the offline machine kept sending"
        assert "lathe-1/clock_ms" in quiet["g"]  # the other one did not stop
        await events.aclose()


async def sse_events(lines: AsyncIterator[str]) -> AsyncGenerator[dict[str, Any]]:
    data: list[str] = []
    async for line in lines:
        if line.startswith("data: "):
            data.append(line[6:])
        elif not line and data:
            yield json.loads("\n".join(data))
            data = []


async def test_port_in_use_fails_clearly_and_leaves_nothing_running(port: int) -> None:
    threads = set(threading.enumerate())
    tasks = set(asyncio.all_tasks())
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", port))
        taken.listen()
        gw = Gateway(demo_config(port, free_port(), free_port()))
        sink = WebSink(gw, WebSection(host="127.0.0.1", port=port))
        with pytest.raises(
            GatewayError, match=rf"web: cannot listen on 127\.0\.0\.1:{port}: .*in use"
        ):
            await sink.start()
        assert set(asyncio.all_tasks()) == tasks
        assert set(threading.enumerate()) == threads
        await sink.close()
        await sink.close()
    # The sink is not wedged by the failure: once the port is free it starts.
    await sink.start()
    try:
        async with httpx.AsyncClient(timeout=5) as client:
            r = await client.get(f"http://127.0.0.1:{port}/healthz")
            assert r.status_code == 200
    finally:
        await sink.close()
    assert set(asyncio.all_tasks()) == tasks


async def test_healthz_tells_a_stalled_or_stopping_runtime_from_a_dead_device(port: int) -> None:
    gw = Gateway(demo_config(port, free_port(), free_port()))
    sink = WebSink(gw, WebSection(host="127.0.0.1", port=port))
    await sink.start()
    url = f"http://127.0.0.1:{port}/healthz"
    try:
        async with httpx.AsyncClient(timeout=5) as client:
            # Just started, nothing polled yet: the start-up grace period.
            assert (await client.get(url)).status_code == 200
            now = time.time()
            gw.started_at = now - 60
            r = await client.get(url)
            assert r.status_code == 503
            assert "no device has finished a poll attempt" in r.json()["problem"]
            # One device failing on schedule is a dead device, not a broken runtime.
            lathe = gw.statuses["lathe-1-cnc"]
            lathe.state = DeviceState.OFFLINE
            lathe.last_error_ts = now - 2
            assert (await client.get(url)).status_code == 200
            # Offline devices reconnect with a backoff of up to 30 s: still alive.
            lathe.last_error_ts = now - 35
            assert (await client.get(url)).status_code == 200
            lathe.last_error_ts = now - 45
            assert (await client.get(url)).status_code == 503
            lathe.state = DeviceState.ONLINE
            lathe.last_success_ts = now - 1
            assert (await client.get(url)).status_code == 200
            # The bus closes once every driver stopped: the gateway is shutting down.
            sub = gw.bus.subscribe("web")
            gw.bus.close()
            await sink.run(sub)
            r = await client.get(url)
            assert r.status_code == 503
            assert r.json() == {"status": "unavailable", "problem": "the gateway is shutting down"}
    finally:
        await sink.close()


class Box(RegisterMapDevice):
    def __init__(self) -> None:
        super().__init__(unit_id=1)
        self.serve(Table.HOLDING, 0, 2)


async def test_page_escapes_names_and_messages(port: int) -> None:
    evil = '<img src=x onerror="alert(1)">'
    cfg = GatewayConfig.model_validate(
        {
            "gateway": {"name": f"gw{evil}", "site": "s&", "area": "a", "line": "l"},
            "web": {"port": port},
            "devices": [
                {
                    "name": 'plc"<b>\\',
                    "driver": "modbus_tcp",
                    "machine": "m<i>",
                    "host": "127.0.0.1",
                    "port": free_port(),
                    "addressing": "zero_based",
                    "tags": [
                        {
                            "name": "t<script>",
                            "table": "holding",
                            "address": 0,
                            "unit": "<u>",
                            "description": evil,
                        }
                    ],
                }
            ],
        }
    )
    gw = Gateway(LoadedConfig(Path("x.yaml"), cfg))
    device = gw.statuses['plc"<b>\\']
    device.last_error = f"refused {evil}"
    device.last_error_ts = time.time()
    sink = WebSink(gw, WebSection(host="127.0.0.1", port=port))
    await sink.start()
    try:
        async with httpx.AsyncClient(timeout=5) as client:
            page = (await client.get(f"http://127.0.0.1:{port}/")).text
            metrics = (await client.get(f"http://127.0.0.1:{port}/metrics")).text
            tags = (await client.get(f"http://127.0.0.1:{port}/api/tags")).json()
    finally:
        await sink.close()
    assert "<img" not in page
    assert "<script>" not in page
    assert "<b>" not in page
    assert "<i>" not in page
    assert "<u>" not in page
    assert "&lt;img src=x onerror=&quot;alert(1)&quot;&gt;" in page
    assert 'data-k="m&lt;i&gt;/t&lt;script&gt;"' in page
    assert 'data-d="plc&quot;&lt;b&gt;\\"' in page
    # Prometheus label values escape backslash, double quote and newline.
    parse_metrics(metrics)
    assert 'retrofit_gw_device_polls_total{device="plc\\"<b>\\\\",machine="m<i>"} 0' in metrics
    assert tags[0]["key"] == "m<i>/t<script>"
    assert tags[0]["unit"] == "<u>"


def save_artifact(name: str, png: bytes) -> None:
    """Written here, not by Playwright: its ``path=`` starts the loop's default executor, a
    thread that outlives the test."""
    ARTIFACTS.mkdir(exist_ok=True)
    (ARTIFACTS / name).write_bytes(png)


async def test_browser_page_updates_live_and_shows_a_device_going_offline(port: int) -> None:
    playwright_api = pytest.importorskip("playwright.async_api")
    if not HAVE_CHROMIUM:
        pytest.skip("Debian chromium is not installed")
    async with running_gateway(port) as rt, playwright_api.async_playwright() as pw:
        browser = await pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            page = await browser.new_page(viewport={"width": 1280, "height": 900})
            errors: list[str] = []
            page.on("pageerror", lambda exc: errors.append(str(exc)))
            await page.goto(rt.url + "/")
            clock = 'tr[data-k="lathe-1/clock_ms"] .val'
            first = await page.text_content(clock)
            assert first is not None
            assert int(first) > 0
            # A marker that a reload would wipe out.
            await page.evaluate("window.__noReload = true")
            await page.wait_for_function(
                "([sel, old]) => document.querySelector(sel).textContent !== old",
                arg=[clock, first],
                timeout=15000,
            )
            assert await page.evaluate("window.__noReload === true")
            second = await page.text_content(clock)
            assert second is not None
            assert int(second) > int(first)

            await rt.mill.stop()
            state = 'article[data-d="mill-1-cnc"] [data-f="state"]'
            await page.wait_for_function(
                "(sel) => document.querySelector(sel).textContent === 'OFFLINE'",
                arg=state,
                timeout=15000,
            )
            assert await page.text_content('article[data-d="lathe-1-cnc"] [data-f="state"]') == (
                "ONLINE"
            )
            bad = 'tr[data-k="mill-1/spindle_speed"] .qb'
            await page.wait_for_function(
                "(sel) => document.querySelector(sel).textContent === 'BAD'", arg=bad, timeout=10000
            )
            assert await page.is_visible('article[data-d="mill-1-cnc"] .lasterr')
            # Refused connections in a row open the mill's breaker; the page counts down.
            brk = 'article[data-d="mill-1-cnc"] [data-f="brk"]'
            await page.wait_for_function(
                "(sel) => /^OPEN · probe in \\d+ s \\(1 trip\\)$/"
                ".test(document.querySelector(sel).textContent)",
                arg=brk,
                timeout=15000,
            )
            assert await page.text_content('article[data-d="lathe-1-cnc"] [data-f="brk"]') == (
                "closed"
            )
            # The header tells whether timestamps can be trusted (injected: synchronised).
            assert await page.text_content('[data-sink="clock"] [data-f="synced"]') == "SYNCED"
            # The MQTT card shows the buffer (not configured here: no numbers, no errors).
            assert await page.is_visible('[data-sink="mqtt"]')
            assert await page.evaluate("window.__noReload === true")
            await page.wait_for_selector("#conn", state="hidden", timeout=10000)
            await page.wait_for_timeout(1100)  # let ages tick once more for the picture
            save_artifact("status-page.png", await page.screenshot(full_page=True))

            phone = await browser.new_page(
                viewport={"width": 390, "height": 844}, device_scale_factor=2, is_mobile=True
            )
            await phone.goto(rt.url + "/")
            await phone.wait_for_function(
                "(sel) => document.querySelector(sel).textContent === 'OFFLINE'",
                arg=state,
                timeout=15000,
            )
            # Nothing may stick out sideways on a phone.
            width = await phone.evaluate("document.documentElement.scrollWidth")
            assert width <= 390
            save_artifact("status-page-phone.png", await phone.screenshot(full_page=True))

            # The gateway goes away: the page says so instead of showing frozen numbers.
            await rt.sink.close()
            await page.wait_for_selector("#conn", state="visible", timeout=15000)
            assert errors == []
        finally:
            await browser.close()


@pytest.mark.parametrize(
    ("host", "loopback"),
    [
        ("127.0.0.1", True),
        ("127.0.1.1", True),
        ("::1", True),
        ("localhost", True),
        ("0.0.0.0", False),
        ("::", False),
        ("192.168.1.20", False),
        ("gateway.local", False),
    ],
)
def test_anything_but_loopback_counts_as_exposed(host: str, loopback: bool) -> None:
    assert _is_loopback(host) is loopback

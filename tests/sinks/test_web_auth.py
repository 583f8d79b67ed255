"""The status page's login, sessions, bearer tokens, CSRF, headers and bind rule.

httpx against the real uvicorn server, always on 127.0.0.1 (the 0.0.0.0 case is bound to
loopback by design, and asserted). Requests with ``X-Forwarded-For`` stand for other clients:
uvicorn believes that header from 127.0.0.1 only, as from a reverse proxy on the box. The
browser test drives Debian's chromium through Playwright, as tests/sinks/test_web.py does.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import re
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import psutil
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from drivers.modbus.simulator import Lathe, Mill
from drivers.modbus.transport import RegisterServer
from gateway import certs
from gateway.app import Gateway
from gateway.auth import hash_password
from gateway.config import LoadedConfig, WebSection, WebToken, load_config
from gateway.errors import ConfigError, GatewayError
from gateway.sinks.web import WebSink
from gateway.sinks.web_auth import LoginThrottle, Sessions, bind_host
from tests.conftest import free_port
from tests.sinks.test_web import (
    CHROMIUM,
    CHROMIUM_ARGS,
    HAVE_CHROMIUM,
    ROOT,
    parse_metrics,
    save_artifact,
)

PASSWORD = "Späne und Öl 42"
TOKEN = "tok-3f1c9a7e52b84d0e9d6a41c2b7e8f015"
OTHER = {"X-Forwarded-For": "192.0.2.66"}
NEEDS_LOGIN = (
    "/api/status",
    "/api/devices",
    "/api/tags",
    "/api/audit",
    "/api/certs",
    "/api/stream",
    "/metrics",
    "/openapi.json",
    "/docs",
    "/no/such/page",
)


@functools.cache
def password_hash() -> str:
    return hash_password(PASSWORD)


@functools.cache
def token_hash() -> str:
    return hash_password(TOKEN)


def section(port: int, *, password: bool = True, tokens: bool = False, **kw: Any) -> WebSection:
    return WebSection(
        port=port,
        password_hash=password_hash() if password else None,
        tokens=[WebToken(name="scada", token_hash=token_hash())] if tokens else [],
        **kw,
    )


def config(data_dir: Path, web: WebSection, lathe: int = 1, mill: int = 1) -> LoadedConfig:
    """config/demo.yaml with its OPC UA section (never started here: the page only needs to
    know OPC UA is configured), its state in ``data_dir``."""
    loaded = load_config(ROOT / "config" / "demo.yaml")
    cfg = loaded.config
    ports = {"lathe-1": lathe, "mill-1": mill}
    devices = [d.model_copy(update={"port": ports[d.machine]}) for d in cfg.devices]
    gateway = cfg.gateway.model_copy(update={"data_dir": str(data_dir)})
    cfg = cfg.model_copy(update={"gateway": gateway, "devices": devices, "web": web, "mqtt": None})
    return LoadedConfig(loaded.path, cfg)


@dataclass
class Served:
    gw: Gateway
    sink: WebSink
    url: str


@contextlib.asynccontextmanager
async def serving(data_dir: Path, web: WebSection) -> AsyncIterator[Served]:
    """The web sink alone on a Gateway that does not poll (nothing here needs values)."""
    gw = Gateway(config(data_dir, web))
    sink = WebSink(gw, web)
    await sink.start()
    try:
        yield Served(gw, sink, f"http://127.0.0.1:{sink.port}")
    finally:
        await sink.close()


def client_cert(common_name: str) -> bytes:
    """A self-signed OPC UA client certificate, as a client application would present."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    now = datetime.now(UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(minutes=5))
        .not_valid_after(now + timedelta(days=30))
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.UniformResourceIdentifier(f"urn:test:{common_name}")]
            ),
            critical=False,
        )
        .sign(key, hashes.SHA256())
    )
    return cert.public_bytes(serialization.Encoding.DER)


def rejected_cert(data_dir: Path, common_name: str) -> certs.CertificateInfo:
    """A client refused by the OPC UA server, through the same call the server makes."""
    info, written = certs.TrustList(data_dir).refuse(client_cert(common_name))
    assert written
    return info


def state_of(data_dir: Path, cert_id: str) -> str:
    return next(c.state for c in certs.list_certificates(data_dir) if c.id == cert_id)


def csrf_in(page: str) -> str:
    found = re.search(r'name="csrf" value="([^"]+)"', page)
    assert found is not None, "no CSRF field in the page"
    return found.group(1)


async def login(
    client: httpx.AsyncClient, password: str = PASSWORD, headers: dict[str, str] | None = None
) -> httpx.Response:
    form = await client.get("/login", headers=headers)
    assert form.status_code == 200
    data = {"csrf": csrf_in(form.text), "password": password}
    return await client.post("/login", data=data, headers=headers)


async def session_csrf(client: httpx.AsyncClient) -> str:
    """The logged-in page's CSRF token (every form on it carries the same one)."""
    page = await client.get("/")
    assert page.status_code == 200
    return csrf_in(page.text)


# --- the rule: who may see what ---------------------------------------------------------------


async def test_without_a_password_loopback_is_open_and_changes_are_unavailable(
    port: int, tmp_path: Path
) -> None:
    info = rejected_cert(tmp_path, "hmi-panel")
    async with (
        serving(tmp_path, section(port, password=False)) as srv,
        httpx.AsyncClient(base_url=srv.url, timeout=5) as client,
    ):
        assert srv.sink.host == "127.0.0.1"
        page = await client.get("/")
        assert page.status_code == 200
        assert 'id="certs"' in page.text
        assert f'data-cert="{info.id}"' in page.text
        # No login, so no form to change anything, and the page says what would allow it.
        assert "<form" not in page.text
        assert "retrofit-gw passwd" in page.text
        for path in ("/api/status", "/api/audit", "/api/certs", "/metrics", "/openapi.json"):
            assert (await client.get(path)).status_code == 200, path
        r = await client.post(f"/api/certs/{info.id}/trust")
        assert r.status_code == 403
        assert "retrofit-gw passwd" in r.json()["detail"]
        assert state_of(tmp_path, info.id) == "rejected"
        r = await client.get("/login")
        assert r.status_code == 200
        assert "No password is set" in r.text
        assert 'type="password"' not in r.text
        r = await client.post("/login", data={"password": "anything"})
        assert r.status_code in (403, 404)
        metrics = parse_metrics((await client.get("/metrics")).text)
        assert metrics["retrofit_gw_web_login_required"] == 0
        assert srv.gw.health["web"]["login"] == "none (loopback)"


async def test_with_a_password_everything_but_healthz_needs_a_login(
    port: int, tmp_path: Path
) -> None:
    async with (
        serving(tmp_path, section(port)) as srv,
        httpx.AsyncClient(base_url=srv.url, timeout=5) as client,
    ):
        r = await client.get("/")
        assert r.status_code == 303
        assert r.headers["location"] == "login"
        for path in NEEDS_LOGIN:
            r = await client.get(path)
            assert r.status_code == 401, path
            assert r.headers["www-authenticate"].startswith("Bearer"), path
        for path in ("/api/certs/0123456789abcdef/trust", "/logout"):
            r = await client.post(path)
            assert r.status_code in (303, 401), path
        # A cookie that is not a session is no session.
        client.cookies.set(srv.sink.session_cookie, "forged")
        assert (await client.get("/api/status")).status_code == 401
        client.cookies.clear()
        r = await client.get("/healthz")
        assert (r.status_code, r.json()) == (200, {"status": "ok"})
        assert (await client.get("/static/page.css")).status_code == 200
        form = await client.get("/login")
        assert form.status_code == 200
        assert 'type="password"' in form.text
        assert 'autocomplete="current-password"' in form.text
        assert 'name="viewport"' in form.text
        # Nothing from elsewhere: every link and source is relative to the gateway.
        assert not re.search(r'(src|href|action)="(https?:)?//', form.text)


async def test_wrong_passwords_are_throttled_per_client_and_a_login_lasts_until_logout(
    port: int, tmp_path: Path
) -> None:
    async with (
        serving(tmp_path, section(port)) as srv,
        httpx.AsyncClient(base_url=srv.url, timeout=10) as client,
    ):
        for _ in range(5):
            r = await login(client, "wrong", headers=OTHER)
            assert r.status_code == 401
            assert "Wrong password." in r.text
            assert srv.sink.session_cookie not in r.cookies
        r = await login(client, "wrong", headers=OTHER)
        assert r.status_code == 429
        assert 250 <= int(r.headers["retry-after"]) <= 300
        assert "Too many failed logins" in r.text
        # Even the right password is not checked now, from that address.
        r = await login(client, headers=OTHER)
        assert r.status_code == 429
        # A login form without its token (another site's, say) is refused before the password.
        r = await client.post("/login", data={"password": PASSWORD})
        assert r.status_code == 403

        # Another address is not locked out by the first one's failures.
        r = await login(client)
        assert r.status_code == 303
        assert r.headers["location"] == "./"
        cookie = r.headers["set-cookie"]
        assert cookie.startswith(f"{srv.sink.session_cookie}=")
        assert "HttpOnly" in cookie
        assert "SameSite=strict" in cookie or "SameSite=Strict" in cookie
        assert "Path=/" in cookie
        assert "Max-Age=43200" in cookie  # session_hours defaults to 12
        assert "Secure" not in cookie  # plain HTTP here; behind a TLS proxy it is set
        sid = r.cookies[srv.sink.session_cookie]
        assert len(sid) >= 43  # 256 bits, base64url

        page = await client.get("/")
        assert page.status_code == 200
        assert "Log out" in page.text
        assert (await client.get("/api/status")).status_code == 200
        assert (await client.get("/login")).status_code == 303  # already logged in
        metrics = parse_metrics((await client.get("/metrics")).text)
        assert metrics["retrofit_gw_web_login_required"] == 1
        assert metrics["retrofit_gw_web_login_failures_total"] == 5
        assert metrics["retrofit_gw_web_login_throttled_total"] == 2
        assert metrics["retrofit_gw_web_sessions"] == 1

        csrf = csrf_in(page.text)
        r = await client.post("/logout", data={"csrf": csrf})
        assert r.status_code == 303
        assert r.headers["location"] == "login"
        assert (await client.get("/")).status_code == 303
        # The old cookie is dead on the server too, not only deleted in this client.
        client.cookies.set(srv.sink.session_cookie, sid)
        assert (await client.get("/api/status")).status_code == 401
        assert len(srv.sink.sessions) == 0


async def test_a_session_ends_after_session_hours(port: int, tmp_path: Path) -> None:
    async with (
        serving(tmp_path, section(port, session_hours=1 / 3600)) as srv,
        httpx.AsyncClient(base_url=srv.url, timeout=10) as client,
    ):
        assert (await login(client)).status_code == 303
        assert (await client.get("/api/status")).status_code == 200
        await asyncio.sleep(1.1)
        assert (await client.get("/api/status")).status_code == 401


async def test_the_live_stream_ends_with_its_login(port: int, tmp_path: Path) -> None:
    async with (
        serving(tmp_path, section(port)) as srv,
        httpx.AsyncClient(base_url=srv.url, timeout=10) as client,
    ):
        assert (await login(client)).status_code == 303
        csrf = await session_csrf(client)
        async with client.stream("GET", "/api/stream") as stream:
            assert stream.status_code == 200
            chunks = stream.aiter_bytes()
            assert b"data: " in await asyncio.wait_for(anext(chunks), 5)
            async with httpx.AsyncClient(base_url=srv.url, timeout=5) as other:
                other.cookies = client.cookies
                r = await other.post("/logout", headers={"X-CSRF-Token": csrf})
                assert r.status_code == 303
            async with asyncio.timeout(5):
                async for _ in chunks:
                    pass  # ends within a tick of the logout


async def test_bearer_tokens_for_api_clients(port: int, tmp_path: Path) -> None:
    info = rejected_cert(tmp_path, "mes-collector")
    async with (
        serving(tmp_path, section(port, tokens=True)) as srv,
        httpx.AsyncClient(base_url=srv.url, timeout=10) as client,
    ):
        good = {"Authorization": f"Bearer {TOKEN}"}
        for _ in range(3):  # the first verifies (scrypt), the others are remembered
            r = await client.get("/api/status", headers=good)
            assert r.status_code == 200
        assert (await client.get("/metrics", headers=good)).status_code == 200
        assert (await client.get("/api/audit", headers=good)).status_code == 200
        # No cookie, so no CSRF token is needed: another site cannot make a browser send it.
        r = await client.post(f"/api/certs/{info.id}/trust", headers=good)
        assert r.status_code == 200
        assert r.json()["state"] == "trusted"
        assert r.json()["id"] == info.id
        assert state_of(tmp_path, info.id) == "trusted"
        assert "set-cookie" not in r.headers

        bad = {"Authorization": "Bearer not-the-token", **OTHER}
        for _ in range(5):
            r = await client.get("/api/status", headers=bad)
            assert r.status_code == 401
        r = await client.get("/api/status", headers=bad)
        assert r.status_code == 429
        assert int(r.headers["retry-after"]) > 0
        # Basic or other schemes are not logins here.
        r = await client.get("/api/status", headers={"Authorization": "Basic c2NhZGE6eA=="})
        assert r.status_code == 401


async def test_csrf_on_changes_from_a_browser_session(port: int, tmp_path: Path) -> None:
    first = rejected_cert(tmp_path, "scada-a")
    second = rejected_cert(tmp_path, "scada-b")
    async with (
        serving(tmp_path, section(port)) as srv,
        httpx.AsyncClient(base_url=srv.url, timeout=10) as client,
    ):
        assert (await login(client)).status_code == 303
        csrf = await session_csrf(client)
        trust = f"/api/certs/{first.id}/trust"

        assert (await client.post(trust)).status_code == 403
        r = await client.post(trust, headers={"X-CSRF-Token": "x" + csrf[1:]})
        assert r.status_code == 403
        assert "CSRF" in r.json()["detail"]
        r = await client.post(trust, data={"csrf": csrf[:-1]})
        assert r.status_code == 403
        # The right token from another site's page is still another site.
        evil = {"X-CSRF-Token": csrf, "Origin": "http://evil.example"}
        assert (await client.post(trust, headers=evil)).status_code == 403
        cross = {"X-CSRF-Token": csrf, "Sec-Fetch-Site": "cross-site", "Origin": "null"}
        assert (await client.post(trust, headers=cross)).status_code == 403
        # Without a token, an unknown origin gets nowhere either.
        assert (await client.post(trust, headers={"Origin": "null"})).status_code == 403
        assert state_of(tmp_path, first.id) == "rejected"

        same = {"X-CSRF-Token": csrf, "Origin": srv.url}
        r = await client.post(trust, headers=same)
        assert r.status_code == 200
        assert r.json()["state"] == "trusted"
        assert state_of(tmp_path, first.id) == "trusted"

        # The page's own form: the token as a field, then back to the page.
        r = await client.post(f"/api/certs/{second.id}/trust", data={"csrf": csrf})
        assert r.status_code == 303
        assert r.headers["location"] == "../../../#certs"
        assert state_of(tmp_path, second.id) == "trusted"

        r = await client.post("/api/certs/ffffffffffffffff/trust", data={"csrf": csrf})
        assert r.status_code == 404
        # Logging out is a change too.
        assert (await client.post("/logout")).status_code == 403
        assert (await client.get("/api/status")).status_code == 200


async def test_security_headers_on_every_response(port: int, tmp_path: Path) -> None:
    async with (
        serving(tmp_path, section(port)) as srv,
        httpx.AsyncClient(base_url=srv.url, timeout=10) as client,
    ):
        responses = [
            await client.get(path)
            for path in ("/", "/healthz", "/login", "/api/status", "/no/such", "/static/page.js")
        ]
        responses.append(await client.post("/api/certs/abc/trust"))
        assert (await login(client)).status_code == 303
        responses += [
            await client.get(path)
            for path in ("/", "/api/status", "/api/tags", "/metrics", "/docs", "/redoc")
        ]
        for r in responses:
            where = f"{r.request.method} {r.request.url.path} -> {r.status_code}"
            csp = r.headers["content-security-policy"]
            assert "default-src 'none'" in csp, where
            assert "script-src 'self'" in csp, where
            assert "frame-ancestors 'none'" in csp, where
            assert "http" not in csp, where  # no CDN, no other origin
            assert r.headers["x-content-type-options"] == "nosniff", where
            assert r.headers["x-frame-options"] == "DENY", where
            assert r.headers["referrer-policy"] == "no-referrer", where
            if r.request.url.path.startswith("/static/"):
                assert "max-age" in r.headers["cache-control"], where
            else:
                assert r.headers["cache-control"] == "no-store", where
        # No Swagger UI or ReDoc (they load from a CDN); the schema stays, behind the login.
        assert responses[-2].status_code == 404
        assert responses[-1].status_code == 404
        assert (await client.get("/openapi.json")).status_code == 200


async def test_audit_of_writes_on_the_page_and_the_api(port: int, tmp_path: Path) -> None:
    async with (
        serving(tmp_path, section(port)) as srv,
        httpx.AsyncClient(base_url=srv.url, timeout=10) as client,
    ):
        audit = srv.gw.writes.audit
        audit.record(
            {
                "user": "op<1>",
                "origin": "opcua 192.0.2.9",
                "tag": "lathe-1/feed_override",
                "old": 90,
                "requested": 100,
                "result": "ok",
                "read_back": 100,
            }
        )
        audit.record(
            {
                "user": "mes",
                "origin": "mqtt",
                "tag": "lathe-1/feed_override",
                "old": 100,
                "requested": 900,
                "result": "out_of_range",
                "detail": "900 is above max 120",
            }
        )
        assert (await client.get("/api/audit")).status_code == 401
        assert (await login(client)).status_code == 303
        entries = (await client.get("/api/audit")).json()
        assert [e["result"] for e in entries] == ["out_of_range", "ok"]  # newest first
        assert entries[1]["user"] == "op<1>"
        assert [e["result"] for e in (await client.get("/api/audit?limit=1")).json()] == [
            "out_of_range"
        ]
        page = (await client.get("/")).text
        writes = page[page.index('id="writes"') :]
        assert writes.index('data-result="out_of_range"') < writes.index('data-result="ok"')
        assert "900 is above max 120" in writes
        assert "op&lt;1&gt;" in writes
        assert "90 → 100 (read back 100)" in writes


# --- binding ----------------------------------------------------------------------------------


def listening_addresses(port: int) -> set[str]:
    me = psutil.Process()
    return {
        c.laddr.ip
        for c in me.net_connections(kind="inet")
        if c.status == psutil.CONN_LISTEN and c.laddr.port == port
    }


@pytest.mark.parametrize("host", ["0.0.0.0", "::"])
async def test_without_a_password_a_network_host_binds_loopback_only(
    port: int, tmp_path: Path, host: str, caplog: pytest.LogCaptureFixture
) -> None:
    web = WebSection(host=host, port=port)
    gw = Gateway(config(tmp_path, web))
    sink = WebSink(gw, web)
    caplog.set_level(logging.INFO, logger="gateway.sinks.web")
    for _ in range(2):  # the hint comes at every start
        await sink.start()
        try:
            assert sink.host == "127.0.0.1"
            assert listening_addresses(port) == {"127.0.0.1"}
            assert gw.health["web"]["url"] == f"http://127.0.0.1:{port}/"
            async with httpx.AsyncClient(timeout=5) as client:
                r = await client.get(f"http://127.0.0.1:{port}/api/status")
                assert r.status_code == 200  # loopback: open, as without the network
        finally:
            await sink.close()
        assert listening_addresses(port) == set()
    hints = [
        r.getMessage()
        for r in caplog.records
        if r.levelno == logging.WARNING and "retrofit-gw passwd" in r.getMessage()
    ]
    assert len(hints) == 2
    assert f"web.host is {host}" in hints[0]
    assert "127.0.0.1" in hints[0]


def test_bind_rule() -> None:
    assert bind_host("0.0.0.0", None) == "127.0.0.1"
    assert bind_host("192.168.1.20", None) == "127.0.0.1"
    assert bind_host("gateway.local", None) == "127.0.0.1"
    assert bind_host("::1", None) == "::1"
    assert bind_host("127.0.0.1", None) == "127.0.0.1"
    assert bind_host("0.0.0.0", password_hash()) == "0.0.0.0"
    assert bind_host("192.168.1.20", password_hash()) == "192.168.1.20"


def test_a_malformed_hash_stops_the_sink_before_it_starts(tmp_path: Path) -> None:
    web = WebSection(port=free_port(), password_hash="hunter2")
    gw = Gateway(config(tmp_path, section(free_port(), password=False)))
    with pytest.raises(GatewayError, match="web: not a password hash") as err:
        WebSink(gw, web)
    assert "hunter2" not in str(err.value)


def test_config_checks_web_hashes_without_repeating_them(tmp_path: Path) -> None:
    path = tmp_path / "gw.yaml"
    path.write_text(
        "gateway: {site: s, area: a, line: l}\n"
        "web:\n"
        "  password_hash: hunter2\n"
        "  tokens:\n"
        f'    - {{name: mes, token_hash: "{token_hash()}"}}\n'
        "    - {name: mes, token_hash: also-a-secret}\n"
        "devices:\n"
        "  - {name: d, driver: modbus_tcp, machine: m, host: 127.0.0.1, port: 5020,\n"
        "     addressing: zero_based,\n"
        "     tags: [{name: t, table: holding, address: 0, type: uint16}]}\n",
        encoding="utf-8",
    )
    with pytest.raises(ConfigError) as err:
        load_config(path)
    issues = {(i.key, i.line): i.message for i in err.value.issues}
    text = "\n".join(map(str, err.value.issues))
    assert ("web.password_hash", 3) in issues
    assert "retrofit-gw passwd" in issues["web.password_hash", 3]
    assert ("web.tokens[1].name", 6) in issues
    assert ("web.tokens[1].token_hash", 6) in issues
    assert "hunter2" not in text
    assert "also-a-secret" not in text


# --- the pieces, with a clock of our own ------------------------------------------------------


def test_throttle_window_and_reset() -> None:
    now = [1000.0]
    throttle = LoginThrottle(3, 60, clock=lambda: now[0], max_clients=2)
    for _ in range(3):
        assert throttle.retry_after("a") is None
        throttle.failed("a")
        now[0] += 1
    assert throttle.retry_after("a") == 57  # the first failure + 60 s
    assert throttle.retry_after("b") is None
    now[0] = 1060.5  # the first failure aged out
    assert throttle.retry_after("a") is None
    throttle.failed("a")
    assert throttle.retry_after("a") is not None
    throttle.succeeded("a")
    assert throttle.retry_after("a") is None
    # Bounded memory: the oldest client is forgotten first.
    for client in ("x", "y", "z"):
        throttle.failed(client)
    assert throttle.retry_after("x") is None
    assert (throttle.failed_total, throttle.throttled_total) == (7, 2)


def test_sessions_expire_and_are_bounded() -> None:
    now = [0.0]
    sessions = Sessions(100, clock=lambda: now[0], max_sessions=2)
    sid_a, a = sessions.create()
    now[0] = 10
    sid_b, _ = sessions.create()
    assert sessions.get(sid_a) is a
    assert sessions.get("x" + sid_a[1:]) is None
    assert sessions.get(None) is None
    now[0] = 20
    sid_c, _ = sessions.create()  # the third ends the one closest to expiry
    assert sessions.get(sid_a) is None
    assert sessions.get(sid_b) is not None
    now[0] = 109.9
    assert sessions.get(sid_b) is not None
    now[0] = 110
    assert sessions.get(sid_b) is None
    assert len(sessions) == 1
    assert sessions.get(sid_c) is not None
    assert sid_a not in repr(sessions.__dict__)  # only hashes of the ids are kept


# --- a real browser ---------------------------------------------------------------------------


async def test_browser_logs_in_and_trusts_a_rejected_certificate(port: int, tmp_path: Path) -> None:
    playwright_api = pytest.importorskip("playwright.async_api")
    if not HAVE_CHROMIUM:
        pytest.skip("Debian chromium is not installed")
    info = rejected_cert(tmp_path, "line-1-hmi")
    lathe = RegisterServer([Lathe(unit_id=1)], port=free_port())
    mill = RegisterServer([Mill(unit_id=1)], port=free_port())
    await lathe.start()
    await mill.start()
    gw = Gateway(config(tmp_path, section(port), lathe.port, mill.port))
    assert gw.config.web is not None
    sink = WebSink(gw, gw.config.web)
    stop = asyncio.Event()
    task = asyncio.create_task(gw.run(stop, sinks=[sink]), name="gateway")
    url = f"http://127.0.0.1:{port}"
    try:
        async with httpx.AsyncClient(base_url=url, timeout=2) as probe:
            for _ in range(100):
                with contextlib.suppress(httpx.TransportError):
                    if (await probe.get("/healthz")).status_code == 200:
                        break
                await asyncio.sleep(0.05)
        async with playwright_api.async_playwright() as pw:
            browser = await pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
            try:
                page = await browser.new_page(viewport={"width": 390, "height": 844})
                errors: list[str] = []
                page.on("pageerror", lambda exc: errors.append(str(exc)))
                dialogs: list[str] = []

                async def accept(dialog: Any) -> None:
                    dialogs.append(dialog.message)
                    await dialog.accept()

                page.on("dialog", accept)
                await page.goto(url + "/")
                assert page.url == url + "/login"
                assert await page.evaluate("document.documentElement.scrollWidth") <= 390
                save_artifact("login-phone.png", await page.screenshot(full_page=True))

                await page.fill("#password", "not it")
                await page.click("button[type=submit]")
                await page.wait_for_selector(".err", timeout=10000)
                assert await page.text_content(".err") == "Wrong password."

                await page.set_viewport_size({"width": 1280, "height": 900})
                await page.fill("#password", PASSWORD)
                await page.click("button[type=submit]")
                await page.wait_for_url(url + "/", timeout=10000)
                # The live page, values and all.
                await page.wait_for_function(
                    "() => document.querySelector('#n-on').textContent === '2'", timeout=15000
                )
                row = f'#certs li[data-cert="{info.id}"]'
                assert await page.get_attribute(row, "data-state") == "rejected"
                # At the machine, on a phone: nothing sticks out, the button is big enough.
                await page.set_viewport_size({"width": 390, "height": 844})
                assert await page.evaluate("document.documentElement.scrollWidth") <= 390
                box = await page.locator(f"{row} button").bounding_box()
                assert box is not None
                assert box["height"] >= 40
                await page.click(f"{row} button")
                await page.wait_for_selector(
                    f'#certs li[data-cert="{info.id}"][data-state="trusted"]', timeout=10000
                )
                assert dialogs == ["Trust line-1-hmi? It can connect to OPC UA at once."]
                assert await page.is_hidden(f'#certs li[data-cert="{info.id}"] button')
                assert state_of(tmp_path, info.id) == "trusted"
                save_artifact("status-page-certs.png", await page.screenshot(full_page=True))

                await page.click("form.logout button")
                await page.wait_for_url(url + "/login", timeout=10000)
                await page.goto(url + "/")
                assert page.url == url + "/login"
                assert errors == []
            finally:
                await browser.close()
    finally:
        stop.set()
        await asyncio.wait_for(task, 10)
        await lathe.stop()
        await mill.stop()

"""Secure defaults, checked (issue #6): a real ``retrofit-gw run`` on the production example.

The process is ``python -m gateway run`` on ``config/production.example.yaml``, adapted only
where a test must (see ``example_config``): its ports are free ones, its data directory is in
tmp_path, its one device is a simulated lathe on 127.0.0.1, its MQTT broker is a mosquitto
started here (allow_anonymous false, user ``gateway``), the two placeholder password hashes
are real ones, and OPC UA listens on 127.0.0.1 instead of the example's 0.0.0.0 because the
test suite never listens on every interface.

Every listening socket of that process is read from the kernel (psutil: /proc/<pid>/net and
the process's socket inodes) and compared with the exact expected set, then each one's
authentication is tried from outside, as a client on the network would: an asyncua Client
for OPC UA, httpx for the status page. MQTT is no server of ours: what is checked there is the
gateway's own connection, as the broker saw it.

The example has no TLS to the broker on purpose: the broker runs on the same box, and the
connection never leaves loopback (the gateway warns at every start when a broker off loopback
is reached without TLS; tests/sinks/test_mqtt_security.py covers TLS and mTLS).
"""

from __future__ import annotations

import asyncio
import re
import socket
import stat
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
import psutil
import pytest
import yaml
from asyncua import Client, ua
from asyncua.crypto import security_policies as sp

from drivers.modbus.simulator import Lathe
from drivers.modbus.transport import RegisterServer
from gateway import certs
from gateway.auth import hash_password
from gateway.cli import main
from gateway.config import load_config
from tests.conftest import free_port
from tests.sinks.conftest import Mosquitto
from tests.sinks.test_opcua_security import App

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = ROOT / "config" / "production.example.yaml"

OPCUA_PASSWORD = "scada: Späne 7"
WEB_PASSWORD = "page: Öl 42"
MQTT_PASSWORD = "broker-9f3c1e"

#: What every response of the status page carries.
SECURITY_HEADERS = {
    "x-content-type-options": "nosniff",
    "x-frame-options": "DENY",
    "referrer-policy": "no-referrer",
}

#: Generous: two Python start-ups and asyncua's address space on a loaded CI machine.
START_S = 25.0


# --- the config -----------------------------------------------------------------------------------


def _changed(a: Any, b: Any, path: tuple[Any, ...] = ()) -> set[tuple[Any, ...]]:
    """Key paths where two YAML data trees differ."""
    if isinstance(a, dict) and isinstance(b, dict):
        out: set[tuple[Any, ...]] = set()
        for key in a.keys() | b.keys():
            out |= _changed(a.get(key), b.get(key), (*path, key))
        return out
    if isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
        out = set()
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            out |= _changed(x, y, (*path, i))
        return out
    return set() if a == b else {path}


#: Exactly what the tests change in the example, and nothing else.
ADAPTED = {
    ("gateway", "data_dir"),
    ("opcua", "host"),
    ("opcua", "port"),
    ("opcua", "users", 0, "password_hash"),
    ("mqtt", "port"),
    ("web", "port"),
    ("web", "password_hash"),
    ("devices", 0, "host"),
    ("devices", 0, "port"),
}


def example_config(tmp_path: Path, broker_port: int, device_port: int) -> dict[str, Any]:
    """The production example as data, adapted as a test must (and only that: asserted)."""
    original = yaml.safe_load(EXAMPLE.read_text(encoding="utf-8"))
    data = yaml.safe_load(EXAMPLE.read_text(encoding="utf-8"))
    data["gateway"]["data_dir"] = str(tmp_path / "data")
    # The example serves OPC UA on 0.0.0.0; a test listens on loopback only.
    assert data["opcua"]["host"] == "0.0.0.0"
    data["opcua"].update(host="127.0.0.1", port=free_port())
    data["opcua"]["users"][0]["password_hash"] = hash_password(OPCUA_PASSWORD)
    data["mqtt"]["port"] = broker_port
    data["web"].update(port=free_port(), password_hash=hash_password(WEB_PASSWORD))
    data["devices"][0].update(host="127.0.0.1", port=device_port)
    assert _changed(original, data) == ADAPTED
    return data


def write_config(tmp_path: Path, data: dict[str, Any]) -> Path:
    path = tmp_path / "gateway.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False, allow_unicode=True), encoding="utf-8")
    # password_file: mqtt-password, beside the config file, as the example says.
    secret = tmp_path / data["mqtt"]["password_file"]
    secret.write_text(MQTT_PASSWORD + "\n", encoding="utf-8")
    secret.chmod(0o600)
    load_config(path)  # what `retrofit-gw check` says: valid
    return path


@asynccontextmanager
async def broker(tmp_path: Path) -> AsyncIterator[Mosquitto]:
    """A mosquitto on 127.0.0.1 as the README sets one up: no anonymous clients."""
    mosquitto = Mosquitto(tmp_path / "mosquitto", free_port(), users={"gateway": MQTT_PASSWORD})
    with mosquitto.conf.open("a") as conf:
        conf.write("log_type all\n")  # SUBSCRIBE packets too
    await mosquitto.astart()
    try:
        yield mosquitto
    finally:
        await mosquitto.astop()


# --- the process ----------------------------------------------------------------------------------


Socket = tuple[str, str, int]  # (tcp4 | tcp6 | udp4 | udp6, address, port)


def listening(pid: int) -> set[Socket]:
    """Every socket of the process that accepts connections or datagrams: TCP in LISTEN, and
    any UDP socket at all (bound or not, it can receive)."""
    found: set[Socket] = set()
    for conn in psutil.Process(pid).net_connections(kind="inet"):
        family = "4" if conn.family == socket.AF_INET else "6"
        if conn.type == socket.SOCK_DGRAM:
            found.add((f"udp{family}", conn.laddr.ip, conn.laddr.port))
        elif conn.status == psutil.CONN_LISTEN:
            found.add((f"tcp{family}", conn.laddr.ip, conn.laddr.port))
    return found


def log_tail(path: Path, lines: int = 40) -> str:
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])


async def wait_until(
    proc: subprocess.Popen[bytes], log: Path, done: Callable[[], object], within: float
) -> None:
    deadline = time.monotonic() + within
    while True:
        assert proc.poll() is None, f"the gateway exited with {proc.returncode}:\n{log_tail(log)}"
        if done():
            return
        assert time.monotonic() < deadline, f"not within {within} s:\n{log_tail(log)}"
        await asyncio.sleep(0.05)


async def stop(proc: subprocess.Popen[bytes]) -> int:
    """SIGTERM, a bounded wait, then SIGKILL; always reaped."""
    if proc.poll() is None:
        proc.terminate()
        for _ in range(500):  # 10 s
            if proc.poll() is not None:
                break
            await asyncio.sleep(0.02)
        else:
            proc.kill()
    for _ in range(250):
        if proc.poll() is not None:
            break
        await asyncio.sleep(0.02)
    return proc.wait(1)


@asynccontextmanager
async def gateway_run(
    config: Path, log: Path, web_port: int
) -> AsyncIterator[subprocess.Popen[bytes]]:
    """``retrofit-gw run CONFIG`` until every sink started and /healthz answers 200."""
    with log.open("wb") as out:
        # Not asyncio's subprocess: in 3.11 it watches the child from a thread, and the suite
        # fails any test that leaves a thread behind.
        proc = subprocess.Popen(  # noqa: ASYNC220
            [sys.executable, "-m", "gateway", "run", str(config)],
            stdout=out,
            stderr=subprocess.STDOUT,
            cwd=config.parent,
        )
    try:
        await wait_until(proc, log, lambda: "sinks started" in log.read_text(), START_S)
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{web_port}", timeout=5) as web:
            healthy = False
            for _ in range(200):  # 10 s: the first poll of the device
                healthy = (await web.get("/healthz")).status_code == 200
                if healthy or proc.poll() is not None:
                    break
                await asyncio.sleep(0.05)
            assert healthy, log_tail(log)
        yield proc
    finally:
        await stop(proc)


# --- the interfaces -------------------------------------------------------------------------------


def client_for(url: str, app: App | None, user: str | None = None, password: str = "") -> Client:
    client = Client(url, timeout=5)
    if app is not None:
        client.application_uri = app.uri
    if user is not None:
        client.set_user(user)
        client.set_password(password)
    return client


async def connect(
    url: str,
    app: App,
    *,
    user: str | None = None,
    password: str = "",
    policy: type[sp.SecurityPolicy] = sp.SecurityPolicyBasic256Sha256,
    mode: ua.MessageSecurityMode = ua.MessageSecurityMode.SignAndEncrypt,
) -> str:
    """One session; returns the browse name of the site folder (which needs a session)."""
    client = client_for(url, app, user, password)
    await client.set_security(policy, app.cert, app.key, mode=mode)
    async with client:
        ns = await client.get_namespace_index("urn:retrofit-gateway:shop-gw")
        name = await client.get_node(ua.NodeId("#site", ns)).read_browse_name()
        return str(name.Name)


async def check_opcua(
    url: str, config: Path, data_dir: Path, security: list[str], web: httpx.AsyncClient
) -> None:
    # Endpoints, as discovery (over None, as the standard wants) tells any client.
    discovery = Client(url, timeout=5)
    endpoints = await discovery.connect_and_get_server_endpoints()
    mode_names = {
        ua.MessageSecurityMode.Sign: "Sign",
        ua.MessageSecurityMode.SignAndEncrypt: "SignAndEncrypt",
    }
    offered = [
        f"{e.SecurityPolicyUri.rpartition('#')[2]}_{mode_names.get(e.SecurityMode, e.SecurityMode)}"
        for e in endpoints
    ]
    assert sorted(offered) == sorted(security)  # no None endpoint, nothing unconfigured
    assert all(e.EndpointUrl == url for e in endpoints)
    tokens = {t.TokenType for e in endpoints for t in e.UserIdentityTokens}
    assert tokens == {ua.UserTokenType.UserName}  # no anonymous, no certificate logins

    # No session without security: there is no None endpoint to pick...
    with pytest.raises(ua.UaError, match="No matching endpoints"):
        async with client_for(url, None, "scada", OPCUA_PASSWORD):
            pass
    # ...and a None channel opened by hand gets no session either: anonymous is not offered,
    # and even the right password, sent in clear on it, is refused.
    raw = Client(url, timeout=5)
    await raw.connect_socket()
    try:
        await raw.send_hello()
        await raw.open_secure_channel()
        await raw.uaclient.create_session(
            ua.CreateSessionParameters(
                ClientNonce=b"n" * 32, RequestedSessionTimeout=5000, SessionName="raw"
            )
        )
        with pytest.raises(ua.uaerrors.BadIdentityTokenRejected):
            await raw.uaclient.activate_session(
                ua.ActivateSessionParameters(
                    UserIdentityToken=ua.AnonymousIdentityToken(PolicyId="anonymous")
                )
            )
        with pytest.raises(ua.uaerrors.BadUserAccessDenied):
            await raw.uaclient.activate_session(
                ua.ActivateSessionParameters(
                    UserIdentityToken=ua.UserNameIdentityToken(
                        PolicyId="username",
                        UserName="scada",
                        Password=OPCUA_PASSWORD.encode(),
                    )
                )
            )
    finally:
        raw.disconnect_socket()

    # An untrusted client certificate is refused even with the right password, and kept for
    # a technician to look at.
    app = App("hmi panel")
    with pytest.raises(ua.uaerrors.BadCertificateUntrusted):
        await connect(url, app, user="scada", password=OPCUA_PASSWORD)
    listed = certs.list_certificates(data_dir)
    assert [(c.id, c.state) for c in listed] == [(app.id, "rejected")]
    # Trusting it from the page needs a login too.
    trust = await web.post(f"/api/certs/{app.id}/trust")
    assert trust.status_code == 401
    assert certs.list_certificates(data_dir)[0].state == "rejected"

    # Trusted as a technician does it: the CLI, no restart.
    assert main(["certs", "trust", str(config), app.id]) == 0
    with pytest.raises(ua.uaerrors.BadIdentityTokenRejected):  # anonymous
        await connect(url, app)
    with pytest.raises(ua.uaerrors.BadUserAccessDenied):
        await connect(url, app, user="scada", password=OPCUA_PASSWORD + "!")
    with pytest.raises(ua.uaerrors.BadUserAccessDenied):
        await connect(url, app, user="admin", password=OPCUA_PASSWORD)
    # Users' failed logins pause further checks for a second.
    await asyncio.sleep(1.1)
    assert await connect(url, app, user="scada", password=OPCUA_PASSWORD) == "plant1"
    # Sign only: the password goes encrypted with the server's key.
    signed = await connect(
        url,
        app,
        user="scada",
        password=OPCUA_PASSWORD,
        policy=sp.SecurityPolicyAes256Sha256RsaPss,
        mode=ua.MessageSecurityMode.Sign,
    )
    assert signed == "plant1"


def assert_secured(response: httpx.Response) -> None:
    for name, value in SECURITY_HEADERS.items():
        assert response.headers.get(name) == value, (response.url, name)
    csp = response.headers.get("content-security-policy", "")
    assert "default-src 'none'" in csp
    assert "frame-ancestors 'none'" in csp
    if not response.url.path.startswith("/static/"):
        assert response.headers.get("cache-control") == "no-store", response.url


async def login(web: httpx.AsyncClient, password: str) -> httpx.Response:
    form = await web.get("/login")
    assert form.status_code == 200
    found = re.search(r'name="csrf" value="([^"]+)"', form.text)
    assert found is not None
    return await web.post("/login", data={"csrf": found.group(1), "password": password})


async def check_web_before_login(web: httpx.AsyncClient) -> None:
    health = await web.get("/healthz")
    assert health.status_code == 200
    assert_secured(health)
    page = await web.get("/")
    assert (page.status_code, page.headers["location"]) == (303, "login")
    assert_secured(page)
    for path in ("/api/status", "/api/devices", "/api/audit", "/metrics", "/openapi.json"):
        refused = await web.get(path)
        assert refused.status_code == 401, path
        assert refused.headers["www-authenticate"].startswith("Bearer")
        assert_secured(refused)
    for path in ("/docs", "/redoc"):
        assert (await web.get(path)).status_code == 401, path  # behind the login, and then:
    wrong = await login(web, WEB_PASSWORD + "!")
    assert wrong.status_code == 401
    assert_secured(wrong)
    # No web.tokens in the example: no bearer token gets in.
    bearer = await web.get("/api/status", headers={"Authorization": "Bearer 5eT5jS8qLw0x3nB"})
    assert bearer.status_code == 401


async def check_web_after_login(web: httpx.AsyncClient) -> dict[str, Any]:
    done = await login(web, WEB_PASSWORD)
    assert (done.status_code, done.headers["location"]) == (303, "./")
    cookie = done.headers["set-cookie"].lower()
    assert "httponly" in cookie
    assert "samesite=strict" in cookie
    for path in ("/", "/api/status", "/metrics", "/openapi.json"):
        response = await web.get(path)
        assert response.status_code == 200, path
        assert_secured(response)
    for path in ("/docs", "/redoc", "/docs/oauth2-redirect"):
        absent = await web.get(path)
        assert absent.status_code == 404, path
        assert_secured(absent)
    status: dict[str, Any] = (await web.get("/api/status")).json()
    return status


def check_mqtt(status: dict[str, Any], mosquitto: Mosquitto, pid: int, log: Path) -> None:
    """The gateway's link to the broker is what the config says: loopback, user gateway with
    the password from mqtt-password, MQTT 5, no TLS (the broker is on the box)."""
    health = status["sinks"]["mqtt"]
    assert health["connected"] is True, health
    assert health["broker"] == f"127.0.0.1:{mosquitto.port}"
    assert health["protocol"] == "5"
    assert health["tls"] is None
    broker_log = mosquitto.log_text()
    assert "as shop-gw (p5, c1, k30, u'gateway')" in broker_log, broker_log[-2000:]
    # No writable tags in the example: the gateway subscribes to no <tag>/set topic.
    assert "Received SUBSCRIBE from shop-gw" not in broker_log
    peers = {
        (c.raddr.ip, c.raddr.port)
        for c in psutil.Process(pid).net_connections(kind="inet")
        if c.status == psutil.CONN_ESTABLISHED
    }
    assert ("127.0.0.1", mosquitto.port) in peers
    text = log.read_text()
    assert "(MQTT 5, no TLS)" in text
    assert "no TLS:" not in text  # the warning for a broker off loopback


# --- the tests ------------------------------------------------------------------------------------


async def test_production_example_listens_on_two_loopback_sockets_each_behind_a_login(
    tmp_path: Path,
) -> None:
    device_port = free_port()
    async with broker(tmp_path) as mosquitto, RegisterServer([Lathe(unit_id=1)], port=device_port):
        data = example_config(tmp_path, mosquitto.port, device_port)
        config = write_config(tmp_path, data)
        opcua_port, web_port = data["opcua"]["port"], data["web"]["port"]
        log = tmp_path / "gateway.log"
        async with (
            gateway_run(config, log, web_port) as proc,
            httpx.AsyncClient(base_url=f"http://127.0.0.1:{web_port}", timeout=10) as web,
        ):
            expected = {("tcp4", "127.0.0.1", opcua_port), ("tcp4", "127.0.0.1", web_port)}
            assert listening(proc.pid) == expected
            assert psutil.Process(proc.pid).children(recursive=True) == []

            await check_web_before_login(web)
            await check_opcua(
                f"opc.tcp://127.0.0.1:{opcua_port}",
                config,
                tmp_path / "data",
                data["opcua"]["security"],
                web,
            )
            status = await check_web_after_login(web)
            check_mqtt(status, mosquitto, proc.pid, log)

            # Nothing opened on the way (a debug port, a discovery socket).
            assert listening(proc.pid) == expected
        assert proc.returncode == 0, log_tail(log)

    # The server's private key: readable by the service user only.
    own = tmp_path / "data" / "pki" / "own"
    assert stat.S_IMODE((own / "server_key.pem").stat().st_mode) == 0o600
    assert not stat.S_IMODE((own / "server_cert.der").stat().st_mode) & 0o022
    text = log.read_text()
    assert MQTT_PASSWORD not in text
    assert OPCUA_PASSWORD not in text
    assert WEB_PASSWORD not in text
    # No insecure setting to warn about: the warnings are the test's own refused clients
    # (and the clock, on a machine without NTP).
    warnings = [line for line in text.splitlines() if " WARNING " in line]
    expected_warnings = (
        "WARNING gateway: the system clock is not synchronised",
        "WARNING gateway.sinks.opcua: OPC UA: refused ",
        "WARNING gateway.sinks.web: web: failed login from 127.0.0.1",
        "WARNING gateway.sinks.web: web: refused an unknown bearer token from 127.0.0.1",
    )
    assert [w for w in warnings if not any(e in w for e in expected_warnings)] == []


async def test_network_host_without_password_still_binds_loopback_and_says_how(
    tmp_path: Path,
) -> None:
    device_port = free_port()
    async with broker(tmp_path) as mosquitto, RegisterServer([Lathe(unit_id=1)], port=device_port):
        data = example_config(tmp_path, mosquitto.port, device_port)
        data["web"]["host"] = "0.0.0.0"
        del data["web"]["password_hash"]
        config = write_config(tmp_path, data)
        opcua_port, web_port = data["opcua"]["port"], data["web"]["port"]
        log = tmp_path / "gateway.log"
        async with (
            gateway_run(config, log, web_port) as proc,
            httpx.AsyncClient(base_url=f"http://127.0.0.1:{web_port}", timeout=10) as web,
        ):
            # By design no wildcard socket at all, IPv4 or IPv6: the page is on loopback.
            expected = {("tcp4", "127.0.0.1", opcua_port), ("tcp4", "127.0.0.1", web_port)}
            assert listening(proc.pid) == expected
            text = log.read_text()
            assert "web.host is 0.0.0.0 but no web.password_hash is set" in text
            assert f"listens on http://127.0.0.1:{web_port}/ only" in text
            assert "`retrofit-gw passwd`" in text
            # Open for reading on loopback, as for a technician at the box; no changes.
            page = await web.get("/")
            assert page.status_code == 200
            assert_secured(page)
            change = await web.post("/api/certs/0123456789abcdef/trust")
            assert change.status_code == 403
            assert "retrofit-gw passwd" in change.json()["detail"]
            assert (await web.get("/docs")).status_code == 404
            assert listening(proc.pid) == expected
        assert proc.returncode == 0, log_tail(log)


def test_example_commented_mqtt_tls_block_is_valid(tmp_path: Path) -> None:
    """The commented TLS lines of the example's mqtt: section, uncommented, pass the check."""
    text = EXAMPLE.read_text(encoding="utf-8")
    block = re.search(r"\n  # A broker elsewhere[^\n]*\n((?:  # [^\n]*\n)+)", text)
    assert block is not None
    uncommented = re.sub(r"^  # ", "", block.group(1), flags=re.MULTILINE)
    tls_part = yaml.safe_load(uncommented)
    assert set(tls_part) == {"host", "port", "tls"}
    data = yaml.safe_load(text)
    data["mqtt"].update(tls_part)
    path = tmp_path / "gateway.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False), encoding="utf-8")
    mqtt = load_config(path).config.mqtt
    assert mqtt is not None
    assert mqtt.tls is not None
    assert (mqtt.tls.ca_file, mqtt.tls.cert_file, mqtt.tls.key_file) == (
        "certs/plant-ca.pem",
        "certs/gateway.pem",
        "certs/gateway.key",
    )
    assert mqtt.tls.verify_hostname
    assert not mqtt.tls.insecure_skip_verify

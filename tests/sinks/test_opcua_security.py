"""OPC UA security against a real asyncua Client: policies, the trust folders, logins.

Also the pieces they rest on: password hashes (gateway.auth), ``retrofit-gw passwd``, the
certificate folders (gateway.certs) and our own certificate's names.
"""

from __future__ import annotations

import asyncio
import io
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager, suppress
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from asyncua import Client, ua
from asyncua.crypto import security_policies as sp
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from gateway import auth, certs
from gateway.app import Gateway
from gateway.cli import main
from gateway.config import LoadedConfig, load_config
from gateway.errors import ConfigError
from gateway.sinks.opcua import OpcUaSink, SessionUser
from tests.conftest import free_port

ROOT = Path(__file__).resolve().parent.parent.parent
SAE = ua.MessageSecurityMode.SignAndEncrypt
SIGN = ua.MessageSecurityMode.Sign
#: Cheap to check: the pause after a failed login is what the login test exercises.
READER_PW = "correct horse"
OPERATOR_PW = "battery staple ä"


# --- helpers --------------------------------------------------------------------------------------


def make_cert(
    cn: str, uri: str, *, valid_from: timedelta = timedelta(minutes=-5), days: float = 30
) -> tuple[bytes, bytes]:
    """A self-signed client application certificate and its key, DER (asyncua takes bytes)."""
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])
    start = datetime.now(UTC) + valid_from
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(start + timedelta(days=days))
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.UniformResourceIdentifier(uri), x509.DNSName(socket.gethostname())]
            ),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=True,
                key_encipherment=True,
                data_encipherment=True,
                key_agreement=False,
                key_cert_sign=False,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
        .sign(key, hashes.SHA256())
    )
    der_key = key.private_bytes(
        serialization.Encoding.DER,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    return cert.public_bytes(serialization.Encoding.DER), der_key


class App:
    """A client application: its URI, certificate and key."""

    def __init__(self, cn: str, **validity: Any) -> None:
        self.uri = f"urn:test:{cn}"
        self.cert, self.key = make_cert(cn, self.uri, **validity)
        self.id = certs.certificate_id(self.cert)


CONFIG = """\
gateway: {{name: gw-sec, site: plant, area: a, line: l}}
opcua:
  host: 127.0.0.1
  port: {port}
{opcua}
devices:
  - name: m-plc
    driver: modbus_tcp
    machine: m
    host: 127.0.0.1
    port: {modbus}
    interval: 1.0
    timeout: 0.2
    connect_timeout: 0.2
    addressing: zero_based
    tags: [{{name: speed, table: holding, address: 0, type: uint16}}]
"""


def write_config(tmp_path: Path, opcua: str = "") -> Path:
    """A config on disk (the CLI reads it); the device's port has no listener: offline."""
    path = tmp_path / "gateway.yaml"
    path.write_text(CONFIG.format(port=free_port(), modbus=free_port(), opcua=opcua))
    return path


async def wait_for(done: Callable[[], object], within: float = 10.0) -> None:
    deadline = time.monotonic() + within
    while not done():
        assert time.monotonic() < deadline, f"condition not met within {within} s"
        await asyncio.sleep(0.02)


@asynccontextmanager
async def running(path: Path) -> AsyncIterator[tuple[Gateway, OpcUaSink]]:
    loaded = load_config(path)
    gw = Gateway(loaded)
    assert loaded.config.opcua is not None
    sink = OpcUaSink(gw, loaded.config.opcua)
    stop = asyncio.Event()
    task = asyncio.create_task(gw.run(stop, sinks=[sink]), name="gateway")
    try:
        await wait_for(lambda: sink.health["started_in_s"] is not None or task.done(), 30)
        if task.done():
            task.result()
        yield gw, sink
    finally:
        stop.set()
        await asyncio.wait_for(task, 10)


@asynccontextmanager
async def session(
    sink: OpcUaSink,
    app: App | None,
    policy: type[sp.SecurityPolicy] = sp.SecurityPolicyBasic256Sha256,
    mode: ua.MessageSecurityMode = SAE,
    user: str | None = None,
    password: str | None = None,
) -> AsyncIterator[Client]:
    client = Client(sink.endpoint, timeout=5)
    if app is not None:
        client.application_uri = app.uri
        await client.set_security(policy, app.cert, app.key, mode=mode)
    if user is not None:
        client.set_user(user)
        client.set_password(password or "")
    async with client:
        yield client


async def read_site(client: Client, sink: OpcUaSink) -> str:
    node = client.get_node(ua.NodeId("#site", sink.namespace_index))
    name = await node.read_browse_name()
    return str(name.Name)


def users_of(sink: OpcUaSink) -> list[SessionUser]:
    server = sink._server
    assert server is not None
    return [s.user for s in server.iserver._external_sessions.values() if s.is_activated()]


def trust_file(gw: Gateway, app: App) -> None:
    folder = gw.data_dir / "pki" / "trusted"
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{app.id}.der").write_bytes(app.cert)


# --- against a running server ---------------------------------------------------------------------


async def test_untrusted_refused_kept_then_trusted_without_restart(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = write_config(tmp_path)  # trust: list is the default
    alpha, beta = App("alpha client"), App("beta")
    async with running(path) as (gw, sink):
        rejected = gw.data_dir / "pki" / "rejected"
        assert (gw.data_dir / "pki" / "trusted").is_dir()  # made at start, for the technician

        with pytest.raises(ua.uaerrors.BadCertificateUntrusted):
            async with session(sink, alpha):
                pass
        kept = rejected / f"{alpha.id}_alpha_client.der"
        assert kept.read_bytes() == alpha.cert
        listed = certs.list_certificates(gw.data_dir)
        assert [(c.id, c.state, c.application_uri) for c in listed] == [
            (alpha.id, "rejected", alpha.uri)
        ]
        first_seen = listed[0].first_seen
        # Refused again: the file is not rewritten, so "first seen" stays the first refusal.
        with pytest.raises(ua.uaerrors.BadCertificateUntrusted):
            async with session(sink, alpha):
                pass
        assert certs.list_certificates(gw.data_dir)[0].first_seen == first_seen

        # Trusted through the API the status page uses: in at the next attempt, no restart.
        info = certs.trust(gw.data_dir, alpha.id)
        assert (info.state, info.first_seen) == ("trusted", first_seen)
        assert not kept.exists()
        async with session(sink, alpha) as client:
            assert await read_site(client, sink) == "plant"
            assert [u.certificate_id for u in users_of(sink)] == [alpha.id]

            # Another client, trusted through the CLI by a prefix of its id.
            with pytest.raises(ua.uaerrors.BadCertificateUntrusted):
                async with session(sink, beta, sp.SecurityPolicyAes256Sha256RsaPss, SIGN):
                    pass
            assert main(["certs", "list", str(path)]) == 0
            out = capsys.readouterr().out
            assert f"rejected  {beta.id}  beta" in out
            assert f"trusted   {alpha.id}  alpha client" in out
            assert main(["certs", "trust", str(path), beta.id[:8]]) == 0
            async with session(sink, beta, sp.SecurityPolicyAes256Sha256RsaPss, SIGN) as other:
                assert await read_site(other, sink) == "plant"
            assert sink._gate.refused == 3

            # Rejected again: its open session is cut within a status refresh, and it stays out.
            assert main(["certs", "reject", str(path), alpha.id]) == 0
            server = sink._server
            assert server is not None
            assert server.bserver is not None
            bserver = server.bserver
            await wait_for(lambda: not bserver.clients)
            with suppress(Exception):  # the server hung up; the client's goodbye may fail
                await client.disconnect()
        with pytest.raises(ua.uaerrors.BadCertificateUntrusted):
            async with session(sink, alpha):
                pass
        await wait_for(lambda: sink.health["certificates_pending"] == 1)


async def test_expired_certificate_refused_even_when_trusted(tmp_path: Path) -> None:
    old = App("old", valid_from=timedelta(days=-10), days=1)
    async with running(write_config(tmp_path)) as (gw, sink):
        trust_file(gw, old)
        with pytest.raises(ua.uaerrors.BadCertificateTimeInvalid):
            async with session(sink, old):
                pass


async def test_every_policy_and_mode_connects_and_none_is_refused(tmp_path: Path) -> None:
    app = App("six")
    async with running(write_config(tmp_path)) as (gw, sink):  # default: all six, no None
        trust_file(gw, app)
        policies = [
            sp.SecurityPolicyBasic256Sha256,
            sp.SecurityPolicyAes128Sha256RsaOaep,
            sp.SecurityPolicyAes256Sha256RsaPss,
        ]
        connected = set()
        for policy in policies:
            for mode in (SIGN, SAE):
                async with session(sink, app, policy, mode) as client:
                    assert await read_site(client, sink) == "plant"
                    endpoints = await client.get_endpoints()
                connected.add((policy.URI.split("#")[1], mode))
        offered = {(e.SecurityPolicyUri.split("#")[1], e.SecurityMode) for e in endpoints}
        assert offered == connected
        assert len(offered) == 6

        # No None endpoint to find...
        with pytest.raises(ua.UaError):
            async with session(sink, None):
                pass
        # ...and a client that opens a None channel anyway gets no session on it.
        raw = Client(sink.endpoint, timeout=5)
        await raw.connect_socket()
        try:
            await raw.send_hello()
            await raw.open_secure_channel()
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


async def test_logins_roles_wrong_password_and_no_anonymous(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    reader_hash = auth.hash_password(READER_PW)
    operator_hash = auth.hash_password(OPERATOR_PW)
    path = write_config(
        tmp_path,
        "  users:\n"
        f"    - {{name: hmi, password_hash: '{reader_hash}'}}\n"
        f"    - {{name: setter, password_hash: '{operator_hash}', role: operator}}\n",
    )
    app = App("logins")
    async with running(path) as (gw, sink):  # users and no anonymous: off by default
        trust_file(gw, app)
        async with session(sink, app, user="hmi", password=READER_PW) as client:
            assert await read_site(client, sink) == "plant"
            assert [(u.name, u.access) for u in users_of(sink)] == [("hmi", "reader")]
        # Sign only: the password travels encrypted with the server's key instead.
        mode = SIGN
        async with session(sink, app, mode=mode, user="setter", password=OPERATOR_PW):
            assert [(u.name, u.access) for u in users_of(sink)] == [("setter", "operator")]

        with pytest.raises(ua.uaerrors.BadIdentityTokenRejected):  # anonymous is not offered
            async with session(sink, app):
                pass
        with pytest.raises(ua.uaerrors.BadUserAccessDenied):
            async with session(sink, app, user="hmi", password=READER_PW + "!"):
                pass
        with pytest.raises(ua.uaerrors.BadUserAccessDenied):
            async with session(sink, app, user="nobody", password=READER_PW):
                pass
        # A remembered password costs no scrypt run and is not held up by the pause that
        # follows a failure.
        async with session(sink, app, user="hmi", password=READER_PW):
            pass
        # After the pause a password is checked again.
        monkeypatch.setattr(sink._gate.accounts, "_paused_until", 0.0)
        sink._gate.accounts._verified.clear()
        async with session(sink, app, user="setter", password=OPERATOR_PW):
            pass
        assert sink._gate.accounts.failed == 2


async def test_anonymous_explicitly_on_beside_users(tmp_path: Path) -> None:
    hashed = auth.hash_password(READER_PW)
    path = write_config(
        tmp_path,
        f"  anonymous: true\n  trust: any\n  users: [{{name: u, password_hash: '{hashed}'}}]\n",
    )
    app = App("anon")
    async with running(path) as (_, sink), session(sink, app) as client:  # trust: any
        assert await read_site(client, sink) == "plant"
        assert [(u.name, u.access) for u in users_of(sink)] == [(None, "reader")]


# --- our certificate ------------------------------------------------------------------------------


def san_of(der: bytes) -> x509.SubjectAlternativeName:
    cert = x509.load_der_x509_certificate(der)
    return cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value


def test_own_certificate_names_and_regeneration(tmp_path: Path) -> None:
    own = tmp_path / "own"
    cert, _ = certs.load_or_create_certificate(own, "urn:a", "127.0.0.1", "gw")
    first = certs.der_of(cert)
    san = san_of(first)
    assert san.get_values_for_type(x509.UniformResourceIdentifier) == ["urn:a"]
    assert socket.gethostname() in san.get_values_for_type(x509.DNSName)
    assert "localhost" in san.get_values_for_type(x509.DNSName)
    assert {"127.0.0.1", "::1"} <= {str(a) for a in san.get_values_for_type(x509.IPAddress)}

    again, _ = certs.load_or_create_certificate(own, "urn:a", "127.0.0.1", "gw")
    assert certs.der_of(again) == first  # reused: clients keep trusting it
    # The application URI changed in the config: a new certificate naming the new one.
    renamed, _ = certs.load_or_create_certificate(own, "urn:b", "127.0.0.1", "gw")
    assert san_of(certs.der_of(renamed)).get_values_for_type(x509.UniformResourceIdentifier) == [
        "urn:b"
    ]
    # So for a newly configured bind address or name.
    moved, _ = certs.load_or_create_certificate(own, "urn:b", "127.0.0.2", "gw")
    assert "127.0.0.2" in {
        str(a) for a in san_of(certs.der_of(moved)).get_values_for_type(x509.IPAddress)
    }
    named, _ = certs.load_or_create_certificate(own, "urn:b", "gw.example", "gw")
    assert "gw.example" in san_of(certs.der_of(named)).get_values_for_type(x509.DNSName)
    # Bound to every interface: no regeneration needed for that, the host's addresses named.
    same, _ = certs.load_or_create_certificate(own, "urn:b", "0.0.0.0", "gw")
    assert certs.der_of(same) == certs.der_of(named)
    dns, ips = certs.host_names("0.0.0.0")
    assert socket.gethostname() in dns
    assert all(not ip.is_unspecified for ip in ips)


# --- the trust folders ----------------------------------------------------------------------------


def test_trust_folders_api(tmp_path: Path) -> None:
    a, b, c = App("a"), App("b"), App("c")
    trust_list = certs.TrustList(tmp_path, max_rejected=2)
    assert certs.list_certificates(tmp_path) == []
    assert not trust_list.is_trusted(a.cert)
    assert trust_list.refuse(a.cert)[1] is True
    assert trust_list.refuse(a.cert)[1] is False  # written once
    assert trust_list.refuse(b.cert)[1] is True
    info, written = trust_list.refuse(c.cert)  # full: described, not kept
    assert (info.id, written) == (c.id, False)
    assert trust_list.pending() == 2

    with pytest.raises(certs.UnknownCertificate, match="no certificate"):
        certs.trust(tmp_path, c.id)
    with pytest.raises(certs.UnknownCertificate, match="not a certificate id"):
        certs.trust(tmp_path, "../../etc")
    assert certs.trust(tmp_path, a.id).state == "trusted"
    assert certs.trust(tmp_path, a.id).state == "trusted"  # again: nothing changes
    assert trust_list.is_trusted(a.cert)
    assert trust_list.pending() == 1
    assert certs.reject(tmp_path, a.id).state == "rejected"
    assert not trust_list.is_trusted(a.cert)

    # A certificate dropped into trusted/ by hand, as PEM under any name, counts.
    pem = x509.load_der_x509_certificate(c.cert).public_bytes(serialization.Encoding.PEM)
    (tmp_path / "pki" / "trusted" / "scada.pem").write_bytes(pem)
    (tmp_path / "pki" / "trusted" / "notes.crt").write_text("not a certificate")
    assert trust_list.is_trusted(c.cert)
    states = {x.id: x.state for x in certs.list_certificates(tmp_path)}
    assert states == {a.id: "rejected", b.id: "rejected", c.id: "trusted"}


# --- passwords ------------------------------------------------------------------------------------


def test_password_hash_round_trip() -> None:
    hashed = auth.hash_password("s3cret pass")
    assert hashed.startswith("scrypt$16384$8$1$")
    assert auth.verify_password("s3cret pass", hashed)
    assert not auth.verify_password("s3cret pass ", hashed)
    assert not auth.verify_password("", hashed)
    assert auth.hash_password("s3cret pass") != hashed  # a fresh salt each time
    assert str(auth.parse_hash(hashed)) == hashed
    # The same text typed composed or decomposed is the same password.
    assert auth.verify_password("a\u0308", auth.hash_password("\u00e4"))
    with pytest.raises(ValueError, match="empty"):
        auth.hash_password("")


@pytest.mark.parametrize(
    ("hashed", "message"),
    [
        ("hunter2", "not a password hash"),
        ("bcrypt$2b$12$abc", "must start with 'scrypt"),
        ("scrypt$16384$8$1$c2FsdHNhbHQ", "6 fields"),
        ("scrypt$1000$8$1$c2FsdHNhbHQ$" + "A" * 43, "power of 2"),
        ("scrypt$x$8$1$c2FsdHNhbHQ$" + "A" * 43, "whole number"),
        ("scrypt$16384$0$1$c2FsdHNhbHQ$" + "A" * 43, "at least 1"),
        ("scrypt$1048576$8$1$c2FsdHNhbHQ$" + "A" * 43, "MiB"),
        ("scrypt$16384$8$1$c2FsdHNhbHQ$not*base64", "not valid base64"),
        ("scrypt$16384$8$1$c2FsdA$" + "A" * 43, "salt must be at least 8 bytes"),
        ("scrypt$16384$8$1$c2FsdHNhbHQ$AAAA", "key must be 16 to 64 bytes"),
    ],
)
def test_malformed_hash_errors(hashed: str, message: str) -> None:
    with pytest.raises(auth.PasswordHashError, match=message) as caught:
        auth.verify_password("x", hashed)
    assert hashed not in str(caught.value)


def test_config_checks_logins(tmp_path: Path) -> None:
    path = write_config(
        tmp_path,
        "  users:\n    - {name: a, password_hash: hunter2}\n"
        f"    - {{name: a, password_hash: '{auth.hash_password('x')}'}}\n",
    )
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    text = str(caught.value)
    assert "users[0].password_hash: not a password hash" in text
    assert "hunter2" not in text
    assert "users[1].name: user 'a' is already defined (first at line 6)" in text
    with pytest.raises(ConfigError, match="nobody could log in"):
        load_config(write_config(tmp_path, "  anonymous: false\n"))


def test_production_example_is_locked_down() -> None:
    loaded: LoadedConfig = load_config(ROOT / "config" / "production.example.yaml")
    opcua = loaded.config.opcua
    assert opcua is not None
    assert not opcua.allow_none
    assert not opcua.anonymous_allowed
    assert opcua.trust == "list"
    assert len(opcua.security) == 6
    assert [u.role for u in opcua.users] == ["reader"]
    # The placeholder hash matches nothing a technician might try.
    for guess in ("", "changeme", "password", "admin", "scada"):
        assert not auth.verify_password(guess, opcua.users[0].password_hash)
    demo = load_config(ROOT / "config" / "demo.yaml").config.opcua
    assert demo is not None
    assert demo.anonymous is True


def test_passwd_stdin_subprocess() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "gateway", "passwd", "--stdin"],
        input=" spaced pass \n",
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    hashed = done.stdout.strip()
    assert auth.verify_password(" spaced pass ", hashed)


def test_passwd_prompts_twice_and_refuses(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    answers = iter(["one", "two"])
    monkeypatch.setattr("getpass.getpass", lambda prompt="": next(answers))
    assert main(["passwd"]) == 2
    assert "differ" in capsys.readouterr().err
    answers = iter(["same", "same"])
    assert main(["passwd"]) == 0
    captured = capsys.readouterr()
    assert auth.verify_password("same", captured.out.strip())
    assert "password_hash:" in captured.err
    monkeypatch.setattr("sys.stdin", io.StringIO("\n"))
    assert main(["passwd", "--stdin"]) == 2
    assert "empty" in capsys.readouterr().err

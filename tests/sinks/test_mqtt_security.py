"""The MQTT link's security against mosquitto with TLS, mTLS and passwords, with a test CA
made here; MQTT 5 and the fallback to 3.1.1 (against a small fake broker on a real socket).
"""

from __future__ import annotations

import asyncio
import datetime
import ipaddress
import logging
import re
import ssl
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from drivers.modbus.transport import RegisterServer
from gateway.app import Gateway
from gateway.config import BrokerSection, TlsSection
from gateway.model import Quality, Reading
from gateway.outbox import Message as OutboxMessage
from gateway.outbox import Stored
from gateway.sinks.mqtt import MqttLink, MqttSink, encode_publishes
from gateway.sparkplug import NAMESPACE
from tests.conftest import free_port
from tests.sinks import test_sparkplug_sink as sp
from tests.sinks.conftest import Mosquitto, Watcher
from tests.sinks.test_mqtt import LATHE, Machine, fast_sink, make_config, running, wait_for

KEY_PASSWORD = "client-key-pw"


# -- a test PKI --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Pki:
    """Certificates and keys as PEM files. ``ca`` is the CA everyone trusts; ``other_ca``
    nobody does. ``server`` names localhost and 127.0.0.1, ``localhost`` only localhost.
    ``client`` (key encrypted with KEY_PASSWORD) is signed by ``ca``, ``stranger`` by
    ``other_ca``."""

    dir: Path

    def cert(self, name: str) -> Path:
        return self.dir / f"{name}.pem"

    def key(self, name: str) -> Path:
        return self.dir / f"{name}.key"

    @property
    def ca(self) -> Path:
        return self.cert("ca")


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _builder(subject: str, issuer: x509.Name, key: ec.EllipticCurvePrivateKey) -> Any:
    now = datetime.datetime.now(datetime.UTC)
    return (
        x509.CertificateBuilder()
        .subject_name(_name(subject))
        .issuer_name(issuer)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(hours=1))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), False)
    )


def _write(pki: Pki, name: str, cert: x509.Certificate, key: Any, password: str = "") -> None:
    pki.cert(name).write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    encryption: serialization.KeySerializationEncryption = (
        serialization.BestAvailableEncryption(password.encode())
        if password
        else serialization.NoEncryption()
    )
    pki.key(name).write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, encryption)
    )


def _make_ca(pki: Pki, name: str) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (
        _builder(f"retrofit test {name}", _name(f"retrofit test {name}"), key)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            True,
        )
        .sign(key, hashes.SHA256())
    )
    _write(pki, name, cert, key)
    return cert, key


def _make_leaf(
    pki: Pki,
    name: str,
    issuer: tuple[x509.Certificate, ec.EllipticCurvePrivateKey],
    *,
    dns: tuple[str, ...] = (),
    ips: tuple[str, ...] = (),
    client: bool = False,
    password: str = "",
) -> None:
    ca_cert, ca_key = issuer
    key = ec.generate_private_key(ec.SECP256R1())
    names: list[x509.GeneralName] = [x509.DNSName(d) for d in dns]
    names += [x509.IPAddress(ipaddress.ip_address(i)) for i in ips]
    usage = ExtendedKeyUsageOID.CLIENT_AUTH if client else ExtendedKeyUsageOID.SERVER_AUTH
    builder = (
        _builder(f"retrofit test {name}", ca_cert.subject, key)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), True)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), False
        )
        .add_extension(x509.ExtendedKeyUsage([usage]), False)
    )
    if names:
        builder = builder.add_extension(x509.SubjectAlternativeName(names), False)
    _write(pki, name, builder.sign(ca_key, hashes.SHA256()), key, password)


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    pki = Pki(tmp_path_factory.mktemp("pki"))
    ca = _make_ca(pki, "ca")
    other = _make_ca(pki, "other_ca")
    _make_leaf(pki, "server", ca, dns=("localhost",), ips=("127.0.0.1",))
    _make_leaf(pki, "localhost", ca, dns=("localhost",))
    _make_leaf(pki, "client", ca, client=True, password=KEY_PASSWORD)
    _make_leaf(pki, "stranger", other, client=True)
    (pki.dir / "garbage.pem").write_text("not a certificate\n")
    return pki


# -- brokers -----------------------------------------------------------------------------------


class TlsMosquitto(Mosquitto):
    """mosquitto with a TLS listener: ``server`` names the certificate it presents;
    ``require_certificate`` asks clients for one signed by the test CA (mTLS)."""

    def __init__(
        self,
        workdir: Path,
        pki: Pki,
        *,
        server: str = "server",
        require_certificate: bool = False,
        users: dict[str, str] | None = None,
    ) -> None:
        super().__init__(workdir, free_port(), users)
        lines = [
            f"cafile {pki.ca}",
            f"certfile {pki.cert(server)}",
            f"keyfile {pki.key(server)}",
            f"require_certificate {'true' if require_certificate else 'false'}",
        ]
        # Listener options apply to the listener above them: the only one.
        self.conf.write_text(self.conf.read_text() + "\n".join(lines) + "\n")


@asynccontextmanager
async def tls_broker(tmp_path: Path, pki: Pki, **kw: Any) -> AsyncIterator[TlsMosquitto]:
    broker = TlsMosquitto(tmp_path / "mosquitto", pki, **kw)
    await broker.astart()
    try:
        yield broker
    finally:
        await broker.astop()


class TlsWatcher(Watcher):
    """The conftest subscriber over TLS (paho's own, blocking handshake: fine in a test)."""

    def __init__(self, port: int, topic: str, pki: Pki, *, client_cert: bool = False) -> None:
        super().__init__(port, topic)
        self.client.tls_set(
            ca_certs=str(pki.ca),
            certfile=str(pki.cert("client")) if client_cert else None,
            keyfile=str(pki.key("client")) if client_cert else None,
            keyfile_password=KEY_PASSWORD if client_cert else None,
        )


class FakeBroker:
    """A tiny MQTT broker on a real socket on 127.0.0.1, for what mosquitto cannot be made to
    do: refuse MQTT 5 (``v5="refuse"``: CONNACK 0x01, unacceptable protocol version, as a
    3.1.1 broker answers; ``"close"``: hang up without a CONNACK, as some do; ``"silent"``:
    neither, as amqtt does). It acks
    QoS 1 PUBLISHes and PINGREQs, and keeps every CONNECT's protocol level and every
    PUBLISH it got. ``after_connack``: bytes written together with the CONNACK (one TLS
    record when ``context`` makes it a TLS listener)."""

    def __init__(
        self,
        v5: str = "accept",
        *,
        context: ssl.SSLContext | None = None,
        after_connack: Callable[[bool], bytes] = lambda v5: b"",
    ) -> None:
        self.v5 = v5
        self.context = context
        self.after_connack = after_connack
        self.levels: list[int] = []
        self.publishes: list[tuple[int, bytes]] = []  # (first byte, rest of the packet)
        self.port = 0
        self._server: asyncio.Server | None = None
        self._handlers: set[asyncio.Task[Any]] = set()
        self._writers: set[asyncio.StreamWriter] = set()

    async def __aenter__(self) -> FakeBroker:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", 0, ssl=self.context)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._server is not None
        self._server.close()
        for writer in list(self._writers):
            writer.close()
        if self._handlers:
            await asyncio.wait(list(self._handlers), timeout=5)
        await self._server.wait_closed()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._handlers.add(task)
        self._writers.add(writer)
        try:
            v5 = False
            while True:
                first, body = await _read_packet(reader)
                kind = first & 0xF0
                if kind == 0x10:  # CONNECT: protocol name (2 + 4 bytes), then the level
                    level = body[6]
                    self.levels.append(level)
                    v5 = level == 5
                    if v5 and self.v5 == "close":
                        return
                    if v5 and self.v5 == "silent":
                        continue
                    if v5 and self.v5 == "refuse":
                        writer.write(b"\x20\x02\x00\x01")
                        await writer.drain()
                        return
                    connack = b"\x20\x03\x00\x00\x00" if v5 else b"\x20\x02\x00\x00"
                    writer.write(connack + self.after_connack(v5))
                elif kind == 0x30:
                    self.publishes.append((first, body))
                    if first & 0x06:
                        topic_len = int.from_bytes(body[:2], "big")
                        mid = body[2 + topic_len : 4 + topic_len]
                        writer.write(b"\x40\x02" + mid)
                elif kind == 0xC0:
                    writer.write(b"\xd0\x00")
                elif kind == 0xE0:
                    return
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError, ssl.SSLError):
            return
        finally:
            self._writers.discard(writer)
            writer.close()
            self._handlers.discard(task)


async def _read_packet(reader: asyncio.StreamReader) -> tuple[int, bytes]:
    first = (await reader.readexactly(1))[0]
    length, shift = 0, 0
    while True:
        byte = (await reader.readexactly(1))[0]
        length |= (byte & 0x7F) << shift
        shift += 7
        if not byte & 0x80:
            break
    return first, await reader.readexactly(length)


def _publish(topic: str, payload: bytes, v5: bool) -> bytes:
    """A QoS 0 PUBLISH, as a broker sends one."""
    data = len(topic).to_bytes(2, "big") + topic.encode() + (b"\x00" if v5 else b"") + payload
    return bytes((0x30, len(data))) + data


class Recorder:
    """A LinkUser that keeps what the link tells it."""

    def __init__(self) -> None:
        self.ups = 0
        self.messages: list[tuple[str, bytes]] = []
        self.acked: list[int] = []

    def link_up(self) -> None:
        self.ups += 1

    def link_down(self, unsent_raw: int) -> None:
        pass

    def link_writable(self) -> None:
        pass

    def link_acked(self, mid: int) -> bool:
        self.acked.append(mid)
        return True

    def link_message(self, topic: str, payload: bytes) -> None:
        self.messages.append((topic, payload))


@asynccontextmanager
async def started(sink: MqttSink) -> AsyncIterator[dict[str, Any]]:
    """The sink connecting in the background; yields its health entry."""
    await sink.start()
    try:
        yield sink.runtime.health["mqtt"]
    finally:
        await sink.close()


def tls_config(pki: Pki, **extra: Any) -> dict[str, Any]:
    return {"ca_file": str(pki.ca), **extra}


def sink_for(tmp_path: Path, port: int, **mqtt: Any) -> MqttSink:
    return fast_sink(Gateway(make_config(tmp_path, free_port(), {"port": port, **mqtt})))


async def wait_settled(health: dict[str, Any], seconds: float = 5.0) -> None:
    """Until connected or failed."""
    await wait_for(lambda: health["connected"] or health["last_error"], seconds)


def mosquitto_protocols(broker: Mosquitto, client_id: str = "gw-test") -> list[str]:
    """What mosquitto logged for each connection of ``client_id``: p5 is MQTT 5, p2 3.1.1."""
    return re.findall(rf"as {re.escape(client_id)} \((p\d)", broker.log_text())


# -- encoding ----------------------------------------------------------------------------------


def test_raw_publishes_carry_an_empty_property_list_in_mqtt5() -> None:
    stored = [
        Stored(7, OutboxMessage("a/b", b'{"value":1}', 1, True, 0), False),
        Stored(8, OutboxMessage("a/c", b'{"value":2}', 0, False, 0), False),
    ]
    mids = iter([300, 301])
    v3, _ = encode_publishes(stored, mids.__next__, {}, lambda s: s.message.payload)
    v5, sent = encode_publishes(stored, mids.__next__, {}, lambda s: s.message.payload, v5=True)
    assert sent == [(301, 7)]
    topic = b"\x00\x03a/b"
    # QoS 1, retained: topic, packet id, properties length 0, payload.
    assert v5.startswith(b"\x33" + bytes((len(topic) + 2 + 1 + 11,)) + topic + b"\x01\x2d\x00")
    second = v5[2 + len(topic) + 3 + 11 :]
    assert second == b"\x30" + bytes((5 + 1 + 11,)) + b"\x00\x03a/c\x00" + b'{"value":2}'
    assert len(v5) == len(v3) + 2  # one property length byte per packet


# -- TLS against mosquitto ---------------------------------------------------------------------


async def test_tls_values_arrive_over_mqtt5_and_a_tls_subscriber_sees_them(
    tmp_path: Path, pki: Pki, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, "gateway.sinks.mqtt")
    # The CA file relative to the config file, like every file the config names.
    (tmp_path / "certs").mkdir()
    (tmp_path / "certs" / "ca.pem").write_bytes(pki.ca.read_bytes())
    dev_port = free_port()
    async with tls_broker(tmp_path, pki) as broker:
        mqtt_cfg = {"port": broker.port, "tls": {"ca_file": "certs/ca.pem"}}
        gw = Gateway(make_config(tmp_path, dev_port, mqtt_cfg))
        sink = fast_sink(gw)
        async with (
            RegisterServer([Machine()], port=dev_port),
            running(gw, sink),
            TlsWatcher(broker.port, f"{LATHE}/#", pki) as w,
        ):
            await w.wait(lambda: (m := w.latest(f"{LATHE}/speed")) and m.json()["value"] == 1450)
            await w.wait(lambda: len(w.on(f"{LATHE}/count")) >= 3)
            health = gw.health["mqtt"]
            assert health["connected"]
            assert (health["protocol"], health["tls"]) == ("5", "TLSv1.3")
            client = sink._link.client
            assert client is not None
            assert isinstance(client.socket(), ssl.SSLSocket)
            assert client._ssl is False  # paho never wrapped (or handshook) it itself
            # mosquitto's Receive Maximum (20) is shared with paho's own QoS 1 publishes.
            assert sink._link._raw_quota == 15
            # A burst of QoS 1 values: never more than the quota waits for its PUBACK.
            most = 0
            mids = sink._link._raw_mids
            for i in range(300):
                reading = Reading("lathe-1/model", f"v{i}", Quality.GOOD, time.time())
                sink._on_batch_per_tag([reading])
                most = max(most, len(mids))
                if i % 50 == 0:
                    await asyncio.sleep(0)
            await wait_for(lambda: sink._outbox.stats["queued_messages"] == 0)
            assert 0 < most <= 15
            burst = [f"v{i}" for i in range(300)]

            def received() -> list[str]:
                return [v for m in w.on(f"{LATHE}/model") if (v := m.json()["value"]) in burst]

            # All of them, in order (the device's own model value comes in between).
            await w.wait(lambda: len(received()) >= 300)
            assert received() == burst
        assert mosquitto_protocols(broker) == ["p5"]
    assert "(MQTT 5, TLSv1.3)" in caplog.text
    # On loopback, verified: nothing to warn about.
    assert not [
        r for r in caplog.records if r.levelno >= logging.WARNING and r.name.endswith(".mqtt")
    ]


async def test_a_broker_certificate_from_another_ca_or_a_bad_ca_file_is_refused_clearly(
    tmp_path: Path, pki: Pki
) -> None:
    cases: list[tuple[dict[str, Any], str]] = [
        (
            tls_config(pki, ca_file=str(pki.cert("other_ca"))),
            "TLS: the broker's certificate is not signed by a trusted CA (",
        ),
        (
            tls_config(pki, ca_file=str(pki.dir / "garbage.pem")),
            f"TLS: tls.ca_file {pki.dir / 'garbage.pem'} holds no usable CA certificate",
        ),
        (
            tls_config(pki, ca_file="missing/ca.pem"),
            f"TLS: cannot read tls.ca_file {tmp_path / 'missing' / 'ca.pem'}: No such file",
        ),
        (
            tls_config(pki, cert_file=str(pki.dir / "nope.pem")),
            f"TLS: cannot read tls.cert_file {pki.dir / 'nope.pem'}",
        ),
        (
            # The client key is encrypted, and no password is configured.
            tls_config(pki, cert_file=str(pki.cert("client")), key_file=str(pki.key("client"))),
            "is encrypted: set tls.key_password_env",
        ),
    ]
    async with tls_broker(tmp_path, pki) as broker:
        for tls, expected in cases:
            async with started(sink_for(tmp_path, broker.port, tls=tls)) as health:
                await wait_settled(health)
                assert not health["connected"]
                assert expected in health["last_error"], (expected, health["last_error"])


async def test_tls_to_a_plain_port_and_plain_to_a_tls_port_say_so(
    tmp_path: Path, pki: Pki, mosquitto_broker: Mosquitto
) -> None:
    sink = sink_for(tmp_path, mosquitto_broker.port, tls=tls_config(pki))
    async with started(sink) as health:
        await wait_settled(health)
        assert "closed the connection during the handshake (a plain MQTT port" in str(
            health["last_error"]
        )
    async with (
        tls_broker(tmp_path / "tls", pki) as broker,
        started(sink_for(tmp_path, broker.port)) as health,
    ):
        await wait_settled(health)
        assert "without answering (a TLS port? then configure tls:)" in health["last_error"]


async def test_hostname_mismatch_is_refused_and_accepted_with_server_name(
    tmp_path: Path, pki: Pki, caplog: pytest.LogCaptureFixture
) -> None:
    """The broker's certificate names localhost only; the gateway connects to 127.0.0.1."""
    async with tls_broker(tmp_path, pki, server="localhost") as broker:
        async with started(sink_for(tmp_path, broker.port, tls=tls_config(pki))) as health:
            await wait_settled(health)
            assert not health["connected"]
            error = health["last_error"]
            assert "TLS: the broker's certificate is not valid for '127.0.0.1'" in error
            assert "tls.server_name" in error
        # The log says which name failed, too.
        assert "not valid for '127.0.0.1'" in caplog.text
        tls = tls_config(pki, server_name="localhost")
        async with started(sink_for(tmp_path, broker.port, tls=tls)) as health:
            await wait_settled(health)
            assert health["connected"], health["last_error"]
        # Insecure modes connect, and say so at every start.
        for tls, warning in [
            (tls_config(pki, verify_hostname=False), "tls.verify_hostname is off"),
            (
                tls_config(pki, ca_file=str(pki.cert("other_ca")), insecure_skip_verify=True),
                "tls.insecure_skip_verify is on",
            ),
        ]:
            for _start in range(2):
                caplog.clear()
                async with started(sink_for(tmp_path, broker.port, tls=tls)) as health:
                    await wait_settled(health)
                    assert health["connected"], health["last_error"]
                warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
                assert [warning in r.getMessage() for r in warnings] == [True]


async def test_mtls_with_a_client_certificate_and_refused_without_or_with_a_stranger(
    tmp_path: Path, pki: Pki, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("GW_KEY_PASSWORD", KEY_PASSWORD)
    client = tls_config(
        pki,
        cert_file=str(pki.cert("client")),
        key_file=str(pki.key("client")),
        key_password_env="GW_KEY_PASSWORD",
    )
    stranger = tls_config(
        pki, cert_file=str(pki.cert("stranger")), key_file=str(pki.key("stranger"))
    )
    async with tls_broker(tmp_path, pki, require_certificate=True) as broker:
        sink = sink_for(tmp_path, broker.port, tls=client)
        async with (
            TlsWatcher(broker.port, f"{LATHE}/#", pki, client_cert=True) as w,
            started(sink) as health,
        ):
            await wait_settled(health)
            assert health["connected"], health["last_error"]
            sink._on_batch_per_tag([Reading("lathe-1/speed", 1450, Quality.GOOD, time.time())])
            await w.wait(lambda: (m := w.latest(f"{LATHE}/speed")) and m.json()["value"] == 1450)
        # Without a certificate the broker's alert comes after the handshake, and our CONNECT
        # can race the close that follows it (the reset then discards the alert): either way
        # the error must point at the client certificate settings.
        for tls, expected in [
            (tls_config(pki), ("client certificate", "tls.cert_file and tls.key_file")),
            (
                stranger,
                ("TLS: the broker refused our client certificate (TLSV1_ALERT_UNKNOWN_CA)",),
            ),
        ]:
            async with started(sink_for(tmp_path, broker.port, tls=tls)) as health:
                await wait_settled(health)
                assert not health["connected"]
                for part in expected:
                    assert part in health["last_error"]
        monkeypatch.setenv("GW_KEY_PASSWORD", "wrong")
        async with started(sink_for(tmp_path, broker.port, tls=client)) as health:
            await wait_settled(health)
            assert "TLS: cannot use the client certificate" in health["last_error"]


async def test_password_over_tls(
    tmp_path: Path, pki: Pki, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    users = {"gw": "s3cret"}
    async with tls_broker(tmp_path, pki, users=users) as broker:
        for password, ok in [("s3cret", True), ("wrong", False)]:
            monkeypatch.setenv("GW_MQTT_PASSWORD", password)
            sink = sink_for(
                tmp_path,
                broker.port,
                tls=tls_config(pki),
                username="gw",
                password_env="GW_MQTT_PASSWORD",
            )
            async with started(sink) as health:
                await wait_settled(health)
                assert health["connected"] is ok
                if not ok:
                    assert "not authorised" in health["last_error"]
                    assert "check username and password" in health["last_error"]
    assert "s3cret" not in caplog.text


async def test_a_refused_publish_is_read_from_the_mqtt5_puback(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """An ACL that forbids our value topics: in MQTT 5 mosquitto answers "Not authorized"
    in the PUBACK; the message is dropped (sending it again would not help), counted, and
    said once per connection."""
    broker = Mosquitto(tmp_path / "mosquitto", free_port(), users={"gw": "s3cret"})
    acl = tmp_path / "mosquitto" / "acl"
    acl.write_text("user gw\ntopic readwrite uns/s/a/l/$gateway/#\n")
    broker.conf.write_text(broker.conf.read_text() + f"acl_file {acl}\n")
    (tmp_path / "pw").write_text("s3cret")
    await broker.astart()
    try:
        sink = sink_for(tmp_path, broker.port, username="gw", password_file="pw")
        async with started(sink) as health:
            await wait_settled(health)
            assert health["connected"], health["last_error"]
            for i in range(3):
                sink._on_batch_per_tag([Reading("lathe-1/speed", i, Quality.GOOD, time.time())])
            await wait_for(lambda: sink._link.refused >= 3)
            await wait_for(lambda: sink._outbox.stats["queued_messages"] == 0)
            assert health["connected"]
    finally:
        await broker.astop()
    refusals = [r.getMessage() for r in caplog.records if "refused a message" in r.getMessage()]
    assert len(refusals) == 1
    assert "PUBACK: Not authorized" in refusals[0]


async def test_plain_tcp_warns_at_every_start_unless_on_loopback(
    caplog: pytest.LogCaptureFixture, tmp_path: Path
) -> None:
    for host, warned in [("192.0.2.1", True), ("127.0.0.1", False), ("localhost", False)]:
        for _start in range(2):
            caplog.clear()
            sink = sink_for(tmp_path, 1883, host=host, username="gw", password_env="X")
            async with started(sink):
                pass
            warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
            warnings = [m for m in warnings if "no TLS" in m]
            assert len(warnings) == int(warned), (host, warnings)
            if warned:
                assert "the password and every message cross the network in clear" in warnings[0]
                assert "mqtt.tls" in warnings[0]


async def test_mqtt5_with_mosquitto_and_3_1_1_when_configured(
    tmp_path: Path, mosquitto_broker: Mosquitto
) -> None:
    for protocol, logged in [("auto", "p5"), ("3.1.1", "p2"), (5, "p5")]:
        sink = sink_for(tmp_path, mosquitto_broker.port, protocol=protocol)
        async with started(sink) as health:
            await wait_settled(health)
            assert health["connected"], health["last_error"]
            assert health["protocol"] == str(protocol).replace("auto", "5")
            assert health["tls"] is None
            # Values go through in either version's packets.
            async with Watcher(mosquitto_broker.port, f"{LATHE}/speed") as w:
                sink._on_batch_per_tag([Reading("lathe-1/speed", 7, Quality.GOOD, time.time())])
                await w.wait(lambda: (m := w.latest(f"{LATHE}/speed")) and m.json()["value"] == 7)
        assert mosquitto_protocols(mosquitto_broker)[-1] == logged
        sink.runtime.bus.latest.clear()


# -- MQTT 5, falling back to 3.1.1 -------------------------------------------------------------


@pytest.mark.parametrize("refusal", ["refuse", "close", "silent"])
async def test_auto_falls_back_to_3_1_1_once_and_remembers(
    tmp_path: Path, refusal: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("gateway.sinks.mqtt.V5_CONNACK_TIMEOUT", 0.3)
    async with FakeBroker(refusal) as broker:
        sink = sink_for(tmp_path, broker.port)
        async with started(sink) as health:
            await wait_settled(health)
            assert health["connected"], health["last_error"]
            assert health["protocol"] == "3.1.1"
            assert broker.levels == [5, 4]
            # Raw packets in 3.1.1 form: no property list before the payload (QoS 1: the
            # buffered value, not the restatement of the latest one at connect).
            sink._on_batch_per_tag([Reading("lathe-1/speed", 9, Quality.GOOD, time.time())])

            def speed() -> list[bytes]:
                return [b for f, b in broker.publishes if f & 0x02 and b"lathe-1/speed" in b]

            await wait_for(speed)
            body = speed()[0]
            topic_len = int.from_bytes(body[:2], "big")
            assert body[2 + topic_len + 2 :].startswith(b'{"seq":')
            # Remembered: the next connection asks in 3.1.1 straight away.
            sink._link.hard_close()
            await wait_for(lambda: len(broker.levels) == 3 and health["connected"])
            assert broker.levels == [5, 4, 4]
            assert sink._link.reconnects == 1


async def test_protocol_5_does_not_fall_back(tmp_path: Path) -> None:
    async with FakeBroker("refuse") as broker:
        async with started(sink_for(tmp_path, broker.port, protocol="5")) as health:
            await wait_settled(health)
            assert not health["connected"]
            assert "Unsupported protocol version" in health["last_error"]
            assert "protocol: auto or 3.1.1" in health["last_error"]
            await asyncio.sleep(0.3)  # a retry or two (backoff 0.1-0.4 s)
        assert set(broker.levels) == {5}


# -- the TLS layer on the event loop -----------------------------------------------------------


async def test_packets_left_in_the_tls_layer_are_read_at_once(pki: Pki, tmp_path: Path) -> None:
    """The broker's CONNACK and three messages arrive in one TLS record: paho reads one
    packet per call, and the rest waits decrypted in the SSL object, where the event loop
    cannot see it. The link drains it; otherwise the messages would wait for the next
    packet (a keepalive later)."""
    server = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server.load_cert_chain(pki.cert("server"), pki.key("server"))
    three = lambda v5: b"".join(_publish(f"t/{i}", b"x", v5) for i in range(3))  # noqa: E731
    async with FakeBroker(context=server, after_connack=three) as broker:
        gw = Gateway(make_config(tmp_path, free_port(), {"port": broker.port}))
        section = BrokerSection(port=broker.port, tls=TlsSection(ca_file=str(pki.ca)))
        user = Recorder()
        link = MqttLink(gw, section, user, client_id="drain", will=lambda: None)
        link.start()
        try:
            await wait_for(lambda: user.ups == 1 and len(user.messages) == 3, 2)
            assert [t for t, _ in user.messages] == ["t/0", "t/1", "t/2"]
            assert link.tls_version is not None
        finally:
            await link.close()


async def test_a_silent_tls_handshake_never_blocks_the_event_loop(
    tmp_path: Path, pki: Pki, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A listener that accepts TCP and never answers the ClientHello: the handshake waits
    on the event loop, bounded by the connect timeout, while everything else runs."""
    monkeypatch.setattr("gateway.sinks.mqtt.CONNECT_TIMEOUT", 0.5)
    accepted: list[asyncio.StreamWriter] = []

    async def mute(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        accepted.append(writer)

    server = await asyncio.start_server(mute, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        async with started(sink_for(tmp_path, port, tls=tls_config(pki))) as health:
            gaps: list[float] = []
            loop = asyncio.get_running_loop()
            last = loop.time()
            while not health["last_error"] and len(gaps) < 200:
                await asyncio.sleep(0.01)
                now = loop.time()
                gaps.append(now - last)
                last = now
            assert health["last_error"] == "no answer within the connect timeout"
            assert accepted
            assert max(gaps) < 0.1
    finally:
        for writer in accepted:
            writer.close()
        server.close()
        await server.wait_closed()


# -- Sparkplug shares the link -----------------------------------------------------------------


async def test_sparkplug_over_mtls(
    tmp_path: Path, pki: Pki, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("GW_KEY_PASSWORD", KEY_PASSWORD)
    tls = tls_config(
        pki,
        cert_file=str(pki.cert("client")),
        key_file=str(pki.key("client")),
        key_password_env="GW_KEY_PASSWORD",
    )
    async with tls_broker(tmp_path, pki, require_certificate=True) as broker:
        gw = Gateway(sp.make_config(tmp_path, broker.port, tls=tls))
        sink = sp.fast_sink(gw)
        async with TlsWatcher(broker.port, f"{NAMESPACE}/#", pki, client_cert=True) as w:
            async with sp.driven(gw, sink):
                await w.wait(lambda: sp.count(w, "DBIRTH") == 1)
                await sp.feed(gw, [sp.reading("count", 1)], [sp.reading("count", 2)])
                await w.wait(lambda: sp.count(w, "DDATA") == 2)
                health = gw.health["sparkplug"]
                assert (health["protocol"], health["tls"]) == ("5", "TLSv1.3")
            # Closing the sink publishes the NDEATH.
            await w.wait(lambda: sp.count(w, "NDEATH") == 1)
        sp.assert_one_session(sp.sp(w)[:-1])
        assert mosquitto_protocols(broker, sp.CLIENT_ID) == ["p5"]

"""X.509 for the OPC UA server: our own certificate, and the client certificates we trust.

Layout, under the data directory::

    pki/own/server_cert.der, server_key.pem   ours, made on first start
    pki/trusted/<id>_<CN>.der                  client certificates allowed in
    pki/rejected/<id>_<CN>.der                 client certificates refused so far

``<id>`` is the first 16 hex digits of the certificate's SHA-256 thumbprint (a technician types
it; 64 bits keep a plant's few certificates apart). A refused client certificate lands in
``rejected/``; ``trust()`` moves it to ``trusted/`` and ``reject()`` back. Any DER or PEM file
a technician drops into ``trusted/`` by hand counts too, whatever its name. A file's
modification time is when the certificate was first seen: it is written once and moving it
keeps the time. Only exact certificates are trusted, not CAs that issued them.

This module is the only one that imports ``cryptography`` (the architecture test holds it to
that), and it never imports asyncua: the status page and the CLI use ``list_certificates``,
``trust`` and ``reject`` without an OPC UA server. Everything here blocks on the file system;
the files are small and few.
"""

from __future__ import annotations

import contextlib
import hashlib
import ipaddress
import logging
import os
import re
import socket
import time
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Final, Literal

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from gateway.errors import GatewayError

__all__ = [
    "CERT_VALIDITY",
    "MAX_REJECTED",
    "CertificateInfo",
    "TrustList",
    "UnknownCertificate",
    "certificate_id",
    "der_of",
    "describe",
    "list_certificates",
    "load_or_create_certificate",
    "own_certificate",
    "pki_dir",
    "reject",
    "sha256_of",
    "trust",
]

log = logging.getLogger("gateway.certs")

#: Validity of a generated server certificate. It is renewed at start once expired.
CERT_VALIDITY: Final = timedelta(days=5 * 365)
#: Refused certificates kept in rejected/; beyond this a client cycling through certificates
#: could fill the disk, so newer ones are only logged.
MAX_REJECTED: Final = 200
ID_LENGTH: Final = 16

State = Literal["trusted", "rejected", "presented"]
_SUFFIXES: Final = (".der", ".cer", ".crt", ".pem")


class UnknownCertificate(GatewayError, LookupError):
    """No certificate, or more than one, has the id that was asked for."""


def pki_dir(data_dir: Path) -> Path:
    return data_dir / "pki"


def sha256_of(der: bytes) -> str:
    return hashlib.sha256(der).hexdigest()


def certificate_id(der: bytes) -> str:
    """The short id a technician types: the SHA-256 thumbprint's first 16 hex digits."""
    return sha256_of(der)[:ID_LENGTH]


def der_of(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.DER)


@dataclass(frozen=True, slots=True)
class CertificateInfo:
    """What a technician needs to decide about a certificate, and where it is."""

    id: str
    sha256: str
    state: State
    subject: str
    common_name: str
    application_uri: str
    not_before: datetime
    not_after: datetime
    first_seen: datetime | None = None
    path: Path | None = None

    def time_problem(self, now: datetime | None = None) -> str:
        """Empty while valid, else why not ("expired 2024-05-01")."""
        now = now or datetime.now(UTC)
        if now < self.not_before:
            return f"not valid before {self.not_before:%Y-%m-%d %H:%M} UTC"
        if now >= self.not_after:
            return f"expired {self.not_after:%Y-%m-%d}"
        return ""


def describe(der: bytes, state: State = "presented", path: Path | None = None) -> CertificateInfo:
    """The certificate's id, names and validity; ValueError if ``der`` is not a certificate."""
    cert = x509.load_der_x509_certificate(der)
    names = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    common_name = str(names[0].value) if names else ""
    uris: list[str] = []
    with contextlib.suppress(x509.ExtensionNotFound):
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        uris = san.get_values_for_type(x509.UniformResourceIdentifier)
    first_seen = None
    if path is not None:
        with contextlib.suppress(OSError):
            first_seen = datetime.fromtimestamp(path.stat().st_mtime, UTC)
    thumbprint = sha256_of(der)
    return CertificateInfo(
        id=thumbprint[:ID_LENGTH],
        sha256=thumbprint,
        state=state,
        subject=cert.subject.rfc4514_string(),
        common_name=common_name,
        application_uri=uris[0] if uris else "",
        not_before=cert.not_valid_before_utc,
        not_after=cert.not_valid_after_utc,
        first_seen=first_seen,
        path=path,
    )


# --- the trust folders ----------------------------------------------------------------------------


def list_certificates(data_dir: Path) -> list[CertificateInfo]:
    """Trusted then rejected client certificates, each group newest first.

    A certificate that is in both folders (refused at the moment it was trusted) is listed as
    trusted: that is how the server treats it. Files that are not certificates are skipped
    with a warning.
    """
    pki = pki_dir(data_dir)
    seen: set[str] = set()
    listed: list[CertificateInfo] = []
    for state in ("trusted", "rejected"):
        group = []
        for cert in _read_folder(pki / state, state):
            if cert.sha256 not in seen:
                seen.add(cert.sha256)
                group.append(cert)
        listed += _newest_first(group)
    return listed


def trust(data_dir: Path, cert_id: str) -> CertificateInfo:
    """Move a rejected certificate to trusted/; a running server lets it in at its next
    connection. Trusting a trusted one changes nothing. Raises UnknownCertificate."""
    return _move(data_dir, cert_id, "trusted")


def reject(data_dir: Path, cert_id: str) -> CertificateInfo:
    """Move a trusted certificate to rejected/; a running server closes its connections
    within seconds and refuses new ones. Raises UnknownCertificate."""
    return _move(data_dir, cert_id, "rejected")


def _move(data_dir: Path, cert_id: str, to: Literal["trusted", "rejected"]) -> CertificateInfo:
    wanted = cert_id.strip().lower()
    if not re.fullmatch(r"[0-9a-f]{4,64}", wanted):
        raise UnknownCertificate(
            f"{cert_id!r} is not a certificate id (hex digits, as `retrofit-gw certs list` "
            f"shows them)"
        )
    matches = [c for c in list_certificates(data_dir) if c.sha256.startswith(wanted)]
    ids = {c.sha256 for c in matches}
    if not matches:
        raise UnknownCertificate(f"no certificate {wanted} in {pki_dir(data_dir)}")
    if len(ids) > 1:
        found = ", ".join(sorted(c.id for c in matches))
        raise UnknownCertificate(f"{wanted} matches several certificates ({found}): type more")
    info = matches[0]
    target = pki_dir(data_dir) / to
    other: State = "rejected" if to == "trusted" else "trusted"
    # Every copy in the other folder goes, or a stale one would show up again.
    copies = [c for c in _read_folder(pki_dir(data_dir) / other, other) if c.sha256 == info.sha256]
    present = [c for c in _read_folder(target, to) if c.sha256 == info.sha256]
    result = present[0] if present else None
    for copy in copies:
        assert copy.path is not None
        if result is not None:
            copy.path.unlink(missing_ok=True)
            continue
        target.mkdir(parents=True, exist_ok=True)
        dest = target / copy.path.name
        if dest.exists():  # a different file by that name, dropped there by hand
            dest = target / _file_name(copy)
        os.replace(copy.path, dest)  # keeps the file's time: when it was first seen
        result = _read_one(dest, to)
    if result is None:
        raise UnknownCertificate(f"certificate {info.id} vanished while being moved")
    log.info("certificate %s (%s) is now %s", result.id, result.common_name or result.subject, to)
    return result


def own_certificate(data_dir: Path) -> CertificateInfo | None:
    """The server's own certificate (what a client asks its user to trust), if made yet."""
    path = pki_dir(data_dir) / "own" / "server_cert.der"
    try:
        return describe(path.read_bytes(), "trusted", path)
    except (OSError, ValueError):
        return None


def _newest_first(certs: list[CertificateInfo]) -> list[CertificateInfo]:
    epoch = datetime.fromtimestamp(0, UTC)
    return sorted(certs, key=lambda c: (c.first_seen or epoch, c.id), reverse=True)


def _read_folder(folder: Path, state: State) -> list[CertificateInfo]:
    try:
        entries = sorted(folder.iterdir())
    except FileNotFoundError:
        return []
    found = []
    for path in entries:
        if path.suffix.lower() not in _SUFFIXES or not path.is_file():
            continue
        info = _read_one(path, state)
        if info is not None:
            found.append(info)
    return found


def _read_one(path: Path, state: State) -> CertificateInfo | None:
    try:
        der = _load_der(path.read_bytes())
        return describe(der, state, path)
    except (OSError, ValueError) as exc:
        log.warning("%s is not a readable certificate (%s); skipped", path, exc)
        return None


def _load_der(data: bytes) -> bytes:
    if data.lstrip().startswith(b"-----BEGIN"):
        return der_of(x509.load_pem_x509_certificate(data))
    return data


def _file_name(info: CertificateInfo) -> str:
    label = re.sub(r"[^A-Za-z0-9._-]+", "_", info.common_name).strip("._-")[:40]
    return f"{info.id}_{label}.der" if label else f"{info.id}.der"


class TrustList:
    """The server's view of the trust folders, read again at every check.

    Re-reading is what lets ``trust()`` from another process take effect without a restart.
    A check costs one directory listing; a file is parsed again only when its size or time
    changes.
    """

    def __init__(self, data_dir: Path, *, max_rejected: int = MAX_REJECTED) -> None:
        self.trusted_dir = pki_dir(data_dir) / "trusted"
        self.rejected_dir = pki_dir(data_dir) / "rejected"
        self.max_rejected = max_rejected
        self._thumbprints: dict[Path, tuple[tuple[int, int], str | None]] = {}
        self._full_logged_at = -3600.0

    def make_folders(self) -> None:
        """Create both folders, so that a technician finds them before the first refusal."""
        for folder in (self.trusted_dir, self.rejected_dir):
            folder.mkdir(parents=True, exist_ok=True)

    def trusted(self) -> set[str]:
        """SHA-256 thumbprints of every certificate in trusted/."""
        found: set[str] = set()
        seen: set[Path] = set()
        try:
            entries = list(os.scandir(self.trusted_dir))
        except FileNotFoundError:
            entries = []
        for entry in entries:
            path = Path(entry.path)
            if path.suffix.lower() not in _SUFFIXES:
                continue
            try:
                st = entry.stat()
            except OSError:
                continue
            seen.add(path)
            signature = (st.st_mtime_ns, st.st_size)
            cached = self._thumbprints.get(path)
            if cached is None or cached[0] != signature:
                try:
                    thumbprint: str | None = sha256_of(_load_der(path.read_bytes()))
                except (OSError, ValueError):
                    thumbprint = None
                cached = self._thumbprints[path] = (signature, thumbprint)
            if cached[1] is not None:
                found.add(cached[1])
        for gone in self._thumbprints.keys() - seen:
            del self._thumbprints[gone]
        return found

    def is_trusted(self, der: bytes) -> bool:
        return sha256_of(der) in self.trusted()

    def refuse(self, der: bytes) -> tuple[CertificateInfo, bool]:
        """Record a refused certificate in rejected/: (its description, newly written).

        Written once: the file's time stays the first refusal. Raises ValueError when ``der``
        is not a certificate (nothing is written then).
        """
        info = describe(der, "rejected")
        path = self.rejected_dir / _file_name(info)
        if path.exists():
            return describe(der, "rejected", path), False
        try:
            count = sum(1 for p in self.rejected_dir.iterdir() if p.suffix == ".der")
        except FileNotFoundError:
            count = 0
        if count >= self.max_rejected:
            now = time.monotonic()
            if now - self._full_logged_at >= 3600:
                self._full_logged_at = now
                log.warning(
                    "%s holds %d certificates already: newly refused ones are not kept "
                    "(remove old ones there)",
                    self.rejected_dir,
                    count,
                )
            return info, False
        self.rejected_dir.mkdir(parents=True, exist_ok=True)
        _write(path, der, 0o644)
        return describe(der, "rejected", path), True

    def pending(self) -> int:
        """Certificates in rejected/ that are not trusted: what a technician may want to see."""
        try:
            names = [p.name for p in self.rejected_dir.iterdir() if p.suffix == ".der"]
        except FileNotFoundError:
            return 0
        trusted_ids = {t[:ID_LENGTH] for t in self.trusted()}
        return sum(1 for n in names if n[:ID_LENGTH] not in trusted_ids)


# --- our own certificate --------------------------------------------------------------------------


def load_or_create_certificate(
    own: Path, application_uri: str, host: str, gateway_name: str
) -> tuple[x509.Certificate, rsa.RSAPrivateKey]:
    """The server's certificate and key from ``own``, made there first if missing or unusable.

    Regenerated when missing, unreadable, expired, not matching its key, or not naming the
    ApplicationUri, this host's name or the configured ``host`` (clients reject it then
    anyway). Not regenerated when an interface address changes (DHCP): every client would
    have to trust the new certificate again. Blocking: run it in a thread.
    """
    cert_path = own / "server_cert.der"
    key_path = own / "server_key.pem"
    problem = "missing"
    if cert_path.exists() and key_path.exists():
        try:
            cert = x509.load_der_x509_certificate(cert_path.read_bytes())
            key = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
        except (OSError, ValueError) as exc:
            problem = f"unreadable ({exc})"
        else:
            problem = _certificate_problem(cert, key, application_uri, host)
            if not problem:
                assert isinstance(key, rsa.RSAPrivateKey)
                return cert, key
    if problem != "missing":
        log.warning("OPC UA server certificate in %s is %s: making a new one", own, problem)
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    cert = _self_signed(key, application_uri, host, gateway_name)
    own.mkdir(parents=True, exist_ok=True)
    _write(
        key_path,
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        ),
        0o600,
    )
    _write(cert_path, der_of(cert), 0o644)
    log.info(
        "OPC UA: made a server certificate for %s in %s (SHA-256 %s)",
        application_uri,
        cert_path,
        cert.fingerprint(hashes.SHA256()).hex(),
    )
    return cert, key


def _certificate_problem(
    cert: x509.Certificate, key: object, application_uri: str, host: str
) -> str:
    if not isinstance(key, rsa.RSAPrivateKey):
        return "not for an RSA key"
    if cert.public_key() != key.public_key():
        return "not for the key beside it"
    now = datetime.now(UTC)
    if not cert.not_valid_before_utc <= now < cert.not_valid_after_utc:
        return f"not valid now (valid until {cert.not_valid_after_utc:%Y-%m-%d})"
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return "without a subject alternative name"
    if application_uri not in san.get_values_for_type(x509.UniformResourceIdentifier):
        return f"not for {application_uri}"
    dns = {n.lower() for n in san.get_values_for_type(x509.DNSName)}
    ips = set(san.get_values_for_type(x509.IPAddress))
    hostname = socket.gethostname()
    if hostname and hostname.lower() not in dns:
        return f"not naming this host ({hostname})"
    bound = _ip(host)
    if bound is None:
        if host and host.lower() not in dns:
            return f"not naming {host}"
    elif not bound.is_unspecified and bound not in ips:
        return f"not naming {host}"
    return ""


def _ip(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        return ipaddress.ip_address(text)
    except ValueError:
        return None


def host_names(host: str) -> tuple[list[str], list[ipaddress.IPv4Address | ipaddress.IPv6Address]]:
    """DNS names and IP addresses a client may use to reach a server bound to ``host``.

    The host name, its fully qualified name, localhost and the loopback addresses always; the
    bound address or name when it is a specific one; when bound to all interfaces (0.0.0.0,
    ::), the addresses the host name resolves to and the address of the default route.
    """
    hostname = socket.gethostname()
    dns = [hostname, "localhost"]
    ips: list[ipaddress.IPv4Address | ipaddress.IPv6Address] = [
        ipaddress.ip_address("127.0.0.1"),
        ipaddress.ip_address("::1"),
    ]
    with contextlib.suppress(OSError):
        for *_, canonical, _ in socket.getaddrinfo(hostname, None, flags=socket.AI_CANONNAME):
            if canonical and "." in canonical:
                dns.append(canonical)
    bound = _ip(host)
    if bound is None:
        if host:
            dns.append(host)
    elif not bound.is_unspecified:
        ips.append(bound)
    else:
        ips.extend(_local_addresses(hostname, bound.version))
    unique_dns = list(dict.fromkeys(n for n in dns if n))
    return unique_dns, list(dict.fromkeys(ips))


def _local_addresses(
    hostname: str, version: int
) -> list[ipaddress.IPv4Address | ipaddress.IPv6Address]:
    found: list[ipaddress.IPv4Address | ipaddress.IPv6Address] = []
    with contextlib.suppress(OSError):
        for *_, sockaddr in socket.getaddrinfo(hostname, None, proto=socket.IPPROTO_TCP):
            address = _ip(str(sockaddr[0]).split("%")[0])
            if address is not None and not address.is_loopback:
                found.append(address)
    # The address of the default route: connecting a UDP socket only consults the routing
    # table, nothing is sent. 192.0.2.1 (TEST-NET-1) is never a real peer.
    families = [(socket.AF_INET, "192.0.2.1")]
    if version == 6:
        families.append((socket.AF_INET6, "2001:db8::1"))
    for family, probe in families:
        with contextlib.suppress(OSError), socket.socket(family, socket.SOCK_DGRAM) as s:
            s.connect((probe, 9))
            address = _ip(str(s.getsockname()[0]))
            if address is not None and not address.is_loopback and not address.is_unspecified:
                found.append(address)
    return found


def _self_signed(
    key: rsa.RSAPrivateKey, application_uri: str, host: str, gateway_name: str
) -> x509.Certificate:
    dns, ips = host_names(host)
    names: list[x509.GeneralName] = [x509.UniformResourceIdentifier(application_uri)]
    names += [x509.DNSName(n) for n in dns]
    names += [x509.IPAddress(a) for a in ips]
    subject = x509.Name(
        [
            x509.NameAttribute(NameOID.COMMON_NAME, f"retrofit-gateway {gateway_name}"[:64]),
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "retrofit-gateway"),
        ]
    )
    now = datetime.now(UTC)
    public = key.public_key()
    return (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(public)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(minutes=5))
        .not_valid_after(now + CERT_VALIDITY)
        .add_extension(x509.SubjectAlternativeName(names), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=True,
                key_encipherment=True,
                data_encipherment=True,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(
            x509.ExtendedKeyUsage(
                [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
            ),
            critical=False,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(public), critical=False)
        .sign(key, hashes.SHA256())
    )


def _write(path: Path, data: bytes, mode: int) -> None:
    """Write atomically, with ``mode`` from the first byte (a key is never world-readable)."""
    tmp = path.with_name(f".{path.name}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    try:
        os.write(fd, data)
        os.fchmod(fd, mode)
    finally:
        os.close(fd)
    os.replace(tmp, path)

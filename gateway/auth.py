"""Password hashes for the gateway's logins (OPC UA users now, the status page later).

A config never holds a password, only its hash, made by ``retrofit-gw passwd``::

    scrypt$16384$8$1$<salt, base64>$<key, base64>

scrypt's cost parameters travel with the hash, so hashes made today still verify after the
defaults are raised. Standard library only: the page and the CLI import this without any
protocol library.

The API is two functions and one error:

- ``hash_password(password) -> str`` makes a new hash (fresh random salt each time);
- ``verify_password(password, hashed) -> bool`` checks a password in constant time;
- ``PasswordHashError`` says why a stored hash is malformed (raised by both, and by
  ``parse_hash``, which a config check uses to report a bad hash before anything starts).

Verifying costs one scrypt run, by design: about 50 ms on a desktop core and several times
that on a Raspberry Pi. A caller on an event loop should run it in a thread, or cache and
throttle as the OPC UA sink does.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import secrets
import unicodedata
from dataclasses import dataclass
from typing import Final

from gateway.errors import GatewayError

__all__ = ["PasswordHash", "PasswordHashError", "hash_password", "parse_hash", "verify_password"]

SCHEME: Final = "scrypt"
#: Cost of new hashes: 16 MiB and ~50 ms per check on a desktop core. A Pi 3 has 1 GiB and a
#: login must not stall it for a second, which rules out OWASP's 2**17 (128 MiB).
N: Final = 2**14
R: Final = 8
P: Final = 1
SALT_BYTES: Final = 16
KEY_BYTES: Final = 32

# Bounds on what a stored hash may ask for: a hash is config, and a typo or a hostile file
# must not make one login allocate gigabytes or run for minutes.
_MAX_MEMORY: Final = 128 * 2**20
_MAX_P: Final = 16


class PasswordHashError(GatewayError, ValueError):
    """A stored password hash is not one this module can check; the text says what is wrong."""


@dataclass(frozen=True, slots=True)
class PasswordHash:
    """A parsed hash. ``str()`` gives the stored form back."""

    n: int
    r: int
    p: int
    salt: bytes
    key: bytes

    def __str__(self) -> str:
        return "$".join(
            (SCHEME, str(self.n), str(self.r), str(self.p), _b64(self.salt), _b64(self.key))
        )


def hash_password(password: str) -> str:
    """A new hash of ``password`` with a random salt. An empty password is refused."""
    if not password:
        raise ValueError("an empty password cannot be hashed")
    salt = secrets.token_bytes(SALT_BYTES)
    return str(PasswordHash(N, R, P, salt, _derive(password, N, R, P, salt, KEY_BYTES)))


def verify_password(password: str, hashed: str) -> bool:
    """True when ``password`` matches ``hashed``; raises PasswordHashError if it is malformed."""
    parsed = parse_hash(hashed)
    derived = _derive(password, parsed.n, parsed.r, parsed.p, parsed.salt, len(parsed.key))
    return hmac.compare_digest(derived, parsed.key)


def parse_hash(hashed: str) -> PasswordHash:
    """The parts of a stored hash; PasswordHashError names the first thing wrong with it.

    The message never repeats the value: a password pasted where its hash belongs must not
    end up in a log.
    """
    if not isinstance(hashed, str):
        raise PasswordHashError("a password hash must be text")
    parts = hashed.strip().split("$")
    if parts[0] != SCHEME:
        raise PasswordHashError(
            f"not a password hash: it must start with '{SCHEME}$' (make one with "
            f"`retrofit-gw passwd`; the config holds the hash, never the password)"
        )
    if len(parts) != 6:
        raise PasswordHashError(
            f"a {SCHEME} hash has 6 fields separated by '$' "
            f"(scheme, n, r, p, salt, key), this one has {len(parts)}"
        )
    n, r, p = (_positive(name, text) for name, text in zip("nrp", parts[1:4], strict=True))
    if n < 2 or n & (n - 1):
        raise PasswordHashError(f"scrypt n must be a power of 2 above 1, not {n}")
    if p > _MAX_P:
        raise PasswordHashError(f"scrypt p must be at most {_MAX_P}, not {p}")
    if 128 * n * r > _MAX_MEMORY:
        raise PasswordHashError(
            f"scrypt n={n}, r={r} needs {128 * n * r // 2**20} MiB per check; "
            f"at most {_MAX_MEMORY // 2**20} MiB is allowed"
        )
    salt = _unb64("salt", parts[4])
    key = _unb64("key", parts[5])
    if len(salt) < 8:
        raise PasswordHashError(f"the salt must be at least 8 bytes, not {len(salt)}")
    if not 16 <= len(key) <= 64:
        raise PasswordHashError(f"the key must be 16 to 64 bytes, not {len(key)}")
    return PasswordHash(n, r, p, salt, key)


def _derive(password: str, n: int, r: int, p: int, salt: bytes, length: int) -> bytes:
    # NFC: the same password typed on two keyboards may arrive composed or decomposed
    # ("ä" as one code point or as "a" plus a combining mark); RFC 8265 normalises to NFC too.
    secret = unicodedata.normalize("NFC", password).encode("utf-8")
    # OpenSSL wants room for 128 * r * (n + p) bytes plus its own bookkeeping.
    maxmem = 128 * r * (n + p) + 2**20
    return hashlib.scrypt(secret, salt=salt, n=n, r=r, p=p, maxmem=maxmem, dklen=length)


def _positive(name: str, text: str) -> int:
    if not text.isascii() or not text.isdigit() or len(text) > 10:
        raise PasswordHashError(f"scrypt {name} must be a whole number")
    value = int(text)
    if value < 1:
        raise PasswordHashError(f"scrypt {name} must be at least 1, not {value}")
    return value


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii").rstrip("=")


def _unb64(name: str, text: str) -> bytes:
    try:
        return base64.b64decode(text + "=" * (-len(text) % 4), validate=True)
    except (binascii.Error, ValueError):
        raise PasswordHashError(f"the {name} is not valid base64") from None

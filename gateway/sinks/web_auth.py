"""Who may use the status page: the password, bearer tokens, sessions and the login throttle.

No web framework here (``gateway/sinks/web.py`` is the only module that imports one); this is
the part of the page's security that can be reasoned about and tested without a server.

The rule, decided once per start from ``web.host`` and ``web.password_hash``:

- a password is configured: every page and API but ``/healthz`` needs a session (log in with
  the password) or a bearer token, on any host;
- no password, loopback host: reading is open, as for a technician at the box; changes need a
  bearer token, so without tokens they are unavailable;
- no password, any other host: the server binds 127.0.0.1 instead (see ``bind_host``). There
  is no default password, so there is nothing to log in with yet.

Sessions live in memory only: a restart logs everybody out, which is the safe direction.
Their ids are 256 random bits; the store keeps only their SHA-256, never the cookie itself.
Expiry runs on the monotonic clock, since a Raspberry Pi's wall clock jumps when NTP syncs.

Password and token checks cost one scrypt run each (tens of ms, more on a Pi): they are
blocking and the caller runs them off the event loop. A token that verified once is
remembered as an HMAC under a key that lives only in this process, so an API client polling
every second costs one HMAC and a constant-time compare per request.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import math
import secrets
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Final, Literal, Protocol

from gateway import auth

__all__ = [
    "FAILURES_ALLOWED",
    "FAILURE_WINDOW_S",
    "Credentials",
    "LoginThrottle",
    "Principal",
    "Session",
    "Sessions",
    "bind_host",
    "is_loopback",
]

#: Failed logins (password or bearer token) one client may make per window; the next is 429.
FAILURES_ALLOWED: Final = 5
FAILURE_WINDOW_S: Final = 300.0
#: Clients whose failures are remembered; beyond it the oldest are forgotten, so that a scan
#: from many addresses cannot grow memory without bound.
MAX_TRACKED_CLIENTS: Final = 4096
#: Live sessions; a new login beyond it ends the one closest to expiry.
MAX_SESSIONS: Final = 256
_ID_BYTES: Final = 32


class TokenEntry(Protocol):
    """One configured API token (``web.tokens`` in the config)."""

    @property
    def name(self) -> str: ...

    @property
    def token_hash(self) -> str: ...


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def bind_host(host: str, password_hash: str | None) -> str:
    """Where the server really listens: 127.0.0.1 when there is no password to protect a
    page reachable from elsewhere."""
    if password_hash is None and not is_loopback(host):
        return "127.0.0.1"
    return host


@dataclass(slots=True)
class Session:
    key: bytes
    csrf: str
    expires: float
    ended: bool = False


@dataclass(frozen=True, slots=True)
class Principal:
    """Who a request comes from: a logged-in browser, or an API client by its token's name."""

    kind: Literal["session", "token"]
    name: str
    session: Session | None = None


def _digest(value: str) -> bytes:
    return hashlib.sha256(value.encode("utf-8", "surrogatepass")).digest()


class Sessions:
    def __init__(
        self,
        lifetime_s: float,
        *,
        clock: Callable[[], float] = time.monotonic,
        max_sessions: int = MAX_SESSIONS,
    ) -> None:
        self.lifetime_s = lifetime_s
        self._clock = clock
        self._max = max_sessions
        self._by_key: dict[bytes, Session] = {}

    def create(self) -> tuple[str, Session]:
        """A new session: (the cookie value, the session)."""
        self._prune()
        while len(self._by_key) >= self._max:
            self.end(min(self._by_key.values(), key=lambda s: s.expires))
        sid = secrets.token_urlsafe(_ID_BYTES)
        session = Session(_digest(sid), secrets.token_urlsafe(_ID_BYTES), 0.0)
        session.expires = self._clock() + self.lifetime_s
        self._by_key[session.key] = session
        return sid, session

    def get(self, sid: str | None) -> Session | None:
        if not sid or len(sid) > 128:
            return None
        session = self._by_key.get(_digest(sid))
        if session is None or not self.alive(session):
            return None
        return session

    def alive(self, session: Session) -> bool:
        if session.ended:
            return False
        if self._clock() >= session.expires:
            self.end(session)
            return False
        return True

    def end(self, session: Session) -> None:
        session.ended = True
        self._by_key.pop(session.key, None)

    def __len__(self) -> int:
        self._prune()
        return len(self._by_key)

    def _prune(self) -> None:
        now = self._clock()
        for session in [s for s in self._by_key.values() if now >= s.expires]:
            self.end(session)


class LoginThrottle:
    """At most ``allowed`` failed logins per client in any ``window_s``; then 429 until the
    oldest of them ages out. A success forgets the client's failures."""

    def __init__(
        self,
        allowed: int = FAILURES_ALLOWED,
        window_s: float = FAILURE_WINDOW_S,
        *,
        clock: Callable[[], float] = time.monotonic,
        max_clients: int = MAX_TRACKED_CLIENTS,
    ) -> None:
        self.allowed = allowed
        self.window_s = window_s
        self._clock = clock
        self._max_clients = max_clients
        self._failures: OrderedDict[str, deque[float]] = OrderedDict()
        #: Totals for /metrics.
        self.failed_total = 0
        self.throttled_total = 0

    def retry_after(self, client: str) -> int | None:
        """Whole seconds until ``client`` may try again, or None when it may now. A refusal
        counts as throttled."""
        times = self._recent(client)
        if times is None or len(times) < self.allowed:
            return None
        self.throttled_total += 1
        return max(1, math.ceil(times[0] + self.window_s - self._clock()))

    def failed(self, client: str) -> None:
        self.failed_total += 1
        times = self._recent(client)
        if times is None:
            while len(self._failures) >= self._max_clients:
                self._failures.popitem(last=False)
            times = self._failures[client] = deque(maxlen=self.allowed)
        times.append(self._clock())
        self._failures.move_to_end(client)

    def succeeded(self, client: str) -> None:
        self._failures.pop(client, None)

    def _recent(self, client: str) -> deque[float] | None:
        times = self._failures.get(client)
        if times is None:
            return None
        horizon = self._clock() - self.window_s
        while times and times[0] <= horizon:
            times.popleft()
        if not times:
            del self._failures[client]
            return None
        return times


class Credentials:
    """The configured password hash and API tokens. Raises PasswordHashError on a malformed
    hash (the config check reports those first; this is for sections built in code)."""

    def __init__(self, password_hash: str | None, tokens: Sequence[TokenEntry]) -> None:
        self._password = str(auth.parse_hash(password_hash)) if password_hash else None
        self._tokens = [(t.name, str(auth.parse_hash(t.token_hash))) for t in tokens]
        self._key = secrets.token_bytes(32)
        self._verified: list[tuple[bytes, str]] = []
        # Checked instead when nothing is configured, so that a miss costs the same time.
        self._decoy = str(
            auth.PasswordHash(
                auth.N, auth.R, auth.P, secrets.token_bytes(16), secrets.token_bytes(32)
            )
        )

    @property
    def login_required(self) -> bool:
        return self._password is not None

    @property
    def has_tokens(self) -> bool:
        return bool(self._tokens)

    def check_password(self, password: str) -> bool:
        """Blocking: one scrypt run."""
        if not password:
            return False
        ok = auth.verify_password(password, self._password or self._decoy)
        return ok and self._password is not None

    def remembered_token(self, token: str) -> str | None:
        """The token's name if it verified before; cheap, constant time over the tokens."""
        tag = hmac.digest(self._key, token.encode("utf-8", "surrogatepass"), "sha256")
        found = None
        for known, name in self._verified:
            if hmac.compare_digest(known, tag):
                found = name
        return found

    def check_token(self, token: str) -> str | None:
        """Blocking: one scrypt run per configured token. Remembers a match."""
        if not token or not self._tokens:
            return None
        found = None
        for name, hashed in self._tokens:
            if auth.verify_password(token, hashed) and found is None:
                found = name
        if found is not None:
            tag = hmac.digest(self._key, token.encode("utf-8", "surrogatepass"), "sha256")
            # One entry per token at most: a scrypt hash matches one string only.
            self._verified = [v for v in self._verified if v[1] != found] + [(tag, found)]
        return found

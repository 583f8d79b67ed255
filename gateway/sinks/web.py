"""The local status page, JSON API, health check and Prometheus metrics.

FastAPI served by uvicorn inside the gateway's own process and event loop: the page reads the
runtime directly (``bus.latest``, ``statuses``, ``health``), so a request never waits for a
poll and the sink needs no copy of the data.

Endpoints
    ``GET /``              one server-rendered page for a technician, live via SSE
    ``GET /api/stream``    ``text/event-stream``: a full snapshot on connect, then once a
                           second only what changed (tags, devices) plus the small header data
    ``GET /api/status``    gateway info, uptime, device counts, tag quality counts, sink health
    ``GET /api/devices``   every device status
    ``GET /api/tags``      every tag (``?machine=`` filters; an unknown machine is a 404)
    ``GET /api/audit``     the latest writes to machines, newest first
    ``GET /api/certs``     OPC UA client certificates, trusted and rejected (OPC UA only)
    ``POST /api/certs/{id}/trust``  move a rejected client certificate to trusted
    ``GET /healthz``       200 ``{"status": "ok"}`` or 503, see :meth:`WebSink.health_problem`
    ``GET /metrics``       Prometheus text format, written by hand (no client library)
    ``GET /openapi.json``  FastAPI's schema. No /docs or /redoc: their UI loads from a CDN,
                           and this page loads nothing from elsewhere.
    ``GET|POST /login``, ``POST /logout``  the login form and its session

Signals belong to the gateway. ``uvicorn.Server.serve`` wraps itself in ``capture_signals()``,
which replaces the SIGINT/SIGTERM handlers (and re-raises caught signals on exit); our
``_Server`` overrides that context manager to do nothing. We also bind the listening sockets
ourselves and hand them to uvicorn: its own bind failure path calls ``sys.exit()``, which
inside a task would tear down the whole event loop instead of failing this sink's start.

Who may do what is decided in ``web_auth`` (see its docstring) and enforced by ``_Guard``,
the outermost ASGI layer, for every path: deny by default, with only ``/healthz``, ``/login``
and the static CSS/JS public. Unauthenticated, the page redirects to ``login`` and the API
answers 401. Every request but GET and HEAD must also come from this site (``Origin`` and
``Sec-Fetch-Site``) and, from a browser session, carry the session's CSRF token (form field
``csrf`` or header ``X-CSRF-Token``); bearer-token clients send no cookie, so they need none.
The login form has its own token in a short-lived cookie (double submit). Every response
carries the security headers of ``_SECURITY_HEADERS`` and, unless it says otherwise (the
static files), ``Cache-Control: no-store``.

The server speaks plain HTTP. The session cookie is HttpOnly and SameSite=Strict; it is
``Secure`` only when the request arrived over HTTPS as uvicorn sees it, i.e. through a TLS
reverse proxy on this box (connections from 127.0.0.1 may set ``X-Forwarded-For`` and
``X-Forwarded-Proto``, which also gives the login throttle the real client address). Such a
proxy must pass the ``Host`` header through, or the Origin check refuses its POSTs.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import html
import ipaddress
import json
import logging
import math
import secrets
import socket
import time
from collections import deque
from collections.abc import (
    AsyncGenerator,
    AsyncIterator,
    Callable,
    Iterable,
    Iterator,
    Mapping,
    Sequence,
)
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final, Literal, TypeVar
from urllib.parse import parse_qsl, urlsplit

import uvicorn
from fastapi import FastAPI, HTTPException, Query, Request
from fastapi.responses import (
    HTMLResponse,
    JSONResponse,
    PlainTextResponse,
    RedirectResponse,
    Response,
)
from pydantic import BaseModel, Field
from starlette.responses import StreamingResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from gateway import __version__
from gateway.auth import PasswordHashError
from gateway.bus import STALE_INTERVALS, Subscription
from gateway.config import WebSection
from gateway.errors import GatewayError
from gateway.model import Quality, Reading, Reason, TagKey, TagSpec
from gateway.sinks.base import RuntimeView
from gateway.sinks.web_auth import (
    Credentials,
    LoginThrottle,
    Principal,
    Session,
    Sessions,
    bind_host,
    is_loopback,
)
from gateway.status import DeviceState, DeviceStatus

if TYPE_CHECKING:
    from gateway.certs import CertificateInfo

__all__ = ["WebSink"]

log = logging.getLogger("gateway.sinks.web")

#: Seconds between two SSE events.
TICK_S = 1.0
#: /healthz: the shortest window in which some device must have finished a poll attempt.
MIN_STALL_S = 10.0
#: Concurrent SSE streams; each costs a little CPU every second, a phone per machine is fine.
MAX_STREAMS = 32
#: Past this many tags the machine sections start collapsed: a 10k-row page is unreadable.
COLLAPSE_ABOVE_TAGS = 400
#: Bounded shutdown: SSE streams end at once, plain requests are short.
SHUTDOWN_S = 5.0
#: Request bodies: only small forms and empty POSTs are expected.
MAX_BODY_BYTES = 16 * 1024
#: A client that sends its body this slowly is dropped.
BODY_TIMEOUT_S = 10.0
#: Write audit entries on the page (the API gives all that are kept).
WRITES_SHOWN = 20
#: Certificates listed per state on the page (the CLI lists all).
CERTS_SHOWN = 20
#: The login form's own CSRF cookie lives this long: long enough to type a password.
LOGIN_FORM_S = 3600

_STATIC = Path(__file__).with_name("web_static")
_T = TypeVar("_T")
_QUALITY_NAMES = ("good", "uncertain", "bad")


# --- response models (they make /openapi.json meaningful) -------------------------------------


class GatewayInfo(BaseModel):
    name: str
    site: str
    area: str
    line: str
    version: str
    started_at: float = Field(description="Epoch seconds.")
    uptime_s: float


class DeviceCounts(BaseModel):
    total: int
    online: int
    offline: int
    starting: int
    stopped: int


class TagCounts(BaseModel):
    total: int
    good: int
    uncertain: int
    bad: int


class StatusOut(BaseModel):
    gateway: GatewayInfo
    devices: DeviceCounts
    tags: TagCounts
    healthy: bool = Field(description="What /healthz answers (true = 200).")
    problem: str | None = Field(description="Why /healthz answers 503, if it does.")
    sinks: dict[str, dict[str, Any]] = Field(
        description="Each sink's own health entry, e.g. mqtt: connected/queued/published."
    )


class DeviceOut(BaseModel):
    name: str
    machine: str
    driver: str
    endpoint: str
    state: Literal["starting", "online", "offline", "stopped"]
    polls: int
    good_polls: int
    errors: dict[str, int] = Field(description="Error counts by kind.")
    last_error: str
    last_error_ts: float | None
    last_success_ts: float | None
    last_duration: float | None = Field(description="Seconds the last poll took.")
    max_duration: float
    overruns: int = Field(description="Poll slots skipped because a poll ran late.")
    connects: int
    consecutive_failures: int
    breaker: Literal["closed", "open", "half_open"] = Field(
        description="closed: polled; open: skipped after repeated failures until the next "
        "probe; half_open: one probe under way."
    )
    breaker_trips: int = Field(description="Times the breaker opened.")
    skipped_polls: int = Field(description="Poll slots skipped while the breaker was open.")
    probes: int = Field(description="Probes made while the breaker was half open.")
    next_probe_ts: float | None = Field(description="Epoch seconds of the next probe (open).")
    details: dict[str, Any] = Field(
        description="What the driver reports on its line: serial settings, the USB adapter's "
        "latency timer, bus counters; empty for drivers that report nothing."
    )


class TagOut(BaseModel):
    key: str = Field(description="<machine>/<name>")
    machine: str
    device: str
    name: str
    value: bool | int | float | str | None
    unit: str | None
    quality: Literal["good", "uncertain", "bad"]
    reason: Reason
    detail: str
    source_ts: float = Field(description="Epoch seconds the value was read from the device.")
    age_s: float


class HealthOut(BaseModel):
    status: Literal["ok", "unavailable"]
    problem: str | None = None


class CertOut(BaseModel):
    id: str = Field(description="The first 16 hex digits of the SHA-256 thumbprint.")
    sha256: str
    state: Literal["trusted", "rejected", "presented"]
    subject: str
    common_name: str
    application_uri: str
    not_before: datetime
    not_after: datetime
    first_seen: datetime | None = Field(description="When the gateway first saw it.")
    problem: str = Field(description="Empty while valid, else why not (expired ...).")


def _cert_out(c: CertificateInfo) -> CertOut:
    return CertOut(
        id=c.id,
        sha256=c.sha256,
        state=c.state,
        subject=c.subject,
        common_name=c.common_name,
        application_uri=c.application_uri,
        not_before=c.not_before,
        not_after=c.not_after,
        first_seen=c.first_seen,
        problem=c.time_problem(),
    )


# --- formatting shared by the page and the stream ---------------------------------------------


def _fmt_value(value: object) -> str:
    if value is None:
        return "—"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return f"{value:.6g}" if math.isfinite(value) else str(value)
    return str(value)


def _fmt_age(seconds: float) -> str:
    """Kept in step with ``fmtAge`` in page.js, which re-renders ages every second."""
    s = max(0, int(seconds))
    if s < 60:
        return f"{s} s ago"
    if s < 3600:
        return f"{s // 60} min ago"
    if s < 86400:
        return f"{s // 3600} h {s % 3600 // 60} min ago"
    return f"{s // 86400} d {s % 86400 // 3600} h ago"


#: Clock badge (class, text) by synchronisation; page.js has the same table.
_SYNC_BADGE: dict[bool | None, tuple[str, str]] = {
    True: ("ok", "SYNCED"),
    False: ("bad", "NOT SYNCED"),
    None: ("idle", "UNKNOWN"),
}


def _fmt_secs(value: object) -> str:
    """An age in seconds for a counter line; "—" when there is none."""
    if not isinstance(value, int | float) or isinstance(value, bool):
        return "—"
    return f"{value:.0f} s" if value < 120 else f"{value / 60:.0f} min"


def _fmt_uptime(seconds: float) -> str:
    return _fmt_age(seconds).removesuffix(" ago")


def _fmt_duration(seconds: float | None) -> str:
    if seconds is None:
        return "—"
    ms = seconds * 1000
    return f"{ms:.1f} ms" if ms < 10 else f"{ms:.0f} ms"


def _fmt_errors(errors: Mapping[str, int]) -> str:
    return " · ".join(f"{k} {v}" for k, v in sorted(errors.items())) or "none"


def _dumps(obj: object) -> str:
    return json.dumps(obj, separators=(",", ":"), ensure_ascii=False, allow_nan=False)


def _jsonable(obj: object, depth: int = 0) -> object:
    """Health entries are written by other sinks: keep them JSON-safe whatever they hold."""
    if obj is None or isinstance(obj, bool | int | str):
        return obj
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if depth < 4 and isinstance(obj, Mapping):
        return {str(k): _jsonable(v, depth + 1) for k, v in obj.items()}
    if depth < 4 and isinstance(obj, list | tuple | set | frozenset):
        return [_jsonable(v, depth + 1) for v in obj]
    return str(obj)


#: What the stream sends per tag: [value text, quality 0/1/2, reason, detail, source_ts].
_Row = tuple[str, int, str, str, float | None]


def _row(reading: Reading, stale: bool) -> _Row:
    ts = None if reading.value is None else reading.source_ts
    if stale:
        # The age column shows how stale; a detail that ticks every second would make the
        # tag "changed" in every event.
        return (_fmt_value(reading.value), int(Quality.UNCERTAIN), Reason.STALE.value, "", ts)
    return (
        _fmt_value(reading.value),
        int(reading.quality),
        reading.reason.value,
        reading.detail,
        ts,
    )


def _device_row(st: DeviceStatus) -> dict[str, object]:
    return {
        "state": st.state.value,
        "ls": st.last_success_ts,
        "polls": st.polls,
        "good": st.good_polls,
        "errors": _fmt_errors(st.errors),
        "le": st.last_error,
        "lets": st.last_error_ts,
        "dur": _fmt_duration(st.last_duration),
        "over": st.overruns,
        "brk": st.breaker.value,
        "np": st.next_probe_ts,
        "trips": st.breaker_trips,
        "skip": st.skipped_polls,
        "line": _fmt_line(st.details()),
    }


def _fmt_breaker(state: str, trips: int, next_probe: float | None, now: float) -> str:
    """The breaker as the page shows it; page.js has the same rule for live updates."""
    text = {"closed": "closed", "open": "OPEN", "half_open": "probing"}[state]
    if state == "open" and next_probe is not None:
        text += f" · probe in {max(0, math.ceil(next_probe - now))} s"
    if not trips:
        return text
    return f"{text} ({trips} trip{'' if trips == 1 else 's'})"


def _fmt_line(details: Mapping[str, object]) -> list[object]:
    """[line text, latency note or "", latency ok] for the device card's Line row."""
    if not details:
        return []
    note = details.get("latency_timer_note")
    return [
        str(details.get("line", "")),
        "" if note is None else f"latency timer {note}",
        details.get("latency_timer_ok", True) is not False,
    ]


_REASON_JSON = {r: _dumps(r.value) for r in Reason}


def _json_value(v: object) -> str:
    """A tag value as JSON; JSON has no NaN or infinity, so those become null."""
    if v is None:
        return "null"
    if v is True:
        return "true"
    if v is False:
        return "false"
    if type(v) is int:
        return str(v)
    if type(v) is float:
        return repr(v) if math.isfinite(v) else "null"
    return _dumps(v)


def _api_prefix(spec: TagSpec) -> str:
    """The constant part of a tag's ``TagOut`` JSON, up to ``"value":``."""
    fields = ("key", "machine", "device", "name", "unit")
    inner = ",".join(f'"{f}":{_dumps(getattr(spec, f))}' for f in fields)
    return "{" + inner + ',"value":'


@dataclass(frozen=True, slots=True)
class _Tag:
    spec: TagSpec
    stale_after: float


# --- Prometheus text exposition ---------------------------------------------------------------


def _label(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _num(value: float | bool) -> str:
    if isinstance(value, bool):
        return "1" if value else "0"
    if isinstance(value, int):
        return str(value)
    if math.isnan(value):
        return "NaN"
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    return repr(value)


class _Metrics:
    def __init__(self) -> None:
        self.lines: list[str] = []

    def family(
        self, name: str, kind: str, help_: str, samples: Sequence[tuple[str, float | bool]]
    ) -> None:
        """``samples``: (rendered labels without braces, value); an empty family is omitted."""
        if not samples:
            return
        self.lines.append(f"# HELP {name} {help_}")
        self.lines.append(f"# TYPE {name} {kind}")
        for labels, value in samples:
            sel = f"{{{labels}}}" if labels else ""
            self.lines.append(f"{name}{sel} {_num(value)}")

    def text(self) -> str:
        return "\n".join(self.lines) + "\n"


def _number(v: object) -> float | bool | None:
    if isinstance(v, bool | int | float):
        return v
    return None


# --- the SSE hub ------------------------------------------------------------------------------


class _Table:
    """Per-tag constants and the JSON of each tag's last row, in ``runtime.tags`` order.

    With 10,000 tags the stream's JSON is built by hand from cached pieces: between two
    polls a tag's value, quality and reason rarely change, only its timestamp does.
    """

    def __init__(self, tags: Sequence[_Tag]) -> None:
        self.keys = [t.spec.key for t in tags]
        self.stale_after = [t.stale_after for t in tags]
        self.key_json = [_dumps(k) + ":" for k in self.keys]
        self._sig: list[tuple[object, ...] | None] = [None] * len(tags)
        self._body = [""] * len(tags)

    def row_json(self, i: int, r: Reading, stale: bool) -> str:
        """``[text, quality, reason, detail, source_ts]`` as JSON, see ``_row``."""
        sig = (r.value, r.quality, r.reason, r.detail, stale)
        if sig != self._sig[i]:
            self._sig[i] = sig
            self._body[i] = _row_head_json(r, stale)
        return self._body[i] + ("null]" if r.value is None else f"{r.source_ts:.3f}]")


def _row_head_json(r: Reading, stale: bool) -> str:
    """The JSON of ``_row`` without its timestamp and closing bracket, at a fraction of the
    cost of ``json.dumps``: only strings from the device or config need escaping."""
    text = _fmt_value(r.value)
    text_json = _dumps(text) if isinstance(r.value, str) else f'"{text}"'
    if stale:
        return f'[{text_json},1,"stale","",'
    detail = _dumps(r.detail) if r.detail else '""'
    return f"[{text_json},{int(r.quality)},{_REASON_JSON[r.reason]},{detail},"


class _Hub:
    """Computes one diff a second, serialises it once, and every stream sends the same bytes.

    Only works while someone is watching. A stream that falls behind the short ring of recent
    events gets a fresh full snapshot instead of a backlog.
    """

    RING = 8

    def __init__(self, sink: WebSink) -> None:
        self.sink = sink
        self.seq = 0
        self.streams = 0
        self.closed = False
        self._ring: deque[tuple[int, bytes]] = deque(maxlen=self.RING)
        n = len(sink.tags)
        self._seen: list[Reading | None] = [None] * n
        self._seen_stale = [False] * n
        self._seen_devices: dict[str, dict[str, object]] = {}
        self._event = asyncio.Event()

    def close(self) -> None:
        self.closed = True
        self._wake()

    def _wake(self) -> None:
        event, self._event = self._event, asyncio.Event()
        event.set()

    def tick(self, now: float) -> None:
        if not self.streams:
            return
        table = self.sink.table
        get = self.sink.runtime.bus.latest.get
        seen, seen_stale = self._seen, self._seen_stale
        counts = [0, 0, 0]
        parts: list[str] = []
        good = Quality.GOOD
        for i, (key, stale_after) in enumerate(zip(table.keys, table.stale_after, strict=True)):
            r = get(key)
            if r is None:
                continue
            stale = r.quality is good and now - r.source_ts > stale_after
            counts[1 if stale else r.quality] += 1
            # Readings are immutable and replaced on every publish: identity is change.
            if r is seen[i] and stale is seen_stale[i]:
                continue
            seen[i] = r
            seen_stale[i] = stale
            parts.append(table.key_json[i] + table.row_json(i, r, stale))
        devices: dict[str, dict[str, object]] = {}
        for name, st in self.sink.runtime.statuses.items():
            d = _device_row(st)
            if self._seen_devices.get(name) != d:
                self._seen_devices[name] = d
                devices[name] = d
        msg = self.sink.header(now)
        msg["q"] = counts
        msg["d"] = devices
        self.seq += 1
        self._ring.append((self.seq, _event_bytes(_with_rows(msg, parts), self.seq)))
        self._wake()

    async def stream(self) -> AsyncGenerator[bytes, None]:
        """The body of one /api/stream response (an async generator)."""
        self.streams += 1
        try:
            seq = self.seq
            yield b"retry: 2000\n\n" + _event_bytes(self.sink.full(time.time()), seq)
            while not self.closed:
                await self._event.wait()
                if self.closed:
                    break
                ring = list(self._ring)
                if not ring or ring[0][0] > seq + 1:
                    seq = self.seq
                    yield _event_bytes(self.sink.full(time.time()), seq)
                    continue
                for s, payload in ring:
                    if s > seq:
                        yield payload
                seq = ring[-1][0]
        finally:
            self.streams -= 1


def _with_rows(msg: Mapping[str, object], rows: Sequence[str]) -> str:
    """``msg`` as JSON with ``"g": {key: row, ...}`` spliced in from pre-built pieces."""
    return _dumps(msg)[:-1] + ',"g":{' + ",".join(rows) + "}}"


def _event_bytes(data: str, seq: int) -> bytes:
    return f"id: {seq}\ndata: {data}\n\n".encode()


# --- uvicorn without its signal handlers ------------------------------------------------------


class _Server(uvicorn.Server):
    def __init__(self, config: uvicorn.Config) -> None:
        super().__init__(config)
        self.ready = asyncio.Event()

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await super().startup(sockets=sockets)
        self.ready.set()

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        # The gateway owns SIGINT/SIGTERM and stops us through close(); uvicorn's version
        # would swap the handlers for its own and re-raise the signal after shutdown.
        yield


_is_loopback = is_loopback


# --- the guard: login, CSRF and security headers in front of every path ----------------------

_CSP: Final = (
    "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; "
    "img-src 'self'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'"
)
_SECURITY_HEADERS: Final = (
    (b"content-security-policy", _CSP.encode()),
    (b"x-content-type-options", b"nosniff"),
    (b"x-frame-options", b"DENY"),
    (b"referrer-policy", b"no-referrer"),
    (b"cross-origin-opener-policy", b"same-origin"),
    (b"cross-origin-resource-policy", b"same-origin"),
)
_SAFE_METHODS: Final = frozenset({"GET", "HEAD"})
_PUBLIC_PATHS: Final = frozenset({"/healthz", "/login", "/favicon.ico"})
_PRINCIPAL_KEY: Final = "retrofit_gw.principal"
_FORM_KEY: Final = "retrofit_gw.form"
_CHANGES_NEED_LOGIN: Final = (
    "changes need a login and no password is set: make a hash with `retrofit-gw passwd`, "
    "put it in the config as web.password_hash and restart (or use a web.tokens bearer token)"
)


def _secured(send: Send) -> Send:
    async def send_secured(message: Message) -> None:
        if message["type"] == "http.response.start":
            headers = list(message.get("headers", []))
            present = {name.lower() for name, _ in headers}
            headers += [h for h in _SECURITY_HEADERS if h[0] not in present]
            if b"cache-control" not in present:
                headers.append((b"cache-control", b"no-store"))
            message = {**message, "headers": headers}
        await send(message)

    return send_secured


def _principal(request: Request) -> Principal | None:
    found = request.scope.get(_PRINCIPAL_KEY)
    return found if isinstance(found, Principal) else None


def _form(request: Request) -> dict[str, str]:
    found = request.scope.get(_FORM_KEY)
    return found if isinstance(found, dict) else {}


def _client(request: Request) -> str:
    return request.client.host if request.client is not None else "unknown"


def _cross_site(request: Request) -> bool:
    """True for a request another site made the browser send.

    Sec-Fetch-Site decides where the browser sends it (secure contexts, which include
    127.0.0.1 but not plain HTTP on a LAN address). Otherwise Origin: our own
    ``Referrer-Policy: no-referrer`` makes browsers send ``Origin: null`` with our own form
    posts, so null proves nothing either way, like no Origin at all (curl); the CSRF token
    decides then.
    """
    site = request.headers.get("sec-fetch-site")
    if site is not None:
        return site not in ("same-origin", "none")
    origin = request.headers.get("origin")
    if origin is None or origin == "null":
        return False
    host = request.headers.get("host", "")
    return urlsplit(origin).netloc.lower() != host.lower()


def _bearer(request: Request) -> str | None:
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() != "bearer":
        return None
    return token.strip()


def _unauthorized(detail: str) -> JSONResponse:
    return JSONResponse(
        {"detail": detail},
        status_code=401,
        headers={"WWW-Authenticate": 'Bearer realm="retrofit-gateway"'},
    )


def _too_many(retry_after: int) -> JSONResponse:
    return JSONResponse(
        {"detail": f"too many failed logins from this address; retry in {retry_after} s"},
        status_code=429,
        headers={"Retry-After": str(retry_after)},
    )


async def _read_body(receive: Receive) -> bytes | None:
    """The whole request body, or None when it is larger than MAX_BODY_BYTES."""
    body = bytearray()
    async with asyncio.timeout(BODY_TIMEOUT_S):
        while True:
            message = await receive()
            if message["type"] != "http.request":
                break
            body += message.get("body", b"")
            if len(body) > MAX_BODY_BYTES:
                return None
            if not message.get("more_body", False):
                break
    return bytes(body)


def _replay(body: bytes, receive: Receive) -> Receive:
    """``receive`` for the app behind the guard, which already read the body."""
    pending = [{"type": "http.request", "body": body, "more_body": False}]

    async def replayed() -> Message:
        if pending:
            return pending.pop()
        return await receive()

    return replayed


class _Guard:
    """The outermost ASGI layer: see the module docstring. Deny by default, so that a route
    added later is behind the login without anybody remembering to put it there."""

    def __init__(self, app: ASGIApp, sink: WebSink) -> None:
        self.app = app
        self.sink = sink

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        send = _secured(send)
        refusal, receive = await self._check(scope, receive)
        if refusal is not None:
            await refusal(scope, receive, send)
            return
        await self.app(scope, receive, send)

    async def _check(self, scope: Scope, receive: Receive) -> tuple[Response | None, Receive]:
        sink = self.sink
        request = Request(scope)
        path = request.url.path
        method = request.method
        public = path in _PUBLIC_PATHS or path.startswith("/static/")
        principal = sink.session_principal(request)
        if principal is None and not public:
            token = _bearer(request)
            if token is not None:
                found = await sink.token_principal(token, _client(request))
                if isinstance(found, Response):
                    return found, receive
                principal = found
        if principal is None and not public and sink.credentials.login_required:
            if method in _SAFE_METHODS and path == "/":
                return RedirectResponse("login", status_code=303), receive
            if path == "/logout":
                return RedirectResponse("login", status_code=303), receive
            return _unauthorized(
                "login required: log in at /login, or send Authorization: Bearer <token>"
            ), receive
        scope[_PRINCIPAL_KEY] = principal
        if method in _SAFE_METHODS:
            return None, receive
        if _cross_site(request):
            return JSONResponse({"detail": "cross-site request refused"}, 403), receive
        if principal is None and not public:
            return JSONResponse({"detail": _CHANGES_NEED_LOGIN}, 403), receive
        try:
            body = await _read_body(receive)
        except TimeoutError:
            return JSONResponse({"detail": "request body too slow"}, 408), receive
        if body is None:
            return JSONResponse({"detail": "request body too large"}, 413), receive
        form: dict[str, str] = {}
        ctype = request.headers.get("content-type", "")
        if ctype.split(";")[0].strip().lower() == "application/x-www-form-urlencoded":
            try:
                form = dict(parse_qsl(body.decode("utf-8", "replace"), max_num_fields=20))
            except ValueError:
                return JSONResponse({"detail": "too many form fields"}, 400), receive
        scope[_FORM_KEY] = form
        if principal is not None and principal.session is not None and path != "/login":
            sent = request.headers.get("x-csrf-token") or form.get("csrf", "")
            if not hmac.compare_digest(sent.encode(), principal.session.csrf.encode()):
                return JSONResponse({"detail": "CSRF token missing or wrong"}, 403), receive
        return None, _replay(body, receive)


async def _bind(host: str, port: int) -> list[socket.socket]:
    """Listening sockets for host:port, as asyncio would bind them; OSError if any fails."""
    try:
        ipaddress.ip_address(host)
        infos = socket.getaddrinfo(
            host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE | socket.AI_NUMERICHOST
        )
    except ValueError:
        # A name: resolve off the loop, a dead DNS server must not freeze the gateway.
        infos = await asyncio.get_running_loop().getaddrinfo(
            host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )
    socks: list[socket.socket] = []
    try:
        for family, type_, proto, _, addr in dict.fromkeys(infos):
            sock = socket.socket(family, type_, proto)
            socks.append(sock)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            sock.bind(addr)
            sock.listen(128)
            sock.setblocking(False)
    except BaseException:
        for sock in socks:
            sock.close()
        raise
    return socks


# --- the sink ---------------------------------------------------------------------------------


class WebSink:
    """The status page sink. See the module docstring for the endpoints."""

    name = "web"

    def __init__(self, runtime: RuntimeView, section: WebSection) -> None:
        self.runtime = runtime
        self.section = section
        self.tags: list[_Tag] = []
        self.table = _Table([])
        self._api_prefix: list[str] = []
        self.stall_window = MIN_STALL_S
        self.stopping = False
        self.port = section.port
        self._server: _Server | None = None
        self._task: asyncio.Task[None] | None = None
        self._ticker: asyncio.Task[None] | None = None
        self._hub = _Hub(self)
        self._static: dict[str, tuple[bytes, str]] = {}
        self._index_by_machine: dict[str, list[int]] = {}
        try:
            self.credentials = Credentials(section.password_hash, section.tokens)
        except PasswordHashError as exc:
            raise GatewayError(f"web: {exc}") from None
        self.sessions = Sessions(section.session_hours * 3600)
        self.throttle = LoginThrottle()
        #: Where the server listens: web.host, or 127.0.0.1 without a password.
        self.host = bind_host(section.host, section.password_hash)
        #: Password and token checks (scrypt) run here, one at a time: off the event loop, and
        #: a flood of logins cannot take more than one core.
        self._auth_pool: ThreadPoolExecutor | None = None
        self.app = self._build_app()
        self.asgi = _Guard(self.app, self)

    # -- lifecycle -----------------------------------------------------------------------

    async def start(self) -> None:
        if self._task is not None:
            return
        host, port = self.host, self.section.port
        self._prepare()
        try:
            socks = await _bind(host, port)
        except OSError as exc:
            reason = exc.strerror or str(exc)
            raise GatewayError(f"web: cannot listen on {host}:{port}: {reason}") from exc
        self.port = int(socks[0].getsockname()[1])
        config = uvicorn.Config(
            self.asgi,
            host=host,
            port=self.port,
            # Said explicitly rather than left to FORWARDED_ALLOW_IPS: only a reverse proxy on
            # this box may tell us the client's address and scheme.
            proxy_headers=True,
            forwarded_allow_ips="127.0.0.1",
            http="h11",
            ws="none",
            lifespan="off",
            # None: uvicorn must not dictConfig() the process's logging, which is ours.
            log_config=None,
            log_level="warning",
            access_log=False,
            server_header=False,
            timeout_graceful_shutdown=int(SHUTDOWN_S),
        )
        server = _Server(config)
        self._server = server
        self._hub = _Hub(self)
        self.stopping = False
        self._task = asyncio.create_task(self._serve(server, socks), name="web[uvicorn]")
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(10):
                await server.ready.wait()
        if not server.started:
            reason = "the server did not start in time"
            if self._task.done() and not self._task.cancelled():
                failure = self._task.exception()
                reason = str(failure) if failure else "the server stopped during start-up"
            for sock in socks:
                sock.close()
            await self.close()
            raise GatewayError(f"web: cannot listen on {host}:{port}: {reason}")
        self._ticker = asyncio.create_task(self._tick_forever(), name="web[sse]")
        self._auth_pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="web-auth")
        url_host = f"[{host}]" if ":" in host else host
        url = f"http://{url_host}:{self.port}/"
        self._set_health(url)
        if host != self.section.host:
            # Every start, not once: the log is where a technician looks when the page is
            # unreachable from the network.
            log.warning(
                "web.host is %s but no web.password_hash is set, so the status page listens "
                "on %s only (there is no default password). To reach it from the network "
                "with a login, make a password hash with `retrofit-gw passwd`, put it in the "
                "config as web.password_hash and restart",
                self.section.host,
                url,
            )
        elif not self.credentials.login_required:
            log.info(
                "status page on %s, without login (loopback only; web.password_hash from "
                "`retrofit-gw passwd` adds one)",
                url,
            )
        elif _is_loopback(host):
            log.info("status page on %s (login required)", url)
        else:
            log.info(
                "status page on %s (login required). It speaks plain HTTP: put a TLS reverse "
                "proxy in front unless the network is trusted",
                url,
            )

    @staticmethod
    async def _serve(server: _Server, socks: list[socket.socket]) -> None:
        try:
            await server.serve(sockets=socks)
        except SystemExit as exc:
            # uvicorn's answer to a start-up failure; in a task it would stop the event loop.
            raise GatewayError(f"uvicorn exited with {exc.code}") from None
        finally:
            server.ready.set()  # also when it never started: start() stops waiting

    async def run(self, sub: Subscription) -> None:
        # The page reads bus.latest directly; the batches themselves are not needed.
        async for _ in sub:
            pass
        # The bus closes only once every driver has stopped: the gateway is shutting down.
        self.stopping = True

    async def close(self) -> None:
        self.stopping = True
        self._hub.close()
        pool, self._auth_pool = self._auth_pool, None
        if pool is not None:
            # At most one scrypt run is under way; queued checks are dropped.
            pool.shutdown(wait=True, cancel_futures=True)
        ticker, self._ticker = self._ticker, None
        if ticker is not None:
            ticker.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await ticker
        server, task = self._server, self._task
        self._server = self._task = None
        if server is not None:
            server.should_exit = True
        if task is not None:
            try:
                async with asyncio.timeout(SHUTDOWN_S + 2):
                    await asyncio.shield(task)
            except TimeoutError:
                log.warning("web server did not stop in time; cancelling it")
                task.cancel()
            except Exception as exc:
                # start() reports why it failed; close() itself must not fail.
                log.debug("web server ended with %r", exc)
            with contextlib.suppress(BaseException):
                await task
        if self.runtime.health.get(self.name, {}).get("listening"):
            self.runtime.health[self.name] = {"listening": False, "url": None, "streams": 0}

    def _set_health(self, url: str | None) -> None:
        self.runtime.health[self.name] = {
            "listening": url is not None,
            "url": url,
            "streams": self._hub.streams,
            "login": "required" if self.credentials.login_required else "none (loopback)",
        }

    # -- who is asking -----------------------------------------------------------------------

    @property
    def session_cookie(self) -> str:
        # Cookies are per host, not per port: two gateways on one box keep separate logins.
        return f"gw_session_{self.port}"

    @property
    def login_cookie(self) -> str:
        return f"gw_login_{self.port}"

    def session_principal(self, request: Request) -> Principal | None:
        session = self.sessions.get(request.cookies.get(self.session_cookie))
        return None if session is None else Principal("session", "web login", session)

    async def token_principal(self, token: str, client: str) -> Principal | Response:
        """The API client a bearer token belongs to; else a 401 or 429 to answer with."""
        name = self.credentials.remembered_token(token)
        if name is None:
            wait = self.throttle.retry_after(client)
            if wait is not None:
                return _too_many(wait)
            name = await self._blocking(self.credentials.check_token, token)
            if name is None:
                self.throttle.failed(client)
                log.warning("web: refused an unknown bearer token from %s", client)
                return _unauthorized("unknown bearer token")
            self.throttle.succeeded(client)
        return Principal("token", name)

    async def _blocking(self, fn: Callable[[str], _T], arg: str) -> _T:
        pool = self._auth_pool
        if pool is None:
            raise HTTPException(503, "shutting down")
        return await asyncio.get_running_loop().run_in_executor(pool, fn, arg)

    async def _session_stream(self, session: Session) -> AsyncIterator[bytes]:
        """The live stream for one login, ending within a tick of its logout or expiry."""
        async with contextlib.aclosing(self._hub.stream()) as events:
            async for chunk in events:
                if not self.sessions.alive(session):
                    return
                yield chunk

    async def _tick_forever(self) -> None:
        loop = asyncio.get_running_loop()
        next_at = loop.time()
        while True:
            next_at += TICK_S
            await asyncio.sleep(max(0.0, next_at - loop.time()))
            if loop.time() - next_at > TICK_S:
                next_at = loop.time()  # after a stall, resume the rhythm rather than burst
            self._hub.tick(time.time())
            entry = self.runtime.health.get(self.name)
            if entry is not None:
                entry["streams"] = self._hub.streams

    def _prepare(self) -> None:
        """Everything per tag that does not change, computed once."""
        self.tags = [_Tag(s, STALE_INTERVALS * s.interval) for s in self.runtime.tags]
        self.table = _Table(self.tags)
        self._api_prefix = [_api_prefix(t.spec) for t in self.tags]
        largest = max((t.spec.interval for t in self.tags), default=1.0)
        self.stall_window = max(MIN_STALL_S, 3 * largest)
        self._index_by_machine = {}
        for i, tag in enumerate(self.tags):
            self._index_by_machine.setdefault(tag.spec.machine, []).append(i)
        for name, ctype in (("page.css", "text/css"), ("page.js", "text/javascript")):
            body = (_STATIC / name).read_bytes()
            self._static[name] = (body, f"{ctype}; charset=utf-8")

    # -- health ------------------------------------------------------------------------------

    def health_problem(self, now: float) -> str | None:
        """Why /healthz answers 503, or None when the runtime is fine.

        Broken means the gateway is shutting down, or the polling machinery stopped turning:
        no device has finished a poll attempt (success *or* failure) recently. A dead device
        still fails its attempts on schedule, so it is not a broken runtime. "Recently" is
        ``max(10 s, 3 x the largest tag interval)`` after the device's last attempt (or the
        gateway start, before its first), plus ``breaker.open_max`` for a device that is
        offline, because its open breaker may wait that long between two probes.
        """
        if self.stopping:
            return "the gateway is shutting down"
        statuses = list(self.runtime.statuses.values())
        if not statuses:
            return None
        if all(s.state is DeviceState.STOPPED for s in statuses):
            return "the gateway is shutting down"
        window = self.stall_window
        started = self.runtime.started_at
        backoff_cap = self.runtime.config.breaker.open_max
        for st in statuses:
            last = max(st.last_success_ts or started, st.last_error_ts or started)
            allowed = window + (backoff_cap if st.state is DeviceState.OFFLINE else 0.0)
            if now - last <= allowed:
                return None
        return f"no device has finished a poll attempt in the last {window:.0f} s"

    # -- data shared by the page, the stream and the API -------------------------------------

    def _device_counts(self) -> DeviceCounts:
        counts = dict.fromkeys(DeviceState, 0)
        for st in self.runtime.statuses.values():
            counts[st.state] += 1
        return DeviceCounts(
            total=sum(counts.values()),
            online=counts[DeviceState.ONLINE],
            offline=counts[DeviceState.OFFLINE],
            starting=counts[DeviceState.STARTING],
            stopped=counts[DeviceState.STOPPED],
        )

    def _health(self) -> dict[str, dict[str, Any]]:
        out: dict[str, dict[str, Any]] = {}
        for name, entry in list(self.runtime.health.items()):
            safe = _jsonable(entry)
            out[str(name)] = safe if isinstance(safe, dict) else {"value": safe}
        return out

    def header(self, now: float) -> dict[str, object]:
        """The part of every event that is cheap to send in full."""
        devices = self._device_counts()
        return {
            "t": now,
            "up": now - self.runtime.started_at,
            "s": {"on": devices.online, "n": devices.total},
            "h": self._health(),
            "ok": self.health_problem(now) is None,
        }

    def full(self, now: float) -> str:
        """Everything the page shows, as the JSON of one stream event."""
        table = self.table
        latest = self.runtime.bus.latest
        rows: list[str] = []
        counts = [0, 0, 0]
        for i, key in enumerate(table.keys):
            r = latest.get(key)
            if r is None:
                continue
            stale = r.quality is Quality.GOOD and now - r.source_ts > table.stale_after[i]
            counts[1 if stale else r.quality] += 1
            rows.append(table.key_json[i] + table.row_json(i, r, stale))
        msg = self.header(now)
        msg["q"] = counts
        msg["d"] = {n: _device_row(st) for n, st in self.runtime.statuses.items()}
        return _with_rows(msg, rows)

    def _tag_counts(self, snapshot: Mapping[TagKey, Reading]) -> TagCounts:
        counts = [0, 0, 0]
        for r in snapshot.values():
            counts[r.quality] += 1
        return TagCounts(total=len(snapshot), good=counts[0], uncertain=counts[1], bad=counts[2])

    def tags_json(self, indices: Iterable[int], now: float) -> str:
        """A JSON array of ``TagOut`` for the tags at ``indices`` (see ``/api/tags``)."""
        snap = self.runtime.bus.snapshot(now)
        keys, prefixes = self.table.keys, self._api_prefix
        parts: list[str] = []
        for i in indices:
            r = snap.get(keys[i])
            if r is None:
                continue
            detail = _dumps(r.detail) if r.detail else '""'
            parts.append(
                f"{prefixes[i]}{_json_value(r.value)},"
                f'"quality":"{_QUALITY_NAMES[r.quality]}","reason":{_REASON_JSON[r.reason]},'
                f'"detail":{detail},"source_ts":{r.source_ts!r},'
                f'"age_s":{round(now - r.source_ts, 3)!r}}}'
            )
        return "[" + ",".join(parts) + "]"

    def gateway_info(self, now: float) -> GatewayInfo:
        g = self.runtime.config.gateway
        started = self.runtime.started_at
        return GatewayInfo(
            name=g.name,
            site=g.site,
            area=g.area,
            line=g.line,
            version=__version__,
            started_at=started,
            uptime_s=round(now - started, 3),
        )

    # -- the app -----------------------------------------------------------------------------

    def _build_app(self) -> FastAPI:
        app = FastAPI(
            title="retrofit-gateway",
            version=__version__,
            description="Status of the gateway, its devices and their tags. When the page "
            "needs a login, so does this API: a session cookie from /login, or "
            "`Authorization: Bearer <token>` with a token from web.tokens.",
            # Both UIs load their scripts from a CDN; the page loads nothing from elsewhere.
            docs_url=None,
            redoc_url=None,
        )

        @app.get("/", response_class=HTMLResponse, summary="The status page")
        async def index(request: Request) -> Response:
            principal = _principal(request)

            async def chunks() -> AsyncIterator[bytes]:
                for chunk in self.iter_page(time.time(), principal):
                    yield chunk.encode()
                    await asyncio.sleep(0)

            return StreamingResponse(chunks(), media_type="text/html; charset=utf-8")

        @app.get("/login", response_class=HTMLResponse, include_in_schema=False)
        async def login_form(request: Request) -> Response:
            principal = _principal(request)
            if principal is not None and principal.session is not None:
                return RedirectResponse("./", status_code=303)
            return self._login_response(request, 200, "")

        @app.post("/login", response_class=HTMLResponse, include_in_schema=False)
        async def login(request: Request) -> Response:
            if not self.credentials.login_required:
                return self._login_response(request, 404, "")
            form = _form(request)
            expected = request.cookies.get(self.login_cookie, "")
            if not expected or not hmac.compare_digest(
                expected.encode(), form.get("csrf", "").encode()
            ):
                return self._login_response(
                    request, 403, "The form had expired or came from elsewhere: try again."
                )
            client = _client(request)
            wait = self.throttle.retry_after(client)
            if wait is not None:
                log.warning("web: login from %s refused unchecked: too many failures", client)
                response = self._login_response(
                    request,
                    429,
                    f"Too many failed logins from this address: try again in "
                    f"{math.ceil(wait / 60)} min.",
                )
                response.headers["Retry-After"] = str(wait)
                return response
            ok = await self._blocking(self.credentials.check_password, form.get("password", ""))
            if not ok:
                self.throttle.failed(client)
                log.warning("web: failed login from %s", client)
                return self._login_response(request, 401, "Wrong password.")
            self.throttle.succeeded(client)
            sid, _ = self.sessions.create()
            log.info("web: login from %s", client)
            done = RedirectResponse("./", status_code=303)
            done.set_cookie(
                self.session_cookie,
                sid,
                max_age=int(self.sessions.lifetime_s),
                path="/",
                secure=request.url.scheme == "https",
                httponly=True,
                samesite="strict",
            )
            done.delete_cookie(self.login_cookie, path="/")
            return done

        @app.post("/logout", include_in_schema=False)
        async def logout(request: Request) -> Response:
            principal = _principal(request)
            if principal is not None and principal.session is not None:
                self.sessions.end(principal.session)
                log.info("web: logout from %s", _client(request))
            response = RedirectResponse("login", status_code=303)
            response.delete_cookie(self.session_cookie, path="/")
            return response

        @app.get("/static/{name}", include_in_schema=False)
        async def static(name: str) -> Response:
            found = self._static.get(name)
            if found is None:
                raise HTTPException(404, "no such file")
            body, ctype = found
            return Response(
                body,
                media_type=ctype,
                headers={"Cache-Control": "max-age=3600", "X-Content-Type-Options": "nosniff"},
            )

        @app.get("/favicon.ico", include_in_schema=False)
        async def favicon() -> Response:
            return Response(status_code=204)

        @app.get(
            "/api/stream",
            summary="Live updates (Server-Sent Events)",
            description="A full snapshot on connect, then once a second the header data and "
            "only the tags and devices that changed. Tag rows are "
            "[value text, quality 0 good/1 uncertain/2 bad, reason, detail, source_ts].",
            response_class=StreamingResponse,
            responses={200: {"content": {"text/event-stream": {}}}, 503: {}},
        )
        async def stream(request: Request) -> Response:
            if self._hub.closed:
                raise HTTPException(503, "shutting down")
            if self._hub.streams >= MAX_STREAMS:
                raise HTTPException(503, f"too many live pages (max {MAX_STREAMS})")
            principal = _principal(request)
            session = principal.session if principal is not None else None
            return StreamingResponse(
                self._hub.stream() if session is None else self._session_stream(session),
                media_type="text/event-stream",
                headers={"Cache-Control": "no-store", "X-Accel-Buffering": "no"},
            )

        @app.get("/api/status", response_model=StatusOut, summary="Gateway overview")
        async def status() -> StatusOut:
            now = time.time()
            problem = self.health_problem(now)
            return StatusOut(
                gateway=self.gateway_info(now),
                devices=self._device_counts(),
                tags=self._tag_counts(self.runtime.bus.snapshot(now)),
                healthy=problem is None,
                problem=problem,
                sinks=self._health(),
            )

        @app.get("/api/devices", response_model=list[DeviceOut], summary="Every device")
        async def devices() -> list[DeviceOut]:
            return [DeviceOut.model_validate(st.as_dict()) for st in self.runtime.statuses.values()]

        @app.get(
            "/api/tags",
            response_model=list[TagOut],
            summary="Every tag's latest value",
            description="Stale Good values are reported Uncertain/stale, as OPC UA does.",
        )
        async def tags(
            machine: str | None = Query(default=None, description="Only this machine's tags."),
        ) -> Response:
            if machine is None:
                selected: Sequence[int] = range(len(self.tags))
            elif machine in self._index_by_machine:
                selected = self._index_by_machine[machine]
            else:
                known = ", ".join(sorted(self._index_by_machine)) or "none"
                raise HTTPException(404, f"unknown machine {machine!r}; known: {known}")
            # Serialised by hand (the schema is TagOut's): validating 10,000 models would
            # hold the event loop, and with it every device's poll, for a fifth of a second.
            return Response(self.tags_json(selected, time.time()), media_type="application/json")

        @app.get(
            "/api/audit",
            response_model=list[dict[str, Any]],
            summary="Recent writes to machines, newest first",
            description="Every attempt, refused or done: who, from where, the tag, the old "
            "and the requested value, the read-back and the result. The full record is "
            "audit.jsonl in the data directory.",
        )
        async def audit(
            limit: int = Query(default=100, ge=1, le=1000, description="At most this many."),
        ) -> JSONResponse:
            entries = list(self.runtime.audit_recent)[-limit:]
            return JSONResponse([_jsonable(e) for e in reversed(entries)])

        @app.get(
            "/api/certs",
            response_model=list[CertOut],
            summary="OPC UA client certificates",
            description="Rejected ones are clients refused so far; 404 without OPC UA.",
        )
        async def certificates() -> list[CertOut]:
            self._require_opcua()
            try:
                return [_cert_out(c) for c in self._list_certs()]
            except OSError as exc:
                raise HTTPException(500, f"cannot read the trust folders: {exc}") from None

        @app.post(
            "/api/certs/{cert_id}/trust",
            response_model=CertOut,
            summary="Trust a rejected OPC UA client certificate",
            description="Moves it to the trusted folder; the client can connect at its next "
            "attempt. Needs a login (and a CSRF token from a browser session). A form post "
            "is answered with a redirect to the page.",
            responses={303: {"description": "from a form: back to the page"}, 404: {}},
        )
        async def trust(cert_id: str, request: Request) -> Response:
            from gateway import certs  # noqa: PLC0415  (cryptography: only with OPC UA)

            self._require_opcua()
            try:
                info = certs.trust(self.runtime.data_dir, cert_id)
            except certs.UnknownCertificate as exc:
                raise HTTPException(404, str(exc)) from None
            except OSError as exc:
                raise HTTPException(500, f"cannot move the certificate: {exc}") from None
            principal = _principal(request)
            log.info(
                "web: OPC UA client certificate %s (%s) trusted by %s from %s",
                info.id,
                info.common_name or info.subject,
                principal.name if principal is not None else "?",
                _client(request),
            )
            if _FORM_KEY in request.scope and request.headers.get("content-type", "").startswith(
                "application/x-www-form-urlencoded"
            ):
                # From /api/certs/<id>/trust back to the page, behind any path prefix.
                return RedirectResponse("../../../#certs", status_code=303)
            return JSONResponse(_cert_out(info).model_dump(mode="json"))

        @app.get(
            "/healthz",
            response_model=HealthOut,
            summary="For watchdogs: 200 when running, 503 when broken",
            responses={503: {"model": HealthOut}},
        )
        async def healthz() -> JSONResponse:
            problem = self.health_problem(time.time())
            if problem is None:
                return JSONResponse({"status": "ok"})
            return JSONResponse({"status": "unavailable", "problem": problem}, status_code=503)

        @app.get(
            "/metrics",
            response_class=PlainTextResponse,
            summary="Prometheus metrics (text exposition format 0.0.4)",
        )
        async def metrics() -> PlainTextResponse:
            return PlainTextResponse(
                self.render_metrics(time.time()),
                media_type="text/plain; version=0.0.4; charset=utf-8",
            )

        return app

    def _require_opcua(self) -> None:
        if self.runtime.config.opcua is None:
            raise HTTPException(404, "OPC UA is not configured")

    def _list_certs(self) -> list[CertificateInfo]:
        from gateway import certs  # noqa: PLC0415  (cryptography: only with OPC UA)

        return certs.list_certificates(self.runtime.data_dir)

    def _login_response(self, request: Request, status: int, error: str) -> HTMLResponse:
        """The login page; it (re)sets the form's CSRF cookie, keeping a valid one so that
        two open tabs both work."""
        token = request.cookies.get(self.login_cookie, "")
        if not 32 <= len(token) <= 64 or not token.replace("-", "").replace("_", "").isalnum():
            token = secrets.token_urlsafe(32)
        response = HTMLResponse(self.render_login(token, error), status_code=status)
        if status == 401:
            response.headers["WWW-Authenticate"] = 'Bearer realm="retrofit-gateway"'
        response.set_cookie(
            self.login_cookie,
            token,
            max_age=LOGIN_FORM_S,
            path="/",
            secure=request.url.scheme == "https",
            httponly=True,
            samesite="strict",
        )
        return response

    def render_login(self, csrf: str, error: str) -> str:
        e = html.escape
        g = self.runtime.config.gateway
        head = (
            '<!doctype html><html lang="en"><head><meta charset="utf-8">'
            '<meta name="viewport" content="width=device-width, initial-scale=1">'
            f"<title>{e(g.name)} · log in</title>"
            f'<link rel="stylesheet" href="static/page.css?v={e(__version__)}">'
            '</head><body class="login"><main class="loginbox">'
            f"<h1>{e(g.name)}</h1>"
            f'<p class="where">{e(g.site)} / {e(g.area)} / {e(g.line)}</p>'
        )
        if not self.credentials.login_required:
            return (
                f"{head}<p>No password is set, so there is no login: the status page is open "
                "on this gateway's loopback address only.</p>"
                "<p>To require one (and reach the page from the network), make a password "
                "hash with <code>retrofit-gw passwd</code> and put it in the config as "
                '<code>web.password_hash</code>.</p><p><a href="./">Status page</a></p>'
                "</main></body></html>"
            )
        alert = f'<p class="err" role="alert">{e(error)}</p>' if error else ""
        return (
            f"{head}{alert}"
            '<form method="post" action="login">'
            f'<input type="hidden" name="csrf" value="{e(csrf)}">'
            '<label for="password">Password</label>'
            '<input id="password" name="password" type="password" required autofocus '
            'autocomplete="current-password">'
            '<button type="submit">Log in</button></form>'
            "</main></body></html>"
        )

    # -- /metrics ----------------------------------------------------------------------------

    def render_metrics(self, now: float) -> str:
        m = _Metrics()
        g = self.runtime.config.gateway
        info = ",".join(
            f'{k}="{_label(v)}"'
            for k, v in (
                ("name", g.name),
                ("site", g.site),
                ("area", g.area),
                ("line", g.line),
                ("version", __version__),
            )
        )
        m.family("retrofit_gw_info", "gauge", "Gateway identity; always 1.", [(info, 1)])
        m.family(
            "retrofit_gw_uptime_seconds",
            "gauge",
            "Seconds since the gateway started.",
            [("", round(now - self.runtime.started_at, 3))],
        )
        m.family(
            "retrofit_gw_healthy",
            "gauge",
            "1 when /healthz answers 200.",
            [("", self.health_problem(now) is None)],
        )

        statuses = list(self.runtime.statuses.values())
        labels = {
            st.name: f'device="{_label(st.name)}",machine="{_label(st.machine)}"' for st in statuses
        }

        def per_device(name: str, kind: str, help_: str, attr: str) -> None:
            samples = []
            for st in statuses:
                value = getattr(st, attr)
                if value is not None:
                    samples.append((labels[st.name], value))
            m.family(name, kind, help_, samples)

        m.family(
            "retrofit_gw_device_up",
            "gauge",
            "1 when the device is online.",
            [(labels[st.name], st.state is DeviceState.ONLINE) for st in statuses],
        )
        per_device("retrofit_gw_device_polls_total", "counter", "Poll attempts.", "polls")
        per_device(
            "retrofit_gw_device_good_polls_total", "counter", "Polls answered.", "good_polls"
        )
        m.family(
            "retrofit_gw_device_errors_total",
            "counter",
            "Errors by kind.",
            [
                (f'{labels[st.name]},kind="{_label(kind)}"', n)
                for st in statuses
                for kind, n in sorted(st.errors.items())
            ],
        )
        per_device(
            "retrofit_gw_device_last_poll_duration_seconds",
            "gauge",
            "Duration of the last successful poll.",
            "last_duration",
        )
        per_device(
            "retrofit_gw_device_max_poll_duration_seconds",
            "gauge",
            "Longest poll since start.",
            "max_duration",
        )
        per_device(
            "retrofit_gw_device_overruns_total",
            "counter",
            "Poll slots skipped because the previous poll ran late.",
            "overruns",
        )
        per_device("retrofit_gw_device_connects_total", "counter", "Connect attempts.", "connects")
        m.family(
            "retrofit_gw_device_breaker_state",
            "gauge",
            "1 for the breaker's current state (closed, open, half_open), 0 for the others.",
            [
                (f'{labels[st.name]},state="{state}"', st.breaker.value == state)
                for st in statuses
                for state in ("closed", "open", "half_open")
            ],
        )
        per_device(
            "retrofit_gw_device_breaker_trips_total",
            "counter",
            "Times the breaker opened after repeated failures.",
            "breaker_trips",
        )
        per_device(
            "retrofit_gw_device_skipped_polls_total",
            "counter",
            "Poll slots skipped while the breaker was open.",
            "skipped_polls",
        )
        per_device(
            "retrofit_gw_device_probes_total", "counter", "Probes of an open breaker.", "probes"
        )
        latency = []
        for st in statuses:
            ms = st.details().get("latency_timer_ms")
            if isinstance(ms, int):
                latency.append((labels[st.name], ms))
        m.family(
            "retrofit_gw_serial_latency_timer_ms",
            "gauge",
            "The USB serial adapter's latency timer (1 is best; 16 caps a bus near 60 req/s).",
            latency,
        )
        per_device(
            "retrofit_gw_device_last_success_timestamp_seconds",
            "gauge",
            "Epoch seconds of the last successful poll.",
            "last_success_ts",
        )

        bus = self.runtime.bus
        m.family(
            "retrofit_gw_bus_published_values_total",
            "counter",
            "Values published on the bus.",
            [("", bus.published_values)],
        )
        m.family(
            "retrofit_gw_bus_published_batches_total",
            "counter",
            "Batches published on the bus.",
            [("", bus.published_batches)],
        )
        subs = bus.subscriptions
        sub_label = {s: f'subscriber="{_label(s.name)}"' for s in subs}
        m.family(
            "retrofit_gw_bus_dropped_batches_total",
            "counter",
            "Batches dropped because the subscriber fell behind.",
            [(sub_label[s], s.dropped_batches) for s in subs],
        )
        m.family(
            "retrofit_gw_bus_dropped_values_total",
            "counter",
            "Values in the dropped batches.",
            [(sub_label[s], s.dropped_values) for s in subs],
        )
        m.family(
            "retrofit_gw_bus_queued_batches",
            "gauge",
            "Batches waiting for the subscriber.",
            [(sub_label[s], len(s)) for s in subs],
        )

        counts = [0, 0, 0]
        for tag in self.tags:
            r = bus.latest.get(tag.spec.key)
            if r is not None:
                stale = r.quality is Quality.GOOD and now - r.source_ts > tag.stale_after
                counts[Quality.UNCERTAIN if stale else r.quality] += 1
        m.family(
            "retrofit_gw_tags",
            "gauge",
            "Tags by current quality.",
            [(f'quality="{q}"', counts[i]) for i, q in enumerate(_QUALITY_NAMES)],
        )

        health = self.runtime.health
        mqtt = health.get("mqtt") or {}
        for key, kind, help_ in (
            ("connected", "gauge", "1 while connected to the MQTT broker."),
            ("published", "counter", "MQTT messages written to the connection."),
            ("dropped", "counter", "MQTT messages dropped from the buffer (all causes)."),
            ("dropped_full", "counter", "MQTT messages dropped: buffer full."),
            ("dropped_age", "counter", "MQTT messages dropped: older than buffer.max_age_h."),
            ("dropped_io", "counter", "MQTT messages dropped: the buffer could not be written."),
            ("queued", "gauge", "MQTT messages not yet acknowledged by the broker."),
            ("buffered", "gauge", "MQTT messages waiting on disk for the broker."),
            ("buffered_bytes", "gauge", "Bytes of MQTT messages waiting on disk."),
            ("oldest_age_s", "gauge", "Age of the oldest unacknowledged MQTT message, s."),
            ("replayed", "counter", "MQTT messages replayed from disk after an outage."),
        ):
            value = _number(mqtt.get(key))
            metric = key.replace("_age_s", "_age_seconds")
            name = f"retrofit_gw_mqtt_{metric}" + ("_total" if kind == "counter" else "")
            m.family(name, kind, help_, [("", value)] if value is not None else [])
        sessions = _number((health.get("opcua") or {}).get("sessions"))
        m.family(
            "retrofit_gw_opcua_sessions",
            "gauge",
            "OPC UA client sessions.",
            [("", sessions)] if sessions is not None else [],
        )
        m.family(
            "retrofit_gw_web_streams",
            "gauge",
            "Status pages open (live streams).",
            [("", self._hub.streams)],
        )
        m.family(
            "retrofit_gw_web_login_required",
            "gauge",
            "1 when the status page and API need a login.",
            [("", self.credentials.login_required)],
        )
        m.family(
            "retrofit_gw_web_sessions",
            "gauge",
            "Logged-in browser sessions.",
            [("", len(self.sessions))],
        )
        m.family(
            "retrofit_gw_web_login_failures_total",
            "counter",
            "Wrong passwords and unknown bearer tokens.",
            [("", self.throttle.failed_total)],
        )
        m.family(
            "retrofit_gw_web_login_throttled_total",
            "counter",
            "Logins refused unchecked (429) after too many failures from one address.",
            [("", self.throttle.throttled_total)],
        )
        return m.text()

    # -- the page ----------------------------------------------------------------------------

    def render_page(self, now: float, principal: Principal | None = None) -> str:
        return "".join(self.iter_page(now, principal))

    def iter_page(self, now: float, principal: Principal | None = None) -> Iterator[str]:
        """The page in chunks of one device each, so that serving 10,000 rows lets the event
        loop (and the polling) run in between. ``principal``: who asked, for the forms."""
        e = html.escape
        g = self.runtime.config.gateway
        counts = self._device_counts()
        latest = self.runtime.bus.latest
        statuses = self.runtime.statuses
        problem = self.health_problem(now)
        uptime = _fmt_uptime(now - self.runtime.started_at)
        ok_class, ok_text = ("ok", "OK") if problem is None else ("bad", "NOT OK")
        out: list[str] = []
        w = out.append
        w(
            '<!doctype html><html lang="en"><head><meta charset="utf-8">'
            '<meta name="viewport" content="width=device-width, initial-scale=1">'
            f"<title>{e(g.name)} · gateway status</title>"
            f'<link rel="stylesheet" href="static/page.css?v={e(__version__)}">'
            f'<script src="static/page.js?v={e(__version__)}" defer></script>'
            "</head><body>"
            '<div id="conn" class="banner" role="alert" hidden>'
            "Disconnected from the gateway — reconnecting…</div>"
            '<header class="top"><div class="id">'
            f"<h1>{e(g.name)}</h1>"
            f'<div class="where">{e(g.site)} / {e(g.area)} / {e(g.line)}</div></div>'
            '<dl class="meta">'
            f'<div><dt>Uptime</dt><dd id="uptime">{e(uptime)}</dd></div>'
            f"<div><dt>Version</dt><dd>{e(__version__)}</dd></div>"
            f'<div><dt>Gateway</dt><dd><span id="gw-ok" class="badge {ok_class}">'
            f"{ok_text}</span></dd></div>"
            f"{self._render_clock()}"
            f"</dl>{_render_logout(principal)}</header>"
        )
        w('<section class="cards">')
        w(
            '<div class="card"><h2>Devices online</h2><div class="big">'
            f'<span id="n-on">{counts.online}</span> / <span id="n-all">{counts.total}</span>'
            "</div></div>"
        )
        snap_counts = [0, 0, 0]
        for tag in self.tags:
            r = latest.get(tag.spec.key)
            if r is not None:
                stale = r.quality is Quality.GOOD and now - r.source_ts > tag.stale_after
                snap_counts[Quality.UNCERTAIN if stale else r.quality] += 1
        w('<div class="card"><h2>Tags</h2><div class="qcount">')
        for i, q in enumerate(_QUALITY_NAMES):
            w(f'<span class="qb q{i}"><b id="q{i}">{snap_counts[i]}</b> {q}</span>')
        w("</div></div>")
        w(self._render_mqtt_card())
        w(self._render_sparkplug_card())
        w(self._render_opcua_card())
        w(self._render_certs_card(principal))
        w(self._render_writes_card(now))
        w("</section><main>")
        collapse = len(self.tags) > COLLAPSE_ABOVE_TAGS
        by_device: dict[str, list[_Tag]] = {}
        for tag in self.tags:
            by_device.setdefault(tag.spec.device, []).append(tag)
        machines: dict[str, list[DeviceStatus]] = {}
        for st in statuses.values():
            machines.setdefault(st.machine, []).append(st)
        for machine, devs in machines.items():
            n_tags = sum(len(by_device.get(st.name, ())) for st in devs)
            w(
                f'<details class="machine"{"" if collapse else " open"}><summary>'
                f'<h2>{e(machine)}</h2><span class="n">{n_tags} tags</span></summary>'
            )
            for st in devs:
                w(self._render_device(st, now))
                w(self._render_tags(by_device.get(st.name, []), latest, st, now))
                w("</article>")
                yield "".join(out)
                out.clear()
            w("</details>")
        w(
            '</main><footer>retrofit-gateway · <a href="api/status">JSON API</a> · '
            '<a href="metrics">metrics</a> · <a href="openapi.json">API schema</a></footer>'
            "</body></html>"
        )
        yield "".join(out)

    def _render_clock(self) -> str:
        """Whether source timestamps can be trusted: a Pi has no RTC until NTP syncs."""
        h = self.runtime.health.get("clock") or {}
        synced = h.get("synced")
        cls, text = _SYNC_BADGE.get(synced if isinstance(synced, bool) else None, _SYNC_BADGE[None])
        steps = h.get("steps") or 0
        title = f"clock steps since start: {steps}; source: {h.get('source', 'unknown')}"
        return (
            f'<div data-sink="clock" title="{html.escape(title)}"><dt>Clock</dt><dd>'
            f'<span class="badge {cls}" data-f="synced" data-kind="sync">{text}</span>'
            "</dd></div>"
        )

    def _render_mqtt_card(self) -> str:
        e = html.escape
        cfg = self.runtime.config.mqtt
        h = self.runtime.health.get("mqtt")
        if cfg is None and h is None:
            return (
                '<div class="card muted" data-sink="mqtt"><h2>MQTT broker</h2>'
                "<div>not configured</div></div>"
            )
        h = h or {}
        broker = h.get("broker") or (f"{cfg.host}:{cfg.port}" if cfg is not None else "")
        connected = h.get("connected")
        return (
            '<div class="card" data-sink="mqtt"><h2>MQTT broker</h2>'
            f'<div class="line"><span class="badge {_conn_class(connected)}" data-f="connected" '
            f'data-kind="conn">{_conn_text(connected)}</span> '
            f'<span class="mono">{e(str(broker))}</span></div>'
            f'<div class="line">Buffered <b data-f="buffered">'
            f"{e(_fmt_value(h.get('buffered')))}</b>"
            f' · oldest <b data-f="oldest_age_s" data-kind="secs">'
            f"{e(_fmt_secs(h.get('oldest_age_s')))}</b>"
            f' · replayed <b data-f="replayed">{e(_fmt_value(h.get("replayed")))}</b></div>'
            f'<div class="line">Sent <b data-f="published">{e(_fmt_value(h.get("published")))}</b>'
            f' · dropped <b data-f="dropped">{e(_fmt_value(h.get("dropped")))}</b></div></div>'
        )

    def _render_sparkplug_card(self) -> str:
        """Only when configured: Sparkplug is an option beside the UNS topics."""
        e = html.escape
        cfg = self.runtime.config.sparkplug
        h = self.runtime.health.get("sparkplug")
        if cfg is None and h is None:
            return ""
        h = h or {}
        connected = h.get("connected")
        host = ""
        if h.get("primary_host") or (cfg is not None and cfg.primary_host_id):
            host = (
                f' · primary host online <b data-f="host_online">'
                f"{e(_fmt_value(h.get('host_online')))}</b>"
            )
        return (
            '<div class="card" data-sink="sparkplug"><h2>Sparkplug B</h2>'
            f'<div class="line"><span class="badge {_conn_class(connected)}" data-f="connected" '
            f'data-kind="conn">{_conn_text(connected)}</span> '
            f'<span class="mono" data-f="node">{e(_fmt_value(h.get("node")))}</span></div>'
            f'<div class="line">bdSeq <b data-f="bdseq">{e(_fmt_value(h.get("bdseq")))}</b>'
            f"{host}</div>"
            f'<div class="line">Buffered <b data-f="buffered">'
            f"{e(_fmt_value(h.get('buffered')))}</b>"
            f' · replayed <b data-f="replayed">{e(_fmt_value(h.get("replayed")))}</b>'
            f' · dropped <b data-f="dropped">{e(_fmt_value(h.get("dropped")))}</b></div></div>'
        )

    def _render_opcua_card(self) -> str:
        e = html.escape
        cfg = self.runtime.config.opcua
        h = self.runtime.health.get("opcua")
        if cfg is None and h is None:
            return (
                '<div class="card muted" data-sink="opcua"><h2>OPC UA server</h2>'
                "<div>not configured</div></div>"
            )
        h = h or {}
        endpoint = h.get("endpoint") or (
            f"opc.tcp://{cfg.host}:{cfg.port}" if cfg is not None else ""
        )
        return (
            '<div class="card" data-sink="opcua"><h2>OPC UA server</h2>'
            f'<div class="line mono" data-f="endpoint">{e(str(endpoint))}</div>'
            f'<div class="line">Sessions <b data-f="sessions">'
            f"{e(_fmt_value(h.get('sessions')))}</b></div></div>"
        )

    def _render_certs_card(self, principal: Principal | None) -> str:
        """OPC UA client certificates, rejected first: those are the ones waiting for a
        technician. Trust buttons only for a logged-in browser (they need its CSRF token)."""
        if self.runtime.config.opcua is None:
            return ""
        e = html.escape
        out = ['<div class="card span" id="certs" data-sink="certs"><h2>Certificates</h2>']
        try:
            found = self._list_certs()
        except OSError as exc:
            out.append(f'<p class="note">cannot read the trust folders: {e(str(exc))}</p></div>')
            return "".join(out)
        session = principal.session if principal is not None else None
        groups = (
            ("rejected", [c for c in found if c.state == "rejected"]),
            ("trusted", [c for c in found if c.state == "trusted"]),
        )
        if not found:
            out.append(
                '<p class="note">No OPC UA client certificates yet. A client whose certificate '
                "is refused appears here, to be trusted.</p>"
            )
        for state, certs in groups:
            if not certs:
                continue
            out.append(f'<ul class="certs" data-state="{state}">')
            for c in certs[:CERTS_SHOWN]:
                problem = c.time_problem()
                validity = problem or f"valid until {c.not_after:%Y-%m-%d}"
                seen = (
                    ""
                    if c.first_seen is None
                    else f" · first seen {c.first_seen:%Y-%m-%d %H:%M} UTC"
                )
                badge = "bad" if state == "rejected" else "ok"
                button = ""
                if state == "rejected" and session is not None:
                    who = c.common_name or c.subject
                    button = (
                        f'<form method="post" action="api/certs/{e(c.id)}/trust" '
                        f'data-confirm="Trust {e(who)}? It can connect to OPC UA at once.">'
                        f'<input type="hidden" name="csrf" value="{e(session.csrf)}">'
                        '<button type="submit" class="act">Trust</button></form>'
                    )
                out.append(
                    f'<li data-cert="{e(c.id)}" data-state="{state}">'
                    f'<span class="badge {badge}">{state.upper()}</span>'
                    f'<div class="what"><b>{e(c.common_name or c.subject)}</b> '
                    f'<span class="mono">{e(c.id)}</span>'
                    f'<div class="note">{e(c.application_uri or "no application URI")} · '
                    f'<span class="{"warntext" if problem else ""}">{e(validity)}</span>'
                    f"{e(seen)}</div></div>{button}</li>"
                )
            if len(certs) > CERTS_SHOWN:
                out.append(
                    f'<li class="note">… and {len(certs) - CERTS_SHOWN} more '
                    "(<code>retrofit-gw certs list</code>)</li>"
                )
            out.append("</ul>")
        if groups[0][1] and session is None:
            if self.credentials.login_required:
                hint = "Trusting from this page needs a browser login."
            else:
                hint = (
                    "Trusting from this page needs a login, and no password is set: make a "
                    "hash with <code>retrofit-gw passwd</code> for <code>web.password_hash</code>."
                )
            out.append(
                f'<p class="note">{hint} On the gateway: '
                "<code>retrofit-gw certs trust CONFIG ID</code>.</p>"
            )
        out.append("</div>")
        return "".join(out)

    def _render_writes_card(self, now: float) -> str:
        """The write audit, newest first (all of it: GET /api/audit, or audit.jsonl)."""
        e = html.escape
        entries = list(self.runtime.audit_recent)[-WRITES_SHOWN:]
        if not entries:
            writable = any(s.write is not None for s in self.runtime.tags)
            text = "No writes yet." if writable else "No writes: no tag is writable."
            return (
                '<div class="card span muted" id="writes"><h2>Writes</h2>'
                f'<p class="note">{text}</p></div>'
            )
        out = ['<div class="card span" id="writes"><h2>Writes</h2><ul class="writes">']
        for entry in reversed(entries):
            ts = entry.get("ts")
            when = _fmt_age(now - ts) if isinstance(ts, int | float) else "—"
            result = str(entry.get("result", "?"))
            ok = result == "ok"
            change = f"{_fmt_value(entry.get('old'))} → {_fmt_value(entry.get('requested'))}"
            if ok and "read_back" in entry:
                change += f" (read back {_fmt_value(entry.get('read_back'))})"
            detail = "" if ok else str(entry.get("detail", ""))
            out.append(
                f'<li data-result="{e(result)}">'
                f'<span class="badge {"ok" if ok else "bad"}">{e(result)}</span>'
                f'<div class="what"><b>{e(str(entry.get("tag", "?")))}</b> '
                f'<span class="mono">{e(change)}</span>'
                f'<div class="note">{e(when)} · {e(str(entry.get("user", "?")))} from '
                f"{e(str(entry.get('origin', '?')))}"
                f"{' · ' + e(detail) if detail else ''}</div></div></li>"
            )
        out.append("</ul></div>")
        return "".join(out)

    def _render_device(self, st: DeviceStatus, now: float) -> str:
        e = html.escape
        last_success = "never" if st.last_success_ts is None else _fmt_age(now - st.last_success_ts)
        err = ""
        if st.last_error:
            when = "" if st.last_error_ts is None else _fmt_age(now - st.last_error_ts) + ": "
            err = when + st.last_error
        duration = _fmt_duration(st.last_duration)
        polls = f"{st.good_polls} / {st.polls}"
        errors = _fmt_errors(st.errors)
        breaker = _fmt_breaker(st.breaker.value, st.breaker_trips, st.next_probe_ts, now)
        line = _fmt_line(st.details())
        line_row = ""
        if line:
            text, note, ok = line
            warn = "" if ok else " warn"
            line_row = (
                f'<div class="wide{warn}" data-f="line"><dt>Line</dt>'
                f'<dd class="mono">{e(str(text))}</dd>'
                f'<dd class="note">{e(str(note))}</dd></div>'
            )
        return (
            f'<article class="dev" data-d="{e(st.name)}">'
            '<header class="devhead"><div>'
            f"<h3>{e(st.name)}</h3>"
            f'<div class="sub mono">{e(st.driver)} · {e(st.endpoint)}</div></div>'
            f'<span class="badge big st-{st.state.value}" data-f="state">'
            f"{st.state.value.upper()}</span></header>"
            '<dl class="stats">'
            f'<div><dt>Last success</dt><dd data-f="ls">{e(last_success)}</dd></div>'
            f'<div><dt>Last poll</dt><dd data-f="dur">{e(duration)}</dd></div>'
            f'<div><dt>Polls ok / all</dt><dd data-f="polls">{polls}</dd></div>'
            f'<div><dt>Overruns</dt><dd data-f="over">{st.overruns}</dd></div>'
            f'<div><dt>Breaker</dt><dd data-f="brk">{e(breaker)}</dd></div>'
            f'<div><dt>Skipped polls</dt><dd data-f="skip">{st.skipped_polls}</dd></div>'
            f'<div class="wide"><dt>Errors</dt><dd data-f="errors">{e(errors)}</dd></div>'
            f"{line_row}"
            "</dl>"
            f'<p class="lasterr" data-f="le"{"" if err else " hidden"}>{e(err)}</p>'
        )

    @staticmethod
    def _render_tags(
        tags: Sequence[_Tag], latest: Mapping[TagKey, Reading], st: DeviceStatus, now: float
    ) -> str:
        e = html.escape
        rows = [
            '<table class="tags"><thead><tr><th>Tag</th><th>Value</th><th>Quality</th>'
            "<th>Age</th></tr></thead><tbody>"
        ]
        for tag in tags:
            s = tag.spec
            r = latest.get(s.key)
            if r is None:
                continue
            stale = r.quality is Quality.GOOD and now - r.source_ts > tag.stale_after
            text, q, reason, detail, ts = _row(r, stale)
            age = "—" if ts is None else _fmt_age(now - ts)
            title = f' title="{e(s.description)}"' if s.description else ""
            unit = f' <span class="u">{e(s.unit)}</span>' if s.unit else ""
            rows.append(
                f'<tr data-k="{e(s.key)}" data-q="{q}" data-ts="{"" if ts is None else ts}">'
                f'<td class="n"{title}>{e(s.name)}</td>'
                f'<td class="v"><span class="val">{e(text)}</span>'
                f"{unit}</td>"
                f'<td class="q"><span class="qb q{q}">{_QUALITY_NAMES[q].upper()}</span>'
                f'<span class="why">{e(_why(reason, detail, st.last_error))}</span></td>'
                f'<td class="a">{e(age)}</td></tr>'
            )
        rows.append("</tbody></table>")
        return "".join(rows)


def _why(reason: str, detail: str, device_error: str) -> str:
    """Kept in step with ``why`` in page.js. The device's own error is shown once, above
    its table, not under each of its tags."""
    label = reason.replace("_", " ")
    return f"{label}: {detail}" if detail and detail != device_error else label


def _render_logout(principal: Principal | None) -> str:
    if principal is None or principal.session is None:
        return ""
    return (
        '<form class="logout" method="post" action="logout">'
        f'<input type="hidden" name="csrf" value="{html.escape(principal.session.csrf)}">'
        '<button type="submit">Log out</button></form>'
    )


def _conn_class(connected: object) -> str:
    return "ok" if connected is True else ("bad" if connected is False else "idle")


def _conn_text(connected: object) -> str:
    return "CONNECTED" if connected is True else ("DISCONNECTED" if connected is False else "—")

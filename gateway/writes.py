"""Writes to machines: off unless a tag says ``writable: true``, and then only within limits.

Every write, from any sink (OPC UA operators, MQTT ``<tag>/set``, Sparkplug DCMD), comes
through :meth:`WriteService.write`, in this order, and stops at the first refusal with a
:class:`gateway.errors.WriteRefused` whose ``code`` says why:

1. the tag exists (``unknown_tag``) and has a write rule (``not_writable``);
2. the value has the tag's kind: a bool for a bool, a finite number for a number, never a
   string for a number or a bool for a number (``bad_type``);
3. it is one of ``values`` (``not_allowed``), else within ``min``..``max`` (``out_of_range``);
4. the last write to the tag is at least ``min_interval`` old (``rate_limited``);
5. it converts exactly to a raw value through the tag's scale and offset, and fits the
   tag's type (``not_representable``): nothing is rounded behind the operator's back;
6. the driver encodes it with the tag's own type and byte order (the decoder's inverse,
   tested round trip), writes it, and reads it back; a device error is ``device``, a
   read-back that differs is ``verify_failed`` (the value *was* written).

Nothing is sent to the machine unless 1-5 pass. Every attempt, refused or not, is audited:
who, from where, the tag, the old value, the requested value, the read-back and the result,
to the log and to ``audit.jsonl`` in the data directory (one JSON object per line, fsynced:
writes are rare and the record must survive a power cut).
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import os
import time
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol, runtime_checkable

from gateway.errors import DeviceError, WriteRefused
from gateway.model import DataType, Reading, TagKey, TagSpec, Value
from gateway.normalize import to_engineering, to_raw

__all__ = ["AuditLog", "WritableDriver", "WriteResult", "WriteService"]

log = logging.getLogger("gateway.writes")

#: The audit entries kept in memory for the status page.
RECENT = 200
#: A write may wait behind a poll; it must not wait forever.
WRITE_TIMEOUT = 10.0


@runtime_checkable
class WritableDriver(Protocol):
    """A driver that can write: one tag's raw value, then the value read back."""

    async def write(self, tag: int, value: Value) -> Value: ...


@dataclass(frozen=True, slots=True)
class WriteResult:
    key: TagKey
    value: Value
    read_back: Value


class AuditLog:
    """Append-only JSON lines; the last :data:`RECENT` entries in memory for the page."""

    def __init__(self, path: Path, clock: Callable[[], float] = time.time) -> None:
        self.path = path
        self._clock = clock
        self.recent: deque[dict[str, object]] = deque(maxlen=RECENT)
        try:
            with path.open(encoding="utf-8") as f:
                for line in deque(f, maxlen=RECENT):
                    try:
                        self.recent.append(json.loads(line))
                    except ValueError:
                        continue
        except FileNotFoundError:
            pass

    def record(self, entry: dict[str, object]) -> dict[str, object]:
        entry = {"ts": round(self._clock(), 3), **entry}
        line = json.dumps(entry, ensure_ascii=False, separators=(",", ":"), default=str)
        self.recent.append(entry)
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with self.path.open("a", encoding="utf-8") as f:
                f.write(line + "\n")
                f.flush()
                os.fsync(f.fileno())
        except OSError as exc:
            # The write itself already happened or was refused; losing its record must be
            # loud, not a reason to pretend otherwise.
            log.error("audit: cannot append to %s: %s; entry: %s", self.path, exc, line)  # noqa: TRY400
        return entry


class WriteService:
    """The one way to write to a machine; see the module docstring."""

    def __init__(
        self,
        specs: Mapping[TagKey, TagSpec],
        drivers: Mapping[str, object],
        latest: Mapping[TagKey, Reading],
        audit: AuditLog,
        *,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self._specs = specs
        self._drivers = drivers
        self._latest = latest
        self.audit = audit
        self._monotonic = monotonic
        self._last: dict[TagKey, float] = {}
        self._locks: dict[TagKey, asyncio.Lock] = {}

    def writable(self, key: TagKey) -> bool:
        spec = self._specs.get(key)
        return spec is not None and spec.write is not None

    def _attempt(self, key: TagKey, value: object, *, user: str, origin: str) -> dict[str, object]:
        """The audit entry's common part: who, from where, which tag, its value before."""
        previous = self._latest.get(key)
        return {
            "user": user,
            "origin": origin,
            "tag": key,
            "old": previous.value if previous is not None else None,
            "requested": value,
        }

    def audit_refusal(
        self, key: TagKey, value: object, *, user: str, origin: str, code: str, detail: str
    ) -> None:
        """Audit a write a sink refused before it reached :meth:`write` (a reader's session, a
        malformed command), in the same shape as a refusal here."""
        self._record_refusal(self._attempt(key, value, user=user, origin=origin), code, detail)

    def _record_refusal(self, attempt: dict[str, object], code: str, detail: str) -> None:
        self.audit.record({**attempt, "result": code, "detail": detail})

    async def write(self, key: TagKey, value: object, *, user: str, origin: str) -> WriteResult:
        """Validate, write, read back and audit; raises WriteRefused (already audited)."""
        base = self._attempt(key, value, user=user, origin=origin)
        old = base["old"]
        try:
            result = await self._write(key, value)
        except WriteRefused as exc:
            self._record_refusal(base, exc.code, str(exc))
            log.warning("write %s = %r by %s from %s refused: %s", key, value, user, origin, exc)
            raise
        self.audit.record({**base, "result": "ok", "read_back": result.read_back})
        log.info(
            "write %s = %r by %s from %s: ok (was %r, read back %r)",
            key,
            value,
            user,
            origin,
            old,
            result.read_back,
        )
        return result

    async def _write(self, key: TagKey, value: object) -> WriteResult:
        spec = self._specs.get(key)
        if spec is None:
            raise WriteRefused("unknown_tag", f"no tag {key}")
        rule = spec.write
        if rule is None:
            raise WriteRefused("not_writable", f"{key} is read-only")
        checked = _check_type(spec, value)
        if rule.allowed:
            if not any(_matches(a, checked) for a in rule.allowed):
                allowed = ", ".join(json.dumps(a) for a in rule.allowed)
                raise WriteRefused("not_allowed", f"{key}: {checked!r} is not one of {allowed}")
        elif isinstance(checked, int | float) and not isinstance(checked, bool):
            if rule.minimum is not None and checked < rule.minimum:
                raise WriteRefused("out_of_range", f"{key}: {checked} is below {rule.minimum:g}")
            if rule.maximum is not None and checked > rule.maximum:
                raise WriteRefused("out_of_range", f"{key}: {checked} is above {rule.maximum:g}")
        try:
            raw = to_raw(spec, checked)
        except ValueError as exc:
            raise WriteRefused("not_representable", f"{key}: {exc}") from None
        driver = self._drivers.get(spec.device)
        if not isinstance(driver, WritableDriver):
            raise WriteRefused("not_writable", f"{key}: its driver cannot write")
        lock = self._locks.setdefault(key, asyncio.Lock())
        async with lock:
            now = self._monotonic()
            last = self._last.get(key)
            if last is not None and now - last < rule.min_interval:
                wait = rule.min_interval - (now - last)
                raise WriteRefused(
                    "rate_limited", f"{key}: one write per {rule.min_interval:g} s; {wait:.1f} s"
                )
            self._last[key] = now
            try:
                async with asyncio.timeout(WRITE_TIMEOUT):
                    back_raw = await driver.write(spec.index, raw)
            except (TypeError, ValueError) as exc:
                raise WriteRefused("not_representable", f"{key}: {exc}") from None
            except (DeviceError, OSError, TimeoutError) as exc:
                detail = str(exc) or "no answer in time"
                raise WriteRefused("device", f"{key}: {detail}") from None
        back = to_engineering(spec, back_raw)
        if not _same(back, checked):
            raise WriteRefused("verify_failed", f"{key}: wrote {checked!r} but read back {back!r}")
        return WriteResult(key, checked, back)


def _check_type(spec: TagSpec, value: object) -> Value:
    if spec.datatype in ("bool", "bit"):
        if not isinstance(value, bool):
            raise WriteRefused("bad_type", f"{spec.key} takes true or false, not {value!r}")
        return value
    datatype = DataType.of(spec.datatype)
    if datatype is not None and datatype.is_numeric:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise WriteRefused("bad_type", f"{spec.key} takes a number, not {value!r}")
        if isinstance(value, float) and not math.isfinite(value):
            raise WriteRefused("bad_type", f"{spec.key} takes a finite number, not {value!r}")
        return value
    raise WriteRefused("not_writable", f"{spec.key}: {spec.datatype} tags are not writable")


def _matches(allowed: Value, value: Value) -> bool:
    """True is not 1 here: a bool matches only a bool, a number only a number."""
    if isinstance(allowed, bool) or isinstance(value, bool):
        return allowed is value
    return allowed == value


def _same(a: Value, b: Value) -> bool:
    if isinstance(a, float) or isinstance(b, float):
        if isinstance(a, bool) or isinstance(b, bool):
            return a is b
        # float32 registers hold ~7 significant digits.
        return (
            isinstance(a, int | float)
            and isinstance(b, int | float)
            and math.isclose(a, b, rel_tol=1e-6, abs_tol=1e-9)
        )
    return type(a) is type(b) and a == b

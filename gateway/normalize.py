"""Turn a driver's raw sample into a Reading: scale, offset, range check, quality.

One pure function, golden-tested, so every driver's values mean the same thing downstream.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Iterable, Mapping, Sequence

from gateway.model import DataType, Quality, RawSample, Reading, Reason, TagKey, TagSpec, Value

__all__ = ["DeviceNormalizer", "bad", "normalize"]

_new = tuple.__new__
_GOOD = Quality.GOOD
_OK = Reason.NONE


def normalize(spec: TagSpec, sample: RawSample, ts: float, previous: Reading | None) -> Reading:
    """Normalise one sample read at wall-clock time ``ts``.

    A failed sample keeps the previous value and *its* timestamp, marked Bad: the number stays
    visible for a technician, but nobody can mistake it for a fresh one.
    """
    if sample.reason is not Reason.NONE or sample.value is None:
        return bad(
            spec, previous, sample.reason or Reason.DECODE_ERROR, sample.detail, ts, sample.raw
        )
    value: Value = sample.value
    if isinstance(value, bool | str):
        return Reading(spec.key, value, Quality.GOOD, ts, raw=sample.raw)
    if isinstance(value, float) and not math.isfinite(value):
        # Devices signal a broken sensor with NaN/inf; passing it on as Good would poison
        # averages downstream.
        return bad(spec, previous, Reason.DECODE_ERROR, f"not a number ({value})", ts, sample.raw)
    if spec.scale != 1.0 or spec.offset != 0.0:
        if isinstance(value, int):
            # 603 * 0.1 is 60.300000000000004 in binary floating point. A register holds an
            # integer, so the scale and offset fix the precision: show 60.3, as the manual does.
            value = round(value * spec.scale + spec.offset, _decimals(spec.scale, spec.offset))
        else:
            value = value * spec.scale + spec.offset
    if spec.minimum is not None and value < spec.minimum:
        out_of_range = f"below min {spec.minimum:g}"
    elif spec.maximum is not None and value > spec.maximum:
        out_of_range = f"above max {spec.maximum:g}"
    else:
        return Reading(spec.key, value, Quality.GOOD, ts, raw=sample.raw)
    return Reading(
        spec.key, value, Quality.UNCERTAIN, ts, Reason.OUT_OF_RANGE, out_of_range, sample.raw
    )


@functools.cache
def _decimals(scale: float, offset: float) -> int:
    """Decimal places an integer times ``scale`` plus ``offset`` can have (at most 12)."""

    def places(x: float) -> int:
        text = f"{x:.12f}".rstrip("0")
        return len(text.partition(".")[2])

    return max(places(scale), places(offset))


def bad(
    spec: TagSpec,
    previous: Reading | None,
    reason: Reason,
    detail: str,
    ts: float,
    raw: tuple[int, ...] = (),
) -> Reading:
    """A Bad reading that keeps the last known value and the time that value was read."""
    if previous is None or previous.value is None:
        return Reading(spec.key, None, Quality.BAD, ts, reason, detail, raw)
    return Reading(
        spec.key, previous.value, Quality.BAD, previous.source_ts, reason, detail, previous.raw
    )


class DeviceNormalizer:
    """``normalize`` for all tags of one device at once, for the poll loop.

    Behaves exactly like ``normalize`` (a property test holds them together) but decides at
    start-up which tags need no scaling and no range check, which is most of them, and looks
    up a tag's previous value only when its read failed. At 10,000 values/s this halves the
    per-value cost, and needs two small lists per device instead of an object per tag.
    """

    __slots__ = ("_keys", "_plain", "_specs")

    def __init__(self, specs: Sequence[TagSpec]) -> None:
        self._specs = tuple(specs)
        self._keys = tuple(s.key for s in specs)
        self._plain = tuple(
            s.scale == 1.0 and s.offset == 0.0 and s.minimum is None and s.maximum is None
            for s in specs
        )

    def apply(
        self, samples: Iterable[RawSample], ts: float, latest: Mapping[TagKey, Reading]
    ) -> list[Reading]:
        keys, plain, specs = self._keys, self._plain, self._specs
        isfinite = math.isfinite
        out: list[Reading] = []
        append = out.append
        for sample in samples:
            i = sample[0]
            value = sample[1]
            if (
                plain[i]
                and sample[3] is _OK
                and value is not None
                and (value.__class__ is not float or isfinite(value))
            ):
                append(_new(Reading, (keys[i], value, _GOOD, ts, _OK, "", sample[2])))
            else:
                append(normalize(specs[i], sample, ts, latest.get(keys[i])))
        return out


def to_engineering(spec: TagSpec, raw: Value) -> Value:
    """A raw value in engineering units, as a poll would show it (for a write's read-back)."""
    if isinstance(raw, bool | str) or (spec.scale == 1.0 and spec.offset == 0.0):
        return raw
    if isinstance(raw, int):
        return round(raw * spec.scale + spec.offset, _decimals(spec.scale, spec.offset))
    return raw * spec.scale + spec.offset


def to_raw(spec: TagSpec, value: Value) -> Value:
    """The raw value that :func:`to_engineering` turns into ``value``, exactly, or
    ValueError: a setpoint of 12.34 on a tag with scale 0.1 is refused, never rounded to
    12.3 behind the operator's back."""
    if isinstance(value, bool | str) or spec.datatype in ("bool", "bit", "string"):
        return value
    raw = (value - spec.offset) / spec.scale
    datatype = DataType.of(spec.datatype)
    if datatype is None or not datatype.is_integer:
        return raw
    whole = round(raw)
    if abs(raw - whole) > 1e-9 * max(1.0, abs(raw)):
        step = f"{spec.scale:g}" + (f" from {spec.offset:g}" if spec.offset else "")
        raise ValueError(f"{value} is not a multiple of the tag's resolution {step}")
    return int(whole)

"""Turn a driver's raw sample into a Reading: scale, offset, range check, quality.

One pure function, golden-tested, so every driver's values mean the same thing downstream.
"""

from __future__ import annotations

import math

from gateway.model import Quality, RawSample, Reading, Reason, TagSpec, Value

__all__ = ["bad", "normalize"]


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
        value = value * spec.scale + spec.offset
    if spec.minimum is not None and value < spec.minimum:
        return Reading(
            spec.key,
            value,
            Quality.UNCERTAIN,
            ts,
            Reason.OUT_OF_RANGE,
            f"below min {spec.minimum:g}",
            sample.raw,
        )
    if spec.maximum is not None and value > spec.maximum:
        return Reading(
            spec.key,
            value,
            Quality.UNCERTAIN,
            ts,
            Reason.OUT_OF_RANGE,
            f"above max {spec.maximum:g}",
            sample.raw,
        )
    return Reading(spec.key, value, Quality.GOOD, ts, raw=sample.raw)


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

"""The contract between the runtime and a protocol driver.

A driver is one logical device. It is scheduled, timed out, retried and counted by
``gateway.runner``; it never loops or sleeps between polls itself.

- ``connect()`` may be called again after any failure and must not leak resources.
- ``read(group)`` performs exactly one poll of one read group and returns one ``RawSample`` per
  tag of that group. A failure of part of the device is reported per tag (``RawSample.reason``);
  a failure of the whole device raises a ``gateway.errors.DeviceError``.
- Pauses that a device quirk demands *inside* one poll (``workarounds``) are the driver's to
  keep; waiting *between* polls is the runner's.
- ``close()`` is idempotent and safe after a failed or partial ``connect()``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Protocol, runtime_checkable

from gateway.model import RawSample, ReadGroup, TagSpec

__all__ = ["Describable", "Diagnosable", "Driver"]


class Driver(Protocol):
    # Read-only properties, not plain attributes: drivers keep tuples, and a mutable
    # ``Sequence`` attribute in a Protocol would reject them under strict typing.
    @property
    def name(self) -> str: ...

    @property
    def tags(self) -> Sequence[TagSpec]: ...

    @property
    def groups(self) -> Sequence[ReadGroup]: ...

    async def connect(self) -> None: ...

    async def read(self, group: int) -> Sequence[RawSample]: ...

    def poll_timeout(self, group: int) -> float:
        """Upper bound in seconds for one ``read(group)``; the runner cancels a read after it."""
        ...

    async def close(self) -> None: ...


@runtime_checkable
class Describable(Protocol):
    """A driver that can explain its read plan, logged once at start-up."""

    def describe_plan(self) -> list[str]: ...


@runtime_checkable
class Diagnosable(Protocol):
    """A driver that reports on its line (serial port settings, latency timer, bus counters).

    Called whenever the status page or the API shows the device, so it must be cheap and
    must not touch the device.
    """

    def details(self) -> Mapping[str, object]: ...

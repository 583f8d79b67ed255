"""The data model every part of the gateway speaks: readings, quality and their reasons.

This module imports nothing of ours, so drivers, the runtime and sinks can all depend on it
without depending on each other.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import NamedTuple

__all__ = [
    "DataType",
    "Quality",
    "RawSample",
    "ReadGroup",
    "Reading",
    "Reason",
    "TagKey",
    "TagSpec",
    "Value",
    "WriteRule",
]

#: A value as it leaves normalisation: numbers are int or float, strings stay strings.
Value = bool | int | float | str

#: ``"<machine>/<tag>"``: unique across the gateway, and the tail of the MQTT topic.
TagKey = str


class DataType(enum.StrEnum):
    """The data type of a tag: how its registers or bits are read."""

    # What TagSpec.datatype holds, for every driver (the Modbus config uses it directly; the
    # docstring above is what config schemas show). A StrEnum, so a plain string compares
    # equal to its member; look a string up with `of`.

    BOOL = "bool"  # a coil or discrete input
    BIT = "bit"  # one bit of a register, chosen by ``bit``
    INT16 = "int16"
    UINT16 = "uint16"
    INT32 = "int32"
    UINT32 = "uint32"
    INT64 = "int64"
    UINT64 = "uint64"
    FLOAT32 = "float32"
    FLOAT64 = "float64"
    BCD16 = "bcd16"
    BCD32 = "bcd32"
    STRING = "string"  # ``count`` registers of ASCII, two characters per register

    @classmethod
    def of(cls, name: str) -> DataType | None:
        """The member named by a ``TagSpec.datatype`` string; None for one we do not know."""
        try:
            return cls(name)
        except ValueError:
            return None

    @property
    def is_integer(self) -> bool:
        """Whole numbers: the signed and unsigned integers and BCD."""
        return self in _INTEGER

    @property
    def is_numeric(self) -> bool:
        """A number: the integers and both floats (not bool, bit or string)."""
        return self in _INTEGER or self in _FLOAT


_INTEGER = frozenset(
    {DataType.INT16, DataType.UINT16, DataType.INT32, DataType.UINT32, DataType.INT64,
     DataType.UINT64, DataType.BCD16, DataType.BCD32}
)  # fmt: skip
_FLOAT = frozenset({DataType.FLOAT32, DataType.FLOAT64})


class Quality(enum.IntEnum):
    """Coarse quality, ordered so that ``max()`` of several gives the worst.

    The numbers are ours; the OPC UA sink maps them to StatusCodes together with the reason.
    """

    GOOD = 0
    UNCERTAIN = 1
    BAD = 2


class Reason(enum.StrEnum):
    """Why a value is not Good. ``NONE`` only ever goes with Good."""

    NONE = ""
    #: Bad: never read since start-up (OPC UA BadWaitingForInitialData).
    WAITING = "waiting_for_initial_data"
    #: Bad: the device cannot be reached or the connection broke.
    NO_COMMUNICATION = "no_communication"
    #: Bad: the device did not answer within the timeout.
    TIMEOUT = "timeout"
    #: Bad: bytes arrived but no valid reply (CRC/LRC error, noise, a collision on the line).
    BAD_FRAME = "bad_frame"
    #: Bad: the device answered with a protocol exception (detail names the code).
    DEVICE_EXCEPTION = "device_exception"
    #: Bad: the device answered, but the bytes do not decode as the configured type.
    DECODE_ERROR = "decode_error"
    #: Uncertain: decoded fine but outside the tag's expected min/max.
    OUT_OF_RANGE = "out_of_range"
    #: Uncertain: the value has not been refreshed for several of its intervals.
    STALE = "stale"


class RawSample(NamedTuple):
    """What a driver returns for one tag: a typed value before scaling, or why there is none.

    ``tag`` is the tag's position in the device's compiled tag list (``TagSpec.index``);
    drivers and the runner agree on it at compile time so that the hot path never looks tags
    up by name. A NamedTuple, not a frozen dataclass: 10,000 of these are made per second,
    and a frozen dataclass's ``__init__`` costs several times more.
    """

    tag: int
    value: Value | None
    raw: tuple[int, ...] = ()
    reason: Reason = Reason.NONE
    detail: str = ""


class Reading(NamedTuple):
    """One tag's normalised value with its quality and source timestamp.

    ``source_ts`` is the wall-clock time (epoch seconds) at which the value was read from the
    device. When a device goes silent the last value is kept with Bad quality and its
    original ``source_ts``: a consumer can always tell how old the number is. Immutable and
    cheap to make (a NamedTuple), because every poll makes one per tag.
    """

    key: TagKey
    value: Value | None
    quality: Quality
    source_ts: float
    reason: Reason = Reason.NONE
    detail: str = ""
    raw: tuple[int, ...] = ()

    @property
    def good(self) -> bool:
        return self.quality is Quality.GOOD


@dataclass(slots=True, frozen=True)
class WriteRule:
    """What a writable tag accepts, in engineering units (after scale and offset).

    A tag without one is read-only, whatever any client asks. A value must be in ``allowed``
    when that is given, else within ``minimum``..``maximum``; two writes to the tag are at
    least ``min_interval`` seconds apart.
    """

    minimum: float | None = None
    maximum: float | None = None
    allowed: tuple[Value, ...] = ()
    min_interval: float = 0.0


@dataclass(slots=True, frozen=True)
class TagSpec:
    """Everything the runtime and the sinks need to know about a tag, whatever its driver.

    Drivers compile their own config into a tuple of these; ``index`` is the position in it.
    """

    index: int
    machine: str
    device: str
    name: str
    datatype: str
    unit: str | None = None
    description: str = ""
    scale: float = 1.0
    offset: float = 0.0
    minimum: float | None = None
    maximum: float | None = None
    deadband: float | None = None
    interval: float = 1.0
    #: A human-readable origin, such as ``holding 40001`` or ``coil 12``, for tables and logs.
    source: str = ""
    #: None: read-only (the default for every tag).
    write: WriteRule | None = None
    #: ``"<machine>/<name>"``, computed once: it is looked up for every value of every poll.
    key: TagKey = field(init=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "key", f"{self.machine}/{self.name}")


@dataclass(slots=True, frozen=True)
class ReadGroup:
    """Tags of one device that are polled together on one interval."""

    interval: float
    indices: tuple[int, ...]

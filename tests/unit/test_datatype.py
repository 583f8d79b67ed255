"""gateway.model.DataType: the one place that says which tag types are numbers and integers,
used by the MQTT deadband, the write-type check and the write's raw conversion."""

from __future__ import annotations

import pytest

from drivers.modbus.config import DataType as ModbusDataType
from drivers.plugins import DATATYPES
from gateway.errors import WriteRefused
from gateway.model import DataType, TagSpec
from gateway.normalize import to_raw
from gateway.sinks.mqtt import _Tag
from gateway.writes import _check_type

INTEGERS = {"int16", "uint16", "int32", "uint32", "int64", "uint64", "bcd16", "bcd32"}
NUMBERS = INTEGERS | {"float32", "float64"}


def spec(datatype: str, **kw: object) -> TagSpec:
    return TagSpec(0, "m", "d", "t", datatype, **kw)  # type: ignore[arg-type]


def test_the_members_are_the_tag_types_every_driver_maps_onto() -> None:
    assert {d.value for d in DataType} == {d.value for d in ModbusDataType} == DATATYPES


def test_integer_and_numeric_are_the_sets_they_replace() -> None:
    # The three sets this replaced: normalize._INTEGER_TYPES, mqtt._NUMERIC and
    # writes._NUMBER_TYPES (the last two had the same members).
    assert {d.value for d in DataType if d.is_integer} == INTEGERS
    assert {d.value for d in DataType if d.is_numeric} == NUMBERS


def test_of_looks_a_string_up_and_knows_what_it_does_not_know() -> None:
    assert DataType.of("float32") is DataType.FLOAT32
    assert DataType.of("uint64") == "uint64"
    assert DataType.of("float") is None
    assert DataType.of("") is None


@pytest.mark.parametrize("datatype", [*sorted(DATATYPES), "float", "decimal"])
def test_deadband_write_check_and_raw_conversion_by_type(datatype: str) -> None:
    numeric = datatype in NUMBERS
    # MQTT: a deadband applies to numbers only.
    tag = _Tag(spec(datatype, deadband=0.5), "topic")
    assert tag.deadband == (0.5 if numeric else None)
    # Writes: numbers take a number; bool and bit take a bool; the rest is not writable.
    if numeric:
        assert _check_type(spec(datatype), 3) == 3
        with pytest.raises(WriteRefused):
            _check_type(spec(datatype), "3")
    elif datatype not in ("bool", "bit"):
        with pytest.raises(WriteRefused, match="not writable"):
            _check_type(spec(datatype), 3)
    # The raw value of a write: whole on integer types (else refused), as is otherwise.
    scaled = spec(datatype, scale=0.1)
    if datatype in ("bool", "bit", "string"):
        return
    if datatype in INTEGERS:
        assert to_raw(scaled, 1.5) == 15
        assert isinstance(to_raw(scaled, 1.5), int)
        with pytest.raises(ValueError, match="resolution"):
            to_raw(scaled, 1.55)
    else:
        assert to_raw(scaled, 1.55) == pytest.approx(15.5)

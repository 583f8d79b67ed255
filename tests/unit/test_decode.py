"""Register decoding and encoding: golden values from device manuals, and round-trip properties.

The golden values are written out as hex, never computed with ``struct``, so that a mistake
shared by the decoder and the test cannot cancel out.
"""

from __future__ import annotations

import math
import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st

from drivers.modbus.config import REGISTER_WIDTH, ByteOrder, DataType
from drivers.modbus.decode import buffers, compile_decoder, decode, encode, interpretations
from gateway.errors import DecodeError
from gateway.model import Value

ORDERS_32 = (ByteOrder.ABCD, ByteOrder.CDAB, ByteOrder.BADC, ByteOrder.DCBA)
ORDERS_64 = (ByteOrder.ABCDEFGH, ByteOrder.GHEFCDAB, ByteOrder.BADCFEHG, ByteOrder.HGFEDCBA)
#: Each 4-letter order and the 8-letter order with the same swaps.
SAME_SWAPS = list(zip(ORDERS_32, ORDERS_64, strict=True))

PRINTABLE = "".join(chr(c) for c in range(0x20, 0x7F))


# --- the buffer trick ------------------------------------------------------------------------


def test_buffers_pack_each_word_both_ways() -> None:
    be, le = buffers([0x1234, 0xABCD])
    assert be == b"\x12\x34\xab\xcd"
    assert le == b"\x34\x12\xcd\xab"


def test_buffers_reject_values_that_are_not_registers() -> None:
    with pytest.raises(ValueError, match=r"0\.\.65535"):
        buffers([0x10000])
    with pytest.raises(ValueError, match=r"0\.\.65535"):
        buffers([-1])


def test_buffers_of_nothing_are_empty() -> None:
    assert buffers([]) == (b"", b"")


# --- golden values ---------------------------------------------------------------------------

FLOAT32_123_456 = {
    ByteOrder.ABCD: [0x42F6, 0xE979],
    ByteOrder.CDAB: [0xE979, 0x42F6],
    ByteOrder.BADC: [0xF642, 0x79E9],
    ByteOrder.DCBA: [0x79E9, 0xF642],
}


@pytest.mark.parametrize(("order", "registers"), FLOAT32_123_456.items())
def test_float32_golden(order: ByteOrder, registers: list[int]) -> None:
    value = decode(DataType.FLOAT32, order, registers)
    assert isinstance(value, float)
    assert value == pytest.approx(123.456, abs=1e-5)
    assert encode(DataType.FLOAT32, order, 123.456) == registers


@pytest.mark.parametrize(
    ("order", "registers"),
    [
        (ByteOrder.ABCD, [0xFFFF, 0xFFFE]),
        (ByteOrder.CDAB, [0xFFFE, 0xFFFF]),
        (ByteOrder.BADC, [0xFFFF, 0xFEFF]),
        (ByteOrder.DCBA, [0xFEFF, 0xFFFF]),
    ],
)
def test_int32_minus_two_golden(order: ByteOrder, registers: list[int]) -> None:
    assert decode(DataType.INT32, order, registers) == -2
    assert decode(DataType.UINT32, order, registers) == 0xFFFFFFFE
    assert encode(DataType.INT32, order, -2) == registers


@pytest.mark.parametrize(
    ("order", "registers"),
    [
        (ByteOrder.ABCD, [0x0001, 0x0002]),
        (ByteOrder.CDAB, [0x0002, 0x0001]),
        (ByteOrder.BADC, [0x0100, 0x0200]),
        (ByteOrder.DCBA, [0x0200, 0x0100]),
    ],
)
def test_uint32_golden(order: ByteOrder, registers: list[int]) -> None:
    assert decode(DataType.UINT32, order, registers) == 0x0001_0002


UINT64_0102030405060708 = {
    ByteOrder.ABCDEFGH: [0x0102, 0x0304, 0x0506, 0x0708],
    ByteOrder.GHEFCDAB: [0x0708, 0x0506, 0x0304, 0x0102],
    ByteOrder.BADCFEHG: [0x0201, 0x0403, 0x0605, 0x0807],
    ByteOrder.HGFEDCBA: [0x0807, 0x0605, 0x0403, 0x0201],
}

# 123.456 as an IEEE 754 double is 0x405EDD2F1A9FBE77.
FLOAT64_123_456 = {
    ByteOrder.ABCDEFGH: [0x405E, 0xDD2F, 0x1A9F, 0xBE77],
    ByteOrder.GHEFCDAB: [0xBE77, 0x1A9F, 0xDD2F, 0x405E],
    ByteOrder.BADCFEHG: [0x5E40, 0x2FDD, 0x9F1A, 0x77BE],
    ByteOrder.HGFEDCBA: [0x77BE, 0x9F1A, 0x2FDD, 0x5E40],
}


@pytest.mark.parametrize(("order", "registers"), UINT64_0102030405060708.items())
def test_uint64_golden(order: ByteOrder, registers: list[int]) -> None:
    assert decode(DataType.UINT64, order, registers) == 0x0102030405060708
    assert decode(DataType.INT64, order, registers) == 0x0102030405060708
    assert encode(DataType.UINT64, order, 0x0102030405060708) == registers


@pytest.mark.parametrize(
    ("order", "registers"),
    [
        (ByteOrder.ABCDEFGH, [0xFFFF, 0xFFFF, 0xFFFF, 0xFFFE]),
        (ByteOrder.GHEFCDAB, [0xFFFE, 0xFFFF, 0xFFFF, 0xFFFF]),
        (ByteOrder.BADCFEHG, [0xFFFF, 0xFFFF, 0xFFFF, 0xFEFF]),
        (ByteOrder.HGFEDCBA, [0xFEFF, 0xFFFF, 0xFFFF, 0xFFFF]),
    ],
)
def test_int64_minus_two_golden(order: ByteOrder, registers: list[int]) -> None:
    assert decode(DataType.INT64, order, registers) == -2
    assert encode(DataType.INT64, order, -2) == registers


@pytest.mark.parametrize(("order", "registers"), FLOAT64_123_456.items())
def test_float64_golden(order: ByteOrder, registers: list[int]) -> None:
    assert decode(DataType.FLOAT64, order, registers) == 123.456
    assert encode(DataType.FLOAT64, order, 123.456) == registers


@pytest.mark.parametrize(("short", "long"), SAME_SWAPS)
def test_four_letter_order_on_64_bit_means_the_same_swaps(
    short: ByteOrder, long: ByteOrder
) -> None:
    registers = FLOAT64_123_456[long]
    assert decode(DataType.FLOAT64, short, registers) == 123.456
    assert decode(DataType.UINT64, short, UINT64_0102030405060708[long]) == 0x0102030405060708


@pytest.mark.parametrize(
    ("order", "registers", "expected"),
    [
        (ByteOrder.ABCD, [0xFFFE], -2),
        (ByteOrder.BADC, [0xFEFF], -2),
        (ByteOrder.ABCD, [0x8000], -32768),
        (ByteOrder.BADC, [0x0080], -32768),
        # A word swap means nothing on one register: CDAB reads like ABCD, DCBA like BADC.
        (ByteOrder.CDAB, [0xFFFE], -2),
        (ByteOrder.DCBA, [0xFEFF], -2),
    ],
)
def test_int16_golden(order: ByteOrder, registers: list[int], expected: int) -> None:
    assert decode(DataType.INT16, order, registers) == expected
    assert decode(DataType.UINT16, order, registers) == expected & 0xFFFF


def test_bcd16_golden() -> None:
    assert decode(DataType.BCD16, ByteOrder.ABCD, [0x1234]) == 1234
    assert decode(DataType.BCD16, ByteOrder.BADC, [0x3412]) == 1234
    assert decode(DataType.BCD16, ByteOrder.ABCD, [0x9999]) == 9999
    assert decode(DataType.BCD16, ByteOrder.ABCD, [0x0000]) == 0
    assert encode(DataType.BCD16, ByteOrder.ABCD, 1234) == [0x1234]


@pytest.mark.parametrize(
    ("order", "registers"),
    [
        (ByteOrder.ABCD, [0x1234, 0x5678]),
        (ByteOrder.CDAB, [0x5678, 0x1234]),
        (ByteOrder.BADC, [0x3412, 0x7856]),
        (ByteOrder.DCBA, [0x7856, 0x3412]),
    ],
)
def test_bcd32_golden(order: ByteOrder, registers: list[int]) -> None:
    assert decode(DataType.BCD32, order, registers) == 12345678
    assert encode(DataType.BCD32, order, 12345678) == registers


def test_bit_of_register_golden() -> None:
    assert decode(DataType.BIT, ByteOrder.ABCD, [0x0001], bit=0) is True
    assert decode(DataType.BIT, ByteOrder.ABCD, [0x8000], bit=15) is True
    assert decode(DataType.BIT, ByteOrder.ABCD, [0x7FFF], bit=15) is False
    # With the bytes swapped the register's low byte is the value's high byte.
    assert decode(DataType.BIT, ByteOrder.BADC, [0x0100], bit=0) is True
    assert decode(DataType.BIT, ByteOrder.BADC, [0x0001], bit=0) is False
    assert decode(DataType.BIT, ByteOrder.BADC, [0x0080], bit=15) is True
    assert decode(DataType.BIT, ByteOrder.BADC, [0x8000], bit=15) is False
    assert decode(DataType.BIT, ByteOrder.BADC, [0xFEFF], bit=0) is False


def test_bit_encode() -> None:
    assert encode(DataType.BIT, ByteOrder.ABCD, True, bit=0) == [1]
    assert encode(DataType.BIT, ByteOrder.ABCD, True, bit=15) == [1 << 15]
    assert encode(DataType.BIT, ByteOrder.ABCD, False, bit=7) == [0]
    assert encode(DataType.BIT, ByteOrder.BADC, True, bit=0) == [0x0100]
    assert encode(DataType.BIT, ByteOrder.BADC, True, bit=15) == [0x0080]


# "LATHE-3" is 4C 41 54 48 45 2D 33, padded with one NUL.
LATHE_3 = [0x4C41, 0x5448, 0x452D, 0x3300]
LATHE_3_SWAPPED = [0x414C, 0x4854, 0x2D45, 0x0033]


def test_string_golden() -> None:
    assert decode(DataType.STRING, ByteOrder.ABCD, LATHE_3) == "LATHE-3"
    assert decode(DataType.STRING, ByteOrder.BADC, LATHE_3_SWAPPED) == "LATHE-3"
    assert encode(DataType.STRING, ByteOrder.ABCD, "LATHE-3", count=4) == LATHE_3
    assert encode(DataType.STRING, ByteOrder.BADC, "LATHE-3", count=4) == LATHE_3_SWAPPED


def test_string_strips_trailing_nuls_and_spaces() -> None:
    assert decode(DataType.STRING, ByteOrder.ABCD, [0x4142, 0x2020, 0x0000]) == "AB"
    assert decode(DataType.STRING, ByteOrder.ABCD, [0x4142, 0x2000, 0x2000]) == "AB"
    assert decode(DataType.STRING, ByteOrder.ABCD, [0x0000, 0x0000]) == ""
    assert decode(DataType.STRING, ByteOrder.ABCD, [0x2041, 0x2042]) == " A B"


@pytest.mark.parametrize(
    "registers",
    [
        [0x4142, 0x0043],  # a NUL inside the text, not padding
        [0x4107, 0x4242],  # BEL
        [0x41FF, 0x0000],  # not ASCII
        [0x417F, 0x0000],  # DEL
    ],
)
def test_string_with_unprintable_bytes_is_a_decode_error(registers: list[int]) -> None:
    with pytest.raises(DecodeError, match="printable ASCII"):
        decode(DataType.STRING, ByteOrder.ABCD, registers)


@pytest.mark.parametrize(
    ("registers", "expected"),
    [
        ([0x7FC0, 0x0000], math.nan),
        ([0x7F80, 0x0000], math.inf),
        ([0xFF80, 0x0000], -math.inf),
    ],
)
def test_float32_nan_and_inf_are_returned_as_is(registers: list[int], expected: float) -> None:
    value = decode(DataType.FLOAT32, ByteOrder.ABCD, registers)
    assert isinstance(value, float)
    if math.isnan(expected):
        assert math.isnan(value)
    else:
        assert value == expected


def test_float64_nan_is_returned_as_is() -> None:
    value = decode(DataType.FLOAT64, ByteOrder.ABCD, [0x7FF8, 0, 0, 0])
    assert isinstance(value, float)
    assert math.isnan(value)


def test_negative_zero_survives() -> None:
    value = decode(DataType.FLOAT32, ByteOrder.ABCD, [0x8000, 0x0000])
    assert value == 0.0
    assert isinstance(value, float)
    assert math.copysign(1.0, value) == -1.0
    assert encode(DataType.FLOAT32, ByteOrder.ABCD, -0.0) == [0x8000, 0x0000]


# --- compiled decoders inside a larger block ---------------------------------------------------


def test_compiled_decoder_reads_at_a_register_offset() -> None:
    block = [
        0xDEAD,
        0xBEEF,
        0x1234,
        *FLOAT32_123_456[ByteOrder.CDAB],
        0x4C41,
        0x5448,
        0x0000,
        0xFFFF,
    ]
    be, le = buffers(block)
    as_float = compile_decoder(DataType.FLOAT32, ByteOrder.CDAB)
    as_text = compile_decoder(DataType.STRING, ByteOrder.ABCD, count=3)
    as_bcd = compile_decoder(DataType.BCD16)
    as_int = compile_decoder(DataType.INT16)
    assert as_float(be, le, 3) == pytest.approx(123.456, abs=1e-5)
    assert as_text(be, le, 5) == "LATH"
    assert as_bcd(be, le, 2) == 1234
    assert as_int(be, le, 8) == -1
    # The same closure serves every block it is handed; nothing is cached per block.
    be2, le2 = buffers([0, 0, 0, *FLOAT32_123_456[ByteOrder.CDAB][::-1]])
    assert as_float(be2, le2, 3) != as_float(be, le, 3)


@pytest.mark.parametrize(
    "type", [DataType.INT16, DataType.FLOAT32, DataType.FLOAT64, DataType.BCD32, DataType.BIT]
)
def test_reading_past_the_block_is_a_decode_error(type: DataType) -> None:
    be, le = buffers([0, 0, 0])
    decoder = compile_decoder(type, bit=0 if type is DataType.BIT else None)
    with pytest.raises(DecodeError, match="too short"):
        decoder(be, le, 3)


def test_string_past_the_block_is_a_decode_error() -> None:
    be, le = buffers([0x4142, 0x4344])
    with pytest.raises(DecodeError, match="too short"):
        compile_decoder(DataType.STRING, ByteOrder.BADC, count=2)(be, le, 1)


# --- errors ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("type", "order", "registers", "message"),
    [
        (DataType.BCD16, ByteOrder.ABCD, [0x12A4], "invalid BCD nibble in 0x12A4"),
        (DataType.BCD16, ByteOrder.ABCD, [0xF000], "invalid BCD nibble in 0xF000"),
        (DataType.BCD16, ByteOrder.BADC, [0x0A00], "invalid BCD nibble in 0x000A"),
        (DataType.BCD32, ByteOrder.ABCD, [0x1234, 0x567B], "invalid BCD nibble in 0x1234567B"),
        (DataType.BCD32, ByteOrder.CDAB, [0x567B, 0x1234], "invalid BCD nibble in 0x1234567B"),
    ],
)
def test_invalid_bcd_is_a_decode_error(
    type: DataType, order: ByteOrder, registers: list[int], message: str
) -> None:
    with pytest.raises(DecodeError, match=message):
        decode(type, order, registers)


@pytest.mark.parametrize(
    ("type", "value", "message"),
    [
        (DataType.INT16, 70000, "value 70000 does not fit int16"),
        (DataType.INT16, -32769, "does not fit int16"),
        (DataType.UINT16, -1, "does not fit uint16"),
        (DataType.UINT16, 65536, "does not fit uint16"),
        (DataType.INT32, 1 << 31, "does not fit int32"),
        (DataType.UINT32, 1 << 32, "does not fit uint32"),
        (DataType.INT64, -(1 << 63) - 1, "does not fit int64"),
        (DataType.UINT64, 1 << 64, "does not fit uint64"),
        (DataType.BCD16, 10000, "does not fit bcd16"),
        (DataType.BCD16, -1, "does not fit bcd16"),
        (DataType.BCD32, 100_000_000, "does not fit bcd32"),
        (DataType.FLOAT32, 1e40, "does not fit float32"),
        (DataType.FLOAT64, 10**400, "does not fit float64"),
    ],
)
def test_encode_out_of_range(type: DataType, value: int | float, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        encode(type, ByteOrder.ABCD, value)


@pytest.mark.parametrize(
    ("type", "value", "kwargs"),
    [
        (DataType.INT16, 1.5, {}),
        (DataType.INT16, 1.0, {}),
        (DataType.UINT32, True, {}),
        (DataType.BCD16, "12", {}),
        (DataType.FLOAT32, True, {}),
        (DataType.FLOAT32, "1.5", {}),
        (DataType.BIT, 1, {"bit": 0}),
        (DataType.STRING, 12, {"count": 2}),
    ],
)
def test_encode_refuses_values_of_the_wrong_kind(
    type: DataType, value: Value, kwargs: dict[str, int]
) -> None:
    with pytest.raises(TypeError, match="is not"):
        encode(type, ByteOrder.ABCD, value, **kwargs)


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("ABCDE", "does not fit 2 registers"),
        ("Grüße", "not printable ASCII"),
        ("A\x00B", "not printable ASCII"),
        ("tab\there", "not printable ASCII"),
    ],
)
def test_encode_refuses_bad_strings(value: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        encode(DataType.STRING, ByteOrder.ABCD, value, count=2)


def test_encode_float32_rounds_to_nearest() -> None:
    assert encode(DataType.FLOAT32, ByteOrder.ABCD, 0.1) == [0x3DCC, 0xCCCD]
    assert encode(DataType.FLOAT32, ByteOrder.ABCD, math.inf) == [0x7F80, 0x0000]
    assert encode(DataType.FLOAT64, ByteOrder.ABCD, 1) == [0x3FF0, 0, 0, 0]


@pytest.mark.parametrize(
    ("type", "kwargs", "message"),
    [
        (DataType.BIT, {}, "needs `bit`"),
        (DataType.BIT, {"bit": 16}, "outside 0..15"),
        (DataType.BIT, {"bit": -1}, "outside 0..15"),
        (DataType.STRING, {}, "needs `count`"),
        (DataType.STRING, {"count": 0}, "at least 1"),
        (DataType.BOOL, {}, "coil or discrete input"),
        (DataType.INT16, {"bit": 3}, "only applies to type bit"),
        (DataType.FLOAT32, {"count": 1}, "2 register"),
    ],
)
def test_compile_decoder_rejects_impossible_shapes(
    type: DataType, kwargs: dict[str, int], message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        compile_decoder(type, ByteOrder.ABCD, **kwargs)
    # encode validates the same way, so a write cannot do what a read refuses.
    with pytest.raises(ValueError, match=message):
        encode(type, ByteOrder.ABCD, 0, **kwargs)


def test_compile_decoder_accepts_the_fixed_width_as_count() -> None:
    be, le = buffers(FLOAT32_123_456[ByteOrder.ABCD])
    assert compile_decoder(DataType.FLOAT32, count=2)(be, le, 0) == pytest.approx(123.456, abs=1e-5)


def test_decode_needs_enough_registers() -> None:
    with pytest.raises(ValueError, match="needs 2 register"):
        decode(DataType.FLOAT32, ByteOrder.ABCD, [0x42F6])


# --- interpretations -------------------------------------------------------------------------


def test_interpretations_of_one_register() -> None:
    got = interpretations([0x1234])
    assert got == {
        "int16": 0x1234,
        "uint16": 0x1234,
        "int16 BA": 0x3412,
        "uint16 BA": 0x3412,
        "bcd16": 1234,
        "ascii": ".4",
    }


def test_interpretations_of_two_registers() -> None:
    got = interpretations(FLOAT32_123_456[ByteOrder.CDAB])
    assert list(got) == [
        "int16",
        "uint16",
        "int16 BA",
        "uint16 BA",
        "bcd16",
        *(f"{t} {o}" for t in ("int32", "uint32", "float32") for o in ORDERS_32),
        *(f"bcd32 {o}" for o in ORDERS_32),
        "ascii",
    ]
    assert got["float32 CDAB"] == pytest.approx(123.456, abs=1e-5)
    assert got["bcd16"] == "invalid"
    assert got["int16"] == -(0x10000 - 0xE979)
    assert got["ascii"] == ".yB."


def test_interpretations_of_four_registers() -> None:
    got = interpretations([*FLOAT64_123_456[ByteOrder.GHEFCDAB]])
    for t in ("int64", "uint64", "float64"):
        for o in ORDERS_64:
            assert f"{t} {o}" in got
    assert got["float64 GHEFCDAB"] == 123.456
    assert got["bcd32 ABCD"] == "invalid"


def test_interpretations_of_bcd_and_text() -> None:
    got = interpretations([*LATHE_3[:2], 0x1234, 0x5678])
    assert got["ascii"] == "LATH.4Vx"
    assert got["int32 ABCD"] == 0x4C415448
    assert interpretations([0x1234, 0x5678])["bcd32 ABCD"] == 12345678
    assert interpretations([0x1234, 0x5678])["bcd32 CDAB"] == 56781234


def test_interpretations_of_nothing() -> None:
    assert interpretations([]) == {"ascii": ""}


# --- round-trip properties -------------------------------------------------------------------
# Each example is checked in every byte order: that covers every type x order on every run
# without paying the per-test fixture cost 8 times over.

INT_RANGES = {
    DataType.INT16: (-(2**15), 2**15 - 1),
    DataType.UINT16: (0, 2**16 - 1),
    DataType.INT32: (-(2**31), 2**31 - 1),
    DataType.UINT32: (0, 2**32 - 1),
    DataType.INT64: (-(2**63), 2**63 - 1),
    DataType.UINT64: (0, 2**64 - 1),
    DataType.BCD16: (0, 9999),
    DataType.BCD32: (0, 99_999_999),
}
PLAIN_INTS = [t for t in INT_RANGES if t not in (DataType.BCD16, DataType.BCD32)]


def same_float(a: Value, b: Value, code: str) -> bool:
    """Equal bit patterns (so -0.0 differs from 0.0); any NaN equals any NaN."""
    assert isinstance(a, float)
    assert isinstance(b, float)
    if math.isnan(a) or math.isnan(b):
        return math.isnan(a) and math.isnan(b)
    return struct.pack(">" + code, a) == struct.pack(">" + code, b)


@pytest.mark.parametrize("type", list(INT_RANGES))
@given(data=st.data())
def test_integers_round_trip(type: DataType, data: st.DataObject) -> None:
    low, high = INT_RANGES[type]
    value = data.draw(st.integers(low, high))
    for order in ByteOrder:
        registers = encode(type, order, value)
        assert len(registers) == REGISTER_WIDTH[type]
        assert all(0 <= r <= 0xFFFF for r in registers)
        assert decode(type, order, registers) == value, order


@pytest.mark.parametrize("type", PLAIN_INTS)
@given(data=st.data())
def test_any_registers_round_trip_through_integers(type: DataType, data: st.DataObject) -> None:
    width = REGISTER_WIDTH[type]
    registers = data.draw(st.lists(st.integers(0, 0xFFFF), min_size=width, max_size=width))
    for order in ByteOrder:
        assert encode(type, order, decode(type, order, registers)) == registers, order


@given(value=st.floats(width=32))
def test_float32_round_trips(value: float) -> None:
    for order in ByteOrder:
        registers = encode(DataType.FLOAT32, order, value)
        assert same_float(decode(DataType.FLOAT32, order, registers), value, "f"), order


@given(value=st.floats())
def test_float64_round_trips(value: float) -> None:
    for order in ByteOrder:
        registers = encode(DataType.FLOAT64, order, value)
        assert same_float(decode(DataType.FLOAT64, order, registers), value, "d"), order


@given(bit=st.integers(0, 15), value=st.booleans())
def test_bits_round_trip(bit: int, value: bool) -> None:
    for order in ByteOrder:
        registers = encode(DataType.BIT, order, value, bit=bit)
        assert decode(DataType.BIT, order, registers, bit=bit) is value, order


@given(data=st.data())
def test_strings_round_trip(data: st.DataObject) -> None:
    count = data.draw(st.integers(1, 10))
    value = data.draw(st.text(PRINTABLE, max_size=2 * count))
    for order in ByteOrder:
        registers = encode(DataType.STRING, order, value, count=count)
        assert len(registers) == count
        # Trailing spaces cannot be told from padding, so they do not come back.
        assert decode(DataType.STRING, order, registers) == value.rstrip(" "), order


@given(value=st.integers(0, 0xFFFF))
def test_bcd16_decodes_iff_every_nibble_is_a_digit(value: int) -> None:
    valid = all(int(c, 16) <= 9 for c in f"{value:04x}")
    for order in ByteOrder:
        registers = encode(DataType.UINT16, order, value)
        if valid:
            assert decode(DataType.BCD16, order, registers) == int(f"{value:x}")
        else:
            with pytest.raises(DecodeError):
                decode(DataType.BCD16, order, registers)


VALUES_BY_TYPE: dict[DataType, st.SearchStrategy[Value]] = {
    **{t: st.integers(low, high) for t, (low, high) in INT_RANGES.items()},
    DataType.FLOAT32: st.floats(width=32, allow_nan=False),
    DataType.FLOAT64: st.floats(allow_nan=False),
}


@given(data=st.data())
def test_compiled_decoders_find_their_value_anywhere_in_a_block(data: st.DataObject) -> None:
    type = data.draw(st.sampled_from([*VALUES_BY_TYPE, DataType.BIT, DataType.STRING]))
    bit = data.draw(st.integers(0, 15)) if type is DataType.BIT else None
    count = data.draw(st.integers(1, 5)) if type is DataType.STRING else None
    if type is DataType.BIT:
        value: Value = data.draw(st.booleans())
    elif type is DataType.STRING:
        assert count is not None
        value = data.draw(st.text(PRINTABLE, max_size=2 * count)).rstrip(" ")
    else:
        value = data.draw(VALUES_BY_TYPE[type])
    before = data.draw(st.lists(st.integers(0, 0xFFFF), max_size=8))
    after = data.draw(st.lists(st.integers(0, 0xFFFF), max_size=8))
    for order in ByteOrder:
        registers = encode(type, order, value, bit=bit, count=count)
        be, le = buffers([*before, *registers, *after])
        got = compile_decoder(type, order, bit=bit, count=count)(be, le, len(before))
        if isinstance(value, float):
            assert same_float(got, value, "f" if type is DataType.FLOAT32 else "d"), order
        else:
            assert got == value, order


@pytest.mark.parametrize("order", [ByteOrder.ABCD, ByteOrder.BADC])
def test_bcd16_exhaustively(order: ByteOrder) -> None:
    be, le = buffers(range(0x10000))
    decoder = compile_decoder(DataType.BCD16, order)
    valid = 0
    for register in range(0x10000):
        value = register if order is ByteOrder.ABCD else ((register & 0xFF) << 8) | register >> 8
        text = f"{value:04x}"
        # try/except rather than pytest.raises: 55,536 invalid words, and this stays fast.
        try:
            got: Value = decoder(be, le, register)
        except DecodeError as exc:
            got = str(exc)
        if text.isdigit():
            valid += 1
            assert got == int(text)
        else:
            assert got == f"invalid BCD nibble in 0x{value:04X}"
    assert valid == 10_000

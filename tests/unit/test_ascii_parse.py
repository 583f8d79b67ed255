"""Framing, checksums, escapes, parsing and config checks of the ASCII serial driver (pure)."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from drivers.ascii_serial.config import AsciiSerialDevice, check_device
from drivers.ascii_serial.framing import (
    MAX_FRAME,
    ChecksumFormat,
    ChecksumKind,
    Framer,
    append_checksum,
    checksum,
    decode_escapes,
    verify,
)
from drivers.ascii_serial.parse import FieldRef, FrameParser, NotAFrame, ValueType, convert

KINDS = [ChecksumKind.XOR, ChecksumKind.SUM, ChecksumKind.LRC]

# -- checksums -----------------------------------------------------------------------------


def test_adam_manual_example_sum_checksum() -> None:
    # ADAM-4000 manual: "$012" (read configuration of module 01) with checksum is "$012B7\r".
    assert append_checksum(ChecksumKind.SUM, ChecksumFormat.HEX, b"$012") == b"$012B7"


def test_known_values() -> None:
    assert checksum(ChecksumKind.XOR, b"\x01\x02\x04") == 0x07
    assert checksum(ChecksumKind.SUM, b"\xff\x02") == 0x01
    assert checksum(ChecksumKind.LRC, b"\x01\x02") == 0xFD
    assert append_checksum(ChecksumKind.XOR, ChecksumFormat.BINARY, b"AB") == b"AB\x03"
    assert append_checksum(ChecksumKind.NONE, ChecksumFormat.HEX, b"AB") == b"AB"


@given(st.binary(max_size=64))
def test_lrc_and_xor_cancel_to_zero(data: bytes) -> None:
    assert (sum(data) + checksum(ChecksumKind.LRC, data)) & 0xFF == 0
    assert checksum(ChecksumKind.XOR, data + bytes([checksum(ChecksumKind.XOR, data)])) == 0


@given(
    st.binary(max_size=64),
    st.sampled_from(KINDS),
    st.sampled_from(list(ChecksumFormat)),
    st.binary(max_size=2),
)
def test_verify_round_trip(
    data: bytes, kind: ChecksumKind, fmt: ChecksumFormat, pre: bytes
) -> None:
    framed = append_checksum(kind, fmt, pre + data)[len(pre) :]
    assert verify(kind, fmt, framed, prefix=pre) == data


@given(st.binary(min_size=1, max_size=32), st.sampled_from(KINDS), st.integers(0, 31))
def test_verify_catches_a_changed_byte(data: bytes, kind: ChecksumKind, at: int) -> None:
    framed = bytearray(append_checksum(kind, ChecksumFormat.BINARY, data))
    framed[at % len(data)] ^= 0x01
    assert verify(kind, ChecksumFormat.BINARY, bytes(framed)) is None


def test_verify_rejects_short_and_non_hex() -> None:
    assert verify(ChecksumKind.SUM, ChecksumFormat.HEX, b"A") is None
    assert verify(ChecksumKind.SUM, ChecksumFormat.HEX, b"ABzz") is None
    assert verify(ChecksumKind.SUM, ChecksumFormat.HEX, b"$012b7") == b"$012"  # lower case ok


# -- escapes -------------------------------------------------------------------------------


def test_escapes() -> None:
    assert decode_escapes(r"#01\r") == "#01\r"
    assert decode_escapes(r"a\x02b\n\t\\") == "a\x02b\n\t\\"
    assert decode_escapes("#01\r") == "#01\r"  # already resolved by YAML double quotes
    with pytest.raises(ValueError, match="unknown escape"):
        decode_escapes(r"\q")
    with pytest.raises(ValueError, match="bad escape"):
        decode_escapes(r"\xZZ")


# -- framing -------------------------------------------------------------------------------

LINES = st.lists(
    st.binary(min_size=1, max_size=20).filter(lambda b: b"\r" not in b and b"\n" not in b),
    max_size=10,
)


@given(LINES, st.lists(st.integers(1, 7), min_size=1, max_size=20))
def test_terminator_frames_survive_any_chunking(lines: list[bytes], cuts: list[int]) -> None:
    stream = b"".join(line + b"\r\n" for line in lines)
    framer = Framer(terminator=b"\r")
    got: list[bytes] = []
    i = 0
    k = 0
    while i < len(stream):
        n = cuts[k % len(cuts)]
        got += framer.feed(stream[i : i + n])
        i += n
        k += 1
    assert got == lines
    assert framer.garbage == 0


def test_start_end_discards_noise_and_interrupted_frames() -> None:
    framer = Framer(start=b">", end=b"\r")
    assert framer.feed(b"noise>+01.2") == []
    assert framer.garbage == 1
    # A new start before the end: the partial frame is thrown away, the new one kept.
    assert framer.feed(b"3>+05.678\r") == [b"+05.678"]
    assert framer.garbage == 2
    assert framer.feed(b"\n>1\r>2\r") == [b"1", b"2"]
    assert framer.garbage == 2


def test_fixed_length_with_sync() -> None:
    framer = Framer(terminator=None, start=b"\x02", length=4)
    assert framer.feed(b"xx\x02abc\x02de") == [b"abc"]
    assert framer.feed(b"f") == [b"def"]
    assert Framer(terminator=None, length=3).feed(b"abcdefg") == [b"abc", b"def"]


def test_overlong_buffer_is_dropped_and_counted() -> None:
    framer = Framer(terminator=b"\r")
    assert framer.feed(b"x" * (MAX_FRAME + 1)) == []
    assert framer.garbage == 1
    assert framer.pending == 0
    assert framer.feed(b"ok\r") == [b"ok"]


# -- parsing -------------------------------------------------------------------------------


def test_convert() -> None:
    assert convert("+0012.34", ValueType.FLOAT) == 12.34
    assert convert(" - 1.5", ValueType.FLOAT) == -1.5
    assert convert("+007", ValueType.INT) == 7
    assert convert("ON", ValueType.BOOL) is True
    assert convert("0", ValueType.BOOL) is False
    assert convert(" ST ", ValueType.STRING) == "ST"
    for text, kind in [("abc", ValueType.FLOAT), ("1.5", ValueType.INT), ("maybe", ValueType.BOOL)]:
        with pytest.raises(ValueError, match=repr(text)):
            convert(text, kind)


ADAM = r"(?P<ch0>[+-]\d+\.\d+)(?P<ch1>[+-]\d+\.\d+)(?P<ch2>[+-]\d+\.\d+)?"


def test_regex_parser() -> None:
    parser = FrameParser(
        [FieldRef(ValueType.FLOAT, group=g) for g in ("ch0", "ch1", "ch2")], regex=ADAM
    )
    assert parser.parse(b"+01.234-05.678+00.001") == [1.234, -5.678, 0.001]
    values = parser.parse(b"+01.234-05.678")
    assert values[:2] == [1.234, -5.678]
    assert isinstance(values[2], ValueError)
    assert "ch2" in str(values[2])
    for bad in (b"+01.234", b"\x00\xff", b"+01.234-05.678junk", b"a\x07b"):
        with pytest.raises(NotAFrame):
            parser.parse(bad)


def test_delimited_parser() -> None:
    parser = FrameParser(
        [FieldRef(ValueType.STRING, field=0), FieldRef(ValueType.FLOAT, field=2)], delimiter=","
    )
    assert parser.parse(b"ST,GS,+0012.34") == ["ST", 12.34]
    got = parser.parse(b"ST,GS,abc")
    assert got[0] == "ST"
    assert isinstance(got[1], ValueError)
    with pytest.raises(NotAFrame, match="2 field"):
        parser.parse(b"ST,GS")


# -- config --------------------------------------------------------------------------------


def device(**over: object) -> AsciiSerialDevice:
    base: dict[str, object] = {
        "driver": "ascii_serial",
        "name": "adam",
        "machine": "oven",
        "port": "/dev/ttyUSB0",
        "command": r"#01\r",
        "regex": ADAM,
        "tags": [{"name": "t0", "group": "ch0"}, {"name": "t1", "group": "ch1"}],
    }
    base.update(over)
    return AsciiSerialDevice.model_validate(base)


def test_good_config_has_no_issues() -> None:
    assert check_device(device()) == []
    assert device().wire(device().command) == b"#01\r"


def test_config_issues_are_located() -> None:
    issues = dict(
        check_device(
            device(
                regex=r"(?P<ch0>\d+)",
                command=r"#01\q",
                timeout=2.0,
                tags=[
                    {"name": "t0", "group": "ch0"},
                    {"name": "t0", "group": "nope"},
                    {"name": "t2", "field": 1},
                    {"name": "t3", "group": "ch0", "type": "bool", "min": 0},
                ],
            )
        )
    )
    assert "unknown escape" in issues[("command",)]
    # timeout < interval and unique names are the gateway-wide cross-check's job (once).
    assert ("timeout",) not in issues
    assert ("tags", 1, "name") not in issues
    assert "not in the regex (has: ch0)" in issues[("tags", 1, "group")]
    assert "needs `delimiter`" in issues[("tags", 2, "field")]
    assert "do not apply" in issues[("tags", 3, "min")]


def test_config_shape_issues() -> None:
    issues = dict(check_device(device(regex="(", mode="stream")))
    assert "does not compile" in issues[("regex",)]
    assert "stream mode sends nothing" in issues[("command",)]
    issues = dict(check_device(device(regex=None, command=None, start=">")))
    assert "exactly one" in issues[("regex",)]
    assert "needs `command`" in issues[("command",)]
    assert "needs `end`" in issues[("end",)]
    issues = dict(check_device(device(regex=None, delimiter=",")))
    assert "with `delimiter` every tag needs `field`" in issues[("tags", 0, "field")]


def test_model_is_strict() -> None:
    with pytest.raises(ValueError, match="extra"):
        device(bogus=1)
    with pytest.raises(ValueError, match="parity"):
        device(parity="X")

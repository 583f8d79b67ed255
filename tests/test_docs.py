"""docs/integrator-reference.md is generated from the config models: it must match them."""

from __future__ import annotations

from pathlib import Path

from drivers.modbus.config import ByteOrder, DataType
from drivers.modbus.decode import decode
from gateway import docs

ROOT = Path(__file__).resolve().parent.parent


def test_integrator_reference_is_up_to_date() -> None:
    expected = docs.render(docs.load_profiles(ROOT / "config" / "profiles"))
    committed = (ROOT / docs.OUTPUT).read_text(encoding="utf-8")
    assert committed == expected, (
        f"{docs.OUTPUT} is out of date with the config models or config/profiles/; "
        f"regenerate it with `{docs.COMMAND}` and commit the result"
    )


def test_every_key_is_documented() -> None:
    text = (ROOT / docs.OUTPUT).read_text(encoding="utf-8")
    for model in (docs.GatewayConfig, docs.ModbusTag, docs.ModbusRtuDevice, docs.AsciiSerialDevice):
        for key in model.model_fields:
            assert f"| `{key}` |" in text, f"{model.__name__}.{key} missing"
    for line in text.split("## Byte and word order")[0].splitlines():
        if line.startswith("| `") and "| key |" not in line:
            assert line.split("|")[4].strip() or "mapping" in line or "list of" in line, line


def test_byte_order_pictures_decode_to_the_example() -> None:
    """The pictures are the decoder's truth: 1450.0 is 0x44B54000 in float32."""
    rows = dict(docs.byte_order_rows(DataType.FLOAT32, list(ByteOrder)[:4], 1450.0))
    assert rows == {
        "ABCD": [0x44B5, 0x4000],
        "CDAB": [0x4000, 0x44B5],
        "BADC": [0xB544, 0x0040],
        "DCBA": [0x0040, 0xB544],
    }
    assert decode(DataType.FLOAT32, ByteOrder.CDAB, [0x4000, 0x44B5]) == 1450.0


def test_check_mode_reports_a_stale_file(tmp_path: Path) -> None:
    (tmp_path / "config").symlink_to(ROOT / "config")
    assert docs.main(["--check", "--root", str(tmp_path)]) == 1
    assert docs.main(["--root", str(tmp_path)]) == 0
    assert docs.main(["--check", "--root", str(tmp_path)]) == 0

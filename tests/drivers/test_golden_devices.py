"""Golden cases: a register image served by a real pymodbus server, our config, and the
readings the gateway must produce. One folder per device quirk or bug, named after it.

Set UPDATE_GOLDEN=1 to rewrite expected.jsonl (then read every changed line by hand).
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import pytest
import yaml

from drivers.modbus.config import Table
from drivers.modbus.simulator import RegisterMapDevice
from drivers.modbus.transport import RegisterServer
from gateway.app import Gateway
from gateway.config import LoadedConfig, load_config

CASES = Path(__file__).parent.parent / "golden" / "devices"


def device_from(path: Path) -> RegisterMapDevice:
    image = yaml.safe_load(path.read_text())
    device = RegisterMapDevice(unit_id=1)
    for table_name, blocks in image.items():
        table = Table(table_name)
        for address, values in blocks.items():
            device.serve(table, int(address), len(values))
            device.set(table, int(address), values)
    return device


def with_port(loaded: LoadedConfig, port: int) -> LoadedConfig:
    devices = [d.model_copy(update={"port": port}) for d in loaded.config.devices]
    return LoadedConfig(loaded.path, loaded.config.model_copy(update={"devices": devices}))


def render(value: object) -> object:
    if isinstance(value, float):
        return "nan" if math.isnan(value) else round(value, 9)
    return value


@pytest.mark.parametrize("case", sorted(p.name for p in CASES.iterdir() if p.is_dir()))
async def test_golden_device(case: str, port: int) -> None:
    folder = CASES / case
    loaded = with_port(load_config(folder / "gateway.yaml"), port)
    async with RegisterServer([device_from(folder / "registers.yaml")], port=port):
        gw = Gateway(loaded)
        results = await gw.poll_once()
    got = [
        {
            "tag": spec.key,
            "value": render(r.value),
            "quality": r.quality.name.lower(),
            "reason": r.reason.value,
            "detail": r.detail,
            "raw": list(r.raw),
        }
        for spec, r in results
    ]
    expected_file = folder / "expected.jsonl"
    if os.environ.get("UPDATE_GOLDEN"):
        expected_file.write_text("".join(json.dumps(g) + "\n" for g in got))
    expected = [json.loads(line) for line in expected_file.read_text().splitlines() if line]
    assert got == expected

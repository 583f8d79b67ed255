"""Device profiles: how a profile's keys and tags merge into a device, and where errors point."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest
import yaml

from drivers.modbus.config import ModbusTcpDevice
from gateway.config import builtin_profiles_dir, load_config
from gateway.errors import ConfigError, ConfigIssue

BUILTIN = builtin_profiles_dir()
assert BUILTIN is not None
SHIPPED = sorted(p.stem for p in BUILTIN.glob("*.yaml"))

HEAD = "gateway: {site: plant1, area: machining, line: line-a}\ndevices:\n"

LOCAL_PROFILE = """\
description: a test meter
source: {manual: Test Meter Modbus Map, version: "1.0", citation: table 3}
drivers: [modbus_tcp, modbus_rtu]
addressing: modicon
max_gap: 0
workarounds: {pause_between_requests: 0.01, max_registers_per_request: 20}
tags:
  - {name: volts, address: 30001, type: float32, unit: V}
  - {name: amps, address: 30003, type: float32, unit: A}
  - {name: hertz, address: 30005, type: float32, unit: Hz}
"""


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(textwrap.dedent(text), encoding="utf-8")
    return path


def device(name: str = "meter-1", unit_id: int = 1, extra: str = "") -> str:
    return (
        f"  - name: {name}\n"
        f"    driver: modbus_tcp\n"
        f"    machine: press-4\n"
        f"    host: 127.0.0.1\n"
        f"    unit_id: {unit_id}\n"
        f"    profile: test_meter\n" + extra
    )


def issues_of(path: Path) -> list[ConfigIssue]:
    with pytest.raises(ConfigError) as info:
        load_config(path)
    return info.value.issues


def line_of(path: Path, marker: str) -> int:
    return next(n for n, s in enumerate(path.read_text().splitlines(), 1) if marker in s)


@pytest.fixture
def profile(tmp_path: Path) -> Path:
    return write(tmp_path / "profiles" / "test_meter.yaml", LOCAL_PROFILE)


def test_profile_fills_keys_and_tags(tmp_path: Path, profile: Path) -> None:
    cfg = load_config(write(tmp_path / "gw.yaml", HEAD + device())).config
    dev = cfg.devices[0]
    assert isinstance(dev, ModbusTcpDevice)
    assert dev.profile == "test_meter"
    assert dev.addressing.value == "modicon"
    assert dev.max_gap == 0
    assert [t.name for t in dev.tags] == ["volts", "amps", "hertz"]
    assert dev.workarounds.max_registers_per_request == 20


def test_device_keys_override_and_mappings_merge_key_by_key(tmp_path: Path, profile: Path) -> None:
    extra = "    max_gap: 5\n    workarounds: {pause_between_requests: 0.2}\n"
    dev = load_config(write(tmp_path / "gw.yaml", HEAD + device(extra=extra))).config.devices[0]
    assert isinstance(dev, ModbusTcpDevice)
    assert dev.max_gap == 5
    assert dev.workarounds.pause_between_requests == 0.2
    assert dev.workarounds.max_registers_per_request == 20  # kept from the profile


def test_device_tag_replaces_profile_tag_of_same_name_and_adds_new(
    tmp_path: Path, profile: Path
) -> None:
    extra = (
        "    tags:\n"
        "      - {name: power, address: 30013, type: float32, unit: W}\n"
        "      - {name: amps, address: 30003, type: float32, scale: 0.001, unit: kA}\n"
    )
    dev = load_config(write(tmp_path / "gw.yaml", HEAD + device(extra=extra))).config.devices[0]
    # The override keeps the profile tag's place; new tags come after the profile's.
    assert [t.name for t in dev.tags] == ["volts", "amps", "hertz", "power"]
    amps = dev.tags[1]
    assert (amps.unit, amps.scale) == ("kA", 0.001)


def test_two_identical_devices_share_one_profile(tmp_path: Path, profile: Path) -> None:
    text = HEAD + device("meter-1", 1) + device("meter-2", 2).replace("press-4", "press-5")
    devices = load_config(write(tmp_path / "gw.yaml", text)).config.devices
    one, two = (d.model_dump(exclude={"name", "unit_id", "machine"}) for d in devices)
    assert one == two
    assert [d.name for d in devices] == ["meter-1", "meter-2"]


def test_error_in_a_profile_tag_points_at_the_profile_file(tmp_path: Path, profile: Path) -> None:
    profile.write_text(LOCAL_PROFILE.replace("type: float32, unit: A}", "type: floatt, unit: A}"))
    [typo] = issues_of(write(tmp_path / "gw.yaml", HEAD + device()))
    assert (typo.file, typo.line, typo.key) == (
        str(profile),
        line_of(profile, "floatt"),
        "devices[0].tags[1].type",
    )
    assert "did you mean 'float32'" in typo.message


def test_cross_check_error_in_a_profile_points_at_the_profile_file(
    tmp_path: Path, profile: Path
) -> None:
    # An input register written as a holding one: found by the Modbus cross-check.
    profile.write_text(LOCAL_PROFILE.replace("address: 30005", "address: 40005, table: input"))
    text = HEAD + device("meter-1", 1) + device("meter-2", 2).replace("press-4", "press-5")
    issues = issues_of(write(tmp_path / "gw.yaml", text))
    # Once per device that uses the profile, each with its own key path.
    assert [(i.file, i.line, i.key) for i in issues] == [
        (str(profile), line_of(profile, "40005"), "devices[0].tags[2].address"),
        (str(profile), line_of(profile, "40005"), "devices[1].tags[2].address"),
    ]
    assert "is in table holding, not input" in issues[0].message


def test_errors_of_device_tags_keep_their_own_lines(tmp_path: Path, profile: Path) -> None:
    extra = "    tags:\n      - {name: power, address: 30013, type: flaot32}\n"
    config = write(tmp_path / "gw.yaml", HEAD + device(extra=extra))
    issue = next(iter(issues_of(config)))
    assert (issue.file, issue.line, issue.key) == (
        str(config),
        line_of(config, "flaot32"),
        "devices[0].tags[3].type",
    )


def test_unknown_key_in_profile_points_at_profile(tmp_path: Path, profile: Path) -> None:
    profile.write_text(LOCAL_PROFILE.replace("max_gap: 0", "max_gapp: 0"))
    [issue] = issues_of(write(tmp_path / "gw.yaml", HEAD + device()))
    assert (issue.file, issue.line) == (str(profile), line_of(profile, "max_gapp"))
    assert "unknown key 'max_gapp'" in issue.message


def test_unknown_profile_lists_the_available_ones(tmp_path: Path, profile: Path) -> None:
    config = write(tmp_path / "gw.yaml", HEAD + device().replace("test_meter", "eastron_sdm360"))
    [issue] = issues_of(config)
    assert (issue.file, issue.line, issue.key) == (
        str(config),
        line_of(config, "profile:"),
        "devices[0].profile",
    )
    assert "unknown profile 'eastron_sdm360'" in issue.message
    assert "did you mean 'eastron_sdm630'" in issue.message
    for name in [*SHIPPED, "test_meter"]:
        assert name in issue.message


def test_profile_name_may_not_be_a_path(tmp_path: Path, profile: Path) -> None:
    config = write(tmp_path / "gw.yaml", HEAD + device().replace("test_meter", "../gw"))
    [issue] = issues_of(config)
    assert issue.line == line_of(config, "profile:")


def test_local_profile_shadows_builtin(tmp_path: Path) -> None:
    write(tmp_path / "profiles" / "eastron_sdm630.yaml", LOCAL_PROFILE)
    text = HEAD + device().replace("test_meter", "eastron_sdm630")
    dev = load_config(write(tmp_path / "gw.yaml", text)).config.devices[0]
    assert [t.name for t in dev.tags] == ["volts", "amps", "hertz"]


def test_profile_may_not_name_the_device(tmp_path: Path, profile: Path) -> None:
    profile.write_text(LOCAL_PROFILE + "machine: press-9\ndriver: modbus_tcp\n")
    issues = issues_of(write(tmp_path / "gw.yaml", HEAD + device()))
    assert [(i.file, i.line, i.key) for i in issues] == [
        (str(profile), line_of(profile, "machine:"), "machine"),
        (str(profile), line_of(profile, "driver: modbus_tcp"), "driver"),
    ]


def test_profile_for_another_driver(tmp_path: Path, profile: Path) -> None:
    config = write(
        tmp_path / "gw.yaml",
        HEAD + device().replace("test_meter", "adam_4017_ascii"),
    )
    issue = issues_of(config)[0]
    assert issue.line == line_of(config, "profile:")
    assert "is for driver ascii_serial, not modbus_tcp" in issue.message


def test_broken_profile_yaml_is_reported_once(tmp_path: Path, profile: Path) -> None:
    profile.write_text("tags:\n  - {name: a\n")
    text = HEAD + device("meter-1", 1) + device("meter-2", 2)
    issues = issues_of(write(tmp_path / "gw.yaml", text))
    assert len([i for i in issues if i.file == str(profile)]) == 1


# --- every shipped profile ---------------------------------------------------------------------


def shipped_device(name: str) -> str:
    meta = yaml.safe_load((BUILTIN / f"{name}.yaml").read_text(encoding="utf-8"))
    driver = meta["drivers"][0]
    where = {
        "modbus_tcp": "host: 127.0.0.1",
        "modbus_rtu_over_tcp": "host: 127.0.0.1",
        "modbus_rtu": "port: /dev/ttyUSB0",
        "ascii_serial": "port: /dev/ttyUSB0",
    }[driver]
    return f"  - {{name: dev-1, driver: {driver}, machine: m-1, {where}, profile: {name}}}\n"


@pytest.mark.parametrize("name", SHIPPED)
def test_shipped_profile_validates(tmp_path: Path, name: str) -> None:
    cfg = load_config(write(tmp_path / "gw.yaml", HEAD + shipped_device(name))).config
    assert cfg.devices[0].tags


@pytest.mark.parametrize("name", SHIPPED)
def test_shipped_profile_cites_its_source(name: str) -> None:
    meta = yaml.safe_load((BUILTIN / f"{name}.yaml").read_text(encoding="utf-8"))
    assert meta["description"].strip()
    assert {"manual", "version", "citation"} <= set(meta["source"])
    assert "http" not in str(meta["source"])
    assert meta["drivers"]


def test_shipped_profiles_are_the_five_of_the_issue() -> None:
    assert SHIPPED == [
        "adam_4017_ascii",
        "analog_in_8ch",
        "delta_vfd",
        "eastron_sdm630",
        "generic_pid_controller",
    ]


def test_ascii_device_uses_a_profile(tmp_path: Path) -> None:
    text = HEAD + (
        "  - {name: oven-ai, driver: ascii_serial, machine: oven, port: /dev/ttyUSB1,\n"
        "     profile: adam_4017_ascii, command: '#02\\r',\n"
        "     tags: [{name: ch0, group: ch0, scale: 100, unit: degC}]}\n"
    )
    dev = load_config(write(tmp_path / "gw.yaml", text)).config.devices[0]
    assert dev.driver == "ascii_serial"
    assert dev.command == "#02\\r"
    assert len(dev.tags) == 8
    assert (dev.tags[0].scale, dev.tags[0].unit) == (100, "degC")

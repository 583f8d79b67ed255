"""gateway.config: models, and a loader that reports every problem with file, line and key."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

from drivers.modbus.config import DataType, Table
from gateway.config import GatewayConfig, format_issues, json_schema, load_config
from gateway.errors import ConfigError, ConfigIssue

MINIMAL = """\
gateway: {site: plant1, area: machining, line: line-a}
devices:
  - name: lathe-3-plc
    driver: modbus_tcp
    machine: lathe-3
    host: 127.0.0.1
    port: 5020
    addressing: zero_based
    tags:
      - {name: spindle_speed, table: holding, address: 0, type: uint16, unit: rpm}
"""

DEVICE_HEAD = """\
gateway: {site: plant1, area: machining, line: line-a}
devices:
  - name: lathe-3-plc
    driver: modbus_tcp
    machine: lathe-3
    host: 127.0.0.1
    port: 5020
"""


def write(tmp_path: Path, text: str, name: str = "gateway.yaml") -> Path:
    path = tmp_path / name
    path.write_text(textwrap.dedent(text), encoding="utf-8")
    return path


def issues_of(path: Path) -> list[ConfigIssue]:
    with pytest.raises(ConfigError) as info:
        load_config(path)
    return info.value.issues


def line_of(path: Path, marker: str, nth: int = 1) -> int:
    """1-based line of the nth line containing ``marker``: keeps the tests readable."""
    hits = [n for n, s in enumerate(path.read_text().splitlines(), 1) if marker in s]
    return hits[nth - 1]


def only(issues: list[ConfigIssue]) -> ConfigIssue:
    assert len(issues) == 1, "\n".join(map(str, issues))
    return issues[0]


# --- valid configs ----------------------------------------------------------------------------


def test_minimal_config_loads_with_defaults(tmp_path: Path) -> None:
    path = write(tmp_path, MINIMAL)
    loaded = load_config(path)
    assert loaded.path == path
    cfg = loaded.config
    assert isinstance(cfg, GatewayConfig)
    assert cfg.version == 1
    assert cfg.gateway.name == "retrofit-gw"
    assert cfg.gateway.log_level == "info"
    assert cfg.bus.queue_size == 1000
    (device,) = cfg.devices
    assert device.driver == "modbus_tcp"
    assert device.port == 5020
    assert device.tags[0].type is DataType.UINT16
    assert device.tags[0].unit == "rpm"


def test_load_config_accepts_a_string_path(tmp_path: Path) -> None:
    path = write(tmp_path, MINIMAL)
    assert load_config(str(path)).path == path


def test_models_are_frozen_and_forbid_extra_keys(tmp_path: Path) -> None:
    cfg = load_config(write(tmp_path, MINIMAL)).config
    with pytest.raises(ValueError, match="frozen"):
        cfg.gateway.site = "elsewhere"  # type: ignore[misc]


def test_csv_tags_are_merged_after_yaml_tags(tmp_path: Path) -> None:
    write(
        tmp_path,
        """\
        # register map copied from the lathe manual
        name,table,address,type,unit,scale,description
        temperature,,30001,int16,degC,0.1,
        coil_far,,"012345",bool,,,
        # a comment between rows

        run_hours,,40010,uint32,h,,"hours, total"
        """,
        "lathe3.csv",
    )
    path = write(
        tmp_path,
        """\
        gateway: {site: plant1, area: machining, line: line-a}
        devices:
          - name: lathe-3-plc
            driver: modbus_tcp
            machine: lathe-3
            host: 127.0.0.1
            addressing: modicon
            tags_csv: lathe3.csv
            tags:
              - {name: spindle_speed, address: 40001}
        """,
    )
    device = load_config(path).config.devices[0]
    assert device.tags_csv == "lathe3.csv"
    assert [t.name for t in device.tags] == [
        "spindle_speed",
        "temperature",
        "coil_far",
        "run_hours",
    ]
    temperature, coil = device.tags[1], device.tags[2]
    assert temperature.address == 30001
    assert temperature.scale == pytest.approx(0.1)
    assert temperature.table is None  # empty cell: the default applies
    assert temperature.description == ""
    # A leading zero is a modicon coil reference: it must stay text.
    assert coil.address == "012345"
    assert coil.type is DataType.BOOL
    assert device.tags[3].description == "hours, total"


def test_csv_with_semicolons_as_excel_exports_in_comma_decimal_locales(tmp_path: Path) -> None:
    write(tmp_path, "name;table;address\nspeed;holding;7\n", "tags.csv")
    path = write(
        tmp_path,
        DEVICE_HEAD + "    addressing: zero_based\n    tags_csv: tags.csv\n",
    )
    tag = load_config(path).config.devices[0].tags[0]
    assert (tag.name, tag.table, tag.address) == ("speed", Table.HOLDING, 7)


def test_yaml_merge_keys_share_device_defaults(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        """\
        gateway: {site: plant1, area: machining, line: line-a}
        devices:
          - &lathe
            name: lathe-3-plc
            driver: modbus_tcp
            machine: lathe-3
            host: 10.0.0.3
            addressing: zero_based
            tags:
              - {name: speed, table: holding, address: 0}
          - <<: *lathe
            name: lathe-4-plc
            machine: lathe-4
            host: 10.0.0.4
        """,
    )
    first, second = load_config(path).config.devices
    assert (second.name, second.host, second.driver) == ("lathe-4-plc", "10.0.0.4", "modbus_tcp")
    assert second.tags == first.tags


def test_default_timeout_is_shorter_than_default_interval(tmp_path: Path) -> None:
    cfg = load_config(write(tmp_path, MINIMAL)).config
    assert cfg.devices[0].timeout < cfg.devices[0].interval


def test_timeout_equal_to_interval_is_refused(tmp_path: Path) -> None:
    path = write(tmp_path, MINIMAL.replace("port: 5020", "port: 5020\n    timeout: 1"))
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert err.value.issues[0].key == "devices[0].timeout"


def test_disabled_device_may_share_an_endpoint(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        MINIMAL
        + """\
  - name: lathe-3-spare
    driver: modbus_tcp
    machine: lathe-3b
    enabled: false
    host: 127.0.0.1
    port: 5020
    addressing: zero_based
    tags:
      - {name: spindle_speed, table: holding, address: 0}
""",
    )
    assert len(load_config(path).config.devices) == 2


# --- located validation errors ----------------------------------------------------------------


def test_wrong_enum_value_names_file_line_key_and_what_was_given(tmp_path: Path) -> None:
    path = write(tmp_path, MINIMAL.replace("type: uint16", "type: floatt"))
    issue = only(issues_of(path))
    assert issue.file == str(path)
    assert issue.line == line_of(path, "floatt")
    assert issue.key == "devices[0].tags[0].type"
    assert issue.message.startswith("Input should be 'bool', 'bit', 'int16'")
    assert "(got 'floatt')" in issue.message
    assert "did you mean 'float32' or 'float64'?" in issue.message


def test_unknown_key_suggests_the_close_match(tmp_path: Path) -> None:
    path = write(tmp_path, MINIMAL.replace("port: 5020", "portt: 5020"))
    issue = only(issues_of(path))
    assert issue.line == line_of(path, "portt")
    assert issue.key == "devices[0]"
    assert issue.message == "unknown key 'portt'; did you mean 'port'?"


def test_unknown_top_level_section_is_rejected(tmp_path: Path) -> None:
    path = write(tmp_path, MINIMAL + "influxdb: {host: db}\n")
    issue = only(issues_of(path))
    assert (issue.line, issue.key, issue.message) == (
        line_of(path, "influxdb:"),
        "",
        "unknown key 'influxdb'",
    )


def test_missing_key_points_at_the_mapping_and_lists_the_choices(tmp_path: Path) -> None:
    path = write(tmp_path, MINIMAL.replace("    addressing: zero_based\n", ""))
    issue = only(issues_of(path))
    assert issue.line == line_of(path, "- name: lathe-3-plc")
    assert issue.key == "devices[0]"
    assert issue.message == (
        "missing required key 'addressing' (one of: zero_based, one_based, modicon)"
    )


def test_unknown_driver_lists_the_known_ones(tmp_path: Path) -> None:
    path = write(tmp_path, MINIMAL.replace("driver: modbus_tcp", "driver: foo"))
    issue = only(issues_of(path))
    assert (issue.line, issue.key) == (line_of(path, "driver: foo"), "devices[0].driver")
    assert (
        issue.message
        == "driver 'foo' is not one of: modbus_tcp, modbus_rtu, modbus_rtu_over_tcp, ascii_serial"
    )


def test_missing_driver(tmp_path: Path) -> None:
    path = write(tmp_path, MINIMAL.replace("    driver: modbus_tcp\n", ""))
    issue = only(issues_of(path))
    assert (issue.key, issue.message) == (
        "devices[0]",
        "missing required key 'driver' "
        "(one of: modbus_tcp, modbus_rtu, modbus_rtu_over_tcp, ascii_serial)",
    )


def test_union_member_errors_become_one_issue(tmp_path: Path) -> None:
    path = write(tmp_path, MINIMAL.replace("address: 0,", "address: 1.5,"))
    issue = only(issues_of(path))
    assert issue.key == "devices[0].tags[0].address"
    assert issue.message == "expected a whole number or text (got 1.5)"


def test_duplicate_yaml_key_is_reported_with_the_first_line(tmp_path: Path) -> None:
    path = write(tmp_path, MINIMAL.replace("port: 5020\n", "port: 5020\n    port: 502\n"))
    issue = only(issues_of(path))
    first = line_of(path, "port: 5020")
    assert issue.line == line_of(path, "port: 502", nth=2)
    assert issue.message == f"duplicate key 'port' (first at line {first})"


def test_yaml_syntax_error_has_the_line_of_the_problem(tmp_path: Path) -> None:
    path = write(tmp_path, MINIMAL.replace("    host: 127.0.0.1", "    host: 127.0.0.1: 80"))
    issue = only(issues_of(path))
    assert issue.line == line_of(path, "127.0.0.1: 80")
    assert issue.message.startswith("YAML syntax error: mapping values are not allowed here")


def test_tab_indentation_gets_a_hint(tmp_path: Path) -> None:
    path = write(tmp_path, "gateway:\n  site: a\n\tarea: b\n")
    issue = only(issues_of(path))
    assert issue.line == 3
    assert issue.message.endswith("indent with spaces, not tabs")


def test_leading_zero_number_warns_about_octal(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        MINIMAL.replace("zero_based", "modicon").replace(
            "table: holding, address: 0, type: uint16", "address: 012345, type: bool"
        ),
    )
    issue = only(issues_of(path))
    assert issue.key == "devices[0].tags[0].address"
    assert issue.line == line_of(path, "012345")
    assert "octal number 5349" in issue.message
    assert '"012345"' in issue.message


def test_missing_config_file_is_one_issue_without_a_line(tmp_path: Path) -> None:
    issue = only(issues_of(tmp_path / "nope.yaml"))
    assert issue.line is None
    assert issue.file == str(tmp_path / "nope.yaml")
    assert "cannot read" in issue.message


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("", "the file is empty"),
        ("- a\n- b\n", "the top level must be a mapping"),
        ("gateway: {site: a, area: b, line: c}\ndevices: []\n", "at least one device"),
    ],
)
def test_unusable_top_level(tmp_path: Path, text: str, message: str) -> None:
    assert message in only(issues_of(write(tmp_path, text))).message


# --- cross-checks -----------------------------------------------------------------------------


def test_duplicate_tag_name_on_one_machine(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        MINIMAL + "      - {name: spindle_speed, table: holding, address: 1}\n",
    )
    issue = only(issues_of(path))
    assert issue.line == line_of(path, "address: 1}")
    assert issue.key == "devices[0].tags[1].name"
    first = line_of(path, "address: 0,")
    assert issue.message == (
        f"tag 'lathe-3/spindle_speed' is already defined (first at line {first}); "
        "tag names must be unique per machine"
    )


def test_unit_id_clash_on_one_endpoint(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        MINIMAL
        + """\
  - name: lathe-3-io
    driver: modbus_tcp
    machine: lathe-3
    host: 127.0.0.1
    port: 5020
    unit_id: 1
    addressing: zero_based
    tags:
      - {name: door_open, table: coil, address: 0, type: bool}
""",
    )
    issue = only(issues_of(path))
    assert issue.line == line_of(path, "unit_id: 1")
    assert issue.key == "devices[1].unit_id"
    assert "127.0.0.1:5020 unit_id 1, like device 'lathe-3-plc' (at line 3)" in issue.message


def test_timeout_longer_than_interval(tmp_path: Path) -> None:
    path = write(tmp_path, MINIMAL.replace("port: 5020", "port: 5020\n    timeout: 2"))
    issue = only(issues_of(path))
    assert (issue.line, issue.key) == (line_of(path, "timeout: 2"), "devices[0].timeout")
    assert issue.message.startswith("timeout 2 s must be shorter than the poll interval 1 s")


def test_tag_interval_shorter_than_timeout(tmp_path: Path) -> None:
    path = write(tmp_path, MINIMAL.replace("unit: rpm}", "unit: rpm, interval: 0.5}"))
    issue = only(issues_of(path))
    assert issue.key == "devices[0].tags[0].interval"
    assert issue.message.startswith("interval 0.5 s must be longer than the device timeout 0.5 s")


def test_mqtt_wildcard_in_tag_name(tmp_path: Path) -> None:
    path = write(tmp_path, MINIMAL.replace("name: spindle_speed", "name: temp+1"))
    issue = only(issues_of(path))
    assert (issue.line, issue.key) == (line_of(path, "temp+1"), "devices[0].tags[0].name")
    assert issue.message == "tag name 'temp+1' may not contain '+' (MQTT wildcard)"


@pytest.mark.parametrize(
    ("site", "message"),
    [
        ("plant/1", "may not contain '/' (MQTT topic separator)"),
        ("plant#1", "may not contain '#' (MQTT wildcard)"),
        ("$SYS", "may not start with '$'"),
        ('"plant\\t1"', "may not contain control characters"),
    ],
)
def test_topic_names_are_checked(tmp_path: Path, site: str, message: str) -> None:
    path = write(tmp_path, MINIMAL.replace("site: plant1", f"site: {site}"))
    issue = only(issues_of(path))
    assert (issue.line, issue.key) == (1, "gateway.site")
    assert message in issue.message


def test_duplicate_device_name(tmp_path: Path) -> None:
    second = MINIMAL.split("devices:\n", 1)[1].replace("lathe-3\n", "lathe-4\n")
    second = second.replace("127.0.0.1", "127.0.0.2")
    path = write(tmp_path, MINIMAL + second)
    issue = only(issues_of(path))
    assert issue.key == "devices[1].name"
    assert issue.message == "device name 'lathe-3-plc' is already used (first at line 3)"


def test_device_without_tags(tmp_path: Path) -> None:
    path = write(tmp_path, DEVICE_HEAD + "    addressing: zero_based\n")
    issue = only(issues_of(path))
    assert issue.key == "devices[0].tags"
    assert issue.line == 3  # no `tags:` key, so the device's own line
    assert "has no tags" in issue.message


def test_modicon_address_in_the_wrong_table(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        DEVICE_HEAD
        + """\
    addressing: modicon
    tags:
      - {name: temperature, table: input, address: 40001}
""",
    )
    issue = only(issues_of(path))
    assert (issue.line, issue.key) == (line_of(path, "40001"), "devices[0].tags[0].address")
    assert issue.message == "modicon address 40001 is in table holding, not input"


def test_width_and_count_mismatch(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        MINIMAL.replace("type: uint16, unit: rpm", "type: float32, count: 1"),
    )
    issue = only(issues_of(path))
    assert (issue.line, issue.key) == (line_of(path, "float32"), "devices[0].tags[0].count")
    assert issue.message == "type float32 is 2 register(s) wide, not 1"


# --- CSV errors -------------------------------------------------------------------------------


def csv_device(tmp_path: Path, csv_text: str) -> Path:
    write(tmp_path, csv_text, "lathe3.csv")
    return write(tmp_path, DEVICE_HEAD + "    addressing: modicon\n    tags_csv: lathe3.csv\n")


def test_error_in_a_csv_row_points_at_the_csv_line(tmp_path: Path) -> None:
    path = csv_device(
        tmp_path,
        "# lathe 3\nname,address,type\nspeed,40001,uint16\ntemp,30001,floatt\n",
    )
    issue = only(issues_of(path))
    assert issue.file == str(tmp_path / "lathe3.csv")
    assert issue.line == 4
    assert issue.key == "devices[0].tags[1].type"
    assert "(got 'floatt')" in issue.message


def test_cross_check_error_in_a_csv_row(tmp_path: Path) -> None:
    path = csv_device(tmp_path, "name,table,address\nspeed,input,40001\n")
    issue = only(issues_of(path))
    assert (issue.file, issue.line) == (str(tmp_path / "lathe3.csv"), 2)
    assert issue.message == "modicon address 40001 is in table holding, not input"


def test_unknown_csv_column(tmp_path: Path) -> None:
    path = csv_device(tmp_path, "name,address,typ\nspeed,40001,uint16\n")
    issue = only(issues_of(path))
    assert (issue.file, issue.line, issue.key) == (
        str(tmp_path / "lathe3.csv"),
        1,
        "devices[0].tags_csv",
    )
    assert issue.message.startswith("unknown column 'typ' in the CSV header; did you mean 'type'?")


def test_csv_header_without_required_columns(tmp_path: Path) -> None:
    path = csv_device(tmp_path, "tag,address\nspeed,40001\n")
    messages = [i.message for i in issues_of(path)]
    assert messages[-1] == "the CSV header lacks the required column(s): 'name'"
    # No "has no tags" on top of the real problem.
    assert len(messages) == 2


def test_missing_csv_file_is_reported_at_the_tags_csv_key(tmp_path: Path) -> None:
    path = write(tmp_path, DEVICE_HEAD + "    addressing: modicon\n    tags_csv: nope.csv\n")
    issue = only(issues_of(path))
    assert (issue.file, issue.line, issue.key) == (
        str(path),
        line_of(path, "tags_csv"),
        "devices[0].tags_csv",
    )
    assert "cannot read" in issue.message
    assert "nope.csv" in issue.message


# --- reporting --------------------------------------------------------------------------------


def test_every_issue_is_reported_together_in_file_order(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        MINIMAL.replace("line: line-a}", "line: line-a, log_level: loud}")
        .replace("port: 5020", "portt: 5020")
        .replace("type: uint16", "type: floatt"),
    )
    issues = issues_of(path)
    assert [(i.line, i.key) for i in issues] == [
        (1, "gateway.log_level"),
        (7, "devices[0]"),
        (10, "devices[0].tags[0].type"),
    ]


def test_yaml_and_csv_and_cross_check_issues_are_reported_together(tmp_path: Path) -> None:
    write(tmp_path, "name,address,type\nspeed,40001,uint16,\nspeed,40002,uint16\n", "lathe3.csv")
    path = write(
        tmp_path,
        DEVICE_HEAD.replace("port: 5020", "port: 5020\n    port: 502")
        + "    addressing: modicon\n    tags_csv: lathe3.csv\n",
    )
    issues = issues_of(path)
    assert [(Path(i.file).name, i.line) for i in issues] == [
        ("gateway.yaml", 8),
        ("lathe3.csv", 3),
    ]


def test_format_issues_lists_each_issue_and_a_count(tmp_path: Path) -> None:
    path = write(tmp_path, MINIMAL.replace("type: uint16", "type: floatt"))
    with pytest.raises(ConfigError) as info:
        load_config(path)
    text = format_issues(info.value)
    assert text.splitlines()[0].startswith(f"{path}:10: devices[0].tags[0].type: Input should")
    assert text.splitlines()[-1] == "1 problem in the config"


def test_json_schema() -> None:
    schema = json_schema()
    assert isinstance(schema, dict)
    assert "devices" in schema["properties"]
    assert schema["title"] == "retrofit-gateway config"
    assert schema["$schema"].startswith("https://json-schema.org/")

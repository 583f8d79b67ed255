"""Driver plugins, found through the ``retrofit_gateway.drivers`` entry point group.

Each test installs real distributions into a directory of its own (a module and a
``<name>-0.1.dist-info`` with METADATA and entry_points.txt), so that
``importlib.metadata`` finds them as it finds any installed package. The gateway discovers
plugins once per process, so the CLI runs in a subprocess with that directory on
PYTHONPATH; the checks of what ``describe()`` returns run in this process on a fresh
``discover()`` that never touches the cached ``installed()``.
"""

from __future__ import annotations

import collections
import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Iterator, Mapping
from importlib.metadata import entry_points
from pathlib import Path
from types import TracebackType

import pytest

from drivers import plugins
from drivers.plugins import GROUP, DriverPlugin, discover
from gateway import docs

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = ROOT / "tests" / "data" / "tcp_value_plugin" / "tcp_value.py"
CLI = [sys.executable, "-m", "gateway"]
BUILTIN_NAMES = "modbus_tcp, modbus_rtu, modbus_rtu_over_tcp, ascii_serial"

CONFIG = """\
gateway: {{site: plant1, area: pressing, line: line-b}}
devices:
  - name: counter-box
    driver: {driver}
    machine: press-1
    host: 127.0.0.1
    port: {port}
    timeout: 0.2
    interval: 0.5
    tags:
      - {{name: count, type: int}}
      - {{name: temperature, unit: degC{extra}}}
"""

MODBUS_CONFIG = """\
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


def install(site: Path, dist: str, points: Mapping[str, str], modules: Mapping[str, str]) -> None:
    """A distribution as pip leaves it: its modules, and its metadata beside them."""
    site.mkdir(exist_ok=True)
    for name, source in modules.items():
        (site / f"{name}.py").write_text(source, encoding="utf-8")
    info = site / f"{dist}-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(
        f"Metadata-Version: 2.1\nName: {dist.replace('_', '-')}\nVersion: 0.1\n", encoding="utf-8"
    )
    lines = "".join(f"{name} = {value}\n" for name, value in points.items())
    (info / "entry_points.txt").write_text(f"[{GROUP}]\n{lines}", encoding="utf-8")


def install_example(site: Path) -> None:
    install(
        site,
        "tcp_value_plugin",
        {"tcp_value": "tcp_value:describe"},
        {"tcp_value": EXAMPLE.read_text(encoding="utf-8")},
    )


def cli(site: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*CLI, *args], env=env_with(site), capture_output=True, text=True, timeout=60, check=False
    )


def env_with(site: Path) -> dict[str, str]:
    path = [str(site), str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])]
    return {**os.environ, "PYTHONPATH": os.pathsep.join(path)}


def write_config(tmp_path: Path, driver: str = "tcp_value", port: int = 9, extra: str = "") -> Path:
    path = tmp_path / "gateway.yaml"
    path.write_text(CONFIG.format(driver=driver, port=port, extra=extra), encoding="utf-8")
    return path


class ValueServer:
    """Answers each line (a tag name) with that tag's value, on 127.0.0.1, one client at a time."""

    def __init__(self, values: Mapping[str, str]) -> None:
        self.values = dict(values)
        self.asked: collections.Counter[str] = collections.Counter()
        self._sock = socket.create_server(("127.0.0.1", 0))
        self._sock.settimeout(0.1)
        self.port: int = self._sock.getsockname()[1]
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, name="value-server")

    def __enter__(self) -> ValueServer:
        self._thread.start()
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        self._sock.close()
        assert not self._thread.is_alive()

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self._sock.accept()
            except TimeoutError:
                continue
            with conn:
                conn.settimeout(0.1)
                pending = b""
                while not self._stop.is_set():
                    try:
                        chunk = conn.recv(1024)
                    except TimeoutError:
                        continue
                    if not chunk:
                        break
                    pending += chunk
                    while b"\n" in pending:
                        line, pending = pending.split(b"\n", 1)
                        name = line.decode().strip()
                        self.asked[name] += 1
                        conn.sendall(f"{self.values.get(name, '?')}\n".encode())


# --- the CLI on a real installation ----------------------------------------------------------


def test_check_accepts_a_config_using_the_plugin(tmp_path: Path) -> None:
    site = tmp_path / "site"
    install_example(site)
    proc = cli(site, "check", str(write_config(tmp_path)))
    assert proc.returncode == 0, proc.stderr
    assert "OK: 1 device(s), 2 tag(s)" in proc.stdout
    assert "refused" not in proc.stderr


def test_schema_lists_the_plugin_driver(tmp_path: Path) -> None:
    site = tmp_path / "site"
    install_example(site)
    proc = cli(site, "schema")
    assert proc.returncode == 0, proc.stderr
    schema = json.loads(proc.stdout)
    items = schema["properties"]["devices"]["items"]
    mapping = items["discriminator"]["mapping"]
    assert set(mapping) == {*BUILTIN_NAMES.split(", "), "tcp_value"}
    device = schema["$defs"]["TcpValueDevice"]
    assert device["additionalProperties"] is False
    assert {"driver", "name", "machine", "host", "port", "tags"} <= set(device["properties"])
    assert schema["$defs"]["ValueTag"]["properties"]["type"]["enum"] == ["float", "int"]


def test_once_reads_the_plugin_device_over_tcp(tmp_path: Path) -> None:
    site = tmp_path / "site"
    install_example(site)
    with ValueServer({"count": "41", "temperature": "21.5"}) as server:
        config = write_config(tmp_path, port=server.port)
        proc = cli(site, "once", "--json", str(config))
    assert proc.returncode == 0, proc.stderr
    rows = {r["tag"]: r for r in map(json.loads, proc.stdout.splitlines())}
    assert rows["count"]["value"] == 41
    assert rows["count"]["quality"] == "good"
    assert rows["temperature"]["value"] == 21.5
    assert rows["temperature"]["unit"] == "degC"
    assert rows["temperature"]["machine"] == "press-1"
    assert server.asked == {"count": 1, "temperature": 1}


def test_run_polls_the_plugin_device(tmp_path: Path) -> None:
    site = tmp_path / "site"
    install_example(site)
    with ValueServer({"count": "7", "temperature": "19.25"}) as server:
        config = write_config(tmp_path, port=server.port)
        proc = subprocess.Popen(
            [*CLI, "run", str(config)],
            env=env_with(site),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        try:
            deadline = time.monotonic() + 30
            while server.asked["count"] < 3 and time.monotonic() < deadline:
                assert proc.poll() is None, proc.communicate(timeout=10)[0]
                time.sleep(0.1)
        finally:
            proc.send_signal(signal.SIGTERM)
            out, _ = proc.communicate(timeout=20)
    assert server.asked["count"] >= 3, out
    assert "press-1/count=7" in out
    assert "press-1/temperature=19.25" in out
    # gateway.service keeps the running config pickled for a reload that fails.
    assert "does not pickle" not in out


def test_the_plugin_model_locates_and_names_unknown_keys(tmp_path: Path) -> None:
    site = tmp_path / "site"
    install_example(site)
    config = write_config(tmp_path)
    config.write_text(config.read_text().replace("    host:", "    hots:"), encoding="utf-8")
    proc = cli(site, "check", str(config))
    assert proc.returncode == 2
    assert f"{config}:6: devices[0]: unknown key 'hots'; did you mean 'host'?" in proc.stderr
    assert f"{config}:3: devices[0]: missing required key 'host'" in proc.stderr


def test_the_plugin_cross_check_runs_with_the_line(tmp_path: Path) -> None:
    site = tmp_path / "site"
    install_example(site)
    config = write_config(tmp_path, extra=", min: 50, max: 10")
    proc = cli(site, "check", str(config))
    assert proc.returncode == 2
    assert f"{config}:12: devices[0].tags[1].min: min 50 is larger than max 10" in proc.stderr


def test_an_unknown_driver_lists_the_plugin_among_the_valid_values(tmp_path: Path) -> None:
    site = tmp_path / "site"
    install_example(site)
    proc = cli(site, "check", str(write_config(tmp_path, driver="tcp_valeu")))
    assert proc.returncode == 2
    assert (
        f"devices[0].driver: driver 'tcp_valeu' is not one of: {BUILTIN_NAMES}, tcp_value; "
        "did you mean 'tcp_value'?"
    ) in proc.stderr


CLASH = """\
from drivers.plugins import DriverPlugin


def describe() -> DriverPlugin:
    raise AssertionError("a plugin named like a built-in driver must not even be loaded")
"""


def test_a_plugin_named_like_a_builtin_driver_is_refused(tmp_path: Path) -> None:
    site = tmp_path / "site"
    install_example(site)
    install(site, "clash_plugin", {"modbus_tcp": "clash:describe"}, {"clash": CLASH})
    modbus = tmp_path / "modbus.yaml"
    modbus.write_text(MODBUS_CONFIG, encoding="utf-8")

    proc = cli(site, "check", str(modbus))
    assert proc.returncode == 2
    assert (
        f"{modbus}:4: devices[0].driver: driver 'modbus_tcp' is built in, and the plugin entry "
        "point modbus_tcp = clash:describe (from clash-plugin 0.1) claims the same name"
    ) in proc.stderr

    # A config that does not name it works, with a warning.
    proc = cli(site, "check", str(write_config(tmp_path)))
    assert proc.returncode == 0, proc.stderr
    assert (
        "driver plugin 'modbus_tcp' (modbus_tcp = clash:describe (from clash-plugin 0.1)) is "
        "refused: 'modbus_tcp' is a built-in driver; a plugin needs a name of its own; skipped"
    ) in proc.stderr


BROKEN = """\
import no_such_module_for_this_plugin  # noqa: F401
"""


def test_a_broken_plugin_is_reported_when_used_and_skipped_when_not(tmp_path: Path) -> None:
    site = tmp_path / "site"
    install_example(site)
    install(site, "broken_plugin", {"broken_proto": "broken_mod:describe"}, {"broken_mod": BROKEN})
    refused = (
        "driver plugin 'broken_proto' (broken_proto = broken_mod:describe (from broken-plugin "
        "0.1)) is refused: cannot import it: ModuleNotFoundError: No module named "
        "'no_such_module_for_this_plugin'"
    )

    used = write_config(tmp_path, driver="broken_proto")
    proc = cli(site, "check", str(used))
    assert proc.returncode == 2
    assert f"{used}:4: devices[0].driver: {refused}; fix or uninstall the plugin" in proc.stderr
    assert "Traceback" not in proc.stderr
    # Reported once, with the plugin's reason, not as an unknown driver too.
    assert "is not one of" not in proc.stderr

    proc = cli(site, "check", str(write_config(tmp_path)))
    assert proc.returncode == 0, proc.stderr
    assert f"{refused}; skipped" in proc.stderr

    proc = cli(site, "schema")
    assert proc.returncode == 0, proc.stderr
    assert "TcpValueDevice" in json.loads(proc.stdout)["$defs"]
    assert f"{refused}; skipped" in proc.stderr


# --- what describe() must return, checked in this process --------------------------------------


@pytest.fixture
def site(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """A directory on sys.path for this test's distributions; their modules are forgotten
    afterwards, so that another test can install a module of the same name."""
    path = tmp_path / "site"
    path.mkdir()
    monkeypatch.syspath_prepend(str(path))
    before = set(sys.modules)
    yield path
    for name in set(sys.modules) - before:
        if str(path) in str(getattr(sys.modules[name], "__file__", "") or ""):
            del sys.modules[name]


def discovered() -> plugins.Plugins:
    return discover(entry_points(group=GROUP))


def test_discover_loads_the_example_and_its_factory_builds_a_driver(site: Path) -> None:
    install_example(site)
    found = discovered()
    assert found.refused == {}
    plugin = found.loaded["tcp_value"]
    assert isinstance(plugin, DriverPlugin)
    device = plugin.model.model_validate(
        {"driver": "tcp_value", "name": "box", "machine": "m", "host": "h", "port": 1,
         "tags": [{"name": "count", "type": "int"}]}
    )  # fmt: skip
    driver = plugin.factory(device)
    assert driver.name == "box"
    assert [t.key for t in driver.tags] == ["m/count"]
    assert [g.indices for g in driver.groups] == [(0,)]


def _module(body: str) -> str:
    return (
        "from typing import Literal\n"
        "from pydantic import BaseModel, ConfigDict, Field\n"
        "from drivers.plugins import DriverPlugin, PluginDevice, PluginTag\n\n"
        + textwrap.dedent(body)
    )


BAD_PLUGINS = {
    "not callable": (
        "describe = 42\n",
        "bad_x:describe is a int, not a function",
    ),
    "raises": (
        "def describe():\n    raise RuntimeError('no licence key')\n",
        "bad_x:describe() raised RuntimeError: no licence key",
    ),
    "wrong type": (
        "def describe():\n    return {'name': 'proto_x'}\n",
        "bad_x:describe() returned a dict, not a drivers.plugins.DriverPlugin",
    ),
    "name mismatch": (
        """\
        class Dev(PluginDevice):
            driver: Literal["other"]

        def describe():
            return DriverPlugin("other", Dev, print)
        """,
        "describes driver 'other', but the entry point is named 'proto_x'",
    ),
    "not a PluginDevice": (
        """\
        class Dev(BaseModel):
            driver: Literal["proto_x"]

        def describe():
            return DriverPlugin("proto_x", Dev, print)
        """,
        "is not a subclass of drivers.plugins.PluginDevice",
    ),
    "driver not a Literal": (
        """\
        class Dev(PluginDevice):
            pass

        def describe():
            return DriverPlugin("proto_x", Dev, print)
        """,
        'Dev.driver must be declared as Literal["proto_x"]',
    ),
    "other Literal": (
        """\
        class Dev(PluginDevice):
            driver: Literal["proto_x", "proto_y"]

        def describe():
            return DriverPlugin("proto_x", Dev, print)
        """,
        'Dev.driver must be declared as Literal["proto_x"]',
    ),
    "extra keys allowed": (
        """\
        class Dev(PluginDevice):
            model_config = ConfigDict(extra="allow")
            driver: Literal["proto_x"]

        def describe():
            return DriverPlugin("proto_x", Dev, print)
        """,
        'Dev must forbid unknown keys (model_config extra="forbid")',
    ),
    "tags not PluginTags": (
        """\
        class Tag(BaseModel):
            name: str

        class Dev(PluginDevice):
            driver: Literal["proto_x"]
            tags: list[Tag] = Field(default_factory=list)

        def describe():
            return DriverPlugin("proto_x", Dev, print)
        """,
        "Dev.tags must be a list of a PluginTag subclass",
    ),
    "factory not callable": (
        """\
        class Dev(PluginDevice):
            driver: Literal["proto_x"]

        def describe():
            return DriverPlugin("proto_x", Dev, "factory")
        """,
        "the DriverPlugin's factory is not callable",
    ),
}


@pytest.mark.parametrize("case", sorted(BAD_PLUGINS))
def test_discover_refuses_a_wrong_describe_with_the_reason(site: Path, case: str) -> None:
    body, reason = BAD_PLUGINS[case]
    install(site, "bad_plugin", {"proto_x": "bad_x:describe"}, {"bad_x": _module(body)})
    found = discovered()
    assert found.loaded == {}
    refused = found.refused["proto_x"]
    assert refused.origin == "proto_x = bad_x:describe (from bad-plugin 0.1)"
    assert reason in refused.reason
    assert str(refused).startswith("driver plugin 'proto_x' (proto_x = bad_x:describe (from ")


def test_discover_refuses_a_name_that_is_no_driver_value(site: Path) -> None:
    install_example(site)
    install(site, "odd_plugin", {"Tcp-Value": "tcp_value:describe"}, {})
    found = discovered()
    assert "lower-case letters, digits and _" in found.refused["Tcp-Value"].reason
    assert set(found.loaded) == {"tcp_value"}


def test_discover_refuses_a_name_two_distributions_claim(site: Path) -> None:
    install_example(site)
    install(site, "copy_plugin", {"tcp_value": "tcp_value:describe"}, {})
    found = discovered()
    assert found.loaded == {}
    refused = found.refused["tcp_value"]
    assert "claimed by several entry points" in refused.reason
    assert "tcp-value-plugin 0.1" in refused.origin
    assert "copy-plugin 0.1" in refused.origin


def test_a_factory_that_returns_no_driver_is_named(site: Path) -> None:
    body = """\
    class Dev(PluginDevice):
        driver: Literal["proto_x"]

    def describe():
        return DriverPlugin("proto_x", Dev, lambda device: object())
    """
    install(site, "lazy_plugin", {"proto_x": "lazy_x:describe"}, {"lazy_x": _module(body)})
    plugin = discovered().loaded["proto_x"]
    device = plugin.model.model_validate({"driver": "proto_x", "name": "d", "machine": "m"})
    with pytest.raises(TypeError, match="driver plugin 'proto_x': its factory returned object"):
        plugins._build(plugin, device)


def test_a_tag_of_an_unknown_datatype_is_named(site: Path) -> None:
    body = """\
    from drivers.plugins import DriverPlugin
    from gateway.model import ReadGroup, TagSpec
    import tcp_value

    class Odd(tcp_value.TcpValueDriver):
        def __init__(self, device):
            super().__init__(device)
            self.tags = (TagSpec(0, device.machine, device.name, "t", "decimal128"),)
            self.groups = (ReadGroup(1.0, (0,)),)

    def describe():
        return DriverPlugin("tcp_value", tcp_value.TcpValueDevice, Odd)
    """
    install(site, "odd_plugin", {"tcp_value": "odd_x:describe"}, {"odd_x": _module(body)})
    (site / "tcp_value.py").write_text(EXAMPLE.read_text(encoding="utf-8"), encoding="utf-8")
    plugin = discovered().loaded["tcp_value"]
    device = plugin.model.model_validate(
        {"driver": "tcp_value", "name": "d", "machine": "m", "host": "h", "port": 1}
    )
    with pytest.raises(TypeError, match="tag m/t has datatype 'decimal128'; the gateway knows"):
        plugins._build(plugin, device)


def test_the_documented_example_is_the_tested_one() -> None:
    source = EXAMPLE.read_text(encoding="utf-8")
    assert source.endswith(docs.PLUGIN_EXAMPLE)
    assert source.split('"""\n\n', 1)[1] == docs.PLUGIN_EXAMPLE
    reference = (ROOT / docs.OUTPUT).read_text(encoding="utf-8")
    assert f"```python\n{docs.PLUGIN_EXAMPLE}```" in reference


def test_builtin_factories_resolve_without_plugins() -> None:
    from drivers.modbus.driver import ModbusTcpDriver  # noqa: PLC0415

    assert plugins.factory("modbus_tcp") is ModbusTcpDriver
    with pytest.raises(KeyError, match="no driver 'nope'"):
        plugins.factory("nope")

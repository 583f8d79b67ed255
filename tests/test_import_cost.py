"""Start-up cost: what the CLI imports before it knows what it will do.

Imports are most of ``retrofit-gw``'s start-up on a Pi (about 5 times slower than on a PC, 10
times under qemu). ``gateway.cli`` imports each command's modules inside its handler, and
``gateway.app.build_sinks`` / ``drivers.plugins.factory`` import a sink or a driver only when
the config names it. Checked in a fresh interpreter each: a test process has imported
everything already.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DEMO = ROOT / "config" / "demo.yaml"

#: The sinks' and the demo's libraries, and the X.509 one: no command needs them all.
LIBRARIES = ("asyncua", "fastapi", "uvicorn", "starlette", "paho", "amqtt", "cryptography")


def imported_after(code: str) -> set[str]:
    """``sys.modules`` of a fresh interpreter after running ``code``."""
    out = subprocess.run(
        [sys.executable, "-c", f"{code}\nimport json, sys; print(json.dumps(sorted(sys.modules)))"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    ).stdout
    return set(json.loads(out.splitlines()[-1]))


def under(modules: set[str], *packages: str) -> list[str]:
    return sorted(m for m in modules if m.split(".")[0] in packages or m in packages)


def test_importing_the_cli_imports_no_command_s_modules() -> None:
    """What ``--version`` and ``--help`` pay: no library, no config models (pydantic, PyYAML:
    a third of the CLI's import time), no simulator, no certificates."""
    modules = imported_after("import gateway.cli")
    assert under(modules, *LIBRARIES, "pymodbus", "pydantic", "yaml") == []
    ours = ("gateway.config", "gateway.app", "gateway.service", "gateway.certs")
    assert under(modules, *ours, "gateway.demo_broker", "drivers.modbus.simulator") == []


def test_version_prints_without_the_config_models() -> None:
    modules = imported_after(
        "import contextlib, io\n"
        "from gateway.cli import main\n"
        "with contextlib.suppress(SystemExit), contextlib.redirect_stdout(io.StringIO()):\n"
        "    main(['--version'])"
    )
    assert under(modules, *LIBRARIES, "pydantic", "yaml") == []


def test_check_builds_the_drivers_but_imports_no_sink_library() -> None:
    """``check`` of the demo config (OPC UA, MQTT and web sections): the Modbus driver yes,
    asyncua, fastapi, paho and cryptography no."""
    modules = imported_after(
        "import contextlib, io\n"
        "from gateway.cli import main\n"
        "with contextlib.redirect_stdout(io.StringIO()):\n"
        f"    assert main(['check', {str(DEMO)!r}]) == 0"
    )
    assert "drivers.modbus.driver" in modules
    assert under(modules, *LIBRARIES) == []


@pytest.mark.parametrize(
    ("sections", "wanted", "unwanted"),
    [
        ("mqtt", {"paho"}, ("asyncua", "fastapi", "uvicorn", "starlette", "cryptography")),
        ("web", {"fastapi", "uvicorn"}, ("asyncua", "paho", "cryptography")),
    ],
)
def test_build_sinks_imports_only_the_configured_sinks_libraries(
    tmp_path: Path, sections: str, wanted: set[str], unwanted: tuple[str, ...]
) -> None:
    """What ``run`` imports for a config without OPC UA: neither asyncua nor cryptography."""
    config = tmp_path / "gateway.yaml"
    config.write_text(
        f"gateway: {{name: gw, site: s, area: a, line: l, data_dir: {tmp_path / 'data'}}}\n"
        + {
            "mqtt": "mqtt: {host: 127.0.0.1, port: 1}\n",
            "web": "web: {host: 127.0.0.1, port: 1}\n",
        }[sections]
        + "devices:\n"
        "  - {name: d, driver: modbus_tcp, machine: m, host: 127.0.0.1, port: 1, unit_id: 1,\n"
        "     addressing: zero_based,\n"
        "     tags: [{name: t, table: holding, address: 0, type: uint16}]}\n"
    )
    modules = imported_after(
        "from gateway.app import Gateway, build_sinks\n"
        "from gateway.config import load_config\n"
        f"sinks = build_sinks(Gateway(load_config({str(config)!r})))\n"
        f"assert [s.name for s in sinks] == [{sections!r}], sinks"
    )
    assert wanted <= {m.split(".")[0] for m in modules}
    assert under(modules, *unwanted) == []

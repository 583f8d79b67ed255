"""The architecture's import rules, checked on the source so they cannot erode unnoticed.

- Each third-party protocol library is imported by exactly one module of ours (a façade).
- Drivers and sinks never import each other; they meet only in the runtime.
- The model imports nothing of ours.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("gateway", "drivers")

FACADES = {
    "pymodbus": {"drivers/modbus/transport.py"},
    "paho": {"gateway/sinks/mqtt.py"},
    "asyncua": {"gateway/sinks/opcua.py"},
    # X.509 (our certificate, the trust folders) for the OPC UA sink, the CLI and the page.
    "cryptography": {"gateway/certs.py"},
    "fastapi": {"gateway/sinks/web.py"},
    "uvicorn": {"gateway/sinks/web.py"},
    "starlette": {"gateway/sinks/web.py"},
    "serial": {"drivers/ascii_serial/transport.py"},
    "serial_asyncio_fast": {"drivers/ascii_serial/transport.py"},
    "amqtt": {"gateway/demo_broker.py"},
    # protoc's output imports the protobuf runtime; only the Sparkplug façade imports that output.
    "google.protobuf": {"gateway/sparkplug/sparkplug_b_pb2.py"},
    "gateway.sparkplug.sparkplug_b_pb2": {"gateway/sparkplug/payload.py"},
}


def imports_of(path: Path) -> set[str]:
    """Every module name the file imports (absolute imports only).

    ``from a.b import c`` counts as ``a.b`` and ``a.b.c``: ``c`` may be a module.
    """
    tree = ast.parse(path.read_text(), filename=str(path))
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return names


def our_modules() -> dict[str, set[str]]:
    return {
        str(path.relative_to(ROOT)): imports_of(path)
        for package in PACKAGES
        for path in sorted((ROOT / package).rglob("*.py"))
    }


@pytest.mark.parametrize("library", sorted(FACADES))
def test_each_protocol_library_has_exactly_one_facade(library: str) -> None:
    importers = {
        module
        for module, names in our_modules().items()
        if any(n == library or n.startswith(library + ".") for n in names)
    }
    assert importers == FACADES[library]


def test_drivers_and_sinks_never_import_each_other() -> None:
    for module, names in our_modules().items():
        if module.startswith("drivers/"):
            assert not [n for n in names if n.startswith("gateway.sinks")], module
        if module.startswith("gateway/sinks/"):
            assert not [n for n in names if n.startswith("drivers")], module


def test_the_model_imports_nothing_of_ours() -> None:
    names = imports_of(ROOT / "gateway" / "model.py")
    assert not [n for n in names if n.split(".")[0] in PACKAGES]

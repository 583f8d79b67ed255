"""The CLI as a technician uses it: real processes, real simulator, real exit codes."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from gateway.cli import main
from tests.conftest import free_port

ROOT = Path(__file__).resolve().parent.parent
DEMO = ROOT / "config" / "demo.yaml"
CLI = [sys.executable, "-m", "gateway"]


def wait_for_port(port: int, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.2):
            return
        time.sleep(0.05)
    raise TimeoutError(f"nothing listens on 127.0.0.1:{port}")


@contextlib.contextmanager
def simulator(port: int) -> Iterator[subprocess.Popen[str]]:
    proc = subprocess.Popen(
        [*CLI, "simulate", "--port", str(port)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        wait_for_port(port)
        wait_for_port(port + 1)
        yield proc
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.communicate(timeout=10)


def demo_config_on(tmp_path: Path, port: int) -> Path:
    text = DEMO.read_text()
    assert "port: 5020" in text
    assert "port: 5021" in text
    text = text.replace("port: 5020", f"port: {port}").replace("port: 5021", f"port: {port + 1}")
    path = tmp_path / "demo.yaml"
    path.write_text(text)
    return path


def test_check_accepts_the_example_config(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["check", str(DEMO)]) == 0
    out = capsys.readouterr().out
    assert "OK" in out
    assert "requests" in out  # the read plan is printed


def test_check_exits_2_with_file_line_and_key(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text(
        "gateway: {site: s, area: a, line: l}\n"
        "devices:\n"
        "  - name: d\n"
        "    driver: modbus_tcp\n"
        "    machine: m\n"
        "    host: 127.0.0.1\n"
        "    addressing: zero_based\n"
        "    tags:\n"
        "      - {name: t, table: holding, address: 0, type: floatt}\n"
        "      - {name: t1, table: holding, adress: 2}\n"
    )
    good = tmp_path / "good.yaml"
    good.write_text(DEMO.read_text())
    # The first bad file stops the check, and every error in it is listed.
    assert main(["check", str(bad), str(good)]) == 2
    err = capsys.readouterr().err
    assert f"{bad}:9: devices[0].tags[0].type:" in err
    assert "floatt" in err
    assert f"{bad}:10: devices[0].tags[1]: unknown key 'adress'; did you mean 'address'?" in err
    assert "nothing was started" in err


def test_run_with_bad_config_exits_2_before_starting(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("gateway: {site: s, area: a, line: l}\ndevices: []\nbogus: 1\n")
    proc = subprocess.run(
        [*CLI, "run", str(bad)], capture_output=True, text=True, timeout=30, check=False
    )
    assert proc.returncode == 2
    assert "bad.yaml:3" in proc.stderr
    assert "bogus" in proc.stderr


def test_schema_is_json_schema(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["schema"]) == 0
    schema = json.loads(capsys.readouterr().out)
    assert "devices" in schema["properties"]
    assert schema["$schema"].startswith("https://json-schema.org/")


def test_once_prints_the_table_from_the_simulator(tmp_path: Path) -> None:
    port = free_port()
    config = demo_config_on(tmp_path, port)
    with simulator(port):
        proc = subprocess.run(
            [*CLI, "once", str(config)], capture_output=True, text=True, timeout=60, check=False
        )
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[0].split()[:6] == ["MACHINE", "TAG", "VALUE", "UNIT", "QUALITY", "RAW"]
    rows = [line.split() for line in lines[2:]]
    tags = {(r[0], r[1]) for r in rows}
    assert ("lathe-1", "spindle_speed") in tags
    assert ("mill-1", "spindle_speed") in tags
    # Every demo tag reads Good against the simulator it was written for. Columns are found
    # from the header, because raw hex such as "bad5" may contain the word "bad".
    start = lines[0].index("QUALITY")
    qualities = {line[start:].split()[0] for line in lines[2:]}
    assert qualities == {"good"}


def test_once_json_and_exit_1_when_a_device_is_down(tmp_path: Path) -> None:
    port = free_port()
    config = demo_config_on(tmp_path, port)
    # Only the lathe's port is served: the mill is down.
    proc_sim = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import asyncio,sys\n"
            "from drivers.modbus.simulator import Lathe\n"
            "from drivers.modbus.transport import RegisterServer\n"
            "async def m():\n"
            f"    async with RegisterServer([Lathe(unit_id=1)], port={port}):\n"
            "        print('ready', flush=True); await asyncio.sleep(60)\n"
            "asyncio.run(m())\n",
        ],
        stdout=subprocess.PIPE,
        text=True,
        cwd=ROOT,
    )
    try:
        assert proc_sim.stdout is not None
        assert proc_sim.stdout.readline().strip() == "ready"
        proc = subprocess.run(
            [*CLI, "once", "--json", str(config)],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
    finally:
        proc_sim.kill()
        proc_sim.communicate(timeout=10)
    assert proc.returncode == 1
    rows = [json.loads(line) for line in proc.stdout.splitlines()]
    lathe = [r for r in rows if r["machine"] == "lathe-1"]
    mill = [r for r in rows if r["machine"] == "mill-1"]
    assert lathe
    assert all(r["quality"] == "good" for r in lathe)
    assert mill
    assert all(r["quality"] == "bad" and r["value"] is None for r in mill)
    assert {r["reason"] for r in mill} <= {"no_communication", "timeout"}


def test_demo_starts_polls_and_stops_cleanly_on_sigterm(tmp_path: Path) -> None:
    ports = (5020, 5021, 1883, 4840, 8080)
    if not all(_port_free(p) for p in ports):
        pytest.skip(f"the demo's fixed ports {ports} are not all free on this machine")
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    # A file, not a pipe: an undrained pipe fills up and blocks the demo's event loop.
    log_file = (tmp_path / "demo.log").open("w")
    proc = subprocess.Popen(
        [*CLI, "demo"], stdout=log_file, stderr=subprocess.STDOUT, env=env, cwd=tmp_path
    )
    tags: list[dict[str, object]] = []
    try:
        wait_for_port(8080, timeout=60)
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            with urllib.request.urlopen("http://127.0.0.1:8080/api/tags", timeout=5) as resp:
                tags = json.load(resp)
            if tags and all(t["quality"] == "good" for t in tags):
                break
            time.sleep(0.5)
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=30)
        log_file.close()
    out = (tmp_path / "demo.log").read_text()
    assert proc.returncode == 0, out
    # Every demo tag is Good on the page's API; the banner said where to look.
    assert {t["machine"] for t in tags} == {"lathe-1", "mill-1"}
    assert all(t["quality"] == "good" for t in tags), [t for t in tags if t["quality"] != "good"]
    assert "http://127.0.0.1:8080/" in out
    assert "opc.tcp://127.0.0.1:4840" in out
    assert "mosquitto_sub -h 127.0.0.1 -p 1883 -t 'uns/demo-plant/machining/line-1/#' -v" in out
    assert "plan lathe-1-cnc" in out
    assert "gateway stopped" in out
    # The demo's state (OPC UA certificate) went to the working directory, not config/.
    assert (tmp_path / "retrofit-demo-data").is_dir()


def _port_free(port: int) -> bool:
    with socket.socket() as s:
        # As the servers do: a port in TIME_WAIT after the last test is free for them.
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True

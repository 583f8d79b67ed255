"""deploy/: the systemd unit verifies, install.sh installs, upgrades and rolls back, the wheelhouse
installs offline. Everything lands in tmp dirs: install.sh gets --prefix/--etc/--var/--unit-dir,
--user root --no-create-user, and no systemd runs here, so nothing outside them is touched."""

from __future__ import annotations

import functools
import os
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import free_port

REPO = Path(__file__).resolve().parent.parent
DEPLOY = REPO / "deploy"
UNIT = DEPLOY / "retrofit-gateway.service"
IN_CI = os.environ.get("CI") == "true"


def _systemd_analyze() -> str:
    exe = shutil.which("systemd-analyze")
    if exe is None:
        if IN_CI:
            pytest.fail("systemd-analyze missing on CI (tests/run.sh installs Debian's systemd)")
        pytest.skip("systemd-analyze not installed")
    return exe


def _verify(unit: Path) -> None:
    proc = subprocess.run(
        [_systemd_analyze(), "verify", str(unit)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    # verify prints warnings (unknown keys, bad values) but may still exit 0: none allowed.
    assert proc.stdout + proc.stderr == "", proc.stdout + proc.stderr


def _unit_settings(text: str) -> dict[str, list[str]]:
    settings: dict[str, list[str]] = {}
    for line in text.splitlines():
        if "=" in line and not line.startswith(("#", "[")):
            key, _, value = line.partition("=")
            settings.setdefault(key, []).append(value)
    return settings


def test_unit_verifies(tmp_path: Path) -> None:
    # verify wants ExecStart's program to exist: the same unit with a stub in its place.
    stub = tmp_path / "retrofit-gw"
    stub.write_text("#!/bin/sh\n")
    stub.chmod(0o755)
    text = UNIT.read_text()
    assert "/opt/retrofit-gateway/current/bin/retrofit-gw" in text
    unit = tmp_path / "retrofit-gateway.service"
    unit.write_text(text.replace("/opt/retrofit-gateway/current/bin/retrofit-gw", str(stub)))
    _verify(unit)


def test_unit_settings() -> None:
    s = _unit_settings(UNIT.read_text())
    expected = {
        "Type": "notify",
        "NotifyAccess": "main",
        "WatchdogSec": "30",
        "Restart": "on-failure",
        "RestartSec": "5",
        "ExecStart": "/opt/retrofit-gateway/current/bin/retrofit-gw run "
        "/etc/retrofit-gateway/gateway.yaml",
        "ExecReload": "/bin/kill -HUP $MAINPID",
        "User": "retrofit-gw",
        "Group": "retrofit-gw",
        "SupplementaryGroups": "dialout",
        "ProtectSystem": "strict",
        "ReadWritePaths": "/var/lib/retrofit-gateway",
        "StateDirectory": "retrofit-gateway",
        "NoNewPrivileges": "yes",
        "CapabilityBoundingSet": "",
        "AmbientCapabilities": "",
        "RestrictAddressFamilies": "AF_UNIX AF_INET AF_INET6",
        "MemoryDenyWriteExecute": "yes",
        "UMask": "0077",
        "DevicePolicy": "closed",
    }
    for key, value in expected.items():
        assert s.get(key) == [value], key
    assert "char-ttyUSB rw" in s["DeviceAllow"]
    assert "char-pts rw" in s["DeviceAllow"]  # pty bridges keep working under DevicePolicy


def test_install_dry_run_changes_nothing(tmp_path: Path) -> None:
    proc = subprocess.run(
        [
            "bash",
            str(DEPLOY / "install.sh"),
            "--dry-run",
            "--with-broker",
            *("--prefix", str(tmp_path / "opt"), "--etc", str(tmp_path / "etc")),
            *("--var", str(tmp_path / "var"), "--unit-dir", str(tmp_path / "units")),
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert list(tmp_path.iterdir()) == []
    out = proc.stdout
    assert "+ useradd --system" in out or "user retrofit-gw exists" in out
    assert "-m venv" in out
    assert "gateway.yaml" in out
    assert "listener on 127.0.0.1:1883" in out


def _install(tmp: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    cmd = [
        "bash",
        str(DEPLOY / "install.sh"),
        *extra,
        *("--prefix", str(tmp / "opt"), "--etc", str(tmp / "etc"), "--var", str(tmp / "var")),
        *("--unit-dir", str(tmp / "units"), "--user", "root", "--no-create-user"),
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc


@pytest.fixture
def simulator(tmp_path: Path) -> Iterator[int]:
    """The repo's simulated lathe on 127.0.0.1, from the test venv."""
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "gateway", "simulate", "--host", "127.0.0.1", "--port", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", port)) == 0:
                    break
            time.sleep(0.1)
        else:
            pytest.fail("simulator did not start")
        yield port
    finally:
        proc.terminate()
        proc.wait(timeout=10)


@pytest.mark.skipif(os.geteuid() != 0, reason="install.sh runs as root (chown)")
def test_install_upgrade_rollback(tmp_path: Path, simulator: int) -> None:
    t0 = time.monotonic()
    first = _install(tmp_path)
    assert "systemd is not running" in first.stdout
    opt, etc, var = tmp_path / "opt", tmp_path / "etc", tmp_path / "var"
    rel1 = (opt / "current").resolve()
    assert rel1.parent == opt / "releases"
    config = etc / "gateway.yaml"
    assert f"  data_dir: {var}\n" in config.read_text()
    assert oct(config.stat().st_mode & 0o777) == "0o640"
    assert oct(var.stat().st_mode & 0o777) == "0o700"
    # The installed unit points at the installed paths and still verifies.
    unit = tmp_path / "units" / "retrofit-gateway.service"
    assert f"ExecStart={opt}/current/bin/retrofit-gw run {config}" in unit.read_text()
    _verify(unit)

    gw = str(opt / "current" / "bin" / "retrofit-gw")
    # The installed example's device, pointed at the simulator (the only change).
    text = config.read_text()
    assert "host: 192.0.2.10" in text
    assert "port: 502\n" in text
    local = tmp_path / "local.yaml"
    local.write_text(
        text.replace("host: 192.0.2.10", "host: 127.0.0.1").replace(
            "port: 502\n", f"port: {simulator}\n"
        )
    )
    for args in (["check", str(config)], ["check", str(local)], ["once", str(local)]):
        proc = subprocess.run([gw, *args], capture_output=True, text=True, timeout=60, check=False)
        assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "spindle_speed" in proc.stdout

    # Upgrade: the config is kept as the technician left it, the first release stays.
    config.write_text(text + "# edited on the box\n")
    second = _install(tmp_path)
    assert "exists: kept as it is" in second.stdout
    assert config.read_text().endswith("# edited on the box\n")
    rel2 = (opt / "current").resolve()
    assert rel2 != rel1
    assert (opt / "previous").resolve() == rel1

    # Rollback swaps them.
    back = _install(tmp_path, "--rollback")
    assert "rolling back" in back.stdout
    assert (opt / "current").resolve() == rel1
    assert (opt / "previous").resolve() == rel2
    print(f"install, upgrade, rollback: {time.monotonic() - t0:.1f} s")


@pytest.mark.slow  # about 65 s: pip download of ~30 wheels, then an install
@pytest.mark.skipif(os.geteuid() != 0, reason="install.sh runs as root (chown)")
def test_wheelhouse_installs_offline(tmp_path: Path) -> None:
    """make-wheelhouse.sh for this machine's arch, then install.sh from it with --no-index."""
    arch = os.uname().machine
    if arch not in {"x86_64", "aarch64", "armv7l"}:
        pytest.skip(f"no wheelhouse for {arch}")
    out = tmp_path / "wh"
    proc = subprocess.run(
        ["bash", str(DEPLOY / "make-wheelhouse.sh"), "--out", str(out), "--arch", arch],
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    (bundle,) = out.iterdir()
    assert (bundle / "README.txt").is_file()
    assert (bundle / "install.sh").is_file()
    assert not (bundle / "MISSING.txt").exists()
    # The bundle's own install.sh finds ./wheels by itself; pip gets --no-index.
    inst = tmp_path / "inst"
    cmd = [
        "bash",
        str(bundle / "install.sh"),
        *("--prefix", str(inst / "opt"), "--etc", str(inst / "etc"), "--var", str(inst / "var")),
        *("--unit-dir", str(inst / "units"), "--user", "root", "--no-create-user"),
    ]
    env = {k: v for k, v in os.environ.items() if not k.startswith("PIP_")}
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300, check=False, env=env)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "OK: 1 device(s)" in done.stdout


def test_rootfs_scripts_parse_and_refuse_bad_arguments() -> None:
    # The rootfs check itself is too slow for every CI run (debootstrap + emulation, ~25 min):
    # it is run by hand and its result is in the README. Here: it parses, and it refuses what
    # it cannot do before touching anything.
    for script in ("rootfs-check.sh", "rootfs-boot.sh", "container-check.sh"):
        proc = subprocess.run(
            ["bash", "-n", str(DEPLOY / script)], capture_output=True, text=True, check=False
        )
        assert proc.returncode == 0, proc.stderr
    run = functools.partial(subprocess.run, capture_output=True, text=True, timeout=30, check=False)
    help_ = run(["bash", str(DEPLOY / "rootfs-check.sh"), "--help"])
    assert help_.returncode == 0
    assert "--arch" in help_.stdout
    assert "--boot" in help_.stdout
    bad = run(["bash", str(DEPLOY / "rootfs-check.sh"), "--arch", "riscv64"])
    assert bad.returncode == 1
    assert "unsupported --arch riscv64" in bad.stderr
    unknown = run(["bash", str(DEPLOY / "rootfs-check.sh"), "--frobnicate"])
    assert unknown.returncode == 1
    assert "unknown argument: --frobnicate" in unknown.stderr

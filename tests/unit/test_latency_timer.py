"""The USB serial adapter's latency timer, on a sysfs tree laid out as Linux lays it out.

No FTDI adapter is plugged in here, so the tree is built in tmp_path (the one thing that
cannot run here); the refusal case uses a real read-only kernel file.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import pytest

from drivers.latency_timer import tune_latency_timer


def adapter(sys_root: Path, tty: str, value: str) -> Path:
    device = sys_root / "class" / "tty" / tty / "device"
    device.mkdir(parents=True)
    path = device / "latency_timer"
    path.write_text(value)
    return path


def test_a_16_ms_timer_is_lowered_to_1_ms(tmp_path: Path) -> None:
    path = adapter(tmp_path, "ttyUSB0", "16\n")
    got = tune_latency_timer("/dev/ttyUSB0", sys_root=tmp_path)
    assert path.read_text().strip() == "1"
    assert (got.before_ms, got.after_ms, got.ok) == (16, 1, True)
    assert "lowered from 16 ms" in got.note
    assert got.as_dict()["latency_timer_ms"] == 1


def test_a_symlinked_port_name_finds_the_real_tty(tmp_path: Path) -> None:
    path = adapter(tmp_path / "sys", "ttyUSB3", "16")
    dev = tmp_path / "dev"
    (dev / "serial" / "by-id").mkdir(parents=True)
    (dev / "ttyUSB3").write_text("")
    link = dev / "serial" / "by-id" / "usb-FTDI_FT232R-if00-port0"
    link.symlink_to(dev / "ttyUSB3")
    got = tune_latency_timer(str(link), sys_root=tmp_path / "sys")
    assert got.ok
    assert path.read_text().strip() == "1"


def test_an_already_low_timer_is_left_alone(tmp_path: Path) -> None:
    path = adapter(tmp_path, "ttyUSB1", "1")
    mtime = path.stat().st_mtime_ns
    got = tune_latency_timer("/dev/ttyUSB1", sys_root=tmp_path)
    assert got.ok
    assert got.note == "1 ms"
    assert path.stat().st_mtime_ns == mtime


def test_a_port_without_a_timer_is_fine(tmp_path: Path) -> None:
    got = tune_latency_timer("/dev/ttyS0", sys_root=tmp_path)
    assert got.ok
    assert got.path is None
    assert "not an FTDI-style" in got.note


@pytest.mark.skipif(
    not os.access("/proc/sys/kernel/ngroups_max", os.R_OK), reason="no /proc/sys here"
)
def test_a_timer_that_cannot_be_written_is_reported_and_warned_once(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # /proc/sys/kernel/ngroups_max holds one integer (65536) and refuses writes even from
    # root: a real kernel file behaving as a latency_timer the gateway may not change.
    device = tmp_path / "class" / "tty" / "ttyUSB7" / "device"
    device.mkdir(parents=True)
    (device / "latency_timer").symlink_to("/proc/sys/kernel/ngroups_max")
    caplog.set_level(logging.INFO, logger="drivers.serial")
    first = tune_latency_timer("/dev/ttyUSB7", sys_root=tmp_path)
    second = tune_latency_timer("/dev/ttyUSB7", sys_root=tmp_path)
    assert not first.ok
    assert first.before_ms == first.after_ms == 65536
    assert "cannot be lowered" in first.note
    assert "udev rule" in first.note
    assert second == first
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1, "a port reopened by the breaker must not repeat the warning"


def test_a_pty_has_no_timer() -> None:
    # What every serial test here runs on.
    got = tune_latency_timer("/dev/ptmx")
    assert got.ok
    assert got.path is None

"""Start-up: how long ``retrofit-gw run`` takes to be ready, and its RSS.

Starts one simulator (``retrofit-gw simulate`` on 127.0.0.1), then ``python -m gateway run``
on a 2-tag config (OPC UA + web; ``--mqtt`` adds an MQTT sink and a mosquitto of its own)
``--runs`` times, as systemd would: each gateway gets ``$NOTIFY_SOCKET``, a unix datagram
socket this bench listens on, and ready is the ``READY=1`` datagram. Measured per run:

- ``ready_s``: from launching the process to READY=1 (interpreter, imports, config, every
  sink started);
- ``init_s``: asyncua's ``init()`` as the OPC UA sink logs it ("asyncua init X s");
- ``rss_ready_mb`` / ``rss_settled_mb``: VmRSS from /proc/<pid>/status at READY=1 and
  ``--settle`` seconds later, ``hwm_mb``: VmHWM (the peak) at that point.

Two data-directory modes, both reported: ``first`` (a fresh data dir per run: the OPC UA
certificate is made on that start, and there is no shelf of the standard address space)
and ``later`` (one data dir kept across runs, after one unmeasured start that made the
certificate and ran until it had written the shelf, with ``SHELF_DELAY_S`` set to 1 s through
``$RETROFIT_GW_SHELF_DELAY_S``, a bench-only override). A third mode, ``shelf`` (``--mode all``
runs the three), measures what making the shelf costs the gateway: a first start with
``SHELF_DELAY_S`` = ``--shelf-delay``, RSS at READY=1 and ``--settle`` s later, then
``rss_after_shelf_mb``/``hwm_after_shelf_mb`` ``--settle`` s after the shelf appeared, with
the seconds the child process took and its own peak RSS from the sink's log. ``--no-opcua`` leaves
the OPC UA sink out, to see what it costs. ``--importtime`` adds one run under
``python -X importtime`` and reports the outermost imports and the packages by cumulative
import time.

Every child is terminated (killed if it does not exit) and reaped in ``finally``.

Prints one JSON line (medians over the runs, and every run's numbers).

Usage: python bench/startup.py [--runs 5] [--settle 5] [--mode first|later|shelf|both|all]
       [--shelf-delay 15] [--no-opcua] [--mqtt] [--importtime]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import re
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
READY_TIMEOUT_S = 120.0
INIT_RE = re.compile(r"asyncua init ([0-9.]+) s")
#: The OPC UA sink's line once the shelf is written (the child's peak RSS since it is made in a
#: child process).
MADE_RE = re.compile(
    r"wrote the standard address space to \S+ in ([0-9.]+) s"
    r"(?: \(child process, peak ([0-9.]+) MB)?"
)
SHELF_GLOB = "data/opcua-aspace-*/manifest.json"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_port(port: int, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.2):
            return
        time.sleep(0.05)
    raise TimeoutError(f"nothing listens on 127.0.0.1:{port}")


def stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.terminate()
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=15)
    if proc.poll() is None:
        proc.kill()
        proc.wait()


@contextlib.contextmanager
def child(args: list[str], **kw: object) -> Iterator[subprocess.Popen[bytes]]:
    proc = subprocess.Popen(args, **kw)  # type: ignore[call-overload]
    try:
        yield proc
    finally:
        stop(proc)


@contextlib.contextmanager
def mosquitto() -> Iterator[int]:
    exe = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
    port = free_port()
    with tempfile.TemporaryDirectory() as tmp:
        conf = Path(tmp) / "mosquitto.conf"
        conf.write_text(f"listener {port} 127.0.0.1\nallow_anonymous true\npersistence false\n")
        with child([exe, "-c", str(conf)], stderr=subprocess.DEVNULL):
            wait_port(port)
            yield port


def write_config(path: Path, sim_port: int, opcua: bool, mqtt_port: int | None) -> None:
    lines = [
        "gateway: {name: bench-gw, site: bench, area: a, line: l1, data_dir: data}",
        f"web: {{host: 127.0.0.1, port: {free_port()}}}",
    ]
    if opcua:
        lines.append(
            f"opcua: {{host: 127.0.0.1, port: {free_port()}, allow_none: true, anonymous: true}}"
        )
    if mqtt_port is not None:
        lines.append(f"mqtt: {{host: 127.0.0.1, port: {mqtt_port}}}")
    lines += [
        "devices:",
        "  - {name: lathe-1-cnc, driver: modbus_tcp, machine: lathe-1, host: 127.0.0.1,",
        f"     port: {sim_port}, unit_id: 1, addressing: zero_based, interval: 1.0,",
        "     tags: [{name: status_word, table: holding, address: 0, type: uint16},",
        "            {name: spindle_speed, table: holding, address: 1, type: uint16,",
        "             unit: rpm, min: 0, max: 4000}]}",
    ]
    path.write_text("\n".join(lines) + "\n")


def vm(pid: int) -> dict[str, float]:
    """VmRSS and VmHWM of a process, in MB."""
    out: dict[str, float] = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            key, _, rest = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                out[key] = round(int(rest.split()[0]) / 1024, 1)
    return out


def one_run(
    config: Path,
    settle: float,
    extra: list[str] | None = None,
    wait_for: str | None = None,
    shelf_delay: float | None = None,
) -> dict[str, object]:
    """One start to READY=1; then ``settle`` seconds, and until ``wait_for`` (a glob in the
    config's folder) matches a file, if given (bounded), and ``settle`` seconds more.
    ``shelf_delay``: the OPC UA sink's ``SHELF_DELAY_S`` for this run (an environment variable
    for benches, not a setting)."""
    with tempfile.TemporaryDirectory() as tmp:
        address = str(Path(tmp) / "notify")
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
            sock.bind(address)
            env = dict(os.environ, NOTIFY_SOCKET=address, PYTHONUNBUFFERED="1")
            env.pop("WATCHDOG_USEC", None)
            if shelf_delay is not None:
                env["RETROFIT_GW_SHELF_DELAY_S"] = str(shelf_delay)
            log = Path(tmp) / "stderr"
            with log.open("wb") as err:
                args = [sys.executable, *(extra or []), "-m", "gateway", "run", str(config)]
                t0 = time.monotonic()
                with child(args, env=env, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=err) as p:
                    deadline = t0 + READY_TIMEOUT_S
                    ready_s = None
                    while ready_s is None:
                        left = deadline - time.monotonic()
                        if left <= 0 or p.poll() is not None:
                            tail = log.read_text(errors="replace")[-2000:]
                            raise RuntimeError(f"gateway not ready (exit {p.poll()}):\n{tail}")
                        sock.settimeout(min(left, 0.5))
                        with contextlib.suppress(TimeoutError):
                            data = sock.recv(65536)
                            if b"READY=1" in data.split(b"\n"):
                                ready_s = time.monotonic() - t0
                    at_ready = vm(p.pid)
                    time.sleep(settle)
                    settled = vm(p.pid)
                    until = time.monotonic() + 300
                    while wait_for and not list(config.parent.glob(wait_for)):
                        if time.monotonic() > until or p.poll() is not None:
                            raise RuntimeError(f"no {wait_for} after 300 s")
                        time.sleep(0.2)
                    made_s = time.monotonic() - t0 - ready_s
                    after = vm(p.pid)
                    if wait_for:
                        time.sleep(settle)
                        after = vm(p.pid)
            text = log.read_text(errors="replace")
    found = INIT_RE.search(text)
    run: dict[str, object] = {
        "ready_s": round(ready_s, 3),
        "init_s": float(found.group(1)) if found else None,
        "rss_ready_mb": at_ready["VmRSS"],
        "rss_settled_mb": settled["VmRSS"],
        "hwm_mb": settled["VmHWM"],
        "stderr": text,
    }
    if wait_for:
        made = MADE_RE.search(text)
        run.update(
            {
                "shelf_made_after_ready_s": round(made_s, 1),
                "rss_after_shelf_mb": after["VmRSS"],
                "hwm_after_shelf_mb": after["VmHWM"],
                "shelf_make_s": float(made.group(1)) if made else None,
                "shelf_child_peak_mb": float(made.group(2)) if made and made.group(2) else None,
            }
        )
    return run


def importtime(text: str, top: int = 12) -> dict[str, list[tuple[str, float]]]:
    """From ``-X importtime`` output: the outermost imports by cumulative time (ms), and each
    package by the cumulative time of its own first import, wherever it happened."""
    outer: list[tuple[str, float]] = []
    packages: dict[str, float] = {}
    for line in text.splitlines():
        parts = line.removeprefix("import time:").split("|")
        if not line.startswith("import time:") or len(parts) != 3:
            continue
        cumulative, raw = parts[1].strip(), parts[2]
        if not cumulative.isdigit():
            continue
        ms, name = int(cumulative) / 1000, raw.strip()
        if raw.startswith(" ") and not raw.startswith("  "):
            outer.append((name, round(ms, 1)))
        if "." not in name:
            packages[name] = max(packages.get(name, 0.0), round(ms, 1))
    return {
        "outermost": sorted(outer, key=lambda kv: -kv[1])[:top],
        "packages": sorted(packages.items(), key=lambda kv: -kv[1])[:top],
    }


SHELF_KEYS = (
    "shelf_made_after_ready_s",
    "rss_after_shelf_mb",
    "hwm_after_shelf_mb",
    "shelf_make_s",
    "shelf_child_peak_mb",
)


def summarize(runs: list[dict[str, object]]) -> dict[str, object]:
    keys = ("ready_s", "init_s", "rss_ready_mb", "rss_settled_mb", "hwm_mb", *SHELF_KEYS)
    out: dict[str, object] = {"n": len(runs)}
    for key in keys:
        values = [float(r[key]) for r in runs if r.get(key) is not None]  # type: ignore[arg-type]
        if values:
            out[f"median_{key}"] = round(statistics.median(values), 3)
            out[key] = values
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--settle", type=float, default=5.0)
    ap.add_argument("--mode", choices=("first", "later", "shelf", "both", "all"), default="both")
    ap.add_argument(
        "--shelf-delay",
        type=float,
        default=15.0,
        help="shelf mode: SHELF_DELAY_S of the measured runs (the warm-up of later uses 1 s)",
    )
    ap.add_argument("--no-opcua", action="store_true")
    ap.add_argument("--mqtt", action="store_true", help="add an MQTT sink (starts mosquitto)")
    ap.add_argument("--importtime", action="store_true")
    ap.add_argument("--label", default="", help="a free text label for the JSON line")
    args = ap.parse_args()
    result: dict[str, object] = {
        "bench": "startup",
        "label": args.label,
        "python": platform.python_version(),
        "machine": platform.machine(),
        "cpus": os.cpu_count(),
        "opcua": not args.no_opcua,
        "mqtt": args.mqtt,
    }
    with contextlib.ExitStack() as stack:
        mqtt_port = stack.enter_context(mosquitto()) if args.mqtt else None
        sim_port = free_port()
        stack.enter_context(
            child(
                [
                    sys.executable,
                    "-m",
                    "gateway",
                    "simulate",
                    "--host",
                    "127.0.0.1",
                    "--port",
                    str(sim_port),
                ],
                cwd=ROOT,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
        )
        wait_port(sim_port)
        tmp = Path(stack.enter_context(tempfile.TemporaryDirectory()))
        modes = {
            "both": ("first", "later"),
            "all": ("first", "later", "shelf"),
        }.get(args.mode, (args.mode,))
        if args.no_opcua and "shelf" in modes:
            ap.error("the shelf mode needs the OPC UA sink")
        for mode in modes:
            runs = []
            if mode == "later":
                config = tmp / "later" / "gateway.yaml"
                config.parent.mkdir()
                write_config(config, sim_port, not args.no_opcua, mqtt_port)
                # Not measured: makes the certificate and, when the OPC UA sink has been up for
                # its SHELF_DELAY_S (1 s here), the shelf of the standard address space.
                one_run(config, 0.0, wait_for=None if args.no_opcua else SHELF_GLOB, shelf_delay=1)
            for i in range(args.runs):
                if mode in ("first", "shelf"):
                    config = tmp / f"{mode}-{i}" / "gateway.yaml"
                    config.parent.mkdir()
                    write_config(config, sim_port, not args.no_opcua, mqtt_port)
                if mode == "shelf":
                    # A first start: RSS at ready, ``--settle`` s later, and ``--settle`` s after
                    # the shelf is written (``--shelf-delay`` s after the start).
                    run = one_run(
                        config, args.settle, wait_for=SHELF_GLOB, shelf_delay=args.shelf_delay
                    )
                else:
                    run = one_run(config, args.settle)
                run.pop("stderr")
                runs.append(run)
            result[mode] = summarize(runs)
        if args.importtime:
            config = tmp / "importtime" / "gateway.yaml"
            config.parent.mkdir()
            write_config(config, sim_port, not args.no_opcua, mqtt_port)
            one_run(config, 0.0, wait_for=None if args.no_opcua else SHELF_GLOB, shelf_delay=1)
            run = one_run(config, 0.0, ["-X", "importtime"])
            result["importtime_top_ms"] = importtime(str(run["stderr"]))
    print(json.dumps(result))


if __name__ == "__main__":
    main()

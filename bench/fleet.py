"""Fleet: 20 gateway processes on one machine feeding one mosquitto.

Each gateway is a separate ``python -m gateway run CONFIG`` process with its own config and
data directory in a temp dir: a unique ``gateway.name`` (so a unique MQTT client id), its own
ISA-95 line (``uns/fleet/a/gw-NN/...``), MQTT only at the sink's defaults (QoS 1, per-tag
topics, the buffer). By default each polls 5 simulated Modbus TCP devices x 20 tags at 1 s,
every value changing every cycle: 100 values/s per gateway, 2,000 values/s in all. The
devices come from one simulator process (``poll_capacity.py --serve-sim``, one port per
device on 127.0.0.1); mosquitto is started by this bench on 127.0.0.1.

One ``mosquitto_sub`` (QoS 1, ``uns/fleet/#``) receives everything; a thread here records,
per gateway, when its first value arrived (start-up: from launching the first gateway until
all of them are publishing) and, over the measured window after the warm-up, every value
message's ``seq`` (the gateway's buffer id: consecutive per gateway). Offered per gateway =
the seq span over the window (every read value is one message); delivered = distinct seqs
received; lost = the gaps. CPU (user + system over the window) and RSS come from psutil for
every gateway process, CPU also for mosquitto. Prints one JSON line.

Every child is terminated (killed if it does not exit) and reaped in ``finally``.

Usage: python bench/fleet.py [--gateways 20] [--devices 5] [--tags 20] [--interval 1]
       [--warmup 15] [--duration 60]
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
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import psutil

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
SEQ = re.compile(r'^\{"seq":(\d+),')


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def free_port_range(n: int) -> int:
    """A base port with ``n`` consecutive ports free on 127.0.0.1 (bounded search)."""
    for base in range(17100, 40000, n + 7):
        socks: list[socket.socket] = []
        try:
            for p in range(base, base + n):
                s = socket.socket()
                socks.append(s)
                s.bind(("127.0.0.1", p))
        except OSError:
            continue
        else:
            return base
        finally:
            for s in socks:
                s.close()
    raise RuntimeError(f"no {n} consecutive free ports")


def wait_port(port: int, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.2):
            return
        time.sleep(0.05)
    raise TimeoutError(f"nothing listens on 127.0.0.1:{port}")


def stop_all(procs: list[subprocess.Popen[bytes]]) -> None:
    for p in procs:
        if p.poll() is None:
            with contextlib.suppress(OSError):
                p.terminate()
    deadline = time.monotonic() + 15
    for p in procs:
        try:
            p.wait(max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait(5)


def cpu_s(pid: int) -> float:
    with contextlib.suppress(psutil.Error):
        t = psutil.Process(pid).cpu_times()
        return float(t.user + t.system)
    return 0.0


def vm_hwm_mb(pid: int) -> float:
    with contextlib.suppress(OSError):
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return 0.0


class Receiver:
    """Reads mosquitto_sub's ``receipt topic payload`` lines and keeps what the bench needs."""

    def __init__(self, proc: subprocess.Popen[bytes]) -> None:
        self.proc = proc
        self.first: dict[str, float] = {}
        self.window: tuple[float, float] | None = None
        self.seqs: dict[str, list[int]] = {}
        self.no_seq = 0
        self.thread = threading.Thread(target=self.run, name="fleet-receiver", daemon=True)
        self.thread.start()

    def run(self) -> None:
        assert self.proc.stdout is not None
        for raw in self.proc.stdout:
            stamp, _, rest = raw.decode(errors="replace").partition(" ")
            topic, _, payload = rest.partition(" ")
            parts = topic.split("/")
            if len(parts) < 6 or parts[4].startswith("$"):
                continue  # uns/fleet/a/<line>/<machine>/<tag>; skip status topics
            gw = parts[3]
            m = SEQ.match(payload)
            if m is None:
                self.no_seq += 1  # the retained refresh after connect: not buffered data
                continue
            t = float(stamp)
            self.first.setdefault(gw, t)
            w = self.window
            if w is not None and w[0] <= t <= w[1]:
                self.seqs.setdefault(gw, []).append(int(m.group(1)))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--gateways", type=int, default=20)
    p.add_argument("--devices", type=int, default=5, help="devices per gateway")
    p.add_argument("--tags", type=int, default=20, help="tags per device")
    p.add_argument("--interval", type=float, default=1.0)
    p.add_argument("--warmup", type=float, default=15.0)
    p.add_argument("--duration", type=float, default=60.0)
    args = p.parse_args()
    n_dev = args.gateways * args.devices
    gw_names = [f"gw-{g:02d}" for g in range(args.gateways)]
    procs: list[subprocess.Popen[bytes]] = []
    gateways: list[subprocess.Popen[bytes]] = []
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    with tempfile.TemporaryDirectory(prefix="fleet-bench-") as tmp_s:
        tmp = Path(tmp_s)
        try:
            # Simulator: one process, one port per device.
            sim_base = free_port_range(n_dev)
            sim = subprocess.Popen(
                [sys.executable, str(HERE / "poll_capacity.py"), "--serve-sim",
                 "--devices", str(n_dev), "--tags", str(args.tags), "--port", str(sim_base)],
                stdout=subprocess.PIPE, env=env, cwd=ROOT,
            )  # fmt: skip
            procs.append(sim)
            assert sim.stdout is not None
            tag_lists = json.loads(sim.stdout.readline())
            # Broker.
            mport = free_port()
            conf = tmp / "mosquitto.conf"
            lines = [
                f"listener {mport} 127.0.0.1",
                "allow_anonymous true",
                "persistence false",
                "max_queued_messages 0",
                "max_inflight_messages 1000",
            ]
            if os.geteuid() == 0:
                lines.append("user root")
            conf.write_text("\n".join(lines) + "\n")
            exe = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
            broker = subprocess.Popen(
                [exe, "-c", str(conf)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
            )
            procs.append(broker)
            wait_port(mport)
            # Subscriber (C), QoS 1, live messages only.
            sub_exe = shutil.which("mosquitto_sub") or "/usr/bin/mosquitto_sub"
            sub = subprocess.Popen(
                [sub_exe, "-h", "127.0.0.1", "-p", str(mport), "-t", "uns/fleet/#", "-q", "1",
                 "-i", f"fleet-bench-{os.getpid()}", "-R", "-F", "%U %t %p"],
                stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
            )  # fmt: skip
            procs.append(sub)
            rx = Receiver(sub)
            time.sleep(1.0)
            # Gateways: one config and data dir each.
            t_launch = time.time()
            for g, name in enumerate(gw_names):
                gdir = tmp / name
                (gdir / "data").mkdir(parents=True)
                devs = []
                for d in range(args.devices):
                    i = g * args.devices + d
                    devs.append(
                        {
                            "name": f"{name}-dev{d}",
                            "driver": "modbus_tcp",
                            "machine": f"m{d}",
                            "host": "127.0.0.1",
                            "port": sim_base + i,
                            "unit_id": 1,
                            "interval": args.interval,
                            "timeout": min(0.5, args.interval / 2),
                            "addressing": "zero_based",
                            "tags": [
                                {k: v for k, v in t.items() if v is not None} for t in tag_lists[i]
                            ],
                        }
                    )
                cfg = {
                    "gateway": {
                        "name": f"fleet-{name}",
                        "site": "fleet",
                        "area": "a",
                        "line": name,
                        "data_dir": str(gdir / "data"),
                    },
                    "mqtt": {"host": "127.0.0.1", "port": mport, "topic_prefix": "uns"},
                    "devices": devs,
                }
                (gdir / "gateway.yaml").write_text(json.dumps(cfg, indent=1))  # JSON is YAML
                gp = subprocess.Popen(
                    [sys.executable, "-m", "gateway", "run", str(gdir / "gateway.yaml")],
                    stdout=(gdir / "log").open("wb"), stderr=subprocess.STDOUT, env=env,
                    cwd=ROOT,
                )  # fmt: skip
                procs.append(gp)
                gateways.append(gp)
            # Start-up: until every gateway's first value has arrived (bounded).
            deadline = time.monotonic() + 180
            while len(rx.first) < args.gateways and time.monotonic() < deadline:
                if any(gp.poll() is not None for gp in gateways):
                    raise RuntimeError("a gateway exited during start-up; see its log")
                time.sleep(0.1)
            all_up = max(rx.first.values()) if len(rx.first) == args.gateways else None
            startup_s = round(all_up - t_launch, 2) if all_up is not None else None
            time.sleep(args.warmup)
            # Measured window.
            pids = [gp.pid for gp in gateways]
            cpu0 = [cpu_s(pid) for pid in pids]
            bcpu0 = cpu_s(broker.pid)
            scpu0 = cpu_s(sim.pid)
            t0, w0 = time.monotonic(), time.time()
            rx.window = (w0, w0 + args.duration)
            time.sleep(args.duration)
            t1 = time.monotonic()
            cpu1 = [cpu_s(pid) for pid in pids]
            bcpu1 = cpu_s(broker.pid)
            scpu1 = cpu_s(sim.pid)
            rss = []
            for pid in pids:
                with contextlib.suppress(psutil.Error):
                    rss.append(psutil.Process(pid).memory_info().rss / 2**20)
            hwm = [vm_hwm_mb(pid) for pid in pids]
            time.sleep(2.0)  # let the window's last messages arrive
            alive = sum(gp.poll() is None for gp in gateways)
        finally:
            stop_all(list(reversed(procs)))
        rx.thread.join(timeout=10)
    elapsed = t1 - t0
    per_gw = []
    for name in gw_names:
        seqs = rx.seqs.get(name, [])
        uniq = set(seqs)
        span = (max(uniq) - min(uniq) + 1) if uniq else 0
        per_gw.append(
            {
                "gw": name,
                "offered": span / args.duration,
                "delivered": len(uniq) / args.duration,
                "lost": span - len(uniq),
                "dups": len(seqs) - len(uniq),
            }
        )
    cpu_pct = [100 * (b - a) / elapsed for a, b in zip(cpu0, cpu1, strict=True)]
    nominal = args.gateways * args.devices * args.tags / args.interval
    worst = min(per_gw, key=lambda r: r["delivered"])
    result = {
        "bench": "fleet",
        "gateways": args.gateways,
        "gateways_alive_at_end": alive,
        "devices_per_gateway": args.devices,
        "tags_per_device": args.tags,
        "interval_s": args.interval,
        "qos_values": 1,
        "topic_shape": "per_tag",
        "window_s": args.duration,
        "nominal_values_per_s": nominal,
        "offered_values_per_s": round(sum(r["offered"] for r in per_gw), 1),
        "delivered_values_per_s": round(sum(r["delivered"] for r in per_gw), 1),
        "worst_gateway": {
            "gw": worst["gw"],
            "offered_values_per_s": round(worst["offered"], 1),
            "delivered_values_per_s": round(worst["delivered"], 1),
        },
        "lost_seq_gaps": sum(r["lost"] for r in per_gw),
        "duplicates": sum(r["dups"] for r in per_gw),
        "gateways_with_no_values_in_window": sum(r["delivered"] == 0 for r in per_gw),
        "gateway_cpu_pct_of_one_core_total": round(sum(cpu_pct), 1),
        "gateway_cpu_pct_per_gateway_mean": round(sum(cpu_pct) / len(cpu_pct), 2),
        "gateway_cpu_pct_per_gateway_max": round(max(cpu_pct), 2),
        "gateway_rss_mb_total": round(sum(rss), 1),
        "gateway_rss_mb_per_gateway_mean": round(sum(rss) / len(rss), 1) if rss else None,
        "gateway_rss_mb_per_gateway_max": round(max(rss), 1) if rss else None,
        "gateway_peak_rss_mb_max": round(max(hwm), 1),
        "mosquitto_cpu_pct_of_one_core": round(100 * (bcpu1 - bcpu0) / elapsed, 1),
        "simulator_cpu_pct_of_one_core": round(100 * (scpu1 - scpu0) / elapsed, 1),
        "startup_s_until_all_publishing": startup_s,
        "load_avg_1m": round(os.getloadavg()[0], 2),
        "python": platform.python_version(),
        "machine": platform.machine(),
        "cpus": os.cpu_count(),
    }
    print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

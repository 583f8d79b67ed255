"""Broker outage under the end-to-end load: what store and forward costs, and how fast it drains.

The load is ``bench/end_to_end.py``'s ``uns_per_tag``: 100 simulated devices x 100 tags at
1 s, every value changing every cycle, one retained per-tag topic each: 10,000 values/s. MQTT
only (no OPC UA server: the outage is MQTT's, and asyncua's CPU would only blur the figures),
at the sink's defaults: QoS 1, ``buffer`` defaults (``replay_rate`` 20,000/s, ``inflight``
2,000, ``fsync: normal``) unless overridden on the command line.

Phases: warm-up; ``--live-seconds`` of live traffic; mosquitto stopped for
``--outage-seconds`` (default 60) while the gateway buffers to disk; mosquitto started again,
and the time until the gateway reconnects (its own backoff, up to 30 s after a long outage);
the drain, until the buffer on disk is empty (given up after ``--drain-limit``, default twice
the outage); ``--after-seconds`` of live traffic again.

mosquitto keeps sessions across its restart (``persistence true``) and queues without bound
for the subscriber, a ``mosquitto_sub`` with a persistent session (QoS 1), so that it misses
nothing while the broker is away: every message it receives goes to a file with its receipt
time, and afterwards every ``seq`` the gateway handed out (``1`` to its buffer's ``next_id -
1``) must be there, or still in the buffer file. The simulator, mosquitto and the
subscriber run in their own processes; CPU and disk figures are the gateway's own (this
process), disk from ``/proc/self/io``.

Figures (one JSON line): ``offered_values_per_s`` (values read per second: the load, every
value changes every cycle) and ``live_msgs_per_s`` (sent from memory) before the outage, with
what overflowed to disk while connected; ``buffered_msgs`` (on disk when the broker came back)
and ``buffer_holds_s`` (how long an outage ``max_mb`` holds at this load); disk bytes per
buffered message (``write_bytes``: pages sent to the block layer; ``wchar``: bytes passed to
write(); the file with its WAL); ``drain_msgs_per_s`` (replayed from disk per second,
reconnect to empty buffer), ``drain_total_msgs_per_s`` (replayed and live),
``live_during_drain_msgs_per_s``, ``drain_to_live_ratio`` (drain over the load);
``catch_up_s`` (reconnect to empty buffer; also from the broker's return); CPU per phase; and
at the subscriber: lost, duplicates, the drain as it saw it and the latency of live values
during the drain. Targets: drain >= 3x the load, catch up in under half the outage, nothing
lost.

Usage: python bench/outage.py [--outage-seconds 60] [--replay-rate R] [--py-spy FILE]
(``--py-spy`` records the drain with py-spy, raw collapsed stacks, into FILE).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import platform
import re
import resource
import shutil
import sqlite3
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil
from end_to_end import free_port, wait_port  # bench/ is on sys.path when run as a script
from poll_capacity import device_configs

from gateway.app import Gateway, build_sinks
from gateway.config import GatewayConfig, LoadedConfig
from gateway.sinks.mqtt import OUTBOX_FILE

HERE = Path(__file__).resolve().parent
TOPIC = "uns/bench/a/l/#"
#: The subscriber's line: receipt time, tab, payload; a buffered value's payload starts with
#: its seq, then "historical":true when replayed, and ends with its source timestamp.
LINE = re.compile(rb'^(\d+\.\d+)\t\{"seq":(\d+),("historical":true,)?.*"ts_ms":(\d+)\}$')


class Broker:
    """mosquitto with persistent sessions, stoppable and startable on the same port."""

    def __init__(self, workdir: Path) -> None:
        self.port = free_port()
        self.workdir = workdir
        self.conf = workdir / "mosquitto.conf"
        lines = [
            f"listener {self.port} 127.0.0.1",
            "allow_anonymous true",
            "persistence true",
            f"persistence_location {workdir}/",
            "autosave_interval 0",
            # The subscriber must miss nothing: no queue limit while it is away or behind, and
            # enough in flight towards it that the broker's default (20) does not pace it.
            "max_queued_messages 0",
            "max_inflight_messages 1000",
        ]
        if os.geteuid() == 0:
            lines.append("user root")
        self.conf.write_text("\n".join(lines) + "\n")
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        exe = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
        with (self.workdir / "mosquitto.log").open("ab") as log:
            self.proc = subprocess.Popen([exe, "-c", str(self.conf)], stdout=log, stderr=log)
        wait_port(self.port)

    async def astart(self) -> None:
        self.start()  # wait_port: a few ms, the gateway has nothing to send meanwhile
        await asyncio.sleep(0)

    async def astop(self) -> None:
        proc, self.proc = self.proc, None
        if proc is None:
            return
        proc.terminate()  # saves sessions and retained messages on the way out
        for _ in range(1000):
            if proc.poll() is not None:
                return
            await asyncio.sleep(0.01)
        proc.kill()
        proc.wait(5)

    def stop(self) -> None:
        proc, self.proc = self.proc, None
        if proc is not None and proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)

    def cpu(self) -> float:
        """CPU seconds of the current mosquitto process (a restart starts from zero)."""
        if self.proc is None:
            return 0.0
        with contextlib.suppress(psutil.Error):
            t = psutil.Process(self.proc.pid).cpu_times()
            return float(t.user + t.system)
        return 0.0


@contextlib.contextmanager
def subscriber(port: int, out: Path) -> Iterator[subprocess.Popen[bytes]]:
    exe = shutil.which("mosquitto_sub") or "/usr/bin/mosquitto_sub"
    with out.open("wb") as f:
        proc = subprocess.Popen(
            [exe, "-h", "127.0.0.1", "-p", str(port), "-t", TOPIC, "-q", "1", "-c",
             "-i", f"outage-bench-{os.getpid()}", "-V", "mqttv311", "-R", "-F", "%U\t%p"],
            stdout=f,
            stderr=subprocess.DEVNULL,
        )  # fmt: skip
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.terminate()
            proc.wait(10)


def proc_io() -> dict[str, int]:
    out: dict[str, int] = {}
    with contextlib.suppress(OSError):
        for line in Path("/proc/self/io").read_text().splitlines():
            key, _, value = line.partition(":")
            out[key] = int(value)
    return out


class Mark:
    """What the gateway's counters said at one moment."""

    def __init__(self, gw: Gateway, broker: Broker) -> None:
        self.t = time.monotonic()
        # Values read (every value of the simulator changes every cycle: each is a message).
        self.offered = sum(gw.statuses[d.name].good_polls * len(d.tags) for d in gw.drivers)
        self.wall = time.time()
        self.cpu = time.process_time()
        self.broker_cpu = broker.cpu()
        self.io = proc_io()
        mqtt: dict[str, Any] = dict(gw.health["mqtt"])
        self.health = mqtt
        self.published = int(mqtt["published"])
        self.replayed = int(mqtt["replayed"])
        self.live = self.published - self.replayed  # handed to the connection from memory
        self.buffered = int(mqtt["buffered"])

    def cpu_pct(self, later: Mark) -> float:
        return round(100 * (later.cpu - self.cpu) / (later.t - self.t), 1)

    def broker_cpu_pct(self, later: Mark) -> float:
        return round(100 * (later.broker_cpu - self.broker_cpu) / (later.t - self.t), 1)

    def rate(self, later: Mark, key: str) -> float:
        delta: float = getattr(later, key) - getattr(self, key)
        return round(delta / (later.t - self.t), 1)

    def io_delta(self, later: Mark, key: str) -> int:
        return later.io.get(key, 0) - self.io.get(key, 0)


def file_bytes(data_dir: Path) -> int:
    return sum(p.stat().st_size for p in data_dir.glob(f"{OUTBOX_FILE}*"))


async def wait_until(done: Any, seconds: float, step: float = 0.05) -> bool:
    deadline = time.monotonic() + seconds
    while not done():
        if time.monotonic() > deadline:
            return False
        await asyncio.sleep(step)
    return True


async def run_gateway(
    cfg: GatewayConfig, workdir: Path, broker: Broker, args: argparse.Namespace
) -> dict[str, Any]:
    gw = Gateway(LoadedConfig(path=workdir / "bench.yaml", config=cfg))
    data_dir = gw.data_dir
    stop = asyncio.Event()
    task = asyncio.create_task(gw.run(stop, build_sinks(gw)), name="gateway")
    statuses = gw.statuses.values
    if not await wait_until(lambda: all(s.good_polls for s in statuses()), 120):
        raise SystemExit("not every device answered within 120 s")
    health: dict[str, Any] = gw.health["mqtt"]
    await asyncio.sleep(args.warmup)
    out: dict[str, Any] = {}

    live0 = Mark(gw, broker)
    spy = py_spy(args, "live")
    await asyncio.sleep(args.live_seconds)
    live1 = Mark(gw, broker)
    await stop_spy(spy, args)

    await broker.astop()
    down = Mark(gw, broker)
    await asyncio.sleep(args.outage_seconds)
    outage_end = Mark(gw, broker)
    out["db_file_bytes"] = file_bytes(data_dir)
    await broker.astart()
    up = Mark(gw, broker)
    if not await wait_until(lambda: health["connected"], 120):
        raise SystemExit("the gateway did not reconnect within 120 s")
    reconnect = Mark(gw, broker)
    spy = py_spy(args, "drain")
    # The drain: until nothing waits on disk (in-flight replayed rows count until acked).
    samples: list[tuple[float, int, int]] = []

    def drained() -> bool:
        samples.append((time.monotonic(), int(health["buffered"]), int(health["replayed"])))
        return not health["buffered"]

    limit = args.drain_limit or max(60.0, 2 * args.outage_seconds)
    caught_up = await wait_until(drained, limit, 0.1)
    drain_end = Mark(gw, broker)
    await asyncio.sleep(args.after_seconds)
    after = Mark(gw, broker)
    stop.set()
    await asyncio.wait_for(task, 60)
    await stop_spy(spy, args)

    buffered = up.buffered
    out.update(
        {
            "offered_values_per_s": live0.rate(live1, "offered"),
            "live_msgs_per_s": live0.rate(live1, "live"),
            "live_published_msgs_per_s": live0.rate(live1, "published"),
            # Connected, before the outage: what overflowed the in-memory window to disk.
            "live_replayed_msgs": live1.replayed - live0.replayed,
            "live_buffered_at_end": live1.buffered,
            "broker_down_s": round(up.t - down.t, 1),
            "buffered_msgs": outage_end.buffered,
            "dropped_in_outage": int(outage_end.health["dropped"]) - int(down.health["dropped"]),
            "buffered_at_reconnect": reconnect.buffered,
            "payload_bytes_per_msg": round(
                int(outage_end.health["buffered_bytes"]) / max(1, outage_end.buffered), 1
            ),
            "disk_write_bytes_per_msg": round(
                down.io_delta(outage_end, "write_bytes") / max(1, outage_end.buffered), 1
            ),
            "disk_wchar_per_msg": round(
                down.io_delta(outage_end, "wchar") / max(1, outage_end.buffered), 1
            ),
            "db_file_bytes_per_msg": round(out["db_file_bytes"] / max(1, buffered), 1),
            "reconnect_after_broker_back_s": round(reconnect.t - up.t, 1),
            "caught_up": caught_up,
        }
    )
    catch_up = drain_end.t - reconnect.t
    drain = (drain_end.replayed - reconnect.replayed) / catch_up if catch_up > 0 else 0.0
    out.update(
        {
            "catch_up_s": round(catch_up, 1),
            "catch_up_from_broker_back_s": round(drain_end.t - up.t, 1),
            "catch_up_over_outage": round(catch_up / args.outage_seconds, 2),
            "drain_msgs_per_s": round(drain),
            "drain_total_msgs_per_s": round(reconnect.rate(drain_end, "published")),
            "live_during_drain_msgs_per_s": round(reconnect.rate(drain_end, "live")),
            # Against the load (what a drain must outpace), not what was sent live.
            "drain_to_live_ratio": round(drain / max(1.0, out["offered_values_per_s"]), 2),
            "drain_disk_write_bytes_per_msg": round(
                reconnect.io_delta(drain_end, "write_bytes") / max(1, reconnect.buffered), 1
            ),
            "after_live_msgs_per_s": drain_end.rate(after, "live"),
            "after_published_msgs_per_s": drain_end.rate(after, "published"),
            "cpu_pct_of_one_core": {
                "live": live0.cpu_pct(live1),
                "outage": down.cpu_pct(outage_end),
                "drain": reconnect.cpu_pct(drain_end),
                "after": drain_end.cpu_pct(after),
            },
            "broker_cpu_pct": {
                "live": live0.broker_cpu_pct(live1),
                "drain": reconnect.broker_cpu_pct(drain_end),
            },
            "drain_profile": drain_profile(samples),
            "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
            "errors": sum(sum(s.errors.values()) for s in gw.statuses.values()),
            "overruns": sum(s.overruns for s in gw.statuses.values()),
            "dropped": gw.health["mqtt"]["dropped"],
            "dropped_full": gw.health["mqtt"]["dropped_full"],
            "reconnects": gw.health["mqtt"]["reconnects"],
            "windows": {
                "up": up.wall,
                "reconnect": reconnect.wall,
                "drain_end": drain_end.wall,
            },
        }
    )
    return out


def py_spy(args: argparse.Namespace, phase: str) -> subprocess.Popen[bytes] | None:
    """py-spy recording this process for ``--py-spy-seconds`` from now, if asked for."""
    if not args.py_spy or args.py_spy_phase != phase:
        return None
    return subprocess.Popen(
        ["py-spy", "record", "--pid", str(os.getpid()), "--rate", "200", "--format", "raw",
         "--nonblocking", "--duration", str(args.py_spy_seconds), "-o", args.py_spy],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )  # fmt: skip


async def stop_spy(spy: subprocess.Popen[bytes] | None, args: argparse.Namespace) -> None:
    """Wait (without blocking the gateway) until py-spy has written its file."""
    if spy is not None:
        await wait_until(lambda: spy.poll() is not None, args.py_spy_seconds + 30, 0.2)


def drain_profile(samples: list[tuple[float, int, int]]) -> list[int]:
    """Replayed messages per second, second by second, from the reconnect."""
    if not samples:
        return []
    t0, _, r0 = samples[0]
    out: list[int] = []
    mark, last = t0 + 1, r0
    for t, _, replayed in samples:
        if t >= mark:
            out.append(replayed - last)
            last, mark = replayed, mark + 1
    return out


def buffer_state(data_dir: Path) -> tuple[int, set[int]]:
    db = sqlite3.connect(data_dir / OUTBOX_FILE)
    try:
        next_id = db.execute("SELECT value FROM meta WHERE key = 'next_id'").fetchone()[0]
        left = {row[0] for row in db.execute("SELECT id FROM messages")}
    finally:
        db.close()
    return int(next_id) - 1, left


def percentile(ordered: list[float], p: float) -> float | None:
    if not ordered:
        return None
    return round(ordered[min(len(ordered) - 1, round(p / 100 * (len(ordered) - 1)))], 1)


def analyse(path: Path, last: int, left: set[int], windows: dict[str, float]) -> dict[str, Any]:
    """Seq completeness and the drain as the subscriber saw it."""
    seen = bytearray(last + 2)
    duplicates = received = historical = drained = 0
    first_hist = last_hist = None
    live_in_drain = 0
    latencies: list[float] = []
    reconnect, drain_end = windows["reconnect"], windows["drain_end"]
    with path.open("rb") as f:
        for line in f:
            m = LINE.match(line.rstrip(b"\n"))
            if m is None:
                continue
            received += 1
            stamp = float(m.group(1))
            seq = int(m.group(2))
            if seq >= len(seen):
                seen.extend(bytes(seq + 1 - len(seen)))
            if seen[seq]:
                duplicates += 1
            seen[seq] = 1
            if m.group(3):
                historical += 1
                if stamp >= reconnect:  # not what overflowed before the outage
                    drained += 1
                    first_hist = stamp if first_hist is None else first_hist
                    last_hist = stamp
            elif reconnect <= stamp <= drain_end:
                live_in_drain += 1
                latencies.append(stamp * 1000 - int(m.group(4)))
    missing = [s for s in range(1, last + 1) if not seen[s] and s not in left]
    span = (last_hist - first_hist) if first_hist is not None and last_hist is not None else 0
    latencies.sort()
    drain_window = drain_end - reconnect
    return {
        "seq_last": last,
        "received": received,
        "duplicates": duplicates,
        "left_in_buffer": len(left),
        "lost": len(missing),
        "lost_first": missing[:10],
        "historical_received": historical,
        "sub_drain_msgs_per_s": round(drained / span) if span > 0 else None,
        "sub_last_historical_after_reconnect_s": (
            round(last_hist - reconnect, 1) if last_hist is not None else None
        ),
        "sub_live_msgs_per_s_during_drain": (
            round(live_in_drain / drain_window) if drain_window > 0 else None
        ),
        "live_latency_ms_during_drain_p50": percentile(latencies, 50),
        "live_latency_ms_during_drain_p99": percentile(latencies, 99),
        "live_latency_ms_during_drain_max": percentile(latencies, 100),
    }


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--outage-seconds", type=float, default=60.0)
    p.add_argument("--live-seconds", type=float, default=10.0)
    p.add_argument("--after-seconds", type=float, default=10.0)
    p.add_argument("--warmup", type=float, default=5.0)
    p.add_argument(
        "--drain-limit", type=float, default=None, help="give up the drain after s (2 x outage)"
    )
    p.add_argument("--devices", type=int, default=100)
    p.add_argument("--tags", type=int, default=100)
    p.add_argument("--interval", type=float, default=1.0)
    p.add_argument("--qos", type=int, choices=[0, 1], default=1)
    p.add_argument("--replay-rate", type=float, default=None, help="buffer.replay_rate")
    p.add_argument("--inflight", type=int, default=None, help="buffer.inflight")
    p.add_argument("--fsync", choices=["off", "normal", "full"], default=None)
    p.add_argument("--max-mb", type=float, default=None, help="buffer.max_mb")
    p.add_argument("--dir", type=Path, default=None, help="work directory (default: a temp dir)")
    p.add_argument("--py-spy", default=None, help="record the drain with py-spy into this file")
    p.add_argument("--py-spy-seconds", type=int, default=20)
    p.add_argument("--py-spy-phase", choices=["live", "drain"], default="drain")
    args = p.parse_args()

    sim_port = 16020
    sim_cmd = [
        sys.executable, str(HERE / "poll_capacity.py"), "--serve-sim",
        "--devices", str(args.devices), "--tags", str(args.tags), "--port", str(sim_port),
    ]  # fmt: skip
    buffer = {
        k: v
        for k, v in (
            ("replay_rate", args.replay_rate),
            ("inflight", args.inflight),
            ("fsync", args.fsync),
            ("max_mb", args.max_mb),
        )
        if v is not None
    }
    with tempfile.TemporaryDirectory(dir=args.dir, prefix="outage-bench-") as tmp:
        workdir = Path(tmp)
        broker = Broker(workdir)
        sim = subprocess.Popen(sim_cmd, stdout=subprocess.PIPE, text=True)
        try:
            assert sim.stdout is not None
            tag_lists = json.loads(sim.stdout.readline())
            broker.start()
            sub_file = workdir / "subscriber.txt"
            with subscriber(broker.port, sub_file):
                time.sleep(1.0)  # subscribed (its session then outlives the broker's restart)
                raw = {
                    "gateway": {
                        "name": "bench-gw",
                        "site": "bench",
                        "area": "a",
                        "line": "l",
                        "data_dir": str(workdir / "data"),
                    },
                    "mqtt": {
                        "host": "127.0.0.1",
                        "port": broker.port,
                        "topic_prefix": "uns",
                        "topic_shape": "per_tag",
                        "qos_values": args.qos,
                        "buffer": buffer,
                    },
                    "devices": device_configs(tag_lists, sim_port, args.interval),
                }
                cfg = GatewayConfig.model_validate(raw)
                del tag_lists, raw
                result = asyncio.run(run_gateway(cfg, workdir, broker, args))
                # Let the subscriber take in what is still on its way.
                size, still = -1, 0
                for _ in range(600):
                    now = sub_file.stat().st_size
                    still = still + 1 if now == size else 0
                    if still >= 20:
                        break
                    size = now
                    time.sleep(0.1)
            broker.stop()
        finally:
            broker.stop()
            sim.terminate()
            sim.wait(10)
        last, left = buffer_state(workdir / "data")
        sub = analyse(sub_file, last, left, result.pop("windows"))
        sub_bytes = sub_file.stat().st_size
    result.update(sub)
    result["subscriber_file_mb"] = round(sub_bytes / 1e6, 1)
    live = max(1.0, float(result["offered_values_per_s"]))
    if cfg.mqtt is not None:
        # How long an outage the buffer holds at this load before it drops.
        per_s = live * float(result["payload_bytes_per_msg"])
        result["buffer_holds_s"] = round(cfg.mqtt.buffer.max_mb * 1e6 / per_s, 1)
    result["targets_met"] = {
        "drain_3x_live": result["drain_msgs_per_s"] >= 3 * live,
        "catch_up_under_half_outage": result["catch_up_s"] < args.outage_seconds / 2,
        "nothing_lost": result["lost"] == 0,
    }
    print(
        json.dumps(
            {
                "bench": "outage",
                "devices": args.devices,
                "tags_per_device": args.tags,
                "interval_s": args.interval,
                "expected_values_per_s": args.devices * args.tags / args.interval,
                "qos": args.qos,
                "outage_s": args.outage_seconds,
                "buffer": cfg.mqtt.buffer.model_dump() if cfg.mqtt else None,
                **result,
                # Other work on the machine shows here (the gateway's CPU figures do not).
                "load_avg_1_5_15": [round(x, 2) for x in os.getloadavg()],
                "python": platform.python_version(),
                "machine": platform.machine(),
                "cpus": os.cpu_count(),
            }
        ),
        flush=True,
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

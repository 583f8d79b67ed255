"""End to end: simulated devices -> gateway -> OPC UA + MQTT (mosquitto) -> a subscriber.

Two scenarios, one JSON line each:

- ``uns_per_tag``: 100 devices x 100 tags at 1 s, every value changing every cycle, through
  OPC UA and MQTT with one retained topic per tag. Targets: 10,000 values/s delivered at
  <= 25% of one core and <= 150 MB RSS for the gateway, p99 added latency <= 50 ms.
- ``batched_mqtt_only``: 10 devices x ~100 registers at 100 ms, MQTT only, one message per
  device poll. Targets: <= 4% of one core, <= 60 MB, p99 <= 5 ms, 100% delivered.

The simulator, mosquitto and the subscriber each run in their own process; only the gateway
runs in this one, so the CPU and RSS figures are the gateway's own.

mosquitto runs with ``set_tcp_nodelay true``. Its default (false) leaves Nagle on for its
sockets to subscribers: a PUBLISH written while an earlier segment to the same subscriber is
unacknowledged waits for that ACK, which the subscriber's kernel delays by up to 40 ms. That
was the 30-40 ms p99 of ``batched_mqtt_only`` (measured: gateway send() to mosquitto_sub
receipt p50 0.1 ms, p99 38 ms; with the option p99 3-5 ms), a property of the broker's
configuration, not of the gateway, whose own socket has TCP_NODELAY. ``--broker-nagle`` runs
mosquitto with its default to see it.

Usage: python bench/end_to_end.py [--scenario uns_per_tag|batched_mqtt_only|all] [--duration 30]
       [--broker-nagle]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import platform
import resource
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

from poll_capacity import device_configs  # bench/ is on sys.path when run as a script

from gateway.app import Gateway, build_sinks
from gateway.config import GatewayConfig, LoadedConfig

HERE = Path(__file__).resolve().parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_port(port: int, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.2):
            return
        time.sleep(0.05)
    raise TimeoutError(f"nothing listens on 127.0.0.1:{port}")


@contextlib.contextmanager
def child(args: list[str], **kw: object) -> Iterator[subprocess.Popen[str]]:
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, text=True, **kw)  # type: ignore[call-overload]
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.terminate()
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.communicate(timeout=10)
        if proc.poll() is None:
            proc.kill()
            proc.communicate()


@contextlib.contextmanager
def mosquitto(*, nagle: bool = False) -> Iterator[int]:
    exe = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
    port = free_port()
    with tempfile.TemporaryDirectory() as tmp:
        conf = Path(tmp) / "mosquitto.conf"
        conf.write_text(
            f"listener {port} 127.0.0.1\nallow_anonymous true\npersistence false\n"
            "max_queued_messages 100000\n" + ("" if nagle else "set_tcp_nodelay true\n")
        )
        with child([exe, "-c", str(conf)], stderr=subprocess.DEVNULL):
            wait_port(port)
            yield port


async def run_gateway(
    cfg: GatewayConfig, warmup: float, duration: float, counter: subprocess.Popen[str]
) -> dict[str, object]:
    gw = Gateway(LoadedConfig(path=Path(tempfile.mkdtemp()) / "bench.yaml", config=cfg))
    sinks = build_sinks(gw)
    stop = asyncio.Event()
    t_start = time.monotonic()
    task = asyncio.create_task(gw.run(stop, sinks), name="gateway")
    first_good = None
    while first_good is None and time.monotonic() - t_start < 120:
        await asyncio.sleep(0.05)
        if any(s.good_polls for s in gw.statuses.values()):
            first_good = time.monotonic() - t_start
    await asyncio.sleep(warmup)
    # The counter counts exactly the window in which this process's CPU is measured.
    assert counter.stdin is not None
    now = time.time()
    counter.stdin.write(f"{now} {now + duration}\n")
    counter.stdin.flush()
    cpu0, wall0 = time.process_time(), time.monotonic()
    await asyncio.sleep(duration)
    cpu1, wall1 = time.process_time(), time.monotonic()
    health = {k: dict(v) for k, v in gw.health.items()}
    stop.set()
    await asyncio.wait_for(task, 60)
    return {
        "cpu_pct_of_one_core": round(100 * (cpu1 - cpu0) / (wall1 - wall0), 2),
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "time_to_first_value_s": round(first_good, 2) if first_good is not None else None,
        "errors": sum(sum(s.errors.values()) for s in gw.statuses.values()),
        "overruns": sum(s.overruns for s in gw.statuses.values()),
        "health": health,
    }


def scenario(name: str, args: argparse.Namespace) -> dict[str, object]:
    if name == "uns_per_tag":
        devices, tags, interval, shape, opcua = 100, 100, 1.0, "per_tag", True
    else:
        devices, tags, interval, shape, opcua = 10, 97, 0.1, "per_device", False
    sim_port = free_port() if devices == 1 else 16020
    sim_cmd = [
        sys.executable,
        str(HERE / "poll_capacity.py"),
        "--serve-sim",
        "--devices",
        str(devices),
        "--tags",
        str(tags),
        "--port",
        str(sim_port),
    ]
    with child(sim_cmd) as sim, mosquitto(nagle=args.broker_nagle) as mport:
        assert sim.stdout is not None
        tag_lists = json.loads(sim.stdout.readline())
        prefix = "uns/bench/a/l/#"
        counter_cmd = [
            sys.executable,
            str(HERE / "mqtt_counter.py"),
            "127.0.0.1",
            str(mport),
            prefix,
        ]
        with child(counter_cmd, stdin=subprocess.PIPE) as counter:
            assert counter.stdout is not None
            assert counter.stdout.readline().strip() == "ready"
            raw = {
                "gateway": {"name": "bench-gw", "site": "bench", "area": "a", "line": "l"},
                "mqtt": {
                    "host": "127.0.0.1",
                    "port": mport,
                    "topic_prefix": "uns",
                    "topic_shape": shape,
                    "qos_values": 0,
                },
                "devices": device_configs(tag_lists, sim_port, interval),
            }
            if opcua:
                raw["opcua"] = {"host": "127.0.0.1", "port": free_port(), "allow_none": True}
            cfg = GatewayConfig.model_validate(raw)
            del tag_lists, raw
            gw_result = asyncio.run(run_gateway(cfg, args.warmup, args.duration, counter))
            out, _ = counter.communicate(timeout=60)
            delivered = json.loads(out.strip().splitlines()[-1])
    expected = devices * tags / interval
    return {
        "bench": "end_to_end",
        "scenario": name,
        "devices": devices,
        "tags_per_device": tags,
        "interval_s": interval,
        "topic_shape": shape,
        "opcua": opcua,
        "broker_nodelay": not args.broker_nagle,
        "expected_values_per_s": expected,
        **delivered,
        "delivered_pct": round(100 * delivered["delivered_values_per_s"] / expected, 1),
        **gw_result,
        "python": platform.python_version(),
        "machine": platform.machine(),
        "cpus": os.cpu_count(),
    }


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--scenario", default="all", choices=["all", "uns_per_tag", "batched_mqtt_only"])
    p.add_argument("--duration", type=float, default=30.0)
    p.add_argument("--warmup", type=float, default=5.0)
    p.add_argument(
        "--broker-nagle",
        action="store_true",
        help="mosquitto without set_tcp_nodelay (its default): Nagle towards the subscriber",
    )
    args = p.parse_args()
    if args.scenario == "all":
        # Each scenario in a fresh process: the first one's heap must not tax the second's
        # CPU and RSS figures.
        for name in ("uns_per_tag", "batched_mqtt_only"):
            subprocess.run(
                [
                    sys.executable,
                    __file__,
                    "--scenario",
                    name,
                    "--duration",
                    str(args.duration),
                    "--warmup",
                    str(args.warmup),
                    *(["--broker-nagle"] if args.broker_nagle else []),
                ],
                check=True,
            )
        return 0
    for name in [args.scenario]:
        result = scenario(name, args)
        health = result.pop("health")
        assert isinstance(health, dict)
        result["mqtt"] = health.get("mqtt")
        result["opcua"] = health.get("opcua") or result["opcua"]
        print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Poll capacity: how many values/s the gateway core decodes and normalises, at what cost.

Starts the simulator in its own process (100 devices x 100 tags of mixed types, contiguous and
with gaps, each device on its own port as machines on their own IPs), then runs the gateway
core (runners, decode, normalise, bus, one counting subscriber) in this process at a 1 s
interval, and prints one JSON line:

    values_per_s, requests_per_cycle, min_requests_per_cycle, cpu_pct_of_one_core (gateway),
    peak_rss_mb (gateway), sim_cpu_pct (so the simulator is seen not to be the bottleneck),
    overruns and errors (both must be 0 for the figures to mean anything).

Usage: python bench/poll_capacity.py [--devices 100] [--tags 100] [--duration 30]
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import gc
import json
import os
import platform
import pstats
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil

from drivers.modbus.config import register_count, resolve_address
from drivers.modbus.plan import Span, minimum_requests
from gateway.app import Gateway
from gateway.bus import Subscription
from gateway.config import GatewayConfig, LoadedConfig

BASE_PORT = 15020


def device_configs(
    tag_lists: list[list[dict[str, object]]], base_port: int, interval: float
) -> list[dict[str, object]]:
    return [
        {
            "name": f"bench-{d:03d}",
            "driver": "modbus_tcp",
            "machine": f"machine-{d:03d}",
            "host": "127.0.0.1",
            "port": base_port + d,
            "unit_id": 1,
            "interval": interval,
            "timeout": min(0.5, interval / 2),
            "addressing": "zero_based",
            "tags": [{k: v for k, v in t.items() if v is not None} for t in tag_dicts],
        }
        for d, tag_dicts in enumerate(tag_lists)
    ]


async def serve_simulator(devices: int, tags: int, base_port: int) -> None:
    # Child process only: the gateway process must not carry the simulator's register maps.
    from drivers.modbus.simulator import bench_device  # noqa: PLC0415
    from drivers.modbus.transport import RegisterServer  # noqa: PLC0415

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    import signal  # noqa: PLC0415

    loop.add_signal_handler(signal.SIGTERM, stop.set)
    servers = []
    tag_lists = []
    for d in range(devices):
        device, tag_dicts = bench_device(1, tags, seed=d)
        tag_lists.append(tag_dicts)
        server = RegisterServer([device], host="127.0.0.1", port=base_port + d)
        await server.start()
        servers.append(server)
    print(json.dumps(tag_lists), flush=True)
    await stop.wait()
    for server in servers:
        await server.stop()


async def run_baseline(gw: Gateway, args: argparse.Namespace) -> dict[str, float]:
    """Run bench/bare_loop.py on the gateway's own read plan, against the same simulator."""
    width_fmt = {1: ">H", 2: ">I", 4: ">Q"}
    devices = []
    for driver in gw.drivers:
        plans = driver._plans  # type: ignore[attr-defined]
        requests = [
            [
                r.table.value,
                r.start,
                r.count,
                [[sp.address - r.start, width_fmt.get(sp.count, ">H")] for sp in r.spans],
            ]
            for plan in plans
            for r in plan
        ]
        devices.append(
            {
                "port": int(driver.endpoint.split(":")[1].split("/")[0]),  # type: ignore[attr-defined]
                "requests": requests,
            }
        )
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
        json.dump(devices, f)
    try:
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            str(Path(__file__).with_name("bare_loop.py")),
            f.name,
            str(args.warmup),
            str(args.duration),
            stdout=asyncio.subprocess.PIPE,
        )
        out, _ = await proc.communicate()
    finally:
        os.unlink(f.name)
    result: dict[str, float] = json.loads(out.decode().strip().splitlines()[-1])
    return result


async def measure(
    args: argparse.Namespace, tag_lists: list[list[dict[str, object]]]
) -> dict[str, object]:
    cfg = GatewayConfig.model_validate(
        {
            "gateway": {"site": "bench", "area": "a", "line": "l"},
            "bus": {"queue_size": 1000},
            "devices": device_configs(tag_lists, args.port, args.interval),
        }
    )
    del tag_lists[:]
    minimum = 0
    for device in cfg.devices:
        spans = []
        for i, tag in enumerate(device.tags):
            table, address = resolve_address(device.addressing, tag.table, tag.address)
            spans.append(Span(i, table, address, register_count(tag)))
        minimum += minimum_requests(spans)
    gw = Gateway(LoadedConfig(path=Path("<bench>"), config=cfg))
    del cfg
    baseline = await run_baseline(gw, args) if args.baseline else None
    planned = sum(getattr(d, "requests_per_cycle", 0) for d in gw.drivers)

    received = 0

    async def count(sub: Subscription) -> None:
        nonlocal received
        async for batch in sub:
            received += len(batch)

    gcs0 = [g["collections"] for g in gc.get_stats()]
    stop = asyncio.Event()
    task = asyncio.create_task(gw.run(stop, sinks=[("count", count)]), name="gateway")
    await asyncio.sleep(args.warmup)
    me = psutil.Process()
    cpu0, wall0, recv0 = time.process_time(), time.monotonic(), received
    profiler = cProfile.Profile() if args.profile else None
    if profiler:
        profiler.enable()
    await asyncio.sleep(args.duration)
    if profiler:
        # cProfile roughly doubles the cost of Python calls: use it for shares, not totals.
        profiler.disable()
        pstats.Stats(profiler, stream=sys.stderr).sort_stats("tottime").print_stats(30)
    cpu1, wall1, recv1 = time.process_time(), time.monotonic(), received
    rss_now = me.memory_info().rss
    stop.set()
    await task
    elapsed = wall1 - wall0
    errors = sum(sum(s.errors.values()) for s in gw.statuses.values())
    overruns = sum(s.overruns for s in gw.statuses.values())
    return {
        "values_per_s": round((recv1 - recv0) / elapsed, 1),
        "requests_per_cycle": planned,
        "min_requests_per_cycle": minimum,
        "cpu_pct_of_one_core": round(100 * (cpu1 - cpu0) / elapsed, 2),
        "rss_mb": round(rss_now / 2**20, 1),
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "errors": errors,
        "overruns": overruns,
        "dropped": sum(s.dropped_batches for s in gw.bus.subscriptions),
        "bare_loop_cpu_pct": baseline["cpu_pct_of_one_core"] if baseline else None,
        "bare_loop_values_per_s": baseline["values_per_s"] if baseline else None,
        "cpu_ratio_to_bare_loop": (
            round((cpu1 - cpu0) / elapsed * 100 / baseline["cpu_pct_of_one_core"], 2)
            if baseline
            else None
        ),
        "gc_collections": [g["collections"] - c for g, c in zip(gc.get_stats(), gcs0, strict=True)],
    }


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--devices", type=int, default=100)
    p.add_argument("--tags", type=int, default=100)
    p.add_argument("--interval", type=float, default=1.0)
    p.add_argument("--duration", type=float, default=30.0)
    p.add_argument("--warmup", type=float, default=5.0)
    p.add_argument("--port", type=int, default=BASE_PORT)
    p.add_argument(
        "--no-baseline",
        dest="baseline",
        action="store_false",
        help="skip the bare pymodbus loop reference run",
    )
    p.add_argument("--profile", action="store_true", help="cProfile the window to stderr")
    p.add_argument("--serve-sim", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.serve_sim:
        asyncio.run(serve_simulator(args.devices, args.tags, args.port))
        return 0

    sim = subprocess.Popen(
        [
            sys.executable,
            __file__,
            "--serve-sim",
            "--devices",
            str(args.devices),
            "--tags",
            str(args.tags),
            "--port",
            str(args.port),
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert sim.stdout is not None
        line = sim.stdout.readline()
        if not line.startswith("["):
            raise SystemExit("simulator did not start")
        tag_lists = json.loads(line)
        del line
        sim_proc = psutil.Process(sim.pid)
        sim_cpu0 = sum(sim_proc.cpu_times()[:2])
        t0 = time.monotonic()
        result = asyncio.run(measure(args, tag_lists))
        sim_cpu = sum(sim_proc.cpu_times()[:2]) - sim_cpu0
        result["sim_cpu_pct"] = round(100 * sim_cpu / (time.monotonic() - t0), 1)
    finally:
        sim.terminate()
        sim.wait(timeout=10)
    result = {
        "bench": "poll_capacity",
        "devices": args.devices,
        "tags_per_device": args.tags,
        "interval_s": args.interval,
        "duration_s": args.duration,
        **result,
        "python": platform.python_version(),
        "machine": platform.machine(),
        "cpus": os.cpu_count(),
    }
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""RTU bus throughput: the gateway's own serial code path against the wire's theoretical limit.

The slave is ``bench/rtu_slave.py`` in its own process on one end of a socat pty pair
(``--link socat``, the default), or on the master side of one pty whose tty the gateway opens
(``--link pty``: socat relays every byte through a process of its own, about 0.2 ms a round
trip and over 1 ms at the 90th percentile on a busy 2-core machine, all of it counted against
the gateway; a bare pty takes about 0.05 ms). A pty has no baud rate, so that slave keeps the
wire's time itself: it charges the request's wire time (8 * 11 / baud) and t3.5 before it
answers, then paces the response at 11 bits per character. The master is the gateway's real
path: ``ModbusRtuDriver.read`` (read plan, ``PortOwner`` transaction and its t3.5 of silence
after the answer, pymodbus RTU client, decoding), on the other end. The t3.5 after each
response is therefore kept by the gateway, as on a real line, and not by the slave.

Two measurements, one JSON line each:

1. ``throughput``: one device reading N holding registers (N uint16 tags, one request) in a
   tight loop, for baud 9600, 19200, 115200 * N = 1, 10, 125, against
   ``1 / ((8 + 5 + 2N) * 11 / baud + 2 * t3.5 + turnaround)``, t3.5 = 3.5 * 11 / baud up to
   19200 baud, else 1.75 ms (protocol-limits.md §1.2). The rate is (completions - 1) over the
   time from the first completion to the last, so a 3 tx/s point is not rounded to whole
   transactions. ``ratio_p50`` is the same against the median cycle: what the code path does
   when nothing else on the machine preempts the gateway, the slave or socat (the mean-based
   ``ratio`` is the target; ``load_1min`` says how busy the machine was).
2. ``dead_slave``: five unit ids on one 19200-baud bus, each with its own ``DeviceRunner`` (the
   default breaker: open after 3 failures, 1 s doubling to 30 s), reading 10 registers every
   ``--interval`` with a ``--timeout`` response timeout; the slave serves units 1-4 and ignores
   unit 5. Run once with units 1-4 only and once with all five; reports the healthy devices'
   good polls/s, overruns and worst poll duration after a 1 s warm-up (every runner polls at
   once on start), and what the dead unit cost over the whole run: its timeouts, breaker trips
   and probes, and the requests the slave saw for it (from the slave's own counters).

Then a markdown table on stderr. Runs in about a minute.

``--slave-priority realtime`` runs the slave under SCHED_FIFO where the bench may (the JSON
says whether it did): a slave device keeps its time in hardware, while a normal process on a
busy machine wakes up to milliseconds late for its last byte, which counts against the
gateway. The gateway's side always runs at normal priority, as deployed. The defaults (socat,
normal priority) are the fixture of the figures in README.md; ``--link pty --slave-priority
realtime`` measures the gateway with less of the machine's noise.

Usage: python bench/rtu_bus.py [--seconds 3] [--turnaround 0] [--dead-seconds 10]
       [--link socat|pty] [--slave-priority normal|realtime]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import json
import logging
import os
import select
import statistics
import subprocess
import sys
import tempfile
import time
import tty
from collections import Counter
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, cast

from drivers.base import Driver
from drivers.modbus.config import ModbusRtuDevice
from drivers.modbus.driver import ModbusRtuDriver
from gateway.bus import Bus
from gateway.config import BreakerSection
from gateway.model import Reason
from gateway.runner import Backoff, DeviceRunner
from gateway.status import DeviceStatus

SOCAT = "/usr/bin/socat"
SLAVE = Path(__file__).with_name("rtu_slave.py")
BAUDS = (9600, 19200, 115200)
COUNTS = (1, 10, 125)
TARGET = 0.90
#: Seconds of a dead-slave run before counting starts.
WARMUP = 1.0


def t35(baud: int) -> float:
    return 3.5 * 11 / baud if baud <= 19200 else 0.00175


def theoretical(baud: int, n: int, turnaround: float) -> float:
    """Transactions/s of FC3 reading ``n`` registers: one cycle of protocol-limits.md §1.2."""
    return 1 / ((8 + 5 + 2 * n) * 11 / baud + 2 * t35(baud) + turnaround)


@contextlib.contextmanager
def pty_pair(where: Path) -> Iterator[tuple[str, str]]:
    """Two linked ptys: (the gateway's end, the slave's end)."""
    a, b = str(where / "a"), str(where / "b")
    proc = subprocess.Popen(
        [SOCAT, f"pty,raw,echo=0,link={a}", f"pty,raw,echo=0,link={b}"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 5
        while not (Path(a).exists() and Path(b).exists()):
            if time.monotonic() > deadline or proc.poll() is not None:
                raise RuntimeError("socat did not create the pty pair")
            time.sleep(0.01)
        yield a, b
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=5)


@contextlib.contextmanager
def direct_pty() -> Iterator[tuple[str, int]]:
    """One pty: (the tty the gateway opens, the master descriptor the slave process serves).

    The tty stays open here too, so the slave never sees it hang up while the gateway closes
    and reopens it between points.
    """
    master, tty_fd = os.openpty()
    try:
        tty.setraw(tty_fd)
        yield os.ttyname(tty_fd), master
    finally:
        os.close(master)
        os.close(tty_fd)


class SlaveProcess:
    """``bench/rtu_slave.py`` in its own process, so its pacing never waits for our loop."""

    #: SCHED_FIFO for the slave where allowed (``--slave-priority``); see rtu_slave.py.
    realtime = False

    def __init__(self, port: str | int, baud: int, units: Sequence[int], turnaround: float) -> None:
        self.fds = (port,) if isinstance(port, int) else ()
        self.args = [
            sys.executable,
            str(SLAVE),
            *(("--fd", str(port)) if isinstance(port, int) else ("--port", port)),
            "--baud",
            str(baud),
            "--units",
            ",".join(map(str, units)),
            "--turnaround",
            str(turnaround),
            *(("--realtime",) if self.realtime else ()),
        ]
        self.proc: subprocess.Popen[str] | None = None
        self.stats: dict[str, Any] = {}

    def __enter__(self) -> SlaveProcess:
        proc = subprocess.Popen(self.args, stdout=subprocess.PIPE, text=True, pass_fds=self.fds)
        self.proc = proc
        assert proc.stdout is not None
        ready, _, _ = select.select([proc.stdout], [], [], 5)
        if not ready or proc.stdout.readline().strip() != "ready":
            self.__exit__()
            raise RuntimeError("the RTU slave did not start")
        return self

    def __exit__(self, *exc: object) -> None:
        proc, self.proc = self.proc, None
        if proc is None:
            return
        proc.terminate()
        try:
            out, _ = proc.communicate(timeout=5)
        except subprocess.TimeoutExpired:
            proc.kill()
            out, _ = proc.communicate(timeout=5)
        lines = [line for line in out.splitlines() if line.startswith("{")]
        if lines:
            self.stats = json.loads(lines[-1])


def device(
    name: str, port: str, unit: int, baud: int, n: int, *, timeout: float, interval: float
) -> ModbusRtuDevice:
    return ModbusRtuDevice.model_validate(
        {
            "driver": "modbus_rtu",
            "name": name,
            "machine": name,
            "port": port,
            "baudrate": baud,
            "parity": "N",  # ptys reject parity; the slave still charges 11 bits a character
            "unit_id": unit,
            "timeout": timeout,
            "interval": interval,
            "addressing": "zero_based",
            "tags": [{"name": f"r{i}", "table": "holding", "address": i} for i in range(n)],
        }
    )


async def throughput(
    port: str, slave_port: str | int, baud: int, n: int, turnaround: float, seconds: float
) -> dict[str, Any]:
    driver = ModbusRtuDriver(device("tput", port, 1, baud, n, timeout=1.0, interval=1.0))
    assert driver.requests_per_cycle == 1, driver.describe_plan()
    # At least 20 cycles, however slow the point, but never more than 3 times the asked time.
    min_count = 20
    done: list[float] = []
    errors = 0
    with SlaveProcess(slave_port, baud, [1], turnaround) as slave:
        await driver.connect()
        try:
            for _ in range(3):  # warm-up: the first read includes opening the port
                samples = await driver.read(0)
            if [s.value for s in samples] != list(range(n)):
                raise RuntimeError(f"wrong values from the slave: {samples[:3]}")
            clock = time.perf_counter
            start = clock()
            while clock() - start < 3 * seconds and (
                clock() - start < seconds or len(done) < min_count
            ):
                samples = await driver.read(0)
                if any(s.reason is not Reason.NONE for s in samples):
                    errors += 1
                done.append(clock())
        finally:
            await driver.close()
    measured = (len(done) - 1) / (done[-1] - done[0])
    cycle_p50 = statistics.median(b - a for a, b in itertools.pairwise(done))
    limit = theoretical(baud, n, turnaround)
    slave_rt = bool(slave.stats.get("realtime"))
    wire_ms = (8 + 5 + 2 * n) * 11 / baud * 1000
    return {
        "bench": "rtu_throughput",
        "link": "socat" if isinstance(slave_port, str) else "pty",
        "slave_realtime": slave_rt,
        "baud": baud,
        "registers": n,
        "turnaround_ms": turnaround * 1000,
        "transactions": len(done),
        "tx_per_s": round(measured, 2),
        "theoretical_tx_per_s": round(limit, 2),
        "ratio": round(measured / limit, 3),
        "ok": measured / limit >= TARGET,
        "wire_ms": round(wire_ms, 3),
        "cycle_ms": round(1000 / measured, 3),
        "overhead_ms": round(1000 / measured - 1000 / limit, 3),
        "cycle_ms_p50": round(1000 * cycle_p50, 3),
        "ratio_p50": round(1 / cycle_p50 / limit, 3),
        "load_1min": round(os.getloadavg()[0], 2),
        "errors": errors,
    }


async def run_line(
    port: str,
    slave_port: str | int,
    units: Sequence[int],
    served: Sequence[int],
    args: argparse.Namespace,
) -> dict[str, Any]:
    drivers = [
        ModbusRtuDriver(
            device(f"unit{u}", port, u, 19200, 10, timeout=args.timeout, interval=args.interval)
        )
        for u in units
    ]
    bus = Bus()
    stop = asyncio.Event()
    statuses = [DeviceStatus(d.name, d.name, d.kind, d.endpoint) for d in drivers]
    # Default phases (spread by name) and the default breaker: what the gateway runs.
    brk = BreakerSection()
    runners = [
        # cast: mypy holds the Driver protocol's mutable Sequence attributes invariant against
        # the drivers' tuples; the gateway meets no such check, its registry is untyped.
        DeviceRunner(
            cast("Driver", d),
            bus,
            s,
            connect_timeout=1.0,
            backoff=Backoff(base=brk.open_min, cap=brk.open_max),
            failures_to_open=brk.failures,
        )
        for d, s in zip(drivers, statuses, strict=True)
    ]
    slave = SlaveProcess(slave_port, 19200, served, 0.0)
    with slave:
        tasks = [asyncio.create_task(r.run(stop), name=r.driver.name) for r in runners]
        try:
            # Every runner polls at once on start; that burst is not the steady state.
            await asyncio.sleep(WARMUP)
            good0 = [s.good_polls for s in statuses]
            overruns0 = [s.overruns for s in statuses]
            for s in statuses:
                s.max_duration = 0.0
            await asyncio.sleep(args.dead_seconds)
            good = [s.good_polls - g for s, g in zip(statuses, good0, strict=True)]
            overruns = [s.overruns - o for s, o in zip(statuses, overruns0, strict=True)]
        finally:
            stop.set()
            await asyncio.wait_for(asyncio.gather(*tasks), 5)
    is_healthy = [u in served for u in units]
    healthy = [s for s, ok in zip(statuses, is_healthy, strict=True) if ok]
    dead = [s for s, ok in zip(statuses, is_healthy, strict=True) if not ok]
    good_polls = sum(g for g, ok in zip(good, is_healthy, strict=True) if ok)
    out: dict[str, Any] = {
        "units": list(units),
        "healthy_good_polls_per_s": round(good_polls / args.dead_seconds, 2),
        "healthy_expected_polls_per_s": round(len(healthy) / args.interval, 2),
        "healthy_overruns": sum(o for o, ok in zip(overruns, is_healthy, strict=True) if ok),
        "healthy_errors": sum(sum(s.errors.values()) for s in healthy),
        "healthy_error_kinds": dict(sum((s.errors for s in healthy), Counter())),
        "healthy_max_poll_ms": round(max(s.max_duration for s in healthy) * 1000, 1),
    }
    if dead:
        # Counted over the whole run, warm-up included: the first failure is in it.
        st = dead[0]
        failures = sum(st.errors.values())
        requests = sum(int(v) for k, v in slave.stats.get("ignored", {}).items())
        out.update(
            {
                "dead_timeouts": st.errors.get("timeout", 0),
                "dead_failures": failures,
                "breaker_failures_to_open": brk.failures,
                "dead_breaker_trips": st.breaker_trips,
                # Each open period ends with one probe.
                "dead_probes": st.probes,
                "dead_skipped_polls": st.skipped_polls,
                "dead_requests_seen_by_slave": requests,
                # What the breaker promises: after the threshold, one request per open period.
                "dead_requests_after_threshold_per_probe": round(
                    (requests - brk.failures) / max(st.probes, 1), 2
                ),
                "dead_connects": st.connects,
            }
        )
    return out


async def dead_slave(port: str, slave_port: str | int, args: argparse.Namespace) -> dict[str, Any]:
    without = await run_line(port, slave_port, [1, 2, 3, 4], [1, 2, 3, 4], args)
    with_dead = await run_line(port, slave_port, [1, 2, 3, 4, 5], [1, 2, 3, 4], args)
    return {
        "bench": "rtu_dead_slave",
        "baud": 19200,
        "registers": 10,
        "interval_s": args.interval,
        "timeout_s": args.timeout,
        "seconds": args.dead_seconds,
        "without_dead": without,
        "with_dead": with_dead,
        "healthy_polls_lost_pct": round(
            100 * (1 - with_dead["healthy_good_polls_per_s"] / without["healthy_good_polls_per_s"]),
            1,
        ),
    }


def table(points: Sequence[dict[str, Any]]) -> str:
    rows = [
        "| baud | N | measured tx/s | theoretical tx/s | ratio | wire ms | cycle ms | ≥ 90% "
        "| ratio (median cycle) |",
        "|---:|---:|---:|---:|---:|---:|---:|:---:|---:|",
    ]
    rows += [
        f"| {p['baud']} | {p['registers']} | {p['tx_per_s']:.1f} | "
        f"{p['theoretical_tx_per_s']:.1f} | {100 * p['ratio']:.1f}% | {p['wire_ms']:.2f} | "
        f"{p['cycle_ms']:.2f} | {'yes' if p['ok'] else 'no'} | {100 * p['ratio_p50']:.1f}% |"
        for p in points
    ]
    return "\n".join(rows)


async def main(args: argparse.Namespace) -> None:
    points: list[dict[str, Any]] = []
    with contextlib.ExitStack() as stack:
        port: str
        slave_port: str | int
        if args.link == "socat":
            tmp = stack.enter_context(tempfile.TemporaryDirectory())
            port, slave_port = stack.enter_context(pty_pair(Path(tmp)))
        else:
            port, slave_port = stack.enter_context(direct_pty())
        for baud in BAUDS if not args.dead_only else ():
            for n in COUNTS:
                point = await throughput(port, slave_port, baud, n, args.turnaround, args.seconds)
                print(json.dumps(point), flush=True)
                points.append(point)
        if args.dead_seconds > 0:
            print(json.dumps(await dead_slave(port, slave_port, args)), flush=True)
    if points:
        print(table(points), file=sys.stderr)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=3.0, help="per throughput point")
    parser.add_argument("--turnaround", type=float, default=0.0, help="slave turnaround, s")
    parser.add_argument("--dead-seconds", type=float, default=10.0, help="per dead-slave run")
    parser.add_argument("--interval", type=float, default=0.2, help="dead-slave poll interval")
    parser.add_argument("--dead-only", action="store_true", help="skip the throughput points")
    parser.add_argument(
        "--link", choices=("socat", "pty"), default="socat", help="the slave's end of the line"
    )
    parser.add_argument(
        "--slave-priority",
        choices=("normal", "realtime"),
        default="normal",
        help="SCHED_FIFO for the slave process where allowed",
    )
    parser.add_argument("--timeout", type=float, default=0.2, help="dead-slave response timeout")
    # The dead unit's failures are logged once by the runner; the JSON has the counts.
    logging.basicConfig(level=logging.ERROR)
    cli = parser.parse_args()
    SlaveProcess.realtime = cli.slave_priority == "realtime"
    asyncio.run(main(cli))

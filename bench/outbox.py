"""Outbox cost: what store-and-forward costs the event loop and the SD card.

Messages look like the MQTT sink's per-tag values: a 52-byte UNS topic and a ~110-byte JSON
payload. Measured, in a fresh file per case, in the directory given (default: a temporary
directory; pass the gateway's data directory to measure the real card):

- ``put_us``: one ``put(deliverable=False)`` of a 100-message batch (one transaction), per
  fsync policy: median, p99 and max over ``--batches`` batches, in µs (the max is usually a
  WAL checkpoint: about every 4 MB, SQLite copies the WAL into the file and, unless fsync is
  off, syncs both).
- ``live_us_per_msg``: the connected path, per message: ``put(deliverable=True)`` of a batch
  of 100, ``next_live`` and ``acked`` of the same (no I/O).
- ``replay_msgs_per_s``: ``next_replay`` + ``acked`` (batched deletes included) until a
  store of ``--batches`` x 100 messages is empty, rate limit off.
- ``db_bytes_per_msg``: the closed file's size (WAL checkpointed) over the messages in it;
  ``payload_bytes_per_msg`` is topic plus payload, what ``max_bytes`` counts.

Usage: python bench/outbox.py [--batches 300] [--dir DIR]. Prints one JSON line; takes a few
seconds (fsync full dominates on a slow disk).
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import tempfile
import time
from pathlib import Path

from gateway.outbox import Message, Outbox

BATCH = 100


def messages(start: int) -> list[Message]:
    now_ms = int(time.time() * 1000)
    return [
        Message(
            f"uns/plant-1/machining/line-1/lathe-{i % 8}/spindle_speed_{i % 50:02d}",
            b'{"value":%d,"unit":"rpm","quality":"good","ts":"2026-11-21T06:50:00.123Z",'
            b'"ts_ms":%d}' % (i, now_ms),
            0,
            False,
            now_ms,
        )
        for i in range(start, start + BATCH)
    ]


def open_box(path: Path, fsync: str) -> Outbox:
    return Outbox(
        path,
        max_bytes=1 << 32,
        max_age_s=math.inf,
        fsync=fsync,  # type: ignore[arg-type]
        window=1 << 20,
        replay_rate=math.inf,
    ).open()


def percentile(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(p / 100 * (len(ordered) - 1)))]


def bench_put(directory: Path, fsync: str, batches: int) -> dict[str, float]:
    path = directory / f"put-{fsync}.sqlite"
    box = open_box(path, fsync)
    prepared = [messages(b * BATCH) for b in range(batches)]
    times: list[float] = []
    for batch in prepared:
        t0 = time.perf_counter()
        box.put(batch, deliverable=False)
        times.append((time.perf_counter() - t0) * 1e6)
    assert box.stats["disk_batches"] == batches
    box.close()
    return {
        "p50": round(statistics.median(times), 1),
        "p99": round(percentile(times, 99), 1),
        "max": round(max(times), 1),
    }


def bench_live(directory: Path, batches: int) -> float:
    box = open_box(directory / "live.sqlite", "normal")
    prepared = [messages(b * BATCH) for b in range(batches)]
    t0 = time.perf_counter()
    for batch in prepared:
        box.put(batch, deliverable=True)
        box.acked([s.id for s in box.next_live(BATCH)])
    elapsed = time.perf_counter() - t0
    assert box.stats["disk_batches"] == 0
    box.close()
    return round(elapsed / (batches * BATCH) * 1e6, 2)


def bench_replay_and_size(directory: Path, batches: int) -> dict[str, float]:
    path = directory / "replay.sqlite"
    box = open_box(path, "normal")
    total = batches * BATCH
    payload = 0
    for b in range(batches):
        batch = messages(b * BATCH)
        payload += sum(len(m.topic.encode()) + len(m.payload) for m in batch)
        box.put(batch, deliverable=False)
    box.close()
    size = path.stat().st_size
    box = open_box(path, "normal")
    done = 0
    t0 = time.perf_counter()
    for _ in range(total):
        out = box.next_replay(BATCH)
        if not out:
            break
        box.acked([s.id for s in out])
        done += len(out)
    elapsed = time.perf_counter() - t0
    assert done == total
    assert box.stats["stored"] == 0
    box.close()
    return {
        "replay_msgs_per_s": round(total / elapsed),
        "db_bytes_per_msg": round(size / total, 1),
        "payload_bytes_per_msg": round(payload / total, 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batches", type=int, default=300)
    parser.add_argument("--dir", type=Path, default=None)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(dir=args.dir, prefix="outbox-bench-") as tmp:
        directory = Path(tmp)
        put = {fsync: bench_put(directory, fsync, args.batches) for fsync in ("off", "normal")}
        # One fsync per batch: fewer batches keep a slow card's run short.
        put["full"] = bench_put(directory, "full", min(args.batches, 100))
        result = {
            "batch": BATCH,
            "put_us": put,
            "live_us_per_msg": bench_live(directory, args.batches),
            **bench_replay_and_size(directory, args.batches),
        }
    print(json.dumps(result))


if __name__ == "__main__":
    main()

"""The benchmarks' MQTT receiver: counts delivered values and measures latency.

Receiving is done by ``mosquitto_sub`` (C), which stamps each message with its own receipt time
(``-F %U``), so a slow Python parser here cannot add latency or drop messages. Retained
messages are skipped (``-R``): only live deliveries count.

Latency probes are tags whose name ends in ``_uint64``: the simulator stores its wall clock (ms)
there at the moment it answers the read, so ``receipt time - value`` is the time from the
device's answer to delivery, without the wait for the poll slot (the poll phase).

Usage: mqtt_counter.py HOST PORT TOPIC. Prints "ready" once subscribed, then reads one line
``START_EPOCH END_EPOCH`` on stdin (the gateway's measurement window), counts what arrives in
that window and prints one JSON line.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import threading
import time


def percentile(sorted_values: list[float], p: float) -> float | None:
    if not sorted_values:
        return None
    k = min(len(sorted_values) - 1, round(p / 100 * (len(sorted_values) - 1)))
    return round(sorted_values[k], 2)


def main() -> None:
    host, port, topic = sys.argv[1], sys.argv[2], sys.argv[3]
    exe = shutil.which("mosquitto_sub") or "/usr/bin/mosquitto_sub"
    sub = subprocess.Popen(
        [exe, "-h", host, "-p", port, "-t", topic, "-q", "0", "-R", "-F", "%U %t %p"],
        stdout=subprocess.PIPE,
        text=True,
        bufsize=1,
    )
    window: list[float] = []
    stats = {"values": 0, "messages": 0}
    latencies: list[float] = []

    def reader() -> None:
        assert sub.stdout is not None
        for line in sub.stdout:
            stamp, _, rest = line.partition(" ")
            topic_name, _, payload = rest.partition(" ")
            if not window or ("/$" in topic_name and "/$device/" not in topic_name):
                continue
            received = float(stamp)
            if not window[0] <= received <= window[1]:
                continue
            body = json.loads(payload)
            stats["messages"] += 1
            if "values" in body:  # one message per device poll
                stats["values"] += len(body["values"])
                probes = [(n, v.get("value")) for n, v in body["values"].items()]
            else:
                stats["values"] += 1
                probes = [(topic_name, body.get("value"))]
            for name, value in probes:
                if name.endswith("_uint64") and isinstance(value, int):
                    latencies.append(received * 1000 - value)

    thread = threading.Thread(target=reader, name="mosquitto_sub-reader", daemon=True)
    thread.start()
    time.sleep(1.0)  # let mosquitto_sub subscribe
    print("ready", flush=True)
    start, end = (float(x) for x in sys.stdin.readline().split())
    window.extend((start, end))
    time.sleep(max(0.0, end - time.time()) + 1.0)
    sub.terminate()
    sub.wait(timeout=10)
    thread.join(timeout=10)
    elapsed = end - start
    lat = sorted(latencies)
    print(
        json.dumps(
            {
                "delivered_values_per_s": round(stats["values"] / elapsed, 1),
                "messages_per_s": round(stats["messages"] / elapsed, 1),
                "latency_samples": len(lat),
                "latency_ms_p50": percentile(lat, 50),
                "latency_ms_p99": percentile(lat, 99),
                "latency_ms_max": round(lat[-1], 2) if lat else None,
            }
        ),
        flush=True,
    )


if __name__ == "__main__":
    main()

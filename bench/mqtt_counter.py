"""An MQTT subscriber for the benchmarks: counts delivered values and measures latency.

A reference peer, not product code: it uses paho directly and runs in its own process so that
its CPU is not charged to the gateway. Latency probes are tags whose name ends in ``_uint64``:
the simulator stores its wall clock (ms) there at the moment it answers the read, so
``receipt time - value`` is the time from the device's answer to MQTT delivery, without the
wait for the poll slot (the poll phase).

Usage: mqtt_counter.py HOST PORT TOPIC WARMUP_S DURATION_S
Prints "ready" once subscribed, then one JSON line when done.
"""

from __future__ import annotations

import json
import sys
import threading
import time

import paho.mqtt.client as mqtt


def percentile(sorted_values: list[float], p: float) -> float | None:
    if not sorted_values:
        return None
    k = min(len(sorted_values) - 1, round(p / 100 * (len(sorted_values) - 1)))
    return round(sorted_values[k], 2)


def main() -> None:
    host, port, topic = sys.argv[1], int(sys.argv[2]), sys.argv[3]
    warmup, duration = float(sys.argv[4]), float(sys.argv[5])
    counting = threading.Event()
    values = 0
    messages = 0
    latencies: list[float] = []
    lock = threading.Lock()

    def on_message(client: mqtt.Client, userdata: object, msg: mqtt.MQTTMessage) -> None:
        nonlocal values, messages
        now_ms = time.time() * 1000
        if (
            not counting.is_set()
            or msg.retain
            or ("/$" in msg.topic and "/$device/" not in msg.topic)
        ):
            return
        body = json.loads(msg.payload)
        with lock:
            messages += 1
            if "values" in body:  # per-device batch
                values += len(body["values"])
                for name, v in body["values"].items():
                    if name.endswith("_uint64") and isinstance(v.get("value"), int):
                        latencies.append(now_ms - v["value"])
            else:
                values += 1
                if msg.topic.endswith("_uint64") and isinstance(body.get("value"), int):
                    latencies.append(now_ms - body["value"])

    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="bench-counter")
    client.on_message = on_message
    client.connect(host, port)
    client.subscribe(topic, qos=0)
    client.loop_start()
    try:
        print("ready", flush=True)
        time.sleep(warmup)
        counting.set()
        t0 = time.monotonic()
        time.sleep(duration)
        counting.clear()
        elapsed = time.monotonic() - t0
    finally:
        client.loop_stop()
        client.disconnect()
    lat = sorted(latencies)
    print(
        json.dumps(
            {
                "delivered_values_per_s": round(values / elapsed, 1),
                "messages_per_s": round(messages / elapsed, 1),
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

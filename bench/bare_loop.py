"""The floor: a bare pymodbus polling loop doing the same requests and decodes as the gateway.

This is a *reference*, not product code, so it talks to pymodbus directly instead of through
our façade (drivers/modbus/transport.py): it measures what Python and pymodbus cost with no
architecture at all. poll_capacity.py runs it against the same simulator in the same run and
reports the gateway's CPU as a ratio of this.

Input (argv[1]): a JSON file with, per device, the port and the gateway's own read plan:
``[{"port": 15020, "requests": [["holding", 0, 100, [[offset, ">f"], ...]], ...]}, ...]``.
Prints one JSON line: values_per_s and cpu_pct_of_one_core over the measured window.
"""

from __future__ import annotations

import asyncio
import json
import struct
import sys
import time

from pymodbus.client import AsyncModbusTcpClient


async def poll_device(
    port: int, requests: list[list[object]], stop: asyncio.Event, counter: list[int]
) -> None:
    client = AsyncModbusTcpClient("127.0.0.1", port=port, reconnect_delay=0, timeout=0.5)
    await client.connect()
    compiled = [
        (table, start, count, [(off, struct.Struct(fmt)) for off, fmt in tags])
        for table, start, count, tags in requests  # type: ignore[misc]
    ]
    loop = asyncio.get_running_loop()
    due = loop.time()
    latest: dict[tuple[int, int], object] = {}
    try:
        while not stop.is_set():
            for table, start, count, tags in compiled:
                if table == "holding":
                    rr = await client.read_holding_registers(start, count=count, device_id=1)
                else:
                    rr = await client.read_input_registers(start, count=count, device_id=1)
                buf = struct.pack(f">{count}H", *rr.registers)
                for off, st in tags:
                    latest[(start, off)] = (st.unpack_from(buf, off * 2)[0], time.time())
                counter[0] += len(tags)
            due += 1.0
            await asyncio.sleep(max(0.0, due - loop.time()))
    finally:
        client.close()


async def main(path: str, warmup: float, duration: float) -> None:
    with open(path) as f:  # noqa: ASYNC230 - read once before anything runs
        devices = json.load(f)
    stop = asyncio.Event()
    counter = [0]
    tasks = [
        asyncio.create_task(poll_device(d["port"], d["requests"], stop, counter)) for d in devices
    ]
    await asyncio.sleep(warmup)
    cpu0, wall0, n0 = time.process_time(), time.monotonic(), counter[0]
    await asyncio.sleep(duration)
    cpu1, wall1, n1 = time.process_time(), time.monotonic(), counter[0]
    stop.set()
    await asyncio.gather(*tasks)
    elapsed = wall1 - wall0
    print(
        json.dumps(
            {
                "values_per_s": round((n1 - n0) / elapsed, 1),
                "cpu_pct_of_one_core": round(100 * (cpu1 - cpu0) / elapsed, 2),
            }
        )
    )


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1], float(sys.argv[2]), float(sys.argv[3])))

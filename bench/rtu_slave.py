"""A Modbus RTU slave that keeps the wire's time on a pty, for benches.

A pty moves bytes as fast as the kernel copies them, so a slave on one answers far sooner than
any RS-485 slave could, and a master measured against it looks faster than the bus allows.
This one keeps a virtual wire clock instead (11 bits per character, as 8E1 or 8N2; the pty
itself runs 8N1 because ptys reject parity):

- A request is taken to start on the wire when its first byte arrives; its last byte is on
  the wire ``len * Tc`` later. The frame ends after t3.5 of silence past that instant, which
  is detected for real (``select`` until then; any byte arriving meanwhile extends the frame).
  The request's wire time is charged here, not on the master side: the master is the
  gateway's own code, which writes the whole frame at once, as it does to a real UART.
- After the configurable turnaround (default 0) the response goes out paced: byte ``i`` is
  written when it would have finished on the wire, so the last one arrives
  ``(5 + 2N) * 11 / baud`` after the first bit. The t3.5 after the response is the master's
  to keep (the gateway's ``PortOwner`` does).
- FC3 (read holding registers) only; register ``a`` holds ``a``. Other function codes get
  ILLEGAL FUNCTION, bad quantities ILLEGAL DATA VALUE. A bad CRC, or a unit id not served,
  gets silence, as on a real bus.

Pure Python on the file descriptor (no pymodbus, no pyserial), so the peer shares no code
with the master it measures. On SIGTERM it prints one JSON line of counters and exits.

``--fd N`` instead of ``--port``: serve an inherited file descriptor, the master side of a pty
whose tty the master under test opens (no socat process between the two; see rtu_bus.py).

``--realtime``: run under SCHED_FIFO if allowed (root or CAP_SYS_NICE; otherwise as before, and
the JSON line says so). A slave's timing is hardware's on a real line; on a busy machine a
normal process wakes up to milliseconds late for its last byte, and that lateness would be
counted against the master. It sleeps in select or time.sleep between frames and spins at most
0.2 ms before a byte is due, so it takes a CPU from nobody for long.

Usage: python bench/rtu_slave.py (--port PTY | --fd N) --baud 19200 --units 1,2,3,4
       [--turnaround 0]
"""

from __future__ import annotations

import argparse
import json
import os
import select
import signal
import sys
import termios
import time
import tty
from collections import Counter


def _crc_table() -> list[int]:
    table = []
    for byte in range(256):
        crc = byte
        for _ in range(8):
            crc = (crc >> 1) ^ 0xA001 if crc & 1 else crc >> 1
        table.append(crc)
    return table


_TABLE = _crc_table()


def crc16(data: bytes | bytearray) -> bytes:
    """CRC-16/MODBUS of ``data``, in wire order (low byte first)."""
    crc = 0xFFFF
    for b in data:
        crc = (crc >> 8) ^ _TABLE[(crc ^ b) & 0xFF]
    return crc.to_bytes(2, "little")


def char_time(baud: int) -> float:
    return 11 / baud


def t35(baud: int) -> float:
    return 3.5 * char_time(baud) if baud <= 19200 else 0.00175


def answer(frame: bytes) -> bytes:
    """The response ADU to a request ADU whose CRC has been checked."""
    unit, fc = frame[0], frame[1]
    if fc != 3 or len(frame) != 8:
        return _exception(unit, fc, 1)
    start = int.from_bytes(frame[2:4], "big")
    count = int.from_bytes(frame[4:6], "big")
    if not 1 <= count <= 125 or start + count > 0x10000:
        return _exception(unit, fc, 3)
    body = bytearray((unit, 3, 2 * count))
    for address in range(start, start + count):
        body += address.to_bytes(2, "big")
    return bytes(body) + crc16(body)


def _exception(unit: int, fc: int, code: int) -> bytes:
    body = bytes((unit, fc | 0x80, code))
    return body + crc16(body)


def _sleep_until(deadline: float, spin: float = 0.0002) -> None:
    # time.sleep overshoots by ~0.1 ms; sleep short of the deadline and spin the rest, so the
    # last byte of a frame lands on time even at 115200 baud (Tc = 95 µs).
    remaining = deadline - time.perf_counter()
    if remaining > spin:
        time.sleep(remaining - spin)
    while time.perf_counter() < deadline:
        pass


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def send_paced(fd: int, data: bytes, start: float, tc: float, quantum: float) -> None:
    """Write ``data`` so that byte ``i`` leaves at ``start + (i + 1) * tc``.

    Bytes due within ``quantum`` of each other go out in one write: one wake-up per byte at
    115200 baud would cost more than the byte. The last byte is never early.
    """
    sent, total = 0, len(data)
    while sent < total:
        now = time.perf_counter()
        due = min(total, int((now - start) / tc))
        if due > sent:
            _write_all(fd, data[sent:due])
            sent = due
            continue
        next_due = start + (sent + 1) * tc
        last_due = start + total * tc
        _sleep_until(min(max(next_due, now + quantum), last_due))


class Slave:
    def __init__(self, fd: int, baud: int, units: set[int], turnaround: float, quantum: float):
        self.fd = fd
        self.baud = baud
        self.tc = char_time(baud)
        self.silence = t35(baud)
        self.units = units
        self.turnaround = turnaround
        self.quantum = quantum
        self.answered: Counter[int] = Counter()
        self.ignored: Counter[int] = Counter()
        self.bad_crc = 0
        self.stopping = False
        self.realtime = False

    def serve(self) -> None:
        buf = bytearray()
        first = 0.0
        while not self.stopping:
            if buf:
                # Virtual end of the frame on the wire, then t3.5 of silence ends it.
                end = first + len(buf) * self.tc + self.silence
                timeout = max(0.0, end - time.perf_counter())
            else:
                timeout = 0.2
            try:
                ready, _, _ = select.select([self.fd], [], [], timeout)
            except InterruptedError:
                continue
            if ready:
                try:
                    data = os.read(self.fd, 4096)
                except OSError:
                    # The master side closed (EIO on a pty): wait for it to reopen.
                    time.sleep(0.01)
                    continue
                if not buf:
                    first = time.perf_counter()
                buf += data
                continue
            if buf:
                end = first + len(buf) * self.tc + self.silence
                self._frame(bytes(buf), end)
                buf.clear()

    def _frame(self, frame: bytes, end: float) -> None:
        if len(frame) < 4 or crc16(frame[:-2]) != frame[-2:]:
            self.bad_crc += 1
            return
        unit = frame[0]
        if unit not in self.units:
            self.ignored[unit] += 1
            return
        response = answer(frame)
        self.answered[unit] += 1
        send_paced(self.fd, response, end + self.turnaround, self.tc, self.quantum)

    def stats(self) -> dict[str, object]:
        return {
            "answered": {str(k): v for k, v in sorted(self.answered.items())},
            "ignored": {str(k): v for k, v in sorted(self.ignored.items())},
            "bad_crc": self.bad_crc,
            "realtime": self.realtime,
        }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    where = parser.add_mutually_exclusive_group(required=True)
    where.add_argument("--port", help="the slave's end of a pty pair")
    where.add_argument("--fd", type=int, help="an inherited descriptor: a pty's master side")
    parser.add_argument("--baud", type=int, default=19200)
    parser.add_argument("--units", default="1", help="unit ids served, comma separated")
    parser.add_argument("--turnaround", type=float, default=0.0, help="seconds")
    parser.add_argument(
        "--quantum", type=float, default=0.0005, help="coarsest pacing step, seconds"
    )
    parser.add_argument("--realtime", action="store_true", help="SCHED_FIFO if allowed")
    args = parser.parse_args()
    realtime = False
    if args.realtime:
        try:
            os.sched_setscheduler(0, os.SCHED_FIFO, os.sched_param(10))
            realtime = True
        except (AttributeError, OSError):
            pass
    fd = args.fd if args.port is None else os.open(args.port, os.O_RDWR | os.O_NOCTTY)
    tty.setraw(fd)
    termios.tcflush(fd, termios.TCIOFLUSH)
    units = {int(u) for u in args.units.split(",") if u}
    slave = Slave(fd, args.baud, units, args.turnaround, args.quantum)
    slave.realtime = realtime

    def stop(signum: int, frame: object) -> None:
        slave.stopping = True

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    print("ready", flush=True)
    try:
        slave.serve()
    finally:
        os.close(fd)
        print(json.dumps(slave.stats()), flush=True)
    sys.exit(0)


if __name__ == "__main__":
    main()

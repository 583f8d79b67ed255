"""A noisy RS-485 line: replies with a broken CRC or with noise in them, between real peers.

The gateway's RTU driver sits on one pty pair, pymodbus's serial server (two slaves) on a
second one, and a relay in this test copies bytes between the two, damaging a chosen number
of one slave's replies on the way, as a bad cable or a missing terminator does.

What pymodbus 3.16 does with a damaged reply (framer/rtu.py ``FramerRTU.decode``): a frame
whose CRC does not match is dropped without a word (a debug log line), together with
everything else in its receive buffer, and the request then runs into its response timeout.
The client cannot tell it from silence, so neither can the gateway: a damaged reply is
counted as a timeout, costs one response timeout of line time, and makes that poll Bad.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import termios
import tty
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from drivers.modbus import serial_bus
from drivers.modbus.config import ModbusRtuDevice, Table
from drivers.modbus.driver import ModbusRtuDriver
from drivers.modbus.simulator import RegisterMapDevice
from drivers.modbus.transport import RegisterServer
from gateway.bus import Bus, Subscription
from gateway.model import Quality, Reading, Reason
from gateway.runner import Backoff, DeviceRunner
from gateway.status import DeviceState, DeviceStatus
from tests.ptys import SOCAT, PtyPair

pytestmark = [
    pytest.mark.skipif(not Path(SOCAT).exists(), reason="socat is not installed"),
    pytest.mark.timeout(30),
]

#: How long a partial reply may wait for its remaining bytes before it is passed on as is.
_REASSEMBLY = 0.1


def _reply_length(buf: bytes | bytearray) -> int | None:
    """Length of the RTU reply at the start of ``buf``, or None until it can be told."""
    if len(buf) < 3:
        return None
    function = buf[1]
    if function & 0x80:
        return 5  # unit, function | 0x80, exception code, CRC
    if function in (1, 2, 3, 4):
        return 5 + buf[2]  # unit, function, byte count, data, CRC
    if function in (5, 6, 15, 16):
        return 8
    return len(buf)  # not a reply we know: pass it on whole


Damage = Callable[[bytes, random.Random], bytes]


def flip_crc(frame: bytes, rng: random.Random) -> bytes:
    # One bit of the CRC's high byte: the data stays plausible, only the check fails.
    return frame[:-1] + bytes([frame[-1] ^ (1 << rng.randrange(8))])


def noise_before(frame: bytes, rng: random.Random) -> bytes:
    # Noise whose second byte has the top bit set reads as the start of an exception reply;
    # its CRC fails and pymodbus drops the whole buffer, the real reply with it. At most three
    # bytes, so that the would-be 5-byte frame always reaches into the real reply. (Noise that
    # cannot start a frame is skipped by pymodbus's hunting and the reply still read.)
    noise = bytes([rng.randrange(256), rng.randrange(0x80, 0x100)])
    return noise + rng.randbytes(rng.randint(0, 1)) + frame


def noise_inside(frame: bytes, rng: random.Random) -> bytes:
    # Bytes inserted after the byte count: the frame is as long as announced, but wrong.
    return frame[:3] + rng.randbytes(rng.randint(1, 4)) + frame[3:]


DAMAGES: dict[str, Damage] = {
    "crc": flip_crc,
    "noise_before": noise_before,
    "noise_inside": noise_inside,
}


class Relay:
    """The line between the gateway's pty pair and the slaves' pty pair, with a fault box.

    Requests pass unchanged. Replies are reassembled into frames (their length follows from
    the function code and byte count) so that only the chosen slave's replies are damaged, and
    only as many as asked. Thread-free: ``add_reader`` on both pty ends.
    """

    def __init__(self, master: str, slaves: str, seed: int = 0) -> None:
        self.master_path = master
        self.slaves_path = slaves
        self.rng = random.Random(seed)
        self.unit = 0
        self.remaining = 0
        self.damage: Damage = flip_crc
        self.damaged = 0
        self.replies = 0
        self._master: int | None = None
        self._slaves: int | None = None
        self._buf = bytearray()
        self._flush: asyncio.TimerHandle | None = None

    def corrupt(self, unit: int, damage: Damage, replies: int) -> None:
        """Damage the next ``replies`` replies of ``unit``."""
        self.unit, self.damage, self.remaining = unit, damage, replies

    async def __aenter__(self) -> Relay:
        loop = asyncio.get_running_loop()
        for path in (self.master_path, self.slaves_path):
            fd = os.open(path, os.O_RDWR | os.O_NOCTTY | os.O_NONBLOCK)
            tty.setraw(fd, termios.TCSANOW)
            if path == self.master_path:
                self._master = fd
                loop.add_reader(fd, self._from_master)
            else:
                self._slaves = fd
                loop.add_reader(fd, self._from_slaves)
        return self

    async def __aexit__(self, *exc: object) -> None:
        loop = asyncio.get_running_loop()
        if self._flush is not None:
            self._flush.cancel()
        for fd in (self._master, self._slaves):
            if fd is not None:
                loop.remove_reader(fd)
                os.close(fd)
        self._master = self._slaves = None

    @staticmethod
    def _read(fd: int | None) -> bytes:
        if fd is None:
            return b""
        try:
            return os.read(fd, 4096)
        except (BlockingIOError, InterruptedError):
            return b""
        except OSError:
            return b""  # EIO: the other end of this pty is closed right now

    @staticmethod
    def _write(fd: int | None, data: bytes) -> None:
        if fd is not None and data:
            # Nobody listening: a real line loses the bytes too.
            with contextlib.suppress(OSError):
                os.write(fd, data)

    def _from_master(self) -> None:
        self._write(self._slaves, self._read(self._master))

    def _from_slaves(self) -> None:
        self._buf += self._read(self._slaves)
        # Every pass takes at least one byte off the buffer, so this ends.
        for _ in range(len(self._buf)):
            n = _reply_length(self._buf)
            if n is None or len(self._buf) < n:
                break
            frame = bytes(self._buf[:n])
            del self._buf[:n]
            self._pass(frame)
        if self._flush is not None:
            self._flush.cancel()
            self._flush = None
        if self._buf:
            self._flush = asyncio.get_running_loop().call_later(_REASSEMBLY, self._pass_rest)

    def _pass_rest(self) -> None:
        self._flush = None
        rest, self._buf = bytes(self._buf), bytearray()
        self._write(self._master, rest)

    def _pass(self, frame: bytes) -> None:
        self.replies += 1
        if self.remaining > 0 and frame[0] == self.unit:
            self.remaining -= 1
            self.damaged += 1
            frame = self.damage(frame, self.rng)
        self._write(self._master, frame)


@pytest.fixture
def lines(tmp_path: Path) -> Iterator[tuple[PtyPair, PtyPair]]:
    """(gateway side, slave side): the gateway opens ``[0].a``, the slaves serve ``[1].b``."""
    pairs = []
    for name in ("gateway", "slaves"):
        (tmp_path / name).mkdir()
        pair = PtyPair(tmp_path / name)
        pair.start()
        pairs.append(pair)
    try:
        yield pairs[0], pairs[1]
    finally:
        for pair in pairs:
            pair.stop()


def slave(unit: int, base: int) -> RegisterMapDevice:
    dev = RegisterMapDevice(unit)
    dev.serve(Table.HOLDING, 0, 4)
    dev.set(Table.HOLDING, 0, [base + i for i in range(4)])
    return dev


def rtu(name: str, port: str, unit: int) -> ModbusRtuDevice:
    return ModbusRtuDevice.model_validate(
        {
            "driver": "modbus_rtu",
            "name": name,
            "machine": name,
            "port": port,
            "unit_id": unit,
            "parity": "N",  # ptys reject parity
            # Generous for a pty: on a loaded 2-core CI machine a reply through two socat
            # processes and the relay can take tens of milliseconds, and a timeout that is
            # not a damaged reply would spoil the exact counts below.
            "timeout": 0.3,
            "interval": 0.5,
            "addressing": "zero_based",
            "tags": [{"name": f"r{i}", "table": "holding", "address": i} for i in range(4)],
        }
    )


async def until(check: Callable[[], object], within: float, what: str) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + within
    while not check():
        if loop.time() > deadline:
            raise AssertionError(f"not within {within} s: {what}")
        await asyncio.sleep(0.02)


async def collect(sub: Subscription, into: list[Reading]) -> None:
    async for batch in sub:
        into.extend(batch)


def history(readings: list[Reading], key: str) -> list[Reading]:
    return [r for r in readings if r.key == key]


@pytest.mark.parametrize("damage", sorted(DAMAGES))
async def test_damaged_replies_are_bad_counted_and_recover(
    lines: tuple[PtyPair, PtyPair], damage: str
) -> None:
    gateway_side, slave_side = lines
    drivers = [ModbusRtuDriver(rtu(f"d{u}", gateway_side.a, u)) for u in (1, 2)]
    bus = Bus()
    seen: list[Reading] = []
    statuses = [DeviceStatus(d.name, d.name, d.kind, d.endpoint) for d in drivers]
    runners = [
        DeviceRunner(d, bus, s, connect_timeout=1.0, backoff=Backoff(base=0.05, cap=0.1), phase=0.0)
        for d, s in zip(drivers, statuses, strict=True)
    ]
    healthy, victim = statuses
    stop = asyncio.Event()
    async with (
        RegisterServer([slave(1, 100), slave(2, 200)], serial_port=slave_side.b),
        Relay(gateway_side.b, slave_side.a, seed=len(damage)) as relay,
    ):
        for d in drivers:
            bus.register(d.tags, 0.0)
        listener = asyncio.create_task(collect(bus.subscribe("test"), seen), name="collect")
        tasks = [asyncio.create_task(r.run(stop), name=f"runner {r.driver.name}") for r in runners]
        try:
            await until(lambda: victim.good_polls >= 2, 3, "good polls through the relay")
            good_before = healthy.good_polls
            started = asyncio.get_running_loop().time()
            relay.corrupt(2, DAMAGES[damage], replies=3)
            await until(lambda: relay.remaining == 0, 5, "three damaged replies")
            recovered_from = victim.good_polls
            await until(lambda: victim.good_polls >= recovered_from + 3, 5, "recovery")
            elapsed = asyncio.get_running_loop().time() - started
        finally:
            stop.set()
            await asyncio.wait_for(asyncio.gather(*tasks), 5)
            bus.close()
            await asyncio.wait_for(listener, 5)
    assert not serial_bus.owners()
    assert relay.damaged == 3

    # The damaged replies: three Bad polls, each counted. pymodbus drops a reply whose CRC
    # fails without telling its caller; the transport counts the bytes that arrived, so a
    # broken frame is told apart from silence.
    assert victim.errors == {"bad_frame": 3}, victim.errors
    assert "arrived for holding 0+4 of unit 2 but no valid reply" in victim.last_error
    assert victim.state is DeviceState.STOPPED
    tag = history(seen, "d2/r0")
    qualities = "".join("G" if r.quality is Quality.GOOD else "B" for r in tag)
    # Good, then exactly one contiguous run of three Bad polls, then Good again.
    assert qualities.strip("G") == "BBB", qualities
    assert qualities.startswith("GG"), qualities
    assert qualities.endswith("GGG"), qualities
    assert all(r.reason is Reason.BAD_FRAME for r in tag if r.quality is Quality.BAD)
    # A Bad reading keeps the last good value.
    assert all(r.value == 200 for r in tag)

    # The other slave on the same line never noticed, beyond sharing the line's time.
    assert not healthy.errors, healthy.errors
    assert all(r.quality is Quality.GOOD for r in history(seen, "d1/r0"))
    assert [r.value for r in history(seen, "d1/r3")][-1] == 103
    assert healthy.good_polls - good_before >= 0.8 * elapsed / 0.5 - 1


async def test_replies_pass_the_relay_unchanged(lines: tuple[PtyPair, PtyPair]) -> None:
    """The relay itself is transparent: without a fault every poll reads the right values."""
    gateway_side, slave_side = lines
    async with (
        RegisterServer([slave(1, 100), slave(2, 200)], serial_port=slave_side.b),
        Relay(gateway_side.b, slave_side.a) as relay,
    ):
        drivers = [ModbusRtuDriver(rtu(f"d{u}", gateway_side.a, u)) for u in (1, 2)]
        try:
            for d in drivers:
                await d.connect()
            for _ in range(5):
                for u, d in zip((1, 2), drivers, strict=True):
                    assert [s.value for s in await d.read(0)] == [100 * u + i for i in range(4)]
        finally:
            for d in drivers:
                await d.close()
    assert relay.replies == 10
    assert relay.damaged == 0

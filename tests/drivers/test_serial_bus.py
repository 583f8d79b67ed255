"""The serial line's owner: t3.5 of silence between frames, kept to the sub-millisecond.

Above 19200 baud t3.5 is 1.75 ms, under epoll's millisecond resolution, so the owner times it
from the end of the answer (the link's ``rx_at``) with a timerfd and a bounded spin
(``serial_bus.sleep_until``). These tests check the lower bound, every time: the line is never
quiet for less than t3.5. How close the gap comes to t3.5 is speed, measured by
``bench/rtu_bus.py``, not asserted here (a loaded CI machine makes any wake-up late).
"""

from __future__ import annotations

import asyncio
import random
import statistics
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from drivers.modbus import serial_bus
from drivers.modbus.config import ModbusRtuDevice, Table
from drivers.modbus.driver import ModbusRtuDriver
from drivers.modbus.serial_bus import PortOwner, clock, sleep_until
from drivers.modbus.simulator import RegisterMapDevice
from drivers.modbus.transport import ClientTransport, RegisterServer, _write_at_once
from tests.ptys import SOCAT, PtyPair

T35_FAST = 0.00175
#: The clock's resolution: a gap held to the deadline can come out exactly 1 750 000 ns, which
#: two floats near 10^4 s represent as 1.75 ms minus 6e-13.
NS = 1e-9
HAVE_SOCAT = Path(SOCAT).exists()


# -- sleep_until -------------------------------------------------------------------------------


@pytest.mark.parametrize("timer", ["timerfd", "asyncio"])
async def test_sleep_until_never_returns_early(timer: str, monkeypatch: pytest.MonkeyPatch) -> None:
    if timer == "asyncio":
        monkeypatch.setattr(serial_bus, "_TIMER", None)
    rng = random.Random(7)
    for _ in range(60):
        # Around t3.5 above 19200 baud, and some already past or inside the spin.
        deadline = clock() + rng.choice((-0.001, 0.0, 0.00005, 0.0003, 0.00175, 0.003))
        deadline += rng.uniform(0, 0.0002)
        await sleep_until(deadline)
        assert clock() >= deadline


def test_the_timer_is_a_timerfd_on_linux() -> None:
    if sys.platform.startswith("linux"):
        assert serial_bus._TIMER is not None


async def test_a_cancelled_wait_leaves_no_timer_behind() -> None:
    before = _open_fds()
    for _ in range(3):
        task = asyncio.create_task(sleep_until(clock() + 1.0))
        await asyncio.sleep(0.005)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
    await sleep_until(clock() + 0.002)
    assert _open_fds() == before


def _open_fds() -> int:
    fds = Path("/proc/self/fd")
    if not fds.exists():
        pytest.skip("no /proc/self/fd")
    return len(list(fds.iterdir()))


# -- PortOwner with a link that only reports when bytes arrived ---------------------------------


class FakeLink:
    """A link that only reports its frames' times, and holds its requests if it ``can_hold``."""

    connected = True

    def __init__(self, *, can_hold: bool) -> None:
        self.can_hold = can_hold
        self.rx_at: float | None = None
        self.tx_at: float | None = None
        self.hold = 0.0
        self.longest_spin = 0.0

    def hold_send(self, until: float) -> bool:
        if self.can_hold:
            self.hold = until
        return self.can_hold

    def send(self) -> float:
        """A request leaves: as ClientTransport does, spinning out the hold first."""
        spun = clock()
        while clock() < self.hold:
            pass
        self.tx_at = now = clock()
        self.longest_spin = max(self.longest_spin, now - spun)
        self.hold = 0.0
        return now

    async def connect(self) -> None:
        self.connected = True

    async def close(self) -> None:
        self.connected = False


@pytest.mark.parametrize("can_hold", [True, False], ids=["link-holds", "owner-waits"])
async def test_silence_counts_from_the_answer_and_from_any_later_byte(can_hold: bool) -> None:
    link = FakeLink(can_hold=can_hold)
    owner = PortOwner("line", link, silence=T35_FAST, settings=None)
    sent: list[float] = []

    async def answered() -> None:
        sent.append(link.send())
        await asyncio.sleep(0.002)
        link.rx_at = clock()  # the answer's last bytes
        await asyncio.sleep(0.001)  # decoding, waking up: not line time

    await owner.transaction(answered)
    answer_end = link.rx_at
    assert answer_end is not None
    await owner.transaction(answered)
    assert sent[1] - answer_end >= T35_FAST - NS
    assert owner.last_gap == sent[1] - answer_end

    # A stray byte after the transaction (a late answer, noise) restarts the silence.
    stray = clock()
    link.rx_at = stray
    await owner.transaction(answered)
    assert sent[2] - stray >= T35_FAST - NS

    # A failed transaction counts from its failure, not from bytes that came before it.
    failed_at: list[float] = []

    async def failed() -> None:
        sent.append(link.send())
        link.rx_at = clock()
        await asyncio.sleep(0.003)
        failed_at.append(clock())
        raise TimeoutError

    with pytest.raises(TimeoutError):
        await owner.transaction(failed)
    await owner.transaction(answered)
    assert sent[4] - failed_at[0] >= T35_FAST
    assert owner.min_gap is not None
    assert owner.min_gap >= T35_FAST - NS
    assert owner.transactions == 5
    # The owner hands the line over at most SPIN early (a busy machine only makes it later).
    assert link.longest_spin <= serial_bus.SPIN + 0.0005


async def test_the_turnaround_gap_adds_to_the_silence() -> None:
    link = FakeLink(can_hold=True)
    owner = PortOwner("line", link, silence=T35_FAST, settings=None)

    async def answered() -> None:
        link.send()
        link.rx_at = clock()

    await owner.transaction(answered, gap=0.02)
    await owner.transaction(answered)
    assert owner.last_gap is not None
    assert owner.last_gap >= T35_FAST + 0.02 - NS


# -- 115200 baud on a socat pty pair -----------------------------------------------------------


@pytest.fixture
async def pty(tmp_path: Path) -> AsyncIterator[PtyPair]:
    pair = PtyPair(tmp_path)
    pair.start()
    try:
        yield pair
    finally:
        pair.stop()


def rtu(name: str, port: str, unit: int) -> ModbusRtuDevice:
    return ModbusRtuDevice.model_validate(
        {
            "driver": "modbus_rtu",
            "name": name,
            "machine": name,
            "port": port,
            "unit_id": unit,
            "baudrate": 115200,
            "parity": "N",  # ptys reject parity
            "timeout": 0.5,
            "interval": 0.2,
            "addressing": "zero_based",
            "tags": [{"name": f"r{i}", "table": "holding", "address": i} for i in range(4)],
        }
    )


@pytest.mark.skipif(not HAVE_SOCAT, reason="socat is not installed")
async def test_t35_is_kept_every_time_at_115200_baud(
    pty: PtyPair, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Every frame on the line as the gateway sees it: when a request was handed to the port
    # (``tx_at``, after any hold; the write follows), and when bytes of an answer arrived
    # (``rx_at``, what the owner times its silence from).
    events: list[tuple[bool, float]] = []
    traced = ClientTransport._trace_packet

    def trace(self: ClientTransport, sending: bool, data: bytes) -> bytes:
        called = clock()
        out = traced(self, sending, data)  # a request: held until the silence is over
        if sending:
            assert self.tx_at is not None
            assert called <= self.tx_at <= clock()
            events.append((True, self.tx_at))
        else:
            # Our own stamp: these bytes were in by then, so the frame had ended on the wire.
            events.append((False, called))
        return out

    monkeypatch.setattr(ClientTransport, "_trace_packet", trace)
    slaves = []
    for unit in (1, 2, 3):
        dev = RegisterMapDevice(unit)
        dev.serve(Table.HOLDING, 0, 4)
        dev.set(Table.HOLDING, 0, [10 * unit + i for i in range(4)])
        slaves.append(dev)
    async with RegisterServer(slaves, serial_port=pty.b):
        drivers = [ModbusRtuDriver(rtu(f"d{u}", pty.a, u)) for u in (1, 2, 3)]
        try:
            for d in drivers:
                await d.connect()
            owner = drivers[0].owner
            assert owner is not None
            assert owner.silence == T35_FAST
            # pymodbus's serial transport still has what _write_at_once needs (a no-op else).
            link = owner.link
            assert isinstance(link, ClientTransport)
            assert link._client is not None
            serial_transport: Any = link._client.ctx.transport
            assert "_write_at_once" in serial_transport.write.__qualname__
            for _ in range(15):
                # Back to back, and all three at once (queued on the owner's lock).
                assert [s.value for s in await drivers[0].read(0)] == [10, 11, 12, 13]
                results = await asyncio.gather(*(d.read(0) for d in drivers))
                for unit, samples in zip((1, 2, 3), results, strict=True):
                    assert [s.value for s in samples] == [10 * unit + i for i in range(4)]
            assert owner.max_in_flight == 1
            transactions = owner.transactions
            min_gap = owner.min_gap
        finally:
            for d in drivers:
                await d.close()
    assert transactions == 60
    sends = [t for sending, t in events if sending]
    assert len(sends) == transactions
    gaps: list[float] = []
    last_rx: float | None = None
    for sending, t in events:
        if not sending:
            last_rx = t
        elif last_rx is not None:
            gaps.append(t - last_rx)
    assert len(gaps) == transactions - 1
    # The floor, every time: the silence before each request, as the gateway measures it
    # (the request leaves after this instant, and the answer ended before its bytes came in).
    assert min(gaps) >= T35_FAST - NS, sorted(gaps)[:5]
    assert min_gap is not None
    assert min_gap >= T35_FAST - NS
    # No wild overshoot (the old sleep took 2.2-2.5 ms; 10 ms would mean a wrong deadline);
    # loose, since a busy machine makes wake-ups late.
    assert statistics.median(gaps) < 0.010, statistics.median(gaps)


# -- the request leaves when asked ---------------------------------------------------------------


class FakeSerial:
    def __init__(self, takes: int | None, fails: bool = False) -> None:
        self.takes = takes
        self.fails = fails
        self.written: list[bytes] = []

    def write(self, data: bytes) -> int:
        if self.fails:
            raise OSError("gone")
        n = len(data) if self.takes is None else min(self.takes, len(data))
        self.written.append(data[:n])
        return n


class FakeSerialTransport:
    force_poll = False

    def __init__(self, serial: FakeSerial) -> None:
        self.sync_serial: FakeSerial | None = serial
        self.intern_write_buffer: list[bytes] = []
        self.queued: list[bytes] = []

    def write(self, data: bytes) -> None:
        self.queued.append(data)
        self.intern_write_buffer.append(data)


@pytest.mark.parametrize(
    ("takes", "fails", "written", "queued"),
    [
        (None, False, [b"abcdefgh"], []),  # the usual case: all of it at once
        (3, False, [b"abc"], [b"defgh"]),  # the tty took part: the rest the queued way
        (None, True, [], [b"abcdefgh"]),  # failed: the queued way reports it
    ],
)
def test_a_serial_request_is_written_at_once(
    takes: int | None, fails: bool, written: list[bytes], queued: list[bytes]
) -> None:
    serial = FakeSerial(takes, fails)
    transport = FakeSerialTransport(serial)
    _write_at_once(transport)  # type: ignore[arg-type]
    transport.write(b"abcdefgh")
    assert serial.written == written
    assert transport.queued == queued
    # Behind a queued remainder, a frame is queued too: bytes never overtake each other.
    if queued:
        transport.write(b"ij")
        assert transport.queued == [*queued, b"ij"]


def test_other_transports_are_left_alone() -> None:
    transport = FakeSerialTransport(FakeSerial(None))
    transport.force_poll = True  # Windows: pymodbus polls, and writes from its poll task
    write = transport.write
    _write_at_once(transport)  # type: ignore[arg-type]
    assert transport.write == write
    _write_at_once(None)

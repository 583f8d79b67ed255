"""The outbox on real SQLite files: order, acks, bounds, clock rebase, restarts and a kill -9."""

from __future__ import annotations

import math
import os
import random
import select
import signal
import sqlite3
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import closing
from pathlib import Path
from typing import Any

import pytest

from gateway.errors import OutboxError
from gateway.outbox import DELETE_BATCH, SCHEMA_VERSION, Message, Outbox, Stored

NOW = 1_800_000_000.0  # seconds; the injected wall clock starts here
ROOT = Path(__file__).resolve().parents[2]


class Clock:
    def __init__(self, t: float = NOW) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


def msg(i: int, *, ts_ms: int | None = None, synced: bool = True, size: int = 0) -> Message:
    payload = str(i).encode().ljust(size, b" ")
    return Message(f"t/{i % 3}", payload, 1, False, int(NOW * 1000) if ts_ms is None else ts_ms,
                   synced)  # fmt: skip


def seq(stored: list[Stored]) -> list[int]:
    """The numbers the test put into the payloads."""
    return [int(s.message.payload) for s in stored]


def box(path: Path, **kw: Any) -> Outbox:
    kw.setdefault("max_bytes", 10_000_000)
    kw.setdefault("max_age_s", 3600.0)
    kw.setdefault("fsync", "off")
    kw.setdefault("replay_rate", float("inf"))
    kw.setdefault("clock", Clock())
    return Outbox(path, **kw)


@pytest.fixture
def db(tmp_path: Path) -> Path:
    return tmp_path / "data" / "outbox.sqlite"


@pytest.fixture
def ob(db: Path) -> Iterator[Outbox]:
    with box(db) as o:
        yield o


def test_live_messages_stay_in_memory_until_acked(ob: Outbox) -> None:
    ob.put([msg(i) for i in range(5)], deliverable=True)
    out = ob.next_live(3)
    assert seq(out) == [0, 1, 2]
    assert not any(s.historical for s in out)
    assert ob.stats["in_flight"] == 3
    assert ob.stats["queued_messages"] == 5
    ob.acked([s.id for s in out])
    assert seq(ob.next_live(10)) == [3, 4]
    assert ob.stats["acked"] == 3
    # The broker took everything: the card saw no write.
    assert ob.stats["disk_batches"] == 0
    assert ob.stats["stored"] == 0


def test_order_is_kept_across_spill_and_replay(ob: Outbox) -> None:
    ob.put([msg(i) for i in range(5)], deliverable=True)
    sent = ob.next_live(3)  # 0 1 2 in flight
    ob.acked([sent[0].id])
    ob.spill()  # connection lost: 1 2 (in flight) and 3 4 (pending) go to disk
    ob.put([msg(i) for i in range(5, 8)], deliverable=False)
    assert ob.stats["stored"] == 7
    # Reconnected: live data flows while the backlog drains, oldest first.
    ob.put([msg(100)], deliverable=True)
    replay = ob.next_replay(100)
    assert seq(replay) == [1, 2, 3, 4, 5, 6, 7]
    assert all(s.historical for s in replay)
    assert [s.id for s in replay] == sorted(s.id for s in replay)
    live = ob.next_live(100)
    assert seq(live) == [100]
    assert not live[0].historical
    ob.acked([s.id for s in replay + live])
    assert ob.stats["queued_messages"] == 0
    assert ob.next_replay(100) == []


def test_undeliverable_put_stores_what_was_still_pending_first(ob: Outbox) -> None:
    ob.put([msg(0), msg(1)], deliverable=True)
    ob.put([msg(2)], deliverable=False)
    assert ob.stats["pending"] == 0
    assert ob.stats["disk_batches"] == 1
    assert seq(ob.next_replay(10)) == [0, 1, 2]


def test_acked_stored_rows_are_deleted_in_batches(db: Path) -> None:
    n = DELETE_BATCH + 44
    with box(db) as o:
        o.put([msg(i) for i in range(n)], deliverable=False)
        out = o.next_replay(n)
        assert len(out) == n
        writes = o.stats["disk_batches"]
        for s in out[: DELETE_BATCH - 1]:
            o.acked([s.id])
        assert o.stats["disk_batches"] == writes  # not one delete per ack
        o.acked([out[DELETE_BATCH - 1].id])
        assert o.stats["disk_batches"] == writes + 1
        assert o.stats["stored"] == 44
        # The last ack empties the store: cleaned at once, nothing replayed twice.
        o.acked([s.id for s in out[DELETE_BATCH:]])
        assert o.stats["disk_batches"] == writes + 2
    with closing(sqlite3.connect(db)) as con:
        assert con.execute("SELECT COUNT(*) FROM messages").fetchone() == (0,)
    with box(db) as o:
        assert o.stats["stored"] == 0
        assert o.next_replay(10) == []


def test_in_flight_messages_are_sent_again_after_a_disconnect(ob: Outbox) -> None:
    ob.put([msg(i) for i in range(4)], deliverable=False)
    ob.put([msg(10), msg(11)], deliverable=True)
    replay = ob.next_replay(2)  # 0 1 in flight from disk
    live = ob.next_live(1)  # 10 in flight from memory
    ob.acked([replay[0].id])
    ob.spill()
    assert ob.stats["in_flight"] == 0
    # Unacked: sent again (at least once), in their original order, with their ids.
    again = ob.next_replay(100)
    assert seq(again) == [1, 2, 3, 10, 11]
    assert again[0].id == replay[1].id
    assert again[3].id == live[0].id
    # An ack from the dead connection changes nothing.
    ob.acked([live[0].id - 1000])
    assert ob.stats["acked"] == 1


def test_window_overflow_goes_to_disk(db: Path) -> None:
    with box(db, window=4) as o:
        o.put([msg(i) for i in range(3)], deliverable=True)
        o.next_live(3)  # window: 3 in flight
        o.put([msg(i) for i in range(3, 6)], deliverable=True)
        assert o.stats["pending"] == 1
        assert o.stats["stored"] == 2
        assert seq(o.next_live(10)) == [3]
        assert seq(o.next_replay(10)) == [4, 5]


def test_bytes_bound_drop_oldest(db: Path) -> None:
    one = len(b"t/0") + 100
    with box(db, max_bytes=10 * one) as o:
        o.put([msg(i, size=100) for i in range(6)], deliverable=False)
        o.put([msg(i, size=100) for i in range(6, 15)], deliverable=False)
        assert o.stats["stored"] == 10
        assert o.stats["stored_bytes"] == 10 * one
        assert o.stats["dropped_full"] == 5
        assert seq(o.next_replay(100)) == list(range(5, 15))
        # One message larger than the whole bound: it goes, and only it.
        o.put([msg(99, size=11 * one)], deliverable=False)
        assert o.stats["dropped_full"] == 16
        assert o.stats["stored"] == 0


def test_bytes_bound_drop_newest(db: Path) -> None:
    one = len(b"t/0") + 100
    with box(db, max_bytes=10 * one, when_full="drop_newest") as o:
        o.put([msg(i, size=100) for i in range(6)], deliverable=False)
        o.put([msg(i, size=100) for i in range(6, 15)], deliverable=False)
        o.put([msg(15, size=100)], deliverable=False)
        assert o.stats["stored"] == 10
        assert o.stats["dropped_full"] == 6
        assert seq(o.next_replay(100)) == list(range(10))


def test_age_bound_on_put_and_on_replay(db: Path) -> None:
    clock = Clock()
    now_ms = int(NOW * 1000)
    with box(db, max_age_s=60.0, clock=clock) as o:
        o.put([msg(0, ts_ms=now_ms - 61_000), msg(1, ts_ms=now_ms - 30_000)], deliverable=False)
        assert o.stats["dropped_age"] == 1
        assert o.stats["stored"] == 1
        o.put([msg(2, ts_ms=now_ms), msg(3, ts_ms=now_ms - 5_000_000, synced=False)],
              deliverable=False)  # fmt: skip
        clock.t += 40.0  # 1 is now 70 s old, 2 is 40 s old
        out = o.next_replay(100)
        # Unsynced timestamps are not trusted for age: 3 stays.
        assert seq(out) == [2, 3]
        assert o.stats["dropped_age"] == 2
        assert o.stats["stored"] == 2
        clock.t += 30.0
        o.spill()
        assert seq(o.next_replay(100)) == [3]
        assert o.stats["dropped_age"] == 3
        # Live messages that waited too long in memory are not sent either.
        o.put([msg(4, ts_ms=int(clock.t * 1000))], deliverable=True)
        clock.t += 61.0
        assert o.next_live(10) == []
        assert o.stats["dropped_age"] == 4
        assert o.stats["queued_bytes"] == o.stats["stored_bytes"]


def test_rebase_shifts_unsynced_messages_everywhere(db: Path) -> None:
    # A Pi without RTC booted at 1970; a minute later NTP stepped the clock to the present.
    boot = 50_000
    step = int(NOW * 1000) - 60_000
    with box(db) as o:
        o.put([msg(0, ts_ms=boot, synced=False), msg(1)], deliverable=False)
        o.put([msg(2, ts_ms=boot + 1, synced=False)], deliverable=True)
        flying = o.next_replay(1)[0]
        o.put([msg(3, ts_ms=boot + 2, synced=False)], deliverable=True)
        o.rebase(step)
        assert flying.message.ts_ms == boot + step
        assert flying.message.clock_synced
        assert flying.message.rebased_ms == step
        pending = o.next_live(10)
        assert [s.message.ts_ms for s in pending] == [boot + 1 + step, boot + 2 + step]
        assert all(s.message.clock_synced for s in pending)
        o.spill()
    with box(db) as o:
        out = o.next_replay(10)
        assert seq(out) == [0, 1, 2, 3]
        assert [s.message.rebased_ms for s in out] == [step, 0, step, step]
        assert out[0].message.ts_ms == boot + step
        assert out[1].message.ts_ms == int(NOW * 1000)
        writes = o.stats["disk_batches"]
        o.rebase(1000)  # nothing unsynced left: no write
        assert o.stats["disk_batches"] == writes
        assert out[0].message.ts_ms == boot + step


def test_a_step_after_a_restart_does_not_rebase_rows_from_before_it(db: Path) -> None:
    # Stored by a process whose clock was never set; the edge box rebooted (another stale
    # clock), and the new process measured a step: it says nothing about the old rows.
    with box(db) as o:
        o.put([msg(0, ts_ms=50_000, synced=False)], deliverable=False)
    with box(db) as o:
        o.put([msg(1, ts_ms=70_000, synced=False)], deliverable=False)
        step = int(NOW * 1000) - 70_000
        o.rebase(step)
        out = o.next_replay(10)
        assert seq(out) == [0, 1]
        old, new = (s.message for s in out)
        assert (old.ts_ms, old.clock_synced, old.rebased_ms) == (50_000, False, 0)
        assert (new.ts_ms, new.clock_synced, new.rebased_ms) == (int(NOW * 1000), True, step)


def test_restart_keeps_rows_and_ids_and_never_reuses_one(db: Path) -> None:
    with box(db) as o:
        o.put([msg(i) for i in range(5)], deliverable=False)
        before = o.next_replay(100)
        o.acked([before[0].id])
    with box(db) as o:
        after = o.next_replay(100)
        assert [(s.id, s.message) for s in after] == [(s.id, s.message) for s in before[1:]]
        o.acked([s.id for s in after])
        o.put([msg(5)], deliverable=True)
        live = o.next_live(1)[0]
        assert live.id > before[-1].id
        o.acked([live.id])
    # The store is empty and the highest id was in memory only: still not reused.
    with box(db) as o:
        o.put([msg(6)], deliverable=False)
        assert o.next_replay(1)[0].id > live.id


def test_close_persists_what_was_not_acked(db: Path) -> None:
    with box(db) as o:
        o.put([msg(i) for i in range(4)], deliverable=True)
        o.acked([o.next_live(2)[0].id])
    with box(db) as o:
        assert seq(o.next_replay(10)) == [1, 2, 3]


def test_replay_rate(db: Path) -> None:
    mono = Clock(0.0)
    with box(db, replay_rate=10.0, monotonic=mono) as o:
        o.put([msg(i) for i in range(100)], deliverable=False)
        assert len(o.next_replay(100)) == 10  # a burst of one second's worth
        assert o.next_replay(100) == []
        mono.t += 0.5
        assert seq(o.next_replay(100)) == list(range(10, 15))
        mono.t += 100.0
        assert len(o.next_replay(100)) == 10
        assert o.to_replay == 100 - 25


def test_one_transaction_per_batch(ob: Outbox) -> None:
    for k in range(5):
        ob.put([msg(i) for i in range(100 * k, 100 * k + 100)], deliverable=False)
    assert ob.stats["disk_batches"] == 5
    assert ob.stats["stored"] == 500


def test_schema_version_and_wal(db: Path) -> None:
    with box(db):
        pass
    with closing(sqlite3.connect(db)) as con:
        assert con.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone() == (
            SCHEMA_VERSION,
        )
        assert con.execute("PRAGMA journal_mode").fetchone() == ("wal",)


def test_a_newer_schema_is_refused_and_left_untouched(db: Path) -> None:
    with box(db) as o:
        o.put([msg(0)], deliverable=False)
    with closing(sqlite3.connect(db)) as con, con:
        con.execute("UPDATE meta SET value = 99 WHERE key = 'schema_version'")
    before = db.read_bytes()
    with pytest.raises(OutboxError, match="newer"):
        box(db).open()
    assert db.read_bytes() == before


def test_files_that_are_not_an_outbox_are_refused(tmp_path: Path) -> None:
    garbage = tmp_path / "garbage.sqlite"
    garbage.write_bytes(b"not a database at all" * 100)
    with pytest.raises(OutboxError, match="not a readable outbox"):
        box(garbage).open()
    assert garbage.read_bytes() == b"not a database at all" * 100
    other = tmp_path / "other.sqlite"
    with closing(sqlite3.connect(other)) as con, con:
        con.execute("CREATE TABLE things (x)")
    with pytest.raises(OutboxError, match="not an outbox"):
        box(other).open()


def test_one_process_at_a_time_and_a_failed_open_leaves_nothing_open(db: Path) -> None:
    first = box(db).open()
    try:
        second = box(db)
        with pytest.raises(OutboxError, match="in use"):
            second.open()
        # The failed open released its connection: nothing to close, nothing leaked.
        second.close()
    finally:
        first.close()
    with box(db) as o:
        assert o.stats["stored"] == 0


def test_bad_settings_are_refused(db: Path) -> None:
    with pytest.raises(ValueError, match="positive"):
        box(db, max_bytes=0)
    with pytest.raises(ValueError, match="when_full"):
        box(db, when_full="drop_random")
    with pytest.raises(ValueError, match="fsync"):
        box(db, fsync="sometimes")


_CHILD = """
import sys
from pathlib import Path
from gateway.outbox import Message, Outbox

box = Outbox(Path(sys.argv[1]), max_bytes=1 << 30, max_age_s=1e12, fsync=sys.argv[2]).open()
for b in range(100_000):
    box.put([Message("t", str(b * 100 + i).encode(), 1, False, 0) for i in range(100)],
            deliverable=False)
    print(b, flush=True)
"""


@pytest.mark.parametrize("fsync", ["normal", "full"])
def test_a_killed_writer_leaves_an_ordered_gap_free_prefix(db: Path, fsync: str) -> None:
    db.parent.mkdir(parents=True)
    proc = subprocess.Popen(
        [sys.executable, "-c", _CHILD, str(db), fsync],
        stdout=subprocess.PIPE,
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    assert proc.stdout is not None
    confirmed = -1
    buffer = b""
    deadline = time.monotonic() + 30.0
    try:
        # Kill it mid-stream, once a few dozen batches were confirmed.
        while confirmed < 30 and time.monotonic() < deadline:
            ready, _, _ = select.select([proc.stdout], [], [], 0.5)
            if ready:
                chunk = os.read(proc.stdout.fileno(), 4096)
                assert chunk, "the writer died by itself"
                buffer += chunk
                *lines, buffer = buffer.split(b"\n")
                if lines:
                    confirmed = int(lines[-1])
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait(timeout=10)
        proc.stdout.close()
    assert proc.returncode == -signal.SIGKILL
    assert confirmed >= 30
    with box(db, max_age_s=math.inf) as o:
        replayed: list[Stored] = []
        for _ in range(1000):
            out = o.next_replay(10_000)
            if not out:
                break
            replayed += out
            o.acked(s.id for s in out)
    numbers = seq(replayed)
    ids = [s.id for s in replayed]
    assert ids == sorted(ids)
    # Every batch whose put() returned is there, in order, with nothing missing in between;
    # the batch the kill interrupted is there whole or not at all.
    assert len(numbers) >= (confirmed + 1) * 100
    assert len(numbers) % 100 == 0
    assert numbers == list(range(len(numbers)))


def test_a_full_disk_loses_only_that_write_and_counts_it(ob: Outbox) -> None:
    ob.put([msg(0)], deliverable=False)
    db = ob._db
    assert db is not None
    # A real "database or disk is full" from SQLite: the file may not grow any more.
    pages = db.execute("PRAGMA page_count").fetchone()[0]
    db.execute(f"PRAGMA max_page_count={pages}")
    ob.put([msg(i, size=2000) for i in range(1, 11)], deliverable=False)
    assert ob.stats["dropped_io"] == 10
    assert "full" in ob.last_error
    assert ob.stats["stored"] == 1
    db.execute("PRAGMA max_page_count=1000000")
    ob.put([msg(11)], deliverable=False)
    assert seq(ob.next_replay(100)) == [0, 11]


def test_a_row_dropped_while_in_flight_is_forgotten(db: Path) -> None:
    one = len(b"t/0") + 100
    with box(db, max_bytes=3 * one) as o:
        o.put([msg(i, size=100) for i in range(3)], deliverable=False)
        flying = o.next_replay(1)
        o.put([msg(3, size=100)], deliverable=False)  # pushes out 0, which is in flight
        assert o.stats["dropped_full"] == 1
        assert o.stats["in_flight"] == 0
        o.acked([flying[0].id])
        assert o.stats["acked"] == 0
        assert o.to_replay == 3
        assert seq(o.next_replay(10)) == [1, 2, 3]


@pytest.mark.parametrize("seed", range(6))
def test_random_operations_lose_nothing_uncounted(db: Path, seed: int) -> None:
    """Whatever the sink does, every message put is acked, counted as dropped, or queued."""
    rng = random.Random(seed)
    one = len(b"t/0") + 20
    kw: dict[str, Any] = {"max_bytes": 40 * one, "window": 16}
    if seed % 2:
        kw["when_full"] = "drop_newest"
    o = box(db, **kw).open()
    put = dropped = acked = 0
    acked_numbers: set[int] = set()
    in_flight: list[Stored] = []
    try:
        for step in range(400):
            op = rng.random()
            if op < 0.35:
                batch = [msg(put + i, size=20) for i in range(rng.randint(1, 12))]
                put += len(batch)
                o.put(batch, deliverable=rng.random() < 0.6)
            elif op < 0.55:
                in_flight += o.next_live(rng.randint(1, 8))
            elif op < 0.75:
                out = o.next_replay(rng.randint(1, 8))
                assert [s.id for s in out] == sorted(s.id for s in out)
                in_flight += out
            elif op < 0.9 and in_flight:
                rng.shuffle(in_flight)
                k = rng.randint(1, 5)
                done, in_flight = in_flight[:k], in_flight[k:]
                o.acked([s.id for s in done])
                for s in done:
                    assert int(s.message.payload) not in acked_numbers, "acked twice"
                    acked_numbers.add(int(s.message.payload))
            elif op < 0.97:
                o.spill()
                in_flight = []
            else:  # a clean restart; close() itself may drop (it stores what was in memory)
                o.close()
                stats = o.stats
                dropped += stats["dropped_full"] + stats["dropped_age"] + stats["dropped_io"]
                acked += stats["acked"]
                o = box(db, **kw).open()
                in_flight = []
            stats = o.stats
            total = (
                acked
                + stats["acked"]
                + dropped
                + stats["dropped_full"]
                + stats["dropped_age"]
                + stats["dropped_io"]
                + stats["queued_messages"]
            )
            assert total == put, f"step {step}"
            assert stats["stored_bytes"] <= kw["max_bytes"]
    finally:
        o.close()
    # The in-memory counts match the file.
    with box(db, **kw) as again:
        assert (again.stats["stored"], again.stats["stored_bytes"]) == (
            o.stats["stored"],
            o.stats["stored_bytes"],
        )
    # Each message was acked at most once (checked above); drop_oldest may drop a message
    # in flight, whose ack is then ignored.
    if seed % 2:
        assert acked + o.stats["acked"] == len(acked_numbers)
    else:
        assert acked + o.stats["acked"] <= len(acked_numbers)


def test_drop_newest_refuses_one_contiguous_run_not_every_other_message(db: Path) -> None:
    # 100-byte messages fill a 250-byte store after two; a later 10-byte one would still fit,
    # but storing it would leave a hole (1, 2, 4).
    sizes = [100, 100, 100, 10, 10]
    with box(db, max_bytes=250, when_full="drop_newest") as o:
        for i, size in enumerate(sizes):
            o.put([msg(i, size=size)], deliverable=False)
        assert seq(o.next_replay(10)) == [0, 1]
        assert o.stats["dropped_full"] == 3
        # Drained (acked) below half of max_bytes: it takes messages again.
        o.acked([1, 2])
        o.put([msg(5, size=100)], deliverable=False)
        assert seq(o.next_replay(10)) == [5]

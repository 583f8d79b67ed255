"""Store and forward: every message meant for the broker, kept until the broker has it.

Pure bookkeeping over one SQLite file; it knows nothing of MQTT. The sink drives it::

    with Outbox(data_dir / "outbox.sqlite", max_bytes=..., max_age_s=...) as box:
        box.put(messages, deliverable=connected)   # each poll
        for s in box.next_live(n) + box.next_replay(n):
            publish(s)                             # historical ones without retain
        box.acked(ids)                             # PUBACK (QoS 1); written out (QoS 0)
        box.spill()                                # the connection was lost

Where a message is:

- **pending** (memory): ``put(deliverable=True)`` while fewer than ``window`` live messages
  are in memory. Not written to disk: while the broker takes everything, the SD card sees no
  writes at all.
- **in flight** (memory): handed out by ``next_live``/``next_replay``, not yet ``acked``.
- **stored** (disk): ``put(deliverable=False)``, the part of a deliverable batch beyond the
  window, and whatever ``spill()`` moved there. ``next_replay`` hands stored rows out oldest
  first (by id, which is put order), as ``historical``, at most ``replay_rate`` per second
  (bursts of one second's worth), so live data keeps flowing during a long drain. A stored
  row is deleted only once acked; deletes are batched (``DELETE_BATCH``).

So the card is written only to store what cannot be delivered now, to delete it once it was
(batched), at ``rebase`` and at ``close``; always one transaction per call, never one per
message.

``put(deliverable=False)`` first moves what is still pending to disk, in the same
transaction: it is older than the new batch, so the stored order stays the put order.
``spill()`` (connection lost) moves pending and in-flight live messages to disk and sends
every in-flight stored row again from the start: at least once. A re-sent message is a new
PUBLISH on a new session, not a DUP retransmission, so the broker cannot drop the copy it
may already have; a subscriber that must not see a value twice de-duplicates by
(topic, ts_ms), or by ``Stored.id``, which is stable across restarts if the sink publishes
it. A historical message must not be published retained: it would replace a newer value.

Bounds. Memory: at most ``window`` live messages (pending plus in flight) and ``window``
replayed ones in flight. Disk: at most ``max_bytes`` of topic and payload bytes after every
write; ``when_full="drop_oldest"`` (default) deletes the lowest ids until the store fits,
in-flight rows included (they may still arrive: counted as dropped all the same), and
``"drop_newest"`` refuses what no longer fits, from the first message that does not, and
everything after it until the store is down to half of ``max_bytes`` again (so what is
refused is one contiguous run, and what is stored has no holes in it). Age: a message whose
source timestamp is older than ``max_age_s`` is dropped at put, spill and hand-out. Messages
stamped before the clock was synchronised (``clock_synced=False``; no RTC) are exempt from
the age bound: when NTP steps the clock by years they would all look expired.
``rebase(offset_ms)`` shifts them by the measured step, marks them synchronised and records
the shift in ``rebased_ms`` so the sink can patch the timestamp inside the payload when it
replays them. Every drop is counted by cause in ``stats``: ``dropped_full``,
``dropped_age``, ``dropped_io`` (a write failed: disk full, card gone read-only; the
messages of that write are lost, and said so once in the log).

The file is never wiped: opening an existing outbox keeps its rows and continues ids above
any id ever handed out before the last write (``meta.next_id``). ``meta.schema_version``
allows migrations; a file of a newer version, a file that is not an outbox, or one locked
by another process raises ``OutboxError`` and is left as it is. The file is opened with an
exclusive lock, so two gateways can never share (and reorder) one outbox.

Durability (``fsync``), per write transaction (one per ``put``/``spill``, never one per
message); WAL journal in every case:

====== ===================== ================================================================
fsync  SQLite synchronous    what survives
====== ===================== ================================================================
normal NORMAL (default)      process kill (kill -9, OOM, crash): everything whose write
                             returned. Power cut: the database stays consistent, but commits
                             the OS had not yet written back may be lost (on Linux up to
                             ~30 s, ``vm.dirty_expire_centisecs``). No fsync per batch; the
                             WAL is synced at checkpoints only: least SD card wear.
full   FULL                  power cut too: one fsync of the WAL per batch. Costs the card
                             a flash page program per batch, and the latency of that fsync.
off    OFF                   process kill only. A power cut may corrupt the file. For tests
                             and benchmarks.
====== ===================== ================================================================

What is lost, by failure:

- process killed: pending and in-flight live messages (at most ``window``; in flight ones
  may have reached the broker). Stored rows acked but not yet deleted are sent again after
  the restart (duplicates, at most ``DELETE_BATCH``).
- power cut: as a kill, plus the last commits with ``fsync="normal"``.
- broker connection lost: nothing, if the sink calls ``spill()``; duplicates possible.

Cost (``bench/outbox.py``: ext4 on a virtio disk, 2 shared vCPUs under load, CPython 3.11,
batches of 100 messages of 152 bytes of topic and payload): ``put(deliverable=False)`` takes
a median 350 µs per batch with fsync off or normal (raw sqlite3 executemany of the same rows:
275 µs) and 0.8-3.8 ms with full (one fsync; a slow card takes longer). About every 4 MB of
WAL (~22,000 messages) a checkpoint copies the WAL into the file and, unless fsync is off,
syncs it: that put takes 10-70 ms here, more on an SD card; the event loop sees that stall
only while the outbox writes (broker unreachable or behind, or a drain). The connected path
(``put(deliverable=True)``, ``next_live``, ``acked``) does no I/O: 0.9-1.6 µs per message.
Replay (``next_replay`` and ``acked``, deletes included) runs at 100,000-150,000 messages
per second, far above any sensible ``replay_rate``. A stored message takes 184 bytes of
file for 152 counted by ``max_bytes``: size the partition for ~1.25 x ``max_bytes`` plus
the WAL (4 MB). A drained file does not shrink; its free pages are reused. A smaller
``max_bytes`` after a restart takes effect at the next write (the oldest are dropped and
counted then).

Synchronous: a batch costs about a third of a millisecond and only while writing, so callers
run it in the event loop's thread; the checkpoint stall above is the one cost that could
justify a writer thread later. Not thread-safe (sqlite3 refuses other threads anyway).
"""

from __future__ import annotations

import logging
import math
import sqlite3
import time
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from itertools import chain
from pathlib import Path
from types import TracebackType
from typing import Literal, NamedTuple, Self

from gateway.errors import OutboxError
from gateway.logutil import OnceLogger

__all__ = ["DELETE_BATCH", "SCHEMA_VERSION", "Message", "Outbox", "Stored"]

log = logging.getLogger("gateway.outbox")

SCHEMA_VERSION = 1
#: Acked stored rows are deleted in transactions of this many (or when the store empties):
#: fewer writes to the card, at the price of this many duplicates after a crash.
DELETE_BATCH = 256
#: drop_newest takes messages again once the store is down to this share of max_bytes:
#: one contiguous run is refused, not every other message while it hovers at the bound.
REFILL_AT = 0.5
#: How long open() waits for another process's lock: a predecessor that is just exiting.
LOCK_TIMEOUT = 1.0
#: A WAL file grows to its largest transaction and is reused; cap what it keeps afterwards.
JOURNAL_SIZE_LIMIT = 4 * 1024 * 1024

_SYNCHRONOUS = {"off": "OFF", "normal": "NORMAL", "full": "FULL"}
_REPLAY = (
    "SELECT id, topic, payload, qos, retain, ts_ms, clock_synced, rebased_ms FROM messages"
    " WHERE id > ? ORDER BY id LIMIT ?"
)
_SCHEMA = (
    "CREATE TABLE meta (key TEXT PRIMARY KEY, value INTEGER NOT NULL)",
    """CREATE TABLE messages (
        id INTEGER PRIMARY KEY,
        topic TEXT NOT NULL,
        payload BLOB NOT NULL,
        qos INTEGER NOT NULL,
        retain INTEGER NOT NULL,
        ts_ms INTEGER NOT NULL,
        clock_synced INTEGER NOT NULL,
        rebased_ms INTEGER NOT NULL,
        size INTEGER NOT NULL
    )""",
)
#: version -> statements that bring a file of that version to the next one.
_MIGRATIONS: dict[int, tuple[str, ...]] = {}


class Message(NamedTuple):
    """One message for the broker. A NamedTuple: built per value, 3x cheaper than a frozen
    dataclass (0.5 against 1.8 µs).

    ``ts_ms`` is the source timestamp (ms since the epoch), the one inside the payload unless
    ``rebased_ms`` says it was shifted by that much after the payload was made.
    """

    topic: str
    payload: bytes
    qos: int
    retain: bool
    ts_ms: int
    clock_synced: bool = True
    rebased_ms: int = 0


@dataclass(slots=True)
class Stored:
    """A message with its outbox id: put order, kept on disk with the message. An id is never
    reused once a write or a close has recorded the high mark; only after a kill may the ids
    of live messages that never reached the disk be handed out again.

    ``historical``: it comes from disk (after a disconnection, or an overflow of the window).
    """

    id: int
    message: Message
    historical: bool


def _size(m: Message) -> int:
    return len(m.topic.encode()) + len(m.payload)


class Outbox:
    """A durable, bounded, ordered store-and-forward queue; see the module docstring."""

    def __init__(
        self,
        path: Path,
        *,
        max_bytes: int,
        max_age_s: float,
        when_full: Literal["drop_oldest", "drop_newest"] = "drop_oldest",
        fsync: Literal["off", "normal", "full"] = "normal",
        window: int = 1000,
        replay_rate: float = 500.0,
        clock: Callable[[], float] = time.time,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        if max_bytes <= 0 or not max_age_s > 0 or window < 1 or not replay_rate > 0:
            raise ValueError("max_bytes, max_age_s, window and replay_rate must be positive")
        if when_full not in ("drop_oldest", "drop_newest"):
            raise ValueError(f"when_full must be drop_oldest or drop_newest, not {when_full!r}")
        if fsync not in _SYNCHRONOUS:
            raise ValueError(f"fsync must be off, normal or full, not {fsync!r}")
        self.path = Path(path)
        self.max_bytes = max_bytes
        self.max_age_s = max_age_s
        self.when_full = when_full
        self.fsync = fsync
        self.window = window
        self.replay_rate = replay_rate
        self._clock = clock
        self._monotonic = monotonic
        self._burst = max(1.0, replay_rate)  # one second's worth
        self._db: sqlite3.Connection | None = None
        self._pending: deque[Stored] = deque()
        self._in_flight: dict[int, Stored] = {}
        self._live_in_flight = 0
        self._live_bytes = 0  # pending and live in flight
        self._replay_in_flight = 0
        self._stored = 0  # rows on disk, minus those waiting in _to_delete
        self._stored_bytes = 0
        self._to_delete: list[int] = []
        self._cursor = 0  # every stored row above it is still to be handed out
        self._next_id = 1
        self._saved_next_id = 1
        self._unsynced_on_disk = False
        self._session_first_id = 1
        #: drop_newest has refused since the store was last below REFILL_AT of max_bytes.
        self._refusing = False
        self._tokens = self._burst
        self._refilled = 0.0
        self._once = OnceLogger(log, f"outbox {self.path}")
        self.dropped_full = 0
        self.dropped_age = 0
        self.dropped_io = 0
        self.replayed = 0
        self.acked_count = 0
        self.disk_batches = 0
        self.last_error = ""

    # -- lifecycle -------------------------------------------------------------------------

    def open(self) -> Self:
        """Open or create the file, keeping every row; on any failure nothing stays open."""
        if self._db is not None:
            return self
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            db = sqlite3.connect(self.path, isolation_level=None, timeout=LOCK_TIMEOUT)
        except (OSError, sqlite3.Error) as exc:
            raise OutboxError(f"{self.path}: cannot open: {exc}") from exc
        try:
            self._db = db
            self._setup(db)
        except BaseException:
            self._db = None
            db.close()
            raise
        self._refilled = self._monotonic()
        return self

    def close(self) -> None:
        """Persist what is still in memory (unacked: sent again after the restart); idempotent."""
        db = self._db
        if db is None:
            return
        before = self.dropped_full + self.dropped_age + self.dropped_io
        try:
            self.spill()
            if self._next_id != self._saved_next_id:
                self._write([])
        finally:
            self._db = None
            db.close()
        # The counters die with this object: say it where it stays visible.
        lost = self.dropped_full + self.dropped_age + self.dropped_io - before
        if lost:
            log.warning("outbox %s: %d message(s) dropped while closing", self.path, lost)

    def __enter__(self) -> Self:
        return self.open()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def _setup(self, db: sqlite3.Connection) -> None:
        where = str(self.path)
        try:
            # Exclusive before WAL: SQLite then keeps the WAL index in memory (no -shm file)
            # and no second process can open the file while we hold it.
            db.execute("PRAGMA locking_mode=EXCLUSIVE")
            mode = db.execute("PRAGMA journal_mode=WAL").fetchone()[0]
            if mode != "wal":
                raise OutboxError(f"{where}: cannot use a WAL journal here (got {mode!r})")
            db.execute(f"PRAGMA synchronous={_SYNCHRONOUS[self.fsync]}")
            db.execute(f"PRAGMA journal_size_limit={JOURNAL_SIZE_LIMIT}")
            db.execute("BEGIN IMMEDIATE")
            try:
                self._check_schema(db, where)
                db.execute("COMMIT")
            except BaseException:
                db.execute("ROLLBACK")
                raise
            count, size, top = db.execute(
                "SELECT COUNT(*), COALESCE(SUM(size), 0), COALESCE(MAX(id), 0) FROM messages"
            ).fetchone()
            saved = db.execute("SELECT value FROM meta WHERE key = 'next_id'").fetchone()
            unsynced = db.execute(
                "SELECT COUNT(*) FROM messages WHERE clock_synced = 0"
            ).fetchone()[0]
        except sqlite3.OperationalError as exc:
            if "locked" in str(exc):
                raise OutboxError(f"{where}: in use by another process") from exc
            raise OutboxError(f"{where}: {exc}") from exc
        except sqlite3.DatabaseError as exc:
            raise OutboxError(
                f"{where}: not a readable outbox ({exc}); left untouched: move it aside to start"
                " an empty one"
            ) from exc
        self._stored, self._stored_bytes = count, size
        self._next_id = self._saved_next_id = max(saved[0] if saved else 1, top + 1)
        # A step measured in this process says nothing of a clock before the restart (a
        # reboot starts from another stale time): rows from before stay marked unsynced.
        self._session_first_id = self._next_id
        self._unsynced_on_disk = False
        if unsynced:
            log.info(
                "outbox %s: %d message(s) stamped by an unsynchronised clock before the "
                "restart; they keep clock_synced false",
                self.path,
                unsynced,
            )

    @staticmethod
    def _check_schema(db: sqlite3.Connection, where: str) -> None:
        tables = {row[0] for row in db.execute("SELECT name FROM sqlite_master WHERE type='table'")}
        if not tables:
            for statement in _SCHEMA:
                db.execute(statement)
            db.executemany(
                "INSERT INTO meta (key, value) VALUES (?, ?)",
                [("schema_version", SCHEMA_VERSION), ("next_id", 1)],
            )
            return
        if "meta" not in tables or "messages" not in tables:
            raise OutboxError(f"{where}: an SQLite file but not an outbox; left untouched")
        row = db.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()
        version = row[0] if row else 0
        if version > SCHEMA_VERSION:
            raise OutboxError(
                f"{where}: outbox schema version {version} is newer than this gateway's"
                f" ({SCHEMA_VERSION}); left untouched"
            )
        if version == SCHEMA_VERSION:
            return
        while version < SCHEMA_VERSION:
            steps = _MIGRATIONS.get(version)
            if steps is None:
                raise OutboxError(f"{where}: no migration from outbox schema version {version}")
            for statement in steps:
                db.execute(statement)
            version += 1
        db.execute(
            "INSERT OR REPLACE INTO meta (key, value) VALUES ('schema_version', ?)", (version,)
        )

    # -- in ----------------------------------------------------------------------------------

    def put(self, messages: Sequence[Message], *, deliverable: bool) -> None:
        """Take a batch, in order. Deliverable: kept in memory for ``next_live`` as far as the
        window allows, the rest stored. Not deliverable: stored in one transaction, after
        whatever was still pending."""
        cutoff = self._cutoff_ms()
        batch: list[Stored] = []
        next_id = self._next_id
        for m in messages:
            if m.ts_ms < cutoff and m.clock_synced:
                self.dropped_age += 1
                continue
            batch.append(Stored(next_id, m, False))
            next_id += 1
        self._next_id = next_id
        if deliverable:
            room = max(0, self.window - len(self._pending) - self._live_in_flight)
            live = batch[:room] if room < len(batch) else batch
            self._pending.extend(live)
            self._live_bytes += sum(_size(s.message) for s in live)
            if len(live) < len(batch):
                self._write(batch[len(live) :])
        elif batch or self._pending:
            older = list(self._pending)
            self._pending.clear()
            self._live_bytes -= sum(_size(s.message) for s in older)
            self._write(older + batch)

    def spill(self) -> None:
        """The connection is lost: every unacked live message to disk, in order; every
        stored one to be handed out again."""
        live = sorted(
            chain((s for s in self._in_flight.values() if not s.historical), self._pending),
            key=lambda s: s.id,
        )
        self._in_flight.clear()
        self._pending.clear()
        self._live_in_flight = self._replay_in_flight = 0
        self._live_bytes = 0
        self._cursor = 0
        if live or self._to_delete:
            self._write(live)

    # -- out ---------------------------------------------------------------------------------

    def next_live(self, n: int) -> list[Stored]:
        """Up to ``n`` pending live messages, oldest first, now in flight."""
        out: list[Stored] = []
        pending = self._pending
        in_flight = self._in_flight
        cutoff = self._cutoff_ms()
        while pending and len(out) < n:
            s = pending.popleft()
            if s.message.ts_ms < cutoff and s.message.clock_synced:
                self.dropped_age += 1
                self._live_bytes -= _size(s.message)
                continue
            in_flight[s.id] = s
            out.append(s)
        self._live_in_flight += len(out)
        return out

    def next_replay(self, n: int) -> list[Stored]:
        """Up to ``n`` stored messages, oldest first, marked historical, now in flight; fewer
        as the replay rate and the window allow."""
        db = self._db
        if db is None or self._stored <= self._replay_in_flight:
            return []
        want = min(n, self.window - self._replay_in_flight)
        if math.isfinite(self.replay_rate):
            now = self._monotonic()
            elapsed = now - self._refilled
            self._tokens = min(self._burst, self._tokens + elapsed * self.replay_rate)
            self._refilled = now
            want = min(want, int(self._tokens))
        cutoff = self._cutoff_ms()
        out: list[Stored] = []
        while len(out) < want:
            try:
                rows = db.execute(_REPLAY, (self._cursor, want - len(out))).fetchall()
            except sqlite3.Error as exc:
                self._failed(f"cannot read: {exc}")
                break
            if not rows:
                break
            for id_, topic, payload, qos, retain, ts_ms, synced, rebased in rows:
                m = Message(topic, payload, qos, bool(retain), ts_ms, bool(synced), rebased)
                if ts_ms < cutoff and synced:
                    self._forget_stored(id_, m)
                    self.dropped_age += 1
                    continue
                s = Stored(id_, m, True)
                self._in_flight[id_] = s
                out.append(s)
            self._cursor = rows[-1][0]
        self._replay_in_flight += len(out)
        if math.isfinite(self.replay_rate):
            self._tokens -= len(out)
        self.replayed += len(out)
        if len(self._to_delete) >= DELETE_BATCH:
            self._write([])
        return out

    def acked(self, ids: Iterable[int]) -> None:
        """The broker has these (unknown ids, e.g. acks from before a ``spill``, are ignored)."""
        in_flight = self._in_flight
        for id_ in ids:
            s = in_flight.pop(id_, None)
            if s is None:
                continue
            self.acked_count += 1
            if s.historical:
                self._replay_in_flight -= 1
                self._forget_stored(id_, s.message)
            else:
                self._live_in_flight -= 1
                self._live_bytes -= _size(s.message)
        # An emptied store is cleaned at once: a restart then replays nothing twice.
        if len(self._to_delete) >= DELETE_BATCH or (self._to_delete and not self._stored):
            self._write([])

    def rebase(self, offset_ms: int) -> None:
        """The clock was stepped by ``offset_ms``: shift every message stamped before it."""
        for s in chain(self._pending, self._in_flight.values()):
            m = s.message
            if not m.clock_synced:
                s.message = m._replace(
                    ts_ms=m.ts_ms + offset_ms, clock_synced=True, rebased_ms=offset_ms
                )
        if self._unsynced_on_disk:
            self._write([], rebase=offset_ms)

    # -- state -------------------------------------------------------------------------------

    def replay_allowance(self) -> int:
        """How many stored messages :meth:`next_replay` would hand out now (window and rate),
        without taking any: a caller can wait for a whole batch instead of taking crumbs."""
        room = self.window - self._replay_in_flight
        if math.isfinite(self.replay_rate):
            elapsed = self._monotonic() - self._refilled
            room = min(room, int(min(self._burst, self._tokens + elapsed * self.replay_rate)))
        return max(0, min(room, self.to_replay))

    @property
    def to_replay(self) -> int:
        """Stored messages not yet handed out."""
        return self._stored - self._replay_in_flight

    def oldest_ts_ms(self) -> int | None:
        """Source timestamp of the oldest message not yet acknowledged (the page's "age").

        One indexed read of the first stored row; rows acked but not yet deleted may make it
        look up to ``DELETE_BATCH`` messages older than it is.
        """
        candidates = [s.message.ts_ms for s in self._in_flight.values()]
        if self._pending:
            candidates.append(self._pending[0].message.ts_ms)
        db = self._db
        if db is not None and self._stored:
            try:
                row = db.execute(
                    "SELECT ts_ms FROM messages WHERE id > ? ORDER BY id LIMIT 1",
                    (max(self._to_delete, default=0),),
                ).fetchone()
            except sqlite3.Error:
                row = None
            if row is not None:
                candidates.append(int(row[0]))
        return min(candidates, default=None)

    @property
    def stats(self) -> dict[str, int]:
        """Counters for the health page; drops by cause."""
        return {
            "queued_messages": len(self._pending) + self._live_in_flight + self._stored,
            "queued_bytes": self._live_bytes + self._stored_bytes,
            "pending": len(self._pending),
            "in_flight": len(self._in_flight),
            "stored": self._stored,
            "stored_bytes": self._stored_bytes,
            "dropped_full": self.dropped_full,
            "dropped_age": self.dropped_age,
            "dropped_io": self.dropped_io,
            "replayed": self.replayed,
            "acked": self.acked_count,
            "disk_batches": self.disk_batches,
        }

    # -- disk --------------------------------------------------------------------------------

    def _cutoff_ms(self) -> float:
        return (self._clock() - self.max_age_s) * 1000.0

    def _forget_stored(self, id_: int, m: Message) -> None:
        self._to_delete.append(id_)
        self._stored -= 1
        self._stored_bytes -= _size(m)

    def _failed(self, message: str) -> None:
        self.last_error = message
        self._once.failed(message)

    def _write(self, fresh: list[Stored], *, rebase: int | None = None) -> None:
        """One transaction: acked deletes, ``fresh`` (id order), the byte bound, the id mark.

        State changes only after the commit; a failed write loses ``fresh`` (counted).
        """
        db = self._db
        if db is None:
            raise OutboxError(f"{self.path}: used after close")
        cutoff = self._cutoff_ms()
        rows: list[tuple[int, str, bytes, int, int, int, int, int, int]] = []
        size = 0
        refused = aged = 0
        unsynced = False
        newest = self.when_full == "drop_newest"
        if self._refusing and self._stored_bytes <= self.max_bytes * REFILL_AT:
            self._refusing = False
        for s in fresh:
            m = s.message
            if m.ts_ms < cutoff and m.clock_synced:
                aged += 1
                continue
            n = _size(m)
            # Once one is refused, so is every later one, across puts, until the store has
            # emptied to REFILL_AT: a smaller later message that would still fit must not
            # leave holes between what was kept (ids 1, 2, 4).
            if newest and (
                refused or self._refusing or self._stored_bytes + size + n > self.max_bytes
            ):
                refused += 1
                self._refusing = True
                continue
            size += n
            unsynced = unsynced or not m.clock_synced
            rows.append(
                (s.id, m.topic, m.payload, m.qos, int(m.retain), m.ts_ms, int(m.clock_synced),
                 m.rebased_ms, n)
            )  # fmt: skip
        stored, stored_bytes = self._stored + len(rows), self._stored_bytes + size
        dropped: list[int] = []
        try:
            db.execute("BEGIN IMMEDIATE")
            try:
                if self._to_delete:
                    db.executemany(
                        "DELETE FROM messages WHERE id = ?", [(i,) for i in self._to_delete]
                    )
                if rows:
                    db.executemany(
                        "INSERT INTO messages (id, topic, payload, qos, retain, ts_ms,"
                        " clock_synced, rebased_ms, size) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                        rows,
                    )
                if rebase is not None:
                    db.execute(
                        "UPDATE messages SET ts_ms = ts_ms + ?, clock_synced = 1, rebased_ms = ?"
                        " WHERE clock_synced = 0 AND id >= ?",
                        (rebase, rebase, self._session_first_id),
                    )
                if stored_bytes > self.max_bytes:
                    last = 0
                    oldest = db.execute("SELECT id, size FROM messages ORDER BY id")
                    for id_, n in oldest:
                        dropped.append(id_)
                        stored -= 1
                        stored_bytes -= n
                        last = id_
                        if stored_bytes <= self.max_bytes:
                            break
                    oldest.close()
                    db.execute("DELETE FROM messages WHERE id <= ?", (last,))
                if self._next_id != self._saved_next_id:
                    db.execute("UPDATE meta SET value = ? WHERE key = 'next_id'", (self._next_id,))
                db.execute("COMMIT")
            except BaseException:
                if db.in_transaction:
                    db.execute("ROLLBACK")
                raise
        except sqlite3.Error as exc:
            self.dropped_io += len(fresh)
            self._failed(f"cannot write {len(fresh)} message(s): {exc}")
            return
        self._once.recovered()
        self.disk_batches += 1
        self._to_delete.clear()
        self._saved_next_id = self._next_id
        self._stored, self._stored_bytes = stored, stored_bytes
        self.dropped_age += aged
        self.dropped_full += refused + len(dropped)
        for id_ in dropped:
            if self._in_flight.pop(id_, None) is not None:
                self._replay_in_flight -= 1
        if rebase is not None:
            self._unsynced_on_disk = False
        elif unsynced:
            self._unsynced_on_disk = True

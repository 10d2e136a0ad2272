"""Spool stage: each counts message waits here, durably, until it is safe elsewhere.

Safe means stored by the aggregator when the agent has the aggregator's receipt key
(``broker.receipt_key``): a signed receipt names the windows it holds (:meth:`Spool.settle`).
Without that key (an aggregator without receipts) it means acknowledged by the broker
(:meth:`Spool.ack`), which is only as safe as the broker's memory: see docs/aggregator.md.

One SQLite database in the agent's state directory (``<agent.state_dir>/spool.sqlite3``)::

    counts(seq INTEGER PRIMARY KEY, window_start INTEGER, body BLOB)   signed envelopes, in order
    spool_state(name TEXT PRIMARY KEY, value INTEGER)                  first_seq, last_seq,
                                                                       dropped, newest_window

It holds counts messages only, exactly as they go on the wire: no device data.

* **WAL journal**: the publisher reads and deletes while the pipeline appends, and a reader
  never blocks a writer. Each thread opens its own :class:`Spool` on the file.
* **synchronous = FULL**: a commit returns only once the write-ahead log is on disk. With
  NORMAL the database stays consistent across a power cut but the last commits may be rolled
  back. An append that is rolled back may already have been sent, and after the restart its
  sequence number would go to another window, which the aggregator (de-duplicating by agent
  and sequence number) would then drop. FULL costs one fsync per commit: one every few
  minutes live; when several windows are ready at once (a backfill, a replay), the agent
  appends them in one transaction (:meth:`Spool.append_many`), one fsync for the batch, and
  publishes none of them before that commit. One fsync per window held a backfill to
  260-294 windows/s here; batched, see ``bench/bench_spool.py``. Acknowledged messages are
  deleted a batch per commit: a batch of deletions lost to a power cut only means those
  windows are sent again, which de-duplication absorbs.
* **Sequence numbers** are allocated in the transaction that stores the message, so a number is
  never used twice. A new spool starts numbering at the current Unix time in seconds: an agent
  whose state directory was lost does not reuse its old numbers (it makes far fewer than one
  window a second).
* **Size cap** (``spool.max_windows``): the spool keeps the windows of the last
  ``max_windows`` sequence numbers; appending drops older ones still unsent, the oldest first
  (the publisher sends in order, so these are the only ones left beyond the cap). They are
  counted in ``dropped``, which the agent reports in its ``status`` message, and logged. The
  check is one range delete on the primary key, whatever the spool's size.
* ``newest_window`` remembers the newest window ever spooled: the agent publishes a window at
  most once, even when a restart replays a capture from its beginning.
"""

from __future__ import annotations

import logging
import sqlite3
import time
from collections.abc import Callable, Collection, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

from firmware_agent.contract.errors import ConfigError, SpoolError
from firmware_agent.contract.resolve import setting

__all__ = ["SPOOL_FILE", "Spool", "SpoolSettings", "SpoolState", "SpooledMessage"]

log = logging.getLogger("footfall.agent")

SPOOL_FILE = "spool.sqlite3"
_SCHEMA = (
    "CREATE TABLE IF NOT EXISTS counts "
    "(seq INTEGER PRIMARY KEY, window_start INTEGER NOT NULL, body BLOB NOT NULL)",
    "CREATE TABLE IF NOT EXISTS spool_state (name TEXT PRIMARY KEY, value INTEGER NOT NULL)",
)


@dataclass(frozen=True, slots=True)
class SpoolSettings:
    """How much the spool keeps; checked where made."""

    max_windows: int = setting(
        100_000,
        "Windows the spool keeps unsent at most; beyond, the oldest are dropped and counted.",
    )

    def __post_init__(self) -> None:
        if not 1 <= self.max_windows <= 100_000_000:
            raise ConfigError(
                f"spool.max_windows must be between 1 and 100000000, got {self.max_windows}"
            )


@dataclass(frozen=True, slots=True)
class SpooledMessage:
    seq: int
    window_start: int  # Unix seconds
    body: bytes  # the signed envelope, as published


@dataclass(frozen=True, slots=True)
class SpoolState:
    pending: int  # messages waiting for an acknowledgement
    dropped: int  # messages dropped by the size cap, ever
    last_seq: int  # highest sequence number allocated (0: none yet)
    appended: int  # messages ever appended (sequence numbers start at first_seq, not 1)
    newest_window: int | None  # start of the newest window ever spooled


class Spool:
    """One connection to the spool database (one per thread)."""

    def __init__(self, path: Path, settings: SpoolSettings | None = None) -> None:
        self.path = path
        self.max_windows = (settings or SpoolSettings()).max_windows
        try:
            path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
            self._db = sqlite3.connect(path, timeout=30, isolation_level=None)
        except (OSError, sqlite3.Error) as exc:
            raise SpoolError(f"{path}: cannot open the spool: {exc}") from exc
        try:
            (mode,) = self._db.execute("PRAGMA journal_mode=WAL").fetchone()
            if mode != "wal":
                raise SpoolError(f"{path}: the spool needs WAL journaling, got {mode!r}")
            self._db.execute("PRAGMA synchronous=FULL")
            with self._write():
                for statement in _SCHEMA:
                    self._db.execute(statement)
                self._db.executemany(
                    "INSERT OR IGNORE INTO spool_state VALUES (?, ?)",
                    [
                        ("first_seq", max(1, int(time.time()))),
                        ("last_seq", 0),
                        ("dropped", 0),
                        ("newest_window", -1),
                    ],
                )
        except BaseException:
            self._db.close()
            raise

    def __enter__(self) -> Spool:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def close(self) -> None:
        self._db.close()

    @contextmanager
    def _write(self) -> Iterator[None]:
        """One write transaction, taken at once (BEGIN IMMEDIATE), committed or rolled back."""
        try:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                yield
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")
        except sqlite3.Error as exc:
            raise SpoolError(f"{self.path}: {exc}") from exc

    def _state(self) -> dict[str, int]:
        return dict(self._db.execute("SELECT name, value FROM spool_state").fetchall())

    def append(self, window_start: int, message: Callable[[int], bytes]) -> int:
        """Allocate the next sequence number, build the window's message with it
        (``message(seq)``), and store it: all in one durable transaction. Returns the number."""
        (seq,) = self.append_many([(window_start, message)])
        return seq

    def append_many(self, windows: Sequence[tuple[int, Callable[[int], bytes]]]) -> list[int]:
        """:meth:`append` for several windows (start, message builder) in one durable
        transaction, so one fsync: every one of them is stored, or none. Returns the numbers."""
        with self._write():
            state = self._state()
            first = state["last_seq"] + 1 if state["last_seq"] else state["first_seq"]
            seqs = list(range(first, first + len(windows)))
            self._db.executemany(
                "INSERT INTO counts VALUES (?, ?, ?)",
                [
                    (seq, start, message(seq))
                    for seq, (start, message) in zip(seqs, windows, strict=True)
                ],
            )
            last = seqs[-1] if seqs else state["last_seq"]
            self._db.execute("UPDATE spool_state SET value = ? WHERE name = 'last_seq'", (last,))
            self._db.execute(
                "UPDATE spool_state SET value = max(value, ?) WHERE name = 'newest_window'",
                (max((start for start, _ in windows), default=-1),),
            )
            dropped = self._db.execute(
                "DELETE FROM counts WHERE seq <= ?", (last - self.max_windows,)
            ).rowcount
            if dropped:
                self._db.execute(
                    "UPDATE spool_state SET value = value + ? WHERE name = 'dropped'", (dropped,)
                )
        if dropped:
            log.warning(
                "spool full (%d windows): dropped the oldest %d unsent, %d dropped in all",
                self.max_windows,
                dropped,
                state["dropped"] + dropped,
            )
        return seqs

    def pending(self, after: int = 0, limit: int = 256) -> list[SpooledMessage]:
        """The oldest ``limit`` messages with a sequence number above ``after``, in order."""
        try:
            rows = self._db.execute(
                "SELECT seq, window_start, body FROM counts WHERE seq > ? ORDER BY seq LIMIT ?",
                (after, limit),
            ).fetchall()
        except sqlite3.Error as exc:
            raise SpoolError(f"{self.path}: {exc}") from exc
        return [SpooledMessage(*row) for row in rows]

    def ack(self, seqs: Collection[int]) -> None:
        """The broker has these messages: they leave the spool (one commit)."""
        with self._write():
            self._db.executemany("DELETE FROM counts WHERE seq = ?", [(s,) for s in seqs])

    def settle(self, ranges: Sequence[tuple[int, int]]) -> int:
        """The aggregator holds the windows of these seq ranges (inclusive): they leave the
        spool (one commit); how many did."""
        with self._write():
            return sum(
                self._db.execute("DELETE FROM counts WHERE seq BETWEEN ? AND ?", r).rowcount
                for r in ranges
            )

    def state(self) -> SpoolState:
        try:
            state = self._state()
            (pending,) = self._db.execute("SELECT count(*) FROM counts").fetchone()
        except sqlite3.Error as exc:
            raise SpoolError(f"{self.path}: {exc}") from exc
        newest, last = state["newest_window"], state["last_seq"]
        appended = last - state["first_seq"] + 1 if last else 0
        return SpoolState(pending, state["dropped"], last, appended, None if newest < 0 else newest)

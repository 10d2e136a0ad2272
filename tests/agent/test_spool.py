"""The spool: sequence numbers never repeat, order is kept, acknowledged messages leave, the cap
drops the oldest and counts them, and the database is durable (WAL, synchronous FULL)."""

from __future__ import annotations

import multiprocessing
import os
import time
from pathlib import Path

import pytest

from firmware_agent.contract.errors import ConfigError, SchemaError
from firmware_agent.service.spool import Spool, SpoolSettings


def _body(seq: int) -> bytes:
    return f"message {seq}".encode()


def test_sequence_numbers_grow_from_the_creation_time_and_survive_reopening(
    tmp_path: Path,
) -> None:
    path = tmp_path / "state" / "spool.sqlite3"
    before = int(time.time())
    with Spool(path) as spool:
        first = spool.append(300, _body)
        assert before <= first <= int(time.time())
        assert spool.append(600, _body) == first + 1
    with Spool(path) as spool:
        assert spool.append(900, _body) == first + 2
        state = spool.state()
    assert (state.pending, state.last_seq, state.newest_window) == (3, first + 2, 900)
    assert path.parent.stat().st_mode & 0o777 == 0o700


def test_pending_is_in_order_and_acks_remove(tmp_path: Path) -> None:
    with Spool(tmp_path / "spool.sqlite3") as spool:
        seqs = [spool.append(300 * i, _body) for i in range(5)]
        pending = spool.pending()
        assert [m.seq for m in pending] == seqs
        assert pending[2].body == _body(seqs[2]) and pending[2].window_start == 600
        assert [m.seq for m in spool.pending(after=seqs[1], limit=2)] == seqs[2:4]
        spool.ack([seqs[0], seqs[2]])
        assert [m.seq for m in spool.pending()] == [seqs[1], seqs[3], seqs[4]]
        assert spool.state().pending == 3


def test_the_cap_drops_the_oldest_and_counts_them(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    with Spool(tmp_path / "spool.sqlite3", SpoolSettings(max_windows=3)) as spool:
        seqs = [spool.append(300 * i, _body) for i in range(5)]
        assert [m.seq for m in spool.pending()] == seqs[2:]
        state = spool.state()
    assert (state.pending, state.dropped, state.last_seq) == (3, 2, seqs[-1])
    assert "spool full (3 windows): dropped the oldest 1 unsent, 2 dropped in all" in caplog.text


def test_a_failed_message_takes_no_sequence_number(tmp_path: Path) -> None:
    def invalid(seq: int) -> bytes:
        raise SchemaError("counts message: $.devices: -1 is less than the minimum of 0")

    with Spool(tmp_path / "spool.sqlite3") as spool:
        first = spool.append(0, _body)
        with pytest.raises(SchemaError):
            spool.append(300, invalid)
        assert spool.append(600, _body) == first + 1
        assert spool.state().newest_window == 600


def test_windows_ready_together_go_in_one_transaction_all_or_none(tmp_path: Path) -> None:
    def invalid(seq: int) -> bytes:
        raise SchemaError("counts message: $.devices: -1 is less than the minimum of 0")

    commits = []
    with Spool(tmp_path / "spool.sqlite3", SpoolSettings(max_windows=4)) as spool:
        spool._db.set_trace_callback(lambda sql: commits.append(sql) if sql == "COMMIT" else None)
        first = spool.append(0, _body)
        seqs = spool.append_many([(300 * i, _body) for i in range(1, 6)])
        assert (seqs, len(commits)) == (list(range(first + 1, first + 6)), 2)
        with pytest.raises(SchemaError):
            spool.append_many([(1800, _body), (2100, invalid)])
        assert [m.seq for m in spool.pending()] == seqs[1:]  # the cap: 4 windows
        state = spool.state()
    assert (state.last_seq, state.newest_window, state.dropped) == (seqs[-1], 1500, 2)


def test_the_journal_is_wal_and_commits_are_synchronous(tmp_path: Path) -> None:
    path = tmp_path / "spool.sqlite3"
    with Spool(path) as spool:
        assert spool._db.execute("PRAGMA journal_mode").fetchone() == ("wal",)
        assert spool._db.execute("PRAGMA synchronous").fetchone() == (2,)  # FULL


def _append_and_die(path: str) -> None:
    Spool(Path(path)).append(300, _body)
    os._exit(0)  # no close, no checkpoint: the WAL holds the commit


def test_appends_survive_a_process_that_dies(tmp_path: Path) -> None:
    path = tmp_path / "spool.sqlite3"
    Spool(path).close()
    child = multiprocessing.get_context("spawn").Process(target=_append_and_die, args=(str(path),))
    child.start()
    child.join(30)
    with Spool(path) as spool:
        assert [m.window_start for m in spool.pending()] == [300]


def test_the_cap_is_checked() -> None:
    with pytest.raises(ConfigError, match=r"spool\.max_windows must be between 1 and"):
        SpoolSettings(max_windows=0)


def test_a_receipt_takes_out_exactly_the_windows_its_ranges_cover(tmp_path: Path) -> None:
    with Spool(tmp_path / "spool.sqlite3") as spool:
        seqs = [spool.append(1000 + 300 * i, lambda seq: b"m%d" % seq) for i in range(10)]
        covered = [(seqs[0], seqs[2]), (seqs[5], seqs[5]), (seqs[9] + 1, seqs[9] + 100)]
        assert spool.settle(covered) == 4
        assert [m.seq for m in spool.pending()] == [seqs[i] for i in (3, 4, 6, 7, 8, 9)]
        assert spool.settle(covered) == 0  # an old receipt again: nothing more
        assert spool.state().pending == 6

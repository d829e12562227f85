"""The daemon's and the client's sqlite databases opened one way: autocommit (each
transaction is an explicit BEGIN), write-ahead log, foreign keys enforced."""

from __future__ import annotations

import sqlite3
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

TIMEOUT = 30.0  # seconds a writer waits for another's lock


def open_database(path: Path, *, durable: bool, threads: bool = False) -> sqlite3.Connection:
    """A writable connection to ``path``. ``durable``: every commit reaches the disk
    (synchronous=FULL, for a client's root); otherwise commits are durable at
    checkpoints and the file is never corrupt (NORMAL, the daemon's history). ``threads``:
    the caller shares the connection between threads under a lock of its own."""
    db = sqlite3.connect(path, isolation_level=None, timeout=TIMEOUT, check_same_thread=not threads)
    db.execute("PRAGMA journal_mode=WAL")
    db.execute(f"PRAGMA synchronous={'FULL' if durable else 'NORMAL'}")
    db.execute("PRAGMA foreign_keys=ON")
    return db


@contextmanager
def transaction(
    db: sqlite3.Connection, fail: Callable[[str], Exception]
) -> Iterator[sqlite3.Connection]:
    """One immediate transaction on ``db``: committed, or rolled back on any exception. A
    failure of sqlite itself (a full disk, say) is raised as ``fail("write failed: ...")``."""
    try:
        db.execute("BEGIN IMMEDIATE")
        try:
            yield db
        except BaseException:
            db.execute("ROLLBACK")
            raise
        db.execute("COMMIT")
    except sqlite3.Error as error:
        if db.in_transaction:
            try:
                db.execute("ROLLBACK")
            except sqlite3.Error:
                pass  # sqlite rolls back by itself on the next BEGIN
        raise fail(f"write failed: {error}") from None

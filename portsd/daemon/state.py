"""The daemon's memory: evaluations, builds, remembered failures, in sqlite (WAL).

Everything the daemon must not forget across a ``kill -9`` lives here; everything else
(the loaded tree, the graph, the keys) is recomputed at start. A build row moves
``queued -> running -> built | failed | skipped | cancelled``; a row left ``queued`` or
``running`` by a killed daemon becomes ``interrupted`` when the next one opens the
database, and the first evaluation after the restart plans it again (its key is still
not in the repository), so nothing is lost and nothing is half-published: publishing is
the repository's own atomic operation.

A failure is remembered by build key (``failures``): the key is not planned again until
it changes (a new commit) or someone asks (``forget_failures``, ``portsd rebuild``).

Thread-safe: one connection, used under a lock; each call is one short transaction.
"""

from __future__ import annotations

import sqlite3
import threading
import time
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from enum import StrEnum
from functools import partial
from pathlib import Path
from typing import Any

from portsd.errors import PortsdError
from portsd.sqlitedb import open_database, transaction

SCHEMA_VERSION = 2

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (name TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS evaluations (
    id INTEGER PRIMARY KEY,
    revision TEXT NOT NULL,
    branch TEXT NOT NULL,
    trigger TEXT NOT NULL,
    created REAL NOT NULL,
    finished REAL,
    planned INTEGER NOT NULL DEFAULT 0,
    blocked INTEGER NOT NULL DEFAULT 0,
    error TEXT
);
CREATE TABLE IF NOT EXISTS builds (
    id INTEGER PRIMARY KEY,
    evaluation INTEGER NOT NULL REFERENCES evaluations(id),
    port TEXT NOT NULL,
    version TEXT NOT NULL,
    key TEXT NOT NULL,
    state TEXT NOT NULL,
    reason TEXT NOT NULL DEFAULT '',
    detail TEXT,
    queued REAL NOT NULL,
    started REAL,
    finished REAL,
    log TEXT,
    toolchain TEXT NOT NULL DEFAULT ''
);
CREATE INDEX IF NOT EXISTS builds_by_state ON builds(state);
CREATE INDEX IF NOT EXISTS builds_by_key ON builds(key);
CREATE INDEX IF NOT EXISTS builds_by_port ON builds(port, finished);
CREATE INDEX IF NOT EXISTS builds_by_evaluation ON builds(evaluation, state);
CREATE TABLE IF NOT EXISTS failures (
    key TEXT PRIMARY KEY,
    port TEXT NOT NULL,
    build INTEGER NOT NULL REFERENCES builds(id),
    detail TEXT NOT NULL,
    at REAL NOT NULL
);
"""


class BuildState(StrEnum):
    QUEUED = "queued"
    RUNNING = "running"
    BUILT = "built"
    FAILED = "failed"
    SKIPPED = "skipped"
    CANCELLED = "cancelled"
    INTERRUPTED = "interrupted"

    @property
    def active(self) -> bool:
        return self in (BuildState.QUEUED, BuildState.RUNNING)


@dataclass(frozen=True, slots=True)
class EvaluationRow:
    id: int
    revision: str
    branch: str
    trigger: str
    created: float
    finished: float | None
    planned: int
    blocked: int
    error: str | None


@dataclass(frozen=True, slots=True)
class BuildRow:
    id: int
    evaluation: int
    port: str
    version: str
    key: str
    state: BuildState
    reason: str
    detail: str | None
    queued: float
    started: float | None
    finished: float | None
    log: str | None
    toolchain: str  # what it stood on: the seed, or a stage of the tree's toolchain

    @property
    def duration(self) -> float | None:
        if self.started is None:
            return None
        return (self.finished or time.time()) - self.started


@dataclass(frozen=True, slots=True)
class NewBuild:
    """A build to queue: which port, which key, and why (the `ports why` explanation)."""

    port: str
    version: str
    key: str
    reason: str
    toolchain: str = ""  # what its key stands on: the seed, or a stage of the tree's toolchain


class StateError(PortsdError):
    """The state database cannot be used."""

    def __init__(self, path: str, message: str) -> None:
        self.path = path
        self.message = message
        super().__init__(f"{path}: {message}")


_BUILD_COLUMNS = (
    "id, evaluation, port, version, key, state, reason, detail, queued, started, finished, log, "
    "toolchain"
)
_EVALUATION_COLUMNS = "id, revision, branch, trigger, created, finished, planned, blocked, error"


class State:
    """The sqlite database of one daemon (``<state>/portsd.sqlite``)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._lock = threading.Lock()
        try:
            self._db = open_database(path, durable=False, threads=True)
            self._db.executescript(_SCHEMA)  # idempotent; executescript commits by itself
            with self._transaction() as db:
                version = db.execute("SELECT value FROM meta WHERE name = 'schema'").fetchone()
                if version is None:
                    db.execute("INSERT INTO meta VALUES ('schema', ?)", (str(SCHEMA_VERSION),))
                elif int(version[0]) == 1:  # builds did not say what they stood on
                    db.execute("ALTER TABLE builds ADD COLUMN toolchain TEXT NOT NULL DEFAULT ''")
                    db.execute("UPDATE meta SET value = ? WHERE name = 'schema'", ("2",))
                elif int(version[0]) != SCHEMA_VERSION:
                    raise StateError(
                        str(path), f"schema {version[0]}, this portsd knows {SCHEMA_VERSION}"
                    )
        except sqlite3.Error as error:
            raise StateError(str(path), f"cannot open the state database: {error}") from None

    def close(self) -> None:
        with self._lock:
            self._db.close()

    @contextmanager
    def _transaction(self) -> Iterator[sqlite3.Connection]:
        """One transaction; a failure of sqlite (a full disk, say) is a StateError."""
        with self._lock, transaction(self._db, partial(StateError, str(self.path))) as db:
            yield db

    def _query(self, sql: str, parameters: Sequence[object] = ()) -> list[tuple[Any, ...]]:
        with self._lock:
            try:
                return self._db.execute(sql, parameters).fetchall()
            except sqlite3.Error as error:
                raise StateError(str(self.path), f"cannot read: {error}") from None

    # -- recovery ----------------------------------------------------------------------

    def recover(self) -> list[BuildRow]:
        """Mark builds a killed daemon left queued or running as interrupted; return them."""
        now = time.time()
        with self._transaction() as db:
            rows = db.execute(
                f"SELECT {_BUILD_COLUMNS} FROM builds WHERE state IN ('queued', 'running')"
            ).fetchall()
            db.execute(
                "UPDATE builds SET state = 'interrupted', finished = ?, "
                "detail = 'the daemon stopped' WHERE state IN ('queued', 'running')",
                (now,),
            )
        return [_build(row) for row in rows]

    # -- evaluations -------------------------------------------------------------------

    def start_evaluation(self, revision: str, branch: str, trigger: str) -> int:
        with self._transaction() as db:
            cursor = db.execute(
                "INSERT INTO evaluations (revision, branch, trigger, created) VALUES (?, ?, ?, ?)",
                (revision, branch, trigger, time.time()),
            )
            assert cursor.lastrowid is not None
            return cursor.lastrowid

    def finish_evaluation(
        self,
        evaluation: int,
        builds: Iterable[NewBuild],
        *,
        blocked: int,
        superseded: Iterable[int] = (),
        error: str | None = None,
    ) -> list[BuildRow]:
        """Record the plan of ``evaluation``: queue ``builds``, cancel the ``superseded``
        queued builds (ids) of earlier evaluations. Returns the queued rows."""
        now = time.time()
        with self._transaction() as db:
            db.executemany(
                "UPDATE builds SET state = 'cancelled', finished = ?, "
                "detail = 'superseded by a newer commit' WHERE id = ? AND state = 'queued'",
                [(now, build_id) for build_id in superseded],
            )
            ids = []
            for build in builds:
                cursor = db.execute(
                    "INSERT INTO builds "
                    "(evaluation, port, version, key, state, reason, queued, toolchain) "
                    "VALUES (?, ?, ?, ?, 'queued', ?, ?, ?)",
                    (
                        evaluation,
                        build.port,
                        build.version,
                        build.key,
                        build.reason,
                        now,
                        build.toolchain,
                    ),
                )
                ids.append(cursor.lastrowid)
            db.execute(
                "UPDATE evaluations SET finished = ?, planned = ?, blocked = ?, error = ? "
                "WHERE id = ?",
                (now, len(ids), blocked, error, evaluation),
            )
            rows = db.execute(
                f"SELECT {_BUILD_COLUMNS} FROM builds WHERE evaluation = ? ORDER BY id",
                (evaluation,),
            ).fetchall()
        return [_build(row) for row in rows]

    def explain(self, reasons: dict[int, str]) -> None:
        """Attach the explanations (build id -> text) computed after the builds were queued."""
        with self._transaction() as db:
            db.executemany(
                "UPDATE builds SET reason = ? WHERE id = ?",
                [(text, build) for build, text in reasons.items()],
            )

    def evaluation(self, evaluation: int) -> EvaluationRow | None:
        rows = self._query(
            f"SELECT {_EVALUATION_COLUMNS} FROM evaluations WHERE id = ?", (evaluation,)
        )
        return _evaluation(rows[0]) if rows else None

    def latest_evaluation(self) -> EvaluationRow | None:
        rows = self._query(
            f"SELECT {_EVALUATION_COLUMNS} FROM evaluations ORDER BY id DESC LIMIT 1"
        )
        return _evaluation(rows[0]) if rows else None

    def evaluations(self, limit: int = 50) -> list[EvaluationRow]:
        rows = self._query(
            f"SELECT {_EVALUATION_COLUMNS} FROM evaluations ORDER BY id DESC LIMIT ?", (limit,)
        )
        return [_evaluation(row) for row in rows]

    # -- builds ------------------------------------------------------------------------

    def start_build(self, build: int, log: str) -> None:
        with self._transaction() as db:
            db.execute(
                "UPDATE builds SET state = 'running', started = ?, log = ? WHERE id = ?",
                (time.time(), log, build),
            )

    def finish_build(self, build: int, state: BuildState, detail: str | None = None) -> BuildRow:
        """Record how ``build`` ended; a failure is remembered by its key."""
        assert not state.active
        now = time.time()
        with self._transaction() as db:
            db.execute(
                "UPDATE builds SET state = ?, detail = ?, finished = ? WHERE id = ?",
                (state.value, detail, now, build),
            )
            row = _build(
                db.execute(f"SELECT {_BUILD_COLUMNS} FROM builds WHERE id = ?", (build,)).fetchone()
            )
            if state is BuildState.FAILED:
                db.execute(
                    "INSERT OR REPLACE INTO failures (key, port, build, detail, at) "
                    "VALUES (?, ?, ?, ?, ?)",
                    (row.key, row.port, row.id, detail or "", now),
                )
        return row

    def build(self, build: int) -> BuildRow | None:
        rows = self._query(f"SELECT {_BUILD_COLUMNS} FROM builds WHERE id = ?", (build,))
        return _build(rows[0]) if rows else None

    def builds(
        self,
        *,
        states: Iterable[BuildState] = (),
        evaluation: int | None = None,
        port: str | None = None,
        limit: int = 100,
    ) -> list[BuildRow]:
        """Newest first, filtered."""
        where: list[str] = []
        parameters: list[object] = []
        wanted = [state.value for state in states]
        if wanted:
            where.append(f"state IN ({', '.join('?' * len(wanted))})")
            parameters.extend(wanted)
        if evaluation is not None:
            where.append("evaluation = ?")
            parameters.append(evaluation)
        if port is not None:
            where.append("port = ?")
            parameters.append(port)
        clause = f"WHERE {' AND '.join(where)}" if where else ""
        rows = self._query(
            f"SELECT {_BUILD_COLUMNS} FROM builds {clause} ORDER BY id DESC LIMIT ?",
            (*parameters, limit),
        )
        return [_build(row) for row in rows]

    def evaluation_outcomes(self, evaluations: Sequence[int]) -> dict[int, dict[BuildState, int]]:
        """For each of ``evaluations``, how many of the builds it queued are in each state
        (only the states present)."""
        if not evaluations:
            return {}
        rows = self._query(
            "SELECT evaluation, state, COUNT(*) FROM builds WHERE evaluation IN "
            f"({', '.join('?' * len(evaluations))}) GROUP BY evaluation, state",
            list(evaluations),
        )
        found: dict[int, dict[BuildState, int]] = {}
        for evaluation, state, count in rows:
            found.setdefault(int(evaluation), {})[BuildState(state)] = int(count)
        return found

    def last_finished(self, evaluation: int) -> float | None:
        """When the last build ``evaluation`` queued ended (None: none has)."""
        rows = self._query("SELECT MAX(finished) FROM builds WHERE evaluation = ?", (evaluation,))
        return None if rows[0][0] is None else float(rows[0][0])

    def latest_by_key(self) -> dict[str, BuildRow]:
        """Each key's newest build that was not cancelled or interrupted: how its last
        attempt went (or that one is queued or running now)."""
        rows = self._query(
            f"SELECT {_BUILD_COLUMNS} FROM builds WHERE id IN (SELECT MAX(id) FROM builds "
            "WHERE state NOT IN ('cancelled', 'interrupted') GROUP BY key)"
        )
        return {str(row[4]): _build(row) for row in rows}

    def recent_outcomes(self, limit: int = 2000) -> list[BuildRow]:
        """The newest ``limit`` builds that ended built or failed, newest first: the
        history that says whether a port's failure is new, continued or fixed."""
        rows = self._query(
            f"SELECT {_BUILD_COLUMNS} FROM builds WHERE state IN ('built', 'failed') "
            "ORDER BY id DESC LIMIT ?",
            (limit,),
        )
        return [_build(row) for row in rows]

    def counts(self) -> dict[BuildState, int]:
        """How many builds are in each state (every state present, zero or not)."""
        found: dict[str, int] = dict(
            self._query("SELECT state, COUNT(*) FROM builds GROUP BY state")
        )
        return {state: int(found.get(state.value, 0)) for state in BuildState}

    def durations(self) -> dict[str, float]:
        """Each port's most recent successful build duration: the scheduler's estimates."""
        rows = self._query(
            "SELECT port, finished - started FROM builds "
            "WHERE state = 'built' AND started IS NOT NULL AND finished IS NOT NULL ORDER BY id"
        )
        return {str(port): float(seconds) for port, seconds in rows}

    def finished_durations(self) -> list[float]:
        """Durations of every finished build, for the metrics histogram."""
        rows = self._query(
            "SELECT finished - started FROM builds "
            "WHERE started IS NOT NULL AND finished IS NOT NULL AND state IN ('built', 'failed')"
        )
        return [float(row[0]) for row in rows]

    # -- failures ----------------------------------------------------------------------

    def failed_keys(self) -> dict[str, str]:
        """Remembered failures: build key -> what went wrong."""
        return {
            str(key): str(detail) for key, detail in self._query("SELECT key, detail FROM failures")
        }

    def forget_failures(self, ports: Iterable[str]) -> int:
        """Allow the named ports to be tried again (``portsd rebuild``); returns how many."""
        names = list(ports)
        with self._transaction() as db:
            cursor = db.execute(
                f"DELETE FROM failures WHERE port IN ({', '.join('?' * len(names))})", names
            )
            return cursor.rowcount


def _build(row: tuple[Any, ...]) -> BuildRow:
    (id_, evaluation, port, version, key, state, reason, detail) = row[:8]
    queued, started, finished, log, toolchain = row[8:]
    return BuildRow(
        id=int(id_),
        evaluation=int(evaluation),
        port=str(port),
        version=str(version),
        key=str(key),
        state=BuildState(state),
        reason=str(reason),
        detail=None if detail is None else str(detail),
        queued=float(queued),
        started=None if started is None else float(started),
        finished=None if finished is None else float(finished),
        log=None if log is None else str(log),
        toolchain=str(toolchain),
    )


def _evaluation(row: tuple[Any, ...]) -> EvaluationRow:
    id_, revision, branch, trigger, created, finished, planned, blocked, error = row
    return EvaluationRow(
        id=int(id_),
        revision=str(revision),
        branch=str(branch),
        trigger=str(trigger),
        created=float(created),
        finished=None if finished is None else float(finished),
        planned=int(planned),
        blocked=int(blocked),
        error=None if error is None else str(error),
    )

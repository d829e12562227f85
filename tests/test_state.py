"""The daemon's sqlite state: lifecycle of builds, recovery after a kill, failure memory."""

from __future__ import annotations

import multiprocessing
import os
import signal
import sqlite3
import time
from pathlib import Path

import pytest

from portsd.daemon.state import BuildState, NewBuild, State, StateError

KEY_A, KEY_B, KEY_C = "a" * 64, "b" * 64, "c" * 64


def queue(state: State, *builds: tuple[str, str]) -> list[int]:
    evaluation = state.start_evaluation("f" * 40, "main", "push")
    rows = state.finish_evaluation(
        evaluation,
        [NewBuild(port, "1.0-1", key, f"{port} must be built") for port, key in builds],
        blocked=0,
    )
    return [row.id for row in rows]


def test_a_build_moves_through_its_states(tmp_path: Path) -> None:
    state = State(tmp_path / "db.sqlite")
    [build] = queue(state, ("zlib", KEY_A))
    assert state.build(build).state is BuildState.QUEUED  # type: ignore[union-attr]
    state.start_build(build, "/logs/zlib/1.log")
    row = state.build(build)
    assert row is not None and row.state is BuildState.RUNNING and row.log == "/logs/zlib/1.log"
    state.finish_build(build, BuildState.BUILT)
    row = state.build(build)
    assert row is not None and row.state is BuildState.BUILT and row.duration is not None
    assert state.counts()[BuildState.BUILT] == 1 and state.counts()[BuildState.FAILED] == 0
    assert "zlib" in state.durations()
    evaluation = state.latest_evaluation()
    assert evaluation is not None and evaluation.planned == 1 and evaluation.revision == "f" * 40


def test_failures_are_remembered_by_key_until_forgotten(tmp_path: Path) -> None:
    state = State(tmp_path / "db.sqlite")
    failing, fine = queue(state, ("zlib", KEY_A), ("png", KEY_B))
    state.start_build(failing, "/l")
    state.finish_build(failing, BuildState.FAILED, "zlib: build failed (exit 2)")
    state.finish_build(fine, BuildState.SKIPPED, "dependency zlib failed")
    assert state.failed_keys() == {KEY_A: "zlib: build failed (exit 2)"}
    reopened = State(tmp_path / "db.sqlite")
    assert reopened.failed_keys() == {KEY_A: "zlib: build failed (exit 2)"}
    assert reopened.forget_failures(["zlib", "nonexistent"]) == 1
    assert reopened.failed_keys() == {}


def test_superseded_queued_builds_are_cancelled(tmp_path: Path) -> None:
    state = State(tmp_path / "db.sqlite")
    old, running = queue(state, ("zlib", KEY_A), ("png", KEY_B))
    state.start_build(running, "/l")
    evaluation = state.start_evaluation("e" * 40, "main", "push")
    rows = state.finish_evaluation(
        evaluation, [NewBuild("zlib", "1.1-1", KEY_C, "")], blocked=0, superseded=[old, running]
    )
    assert [row.key for row in rows] == [KEY_C]
    old_row, running_row = state.build(old), state.build(running)
    assert old_row is not None and old_row.state is BuildState.CANCELLED
    assert old_row.detail == "superseded by a newer commit"
    assert running_row is not None and running_row.state is BuildState.RUNNING  # only queued ones


def _hold_a_write_then_die(path: str, ready: multiprocessing.synchronize.Event) -> None:
    state = State(Path(path))
    [build] = queue(state, ("zlib", KEY_A))
    state.start_build(build, "/l")
    db = sqlite3.connect(path, isolation_level=None)
    db.execute("BEGIN IMMEDIATE")
    db.execute("UPDATE builds SET state = 'built'")  # never committed
    ready.set()
    time.sleep(60)


def test_kill_9_mid_transaction_then_recover(tmp_path: Path) -> None:
    path = tmp_path / "db.sqlite"
    context = multiprocessing.get_context("spawn")
    ready = context.Event()
    child = context.Process(target=_hold_a_write_then_die, args=(str(path), ready))
    child.start()
    assert ready.wait(30)
    os.kill(child.pid, signal.SIGKILL)  # type: ignore[arg-type]
    child.join()
    state = State(path)
    interrupted = state.recover()
    assert [row.port for row in interrupted] == ["zlib"]
    row = state.build(interrupted[0].id)
    assert row is not None and row.state is BuildState.INTERRUPTED  # the uncommitted write is gone
    assert state.recover() == []
    assert sqlite3.connect(path).execute("PRAGMA integrity_check").fetchone() == ("ok",)


def test_an_unusable_database_is_a_clear_error(tmp_path: Path) -> None:
    path = tmp_path / "db.sqlite"
    path.write_bytes(b"this is not a database" * 100)
    with pytest.raises(StateError, match="cannot open the state database"):
        State(path)


def test_a_build_records_the_toolchain_it_stands_on(tmp_path: Path) -> None:
    state = State(tmp_path / "db.sqlite")
    evaluation = state.start_evaluation("f" * 40, "main", "push")
    on = "stage 2 of cc, libc (built on stage 1's packages)"
    [row] = state.finish_evaluation(
        evaluation, [NewBuild("zlib", "1.0-1", KEY_A, "", on)], blocked=0
    )
    assert row.toolchain == on
    assert State(tmp_path / "db.sqlite").build(row.id) == row


def test_a_database_of_schema_1_gains_the_toolchain_of_builds(tmp_path: Path) -> None:
    path = tmp_path / "db.sqlite"
    with sqlite3.connect(path) as db:  # the builds table as schema 1 had it, with a build
        db.executescript(
            """
            CREATE TABLE meta (name TEXT PRIMARY KEY, value TEXT NOT NULL);
            INSERT INTO meta VALUES ('schema', '1');
            CREATE TABLE evaluations (id INTEGER PRIMARY KEY, revision TEXT NOT NULL,
                branch TEXT NOT NULL, trigger TEXT NOT NULL, created REAL NOT NULL,
                finished REAL, planned INTEGER NOT NULL DEFAULT 0,
                blocked INTEGER NOT NULL DEFAULT 0, error TEXT);
            CREATE TABLE builds (id INTEGER PRIMARY KEY,
                evaluation INTEGER NOT NULL REFERENCES evaluations(id), port TEXT NOT NULL,
                version TEXT NOT NULL, key TEXT NOT NULL, state TEXT NOT NULL,
                reason TEXT NOT NULL DEFAULT '', detail TEXT, queued REAL NOT NULL,
                started REAL, finished REAL, log TEXT);
            INSERT INTO evaluations (revision, branch, trigger, created)
                VALUES ('r', 'main', 'push', 1);
            INSERT INTO builds (evaluation, port, version, key, state, queued)
                VALUES (1, 'zlib', '1.0-1', 'k', 'built', 1);
            """
        )
    db.close()
    state = State(path)
    old = state.build(1)
    assert old is not None and old.port == "zlib" and old.toolchain == ""
    [new] = queue(state, ("png", KEY_B))
    assert state.build(new) is not None
    state.close()
    assert State(path).build(1) == old  # migrated once, opened again as schema 2

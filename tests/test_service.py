"""The daemon (portsd.daemon.service) in this process, around a real bare repository and
its real state database: how it is wired, and its lifecycle (requests handed to its
loop, an ordered stop)."""

from __future__ import annotations

import asyncio
import dis
import shutil
import sqlite3
import subprocess
import sys
import threading
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager, contextmanager
from pathlib import Path
from types import CodeType, FrameType
from typing import Any

import pytest

from portsd.config import Config, load_config
from portsd.daemon.initrepo import init_repository, state_of
from portsd.daemon.server.app import create_app, create_runner
from portsd.daemon.service import Daemon
from portsd.daemon.state import State
from tests.fixtures import commit_all, git, recipe


def loaded_by(module: str) -> set[str]:
    """The portsd modules a fresh interpreter loads to import ``module``."""
    shown = subprocess.run(
        [sys.executable, "-c", f"import sys, {module}; print(*sorted(sys.modules))"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    return {name for name in shown if name.startswith("portsd")}


def test_the_engine_does_not_load_its_presentation_layer() -> None:
    loaded = loaded_by("portsd.daemon.service")
    assert "portsd.daemon.engine" in loaded
    assert not {name for name in loaded if name.startswith("portsd.daemon.server")}


def pushed_to_a_build_host(tmp_path: Path, tree: Path) -> Config:
    """A repository made by `portsd init` (without its hook: nothing listens), ``tree``
    pushed to it; returns the daemon's config."""
    bare = tmp_path / "build.git"
    init_repository(bare)
    (bare / "hooks" / "post-receive").unlink()
    git(tree, "push", "-q", str(bare), "main")
    return load_config(state_of(bare))


@pytest.fixture
def nothing_to_build(tmp_path: Path) -> tuple[Config, str]:
    """A build host given a tree whose one port cannot be built (its dependency is
    missing): evaluations without builds. Returns the daemon's config and the commit."""
    tree = tmp_path / "tree"
    (tree / "ports" / "lonely").mkdir(parents=True)
    (tree / "ports" / "lonely" / "port.toml").write_text(recipe("lonely", depends=("nosuch",)))
    git(tree, "init", "-q", "-b", "main")
    commit = commit_all(tree, "a tree with nothing to build")
    return pushed_to_a_build_host(tmp_path, tree), commit


@asynccontextmanager
async def running(config: Config, daemon: Daemon | None = None) -> AsyncIterator[Daemon]:
    """The daemon (or ``daemon``) as `portsd serve` runs it, its lifetime the application's,
    without a listening socket."""
    daemon = daemon or Daemon(config, asyncio.get_running_loop())
    app = create_app(config, daemon)
    app.cleanup_ctx.append(daemon.lifetime)
    runner = create_runner(app)
    await runner.setup()
    try:
        yield daemon
    finally:
        await runner.cleanup()


async def until(condition: Callable[[], Any], what: str, timeout: float = 10) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not await asyncio.to_thread(condition):
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.01)


def idle_at(daemon: Daemon, commit: str) -> bool:
    status = daemon.status()
    return status.evaluated == commit and not status.evaluating


@contextmanager
def before_first_attribute_store(
    code: CodeType, action: Callable[[], None]
) -> Iterator[threading.Event]:
    """Run ``action`` once, on this thread, just before a frame of ``code`` next stores an
    attribute: a thread switch forced at that instruction, whatever the scheduler would do.
    Yields the event set once it ran."""
    stores = {i.offset for i in dis.get_instructions(code) if i.opname == "STORE_ATTR"}
    done = threading.Event()

    def opcodes(frame: FrameType, event: str, arg: object) -> Any:
        if event == "opcode" and frame.f_lasti in stores and not done.is_set():
            done.set()
            action()
        return opcodes

    def calls(frame: FrameType, event: str, arg: object) -> Any:
        if frame.f_code is not code or done.is_set():
            return None
        frame.f_trace_opcodes = True
        return opcodes

    sys.settrace(calls)
    try:
        yield done
    finally:
        sys.settrace(None)
    assert done.is_set(), "the frame stored no attribute"


def test_a_rebuild_asked_while_the_loop_takes_its_triggers_is_not_lost(
    nothing_to_build: tuple[Config, str],
) -> None:
    config, commit = nothing_to_build

    async def main() -> None:
        async with running(config) as daemon:
            await until(lambda: idle_at(daemon, commit), "the first evaluation")

            def from_an_api_thread() -> None:
                asker = threading.Thread(target=daemon.rebuild, args=(["lonely"],))
                asker.start()
                asker.join()

            # The loop wakes for another trigger; the rebuild lands as it takes its triggers.
            loop = Daemon._evaluation_loop.__code__
            with before_first_attribute_store(loop, from_an_api_thread) as asked:
                daemon.trigger("test")
                await until(asked.is_set, "the loop to take the trigger")
            await until(lambda: len(daemon.state.evaluations()) == 2, "the rebuild's evaluation")
            triggers = [e.trigger for e in reversed(daemon.state.evaluations())]
            assert triggers == ["startup", "rebuild"]

    asyncio.run(main())


def test_a_stop_during_an_evaluation_finishes_it_and_queues_nothing(
    tmp_path: Path, ports_tree: Path
) -> None:
    config = pushed_to_a_build_host(tmp_path, ports_tree)  # nine ports to build

    async def main() -> None:
        # Another writer holds the database, so the first evaluation waits inside...
        other = sqlite3.connect(config.database, isolation_level=None)
        async with running(config) as daemon:
            other.execute("BEGIN IMMEDIATE")
            await until(lambda: daemon.status().evaluating, "the first evaluation to start")
            # ...until the stop is well under way.
            asyncio.get_running_loop().call_later(0.5, other.execute, "COMMIT")
        other.close()

    asyncio.run(main())
    state = State(config.database)
    [evaluation] = state.evaluations()
    builds = state.builds()
    state.close()
    assert evaluation.finished is not None
    assert evaluation.error == "the daemon stopped before its builds were queued"
    assert builds == []  # none queued that no scheduler would ever run


def test_an_evaluation_that_fails_midway_is_finished_with_its_error(
    nothing_to_build: tuple[Config, str],
) -> None:
    config, _ = nothing_to_build

    async def main() -> None:
        daemon = Daemon(config, asyncio.get_running_loop())
        keys = daemon.repo.path / "keys"  # where the repository lists the keys it holds
        shutil.rmtree(keys)
        keys.write_text("not a directory\n")
        async with running(config, daemon):
            await until(
                lambda: [e.finished is not None for e in daemon.state.evaluations()] == [True],
                "the evaluation to be finished",
            )
            [evaluation] = daemon.state.evaluations()
            assert evaluation.error == f"{keys}: Not a directory"

    asyncio.run(main())

"""The one way portsd runs a child process.

Every child goes through ``run()``, in mkosi's manner:

- the command is an argument list, never a shell string;
- the environment is built from scratch (nothing leaks in from the daemon's own);
- the child starts in a new session, with stdin from /dev/null and umask 022;
- its combined stdout and stderr are streamed line by line to a log file and to an optional
  callback (live logs) as they arrive;
- a timeout, any exception in the caller (including KeyboardInterrupt) or a callback that
  raises kills the whole process tree with SIGKILL: the child, its descendants (also those
  that called setsid(), as long as their parent is alive) and every process left in its
  session;
- nothing the command started outlives ``run()``: after the command exits, processes left
  behind in its session are killed too;
- the outcome is described as what happened: ``exit 2``, ``exit 127 (command not found)``,
  ``killed by SIGTERM``, ``timed out after 30 s``.

A process that leaves the session *and* loses its parent before ``run()`` looks for it is
beyond a plain process tree's reach; commands that must be contained completely run inside
the sandbox (portsd/build/sandbox.py), whose PID namespace dies with its first process.
"""

from __future__ import annotations

import logging
import os
import selectors
import shlex
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)

DEFAULT_PATH = "/usr/bin:/usr/sbin:/bin:/sbin"
"""PATH of a child whose caller gives no environment: the system's, never the daemon's."""

_EXIT_GRACE = 0.25  # seconds to keep reading after the command exited, for buffered output
_MAX_LINE = 65536  # a "line" longer than this is passed on in pieces
_KILL_ROUNDS = 100  # bound on freeze-and-rescan rounds while a tree keeps forking
_KILL_PASSES = 10  # bound on stop-all-then-kill passes (a pass ends when nothing is left)


@dataclass(frozen=True, slots=True)
class RunResult:
    """What became of one command. ``returncode`` is Popen's (negative: killed by a signal)."""

    argv: tuple[str, ...]
    returncode: int
    status: str
    duration: float
    timed_out: bool = False
    cancelled: bool = False

    @property
    def ok(self) -> bool:
        return self.returncode == 0 and not self.timed_out and not self.cancelled


def describe_exit(returncode: int, timed_out_after: float | None = None) -> str:
    """``returncode`` (Popen's convention) in words: ``exit 2``, ``killed by SIGTERM``.

    ``timed_out_after`` wins: a command we killed at its timeout "timed out after N s".
    """
    if timed_out_after is not None:
        return f"timed out after {timed_out_after:g} s"
    if returncode < 0:
        return f"killed by {_signal_name(-returncode)}"
    if returncode == 126:
        return "exit 126 (not executable)"
    if returncode == 127:
        return "exit 127 (command not found)"
    if 128 < returncode < 128 + signal.NSIG:
        # shells and bwrap report a child killed by signal N as 128+N
        return f"exit {returncode} (128+{_signal_name(returncode - 128)})"
    return f"exit {returncode}"


def _signal_name(number: int) -> str:
    try:
        return signal.Signals(number).name
    except ValueError:
        return f"signal {number}"


def run(
    argv: Sequence[str],
    *,
    env: Mapping[str, str] | None = None,
    cwd: Path | None = None,
    log_path: Path | None = None,
    on_line: Callable[[str], None] | None = None,
    timeout: float | None = None,
    umask: int = 0o022,
    cancel: threading.Event | None = None,
) -> RunResult:
    """Run ``argv`` to completion and describe the outcome; never raises for a failed command.

    ``env`` is the child's whole environment (default: ``PATH`` and ``LANG=C.UTF-8`` only);
    ``umask`` is set in the child, so file modes do not depend on the daemon's own umask.
    Output is appended to ``log_path`` as raw bytes and given to ``on_line`` decoded (UTF-8,
    invalid bytes replaced), without the newline. A command that cannot be started at all
    is reported like a shell would: ``exit 127 (command not found)`` or ``exit 126``.
    Exceptions from ``on_line`` and interrupts propagate after the process tree is killed.
    Setting ``cancel`` (from another thread) kills the tree too; the result says "cancelled".
    """
    argv = tuple(argv)
    environment = dict(env) if env is not None else {"PATH": DEFAULT_PATH, "LANG": "C.UTF-8"}
    log.debug("+ %s", shlex.join(argv))
    start = time.monotonic()
    with _LogSink(log_path, on_line) as sink:
        try:
            process = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                env=environment,
                cwd=cwd,
                start_new_session=True,
                umask=umask,
            )
        except OSError as error:
            if error.filename is not None and os.fsdecode(error.filename) != argv[0]:
                raise  # e.g. a missing cwd: the caller's mistake, not the command's failure
            code = 127 if isinstance(error, FileNotFoundError) else 126
            sink.feed(f"portsd: cannot execute {argv[0]}: {error.strerror}\n".encode())
            sink.finish()
            return RunResult(argv, code, describe_exit(code), time.monotonic() - start)
        try:
            stopped = _pump(process, sink, start, timeout, cancel)
        except BaseException:
            _kill_tree(process.pid)
            process.wait()
            raise
        finally:
            assert process.stdout is not None
            process.stdout.close()
        returncode = process.wait()
        sink.finish()
    duration = time.monotonic() - start
    timed_out = stopped == "timeout"
    if stopped == "cancelled":
        return RunResult(argv, returncode, "cancelled", duration, cancelled=True)
    status = describe_exit(returncode, timeout if timed_out else None)
    return RunResult(argv, returncode, status, duration, timed_out)


def _pump(
    process: subprocess.Popen[bytes],
    sink: _LogSink,
    start: float,
    timeout: float | None,
    cancel: threading.Event | None,
) -> str | None:
    """Move output to ``sink`` until EOF; kill the tree at the deadline or on ``cancel``.

    Returns why it stopped the command early: "timeout", "cancelled", or None.
    """
    assert process.stdout is not None
    fd = process.stdout.fileno()
    os.set_blocking(fd, False)
    deadline = start + timeout if timeout is not None else None
    exited_at: float | None = None
    with selectors.DefaultSelector() as selector:
        selector.register(fd, selectors.EVENT_READ)
        while True:
            now = time.monotonic()
            if deadline is not None and now >= deadline:
                _kill_tree(process.pid)
                _drain(fd, sink)
                return "timeout"
            if cancel is not None and cancel.is_set():
                _kill_tree(process.pid)
                _drain(fd, sink)
                return "cancelled"
            if exited_at is None and _has_exited(process.pid):
                exited_at = now
            if exited_at is not None and now - exited_at >= _EXIT_GRACE:
                break  # something left behind still holds the pipe open
            wait = 0.1 if exited_at is None else _EXIT_GRACE - (now - exited_at)
            if deadline is not None:
                wait = min(wait, deadline - now)
            if not selector.select(max(wait, 0.0)):
                continue
            try:
                data = os.read(fd, 65536)
            except BlockingIOError:
                continue
            if not data:
                break
            sink.feed(data)
    # The command is done; whatever it left in its session goes with it.
    _kill_tree(process.pid)
    _drain(fd, sink)
    return None


def _has_exited(pid: int) -> bool:
    """Whether our child ``pid`` has exited, leaving it unreaped: until it is reaped, neither
    its pid nor its session id can be reused, so the tree can still be found by them."""
    return os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is not None


def _drain(fd: int, sink: _LogSink) -> None:
    """Read what the killed tree had already written, without waiting on stragglers."""
    deadline = time.monotonic() + _EXIT_GRACE
    with selectors.DefaultSelector() as selector:
        selector.register(fd, selectors.EVENT_READ)
        while selector.select(max(deadline - time.monotonic(), 0.0)):
            try:
                data = os.read(fd, 65536)
            except BlockingIOError:
                continue
            if not data:
                return
            sink.feed(data)


class _LogSink:
    """Splits a byte stream into lines for the log file and the callback."""

    def __init__(self, path: Path | None, on_line: Callable[[str], None] | None) -> None:
        self._file = path.open("ab") if path is not None else None
        self._on_line = on_line
        self._partial = bytearray()

    def __enter__(self) -> _LogSink:
        return self

    def __exit__(self, *_: object) -> None:
        if self._file is not None:
            self._file.close()

    def feed(self, data: bytes) -> None:
        if self._file is not None:
            self._file.write(data)
            self._file.flush()  # followers of the log see output as it happens
        if self._on_line is None:
            return
        self._partial += data
        while True:
            end = self._partial.find(b"\n")
            if end < 0:
                if len(self._partial) >= _MAX_LINE:
                    self._emit(bytes(self._partial))
                    self._partial.clear()
                return
            line = bytes(self._partial[:end])
            del self._partial[: end + 1]
            self._emit(line)

    def finish(self) -> None:
        """Pass on a last line that had no newline."""
        if self._partial and self._on_line is not None:
            self._emit(bytes(self._partial))
        self._partial.clear()

    def _emit(self, line: bytes) -> None:
        assert self._on_line is not None
        self._on_line(line.decode("utf-8", "replace").removesuffix("\r"))


def _kill_tree(root: int) -> None:
    """SIGKILL ``root``, its descendants and its session (``root`` started it with setsid).

    Everything is stopped before anything is killed, so no process is orphaned (and lost
    from the tree) while we look. Stopping works a process group at a time, atomically
    with respect to fork: a group whose members keep forking is frozen in one call.
    """
    for _ in range(_KILL_PASSES):
        stopped: set[int] = set()
        groups: set[int] = set()
        for _ in range(_KILL_ROUNDS):
            found = _tree_members(root, _process_table())
            new = {pid: group for pid, group in found.items() if pid not in stopped}
            if not new:
                break
            for group in set(new.values()) - groups:
                _signal_group(group, signal.SIGSTOP)
                groups.add(group)
            _signal_all(new, signal.SIGSTOP)
            stopped |= new.keys()
        for group in groups:
            _signal_group(group, signal.SIGKILL)
        _signal_all(stopped | {root}, signal.SIGKILL)
        if not stopped:
            return


def _signal_all(pids: Iterable[int], sig: signal.Signals) -> None:
    for pid in pids:
        try:
            os.kill(pid, sig)
        except (ProcessLookupError, PermissionError):
            pass  # already gone (or reused by someone else's process: not ours to touch)


def _signal_group(group: int, sig: signal.Signals) -> None:
    try:
        os.killpg(group, sig)
    except (ProcessLookupError, PermissionError):
        pass


def _process_table() -> list[tuple[int, int, int, int]]:
    """(pid, parent pid, process group, session) of every live (non-zombie) process."""
    table: list[tuple[int, int, int, int]] = []
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/stat", "rb") as stat:
                text = stat.read()
        except OSError:
            continue  # exited while we looked
        # "pid (comm) state ppid pgrp session ...": comm may contain spaces and parens
        fields = text[text.rfind(b")") + 2 :].split()
        if len(fields) < 4 or fields[0] == b"Z":
            continue
        table.append((int(entry.name), int(fields[1]), int(fields[2]), int(fields[3])))
    return table


def _tree_members(root: int, table: Sequence[tuple[int, int, int, int]]) -> dict[int, int]:
    """``root``, its living descendants and every process in session ``root``: pid -> group."""
    groups = {pid: group for pid, _, group, _ in table}
    children: dict[int, list[int]] = {}
    pending = [root] if root in groups else []
    for pid, ppid, _, session in table:
        children.setdefault(ppid, []).append(pid)
        if session == root:
            pending.append(pid)
    members: dict[int, int] = {}
    while pending:
        pid = pending.pop()
        if pid not in members:
            members[pid] = groups[pid]
            pending.extend(children.get(pid, ()))
    return members

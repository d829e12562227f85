"""The one way portsd runs a child process.

Every child goes through ``run()``, in mkosi's manner:

- the command is an argument list, never a shell string;
- the environment is built from scratch (nothing leaks in from the daemon's own);
- the child starts in a new session, with stdin from /dev/null and umask 022;
- its combined stdout and stderr are streamed line by line to a log file and to an optional
  callback (live logs) as they arrive;
- a timeout, any exception in the caller (including KeyboardInterrupt) or a callback that
  raises kills the whole process tree with SIGKILL: the child, its descendants (also those
  that called setsid() or lost their parent) and every process left in its session;
- nothing the command started outlives ``run()``: after the command exits, processes left
  behind in its session are killed too;
- nor its caller: the command runs under a reaper (portsd/build/reaper.py), a subreaper
  that kills the whole tree when the calling process dies, even by SIGKILL;
- the outcome is described as what happened: ``exit 2``, ``exit 127 (command not found)``,
  ``killed by SIGTERM``, ``timed out after 30 s``.
"""

from __future__ import annotations

import logging
import os
import selectors
import shlex
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from portsd.build import reaper
from portsd.build.reaper import kill_tree

log = logging.getLogger(__name__)

DEFAULT_PATH = "/usr/bin:/usr/sbin:/bin:/sbin"
"""PATH of a child whose caller gives no environment: the system's, never the daemon's."""

_EXIT_GRACE = 0.25  # seconds to keep reading after the command exited, for buffered output
_MAX_LINE = 65536  # a "line" longer than this is passed on in pieces


@dataclass(frozen=True, slots=True)
class Limits:
    """What a command's whole process tree may use; None: no limit. The reaper
    (portsd/build/reaper.py, which says how each is enforced) kills the tree that goes over
    ``processes`` (at once), ``memory`` (bytes resident, summed) or ``disk`` (bytes under
    ``disk_path``); ``open_files`` is each process's own RLIMIT_NOFILE."""

    processes: int | None = None
    memory: int | None = None
    disk: int | None = None
    open_files: int | None = None
    disk_path: Path | None = None

    def options(self) -> list[str]:
        """The reaper's command-line options for these limits."""
        args: list[str] = []
        for name in ("processes", "memory", "open_files"):
            value = getattr(self, name)
            if value is not None:
                args += [f"--{name.replace('_', '-')}", str(value)]
        if self.disk is not None and self.disk_path is not None:
            args += ["--disk", str(self.disk), str(self.disk_path)]
        return args


@dataclass(frozen=True, slots=True)
class RunResult:
    """What became of one command. ``returncode`` is Popen's (negative: killed by a signal).
    ``limit``: the limit the reaper killed it for (``processes``, ``memory``, ``disk``)."""

    argv: tuple[str, ...]
    returncode: int
    status: str
    duration: float
    timed_out: bool = False
    cancelled: bool = False
    limit: str | None = None

    @property
    def ok(self) -> bool:
        return self.returncode == 0 and not self.timed_out and not self.cancelled and not self.limit


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
    limits: Limits | None = None,
) -> RunResult:
    """Run ``argv`` to completion and describe the outcome; never raises for a failed command.

    ``env`` is the child's whole environment (default: ``PATH`` and ``LANG=C.UTF-8`` only);
    ``umask`` is set in the child, so file modes do not depend on the daemon's own umask.
    Output is appended to ``log_path`` as raw bytes and given to ``on_line`` decoded (UTF-8,
    invalid bytes replaced), without the newline. A command that cannot be started at all
    is reported like a shell would: ``exit 127 (command not found)`` or ``exit 126``.
    Exceptions from ``on_line`` and interrupts propagate after the process tree is killed.
    Setting ``cancel`` (from another thread) kills the tree too; the result says "cancelled".
    A tree that goes over ``limits`` is killed; the result names the limit.
    """
    argv = tuple(argv)
    environment = dict(env) if env is not None else {"PATH": DEFAULT_PATH, "LANG": "C.UTF-8"}
    log.debug("+ %s", shlex.join(argv))
    start = time.monotonic()
    report, reported = os.pipe()  # the reaper writes there the limit it killed the tree for
    options = ["--report", str(reported), *(limits.options() if limits else [])]
    with _LogSink(log_path, on_line) as sink, open(report, "rb") as report_file:
        try:
            process = subprocess.Popen(
                [sys.executable, "-I", "-S", reaper.__file__, *options, "--", *argv],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                env={},
                cwd=cwd,
                start_new_session=True,
                umask=umask,
                pass_fds=(reported,),
            )
        finally:
            os.close(reported)
        assert process.stdin is not None
        try:
            # The lifeline: the reaper reads the environment, then end of file when we die.
            process.stdin.write(reaper.encode_environment(environment))
            process.stdin.flush()
        except BrokenPipeError:
            pass  # the reaper is gone already; its exit status says how
        try:
            stopped = _pump(process, sink, start, timeout, cancel)
        except BaseException:
            kill_tree(process.pid)
            raise
        finally:
            assert process.stdout is not None
            process.stdout.close()
            process.stdin.close()  # end of file on the lifeline: the reaper cleans up too
            returncode = process.wait()
        sink.finish()
        limit = report_file.read().decode() or None
    duration = time.monotonic() - start
    timed_out = stopped == "timeout"
    if stopped == "cancelled":
        return RunResult(argv, returncode, "cancelled", duration, cancelled=True)
    if limit is not None:
        return RunResult(argv, returncode, f"over its {limit} limit", duration, limit=limit)
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
                kill_tree(process.pid)
                _drain(fd, sink)
                return "timeout"
            if cancel is not None and cancel.is_set():
                kill_tree(process.pid)
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
    kill_tree(process.pid)
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

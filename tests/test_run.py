"""portsd.build.run: real child processes, real process trees, checked through /proc."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from portsd.build.run import RunResult, describe_exit, run
from tests.processes import marker, processes_with, wait_until_gone


@pytest.mark.parametrize(
    ("returncode", "timed_out_after", "expected"),
    [
        (0, None, "exit 0"),
        (2, None, "exit 2"),
        (126, None, "exit 126 (not executable)"),
        (127, None, "exit 127 (command not found)"),
        (137, None, "exit 137 (128+SIGKILL)"),
        (-signal.SIGTERM, None, "killed by SIGTERM"),
        (-signal.SIGKILL, None, "killed by SIGKILL"),
        (-9, 30.0, "timed out after 30 s"),
        (-9, 0.5, "timed out after 0.5 s"),
    ],
)
def test_describe(returncode: int, timed_out_after: float | None, expected: str) -> None:
    assert describe_exit(returncode, timed_out_after) == expected


def test_output_goes_to_log_and_callback_line_by_line(tmp_path: Path) -> None:
    log = tmp_path / "log"
    log.write_bytes(b"header\n")
    lines: list[str] = []
    result = run(
        ["sh", "-c", "echo one; echo two >&2; printf 'caf\\303\\251\\nlast'"],
        log_path=log,
        on_line=lines.append,
    )
    assert result.ok and result.status == "exit 0" and result.returncode == 0
    assert lines == ["one", "two", "café", "last"]
    assert log.read_bytes() == "header\none\ntwo\ncafé\nlast".encode()


def test_lines_arrive_while_the_command_runs(tmp_path: Path) -> None:
    seen: list[tuple[str, float]] = []
    start = time.monotonic()
    run(
        ["sh", "-c", "echo first; sleep 0.5; echo second"],
        on_line=lambda line: seen.append((line, time.monotonic() - start)),
    )
    assert [line for line, _ in seen] == ["first", "second"]
    assert seen[0][1] < 0.4 < seen[1][1]


def test_invalid_utf8_is_replaced_in_callback_kept_in_log(tmp_path: Path) -> None:
    lines: list[str] = []
    log = tmp_path / "log"
    run(["printf", "a\\377b\\n"], on_line=lines.append, log_path=log)
    assert lines == ["a\ufffdb"]
    assert log.read_bytes() == b"a\xffb\n"


def test_environment_is_built_from_scratch(tmp_path: Path) -> None:
    os.environ["PORTSD_TEST_LEAK"] = "leaked"
    try:
        lines: list[str] = []
        run(["/usr/bin/env"], env={"PATH": "/usr/bin:/bin", "ONLY": "this"}, on_line=lines.append)
        assert sorted(lines) == ["ONLY=this", "PATH=/usr/bin:/bin"]
        lines.clear()
        run(["/usr/bin/env"], on_line=lines.append)
        assert "PORTSD_TEST_LEAK=leaked" not in lines
        assert sorted(lines) == ["LANG=C.UTF-8", "PATH=/usr/bin:/usr/sbin:/bin:/sbin"]
    finally:
        del os.environ["PORTSD_TEST_LEAK"]


def test_cwd_and_new_session(tmp_path: Path) -> None:
    lines: list[str] = []
    run(["sh", "-c", "pwd; ps -o sid= -p $$; echo $PPID"], cwd=tmp_path, on_line=lines.append)
    assert lines[0] == str(tmp_path)
    assert int(lines[1]) == int(lines[2])  # the reaper above the shell leads a new session
    assert int(lines[1]) != os.getsid(0)


def test_umask_is_fixed_whatever_the_callers() -> None:
    previous = os.umask(0o077)
    try:
        lines: list[str] = []
        run(["sh", "-c", "umask"], on_line=lines.append)
        run(["sh", "-c", "umask"], on_line=lines.append, umask=0o027)
        assert lines == ["0022", "0027"]
    finally:
        os.umask(previous)


def test_no_signal_is_ignored_whatever_the_callers() -> None:
    """A daemon started as a background job of a script has SIGINT and SIGQUIT ignored,
    and a shell cannot undo an ignore it inherits: a build's test suite that interrupts
    its own children would hang or fail. The command starts with none ignored."""
    previous = [
        (sig, signal.signal(sig, signal.SIG_IGN)) for sig in (signal.SIGINT, signal.SIGQUIT)
    ]
    try:
        lines: list[str] = []
        run(["sh", "-c", "grep SigIgn /proc/self/status"], on_line=lines.append)
    finally:
        for sig, handler in previous:
            signal.signal(sig, handler)
    assert lines == ["SigIgn:\t0000000000000000"]


# Ignores signal 32 by the raw syscall (glibc's sigaction refuses it), as a glibc
# posix_spawn leaves it, then runs a command that reports its ignored signals.
_RUN_WITH_SIGNAL_32_IGNORED = """
import ctypes
from portsd.build.run import run
libc = ctypes.CDLL(None, use_errno=True)
ignore = ctypes.create_string_buffer(32)
ignore[0] = 1  # SIG_IGN in the kernel's struct sigaction
assert libc.syscall(13, 32, ignore, None, 8) == 0  # rt_sigaction on x86_64
run(["grep", "SigIgn", "/proc/self/status"], on_line=print)
"""


@pytest.mark.skipif(os.uname().machine != "x86_64", reason="raw syscall number for x86_64")
def test_the_c_library_signals_are_not_ignored_whatever_the_callers() -> None:
    """glibc's posix_spawn starts its command with signals 32 and 33 ignored (a CI runner
    had 32 so), and no glibc call can set them back; the command starts with neither."""
    spawned = subprocess.run(
        [sys.executable, "-c", _RUN_WITH_SIGNAL_32_IGNORED],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert spawned.returncode == 0, spawned.stderr
    assert spawned.stdout.splitlines() == ["SigIgn:\t0000000000000000"]


def test_stdin_is_empty() -> None:
    lines: list[str] = []
    result = run(["sh", "-c", "cat; echo done"], on_line=lines.append, timeout=5)
    assert result.ok and lines == ["done"]


@pytest.mark.parametrize(
    ("argv", "status"),
    [
        (["sh", "-c", "exit 2"], "exit 2"),
        (["sh", "-c", "kill -TERM $$"], "killed by SIGTERM"),
        (["sh", "-c", "kill -KILL $$"], "killed by SIGKILL"),
        (["sh", "-c", "no-such-command-portsd"], "exit 127 (command not found)"),
        (["/nonexistent/portsd-tool"], "exit 127 (command not found)"),
        (["/etc/hostname"], "exit 126 (not executable)"),
    ],
)
def test_failures_say_what_happened(argv: list[str], status: str, tmp_path: Path) -> None:
    log = tmp_path / "log"
    result = run(argv, log_path=log, timeout=10)
    assert isinstance(result, RunResult)
    assert not result.ok and result.status == status and not result.timed_out
    if argv[0].startswith("/"):
        assert f"cannot execute {argv[0]}" in log.read_text()


def test_missing_cwd_is_the_callers_error(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        run(["true"], cwd=tmp_path / "missing")


def test_timeout_kills_the_whole_tree(tmp_path: Path) -> None:
    tag = marker()
    script = (
        f"sleep {tag} & "  # a background child
        f"setsid sh -c 'sleep {tag} & sleep {tag}' & "  # a new session with its own child
        f"sh -c 'trap \"\" TERM; sleep {tag}' & "  # one that ignores SIGTERM
        "echo started; wait"
    )
    lines: list[str] = []
    start = time.monotonic()
    result = run(["sh", "-c", script], on_line=lines.append, timeout=1.0)
    elapsed = time.monotonic() - start
    assert result.timed_out and not result.ok
    assert result.status == "timed out after 1 s"
    assert result.returncode == -signal.SIGKILL
    assert lines == ["started"]
    assert 1.0 <= elapsed < 3.0
    assert wait_until_gone(tag) == []


def test_a_forking_tree_is_frozen_then_killed(tmp_path: Path) -> None:
    tag = marker()
    # Every process keeps starting more: killing them one by one would never finish.
    script = f"f() {{ sleep {tag} & f & wait; }}; f"
    result = run(["sh", "-c", script], timeout=0.5)
    assert result.timed_out
    assert wait_until_gone(tag) == []


def test_leftovers_are_killed_when_the_command_exits(tmp_path: Path) -> None:
    tag = marker()
    start = time.monotonic()
    # The background child keeps stdout open: run() must not wait for it to finish.
    result = run(["sh", "-c", f"sleep {tag} & echo bye"], timeout=60)
    assert result.ok and result.status == "exit 0"
    assert time.monotonic() - start < 5
    assert wait_until_gone(tag) == []


def test_callback_exception_kills_the_child_and_propagates(tmp_path: Path) -> None:
    tag = marker()

    def interrupt(line: str) -> None:
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run(["sh", "-c", f"sleep {tag} & echo go; sleep {tag}"], on_line=interrupt, timeout=60)
    assert wait_until_gone(tag) == []


def test_a_long_line_without_newline_arrives_in_pieces() -> None:
    lines: list[str] = []
    run(["sh", "-c", "head -c 200000 /dev/zero | tr '\\0' x"], on_line=lines.append)
    assert "".join(lines) == "x" * 200000
    assert all(len(line) <= 65536 + 65536 for line in lines) and len(lines) >= 2


def test_cancel_from_another_thread_kills_the_tree() -> None:
    tag = marker()
    cancel = threading.Event()
    threading.Timer(0.3, cancel.set).start()
    start = time.monotonic()
    result = run(["sh", "-c", f"sleep {tag} & sleep {tag}; wait"], cancel=cancel)
    assert time.monotonic() - start < 3.0
    assert result.cancelled and not result.ok and result.status == "cancelled"
    assert wait_until_gone(tag) == []


@pytest.mark.skipif(
    os.geteuid() != 0 or not os.access("/usr/bin/python3", os.X_OK), reason="needs root"
)
def test_nothing_outlives_an_unprivileged_caller_killed_with_sigkill() -> None:
    """A daemon running as nobody, killed with SIGKILL while its command has a child that
    left the session: the reaper (a subreaper, as any user may be) adopts and kills it."""
    tag = marker()
    code = (
        "from portsd.build.run import run\n"
        f"run(['sh', '-c', \"setsid sh -c 'sleep {tag}' & sleep {tag}\"])\n"
    )
    caller = subprocess.Popen(
        ["setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups"]
        + ["/usr/bin/python3", "-c", code],
        cwd=Path(__file__).resolve().parents[1],
        start_new_session=True,
    )
    deadline = time.monotonic() + 20
    while len(processes_with(f"sleep\0{tag}")) < 2 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert len(processes_with(f"sleep\0{tag}")) == 2
    caller.kill()
    caller.wait()
    left = wait_until_gone(tag)
    for pid in left:
        os.kill(pid, 9)
    assert left == []

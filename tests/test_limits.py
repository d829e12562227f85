"""A build's limits, with real ports in the real sandbox: a fork bomb, a memory hog and a
disk filler each fail with one line naming the limit, and leave nothing running; a normal
build under the same limits passes."""

from __future__ import annotations

import os
import subprocess
import textwrap
import time
from pathlib import Path

import pytest

from portsd.build.builder import build_port
from portsd.build.run import Limits, run
from portsd.config import format_size, parse_size
from portsd.errors import OverLimit
from tests.processes import marker, wait_until_gone
from tests.test_builder import Port, custom, request

MiB = 1 << 20
LIMITS = Limits(processes=40, memory=64 * MiB, disk=16 * MiB, open_files=64)
NOBODY = ["setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups"]
REPOSITORY = Path(__file__).resolve().parents[1]
SYSTEM_PYTHON = "/usr/bin/python3"  # one nobody can run (a virtualenv's may live in /root)


def over_limit(tmp_path: Path, script: str) -> tuple[OverLimit, float]:
    """Build a port whose build step is ``script`` under LIMITS; the error and how long."""
    port = Port(tmp_path, "greedy")
    started = time.monotonic()
    with pytest.raises(OverLimit) as caught:
        build_port(request(tmp_path, port, port.recipe(custom(script)), limits=LIMITS))
    return caught.value, time.monotonic() - started


def pids_cgroup() -> bool:
    """Whether builds here get a pids cgroup (root, and a pids controller): without one a
    fork bomb is only counted, and may fill the machine's PID space between two samples,
    which a test on a shared machine must not do."""
    v1, v2 = Path("/sys/fs/cgroup/pids"), Path("/sys/fs/cgroup/cgroup.controllers")
    return os.geteuid() == 0 and (
        os.access(v1, os.W_OK) or (v2.is_file() and "pids" in v2.read_text().split())
    )


@pytest.mark.skipif(not pids_cgroup(), reason="no pids cgroup: a fork bomb would not be held")
def test_a_fork_bomb_is_stopped_at_the_process_limit(tmp_path: Path) -> None:
    tag = marker()
    error, seconds = over_limit(tmp_path, f"bomb() {{ bomb | bomb & }}; bomb; sleep {tag}")
    assert str(error).startswith(
        "build of greedy exceeded its process limit (40 processes); raise [build] process-limit"
    )
    assert error.step == "build" and seconds < 10
    assert wait_until_gone(tag) == []
    assert (
        "==> build: killed, over its process limit (40 processes)"
        in Path(str(error.log)).read_text()
    )


def test_a_memory_hog_is_stopped_at_the_memory_limit(tmp_path: Path) -> None:
    # grows 1 MiB at a time up to 2 GiB at most: bounded even if the limit failed
    hog = (
        "perl -e 'my @a; for (1..2048) "
        "{ push @a, q(x) x (1<<20); select(undef,undef,undef,0.002) }'"
    )
    error, seconds = over_limit(tmp_path, hog)
    assert str(error).startswith(
        "build of greedy exceeded its memory limit (64 MiB); raise [build] memory-limit"
    )
    assert seconds < 30


@pytest.mark.parametrize(
    "filler",
    [
        "head -c 100M /dev/zero > $SRCDIR/one-big-file",  # stopped by the file size limit
        "for i in $(seq 1 100); do head -c 1M /dev/zero > $SRCDIR/f$i; done; sleep 30",
    ],
    ids=["one-big-file", "many-small-files"],
)
def test_a_disk_filler_is_stopped_at_the_disk_limit(tmp_path: Path, filler: str) -> None:
    error, seconds = over_limit(tmp_path, filler)
    assert str(error).startswith(
        "build of greedy exceeded its disk limit (16 MiB); raise [build] disk-limit"
    )
    assert seconds < 30


def test_a_normal_build_passes_under_the_same_limits(tmp_path: Path) -> None:
    port = Port(tmp_path, "modest")
    script = (
        "printf 'int main(void){return 0;}' > m.c\ncc -o m m.c\n./m\n"
        'install -D -m 755 m "$DESTDIR/usr/bin/modest"'
    )
    result = build_port(request(tmp_path, port, port.recipe(custom(script)), limits=LIMITS))
    assert (result.destdir / "usr" / "bin" / "modest").is_file()


def test_open_files_are_limited_per_process() -> None:
    lines: list[str] = []
    result = run(["sh", "-c", "ulimit -n"], on_line=lines.append, limits=Limits(open_files=64))
    assert result.ok and lines == ["64"]


@pytest.mark.skipif(
    os.geteuid() != 0 or not os.access(SYSTEM_PYTHON, os.X_OK), reason="needs root and python3"
)
def test_a_memory_hog_of_an_unprivileged_daemon_is_stopped_too() -> None:
    """The same limit, counted by the reaper of a daemon that runs as nobody."""
    tag = marker()
    script = f"""
        from portsd.build.run import Limits, run
        hog = "perl -e 'my @a; for (1..2048) {{ push @a, q(x) x (1<<20); sleep 0 }}' {tag}"
        result = run(["sh", "-c", hog], limits=Limits(memory=64 << 20), timeout=60)
        print(result.limit, result.status)
    """
    done = subprocess.run(
        [*NOBODY, SYSTEM_PYTHON, "-c", textwrap.dedent(script)],
        capture_output=True,
        text=True,
        timeout=90,
        cwd=REPOSITORY,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "memory over its memory limit"
    assert wait_until_gone(tag) == []


@pytest.mark.parametrize(
    ("text", "size", "shown"),
    [
        ("2 GiB", 2 << 30, "2 GiB"),
        ("512M", 512 * MiB, "512 MiB"),
        ("100 KiB", 100 << 10, "100 KiB"),
        ("1.5G", 3 << 29, "1.5 GiB"),
        ("4096", 4096, "4 KiB"),
    ],
)
def test_sizes_read_and_shown(text: str, size: int, shown: str) -> None:
    assert parse_size(text) == size
    assert format_size(size) == shown


@pytest.mark.parametrize("text", ["", "lots", "-1G", "2 XiB"])
def test_bad_sizes_are_refused(text: str) -> None:
    with pytest.raises(ValueError):
        parse_size(text)

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


def test_a_fork_bomb_is_stopped_at_the_process_limit(tmp_path: Path) -> None:
    tag = marker()
    error, seconds = over_limit(tmp_path, f"bomb() {{ bomb | bomb & }}; bomb; sleep {tag}")
    assert str(error).startswith(
        "build of greedy exceeded its process limit (40 processes); raise [build] process-limit"
    )
    assert error.step == "build" and seconds < 30
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
def test_a_fork_bomb_of_an_unprivileged_daemon_is_stopped_too() -> None:
    """As another user than root the kernel's RLIMIT_NPROC holds too (root is exempt)."""
    tag = marker()
    script = f"""
        from portsd.build.run import Limits, run
        bomb = "bomb() {{ bomb | bomb & }}; bomb; sleep {tag}"
        result = run(["sh", "-c", bomb], limits=Limits(processes=30), timeout=60)
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
    assert done.stdout.strip() == "processes over its processes limit"
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

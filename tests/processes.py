"""Finding test processes in /proc, to prove that nothing a test started survives."""

from __future__ import annotations

import os
import random
import time
from pathlib import Path


def marker() -> str:
    """A sleep duration no other process on the machine is using: our processes' name tag."""
    return f"{random.randrange(10**6, 10**7)}.{random.randrange(10**3, 10**4)}"


def processes_with(tag: str) -> list[int]:
    """PIDs of live (non-zombie) processes whose command line contains ``tag``."""
    found = []
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            cmdline = Path(entry.path, "cmdline").read_bytes()
            state = Path(entry.path, "stat").read_bytes().rsplit(b")", 1)[1].split()[0]
        except OSError:
            continue
        if tag.encode() in cmdline and state != b"Z":
            found.append(int(entry.name))
    return found


def wait_until_gone(tag: str, seconds: float = 5.0) -> list[int]:
    """Survivors after giving the kernel ``seconds`` to finish killing; [] is success."""
    deadline = time.monotonic() + seconds
    while (left := processes_with(tag)) and time.monotonic() < deadline:
        time.sleep(0.05)
    return left

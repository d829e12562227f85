"""Run every benchmark, one after another: ``make bench`` (or ``python -m bench``)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

BENCHMARKS = [
    "tree.py",
    "pack.py",
    "push.py",
    "serve.py",
    "resolve.py",
    "install.py",
    "hermetic.py",
]


def main() -> int:
    here = Path(__file__).parent
    failed = 0
    for script in BENCHMARKS:
        print(f"\n### bench/{script}\n", flush=True)
        failed |= subprocess.run([sys.executable, str(here / script)]).returncode
    return failed


if __name__ == "__main__":
    raise SystemExit(main())

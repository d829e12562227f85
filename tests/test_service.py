"""The daemon (portsd.daemon.service) in this process, around a real bare repository and
its real state database: how it is wired, and its lifecycle (requests handed to its
loop, an ordered stop)."""

from __future__ import annotations

import subprocess
import sys


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

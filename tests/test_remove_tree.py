"""Removing what builds leave, as the unprivileged user a build host runs as: root ignores
permissions, so only another user sees read-only directories stop a removal."""

from __future__ import annotations

import os
import pwd
import shutil
import subprocess
import sys
import tempfile
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest

NOBODY = ["setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups"]
REPOSITORY = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root to become nobody")


@pytest.fixture
def base() -> Iterator[Path]:
    """A directory of root's that nobody can enter, holding ``own/`` that nobody owns
    (pytest's own temporary directories are closed to other users)."""
    path = Path(tempfile.mkdtemp(prefix="portsd-nobody-"))
    path.chmod(0o755)
    own = path / "own"
    own.mkdir()
    user = pwd.getpwnam("nobody")
    os.chown(own, user.pw_uid, user.pw_gid)
    yield path
    shutil.rmtree(path)  # as root: read-only directories do not stop it


def as_nobody(script: str, *args: Path) -> str:
    done = subprocess.run(
        [*NOBODY, sys.executable, "-c", textwrap.dedent(script), *map(str, args)],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=REPOSITORY,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


def test_a_crashed_builds_read_only_leftovers_do_not_stop_the_next_build(base: Path) -> None:
    said = as_nobody(
        """
        import sys
        from pathlib import Path
        from portsd.build.produce import Scratch

        leftover = Path(sys.argv[1]) / "hello-0123456789ab"
        (leftover / "src" / "docs").mkdir(parents=True)
        (leftover / "src" / "docs" / "README").write_text("installed -m 444\\n")
        (leftover / "src" / "docs").chmod(0o555)
        (leftover / "src").chmod(0o500)
        with Scratch(leftover) as fresh:
            print(sorted(fresh.iterdir()))
        print(leftover.exists())
        """,
        base / "own",
    )
    assert said.splitlines() == ["[]", "False"]


def test_what_cannot_be_removed_is_an_error_not_silence(base: Path) -> None:
    (base / "roots" / "kept").mkdir(parents=True)  # root's: nobody may not change it
    said = as_nobody(
        """
        import sys
        from pathlib import Path
        from portsd.fsio import remove_tree

        try:
            remove_tree(Path(sys.argv[1]))
        except PermissionError as error:
            print("PermissionError", error.filename)
        """,
        base / "roots",
    )
    assert said.startswith("PermissionError ")
    assert (base / "roots" / "kept").is_dir()

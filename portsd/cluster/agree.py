"""Taking what the workers built: publish only what every build of a key agrees on.

The daemon holds each build's upload (``<state>/uploads/<name>``, sha256 checked on
arrival). With one build it is checked and published (``Workspace.accept``). With
``verify = N`` the N uploads, from N different workers, must be byte-identical; if any
differs, nothing is published for the key and ``Disagreement`` names the workers and the
files whose members differ. Every upload is removed afterwards, whatever happened.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from portsd.build.order import BuildOrder
from portsd.build.pipeline import Workspace
from portsd.cluster.worker import Built
from portsd.core.index import IndexEntry
from portsd.errors import PackageError, PortsdError
from portsd.pkg.package import differences, read_portinfo


class Disagreement(PortsdError):
    """Builds of one key on different workers made different packages."""

    def __init__(self, label: str, workers: tuple[str, str], files: tuple[str, ...]) -> None:
        self.workers = workers
        self.files = files
        shown = ", ".join(files[:10]) + (f" and {len(files) - 10} more" if len(files) > 10 else "")
        super().__init__(
            f"{label}: workers {workers[0]} and {workers[1]} built different packages; "
            f"differing files: {shown or '(the archive bytes only)'}"
        )


def settle(
    workspace: Workspace,
    order: BuildOrder,
    builds: Sequence[Built],
    *,
    commit: str | None,
) -> IndexEntry:
    """Publish the package the ``builds`` agree on; raises ``Disagreement`` or a
    PackageError (a package that fails a check) and publishes nothing then."""
    uploads = workspace.config.uploads
    paths = [uploads / built.upload.name for built in builds]
    try:
        for built, path in zip(builds, paths, strict=True):
            if not path.is_file() or path.stat().st_size != built.upload.size:
                raise PackageError(str(path), f"the upload of worker {built.worker} is missing")
        first = builds[0]
        for other, path in zip(builds[1:], paths[1:], strict=True):
            if other.upload.sha256 != first.upload.sha256:
                files = _differing(paths[0], path)
                raise Disagreement(order.label, (first.worker, other.worker), files)
        return workspace.accept(paths[0], order, commit=commit)
    finally:
        for path in paths:
            path.unlink(missing_ok=True)


def _differing(one: Path, other: Path) -> tuple[str, ...]:
    try:
        return differences(read_portinfo(one), read_portinfo(other))
    except PortsdError as error:  # a package not even readable differs as a whole
        return (f"(unreadable: {error})",)

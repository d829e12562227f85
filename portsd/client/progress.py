"""What a commit tells whoever watches it: the reporter interface of a transaction."""

from __future__ import annotations

from enum import StrEnum

from portsd.pkg.package import PortInfo


class Phase(StrEnum):
    """Stages of a commit, as announced to ``Progress.phase``."""

    CHECK = "check"
    STAGE = "stage"
    APPLY = "apply"
    CLEANUP = "cleanup"


class Checkpoint(StrEnum):
    """Moments of a commit that recovery treats differently (``portsd.client.transaction``)."""

    STAGED = "staged"  # every package unpacked and synced; no op journaled yet
    JOURNALED = "journaled"  # the journal lists every op; none has run
    APPLIED = "applied"  # every op ran; the database has not committed
    COMMITTED = "committed"  # the database committed; cleanup has not run


class Progress:
    """Observer of a commit. Every hook does nothing here: subclass the ones you show.

    ``phase`` starts a stage with its totals (STAGE: content bytes and entries to unpack;
    APPLY: ops to run); ``advance`` reports bytes and entries done since the last call;
    ``package`` names the package being unpacked; ``reached`` marks a checkpoint (a test
    may stop the process there). Hooks run on the committing thread and should be quick.
    """

    def phase(self, phase: Phase, total_bytes: int, total_files: int) -> None:
        pass

    def package(self, info: PortInfo) -> None:
        pass

    def advance(self, nbytes: int, nfiles: int) -> None:
        pass

    def reached(self, checkpoint: Checkpoint) -> None:
        pass

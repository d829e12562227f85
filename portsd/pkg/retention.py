"""Which old packages a repository may forget: ``portsd prune`` and the daemon, hourly.

Kept: every package the current index lists; the ``keep`` newest others of each port
(a rollback needs no rebuild); anything stored within ``keep_days``; and, for ``grace``
seconds after it was first seen unlisted, every package that left the index, because a
client that fetched an index a moment before may still be about to download it. The
first-seen times live in ``<repo>/<arch>/unlisted.json`` (private: only ``index*`` and
``packages/`` are served), written under the repository's lock.
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from dataclasses import dataclass

from portsd.config import Config
from portsd.core.index import Index, IndexEntry
from portsd.fsio import write_atomic
from portsd.pkg.repo import Repository, Stored

UNLISTED = "unlisted.json"


@dataclass(frozen=True, slots=True)
class Policy:
    keep: int = 2  # newest unlisted packages kept per port
    keep_days: float = 0.0  # and whatever was stored within this many days
    grace: float = 3600.0  # seconds a package that left the index stays downloadable


def policy_of(config: Config) -> Policy:
    return Policy(config.keep_per_port, config.keep_days, config.keep_unlisted_minutes * 60)


def prune(
    repo: Repository, policy: Policy, *, dry_run: bool = False, now: float | None = None
) -> tuple[IndexEntry, ...]:
    """Remove (or, ``dry_run``, name) the packages ``policy`` does not keep."""
    moment = time.time() if now is None else now
    path = repo.path / UNLISTED

    def choose(index: Index, stored: Sequence[Stored]) -> set[str]:
        listed = {entry.file for entry in index}
        try:
            seen: dict[str, float] = json.loads(path.read_text())
        except (FileNotFoundError, ValueError):
            seen = {}
        unlisted = [s for s in stored if s.entry.file not in listed]
        # never seen before: it left the index at the latest when the current one was made
        since = min(moment, float(index.generated))
        seen = {s.entry.file: float(seen.get(s.entry.file, since)) for s in unlisted}
        newest: dict[str, list[Stored]] = {}
        for item in sorted(unlisted, key=lambda s: s.stored_at, reverse=True):
            newest.setdefault(item.entry.meta.name, []).append(item)
        kept = {s.entry.file for items in newest.values() for s in items[: policy.keep]}
        doomed = {
            s.entry
            for s in unlisted
            if s.entry.file not in kept
            and moment - seen[s.entry.file] >= policy.grace
            and moment - s.stored_at >= policy.keep_days * 86400
        }
        if not dry_run:
            left = {f: t for f, t in seen.items() if f not in {e.file for e in doomed}}
            write_atomic(path, json.dumps(left, sort_keys=True).encode())
        return {entry.meta.build_key for entry in doomed}

    return repo.prune(choose, dry_run=dry_run)

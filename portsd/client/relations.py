"""How the packages of a transaction relate: may they coexist, and in which order to place them.

Pure functions of package facts (``portsd.core.provider`` gives the matching rule).
"""

from __future__ import annotations

from collections.abc import Sequence

from portsd.client.db import InstalledPackage, InstallReason
from portsd.client.planner import Request
from portsd.core.metadata import PackageMeta
from portsd.core.provider import package_meets
from portsd.errors import BrokenDependencies, InvalidTransaction


def check_relations(
    current: Sequence[InstalledPackage],
    requests: Sequence[Request],
    removals: Sequence[InstalledPackage],
) -> None:
    """Refuse package conflicts (InvalidTransaction) and dependencies the change would
    leave unmet (BrokenDependencies): those of the packages coming in, and those of
    staying packages that are met now. Dependencies already broken stay nobody's problem."""
    leaving = {p.meta.name for p in removals} | {r.info.meta.name for r in requests if r.replaces}
    staying = [p.meta for p in current if p.meta.name not in leaving]
    new = [r.info.meta for r in requests]
    final = staying + new
    for package in new:
        for other in final:
            for conflict in package.conflicts:
                if other.name != package.name and package_meets(other, conflict):
                    raise InvalidTransaction(
                        package.name,
                        f"conflicts with {other.name} {other.full_version} ('{conflict}')",
                    )
    for package in staying:
        for other in new:
            for conflict in package.conflicts:
                if package.name != other.name and package_meets(other, conflict):
                    raise InvalidTransaction(
                        other.name, f"installed {package.name} conflicts with it ('{conflict}')"
                    )
    unmet: list[tuple[str, str]] = []

    def met(dependency: str, among: Sequence[PackageMeta]) -> bool:
        return any(package_meets(p, dependency) for p in among)

    everyone_now = [p.meta for p in current]
    for package in new:
        unmet += [(package.name, d) for d in package.depends if not met(d, final)]
    for package in staying:
        unmet += [
            (package.name, d) for d in package.depends if met(d, everyone_now) and not met(d, final)
        ]
    if unmet:
        raise BrokenDependencies(unmet)


def install_order(requests: Sequence[Request]) -> list[Request]:
    """Dependencies before their dependents (so a symlink a dependency ships is there to
    be followed), otherwise in the order given; cycles keep the given order."""
    pending = list(requests)
    done: list[Request] = []
    while pending:
        for index, request in enumerate(pending):
            others = [r for r in pending if r is not request]
            if not any(
                package_meets(other.info.meta, dep)
                for dep in request.info.meta.depends
                for other in others
            ):
                done.append(pending.pop(index))
                break
        else:
            done.append(pending.pop(0))
    return done


def orphans(packages: Sequence[InstalledPackage]) -> list[InstalledPackage]:
    """Packages installed only as dependencies that no explicitly installed package needs,
    directly or through others: what ``ports autoremove`` removes. A dependency several
    packages provide keeps all of them."""
    needed = {p.meta.name for p in packages if p.reason is InstallReason.EXPLICIT}
    by_name = {p.meta.name: p for p in packages}
    frontier = list(needed)
    while frontier:
        for dependency in by_name[frontier.pop()].meta.depends:
            for other in packages:
                if other.meta.name not in needed and package_meets(other.meta, dependency):
                    needed.add(other.meta.name)
                    frontier.append(other.meta.name)
    return [p for p in packages if p.meta.name not in needed]

"""How the packages of a transaction relate: may they coexist, and in which order to place them.

Pure functions of manifests and database rows (``satisfies`` gives the matching rules).
"""

from __future__ import annotations

from collections.abc import Sequence

from portsd.client.db import InstalledPackage, satisfies
from portsd.client.planner import Request
from portsd.core.version import full_version
from portsd.errors import BrokenDependencies, InvalidTransaction


def check_relations(
    current: Sequence[InstalledPackage],
    requests: Sequence[Request],
    removals: Sequence[InstalledPackage],
) -> None:
    """Refuse package conflicts (InvalidTransaction) and dependencies the change would
    leave unmet (BrokenDependencies): those of the packages coming in, and those of
    staying packages that are met now. Dependencies already broken stay nobody's problem."""
    leaving = {p.name for p in removals} | {r.info.name for r in requests if r.replaces}
    staying = [p for p in current if p.name not in leaving]
    # (name, full version, provides, depends, conflicts) of everything after the change
    Entry = tuple[str, str, tuple[str, ...], tuple[str, ...], tuple[str, ...]]
    final: list[Entry] = [
        (p.name, p.full_version, p.provides, p.depends, p.conflicts) for p in staying
    ]
    new: list[Entry] = [
        (i.name, full_version(i.version, i.release), i.provides, i.depends, i.conflicts)
        for i in (r.info for r in requests)
    ]
    final += new
    for name, _, _, _, conflicts in new:
        for other, other_version, provides, _, _ in final:
            for conflict in conflicts:
                if other != name and satisfies(conflict, other, other_version, provides):
                    raise InvalidTransaction(
                        name, f"conflicts with {other} {other_version} ('{conflict}')"
                    )
    for package in staying:
        for name, version, provides, _, _ in new:
            for conflict in package.conflicts:
                if package.name != name and satisfies(conflict, name, version, provides):
                    raise InvalidTransaction(
                        name, f"installed {package.name} conflicts with it ('{conflict}')"
                    )
    unmet: list[tuple[str, str]] = []

    def met(dependency: str, among: Sequence[Entry]) -> bool:
        return any(satisfies(dependency, n, v, p) for n, v, p, _, _ in among)

    everyone_now = [(p.name, p.full_version, p.provides, p.depends, p.conflicts) for p in current]
    for name, _, _, depends, _ in new:
        unmet += [(name, d) for d in depends if not met(d, final)]
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
            if not any(_meets(other, dep) for dep in request.info.depends for other in others):
                done.append(pending.pop(index))
                break
        else:
            done.append(pending.pop(0))
    return done


def _meets(request: Request, dependency: str) -> bool:
    info = request.info
    return satisfies(dependency, info.name, full_version(info.version, info.release), info.provides)

"""Every error portsd raises on purpose, in one tree.

    PortsdError
    ├── ConfigError              a config file or flag is wrong
    ├── RecipeError              one or more problems in one port.toml (file:line: message)
    ├── ToolchainError           toolchain.toml is wrong, or its toolchain does not converge
    ├── GraphError
    │   ├── DependencyCycle      every port on the cycle, in order
    │   ├── MissingDependency    a dependency no port provides (or none in the wanted version)
    │   └── BrokenDependency     a dependency that cannot be built itself, so neither can this
    ├── GitError                 the ports tree could not be read from git
    ├── FetchError               a source could not be obtained
    │   ├── ChecksumMismatch     ... or its sha256 is not the recipe's
    │   └── FetchCancelled       ... before the build that wanted it was cancelled
    ├── BuildError               a build step failed, timed out or was killed
    │   ├── OverLimit            ... or went over a [build] limit (processes, memory, disk)
    │   └── UnmetNeed            ... or made a file needing a soname nothing it depends on provides
    ├── PackageError             a package file is malformed
    │   └── UnsafeArchive        ... or tries to escape its root
    ├── RepoError                the repository or its index is unusable
    │   ├── BadSignature
    │   ├── RollbackDetected
    │   └── IndexExpired
    ├── DiscoveryError           finding caches on the LAN (mDNS) failed, or an advert is malformed
    ├── StateInUse               another daemon already serves this state directory (pid, URL)
    └── InstallError
        ├── ResolutionError      a need nothing satisfies, or a conflict (with its chain)
        ├── RootLocked           another client holds the root's lock (pid, command line)
        ├── InvalidTransaction   not installed, already installed, conflicting packages
        ├── BrokenDependencies   installed packages' dependencies would be left unmet
        ├── RootError            a path in the root cannot be used safely or written
        ├── PackageDbError       the installed-package database or its journal is unusable
        ├── DownloadError        a package came from no cache intact (each URL tried and why)
        ├── Unobtainable         no cache has a package and it cannot be built here
        └── FileConflict
            └── FileTypeConflict ... a directory where a file is wanted, or the reverse

Each error keeps its facts as fields and formats itself in ``__str__``; ``hint`` is an
optional second line for humans. Only the command-line entry points and the daemon's top
level turn an error into ``error: ...`` and an exit status.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass


class PortsdError(Exception):
    """Base of every error portsd raises on purpose."""

    hint: str | None = None


class ConfigError(PortsdError):
    """A configuration file or command-line setting is invalid; ``path`` (and ``line``,
    1-based, when known) say where in which file, for a problem in one."""

    def __init__(self, message: str, *, path: str | None = None, line: int | None = None) -> None:
        self.message = message
        self.path = path
        self.line = line
        super().__init__(str(self))

    def __str__(self) -> str:
        return str(FileProblem(self.path, self.message, self.line)) if self.path else self.message


@dataclass(frozen=True, slots=True)
class FileProblem:
    """One thing wrong in one file; ``line`` is 1-based when known."""

    path: str
    message: str
    line: int | None = None

    def __str__(self) -> str:
        where = f"{self.path}:{self.line}" if self.line else self.path
        return f"{where}: {self.message}"


class RecipeError(PortsdError):
    """A port.toml that cannot be used; carries every problem found in it, not just the first."""

    def __init__(self, port: str, problems: Sequence[FileProblem]) -> None:
        self.port = port
        self.problems = tuple(problems)
        super().__init__(str(self))

    def __str__(self) -> str:
        return "\n".join(str(p) for p in self.problems)


class ToolchainError(PortsdError):
    """A toolchain.toml that cannot be used, or a toolchain that reaches no fixed point."""

    def __init__(self, problem: FileProblem) -> None:
        self.problem = problem
        super().__init__(str(problem))

    def __str__(self) -> str:
        return str(self.problem)


class GraphError(PortsdError):
    """The dependency graph cannot be built for some ports."""


class DependencyCycle(GraphError):
    """Ports that (transitively) need each other to build; ``cycle`` lists each once, in order."""

    def __init__(self, cycle: Sequence[str]) -> None:
        self.cycle = tuple(cycle)
        super().__init__(str(self))

    def __str__(self) -> str:
        return "dependency cycle: " + " -> ".join((*self.cycle, self.cycle[0]))


class MissingDependency(GraphError):
    """``port`` needs ``dependency`` (as written in its recipe) and nothing satisfies it."""

    def __init__(self, port: str, dependency: str, kind: str, detail: str = "") -> None:
        self.port = port
        self.dependency = dependency
        self.kind = kind
        self.detail = detail
        super().__init__(str(self))

    def __str__(self) -> str:
        text = f"{self.port}: {self.kind} '{self.dependency}' is not provided by any port"
        return f"{text} ({self.detail})" if self.detail else text


class BrokenDependency(GraphError):
    """``port`` cannot be built because ``dependency`` (reached through ``path``) cannot."""

    def __init__(self, port: str, dependency: str, reason: str) -> None:
        self.port = port
        self.dependency = dependency
        self.reason = reason
        super().__init__(str(self))

    def __str__(self) -> str:
        return f"{self.port}: dependency {self.dependency} cannot be built: {self.reason}"


class GitError(PortsdError):
    """The ports tree could not be read from the git repository at ``path``."""

    def __init__(self, path: str, message: str) -> None:
        self.path = path
        self.message = message
        super().__init__(str(self))

    def __str__(self) -> str:
        return f"{self.path}: {self.message}"


class FetchError(PortsdError):
    """A source of ``port`` could not be obtained from any location."""

    def __init__(self, port: str, filename: str, message: str) -> None:
        self.port = port
        self.filename = filename
        self.message = message
        super().__init__(str(self))

    def __str__(self) -> str:
        return f"{self.port}: cannot fetch {self.filename}: {self.message}"


class ChecksumMismatch(FetchError):
    """A downloaded or cached file does not have the sha256 the recipe names."""

    def __init__(self, port: str, filename: str, expected: str, actual: str) -> None:
        self.expected = expected
        self.actual = actual
        super().__init__(port, filename, f"expected {expected}, got {actual}")

    def __str__(self) -> str:
        return (
            f"{self.port}: sha256 mismatch for {self.filename}: "
            f"expected {self.expected}, got {self.actual}"
        )


class FetchCancelled(FetchError):
    """The build that wanted the source was cancelled while it was being fetched; the bytes
    so far stay in the distfiles' ``partial/``, for a later fetch to resume."""

    def __init__(self, port: str, filename: str) -> None:
        super().__init__(port, filename, "cancelled")


class BuildError(PortsdError):
    """A build of ``port`` failed in ``step``; ``status`` says how (exit 2, killed by SIGKILL)."""

    def __init__(self, port: str, step: str, status: str, log: str | None = None) -> None:
        self.port = port
        self.step = step
        self.status = status
        self.log = log
        super().__init__(str(self))

    def __str__(self) -> str:
        text = f"{self.port}: {self.step} failed ({self.status})"
        return f"{text}; log: {self.log}" if self.log else text


class OverLimit(BuildError):
    """A build of ``port`` went over one of its limits, the [build] setting ``key``, whose
    value is ``amount`` (``2 GiB``, ``512 processes``): the sandbox killed it."""

    def __init__(
        self, port: str, step: str, what: str, amount: str, key: str, log: str | None = None
    ) -> None:
        self.what = what
        self.amount = amount
        self.key = key
        super().__init__(port, step, f"over its {what} limit ({amount})", log)

    def __str__(self) -> str:
        text = (
            f"build of {self.port} exceeded its {self.what} limit ({self.amount});"
            f" raise [build] {self.key}"
        )
        return f"{text}; log: {self.log}" if self.log else text


class UnmetNeed(BuildError):
    """A file of the package ``port`` built needs ``need`` (a soname, or its interpreter's
    path) and neither the package nor its runtime dependencies provide it; ``more``
    counts the other unmet needs, which the log lists."""

    def __init__(
        self, port: str, path: str, need: str, log: str | None = None, *, more: int = 0
    ) -> None:
        self.path = path
        self.need = need
        self.more = more
        super().__init__(port, "package", f"{path} needs {need}", log)

    def __str__(self) -> str:
        text = (
            f"{self.port}: {self.path} needs {self.need}, which neither {self.port} nor its"
            " runtime dependencies provide"
        )
        if self.more:
            text += f" (and {self.more} more)"
        return f"{text}; log: {self.log}" if self.log else text


class PackageError(PortsdError):
    """A package file is malformed; ``path`` names the file."""

    def __init__(self, path: str, message: str) -> None:
        self.path = path
        self.message = message
        super().__init__(str(self))

    def __str__(self) -> str:
        return f"{self.path}: {self.message}"


class UnsafeArchive(PackageError):
    """A package member would escape or subvert the root it is extracted into."""

    def __init__(self, path: str, member: str, message: str) -> None:
        self.member = member
        super().__init__(path, f"unsafe member '{member}': {message}")


class RepoError(PortsdError):
    """The repository at ``path`` or its index cannot be used."""

    def __init__(self, path: str, message: str) -> None:
        self.path = path
        self.message = message
        super().__init__(str(self))

    def __str__(self) -> str:
        return f"{self.path}: {self.message}"


class BadSignature(RepoError):
    """A signature does not verify against any trusted key."""


class RollbackDetected(RepoError):
    """An index has a lower serial than one already seen: someone serves an old index."""


class IndexExpired(RepoError):
    """An index is past its expiry time: someone may be freezing clients on old packages."""


class DiscoveryError(PortsdError):
    """mDNS could not be used, or ``service`` (a cache's advert) is malformed."""

    def __init__(self, message: str, *, service: str | None = None) -> None:
        self.message = message
        self.service = service
        super().__init__(str(self))

    def __str__(self) -> str:
        return f"{self.service}: {self.message}" if self.service else self.message


class StateInUse(PortsdError):
    """Another ``portsd serve`` holds the state directory's lock."""

    def __init__(self, state: str, pid: int | None, url: str) -> None:
        self.state = state
        self.pid = pid
        self.url = url
        super().__init__(str(self))

    def __str__(self) -> str:
        holder = "another portsd" if self.pid is None else f"portsd pid {self.pid}"
        return f"{self.state} is in use by {holder}" + (f" ({self.url})" if self.url else "")


class InstallError(PortsdError):
    """An install, upgrade or removal cannot be carried out; nothing was changed."""


class ResolutionError(InstallError):
    """``request`` cannot be installed or upgraded as asked.

    ``chain`` is the path of dependencies from the request to the package with the problem
    (``("app", "libfoo")``; empty when the request itself is the problem), ``problem`` says
    what that package needs and what was found instead:
    ``cannot install app: app -> libfoo needs zlib>=1.3, but the cache has zlib 1.2.13-1``.
    """

    def __init__(self, action: str, request: str, chain: Sequence[str], problem: str) -> None:
        self.action = action
        self.request = request
        self.chain = tuple(chain)
        self.problem = problem
        super().__init__(str(self))

    def __str__(self) -> str:
        where = " -> ".join(self.chain)
        return f"cannot {self.action} {self.request}: {where + ' ' if where else ''}{self.problem}"


class RootLocked(InstallError):
    """Another process holds the lock of the root (``path`` is the lock file)."""

    hint = "wait for it to finish, or ask to wait for the lock"

    def __init__(self, path: str, pid: int | None, command: str | None) -> None:
        self.path = path
        self.pid = pid
        self.command = command
        holder = f"pid {pid}" if pid else "another process (pid unknown)"
        if command:
            holder += f" ({command})"
        super().__init__(f"{path}: the root is locked by {holder}")


class InvalidTransaction(InstallError):
    """A request about ``package`` that cannot be carried out in this root, as it stands."""

    def __init__(self, package: str, message: str) -> None:
        self.package = package
        self.message = message
        super().__init__(f"{package}: {message}")


class BrokenDependencies(InstallError):
    """The change would leave dependencies unmet: ``unmet`` is (package, dependency) pairs."""

    hint = "add what provides them to the transaction, or force it"

    def __init__(self, unmet: Sequence[tuple[str, str]]) -> None:
        self.unmet = tuple(unmet)
        needs = "; ".join(f"{package} needs '{dependency}'" for package, dependency in self.unmet)
        super().__init__(f"the change would break dependencies: {needs}")


class RootError(InstallError):
    """``path`` in the root cannot be used: an untrusted symlink on the way, an I/O error."""

    def __init__(self, path: str, message: str) -> None:
        self.path = path
        self.message = message
        super().__init__(f"{path}: {message}")


class PackageDbError(InstallError):
    """The installed-package database (or its journal) at ``path`` cannot be used."""

    def __init__(self, path: str, message: str) -> None:
        self.path = path
        self.message = message
        super().__init__(f"{path}: {message}")


class Unobtainable(InstallError):
    """No package for ``port`` (build key ``key``) can be had: ``reasons`` say why each
    way (local store, caches, a source build) was not taken or failed."""

    def __init__(self, port: str, key: str, reasons: Sequence[str]) -> None:
        self.port = port
        self.key = key
        self.reasons = tuple(reasons)
        detail = "".join(f"\n{reason}" for reason in self.reasons)
        super().__init__(f"{port}: no package for build key {key[:12]}{detail}")


class DownloadError(InstallError):
    """``package`` could not be downloaded intact; ``attempts`` is each URL tried and why.

    ``problem`` says what ended the download when it is not one URL's fault (the deadline):
    ``toptool 1.0-1: cannot download: tried http://a/t.pkg.tar.zst (sha256 mismatch ...)``.
    """

    def __init__(
        self, package: str, attempts: Sequence[tuple[str, str]], problem: str = ""
    ) -> None:
        self.package = package
        self.attempts = tuple(attempts)
        self.problem = problem
        tried = "; ".join(f"{url} ({why})" for url, why in self.attempts)
        parts = [part for part in (problem, f"tried {tried}" if tried else "") if part]
        super().__init__(f"{package}: cannot download: " + "; ".join(parts or ["no URL"]))


class FileConflict(InstallError):
    """``path`` would be written by ``package`` but belongs to ``owner`` (None: unowned file)."""

    def __init__(self, package: str, path: str, owner: str | None) -> None:
        self.package = package
        self.path = path
        self.owner = owner
        who = f"owned by {owner}" if owner else "exists and is not owned by any package"
        super().__init__(f"{package}: /{path} {who}")


class FileTypeConflict(FileConflict):
    """``package`` wants a ``wanted`` at ``path`` where there is a ``found`` (of ``owner``)."""

    def __init__(self, package: str, path: str, owner: str | None, wanted: str, found: str) -> None:
        self.wanted = wanted
        self.found = found
        super().__init__(package, path, owner)
        whose = f"of {owner}" if owner else "owned by no package"
        self.args = (f"{package}: wants a {wanted} at /{path}, where there is a {found} {whose}",)

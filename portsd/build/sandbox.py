"""Argument vectors for running a build step in an isolated sandbox (bubblewrap).

This module decides *what* a build can see and touch; it runs nothing. ``command(spec,
argv)`` turns a frozen ``SandboxSpec`` into the argument list that ``portsd.build.run.run``
executes. ``Host.probe()`` is its one function that looks at the machine (which tools
exist); everything else is pure.

Inside, the build sees (docs/sandbox.md has the reasons) nothing of the host's files:

- ``/usr``: the toolchain root's ``usr/`` (the bootstrap seed or the tree's toolchain
  packages), read-only, with the dependency tree's ``usr/`` laid over it by a read-only
  overlayfs when there is one; /bin, /sbin, /lib, /lib64 are links into it (merged /usr);
- ``/etc``: only generated passwd, group, hosts, nsswitch.conf and hostname;
- ``/build/...``: the mounts of the spec (sources and the port directory read-only; the
  source tree and DESTDIR writable), and a private writable ``/tmp``;
- no network but loopback, a new PID namespace that dies with its first process, an
  unprivileged uid with no capabilities, and a root file system remounted read-only.
"""

from __future__ import annotations

import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from portsd.core.linkage import MERGED_USR
from portsd.errors import ConfigError

BUILD_UID = 1000
BUILD_GID = 1000
HOSTNAME = "portsd"
SYSTEM_PATH = "/usr/bin:/usr/sbin:/bin:/sbin"

LAYOUT = tuple(MERGED_USR.items())
"""Top-level links of every build root: a merged-/usr system, whatever the host is."""

_OVERLAY_SCRIPT = (
    'cd -- "$1" && mount -t overlay portsd-root -o "ro,lowerdir=$2" -- "$3" && shift 3 && exec "$@"'
)
"""Run by ``sh`` in a fresh user+mount namespace; every value arrives as a positional
parameter, never inside the script text. ``cd`` first, so the lowerdir option names the
dependency tree by a short relative path (the option is limited to one page)."""

_LOWERDIR_UNSAFE = frozenset(",:\\\n")  # separators and escapes of overlayfs' lowerdir option


@dataclass(frozen=True, slots=True)
class Mount:
    """A host path made visible at ``target`` (absolute, inside), read-only unless writable."""

    source: Path
    target: str
    writable: bool = False


@dataclass(frozen=True, slots=True)
class Host:
    """The host tools that set the sandbox up; none of them is visible inside.

    ``setpriv`` (optional) makes the sandbox die with the thread that started it.
    """

    bwrap: str
    unshare: str
    mount: str
    sh: str
    setpriv: str | None = None

    @classmethod
    def probe(cls) -> Host:
        """Look at this machine; raises ``ConfigError`` when a required tool is missing."""
        tools: dict[str, str] = {}
        for name in ("bwrap", "unshare", "mount", "sh"):
            found = shutil.which(name, path=SYSTEM_PATH)
            if found is None:
                package = "bubblewrap" if name == "bwrap" else "util-linux"
                raise ConfigError(f"{name} not found in {SYSTEM_PATH} (install {package})")
            tools[name] = found
        return cls(
            bwrap=tools["bwrap"],
            unshare=tools["unshare"],
            mount=tools["mount"],
            sh=tools["sh"],
            setpriv=shutil.which("setpriv", path=SYSTEM_PATH),
        )


@dataclass(frozen=True, slots=True)
class SandboxSpec:
    """One sandboxed command's world.

    ``etc`` is a host directory holding the files of ``etc_files()`` (the caller writes
    them). ``toolchain`` is the tree whose ``usr/`` is the build's /usr. ``root``, when
    given, is a dependency tree whose ``usr/`` is laid over it; ``mountpoint`` is then a
    private empty directory (per build, never shared) to mount that overlay on. ``hidden``
    are host paths that must not be visible inside (the state directory, the signing key):
    ``command`` refuses a spec that would expose one.
    ``env`` is the command's whole environment; ``cwd`` is a path inside.
    """

    host: Host
    toolchain: Path
    etc: Path
    mounts: tuple[Mount, ...]
    cwd: str
    env: tuple[tuple[str, str], ...]
    root: Path | None = None
    mountpoint: Path | None = None
    hidden: tuple[Path, ...] = ()
    uid: int = BUILD_UID
    gid: int = BUILD_GID
    hostname: str = HOSTNAME


def etc_files(
    uid: int = BUILD_UID, gid: int = BUILD_GID, hostname: str = HOSTNAME
) -> tuple[tuple[str, str], ...]:
    """The generated /etc: (name, content) pairs. Files only, so tools that look up users,
    groups or localhost find answers without any daemon or host database."""
    return (
        (
            "passwd",
            "root:x:0:0:root:/root:/bin/sh\n"
            f"builder:x:{uid}:{gid}:portsd builder:/build/home:/bin/sh\n"
            "nobody:x:65534:65534:nobody:/nonexistent:/usr/sbin/nologin\n",
        ),
        ("group", f"root:x:0:\nbuilder:x:{gid}:\nnogroup:x:65534:\n"),
        ("hosts", f"127.0.0.1\tlocalhost {hostname}\n::1\tlocalhost ip6-localhost\n"),
        ("nsswitch.conf", "passwd: files\ngroup: files\nshadow: files\nhosts: files\n"),
        ("hostname", f"{hostname}\n"),
    )


def exposed(spec: SandboxSpec) -> tuple[Path, ...]:
    """Every host path the sandbox makes visible (the sources of its mounts)."""
    paths = [spec.toolchain, spec.etc, *(m.source for m in spec.mounts)]
    if spec.root is not None:
        paths.append(spec.root)
    return tuple(paths)


def reveals(visible: Path, hidden: Path) -> bool:
    """Whether making host path ``visible`` visible also shows ``hidden`` (both resolved)."""
    return hidden == visible or visible in hidden.parents


def check(spec: SandboxSpec) -> None:
    """Raise ``ConfigError`` if ``spec`` would expose a hidden path or cannot be mounted."""
    for hidden in spec.hidden:
        for path in exposed(spec):
            if reveals(path, hidden):
                raise ConfigError(
                    f"the build sandbox would expose {hidden} through {path}", path=str(hidden)
                )
    for mount in spec.mounts:
        if not PurePosixPath(mount.target).is_absolute():
            raise ConfigError(f"sandbox mount target '{mount.target}' is not absolute")
    if spec.root is not None:
        if spec.mountpoint is None:
            raise ConfigError("a sandbox with a dependency root needs a private mountpoint")
        for part in (spec.root.name, str(spec.toolchain)):
            if _LOWERDIR_UNSAFE & set(part):
                raise ConfigError(
                    f"'{part}' cannot be an overlayfs layer (it contains one of , : \\)",
                    path=str(spec.root),
                )


def command(spec: SandboxSpec, argv: Sequence[str]) -> list[str]:
    """The full command that runs ``argv`` inside ``spec``'s sandbox.

    With a dependency root it is ``unshare`` (a user+mount namespace of our own) → ``sh``
    (mount the overlay on the private mountpoint) → ``bwrap``; without one, ``bwrap``
    alone. bwrap's ``--die-with-parent`` kills the sandbox if the thread that started it
    dies (even by SIGKILL); ``setpriv --pdeathsig KILL`` in front, when the host has it,
    covers the few milliseconds before bwrap starts.
    """
    check(spec)
    host = spec.host
    prefix: list[str] = []
    if host.setpriv is not None:
        prefix += [host.setpriv, "--pdeathsig", "KILL"]
    if spec.root is None:
        usr = spec.toolchain / "usr"
        return [*prefix, host.bwrap, *bwrap_options(spec, usr), "--", *argv]
    assert spec.mountpoint is not None
    lowerdir = f"{spec.root.name}/usr:{spec.toolchain / 'usr'}"
    return [
        *prefix,
        host.unshare,
        "--user",
        "--map-root-user",
        "--mount",
        "--propagation",
        "private",
        "--",
        host.sh,
        "-c",
        _OVERLAY_SCRIPT,
        "portsd-overlay",
        str(spec.root.parent),
        lowerdir,
        str(spec.mountpoint),
        host.bwrap,
        *bwrap_options(spec, spec.mountpoint),
        "--",
        *argv,
    ]


def bwrap_options(spec: SandboxSpec, usr: Path) -> list[str]:
    """bwrap's options (up to, not including, ``--``), with ``usr`` mounted as /usr."""
    args = [
        "--unshare-user",
        "--uid",
        str(spec.uid),
        "--gid",
        str(spec.gid),
        "--disable-userns",
        "--unshare-ipc",
        "--unshare-pid",
        "--unshare-net",
        "--unshare-uts",
        "--hostname",
        spec.hostname,
        "--unshare-cgroup-try",
        "--die-with-parent",
        "--new-session",
        "--cap-drop",
        "ALL",
        "--ro-bind",
        str(usr),
        "/usr",
    ]
    for name, target in LAYOUT:
        args += ["--symlink", target, f"/{name}"]
    # A new /dev, read-only but for /dev/shm (POSIX shared memory, used by test suites).
    args += ["--dev", "/dev", "--perms", "1777", "--tmpfs", "/dev/shm", "--remount-ro", "/dev"]
    args += ["--proc", "/proc", "--dir", "/etc"]
    for name, _ in etc_files(spec.uid, spec.gid, spec.hostname):
        args += ["--ro-bind", str(spec.etc / name), f"/etc/{name}"]
    for mount in spec.mounts:
        args += ["--bind" if mount.writable else "--ro-bind", str(mount.source), mount.target]
    if not any(m.target == "/var/tmp" for m in spec.mounts):
        args += ["--symlink", "../tmp", "/var/tmp"]
    # Last, once every mount point exists: nothing outside the writable mounts can change.
    args += ["--remount-ro", "/", "--clearenv"]
    for name, value in spec.env:
        args += ["--setenv", name, value]
    args += ["--chdir", spec.cwd]
    return args

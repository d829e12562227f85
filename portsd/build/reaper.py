"""The process between ``run()`` and its command, so that nothing a command starts outlives
its caller, even one killed with SIGKILL.

``run()`` starts ``python -I -S reaper.py ARGV...`` with a pipe on its stdin, the
*lifeline*: the caller writes the command's environment on it as one JSON line and keeps
its end open for as long as it wants the command to run. The reaper

- makes itself a child subreaper (``PR_SET_CHILD_SUBREAPER``): a process of the command's
  tree that loses its parent is re-parented to the reaper, never to init, so every process
  of the tree stays a descendant of the reaper and is found by following parent links;
- starts the command in a process group of its own, stdin from /dev/null, with exactly the
  environment it was given;
- when the command exits, kills whatever it left behind and exits with the command's
  status (by the same signal, when the command was killed by one);
- when the lifeline reads end of file, the caller is gone: the kernel closes a dead
  process's descriptors however it died, so this cannot be missed or raced, not even
  before the command has started. The reaper kills the whole tree and exits.

Parent-death signals (bwrap's ``--die-with-parent``, ``setpriv --pdeathsig``) cannot give
this guarantee: each is armed by the child itself some time after it was forked, and is
lost on credential changes, so a caller that dies in between leaves the child to init;
for a sandbox that is bwrap's PID-namespace init, which ignores SIGTERM. docs/sandbox.md
has the measurements.

The killing (``kill_tree``) is shared with ``run()``. This module imports a few small
standard modules only, so the reaper starts in a few tens of milliseconds.
"""

from __future__ import annotations

# signal's C core: the signal module adds enums, whose import costs the reaper's start 10 ms
import _signal as signal  # type: ignore[import-not-found]
import os
import select
import sys
import time

_PR_SET_CHILD_SUBREAPER = 36
_KILL_ROUNDS = 100  # bound on freeze-and-rescan rounds while a tree keeps forking
_KILL_PASSES = 10  # bound on stop-all-then-kill passes (a pass ends when nothing is left)
_ENV_LIMIT = 1 << 24  # an environment longer than this is not from run()


def kill_tree(root: int, *, reap: bool = False) -> None:
    """SIGKILL every descendant of the reaper ``root`` and every process in its session;
    ``root`` itself is left alone, so that it is there to adopt whatever gets orphaned
    while this runs, and to finish the job if the caller dies half-way. ``reap``: the
    reaper itself is calling, and waits for its children.

    Everything is stopped before anything is killed, so no process is orphaned (and lost
    from the tree) while we look. Stopping works a process group at a time, atomically
    with respect to fork: a group whose members keep forking is frozen in one call.
    """
    try:
        root_group = os.getpgid(root)
    except ProcessLookupError:
        root_group = root
    for _ in range(_KILL_PASSES):
        stopped: set[int] = set()
        groups: set[int] = set()
        for _ in range(_KILL_ROUNDS):
            found = _tree_members(root, _process_table())
            found.pop(root, None)
            new = {pid: group for pid, group in found.items() if pid not in stopped}
            if not new:
                break
            for group in set(new.values()) - groups - {root_group}:
                _signal_group(group, signal.SIGSTOP)
                groups.add(group)
            _signal_all(new, signal.SIGSTOP)
            stopped |= new.keys()
        for group in groups:
            _signal_group(group, signal.SIGKILL)
        _signal_all(stopped, signal.SIGKILL)
        if reap:
            _reap_all()
        if not stopped:
            return


def _signal_all(pids: set[int] | dict[int, int], sig: int) -> None:
    for pid in pids:
        try:
            os.kill(pid, sig)
        except (ProcessLookupError, PermissionError):
            pass  # already gone (or reused by someone else's process: not ours to touch)


def _signal_group(group: int, sig: int) -> None:
    try:
        os.killpg(group, sig)
    except (ProcessLookupError, PermissionError):
        pass


def _process_table() -> list[tuple[int, int, int, int]]:
    """(pid, parent pid, process group, session) of every live (non-zombie) process."""
    table: list[tuple[int, int, int, int]] = []
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/stat", "rb") as stat:
                text = stat.read()
        except OSError:
            continue  # exited while we looked
        # "pid (comm) state ppid pgrp session ...": comm may contain spaces and parens
        fields = text[text.rfind(b")") + 2 :].split()
        if len(fields) < 4 or fields[0] == b"Z":
            continue
        table.append((int(entry.name), int(fields[1]), int(fields[2]), int(fields[3])))
    return table


def _tree_members(root: int, table: list[tuple[int, int, int, int]]) -> dict[int, int]:
    """``root``, its living descendants and every process in session ``root``: pid -> group."""
    groups = {pid: group for pid, _, group, _ in table}
    children: dict[int, list[int]] = {}
    pending = [root] if root in groups else []
    for pid, ppid, _, session in table:
        children.setdefault(ppid, []).append(pid)
        if session == root:
            pending.append(pid)
    members: dict[int, int] = {}
    while pending:
        pid = pending.pop()
        if pid not in members:
            members[pid] = groups[pid]
            pending.extend(children.get(pid, ()))
    return members


def _reap_all() -> None:
    """Wait for every child of the reaper (its own and adopted ones) until none is left."""
    while True:
        try:
            os.waitpid(-1, 0)
        except ChildProcessError:
            return


def encode_environment(environment: dict[str, str]) -> bytes:
    """The environment as the lifeline carries it: ``NAME=value`` entries, each ended by a
    NUL (which no entry can contain), then one more NUL."""
    return (
        b"".join(f"{name}={value}".encode() + b"\0" for name, value in environment.items()) + b"\0"
    )


def _read_environment() -> dict[str, str] | None:
    """The command's environment from the lifeline; None if the caller is already gone."""
    data = bytearray()
    while not (data == b"\0" or data.endswith(b"\0\0")):
        chunk = os.read(0, 65536)
        if not chunk or len(data) > _ENV_LIMIT:
            return None
        data += chunk
    entries = bytes(data).split(b"\0")[:-2]
    return dict(entry.decode().partition("=")[::2] for entry in entries)


def _executable(name: str, environment: dict[str, str]) -> str:
    """Where ``name`` is, searched in the command's own PATH (as subprocess would)."""
    if "/" in name:
        return name
    for directory in environment.get("PATH", os.defpath).split(os.pathsep):
        candidate = os.path.join(directory or ".", name)
        if os.path.isfile(candidate) and os.access(candidate, os.X_OK):
            return candidate
    return name  # not found: the spawn fails with ENOENT, reported as exit 127


# rt_sigaction by number: glibc's sigaction refuses the two signals it keeps for itself
_RT_SIGACTION = {"x86_64": 13, "aarch64": 134}
_LIBC_SIGNALS = (32, 33)


def _prepare_process() -> None:
    """Become the subreaper of the command's tree, and put the C library's own signals
    back to their default: glibc's posix_spawn leaves them ignored in what it starts (a
    CI runner does), an ignore survives fork and exec, and musl uses both in the command
    (timers, thread cancellation). The standard library wraps neither call."""
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(_PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_CHILD_SUBREAPER)")
    number = _RT_SIGACTION.get(os.uname().machine)
    if number is None:
        return  # another architecture: the ignores stay, as posix_spawn would leave them
    default = ctypes.create_string_buffer(32)  # the kernel's struct sigaction, SIG_DFL
    for sig in _LIBC_SIGNALS:
        if libc.syscall(number, sig, default, None, 8) != 0:
            raise OSError(ctypes.get_errno(), f"rt_sigaction({sig})")


def _exit_like(status: int) -> int:
    """Exit as the command did: its exit code, or death by the signal that killed it."""
    code = os.waitstatus_to_exitcode(status)
    if code >= 0:
        return code
    import resource

    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))  # the command dumped core, if anyone
    if -code != signal.SIGKILL:  # whose disposition cannot be changed
        signal.signal(-code, signal.SIG_DFL)
    os.kill(os.getpid(), -code)
    return 128 - code  # a signal whose default is not to terminate: the shell's convention


class _Limits:
    """The limits of the reaper's command line (``run.Limits.options``); None: none."""

    def __init__(self, options: list[str]) -> None:
        self.report: int | None = None
        self.processes: int | None = None
        self.memory: int | None = None
        self.open_files: int | None = None
        self.disk: tuple[int, str] | None = None
        self.cgroup: str | None = None  # the build's pids cgroup, where there is one
        while options:
            option = options.pop(0)
            if option == "--disk":
                self.disk = (int(options.pop(0)), options.pop(0))
            else:
                setattr(self, option[2:].replace("-", "_"), int(options.pop(0)))

    def apply(self) -> None:
        """The kernel's share, set on the reaper and inherited by the command: each
        process's open files, and the size of any one file (a backstop for disk).
        Processes are only counted by the reaper: RLIMIT_NPROC counts every process of
        the user, in every PID namespace of the machine (even those this one cannot see),
        not those of one build, and the kernel exempts root from it."""
        import resource

        if self.processes is not None:
            self.cgroup = _pids_cgroup(self.processes)
        if self.open_files is not None:
            resource.setrlimit(resource.RLIMIT_NOFILE, (self.open_files, self.open_files))
        if self.disk is not None:
            resource.setrlimit(resource.RLIMIT_FSIZE, (self.disk[0], self.disk[0]))

    def sampled(self) -> bool:
        return self.processes is not None or self.memory is not None or self.disk is not None

    def exceeded(self, root: int, disk_too: bool) -> str | None:
        """Which limit the tree below ``root`` is at or over, if any (one sample)."""
        if self.processes is not None or self.memory is not None:
            members = _tree_members(root, _process_table())
            members.pop(root, None)
            if self.processes is not None and len(members) >= self.processes:
                return "processes"
            if self.cgroup is not None and _forks_refused(self.cgroup):
                return "processes"
            if self.memory is not None and _resident(members) >= self.memory:
                return "memory"
        if disk_too and self.disk is not None and _disk_usage(self.disk[1]) >= self.disk[0]:
            return "disk"
        return None


def _pids_cgroup(limit: int) -> str | None:
    """Move the reaper into a new pids cgroup (v1 or v2) below its own, holding at most
    ``limit`` tasks; its directory, or None where no writable pids controller exists."""
    try:
        with open("/proc/self/cgroup") as own:
            lines = own.read().splitlines()
    except OSError:
        return None
    for line in lines:
        _, controllers, path = line.split(":", 2)
        if "pids" in controllers.split(","):
            parent = "/sys/fs/cgroup/pids" + path.rstrip("/")
        elif controllers == "" and os.path.exists("/sys/fs/cgroup/cgroup.controllers"):
            parent = "/sys/fs/cgroup" + path.rstrip("/")
        else:
            continue
        directory = f"{parent}/portsd-build-{os.getpid()}"
        try:
            os.mkdir(directory)
        except OSError:
            continue
        try:
            _write(f"{directory}/pids.max", str(limit))
            _write(f"{directory}/cgroup.procs", str(os.getpid()))
            return directory
        except OSError:
            os.rmdir(directory)
    return None


def _leave_cgroup(directory: str) -> None:
    """Back to the parent cgroup, and the build's removed (everything in it is dead)."""
    try:
        _write(f"{os.path.dirname(directory)}/cgroup.procs", str(os.getpid()))
        os.rmdir(directory)
    except OSError:
        pass  # the kernel frees an empty cgroup's resources; the directory is harmless


def _write(path: str, text: str) -> None:
    with open(path, "w") as file:
        file.write(text)


def _forks_refused(directory: str) -> bool:
    """Whether the cgroup's pids.max refused a fork (pids.events: ``max N``)."""
    try:
        with open(f"{directory}/pids.events") as events:
            return any(line.split() != ["max", "0"] for line in events if line.startswith("max"))
    except OSError:
        return False


def _resident(pids: dict[int, int]) -> int:
    """Bytes resident in memory, summed over ``pids`` (shared pages counted in each)."""
    total = 0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/statm", "rb") as statm:
                total += int(statm.read().split()[1])
        except (OSError, IndexError, ValueError):
            continue  # exited while we looked
    return total * os.sysconf("SC_PAGE_SIZE")


def _disk_usage(top: str) -> int:
    """Bytes allocated under ``top`` (hard links once), as du counts them."""
    seen: set[tuple[int, int]] = set()
    total = 0
    pending = [top]
    while pending:
        try:
            entries = os.scandir(pending.pop())
        except OSError:
            continue
        with entries:
            for entry in entries:
                try:
                    info = entry.stat(follow_symlinks=False)
                except OSError:
                    continue
                if entry.is_dir(follow_symlinks=False):
                    pending.append(entry.path)
                if (info.st_dev, info.st_ino) not in seen:
                    seen.add((info.st_dev, info.st_ino))
                    total += info.st_blocks * 512
    return total


# Every signal to its default in the command: Python ignores SIGPIPE and SIGXFSZ, a
# daemon started as a background job of a script has SIGINT and SIGQUIT ignored, and a
# shell cannot undo an ignore it inherits (a build's test suite that interrupts its own
# children then hangs or fails).
_DEFAULTED = tuple(s for s in signal.valid_signals() if s not in (signal.SIGKILL, signal.SIGSTOP))


def _start(path: str, argv: list[str], environment: dict[str, str]) -> int:
    """Start the command in a process group of its own, stdin from /dev/null, no signal
    ignored. By fork and exec, not posix_spawn: glibc's posix_spawn leaves the two signals
    it keeps for itself (32 and 33) ignored in the command (``_prepare_process``). The
    reaper has one thread, so forking it is safe."""
    child = os.fork()
    if child:
        return child
    try:
        os.setpgid(0, 0)
        for number in _DEFAULTED:
            signal.signal(number, signal.SIG_DFL)
        devnull = os.open(os.devnull, os.O_RDONLY)
        os.dup2(devnull, 0)
        os.close(devnull)
        os.execve(path, argv, environment)
    except OSError as error:
        os.write(1, f"portsd: cannot execute {argv[0]}: {error.strerror}\n".encode())
        os._exit(127 if isinstance(error, FileNotFoundError) else 126)


def supervise(arguments: list[str]) -> int:
    """``[LIMIT OPTIONS] -- ARGV``: run ARGV under the lifeline on stdin within the limits;
    returns the exit code to leave with."""
    split = arguments.index("--")
    limits, argv = _Limits(arguments[:split]), arguments[split + 1 :]
    if limits.report is not None:
        os.set_inheritable(limits.report, False)  # for run() alone, never the command
    environment = _read_environment()
    if environment is None:
        return 1
    _prepare_process()
    limits.apply()
    child = _start(_executable(argv[0], environment), argv, environment)
    status, over = _wait(child, limits)
    # The command's group at once (in a sandbox: bwrap and its namespace's init, whose
    # death takes the namespace with it), then whatever else is below: even a fork bomb
    # is gone in one call, not after rounds of scanning /proc while it grows.
    _signal_group(child, signal.SIGKILL)
    kill_tree(os.getpid(), reap=True)
    if status is not None and over is None and os.waitstatus_to_exitcode(status) != 0:
        over = limits.exceeded(os.getpid(), disk_too=True)  # a file stopped at RLIMIT_FSIZE
    if limits.cgroup is not None:
        _leave_cgroup(limits.cgroup)
    if over is not None:
        if limits.report is not None:
            os.write(limits.report, over.encode())
        os.write(1, f"portsd: killed: over its {over} limit\n".encode())
        return 1
    if status is None:  # the caller is gone
        return 1
    return _exit_like(status)


_SAMPLE = 0.1  # seconds between samples of processes and memory
_DISK_SAMPLE = 1.0  # seconds between walks of the disk directory (a walk costs more)


def _wait(child: int, limits: _Limits) -> tuple[int | None, str | None]:
    """The command's wait status (None once the caller is gone), and the limit it went
    over (the command is then still running). Adopted orphans are reaped as they exit;
    only the command's own exit ends the wait."""
    pidfd = os.pidfd_open(child)
    poller = select.poll()
    poller.register(0, select.POLLIN)
    poller.register(pidfd, select.POLLIN)
    me = os.getpid()
    tick = int((_SAMPLE if limits.sampled() else 1.0) * 1000)
    walked = 0.0
    while True:
        ready = {fd for fd, _ in poller.poll(tick)}
        if 0 in ready and not os.read(0, 65536):
            return None, None
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                break
            if pid == 0:
                break
            if pid == child:
                os.close(pidfd)
                return status, None
        if limits.sampled():
            now = time.monotonic()
            disk_too = now - walked >= _DISK_SAMPLE
            walked = now if disk_too else walked
            over = limits.exceeded(me, disk_too)
            if over is not None:
                return None, over


if __name__ == "__main__":
    sys.exit(supervise(sys.argv[1:]))

"""portsd.build.sandbox: the argument vectors (pure), then the same vectors run for real."""

from __future__ import annotations

import contextlib
import os
import random
import subprocess
import sys
import time
from pathlib import Path

import pytest

from portsd.build import sandbox
from portsd.build.run import run
from portsd.build.sandbox import Host, Mount, SandboxSpec
from portsd.errors import ConfigError
from tests.processes import marker, processes_with, wait_until_gone

HOST = Host(
    bwrap="/usr/bin/bwrap",
    unshare="/usr/bin/unshare",
    mount="/usr/bin/mount",
    sh="/bin/sh",
    setpriv="/usr/bin/setpriv",
)


def spec(**changes: object) -> SandboxSpec:
    values: dict[str, object] = {
        "host": HOST,
        "toolchain": Path("/t/seed"),
        "etc": Path("/w/etc"),
        "mounts": (
            Mount(Path("/w/src"), "/build/src", writable=True),
            Mount(Path("/ports/zlib"), "/build/port"),
        ),
        "cwd": "/build/src",
        "env": (("PATH", "/usr/bin"), ("HOME", "/build/home")),
    }
    values.update(changes)
    return SandboxSpec(**values)  # type: ignore[arg-type]


def pairs(argv: list[str], option: str) -> list[tuple[str, str]]:
    """The (first, second) arguments of every occurrence of a two-argument option."""
    return [(argv[i + 1], argv[i + 2]) for i, arg in enumerate(argv) if arg == option]


def test_isolation_options() -> None:
    argv = sandbox.command(spec(), ["make"])
    assert argv[:4] == ["/usr/bin/setpriv", "--pdeathsig", "KILL", "/usr/bin/bwrap"]
    for option in (
        "--unshare-user",
        "--unshare-pid",
        "--unshare-net",
        "--unshare-ipc",
        "--unshare-uts",
        "--disable-userns",
        "--die-with-parent",
        "--new-session",
        "--clearenv",
    ):
        assert option in argv
    assert pairs(argv, "--cap-drop")[0][0] == "ALL"
    assert argv[argv.index("--uid") + 1] == "1000"
    assert argv[argv.index("--gid") + 1] == "1000"
    assert argv[-2:] == ["--", "make"]


def test_root_is_remounted_read_only_after_every_mount() -> None:
    argv = sandbox.command(spec(), ["true"])
    remount = argv.index("/", argv.index("--remount-ro"))
    last_mount = max(i for i, arg in enumerate(argv) if arg in ("--bind", "--ro-bind", "--dir"))
    assert remount > last_mount


def test_mounts_read_only_unless_writable() -> None:
    argv = sandbox.command(spec(), ["true"])
    assert ("/w/src", "/build/src") in pairs(argv, "--bind")
    assert ("/ports/zlib", "/build/port") in pairs(argv, "--ro-bind")
    assert pairs(argv, "--bind") == [("/w/src", "/build/src")]  # nothing else is writable


def test_usr_is_the_toolchain_root_and_nothing_of_the_host() -> None:
    argv = sandbox.command(spec(), ["true"])
    binds = pairs(argv, "--ro-bind")
    assert ("/t/seed/usr", "/usr") in binds
    assert not [src for src, _ in binds if src.startswith(("/usr", "/etc", "/lib", "/bin"))]
    assert pairs(argv, "--symlink")[:4] == list(
        (target, f"/{name}") for name, target in sandbox.LAYOUT
    )


def test_etc_is_only_generated_files() -> None:
    argv = sandbox.command(spec(), ["true"])
    etc = [(src, dest) for src, dest in pairs(argv, "--ro-bind") if dest.startswith("/etc/")]
    names = [name for name, _ in sandbox.etc_files()]
    assert etc == [(f"/w/etc/{n}", f"/etc/{n}") for n in names]


def test_environment_is_exactly_the_specs() -> None:
    argv = sandbox.command(spec(), ["true"])
    assert argv.index("--clearenv") < argv.index("--setenv")
    assert pairs(argv, "--setenv") == [("PATH", "/usr/bin"), ("HOME", "/build/home")]
    assert argv[argv.index("--chdir") + 1] == "/build/src"


def test_dependency_root_is_an_overlay_in_a_namespace_of_our_own() -> None:
    argv = sandbox.command(
        spec(root=Path("/w/deps"), mountpoint=Path("/w/usr")), ["cc", "-o", "x", "x.c"]
    )
    bwrap = argv.index("/usr/bin/bwrap")
    outer = argv[:bwrap]
    assert outer[3:9] == [
        "/usr/bin/unshare",
        "--user",
        "--map-root-user",
        "--mount",
        "--propagation",
        "private",
    ]
    # the script's values are arguments, never spliced into its text
    script_at = outer.index("-c") + 1
    lower = "deps/usr:/t/seed/usr"
    assert outer[script_at + 1 :] == ["portsd-overlay", "/w", lower, "/w/usr"]
    assert "/w" not in outer[script_at]
    assert ("/w/usr", "/usr") in pairs(argv, "--ro-bind")
    assert ("/t/seed/usr", "/usr") not in pairs(argv, "--ro-bind")


def test_without_setpriv_bwrap_comes_first() -> None:
    host = Host(bwrap="/b/bwrap", unshare="/b/unshare", mount="/b/mount", sh="/b/sh")
    argv = sandbox.command(spec(host=host), ["true"])
    assert argv[0] == "/b/bwrap"


@pytest.mark.parametrize(
    "hidden",
    [
        Path("/w/src"),  # bound itself
        Path("/w/src/secret.key"),  # inside a writable mount
        Path("/ports/zlib/key"),  # inside a read-only mount
        Path("/t/seed/usr/lib/state"),  # inside the toolchain root
        Path("/w/etc/passwd"),
    ],
)
def test_refuses_to_expose_a_hidden_path(hidden: Path) -> None:
    with pytest.raises(ConfigError, match=str(hidden)):
        sandbox.command(spec(hidden=(hidden,)), ["true"])


@pytest.mark.parametrize(
    "hidden", [Path("/var/lib/portsd"), Path("/w"), Path("/ports"), Path("/usr/lib/portsd")]
)
def test_hidden_paths_elsewhere_are_fine(hidden: Path) -> None:
    # /w holds the build's own directories: those are visible, the rest of /w is not
    assert sandbox.command(spec(hidden=(hidden,)), ["true"])


def test_hidden_inside_the_dependency_root() -> None:
    with pytest.raises(ConfigError, match="/w/deps/x"):
        sandbox.check(
            spec(root=Path("/w/deps"), mountpoint=Path("/w/usr"), hidden=(Path("/w/deps/x"),))
        )


@pytest.mark.parametrize("name", ["a,b", "a:b", "a\\b"])
def test_overlay_layer_names_must_survive_option_parsing(name: str) -> None:
    with pytest.raises(ConfigError, match="overlayfs"):
        sandbox.command(spec(root=Path("/w") / name, mountpoint=Path("/w/usr")), ["true"])


def test_overlay_needs_a_mountpoint() -> None:
    with pytest.raises(ConfigError, match="mountpoint"):
        sandbox.command(spec(root=Path("/w/deps")), ["true"])


def test_etc_files() -> None:
    files = dict(sandbox.etc_files(uid=1234, gid=99, hostname="box"))
    assert "builder:x:1234:99:" in files["passwd"]
    assert "builder:x:99:" in files["group"]
    assert files["hosts"].startswith("127.0.0.1\tlocalhost box\n")
    assert "hosts: files" in files["nsswitch.conf"]
    assert files["hostname"] == "box\n"


def test_probe_describes_this_host() -> None:
    host = Host.probe()
    for tool in (host.bwrap, host.unshare, host.mount, host.sh):
        assert os.access(tool, os.X_OK)
    assert Path(host.bwrap).name == "bwrap"


# The same vectors, run for real: no compiler needed, ~30 ms each.


def real_spec(tmp_path: Path, **changes: object) -> SandboxSpec:
    (tmp_path / "etc").mkdir()
    for name, content in sandbox.etc_files():
        (tmp_path / "etc" / name).write_text(content)
    (tmp_path / "src").mkdir()
    (tmp_path / "ro").mkdir()
    (tmp_path / "ro" / "file").write_text("read me\n")
    values: dict[str, object] = {
        "host": Host.probe(),
        "toolchain": Path(os.environ["PORTSD_SEED"]) / "root",
        "etc": tmp_path / "etc",
        "mounts": (
            Mount(tmp_path / "src", "/build/src", writable=True),
            Mount(tmp_path / "ro", "/build/ro"),
        ),
        "cwd": "/build/src",
        "env": (("PATH", sandbox.SYSTEM_PATH), ("ONLY", "this")),
    }
    values.update(changes)
    return SandboxSpec(**values)  # type: ignore[arg-type]


def sandboxed(spec: SandboxSpec, script: str) -> tuple[int, list[str]]:
    lines: list[str] = []
    result = run(sandbox.command(spec, ["sh", "-c", script]), on_line=lines.append, timeout=60)
    return result.returncode, lines


def test_real_sandbox_identity_and_environment(tmp_path: Path) -> None:
    code, lines = sandboxed(real_spec(tmp_path), "id -u; id -gn; uname -n; pwd; env | sort")
    assert code == 0, lines
    assert lines[:4] == ["1000", "builder", "portsd", "/build/src"]
    assert lines[4:] == [
        "ONLY=this",
        f"PATH={sandbox.SYSTEM_PATH}",
        "PWD=/build/src",
    ]  # sh adds PWD


def test_real_sandbox_writes_only_where_allowed(tmp_path: Path) -> None:
    script = (
        "echo ok > /build/src/new && echo wrote-src; "
        "for p in /x /usr/x /usr/local/x /etc/x /dev/x /build/x /build/ro/x /var/tmp/x; do "
        '  if touch "$p" 2>/dev/null; then echo "WROTE $p"; else echo "denied $p"; fi; '
        "done; "
        "echo y >> /build/ro/file 2>/dev/null && echo 'WROTE /build/ro/file' || true; "
        "echo shm > /dev/shm/x && cat /dev/shm/x"
    )
    code, lines = sandboxed(real_spec(tmp_path), script)
    assert code == 0, lines
    assert lines[0] == "wrote-src" and (tmp_path / "src" / "new").read_text() == "ok\n"
    assert not [line for line in lines if line.startswith("WROTE")], lines
    assert lines[-1] == "shm"  # POSIX shared memory works (in a private tmpfs)
    assert (tmp_path / "ro" / "file").read_text() == "read me\n"
    assert sorted(os.listdir(tmp_path / "ro")) == ["file"]


def test_real_sandbox_sees_no_host_files(tmp_path: Path) -> None:
    script = "ls /etc; echo --; ls /; echo --; ls /usr/local 2>&1 | wc -l; ls /usr/bin | wc -l"
    code, lines = sandboxed(real_spec(tmp_path), script)
    assert code == 0, lines
    first = lines.index("--")
    assert set(lines[:first]) == {name for name, _ in sandbox.etc_files()}
    top = set(lines[first + 1 : lines.index("--", first + 1)])
    assert top == {
        "bin",
        "build",
        "dev",
        "etc",
        "lib",
        "lib64",
        "proc",
        "sbin",
        "usr",
        "var",
    }
    seed_programs = len(os.listdir(Path(os.environ["PORTSD_SEED"]) / "root" / "usr" / "bin"))
    assert lines[-1] == str(seed_programs)  # /usr/bin is the seed's, not the host's


def test_real_sandbox_has_no_capabilities_and_no_network(tmp_path: Path) -> None:
    script = "grep CapEff /proc/self/status; ls /sys/class/net 2>/dev/null || cat /proc/net/dev"
    code, lines = sandboxed(real_spec(tmp_path), script)
    assert code == 0, lines
    assert lines[0].split() == ["CapEff:", "0000000000000000"]
    interfaces = [line.split(":")[0].strip() for line in lines[3:]]
    assert interfaces == ["lo"]


def test_real_sandbox_overlay_puts_dependency_files_under_usr(tmp_path: Path) -> None:
    deps = tmp_path / "deps"
    (deps / "usr" / "include").mkdir(parents=True)
    (deps / "usr" / "include" / "portsd-dep.h").write_text("#define DEP 1\n")
    (tmp_path / "mnt").mkdir()
    spec = real_spec(tmp_path, root=deps, mountpoint=tmp_path / "mnt")
    script = "cat /usr/include/portsd-dep.h; test -x /usr/bin/sh && echo seed-usr; touch /usr/x"
    code, lines = sandboxed(spec, script)
    assert lines[:2] == ["#define DEP 1", "seed-usr"], lines
    assert code != 0 and "Read-only file system" in lines[-1]
    assert not (tmp_path / "mnt" / "include").exists()  # the mount never reached the host
    assert not Path("/usr/include/portsd-dep.h").exists()


def test_sandbox_dies_with_the_process_that_started_it(tmp_path: Path) -> None:
    """kill -9 of the daemon must not leave a build running: setpriv's parent-death signal
    reaches bwrap, and the sandbox's PID namespace takes every process inside with it."""
    tag = f"{random.randrange(10**6, 10**7)}.{random.randrange(10**3, 10**4)}"
    spec = real_spec(tmp_path, root=None)
    argv = sandbox.command(spec, ["sh", "-c", f"setsid sleep {tag} & sleep {tag}"])
    daemon = subprocess.Popen(
        [sys.executable, "-c", f"from portsd.build.run import run; run({argv!r})"],
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 10
        while len(processes_with(f"sleep\0{tag}")) < 2 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert len(processes_with(f"sleep\0{tag}")) == 2
        assert daemon.poll() is None
    finally:
        daemon.kill()
        daemon.wait()
    deadline = time.monotonic() + 5
    while processes_with(tag) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert processes_with(tag) == []


def test_no_sandbox_outlives_a_caller_killed_at_any_moment(tmp_path: Path) -> None:
    """kill -9 of the daemon at any moment, also while a sandbox is starting or being
    killed at its timeout, leaves no process behind. Parent-death signals alone left one
    in about 1 kill in 8 of this loop: bwrap's PID-namespace init, orphaned before it had
    armed ``--die-with-parent``, adopted by init and deaf to SIGTERM, for good. The reaper
    under ``run()`` adopts it and kills it when the caller's lifeline closes."""
    spec = real_spec(tmp_path, root=None)
    rng = random.Random(20)
    survivors: list[int] = []
    for _ in range(20):
        tag = marker()
        argv = sandbox.command(spec, ["sh", "-c", f"sleep {tag}"])
        code = f"from portsd.build.run import run\nwhile True: run({argv!r}, timeout=0.05)"
        caller = subprocess.Popen([sys.executable, "-c", code], start_new_session=True)
        time.sleep(rng.uniform(0.3, 0.8))
        caller.kill()
        caller.wait()
        left = wait_until_gone(tag)
        for pid in left:  # ours (the tag says so): do not leave them to the next test
            with contextlib.suppress(ProcessLookupError):  # gone with its namespace's init
                os.kill(pid, 9)
        survivors += left
    assert survivors == []

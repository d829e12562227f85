"""``portsd``: the build host's daemon and its administration."""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import errno
import json
import logging
import resource
import secrets
import signal
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.markup import escape

from portsd.build.pipeline import ensure_signing_key
from portsd.cli import run_main
from portsd.cli.options import DEFAULT_STATE
from portsd.config import Config, load_config
from portsd.daemon.binding import bind_state, default_state
from portsd.daemon.initrepo import init_repository, state_of
from portsd.daemon.instance import Holder, InstanceLock, local_url, running_daemon
from portsd.daemon.keyrotation import retire, rotate
from portsd.daemon.server.app import CappedSite, create_app, create_runner
from portsd.daemon.server.page import duration
from portsd.daemon.service import Daemon
from portsd.errors import ConfigError, PortsdError
from portsd.fsio import write_atomic
from portsd.pkg.discover import Advertiser, announcement_for
from portsd.pkg.repo import Repository
from portsd.pkg.retention import policy_of, prune
from portsd.pkg.sign import SecretKey

log = logging.getLogger("portsd")


def parser() -> argparse.ArgumentParser:
    top = argparse.ArgumentParser(prog="portsd", description="The portsd build host.")
    top.add_argument("-v", "--verbose", action="store_true", help="show debug output")
    commands = top.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = commands.add_parser("init", help="create a bare ports repository for the daemon to follow")
    p.add_argument("directory", type=Path)
    p.add_argument("--port", type=int, default=8470, help="the daemon's port (default: 8470)")
    p.set_defaults(handler=init)

    p = commands.add_parser("serve", help="follow the branch, build, and serve packages over HTTP")
    _where(p)
    p.add_argument("--tree", type=Path, help="the git repository to follow (default: config)")
    p.add_argument("--branch", help="the branch to follow (default: the repository's HEAD)")
    p.add_argument("--listen", help="the address to listen on (default: 127.0.0.1, loopback only)")
    p.add_argument("--port", type=int, help="the port to listen on (default: 8470)")
    p.add_argument("-j", "--jobs", type=int, help="builds at once (default: config)")
    p.add_argument("--advertise", action="store_true", help="announce the cache on the LAN (mDNS)")
    p.add_argument(
        "--cluster",
        metavar="tcp://HOST:PORT",
        help="build on the workers of this Dask scheduler (default: config, else here)",
    )
    p.add_argument(
        "--verify",
        type=int,
        metavar="N",
        help="publish only after N identical builds on different workers (default: config, else 1)",
    )
    p.add_argument(
        "--force", action="store_true", help="adopt a state directory that belongs to another tree"
    )
    p.set_defaults(handler=serve)

    p = commands.add_parser(
        "status",
        help="what the daemon is doing and what fails (exit 1: something fails, 3: not running)",
    )
    _where(p)
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(handler=status)

    p = commands.add_parser("rebuild", help="retry ports whose builds failed")
    _where(p)
    p.add_argument("names", nargs="+", metavar="NAME")
    p.set_defaults(handler=rebuild)

    p = commands.add_parser(
        "prune", help="remove old packages: all but the published, recent and newest few"
    )
    _where(p)
    p.add_argument("--dry-run", action="store_true", help="say what would go; remove nothing")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.add_argument("--keep", type=int, help="unlisted packages kept per port (default: config, 2)")
    p.add_argument("--keep-days", type=float, help="keep what was built within D days")
    p.add_argument(
        "--keep-unlisted-minutes",
        type=float,
        help="keep a package that left the index this long, for clients about to fetch it "
        "(default: config, 60)",
    )
    p.set_defaults(handler=prune_packages)

    p = commands.add_parser(
        "key", help="rotate the signing key: `rotate` (sign with both), then `retire` the old"
    )
    _where(p)
    p.add_argument("action", choices=("rotate", "retire"))
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(handler=key)

    p = commands.add_parser(
        "keygen", help="create the repository signing key (once; `portsd key rotate` replaces it)"
    )
    _where(p)
    p.set_defaults(handler=keygen)
    return top


def _where(parser: argparse.ArgumentParser) -> None:
    group = parser.add_mutually_exclusive_group()
    group.add_argument(
        "--repo", type=Path, help="a repository made by `portsd init` (its state inside)"
    )
    group.add_argument(
        "--state",
        type=Path,
        help=f"the state directory (default: the tree's own, {DEFAULT_STATE}; the tree is "
        "--tree, else the current directory)",
    )
    parser.add_argument("--config", type=Path, help="a config file (default: <state>/portsd.toml)")


def _config(args: argparse.Namespace, **overrides: Any) -> Config:
    if args.repo is not None:
        state = state_of(args.repo.absolute())
        if not state.is_dir():
            raise ConfigError(
                "not a repository made by `portsd init` (no portsd/ inside)", path=str(args.repo)
            )
        overrides.setdefault("tree_dir", args.repo.absolute())
    else:
        tree = getattr(args, "tree", None) or Path(".")
        state = (args.state or default_state(tree)).absolute()
    return load_config(state, args.config, overrides)


def init(args: argparse.Namespace, console: Console) -> int:
    made = init_repository(args.directory, port=args.port)
    console.print(f"Created the ports repository {made.repository}")
    console.print(f"  state, config and signing key (id {made.key_id}) in {made.config.state_dir}")
    console.print("Next steps:")
    console.print(f"  portsd serve --repo {made.repository}")
    console.print("  and in your ports tree:")
    console.print(f"  git remote add build {made.repository}")
    console.print("  git push build main")
    return 0


def serve(args: argparse.Namespace, console: Console) -> int:
    config = _config(
        args,
        tree_dir=args.tree.absolute() if args.tree else None,
        branch=args.branch,
        listen=args.listen,
        port=args.port,
        jobs=args.jobs,
        cluster=args.cluster,
        verify=args.verify,
    )
    config.state_dir.mkdir(parents=True, exist_ok=True)
    # before anything touches the state: a second daemon would recover the first's builds
    lock = InstanceLock.acquire(config.state_dir, local_url(config))
    try:
        if config.tree_dir is not None:
            bind_state(config.state_dir, config.tree_dir, force=args.force)
        if not config.token_file.exists():
            write_atomic(config.token_file, secrets.token_urlsafe(32).encode() + b"\n", 0o600)
        asyncio.run(_serve(config, advertise=args.advertise))
    finally:
        lock.release()
    return 0


async def _serve(config: Config, *, advertise: bool = False) -> None:
    loop = asyncio.get_running_loop()
    daemon = Daemon(config, loop)
    app = create_app(config, daemon)
    app.cleanup_ctx.append(daemon.lifetime)
    runner = create_runner(app, idle_timeout=config.idle_timeout)
    await runner.setup()
    _more_descriptors(config.max_connections)
    site = CappedSite(
        runner,
        config.listen,
        config.port,
        max_connections=config.max_connections,
        per_address=config.max_connections_per_address,
    )
    try:
        await site.start()
    except OSError as error:
        await runner.cleanup()
        raise _cannot_listen(config, error) from None
    stop = asyncio.Event()
    for number in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(number, stop.set)
    log.warning(
        "portsd: serving http://%s:%d/ (following %s of %s, state in %s)",
        config.listen,
        config.port,
        daemon.branch,
        config.tree_dir,
        config.state_dir,
    )
    advertiser: Advertiser | None = None
    try:
        advertiser = await _advertise(config) if advertise else None
        await stop.wait()
    finally:
        log.warning("portsd: stopping")
        if advertiser is not None:
            await advertiser.stop()  # goodbyes first: clients stop choosing a cache going away
        await runner.cleanup()


def _more_descriptors(connections: int) -> None:
    """Raise the soft limit on open files to the hard one: each connection is one, and
    builds, the repository and sqlite need theirs beside them."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and (hard == resource.RLIM_INFINITY or soft < hard):
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        soft = hard
    if soft != resource.RLIM_INFINITY and soft < connections + 256:
        log.warning(
            "portsd: %d connections at once need more than the %d open files allowed;"
            " lower [server] max-connections or raise the limit",
            connections,
            soft,
        )


def _cannot_listen(config: Config, error: OSError) -> PortsdError:
    failure = PortsdError(f"cannot listen on {config.listen} port {config.port}: {error.strerror}")
    if error.errno == errno.EADDRINUSE:
        failure.hint = (
            f"another program uses port {config.port}; choose another with `--port N`"
            " (or `make run PORT=N`)"
        )
    return failure


async def _advertise(config: Config) -> Advertiser | None:
    """``--advertise``: announce the cache over mDNS; a failure is a warning, serving goes on."""
    try:
        advertiser = Advertiser(announcement_for(config))
        await advertiser.start()
    except PortsdError as error:
        hint = f" (hint: {error.hint})" if error.hint else ""
        log.warning("portsd: NOT advertising on the LAN: %s%s", error, hint)
        return None
    a = advertiser.announcement
    log.warning("portsd: advertising %r on %s (mDNS)", advertiser.name, ", ".join(a.addresses))
    return advertiser


def _api(config: Config, path: str, body: dict[str, Any] | None = None) -> Any:
    holder = running_daemon(config.state_dir)
    url = (holder.url if holder is not None else local_url(config)) + path
    headers = {"Content-Type": "application/json"}
    if body is not None:
        headers["Authorization"] = f"Bearer {config.token_file.read_text().strip()}"
    request = urllib.request.Request(
        url, data=None if body is None else json.dumps(body).encode(), headers=headers
    )
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return json.load(response)
    except urllib.error.HTTPError as error:
        raise PortsdError(
            f"{url}: HTTP {error.code}: {error.read().decode(errors='replace')}"
        ) from None
    except OSError as error:
        failure = PortsdError(f"cannot reach the daemon at {url}: {error}")
        failure.hint = "is `portsd serve` running with this state directory?"
        raise failure from None


EXIT_FAILING = 1
EXIT_NOT_RUNNING = 3  # as `systemctl status` says of a stopped unit


def status(args: argparse.Namespace, console: Console) -> int:
    config = _config(args)
    holder = running_daemon(config.state_dir)
    if holder is None:
        if args.json:
            print(json.dumps({"running": False, "state": str(config.state_dir)}))
        else:
            console.print(f"portsd is [bold]not running[/] (state {config.state_dir})")
        return EXIT_NOT_RUNNING
    data = _api(config, "/api/v1/status")
    problems = _api(config, "/api/v1/problems")
    failing = bool(problems["failed"] or problems["skipped"] or problems["blocked"])
    if args.json:
        print(
            json.dumps(
                {
                    "running": True,
                    "pid": holder.pid,
                    "url": holder.url,
                    "state": str(config.state_dir),
                    "failing": failing,
                    "status": data,
                    "problems": problems,
                }
            )
        )
        return EXIT_FAILING if failing else 0
    _print_status(console, holder, data, problems, _rebuild_command(args))
    return EXIT_FAILING if failing else 0


def _print_status(console: Console, holder: Holder, data: Any, problems: Any, rebuild: str) -> None:
    console.print(f"portsd is [bold green]running[/]: pid {holder.pid}, {holder.url}/")
    evaluated = data.get("evaluated")
    console.print(
        f"branch {data['branch']} at {(data.get('head') or 'nothing pushed yet')[:12]}"
        + (f", evaluated {evaluated[:12]} (#{data['evaluation']})" if evaluated else "")
        + (" (evaluating)" if data.get("evaluating") else "")
    )
    console.print(
        f"ports {problems['ports']}: {problems['published']} published, "
        f"{len(problems['failed'])} failed, {len(problems['skipped'])} skipped, "
        f"{len(problems['blocked'])} blocked; "
        f"{data['queued']} queued, {len(data['running'])} running"
    )
    for running in data["running"]:
        build = running["build"]
        console.print(f"  building {build['port']} {build['version']} ({running['step']})")
    if data["queued"] or data["running"]:
        eta = data.get("eta")
        console.print(f"ETA: {'unknown' if eta is None else 'about ' + duration(eta)}")
    for kind in ("failed", "skipped", "blocked"):
        if problems[kind]:
            console.print(f"[bold red]{kind}:[/]")
        for problem in problems[kind]:
            build = problem.get("build") or {}
            log = f" (log: {holder.url}{build['log']})" if build.get("log") else ""
            new = " [new]" if problem.get("newly") else ""
            console.print(f"  {problem['port']}: {escape(problem['reason'])}{log}{new}")
            if kind == "failed":
                console.print(f"    [dim]retry: {rebuild} {problem['port']}[/]")


def _rebuild_command(args: argparse.Namespace) -> str:
    """`portsd rebuild` with the arguments that found this state."""
    where = (
        [f"--repo {args.repo}"] if args.repo else [f"--state {args.state}"] if args.state else []
    )
    return " ".join(["portsd rebuild", *where])


def rebuild(args: argparse.Namespace, console: Console) -> int:
    data = _api(_config(args), "/api/v1/rebuild", {"ports": args.names})
    accepted = data.get("accepted", data.get("ports", []))
    console.print(f"will retry: {', '.join(accepted) or 'nothing (no such ports)'}")
    return 0 if accepted else 1


def prune_packages(args: argparse.Namespace, console: Console) -> int:
    config = _config(
        args,
        keep_per_port=args.keep,
        keep_days=args.keep_days,
        keep_unlisted_minutes=args.keep_unlisted_minutes,
    )
    repo = Repository(config.repo, config.arch, SecretKey.load(config.secret_key))
    removed = prune(repo, policy_of(config), dry_run=args.dry_run)
    size = sum(entry.size for entry in removed)
    if args.json:
        files = [
            {"name": e.meta.name, "version": e.meta.full_version, "file": e.file, "size": e.size}
            for e in removed
        ]
        print(json.dumps({"dry_run": args.dry_run, "removed": files, "bytes": size}))
        return 0
    verb = "would remove" if args.dry_run else "removed"
    for entry in removed:
        console.print(f"{verb} {entry.file} ({entry.size} bytes)")
    console.print(f"{verb} {len(removed)} package(s), {size} bytes")
    return 0


def key(args: argparse.Namespace, console: Console) -> int:
    config = _config(args)
    # the daemon signs with the keys it read at its start: it must not run meanwhile
    lock = InstanceLock.acquire(config.state_dir, "")
    try:
        done = rotate(config) if args.action == "rotate" else retire(config)
    finally:
        lock.release()
    if args.json:
        print(json.dumps(dataclasses.asdict(done)))
        return 0
    if done.next is not None:
        console.print(f"signing with key {done.current} and the next key {done.next}")
        console.print(f"  {done.signed} package(s) and the index signed again by both")
        console.print(f"give clients the next public key: {config.next_public_key}")
        console.print("  (clients trust both: `--key` twice, or both in trusted-keys)")
        console.print("then, once every client has it: portsd key retire")
    else:
        console.print(f"signing with key {done.current} alone; key {done.retired} retired")
        console.print(f"  {done.signed} package(s) and the index signed again")
    return 0


def keygen(args: argparse.Namespace, console: Console) -> int:
    config = _config(args)
    existed = config.secret_key.exists()
    key = ensure_signing_key(config)
    verb = "exists" if existed else "created"
    console.print(f"signing key {verb}: {config.secret_key} (key id {key.key_id})")
    console.print(f"public key: {config.public_key}")
    return 0


def _main(argv: list[str]) -> int:
    args = parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(message)s",
    )
    code: int = args.handler(args, Console(highlight=False, soft_wrap=True))
    return code


def main() -> int:
    return run_main(_main)


if __name__ == "__main__":
    raise SystemExit(main())

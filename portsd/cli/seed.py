"""``ports seed``: show, check or remake the bootstrap seed every build stands on."""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

from rich.console import Console
from rich.markup import escape

from portsd.build import identity
from portsd.build.builder import SOURCE_DATE_EPOCH
from portsd.build.pipeline import seed_of
from portsd.build.seed import Seed, keep_seed, make_seed
from portsd.cli.workspace import config_from
from portsd.core.keys import BUILDER_FORMAT
from portsd.fsio import remove_tree
from portsd.pkg.package import read_portinfo


def seed(args: argparse.Namespace, console: Console) -> int:
    config = config_from(args)
    config.work.mkdir(parents=True, exist_ok=True)
    say = _stderr if args.json else console.print
    if args.remake:
        made = make_seed(
            config.work / "seed-new", config.work, arch=config.arch, epoch=SOURCE_DATE_EPOCH
        )
        kept = keep_seed(made, config.seed)
        say(f"made a new seed from this host: {kept.content_id[:12]}")
    kept = seed_of(config, say)
    if not args.check:
        _show(kept, args, console)
        return 0
    with tempfile.TemporaryDirectory(dir=config.work, prefix="seed-check-") as scratch:
        again = make_seed(
            Path(scratch) / "out", Path(scratch), arch=config.arch, epoch=SOURCE_DATE_EPOCH
        )
        differences = _differences(kept, again)
        remove_tree(Path(scratch) / "out")
    if args.json:
        print(
            json.dumps(
                {
                    "seed": kept.content_id,
                    "again": again.content_id,
                    "identical": not differences,
                    "differences": differences,
                }
            )
        )
    elif differences:
        console.print(
            f"[red]this host makes a different seed[/]: {again.content_id[:12]}"
            f" instead of {kept.content_id[:12]}"
        )
        for line in differences[:50]:
            console.print(f"  {escape(line)}")
    else:
        console.print(f"identical: this host makes the same seed, {kept.content_id[:12]}")
    return 1 if differences else 0


def _show(kept: Seed, args: argparse.Namespace, console: Console) -> None:
    info = read_portinfo(kept.path)
    packages = [
        line.split()[1:] for line in kept.manifest.splitlines() if line.startswith("package ")
    ]
    builder = identity.fingerprint()  # the rest of what a key builds: shown beside the seed
    if args.json:
        print(
            json.dumps(
                {
                    "path": str(kept.path),
                    "content_id": kept.content_id,
                    "build_key": kept.build_key,
                    "files": len(info.files),
                    "size": kept.path.stat().st_size,
                    "installed_size": info.meta.installed_size,
                    "packages": [
                        {"name": p[0], "version": p[1], "arch": p[2], "role": p[3]}
                        for p in packages
                    ],
                    "builder": {
                        "format": BUILDER_FORMAT,
                        "fingerprint": builder.digest,
                        "components": dict(builder.components),
                    },
                }
            )
        )
        return
    console.print(f"[bold]seed[/] {kept.content_id}")
    console.print(f"  {kept.path}")
    console.print(
        f"  {len(info.files)} files, {info.meta.installed_size >> 20} MiB unpacked, "
        f"{kept.path.stat().st_size >> 20} MiB packed, from {len(packages)} "
        "Debian packages"
    )
    console.print(f"[bold]builder[/] format {BUILDER_FORMAT}, fingerprint {builder.digest[:12]}")
    if args.manifest:
        console.print(escape(kept.manifest), end="")


def _differences(a: Seed, b: Seed) -> list[str]:
    if a.content_id == b.content_id:
        return []
    old = {entry.path: entry for entry in read_portinfo(a.path).files}
    new = {entry.path: entry for entry in read_portinfo(b.path).files}
    lines = [f"only in the kept seed: {path}" for path in sorted(old.keys() - new.keys())]
    lines += [f"only in the new one: {path}" for path in sorted(new.keys() - old.keys())]
    lines += [
        f"differs: {path}" for path in sorted(old.keys() & new.keys()) if old[path] != new[path]
    ]
    return lines


def _stderr(line: str) -> None:
    print(line, file=sys.stderr)

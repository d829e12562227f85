"""``ports discover``: the portsd caches on the LAN, and whether this client trusts them.

Wiring (in portsd/cli/ports.py)::

    p = commands.add_parser("discover", help="find portsd caches on the LAN (mDNS)")
    add_discover_options(p)
    p.set_defaults(handler=discover)
"""

from __future__ import annotations

import argparse
from pathlib import Path

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from portsd.client.settings import load_settings
from portsd.discover import BROWSE_SECONDS, Verdict, browse, trusted_caches

_STYLE = {
    Verdict.TRUSTED: "green",
    Verdict.UNTRUSTED: "yellow",
    Verdict.KEY_MISMATCH: "bold red",
    Verdict.INCOMPATIBLE: "dim",
}


def add_discover_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--timeout",
        type=float,
        default=BROWSE_SECONDS,
        help=f"seconds to listen for answers (default: {BROWSE_SECONDS:g})",
    )
    parser.add_argument(
        "--interface",
        action="append",
        default=[],
        metavar="ADDRESS",
        help="ask only on the interface with this IP address (repeatable; default: all)",
    )
    parser.add_argument(
        "--config", type=Path, default=None, help="the client config (default: /etc/ports.toml)"
    )
    parser.add_argument(
        "--trusted-key",
        action="append",
        default=[],
        metavar="KEY",
        help="trust this public key (a file, or the base64 of `minisign -P`) instead of the "
        "config's trusted-keys (repeatable)",
    )


def discover(args: argparse.Namespace, console: Console) -> int:
    """Browse for ``--timeout`` seconds; print one row per cache with the verdict; exit 0.

    Trust comes from the client config (or ``--trusted-key``), never from the adverts.
    """
    settings = load_settings(args.config, trusted_keys=args.trusted_key or None)
    found = browse(args.timeout, args.interface or None)
    if not found:
        console.print(f"no portsd caches answered within {args.timeout:g} s")
        return 0
    table = Table(show_edge=False)
    for column in ("name", "URL", "arch", "key id", "trust"):
        table.add_column(column)
    judged_caches = trusted_caches(found, settings.trusted_keys)
    for judged in judged_caches:
        cache = judged.cache
        archs = ", ".join(  # dim: of no use to this machine
            escape(a) if a == settings.arch else f"[dim]{escape(a)}[/]" for a in cache.archs
        )
        style = _STYLE[judged.verdict]
        table.add_row(
            escape(cache.name),
            escape(cache.url),
            archs,
            cache.key_id,
            f"[{style}]{judged.verdict.value}[/]",
        )
    console.print(table)
    usable = sum(judged.trusted for judged in judged_caches)
    console.print(f"{len(found)} cache(s) found, {usable} trusted")
    if usable < len(found) and not settings.trusted_keys:
        console.print("[dim]hint: trust a cache with trusted-keys in the client config[/]")
    return 0

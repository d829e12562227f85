"""``ports discover``: the portsd caches on the LAN, and whether this client trusts them."""

from __future__ import annotations

import argparse

from rich.console import Console
from rich.markup import escape

from portsd.cli.output import emit_json
from portsd.cli.output import table as output_table
from portsd.client.settings import load_settings
from portsd.pkg.discover import BROWSE_SECONDS, Verdict, browse, trusted_caches

_STYLE = {
    Verdict.TRUSTED: "green",
    Verdict.UNTRUSTED: "yellow",
    Verdict.KEY_MISMATCH: "bold red",
    Verdict.INCOMPATIBLE: "dim",
}


def discover(args: argparse.Namespace, console: Console) -> int:
    """Browse for ``--timeout`` seconds; print one row per cache with the verdict; exit 0.

    Trust comes from the client config (or ``--trusted-key``), never from the adverts.
    """
    settings = load_settings(args.config, trusted_keys=args.trusted_key or None)
    timeout = BROWSE_SECONDS if args.timeout is None else args.timeout
    found = browse(timeout, args.interface or None)
    judged_caches = trusted_caches(found, settings.trusted_keys)
    if args.json:
        emit_json(
            console,
            [
                {
                    "name": judged.cache.name,
                    "url": judged.cache.url,
                    "archs": list(judged.cache.archs),
                    "key_id": judged.cache.key_id,
                    "trust": judged.verdict.value,
                }
                for judged in judged_caches
            ],
        )
        return 0
    if not found:
        console.print(f"no portsd caches answered within {timeout:g} s")
        return 0
    table = output_table(console, "name", "URL", "arch", "key id", "trust")
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

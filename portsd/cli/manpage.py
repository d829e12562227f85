"""Man pages generated from the parsers, so they never lag behind the commands:
``python -m portsd.cli.manpage DIR`` (``make man``) writes ``ports.1`` and ``portsd.8``."""

from __future__ import annotations

import argparse
import sys
from importlib.metadata import version
from pathlib import Path

from portsd.cli import daemon, ports


def manpage(prog: str, section: int, parser: argparse.ArgumentParser, see: str) -> str:
    """The roff source of ``prog``'s man page: synopsis, options, and every subcommand."""
    lines = [
        f'.TH {prog.upper()} {section} "" "portsd {version("portsd")}"',
        ".SH NAME",
        f"{prog} \\- {_roff(parser.description or '')}",
        ".SH SYNOPSIS",
        f".B {prog}",
        "[\\fIOPTIONS\\fR] \\fICOMMAND\\fR [\\fIARGS\\fR]",
        ".SH OPTIONS",
        *_options(parser),
        ".SH COMMANDS",
    ]
    for name, (sub, text) in _subcommands(parser).items():
        usage = sub.format_usage().removeprefix("usage: ").strip()
        lines += [f".SS {name}", _roff(text), ".PP", f".B {_roff(usage)}", *_options(sub)]
    lines += [".SH SEE ALSO", see]
    return "\n".join(lines) + "\n"


def _subcommands(
    parser: argparse.ArgumentParser,
) -> dict[str, tuple[argparse.ArgumentParser, str]]:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            helps = {choice.dest: choice.help or "" for choice in action._choices_actions}
            return {name: (sub, helps.get(name, "")) for name, sub in action.choices.items()}
    return {}


def _options(parser: argparse.ArgumentParser) -> list[str]:
    lines = []
    for action in parser._actions:
        if action.help == argparse.SUPPRESS or isinstance(action, argparse._SubParsersAction):
            continue
        if action.option_strings:
            name = ", ".join(f"\\fB{_roff(flag)}\\fR" for flag in action.option_strings)
            if action.nargs != 0:
                name += f" \\fI{_roff(str(action.metavar or action.dest.upper()))}\\fR"
        else:
            name = f"\\fI{_roff(str(action.metavar or action.dest))}\\fR"
        help_text = (action.help or "").replace("%(default)s", str(action.default))
        lines += [".TP", name, _roff(help_text)]
    return lines


def _roff(text: str) -> str:
    """Text safe in roff: backslashes doubled, a leading dot or quote escaped."""
    text = text.replace("\\", "\\e").replace("-", "\\-")
    return "\\&" + text if text.startswith((".", "'")) else text


def main(argv: list[str]) -> int:
    out = Path(argv[0]) if argv else Path("man")
    out.mkdir(parents=True, exist_ok=True)
    (out / "ports.1").write_text(
        manpage("ports", 1, ports.parser(), "\\fBportsd\\fR(8), docs/client.md, docs/recipes.md")
    )
    (out / "portsd.8").write_text(
        manpage("portsd", 8, daemon.parser(), "\\fBports\\fR(1), docs/daemon.md")
    )
    print(f"wrote {out / 'ports.1'} and {out / 'portsd.8'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))

"""The command-line parsers: every subcommand runs a handler that exists, and building the
``ports`` parser imports none of what the handlers need."""

from __future__ import annotations

import argparse
import inspect
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from portsd.cli import daemon, ports
from portsd.cli.options import load_handler


def subcommands(parser: argparse.ArgumentParser, prefix: str) -> Iterator[tuple[str, object]]:
    """(``ports install``, its handler default) for every subcommand, nested ones too."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield f"{prefix} {name}", sub.get_default("handler")
                yield from subcommands(sub, f"{prefix} {name}")


PORTS = list(subcommands(ports.parser(), "ports"))
PORTSD = list(subcommands(daemon.parser(), "portsd"))


def test_the_parsers_are_walked() -> None:
    commands = {command for command, _ in PORTS + PORTSD}
    assert {"ports install", "ports why", "ports discover", "portsd serve"} <= commands


@pytest.mark.parametrize(("command", "handler"), PORTS, ids=[c for c, _ in PORTS])
def test_ports_handler_is_named_and_resolves(command: str, handler: object) -> None:
    assert isinstance(handler, str), f"{command}: handlers of ports are 'module:function' names"
    function = load_handler(handler)
    assert len(inspect.signature(function).parameters) == 2, f"{command}: {handler}"


@pytest.mark.parametrize(("command", "handler"), PORTSD, ids=[c for c, _ in PORTSD])
def test_portsd_handler_resolves(command: str, handler: object) -> None:
    function = load_handler(handler) if isinstance(handler, str) else handler
    assert callable(function), f"{command} has no handler"
    assert len(inspect.signature(function).parameters) == 2, f"{command}: {handler}"


def test_a_misspelt_handler_name_does_not_resolve() -> None:
    with pytest.raises(AttributeError):
        load_handler("portsd.cli.query:lsit_command")
    with pytest.raises(ModuleNotFoundError):
        load_handler("portsd.cli.qeury:list_command")


def test_building_the_ports_parser_loads_no_handler_dependencies() -> None:
    code = (
        "import sys; from portsd.cli import ports; ports.parser(); print('\\n'.join(sys.modules))"
    )
    loaded = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    ).stdout.split()
    heavy = ("aiohttp", "pygit2", "zeroconf", "sqlite3", "portsd.client", "portsd.build")
    assert [m for m in loaded if any(m == h or m.startswith(f"{h}.") for h in heavy)] == []


def test_man_pages_are_generated_from_the_parsers(tmp_path: Path) -> None:
    subprocess.run(
        [sys.executable, "-m", "portsd.cli.manpage", str(tmp_path)], check=True, timeout=60
    )
    for page, parser in (("ports.1", ports.parser()), ("portsd.8", daemon.parser())):
        rendered = subprocess.run(
            ["groff", "-man", "-Tutf8", "-ww", str(tmp_path / page)],
            capture_output=True,
            text=True,
            check=True,
            timeout=60,
        )
        assert rendered.stderr == "", rendered.stderr
        for command, _ in subcommands(parser, ""):
            assert f".SS {command.strip()}\n" in (tmp_path / page).read_text(), command
    assert "--dry-run" in (tmp_path / "ports.1").read_text().replace("\\-", "-")

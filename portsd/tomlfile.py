"""Configuration files in TOML, read one way: every problem names the file and the line.

The daemon's ``portsd.toml`` (``portsd.config``) and the client's ``ports.toml``
(``portsd.client.settings``) differ in what they hold, not in how they are read: a file
that cannot be read, is not TOML, or has a key that is unknown or of the wrong type is one
``ConfigError`` that reads ``/etc/ports.toml:3: unknown setting 'cachez'``. Keys are
located in the text only when something is wrong.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import rtoml

from portsd.errors import ConfigError

_POSITION = re.compile(r" at line (\d+) column \d+$")  # how rtoml ends a parse error


@dataclass(frozen=True, slots=True)
class TomlFile:
    """A parsed TOML file: its ``data``, and its ``text`` for locating problems."""

    path: Path
    text: str
    data: dict[str, Any]

    @classmethod
    def read(cls, path: Path) -> TomlFile:
        """Read and parse ``path``; a ConfigError if it is missing, unreadable or not TOML."""
        try:
            text = path.read_text()
        except FileNotFoundError:
            raise ConfigError("no such config file", path=str(path)) from None
        except (OSError, UnicodeDecodeError) as error:
            raise ConfigError(f"cannot read: {error}", path=str(path)) from None
        try:
            data = rtoml.loads(text)
        except rtoml.TomlParsingError as error:
            message = str(error).strip()
            found = _POSITION.search(message)
            raise ConfigError(
                f"invalid TOML: {_POSITION.sub('', message)}",
                path=str(path),
                line=int(found[1]) if found else None,
            ) from None
        return cls(path, text, data)

    def error(self, message: str, key: str | None = None, table: str | None = None) -> ConfigError:
        """A problem with ``key`` of ``[table]`` (the top level if None; the table's header
        if ``key`` is None), at its line when the text shows it."""
        return ConfigError(message, path=str(self.path), line=self.line_of(key, table))

    def line_of(self, key: str | None, table: str | None) -> int | None:
        """The 1-based line of ``key = ...`` (or ``key.sub = ...``) in ``[table]``, or of
        the table's header; also finds ``[table.key]`` headers. None if not found."""
        lines = self.text.splitlines()
        start = 0 if table is None else _header_line(lines, table)  # the table's first line
        if key is None:
            return start or None
        assignment = re.compile(rf"\s*[\"']?{re.escape(key)}[\"']?\s*[.=]")
        for number in range(len(lines) if start is None else start, len(lines)):
            if lines[number].lstrip().startswith("["):
                break
            if assignment.match(lines[number]):
                return number + 1
        return _header_line(lines, f"{table}.{key}" if table else key)


def _header_line(lines: list[str], table: str) -> int | None:
    """The 1-based line of ``[table]``, or None."""
    header = re.compile(rf"\s*\[\s*{re.escape(table)}\s*\]")
    return next((n + 1 for n, line in enumerate(lines) if header.match(line)), None)

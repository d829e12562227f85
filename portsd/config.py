"""Configuration: one TOML file, every setting also a flag, loaded once and passed explicitly.

All state lives under one directory (``state_dir``) unless a setting moves a part of it:

    <state>/portsd.toml        this file (optional; defaults everywhere)
    <state>/repo/<arch>/...    the signed binary repository
    <state>/distfiles/         downloaded sources, by sha256
    <state>/keys/              the signing key pair (secret key mode 0600); next.key and
                               next.pub during a key rotation
    <state>/work/              build directories (removed after each build)
    <state>/store/             unpacked packages, the layers of build roots
    <state>/logs/              one log per build
    <state>/cache/             parsed recipes by tree id
    <state>/portsd.sqlite      the daemon's evaluations and builds
    <state>/token              the secret of the post-receive hook (mode 0600)
    <state>/daemon.lock        held by the running daemon: its pid and URL
    <state>/worker-token       the secret cluster workers present to upload (mode 0600)
    <state>/uploads/           packages uploaded by cluster workers, until checked
"""

from __future__ import annotations

import os
import platform
from collections.abc import Mapping
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from portsd.errors import ConfigError
from portsd.tomlfile import TomlFile

CONFIG_NAME = "portsd.toml"

NamedMirrors = tuple[tuple[str, tuple[str, ...]], ...]
"""``(NAME, places)`` pairs, sorted by name: the directories and http(s) base URLs holding
the files of ``mirror://NAME/PATH`` recipe URLs, tried in order."""


@dataclass(frozen=True, slots=True)
class Config:
    """Every setting of the builder and the daemon, with its default."""

    state_dir: Path
    arch: str = field(default_factory=platform.machine)
    jobs: int = 2  # builds at once
    make_jobs: int = field(default_factory=lambda: os.cpu_count() or 1)  # $JOBS inside a build
    build_timeout: float = 3600.0  # seconds per step
    mirrors: tuple[str, ...] = ()  # distfiles mirrors, holding files by name
    named_mirrors: NamedMirrors = ()  # mirror://NAME/... -> where NAME's files are
    index_expiry_days: float = 7.0
    keep_per_port: int = 2  # retention: newest unlisted packages kept per port
    keep_days: float = 0.0  # retention: and whatever was stored within this many days
    keep_unlisted_minutes: float = 60.0  # retention: a package that left the index stays
    repo_dir: Path | None = None
    distfiles_dir: Path | None = None
    seed_dir: Path | None = None  # where the bootstrap seed is kept
    tree_dir: Path | None = None  # the git repository the daemon follows
    branch: str | None = None  # default: the repository's HEAD branch
    listen: str = "127.0.0.1"  # loopback unless told otherwise
    port: int = 8470
    max_request_bytes: int = 1 << 20
    cluster: str | None = None  # a Dask scheduler (tcp://host:8786): build there, not here
    verify: int = 1  # identical builds on different workers before a package is published
    idle_timeout: float = 15.0  # seconds a connection may take to send a request head
    max_connections: int = 1000  # at once; more get a 503 at once
    max_connections_per_address: int = 256  # behind a proxy, all come from its address
    process_limit: int = 4096  # processes of one build at once; 0: none
    memory_limit: int = 0  # bytes resident, one build's total; 0: none
    disk_limit: int = 0  # bytes in one build's work directory; 0: none
    open_files_limit: int = 4096  # per process of a build; 0: none

    @property
    def repo(self) -> Path:
        return self.repo_dir or self.state_dir / "repo"

    @property
    def distfiles(self) -> Path:
        return self.distfiles_dir or self.state_dir / "distfiles"

    @property
    def seed(self) -> Path:
        return self.seed_dir or self.state_dir / "seed"

    @property
    def secret_key(self) -> Path:
        return self.state_dir / "keys" / "portsd.key"

    @property
    def public_key(self) -> Path:
        return self.state_dir / "keys" / "portsd.pub"

    @property
    def next_secret_key(self) -> Path:
        """During a key rotation, the next signing key (it signs beside the current one)."""
        return self.state_dir / "keys" / "next.key"

    @property
    def next_public_key(self) -> Path:
        return self.state_dir / "keys" / "next.pub"

    @property
    def token_file(self) -> Path:
        """The secret the post-receive hook presents to the daemon (mode 0600)."""
        return self.state_dir / "token"

    @property
    def worker_token_file(self) -> Path:
        """The secret cluster workers present to upload packages (mode 0600)."""
        return self.state_dir / "worker-token"

    @property
    def uploads(self) -> Path:
        return self.state_dir / "uploads"

    @property
    def database(self) -> Path:
        return self.state_dir / "portsd.sqlite"

    @property
    def work(self) -> Path:
        return self.state_dir / "work"

    @property
    def store(self) -> Path:
        return self.state_dir / "store"

    @property
    def logs(self) -> Path:
        return self.state_dir / "logs"

    @property
    def cache(self) -> Path:
        return self.state_dir / "cache"


class Size(int):
    """A number of bytes, written ``2 GiB``, ``512M``, ``100 KiB`` or as a plain integer."""


_UNITS = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}


def parse_size(text: str | int) -> int:
    """Bytes in ``text``: an integer, or a number with K, M, G or T (binary: KiB = K = 1024);
    raises ValueError."""
    if isinstance(text, int):
        if text < 0:
            raise ValueError(f"a size cannot be negative: {text}")
        return text
    number = text.strip().lower().removesuffix("b").removesuffix("i")
    unit = number[-1:] if number[-1:] in _UNITS else ""
    value = float(number.removesuffix(unit).strip())
    if value < 0:
        raise ValueError(f"a size cannot be negative: {text}")
    return int(value * _UNITS[unit])


def format_size(size: int) -> str:
    """``size`` bytes in the largest binary unit that keeps it whole-ish: ``2 GiB``."""
    for unit in ("TiB", "GiB", "MiB", "KiB"):
        scale = _UNITS[unit[0].lower()]
        if size >= scale:
            return f"{size / scale:.3g} {unit}"
    return f"{size} B"


# TOML key -> (field name, expected type); the file groups settings in tables.
_SCHEMA: dict[str, dict[str, tuple[str, type]]] = {
    "build": {
        "arch": ("arch", str),
        "jobs": ("jobs", int),
        "make-jobs": ("make_jobs", int),
        "timeout": ("build_timeout", float),
        "seed": ("seed_dir", str),
        "cluster": ("cluster", str),
        "verify": ("verify", int),
        "process-limit": ("process_limit", int),
        "memory-limit": ("memory_limit", Size),
        "disk-limit": ("disk_limit", Size),
        "open-files-limit": ("open_files_limit", int),
    },
    "sources": {
        "mirrors": ("mirrors", list),
        "mirror": ("named_mirrors", dict),
        "distfiles": ("distfiles_dir", str),
    },
    "repository": {
        "path": ("repo_dir", str),
        "expires-days": ("index_expiry_days", float),
        "keep": ("keep_per_port", int),
        "keep-days": ("keep_days", float),
        "keep-unlisted-minutes": ("keep_unlisted_minutes", float),
    },
    "server": {
        "tree": ("tree_dir", str),
        "branch": ("branch", str),
        "listen": ("listen", str),
        "port": ("port", int),
        "max-request-bytes": ("max_request_bytes", int),
        "idle-timeout": ("idle_timeout", float),
        "max-connections": ("max_connections", int),
        "max-connections-per-address": ("max_connections_per_address", int),
    },
}


def load_config(
    state_dir: Path, path: Path | None = None, overrides: Mapping[str, Any] | None = None
) -> Config:
    """The config of ``state_dir``: its portsd.toml (or ``path``), then ``overrides`` (flags).

    A missing default file is fine; a missing explicit ``path`` is an error.
    """
    shared_seed = os.environ.get("PORTSD_SEED")
    config = Config(state_dir=state_dir, seed_dir=Path(shared_seed) if shared_seed else None)
    file = path or state_dir / CONFIG_NAME
    if path is not None and not file.is_file():
        raise ConfigError("no such config file", path=str(file))
    if file.is_file():
        config = replace(config, **_read(file, state_dir))
    values = {k: v for k, v in (overrides or {}).items() if v is not None}
    known = {f.name for f in fields(Config)}
    unknown = set(values) - known
    if unknown:
        raise ConfigError(f"unknown setting(s): {', '.join(sorted(unknown))}")
    if "named_mirrors" in values:  # a flag replaces the file's places of its name only
        values["named_mirrors"] = _merged(config.named_mirrors, values["named_mirrors"])
    config = replace(config, **values)
    if config.jobs < 1 or config.make_jobs < 1:
        raise ConfigError("jobs and make-jobs must be at least 1", path=str(file))
    limits = (config.process_limit, config.memory_limit, config.disk_limit)
    if min(*limits, config.open_files_limit) < 0:
        raise ConfigError("limits must be at least 0 (0: no limit)", path=str(file))
    if config.verify < 1:
        raise ConfigError("verify must be at least 1", path=str(file))
    if config.verify > 1 and config.cluster is None:
        raise ConfigError("verify needs builders on a cluster: set [build] cluster", path=str(file))
    return config


def _read(path: Path, state_dir: Path) -> dict[str, Any]:
    file = TomlFile.read(path)
    values: dict[str, Any] = {}
    for table, entries in file.data.items():
        schema = _SCHEMA.get(table)
        if schema is None or not isinstance(entries, dict):
            raise file.error(f"unknown table [{table}]", None, table)
        for key, value in entries.items():
            if key not in schema:
                raise file.error(f"unknown key '{key}' in [{table}]", key, table)
            name, kind = schema[key]
            values[name] = _coerce(value, kind, name, state_dir, file, (table, key))
    return values


def _coerce(
    value: Any, kind: type, name: str, state_dir: Path, file: TomlFile, where: tuple[str, str]
) -> Any:
    table, key = where
    if kind is Size:
        try:
            return parse_size(value) if isinstance(value, (int, str)) else parse_size("?")
        except ValueError:
            raise file.error(
                f"[{table}] {key} must be a size (2 GiB, 512M, bytes)", key, table
            ) from None
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    ok = isinstance(value, kind) and not isinstance(value, bool)
    if not ok:
        what = "a table" if kind is dict else kind.__name__
        raise file.error(f"[{table}] {key} must be {what}", key, table)
    if kind is list:
        return _strings(value, file, where)
    if kind is dict:  # [sources] mirror.NAME = [...]
        return tuple(
            (mirror, _strings(places, file, (table, f"{key}.{mirror}")))
            for mirror, places in sorted(value.items())
        )
    if name.endswith("_dir"):
        return (state_dir / os.path.expanduser(str(value))).resolve()
    return value


def _strings(value: Any, file: TomlFile, where: tuple[str, str]) -> tuple[str, ...]:
    table, key = where
    if not isinstance(value, list) or not all(isinstance(item, str) for item in value):
        raise file.error(f"[{table}] {key} must be a list of strings", key.split(".")[0], table)
    return tuple(value)


def _merged(old: NamedMirrors, new: NamedMirrors) -> NamedMirrors:
    return tuple(sorted({**dict(old), **dict(new)}.items()))

"""The client's settings: which caches, which keys to trust, which root, which ports tree.

One TOML file (``--config``, else ``$PORTS_CONFIG``, else ``/etc/ports.toml`` if it
exists), every setting also a flag (flags win). Between the two, the caches and keys the
root records (``portsd.client.rootconf``) replace the file's:

    caches = ["http://build.lan:8470"]       # tried in order; a silent one is skipped after 1 s
    trusted-keys = ["/etc/ports/build.pub"]  # minisign public key files (or the base64 itself)
    root = "/"                               # where packages are installed
    tree = "/usr/src/ports"                  # ports checkout to build from when no cache has it
    source = "auto"                          # auto: build when no cache has it; always; never
    cache-dir = "/var/cache/ports"           # downloads and source builds (default: in root)
    discover = false                         # also use trusted caches found on the LAN (mDNS)
    index-timeout = 20                       # seconds to read a cache's whole index
"""

from __future__ import annotations

import os
from dataclasses import dataclass, replace
from enum import StrEnum
from pathlib import Path
from typing import Any

from portsd.client.rootconf import CACHES, remembered
from portsd.errors import ConfigError
from portsd.pkg.sign import PublicKey
from portsd.tomlfile import TomlFile

DEFAULT_FILE = Path("/etc/ports.toml")
INDEX_TIMEOUT = 20.0
"""Seconds within which a cache's whole index must be read (a 1 byte/s cache is cut off)."""


class SourcePolicy(StrEnum):
    """When the client builds a package itself instead of downloading it."""

    AUTO = "auto"  # when no cache has the package (a substituter, not the only source)
    ALWAYS = "always"  # never download: build everything from the ports tree
    NEVER = "never"  # never build: fail if no cache has it


@dataclass(frozen=True, slots=True)
class ClientSettings:
    root: Path = Path("/")
    caches: tuple[str, ...] = ()
    trusted_keys: tuple[PublicKey, ...] = ()
    tree: Path | None = None
    source: SourcePolicy = SourcePolicy.AUTO
    cache_dir: Path | None = None
    discover: bool = False
    arch: str = os.uname().machine
    index_timeout: float = INDEX_TIMEOUT

    @property
    def cache(self) -> Path:
        """Downloads and source builds (default: ``<root>/var/cache/ports``)."""
        return self.cache_dir or self.root / "var" / "cache" / "ports"


_KEYS: dict[str, type | tuple[type, ...]] = {
    "caches": list,
    "trusted-keys": list,
    "root": str,
    "tree": str,
    "source": str,
    "cache-dir": str,
    "discover": bool,
    "arch": str,
    "index-timeout": (int, float),
}


def load_settings(path: Path | None, **flags: Any) -> ClientSettings:
    """Settings from ``path`` (or the default file, if any), then the non-None ``flags``."""
    file = path or (Path(os.environ["PORTS_CONFIG"]) if "PORTS_CONFIG" in os.environ else None)
    values: dict[str, Any] = {}
    if file is not None or DEFAULT_FILE.is_file():
        values = _read(file or DEFAULT_FILE)
    given = {k: v for k, v in flags.items() if v is not None and v != ()}
    settings = ClientSettings()
    label = str(file or "flags")
    root = given.get("root", values.get("root"))
    if root is not None:
        settings = replace(settings, root=Path(root).absolute())
    # what the root records beats the config file; a flag beats both
    memory = remembered(settings.root)
    if memory.caches:
        values.pop("caches", None)
        where = str(settings.root / CACHES)
        settings = replace(settings, caches=tuple(_url(u, where) for u in memory.caches))
    if memory.keys:
        values.pop("trusted_keys", None)
        settings = replace(settings, trusted_keys=memory.keys)
    values.update(given)
    if "caches" in values:
        settings = replace(settings, caches=tuple(_url(u, label) for u in values["caches"]))
    if "trusted_keys" in values:
        settings = replace(
            settings, trusted_keys=tuple(_key(k, label) for k in values["trusted_keys"])
        )
    if "tree" in values:
        settings = replace(settings, tree=Path(values["tree"]).absolute())
    if "source" in values:
        try:
            settings = replace(settings, source=SourcePolicy(values["source"]))
        except ValueError:
            raise ConfigError(
                f"source must be auto, always or never, not {values['source']!r}", path=label
            ) from None
    if "cache_dir" in values:
        settings = replace(settings, cache_dir=Path(values["cache_dir"]).absolute())
    if "discover" in values:
        settings = replace(settings, discover=bool(values["discover"]))
    if "arch" in values:
        settings = replace(settings, arch=str(values["arch"]))
    if "index_timeout" in values:
        if values["index_timeout"] <= 0:
            raise ConfigError("index-timeout must be a positive number of seconds", path=label)
        settings = replace(settings, index_timeout=float(values["index_timeout"]))
    return settings


def _read(path: Path) -> dict[str, Any]:
    file = TomlFile.read(path)
    values: dict[str, Any] = {}
    for key, value in file.data.items():
        kind = _KEYS.get(key)
        if kind is None:
            raise file.error(f"unknown setting '{key}'", key)
        if not isinstance(value, kind) or isinstance(value, bool) is not (kind is bool):
            raise file.error(f"'{key}' must be {getattr(kind, '__name__', 'a number')}", key)
        if key in ("root", "tree", "cache-dir"):
            value = str(path.parent / str(value))  # relative to the file; absolute stays
        values[key.replace("-", "_")] = value
    return values


def _url(text: object, label: str) -> str:
    if not isinstance(text, str) or not text.startswith(("http://", "https://")):
        raise ConfigError(f"a cache must be an http(s) URL, not {text!r}", path=label)
    return text.rstrip("/")


def _key(text: object, label: str) -> PublicKey:
    if not isinstance(text, str):
        raise ConfigError(f"a trusted key must be a file or a base64 key, not {text!r}", path=label)
    if os.path.exists(text):
        return PublicKey.load(text)
    try:
        return PublicKey.parse(text, label)
    except ConfigError:
        if "\n" in text:  # a key file's text: its own problem is the one to say
            raise
        raise ConfigError(f"trusted key {text}: no such file", path=label) from None

"""What a root remembers of where its packages come from, like apk's
``<root>/etc/apk/repositories`` and ``keys/``:

    <root>/etc/ports/caches            one cache URL a line, in order (# starts a comment)
    <root>/etc/ports/keys/<KEYID>.pub  the minisign public keys its caches are checked with

A command that changed the root with ``--cache``/``--key`` records them here, so later
commands on the same root (``upgrade``, ``search``, ``info``) use them without the flags.
The config file is the fallback, the flags win.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from portsd.errors import ConfigError
from portsd.fsio import write_atomic
from portsd.pkg.sign import PublicKey

CACHES = Path("etc/ports/caches")
KEYS = Path("etc/ports/keys")


@dataclass(frozen=True, slots=True)
class Remembered:
    """The caches and keys recorded in a root (empty when it records none)."""

    caches: tuple[str, ...] = ()
    keys: tuple[PublicKey, ...] = ()


def remembered(root: Path) -> Remembered:
    """What ``root`` records; ConfigError naming the file if a record is unreadable."""
    caches: tuple[str, ...] = ()
    path = root / CACHES
    try:
        text = path.read_text()
    except FileNotFoundError:
        pass
    except OSError as error:
        raise ConfigError(f"cannot read: {error.strerror}", path=str(path)) from None
    else:
        lines = (line.partition("#")[0].strip() for line in text.splitlines())
        caches = tuple(line for line in lines if line)
    keys: list[PublicKey] = []
    directory = root / KEYS
    if directory.is_dir():
        for file in sorted(directory.glob("*.pub")):
            keys.append(PublicKey.load(file))
    return Remembered(caches, tuple(keys))


def remember(root: Path, caches: tuple[str, ...] | None, keys: tuple[PublicKey, ...]) -> None:
    """Record ``caches`` (replacing the list; None keeps it) and add ``keys`` in ``root``;
    ConfigError naming the path if it cannot be written."""
    try:
        _remember(root, caches, keys)
    except OSError as error:
        where = error.filename or str(root / CACHES.parent)
        raise ConfigError(f"cannot record the caches: {error.strerror}", path=where) from None


def _remember(root: Path, caches: tuple[str, ...] | None, keys: tuple[PublicKey, ...]) -> None:
    if caches is not None:
        (root / CACHES).parent.mkdir(parents=True, exist_ok=True)
        text = "# caches of this root, in order (written by ports)\n" + "".join(
            f"{url}\n" for url in caches
        )
        write_atomic(root / CACHES, text.encode())
    if keys:
        (root / KEYS).mkdir(parents=True, exist_ok=True)
        for key in keys:
            write_atomic(root / KEYS / f"{key.key_id}.pub", key.text().encode("ascii"))

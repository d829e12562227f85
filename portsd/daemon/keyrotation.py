"""Rotating the repository's signing key: ``portsd key rotate``, then ``portsd key retire``.

``rotate`` makes the next key (``keys/next.key``, ``keys/next.pub``) and signs everything
again with both keys, the current one's signature first: clients that trust either key
verify the index and every package. Operators then give clients the next public key.
``retire`` makes the next key the current one (the old pair is kept as
``keys/retired-<id>.key/.pub``) and signs everything again with it alone. Each re-signing
publishes the index with a new serial, so clients' rollback protection carries on across
the change. Both run while no daemon serves the state: a daemon signs with the keys it
read at its start.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from portsd.build.pipeline import ensure_signing_key, next_signing_keys
from portsd.config import Config
from portsd.errors import PortsdError
from portsd.pkg.repo import Repository
from portsd.pkg.sign import SecretKey


@dataclass(frozen=True, slots=True)
class Rotated:
    current: str  # key id that signs first now
    next: str | None  # key id that signs beside it, during a rotation
    retired: str | None  # key id that no longer signs
    signed: int  # packages signed again


def rotate(config: Config) -> Rotated:
    """Make the next key and sign everything with both."""
    current = ensure_signing_key(config)
    if next_signing_keys(config):
        failure = PortsdError(f"a key rotation is under way: {config.next_secret_key} exists")
        failure.hint = "finish it with `portsd key retire`"
        raise failure
    new = SecretKey.generate()
    new.save(config.next_secret_key)
    new.public_key.save(config.next_public_key, overwrite=True)
    signed = _repository(config, current, (new,)).resign()
    return Rotated(current.key_id, new.key_id, None, signed)


def retire(config: Config) -> Rotated:
    """Make the next key the current one; sign everything with it alone."""
    old = ensure_signing_key(config)
    following = next_signing_keys(config)
    if not following:
        failure = PortsdError("no key rotation is under way: nothing to retire")
        failure.hint = "start one with `portsd key rotate`"
        raise failure
    new = following[0]
    keys = config.secret_key.parent
    os.replace(config.secret_key, keys / f"retired-{old.key_id}.key")
    os.replace(config.public_key, keys / f"retired-{old.key_id}.pub")
    os.replace(config.next_secret_key, config.secret_key)
    os.replace(config.next_public_key, config.public_key)
    signed = _repository(config, new, ()).resign()
    return Rotated(new.key_id, None, old.key_id, signed)


def _repository(config: Config, key: SecretKey, cosigners: tuple[SecretKey, ...]) -> Repository:
    expires = int(config.index_expiry_days * 86400)
    return Repository(config.repo, config.arch, key, expires_in=expires, cosigners=cosigners)

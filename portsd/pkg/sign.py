"""Ed25519 signatures in minisign's format, so the stock ``minisign -V`` checks our files.

Formats (all base64 is the standard alphabet, with padding):

* public key file: ``untrusted comment: ...`` then base64(``"Ed"`` ‖ key id (8) ‖ pk (32)).
* secret key file: ``untrusted comment: ...`` then base64 of minisign's 158-byte struct
  ``"Ed"`` ‖ kdf alg ‖ ``"B2"`` ‖ salt (32) ‖ opslimit (8) ‖ memlimit (8) ‖ key id (8) ‖
  sk (64 = seed ‖ pk) ‖ checksum (32). We write and read only *unencrypted* keys, as
  ``minisign -G -W`` does: kdf alg, salt and limits are zero and the checksum is
  BLAKE2b-256(``"Ed"`` ‖ key id ‖ sk). minisign 0.11 itself writes an all-zero checksum for
  unencrypted keys, so an all-zero checksum is accepted too.
* signature file, four lines::

      untrusted comment: <anything, not covered by any signature>
      base64("ED" ‖ key id ‖ Ed25519(BLAKE2b-512(data)))
      trusted comment: <one line>
      base64(Ed25519(signature ‖ trusted comment bytes))

  ``"ED"`` is minisign's prehashed algorithm (constant memory for big packages); legacy
  ``"Ed"`` signatures over the raw data are accepted when verifying, never produced.

The key id shown to people is minisign's: the 8 id bytes read as a little-endian integer,
in upper-case hex without leading zeros (``minisign -G`` prints the same string).

Key files that cannot be used raise ``ConfigError`` naming the file; a signature that does
not verify raises ``BadSignature`` saying which check failed.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import os
import secrets
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from portsd.errors import BadSignature, ConfigError
from portsd.fsio import write_atomic

_ALG_LEGACY = b"Ed"
_ALG_HASHED = b"ED"
_KDF_NONE = b"\0\0"
_KDF_SCRYPT = b"Sc"
_CHK_ALG = b"B2"
_KEYNUM_BYTES = 8
_SECRET_KEY_BYTES = 158
_UNTRUSTED = "untrusted comment: "
_TRUSTED = "trusted comment: "
# minisign reads lines with fixed buffers: a longer comment line would be split and misparsed
_UNTRUSTED_MAX = 1024 - len(_UNTRUSTED) - 2
_TRUSTED_MAX = 8192 - len(_TRUSTED) - 2
_CHUNK = 1 << 20


@dataclass(frozen=True, slots=True)
class PublicKey:
    """An Ed25519 public key with its 8-byte minisign key id."""

    keynum: bytes
    key: bytes

    def __post_init__(self) -> None:
        if len(self.keynum) != _KEYNUM_BYTES or len(self.key) != 32:
            raise ValueError("a public key is an 8-byte key id and 32 key bytes")

    @property
    def key_id(self) -> str:
        """The key id as minisign prints it, e.g. ``EB20802A98EDC401``."""
        return _key_id(self.keynum)

    @classmethod
    def parse(cls, text: str, label: str = "<public key>") -> PublicKey:
        """A key from a public key file's text, or from its bare base64 line (``minisign -P``)."""
        lines = [line.strip() for line in text.splitlines() if line.strip()]
        if lines and lines[0].startswith(_UNTRUSTED):
            lines = lines[1:]
        if not lines:
            raise ConfigError("not a minisign public key: no key line", path=label)
        raw = _b64decode(lines[0])
        if raw is None or len(raw) != 2 + _KEYNUM_BYTES + 32:
            raise ConfigError("not a minisign public key: bad base64 key line", path=label)
        if raw[:2] != _ALG_LEGACY:
            raise ConfigError(f"unsupported public key algorithm {raw[:2]!r}", path=label)
        return cls(raw[2:10], raw[10:])

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> PublicKey:
        """Read a public key file (``minisign -G`` writes one)."""
        return cls.parse(_read_text(path), str(path))

    def base64(self) -> str:
        """The bare key, as ``minisign -P`` takes it."""
        return base64.b64encode(_ALG_LEGACY + self.keynum + self.key).decode("ascii")

    def text(self) -> str:
        """The contents of this key's public key file."""
        return f"{_UNTRUSTED}minisign public key {self.key_id}\n{self.base64()}\n"

    def save(self, path: str | os.PathLike[str], *, overwrite: bool = False) -> None:
        """Write the public key file atomically (mode 0644)."""
        _write_atomic(Path(path), self.text().encode("ascii"), 0o644, overwrite=overwrite)

    def _ed25519(self) -> Ed25519PublicKey:
        return Ed25519PublicKey.from_public_bytes(self.key)


@dataclass(frozen=True, slots=True)
class SecretKey:
    """An Ed25519 signing key with its minisign key id; ``repr`` never shows the seed."""

    keynum: bytes
    seed: bytes = field(repr=False)

    def __post_init__(self) -> None:
        if len(self.keynum) != _KEYNUM_BYTES or len(self.seed) != 32:
            raise ValueError("a secret key is an 8-byte key id and a 32-byte seed")

    @classmethod
    def generate(cls) -> SecretKey:
        """A new random key pair with a random key id."""
        return cls(secrets.token_bytes(_KEYNUM_BYTES), secrets.token_bytes(32))

    @property
    def public_key(self) -> PublicKey:
        return PublicKey(self.keynum, _raw_public(self._ed25519()))

    @property
    def key_id(self) -> str:
        return _key_id(self.keynum)

    @classmethod
    def parse(cls, text: str, label: str = "<secret key>") -> SecretKey:
        """A key from a secret key file's text; only unencrypted keys are supported."""
        lines = [line.strip() for line in text.splitlines() if line.strip()]
        if len(lines) < 2 or not lines[0].startswith(_UNTRUSTED):
            raise ConfigError("not a minisign secret key file", path=label)
        raw = _b64decode(lines[1])
        if raw is None or len(raw) != _SECRET_KEY_BYTES:
            raise ConfigError("not a minisign secret key file: bad base64 key line", path=label)
        if raw[:2] != _ALG_LEGACY or raw[4:6] != _CHK_ALG:
            raise ConfigError("unsupported secret key algorithm", path=label)
        if raw[2:4] == _KDF_SCRYPT:
            error = ConfigError("the secret key is password-protected", path=label)
            error.hint = "portsd signs unattended: create the key with `minisign -G -W`"
            raise error
        if raw[2:4] != _KDF_NONE:
            raise ConfigError("unsupported secret key derivation function", path=label)
        keynum, sk, checksum = raw[54:62], raw[62:126], raw[126:158]
        if checksum != bytes(32) and checksum != _checksum(keynum, sk):
            raise ConfigError("secret key checksum mismatch: the file is damaged", path=label)
        key = cls(keynum, sk[:32])
        if key.public_key.key != sk[32:]:
            raise ConfigError("secret key is inconsistent with its public half", path=label)
        return key

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> SecretKey:
        """Read a secret key file (``minisign -G -W`` or ``save`` writes one)."""
        return cls.parse(_read_text(path), str(path))

    def text(self) -> str:
        """The contents of this key's secret key file (unencrypted)."""
        sk = self.seed + self.public_key.key
        raw = (
            _ALG_LEGACY
            + _KDF_NONE
            + _CHK_ALG
            + bytes(32 + 8 + 8)
            + self.keynum
            + sk
            + _checksum(self.keynum, sk)
        )
        encoded = base64.b64encode(raw).decode("ascii")
        return f"{_UNTRUSTED}minisign secret key {self.key_id} (unencrypted)\n{encoded}\n"

    def save(self, path: str | os.PathLike[str], *, overwrite: bool = False) -> None:
        """Write the secret key file atomically with mode 0600.

        Refuses to replace an existing file unless ``overwrite``: losing a signing key
        strands every client that trusts it.
        """
        _write_atomic(Path(path), self.text().encode("ascii"), 0o600, overwrite=overwrite)

    def sign(self, data: bytes, trusted_comment: str, untrusted_comment: str = "") -> str:
        """The text of a ``.minisig`` for ``data`` (prehashed "ED" algorithm)."""
        return self._sign_digest(_prehash(data), trusted_comment, untrusted_comment)

    def sign_file(
        self, path: str | os.PathLike[str], trusted_comment: str, untrusted_comment: str = ""
    ) -> str:
        """``sign`` for a file, read in chunks: memory stays flat for big packages."""
        return self._sign_digest(_prehash_file(path), trusted_comment, untrusted_comment)

    def _sign_digest(self, digest: bytes, trusted_comment: str, untrusted_comment: str) -> str:
        untrusted_comment = untrusted_comment or f"signature from minisign secret key {self.key_id}"
        for name, comment, limit in (
            ("trusted", trusted_comment, _TRUSTED_MAX),
            ("untrusted", untrusted_comment, _UNTRUSTED_MAX),
        ):
            if "\n" in comment or "\r" in comment or "\0" in comment:
                raise ValueError(f"a {name} comment must be a single line")
            if len(comment.encode("utf-8")) > limit:
                raise ValueError(f"a {name} comment may be at most {limit} bytes")
        key = self._ed25519()
        signature = key.sign(digest)
        global_signature = key.sign(signature + trusted_comment.encode("utf-8"))
        sig_line = base64.b64encode(_ALG_HASHED + self.keynum + signature).decode("ascii")
        global_line = base64.b64encode(global_signature).decode("ascii")
        return (
            f"{_UNTRUSTED}{untrusted_comment}\n{sig_line}\n"
            f"{_TRUSTED}{trusted_comment}\n{global_line}\n"
        )

    def _ed25519(self) -> Ed25519PrivateKey:
        return Ed25519PrivateKey.from_private_bytes(self.seed)


@dataclass(frozen=True, slots=True)
class _Signature:
    algorithm: bytes
    keynum: bytes
    signature: bytes
    trusted_comment: str
    global_signature: bytes


def verify(
    data: bytes, signature_text: str, keys: Sequence[PublicKey], label: str = "<signature>"
) -> str:
    """Check ``signature_text`` (a ``.minisig``) over ``data``; return its trusted comment.

    Raises ``BadSignature`` (``label`` names the signed thing) when the file is malformed,
    was made by a key not in ``keys``, does not match the data, or its trusted comment was
    altered (bad global signature).
    """
    sig, key = _trusted_signature(signature_text, keys, label)
    message = _prehash(data) if sig.algorithm == _ALG_HASHED else data
    return _check(sig, key, message, label)


def verify_file(
    path: str | os.PathLike[str], signature_text: str, keys: Sequence[PublicKey]
) -> str:
    """``verify`` for a file, hashed in chunks; errors name the file."""
    label = str(path)
    sig, key = _trusted_signature(signature_text, keys, label)
    try:
        message = _prehash_file(path) if sig.algorithm == _ALG_HASHED else Path(path).read_bytes()
    except OSError as error:
        raise BadSignature(label, f"cannot read the signed file: {error.strerror}") from error
    return _check(sig, key, message, label)


def _parse_signature(text: str, label: str) -> _Signature:
    def malformed(detail: str) -> BadSignature:
        return BadSignature(label, f"malformed signature file: {detail}")

    # minisign reads four lines and cuts each at its first CR or LF
    lines = [line.split("\r", 1)[0] for line in text.split("\n")]
    if len(lines) < 4:
        raise malformed("fewer than four lines")
    if not lines[0].startswith(_UNTRUSTED):
        raise malformed(f"first line does not start with '{_UNTRUSTED.strip()}'")
    if not lines[2].startswith(_TRUSTED):
        raise malformed(f"third line does not start with '{_TRUSTED.strip()}'")
    raw = _b64decode(lines[1].strip())
    if raw is None or len(raw) != 2 + _KEYNUM_BYTES + 64:
        raise malformed("bad signature line")
    if raw[:2] not in (_ALG_HASHED, _ALG_LEGACY):
        raise malformed(f"unsupported signature algorithm {raw[:2]!r}")
    global_signature = _b64decode(lines[3].strip())
    if global_signature is None or len(global_signature) != 64:
        raise malformed("bad global signature line")
    return _Signature(
        algorithm=raw[:2],
        keynum=raw[2:10],
        signature=raw[10:],
        trusted_comment=lines[2][len(_TRUSTED) :],
        global_signature=global_signature,
    )


def _trusted_signature(
    text: str, keys: Sequence[PublicKey], label: str
) -> tuple[_Signature, PublicKey]:
    """The first signature of ``text`` made by one of ``keys``, and that key.

    A ``.minisig`` may hold several signatures, four lines each, one after the other: while
    a repository's key is rotated it signs with the old key and the new one. Stock
    minisign reads the first four lines, so the old key's signature comes first. Lines
    after the first signature that do not make another one are ignored, as minisign does.
    """
    lines = text.split("\n")
    signatures = [_parse_signature(text, label)]
    for start in range(4, len(lines) - 3, 4):
        try:
            signatures.append(_parse_signature("\n".join(lines[start : start + 4]), label))
        except BadSignature:
            break
    for sig in signatures:
        for key in keys:
            if key.keynum == sig.keynum:
                return sig, key
    signers = ", ".join(_key_id(sig.keynum) for sig in signatures)
    trusted = ", ".join(key.key_id for key in keys) or "none"
    raise BadSignature(label, f"signed by unknown key {signers} (trusted keys: {trusted})")


def _check(sig: _Signature, key: PublicKey, message: bytes, label: str) -> str:
    public = key._ed25519()
    try:
        public.verify(sig.signature, message)
    except InvalidSignature:
        raise BadSignature(
            label, f"bad signature: the data does not match (key {key.key_id})"
        ) from None
    try:
        public.verify(sig.global_signature, sig.signature + sig.trusted_comment.encode("utf-8"))
    except InvalidSignature:
        raise BadSignature(
            label, f"bad global signature: the trusted comment was altered (key {key.key_id})"
        ) from None
    return sig.trusted_comment


def _key_id(keynum: bytes) -> str:
    return f"{int.from_bytes(keynum, 'little'):X}"  # unpadded, as minisign prints it


def _checksum(keynum: bytes, sk: bytes) -> bytes:
    return hashlib.blake2b(_ALG_LEGACY + keynum + sk, digest_size=32).digest()


def _raw_public(key: Ed25519PrivateKey) -> bytes:
    return key.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)


def _prehash(data: bytes) -> bytes:
    return hashlib.blake2b(data, digest_size=64).digest()


def _prehash_file(path: str | os.PathLike[str]) -> bytes:
    digest = hashlib.blake2b(digest_size=64)
    with open(path, "rb") as stream:
        while chunk := stream.read(_CHUNK):
            digest.update(chunk)
    return digest.digest()


def _b64decode(text: str) -> bytes | None:
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        return None


def _read_text(path: str | os.PathLike[str]) -> str:
    try:
        return Path(path).read_text(encoding="utf-8")
    except OSError as error:
        raise ConfigError(f"cannot read key file: {error.strerror}", path=str(path)) from error
    except UnicodeDecodeError:
        raise ConfigError("not a minisign key file: not UTF-8 text", path=str(path)) from None


def _write_atomic(path: Path, data: bytes, mode: int, *, overwrite: bool) -> None:
    """``fsio.write_atomic`` with a key file's errors: never silently replace a key."""
    try:
        write_atomic(path, data, mode, overwrite=overwrite)
    except FileExistsError:
        raise ConfigError("refusing to overwrite an existing key file", path=str(path)) from None
    except OSError as error:
        raise ConfigError(f"cannot write key file: {error.strerror}", path=str(path)) from error

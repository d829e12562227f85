"""minisign-format signatures, checked both ways against the stock minisign binary."""

from __future__ import annotations

import base64
import os
import shutil
import stat
import subprocess
from pathlib import Path

import pytest

from portsd.errors import BadSignature, ConfigError
from portsd.pkg.sign import PublicKey, SecretKey, verify, verify_file

MINISIGN = shutil.which("minisign")  # a test dependency: stock minisign is the reference


def minisign(*args: str | Path, stdin: bytes = b"") -> subprocess.CompletedProcess[str]:
    assert MINISIGN is not None, "the minisign binary is required"
    return subprocess.run(
        [MINISIGN, *map(str, args)],
        input=stdin.decode(),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


@pytest.fixture
def key(tmp_path: Path) -> SecretKey:
    secret = SecretKey.generate()
    secret.save(tmp_path / "our.key")
    secret.public_key.save(tmp_path / "our.pub")
    return secret


@pytest.fixture
def stock_key(tmp_path: Path) -> tuple[Path, Path]:
    result = minisign("-G", "-W", "-p", tmp_path / "stock.pub", "-s", tmp_path / "stock.key")
    assert result.returncode == 0, result.stderr
    return tmp_path / "stock.pub", tmp_path / "stock.key"


def test_stock_minisign_verifies_our_signature(tmp_path: Path, key: SecretKey) -> None:
    data = os.urandom(100_000)
    (tmp_path / "file").write_bytes(data)
    comment = "timestamp:1700000000\tfile:file\tkey:é-ü"
    (tmp_path / "file.minisig").write_text(key.sign(data, comment))
    result = minisign("-V", "-p", tmp_path / "our.pub", "-m", tmp_path / "file")
    assert result.returncode == 0, result.stderr
    assert f"Trusted comment: {comment}" in result.stdout


def test_sign_file_matches_sign_and_verifies_with_stock_minisign(
    tmp_path: Path, key: SecretKey
) -> None:
    path = tmp_path / "big"
    path.write_bytes(os.urandom(3 << 20))  # several read chunks
    signature = key.sign_file(path, "big one")
    (tmp_path / "big.minisig").write_text(signature)
    assert minisign("-Vq", "-p", tmp_path / "our.pub", "-m", path).returncode == 0
    assert verify_file(path, signature, [key.public_key]) == "big one"
    assert verify(path.read_bytes(), signature, [key.public_key]) == "big one"


def test_stock_minisign_rejects_a_tampered_file(tmp_path: Path, key: SecretKey) -> None:
    data = b"the package\n" * 100
    (tmp_path / "file.minisig").write_text(key.sign(data, "c"))
    (tmp_path / "file").write_bytes(data[:-1] + b"?")
    result = minisign("-V", "-p", tmp_path / "our.pub", "-m", tmp_path / "file")
    assert result.returncode != 0
    assert "verification failed" in result.stderr


def test_stock_minisign_rejects_a_tampered_trusted_comment(tmp_path: Path, key: SecretKey) -> None:
    data = b"x"
    (tmp_path / "file").write_bytes(data)
    text = key.sign(data, "serial:1").replace("serial:1", "serial:9")
    (tmp_path / "file.minisig").write_text(text)
    result = minisign("-V", "-p", tmp_path / "our.pub", "-m", tmp_path / "file")
    assert result.returncode != 0
    assert "Comment signature verification failed" in result.stderr


def test_stock_key_and_signature_verify_with_ours(
    tmp_path: Path, stock_key: tuple[Path, Path]
) -> None:
    pub_path, key_path = stock_key
    data = os.urandom(5000)
    (tmp_path / "file").write_bytes(data)
    result = minisign("-S", "-s", key_path, "-m", tmp_path / "file", "-t", "made by stock")
    assert result.returncode == 0, result.stderr
    public = PublicKey.load(pub_path)
    signature = (tmp_path / "file.minisig").read_text()
    assert verify(data, signature, [public]) == "made by stock"
    assert verify_file(tmp_path / "file", signature, [public]) == "made by stock"
    # the id we compute is the one minisign wrote into the key's comment
    assert pub_path.read_text().splitlines()[0].split()[-1] == public.key_id


def test_stock_legacy_signature_verifies(tmp_path: Path, stock_key: tuple[Path, Path]) -> None:
    pub_path, key_path = stock_key
    data = b"legacy\n"
    (tmp_path / "file").write_bytes(data)
    assert minisign("-S", "-l", "-s", key_path, "-m", tmp_path / "file").returncode == 0
    signature = (tmp_path / "file.minisig").read_text()
    assert base64.b64decode(signature.splitlines()[1])[:2] == b"Ed"
    public = PublicKey.load(pub_path)
    verify(data, signature, [public])
    verify_file(tmp_path / "file", signature, [public])
    with pytest.raises(BadSignature, match="bad signature"):
        verify(data + b"!", signature, [public])


def test_stock_unencrypted_secret_key_loads(stock_key: tuple[Path, Path]) -> None:
    pub_path, key_path = stock_key
    secret = SecretKey.load(key_path)
    assert secret.public_key == PublicKey.load(pub_path)
    assert secret.key_id == secret.public_key.key_id


def test_our_secret_key_signs_with_stock_minisign(tmp_path: Path, key: SecretKey) -> None:
    data = os.urandom(777)
    (tmp_path / "file").write_bytes(data)
    result = minisign("-S", "-s", tmp_path / "our.key", "-m", tmp_path / "file", "-t", "stock")
    assert result.returncode == 0, result.stderr
    assert verify(data, (tmp_path / "file.minisig").read_text(), [key.public_key]) == "stock"
    assert minisign("-V", "-p", tmp_path / "our.pub", "-m", tmp_path / "file").returncode == 0
    # minisign derives the same public key file from our secret key
    result = minisign("-R", "-s", tmp_path / "our.key", "-p", tmp_path / "derived.pub")
    assert result.returncode == 0, result.stderr
    assert PublicKey.load(tmp_path / "derived.pub") == key.public_key


def test_secret_key_round_trips_with_checksum(tmp_path: Path, key: SecretKey) -> None:
    loaded = SecretKey.load(tmp_path / "our.key")
    assert loaded == key
    assert key.seed.hex() not in repr(key)
    assert PublicKey.parse(key.public_key.base64()) == key.public_key


def test_secret_key_file_is_0600_and_not_overwritten(tmp_path: Path, key: SecretKey) -> None:
    path = tmp_path / "our.key"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    other = SecretKey.generate()
    with pytest.raises(ConfigError, match="refusing to overwrite"):
        other.save(path)
    assert SecretKey.load(path) == key
    other.save(path, overwrite=True)
    assert SecretKey.load(path) == other
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert sorted(p.name for p in tmp_path.iterdir()) == ["our.key", "our.pub"]


def test_secret_key_mode_ignores_umask(tmp_path: Path) -> None:
    old = os.umask(0)
    try:
        SecretKey.generate().save(tmp_path / "k")
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "k").stat().st_mode) == 0o600


def test_damaged_secret_key_is_refused(tmp_path: Path, key: SecretKey) -> None:
    lines = key.text().splitlines()
    raw = bytearray(base64.b64decode(lines[1]))
    raw[100] ^= 1  # inside sk: the checksum no longer matches
    (tmp_path / "bad.key").write_text(f"{lines[0]}\n{base64.b64encode(raw).decode()}\n")
    with pytest.raises(ConfigError, match="checksum mismatch") as info:
        SecretKey.load(tmp_path / "bad.key")
    assert str(tmp_path / "bad.key") in str(info.value)


# Made once by stock minisign, as its first line says: deriving the key from the password
# (scrypt) made this the slowest test when it ran on every run.
PASSWORD_KEY = Path(__file__).parent / "data" / "minisign-password.key"


def test_password_protected_key_is_refused_with_a_hint() -> None:
    with pytest.raises(ConfigError, match="password-protected") as info:
        SecretKey.load(PASSWORD_KEY)
    assert info.value.hint is not None and "-W" in info.value.hint


@pytest.mark.parametrize(
    "text, message",
    [
        ("", "no key line"),
        ("untrusted comment: x\n", "no key line"),
        ("untrusted comment: x\nnot base64!\n", "bad base64"),
        ("untrusted comment: x\n" + base64.b64encode(b"Ed" + bytes(39)).decode(), "bad base64"),
        ("untrusted comment: x\n" + base64.b64encode(b"XX" + bytes(40)).decode(), "algorithm"),
    ],
)
def test_malformed_public_keys(text: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message) as info:
        PublicKey.parse(text, "keys/broken.pub")
    assert "keys/broken.pub" in str(info.value)


def test_missing_key_file_names_it(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read") as info:
        PublicKey.load(tmp_path / "absent.pub")
    assert "absent.pub" in str(info.value)


def test_wrong_key_is_an_unknown_key_id(key: SecretKey) -> None:
    other = SecretKey.generate().public_key
    signature = key.sign(b"data", "c")
    with pytest.raises(BadSignature, match="unknown key") as info:
        verify(b"data", signature, [other], label="repo/index")
    message = str(info.value)
    assert key.key_id in message and other.key_id in message and "repo/index" in message


def test_same_key_id_but_another_key_is_a_bad_signature(key: SecretKey) -> None:
    impostor = PublicKey(key.keynum, SecretKey.generate().public_key.key)
    with pytest.raises(BadSignature, match="bad signature"):
        verify(b"data", key.sign(b"data", "c"), [impostor])


def test_several_trusted_keys(key: SecretKey) -> None:
    keys = [SecretKey.generate().public_key, key.public_key, SecretKey.generate().public_key]
    assert verify(b"d", key.sign(b"d", "ok"), keys) == "ok"
    with pytest.raises(BadSignature, match="trusted keys: none"):
        verify(b"d", key.sign(b"d", "ok"), [])


def test_tampered_data_is_a_bad_signature(key: SecretKey) -> None:
    with pytest.raises(BadSignature, match="bad signature: the data does not match"):
        verify(b"data!", key.sign(b"data", "c"), [key.public_key])


def test_tampered_trusted_comment_is_a_bad_global_signature(key: SecretKey) -> None:
    text = key.sign(b"data", "serial:41").replace("serial:41", "serial:42")
    with pytest.raises(BadSignature, match="bad global signature"):
        verify(b"data", text, [key.public_key])


def test_untrusted_comment_is_not_covered(key: SecretKey) -> None:
    text = key.sign(b"data", "t", untrusted_comment="one").replace("one", "two")
    assert verify(b"data", text, [key.public_key]) == "t"


@pytest.mark.parametrize("cut", [1, 40, 100, 150, 200, -30, -2])
def test_truncated_signature_is_malformed(key: SecretKey, cut: int) -> None:
    text = key.sign(b"data", "comment")
    with pytest.raises(BadSignature, match="malformed signature file"):
        verify(b"data", text[:cut], [key.public_key])


@pytest.mark.parametrize(
    "mangle",
    [
        lambda lines: ["comment: x", *lines[1:]],
        lambda lines: [lines[0], lines[1], "comment: x", lines[3]],
        lambda lines: [lines[0], lines[1][:-4], *lines[2:]],
        lambda lines: [lines[0], lines[1], lines[2], lines[3] + "AAAA"],
        lambda lines: [
            lines[0],
            base64.b64encode(b"Zz" + base64.b64decode(lines[1])[2:]).decode(),
            *lines[2:],
        ],
    ],
)
def test_mangled_signature_is_malformed(key: SecretKey, mangle: object) -> None:
    assert callable(mangle)
    lines = key.sign(b"data", "comment").splitlines()
    with pytest.raises(BadSignature, match="malformed"):
        verify(b"data", "\n".join(mangle(lines)) + "\n", [key.public_key])


def test_crlf_signature_file_verifies(key: SecretKey) -> None:
    text = key.sign(b"data", "comment").replace("\n", "\r\n")
    assert verify(b"data", text, [key.public_key]) == "comment"


@pytest.mark.parametrize("comment", ["two\nlines", "carriage\rreturn", "x" * 9000])
def test_unsignable_trusted_comments(key: SecretKey, comment: str) -> None:
    with pytest.raises(ValueError):
        key.sign(b"data", comment)


def test_a_signature_file_may_hold_several_signatures_during_a_key_rotation() -> None:
    old, new, stranger = SecretKey.generate(), SecretKey.generate(), SecretKey.generate()
    data = b"an index"
    both = old.sign(data, "serial:7") + new.sign(data, "serial:7")
    assert verify(data, both, [old.public_key]) == "serial:7"
    assert verify(data, both, [new.public_key]) == "serial:7"
    assert verify(data + b"\n", old.sign(data + b"\n", "c") + "trailing words\n", [old.public_key])
    with pytest.raises(BadSignature, match=f"unknown key {old.key_id}, {new.key_id}"):
        verify(data, both, [stranger.public_key])
    forged = old.sign(data, "serial:7") + new.sign(b"something else", "serial:7")
    with pytest.raises(BadSignature):
        verify(data, forged, [new.public_key])  # the trusted key's own signature must hold

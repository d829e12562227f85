"""Configuration: defaults, the file, flags on top, and errors that name the file."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from portsd.client.settings import load_settings
from portsd.config import CONFIG_NAME, Config, load_config
from portsd.errors import ConfigError

CONTRIB = Path(__file__).parent.parent / "contrib" / "portsd.toml.example"


def test_defaults_put_everything_under_the_state_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("PORTSD_SEED", raising=False)  # the test session shares one seed
    config = load_config(tmp_path)
    assert config == Config(state_dir=tmp_path)
    assert config.seed == tmp_path / "seed"
    assert config.repo == tmp_path / "repo" and config.distfiles == tmp_path / "distfiles"
    assert config.secret_key.parent == tmp_path / "keys" and config.listen == "127.0.0.1"


def test_a_seed_shared_by_several_states(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PORTSD_SEED", "/srv/seed")
    assert load_config(tmp_path).seed == Path("/srv/seed")
    (tmp_path / CONFIG_NAME).write_text('[build]\nseed = "../shared-seed"\n')
    assert load_config(tmp_path).seed == (tmp_path / "../shared-seed").resolve()


def test_file_then_flags(tmp_path: Path) -> None:
    (tmp_path / CONFIG_NAME).write_text(
        '[build]\njobs = 3\ntimeout = 60\n[sources]\nmirrors = ["/m"]\n[repository]\npath = "out"\n'
    )
    config = load_config(tmp_path, overrides={"jobs": 5, "arch": None})
    assert config.jobs == 5  # the flag wins
    assert config.build_timeout == 60.0 and config.mirrors == ("/m",)
    assert config.repo == tmp_path / "out"


def test_the_contrib_example_is_valid(tmp_path: Path) -> None:
    shutil.copy(CONTRIB, tmp_path / CONFIG_NAME)
    config = load_config(tmp_path)
    assert config.jobs == 4 and config.port == 8470 and config.branch == "main"
    assert config.tree_dir == tmp_path.parent
    assert (config.memory_limit, config.disk_limit) == (8 << 30, 40 << 30)


def test_limits_from_the_file_and_flags(tmp_path: Path) -> None:
    (tmp_path / CONFIG_NAME).write_text(
        '[build]\nmemory-limit = "2 GiB"\ndisk-limit = 1048576\nprocess-limit = 0\n'
    )
    config = load_config(tmp_path, overrides={"open_files_limit": 128})
    assert (config.memory_limit, config.disk_limit) == (2 << 30, 1 << 20)
    assert (config.process_limit, config.open_files_limit) == (0, 128)


@pytest.mark.parametrize(
    ("text", "where", "message"),
    [
        ("[build]\njobz = 1\n", ":2", "unknown key 'jobz' in [build]"),
        ("[bild]\njobs = 1\n", ":1", "unknown table [bild]"),
        ("# a comment\n[build]\njobs = 'two'\n", ":3", "[build] jobs must be int"),
        ("[build]\njobs = 0\n", "", "jobs and make-jobs must be at least 1"),
        (
            '[build]\nmemory-limit = "lots"\n',
            ":2",
            "[build] memory-limit must be a size (2 GiB, 512M, bytes)",
        ),
        ("[build]\nprocess-limit = -1\n", "", "limits must be at least 0 (0: no limit)"),
        ("[sources]\nmirrors = [1]\n", ":2", "[sources] mirrors must be a list of strings"),
        ("[build]\njobs = 1\n[build\n", ":3", "invalid TOML: unclosed table, expected `]`"),
    ],
)
def test_errors_name_the_file_and_line(tmp_path: Path, text: str, where: str, message: str) -> None:
    (tmp_path / CONFIG_NAME).write_text(text)
    with pytest.raises(ConfigError) as caught:
        load_config(tmp_path)
    assert str(caught.value) == f"{tmp_path / CONFIG_NAME}{where}: {message}"


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ('root = "/"\ncachez = []\n', "2: unknown setting 'cachez'"),
        ('root = "/"\n\ndiscover = "yes"\n', "3: 'discover' must be bool"),
        ('caches = ["http://a",\n', "1: invalid TOML: "),
    ],
)
def test_the_client_settings_read_the_same_way(tmp_path: Path, text: str, message: str) -> None:
    """One reader for both programs' files: the same file:line: message."""
    path = tmp_path / "ports.toml"
    path.write_text(text)
    with pytest.raises(ConfigError) as caught:
        load_settings(path)
    assert str(caught.value).startswith(f"{path}:{message}")


def test_an_explicit_missing_file_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="no such config file"):
        load_config(tmp_path, tmp_path / "nope.toml")


def test_named_mirrors_from_the_file_and_flags(tmp_path: Path) -> None:
    """``mirror.NAME`` in [sources] (dotted keys or a [sources.mirror] table); a flag
    replaces the places of its own name and keeps the others."""
    (tmp_path / CONFIG_NAME).write_text(
        '[sources]\nmirror.gnu = ["/srv/gnu", "https://m.example.org/gnu"]\n'
        'mirror.kde = ["/srv/kde"]\n'
    )
    config = load_config(tmp_path)
    assert config.named_mirrors == (
        ("gnu", ("/srv/gnu", "https://m.example.org/gnu")),
        ("kde", ("/srv/kde",)),
    )
    flagged = load_config(tmp_path, overrides={"named_mirrors": (("gnu", ("/elsewhere",)),)})
    assert flagged.named_mirrors == (("gnu", ("/elsewhere",)), ("kde", ("/srv/kde",)))

    (tmp_path / CONFIG_NAME).write_text('[sources.mirror]\ngnu = ["/srv/gnu"]\nkde = "/srv"\n')
    with pytest.raises(ConfigError) as caught:
        load_config(tmp_path)
    assert str(caught.value) == (
        f"{tmp_path / CONFIG_NAME}:1: [sources] mirror.kde must be a list of strings"
    )

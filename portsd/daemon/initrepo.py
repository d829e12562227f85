"""``portsd init DIR``: a bare ports repository ready to push to, with everything the
daemon needs beside it: hook, signing key, push token, commented config.

    DIR/                 the bare git repository (push here)
    DIR/hooks/post-receive   tells the daemon about each push
    DIR/portsd/          the daemon's state directory (config, keys, repo, logs...)
"""

from __future__ import annotations

import secrets
import shutil
from dataclasses import dataclass
from pathlib import Path

import pygit2

from portsd.build.pipeline import ensure_signing_key
from portsd.config import CONFIG_NAME, Config, load_config
from portsd.daemon.binding import bind_state
from portsd.daemon.instance import LOCK_NAME
from portsd.errors import ConfigError
from portsd.fsio import write_atomic

HOOKS = (
    Path(__file__).resolve().parents[2] / "hooks" / "post-receive",  # a source checkout
    Path("/usr/share/portsd/hooks/post-receive"),  # the portsd package
)
STATE_NAME = "portsd"

CONFIG_TEMPLATE = """\
# portsd configuration. Every setting has a default; uncomment to change one.
# Paths are relative to this directory.

[server]
tree = ".."                   # the git repository to follow (this bare repository)
# branch = "main"             # default: the branch HEAD names
# listen = "127.0.0.1"        # loopback by default; "0.0.0.0" or an address to serve the LAN
port = {port}
# idle-timeout = 15            # seconds a connection may take to send a request head
# max-connections = 1000       # at once; more get a 503
# max-connections-per-address = 256   # raise it behind a proxy

[build]
# jobs = 2                    # builds at once
# make-jobs = 8               # $JOBS inside a build (default: CPU count)
# timeout = 3600              # seconds before a build is killed
# arch = "x86_64"

[sources]
# mirrors = ["/srv/distfiles", "https://mirror.example.org/distfiles"]
# mirror.gnu = ["/srv/distfiles/gnu"]  # where recipe urls mirror://gnu/PATH point

[repository]
# path = "repo"               # the signed binary repository
# expires-days = 7            # clients refuse an older index; the daemon re-signs daily
# keep = 2                    # old packages kept per port besides the published one
# keep-days = 0               # and whatever was built within this many days
# keep-unlisted-minutes = 60  # a package that left the index stays downloadable this long
"""


@dataclass(frozen=True, slots=True)
class Initialised:
    repository: Path
    config: Config
    key_id: str


def state_of(repository: Path) -> Path:
    """Where ``portsd init`` put the state of ``repository``."""
    return repository / STATE_NAME


def init_repository(directory: Path, *, port: int = 8470) -> Initialised:
    """Create the bare repository and its daemon state; refuses a non-empty directory."""
    directory = directory.absolute()
    if directory.exists() and any(directory.iterdir()):
        raise ConfigError("exists and is not empty", path=str(directory))
    source = next((path for path in HOOKS if path.is_file()), None)
    if source is None:
        raise ConfigError("the post-receive hook is not installed", path=str(HOOKS[-1]))
    pygit2.init_repository(str(directory), bare=True, initial_head="main")
    state = state_of(directory)
    state.mkdir(mode=0o700)
    (state / CONFIG_NAME).write_text(CONFIG_TEMPLATE.format(port=port))
    config = load_config(state)
    bind_state(state, directory)
    write_atomic(config.token_file, secrets.token_urlsafe(32).encode() + b"\n", 0o600)
    key = ensure_signing_key(config)
    hook = directory / "hooks" / "post-receive"
    shutil.copyfile(source, hook)
    hook.chmod(0o755)
    git_config = pygit2.Repository(str(directory)).config
    git_config["portsd.lockfile"] = str(config.state_dir / LOCK_NAME)  # holds the daemon's URL
    git_config["portsd.tokenfile"] = str(config.token_file)
    return Initialised(directory, config, key.key_id)

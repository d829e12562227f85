"""Running the real daemon (`portsd serve`) in a subprocess for end-to-end tests."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

T = TypeVar("T")


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


def command_environment(home: str | None = None) -> dict[str, str]:
    """The whole environment of a `portsd` or `ports` the tests start: PATH, HOME, wide
    columns, and the test session's shared seed (a command left to itself would make a
    seed of its own in every state directory)."""
    environment = {
        "PATH": os.environ["PATH"],
        "HOME": home or os.environ.get("HOME", "/root"),
        "COLUMNS": "200",
    }
    if "PORTSD_SEED" in os.environ:
        environment["PORTSD_SEED"] = os.environ["PORTSD_SEED"]
    return environment


def portsd(*args: str | Path, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "portsd.cli.daemon", *map(str, args)],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=cwd,
        check=True,
    )


class RunningDaemon:
    """``portsd serve --repo REPO`` on a free loopback port, with its log in a file."""

    def __init__(self, repo: Path, log: Path, *extra: str) -> None:
        self.repo = repo
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = log
        self.extra = extra
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> RunningDaemon:
        with self.log.open("ab") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "portsd.cli.daemon", "serve", "--repo", str(self.repo)]
                + ["--port", str(self.port), *self.extra],
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                env=command_environment(),
            )
        self.wait_for(lambda: self.get("/api/v1/status"), timeout=30, what="the daemon to answer")
        return self

    def kill(self) -> None:
        """SIGKILL the daemon (only the daemon: its sandboxed builds die with it)."""
        assert self.process is not None
        os.kill(self.process.pid, signal.SIGKILL)
        self.process.wait(timeout=30)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()

    def get(self, path: str) -> Any:
        """JSON from the API, or None if the daemon does not answer (yet)."""
        try:
            with urllib.request.urlopen(self.url + path, timeout=5) as response:
                return json.load(response)
        except (OSError, urllib.error.URLError, json.JSONDecodeError):
            return None

    def raw(self, path: str, headers: dict[str, str] | None = None) -> tuple[int, bytes]:
        request = urllib.request.Request(self.url + path, headers=headers or {})
        try:
            with urllib.request.urlopen(request, timeout=10) as response:
                return response.status, response.read()
        except urllib.error.HTTPError as error:
            return error.code, error.read()

    def post(self, path: str, body: bytes, headers: dict[str, str]) -> int:
        return self.send("POST", path, body, headers)

    def send(self, method: str, path: str, body: bytes, headers: dict[str, str]) -> int:
        """The status of ``method path`` with ``body``."""
        request = urllib.request.Request(self.url + path, data=body, headers=headers, method=method)
        try:
            with urllib.request.urlopen(request, timeout=10) as response:
                return int(response.status)
        except urllib.error.HTTPError as error:
            return error.code

    def builds(self, **filters: object) -> list[dict[str, Any]]:
        query = "&".join(f"{k}={v}" for k, v in filters.items())
        data = self.get(f"/api/v1/builds?limit=1000&{query}")
        assert data is not None, "the daemon does not answer"
        return list(data["builds"] if isinstance(data, dict) else data)

    def idle_at(self, commit: str) -> bool:
        """The newest commit is evaluated and nothing is queued, running or waiting for a
        build to know its key (pending)."""
        status = self.get("/api/v1/status")
        return bool(
            status
            and status.get("evaluated") == commit
            and not status.get("evaluating")
            and status.get("queued") == 0
            and not status.get("running")
            and status.get("pending") == 0
        )

    def wait_idle(self, commit: str, timeout: float = 180) -> None:
        try:
            self.wait_for(
                lambda: self.idle_at(commit),
                timeout=timeout,
                what=f"the daemon to finish {commit[:10]}",
            )
        except AssertionError as error:  # say where it stands, not only that it is late
            status = json.dumps(self.get("/api/v1/status"), indent=1)
            builds = json.dumps(self.get("/api/v1/builds?limit=30"), indent=1)
            raise AssertionError(f"{error}\nstatus: {status}\nbuilds: {builds}") from None

    def wait_for(self, condition: Callable[[], T], *, timeout: float, what: str) -> T:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            value = condition()
            if value:
                return value
            if self.process is not None and self.process.poll() is not None:
                raise AssertionError(
                    f"the daemon exited while waiting for {what}:\n{self.log.read_text()}"
                )
            time.sleep(0.1)
        raise AssertionError(
            f"timed out waiting for {what}; daemon log:\n{self.log.read_text()[-4000:]}"
        )

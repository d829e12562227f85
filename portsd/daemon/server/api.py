"""The JSON API, ``/api/v1/...``: status, builds and their logs, events, the substituter
query, and the two authenticated triggers.

    GET  /api/v1/status                  engine status and build counts by state
    GET  /api/v1/problems                failing, skipped and blocked ports; recent fixes
    GET  /api/v1/builds                  ?state=S[,S]&port=P&evaluation=N&limit=N, newest first
    GET  /api/v1/builds/{id}             one build and its evaluation
    GET  /api/v1/builds/{id}/log         text/plain; ?follow=1 streams until the build ends
    GET  /api/v1/events                  server-sent events of the engine's event bus
    GET  /api/v1/keys/{key}              the package built with a build key, or 404
    POST /api/v1/push                    from hooks/post-receive: "old new ref" lines -> 202
    POST /api/v1/rebuild                 {"ports": [names]} -> 202

Every answer is JSON except logs and events; every error is ``{"error": "..."}`` with its
status (``api_errors`` turns aiohttp's own 404, 405, 413 into that shape, and an unexpected
exception into a 500 whose details go to the log, never to the client). The two POST routes
need ``Authorization: Bearer <token>``, the token being the content of ``config.token_file``
(read at each request, so it can be rotated; compared in constant time; a missing or empty
file refuses everyone). Their bodies are read with a bound far below ``client_max_size``.
Everything that touches sqlite, git or files runs on a worker thread.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import os
import re
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, NoReturn

from aiohttp import web

from portsd.config import Config
from portsd.core.index import IndexEntry, entry_map
from portsd.core.recipe import NAME_PATTERN
from portsd.daemon.engine import ClusterStatus, Engine, EngineStatus
from portsd.daemon.problems import Problem, Problems
from portsd.daemon.server.streams import EVENT_HEADERS, TEXT_HEADERS, Streams, send_events, send_log
from portsd.daemon.state import BuildRow, BuildState, EvaluationRow
from portsd.errors import RepoError

log = logging.getLogger(__name__)

PREFIX = "/api/v1"
MAX_BODY = 64 * 1024
"""Bytes of a push or rebuild body: a push of 500 refs is 50 KiB."""
MAX_LIMIT = 1000
DEFAULT_LIMIT = 100
MAX_PORTS = 10_000

_KEY = re.compile(r"[0-9a-f]{64}")
_OBJECT = re.compile(r"[0-9a-f]{40}|[0-9a-f]{64}")  # sha1 or sha256 repositories
_REF = re.compile(r"refs/[\x21-\x7e]{1,1000}")
_ID = re.compile(r"[0-9]{1,18}")
_JSON = "application/json"


# -- JSON shapes ---------------------------------------------------------------------------


def build_json(row: BuildRow) -> dict[str, Any]:
    return {
        "id": row.id,
        "evaluation": row.evaluation,
        "port": row.port,
        "version": row.version,
        "key": row.key,
        "state": row.state.value,
        "reason": row.reason,
        "detail": row.detail,
        "queued": row.queued,
        "started": row.started,
        "finished": row.finished,
        "duration": row.duration,
        "log": f"{PREFIX}/builds/{row.id}/log" if row.log is not None else None,
        "toolchain": row.toolchain,
    }


def evaluation_json(row: EvaluationRow) -> dict[str, Any]:
    return {
        "id": row.id,
        "revision": row.revision,
        "branch": row.branch,
        "trigger": row.trigger,
        "created": row.created,
        "finished": row.finished,
        "planned": row.planned,
        "blocked": row.blocked,
        "error": row.error,
    }


def status_json(status: EngineStatus, counts: dict[BuildState, int]) -> dict[str, Any]:
    return {
        "branch": status.branch,
        "head": status.head,
        "evaluated": status.evaluated,
        "evaluation": status.evaluation,
        "evaluating": status.evaluating,
        "queued": status.queued,
        "running": [
            {"build": build_json(item.build), "step": item.step} for item in status.running
        ],
        "eta": status.eta,
        "blocked": status.blocked,
        "seed": status.seed,
        "pending": status.pending,
        "cut_off": list(status.cut_off),
        "toolchain": status.toolchain,
        "counts": {state.value: n for state, n in counts.items()},
        "cluster": cluster_json(status.cluster),
    }


def cluster_json(cluster: ClusterStatus | None) -> dict[str, Any] | None:
    """The builders on a cluster; None when builds run on the daemon's machine."""
    if cluster is None:
        return None
    return {
        "scheduler": cluster.scheduler,
        "dashboard": cluster.dashboard.link,
        "no_dashboard": cluster.dashboard.missing,
        "workers": [
            {
                "name": worker.name,
                "address": worker.address,
                "running": list(worker.running),
                "done": worker.done,
                "last_seen": round(worker.last_seen, 1),
            }
            for worker in cluster.workers
        ],
        "disagreements": [
            {"message": message, "workers": list(workers), "files": list(files)}
            for message, workers, files in cluster.disagreements
        ],
    }


def problem_json(problem: Problem) -> dict[str, Any]:
    return {
        "port": problem.port,
        "reason": problem.reason,
        "newly": problem.newly,
        "build": build_json(problem.build) if problem.build is not None else None,
    }


def problems_json(problems: Problems) -> dict[str, Any]:
    return {
        "ports": problems.ports,
        "published": problems.published,
        "failed": [problem_json(p) for p in problems.failed],
        "skipped": [problem_json(p) for p in problems.skipped],
        "blocked": [problem_json(p) for p in problems.blocked],
        "fixed": [build_json(row) for row in problems.fixed],
    }


def entry_json(entry: IndexEntry) -> dict[str, Any]:
    return entry_map(entry)  # the index's own map: one encoding of an entry


def json_response(data: Any, status: int = 200) -> web.Response:
    return web.Response(
        text=json.dumps(data, separators=(",", ":")),
        status=status,
        content_type=_JSON,
        headers={"Cache-Control": "no-store"},
    )


def json_error(status: int, message: str, headers: dict[str, str] | None = None) -> web.Response:
    response = json_response({"error": message}, status)
    response.headers.update(headers or {})
    return response


class _Refused(Exception):
    """A request the API refuses: raised by handlers, answered by ``api_errors``."""

    def __init__(self, status: int, message: str, headers: dict[str, str] | None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.headers = headers or {}


def fail(status: int, message: str, headers: dict[str, str] | None = None) -> NoReturn:
    raise _Refused(status, message, headers)


Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@web.middleware
async def api_errors(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Under ``/api/``: every error as JSON, no traceback to the client."""
    if not request.path.startswith("/api/"):
        return await handler(request)
    try:
        return await handler(request)
    except _Refused as refused:
        return json_error(refused.status, refused.message, refused.headers)
    except web.HTTPException as error:
        if error.status < 400:
            raise
        keep = {k: v for k, v in error.headers.items() if k in ("Allow", "WWW-Authenticate")}
        text = error.text or ""
        default = f"{error.status}: {error.reason}"
        message = error.reason.lower() if not text or text == default else text
        return json_error(error.status, message, keep)
    except ConnectionError:
        raise
    except Exception:
        log.exception("%s %s failed", request.method, request.path)
        return json_error(500, "internal error (see the daemon's log)")


# -- routes --------------------------------------------------------------------------------


class Api:
    """The ``/api/v1`` routes of one application."""

    def __init__(self, config: Config, engine: Engine, streams: Streams) -> None:
        self.config = config
        self.engine = engine
        self.streams = streams

    async def status(self, _request: web.Request) -> web.Response:
        status, counts = await asyncio.to_thread(
            lambda: (self.engine.status(), self.engine.state.counts())
        )
        return json_response(status_json(status, counts))

    async def problems(self, _request: web.Request) -> web.Response:
        problems = await asyncio.to_thread(self.engine.problems)
        return json_response(problems_json(problems))

    async def builds(self, request: web.Request) -> web.Response:
        query = request.query
        states: list[BuildState] = []
        for value in query.getall("state", []):
            for name in filter(None, value.split(",")):
                try:
                    states.append(BuildState(name))
                except ValueError:
                    known = ", ".join(state.value for state in BuildState)
                    fail(400, f"state: unknown state {name!r} (one of {known})")
        port = query.get("port")
        if port is not None and not NAME_PATTERN.fullmatch(port):
            fail(400, f"port: not a port name: {port!r}")
        evaluation = _integer(query, "evaluation", None, 1, 1 << 62)
        limit = _integer(query, "limit", DEFAULT_LIMIT, 1, MAX_LIMIT)
        assert limit is not None
        rows = await asyncio.to_thread(
            self.engine.state.builds, states=states, evaluation=evaluation, port=port, limit=limit
        )
        return json_response({"builds": [build_json(row) for row in rows]})

    async def build(self, request: web.Request) -> web.Response:
        build = _build_id(request)
        row, evaluation = await asyncio.to_thread(self._build_and_evaluation, build)
        if row is None:
            fail(404, f"no build {build}")
        return json_response(
            {
                "build": build_json(row),
                "evaluation": evaluation_json(evaluation) if evaluation is not None else None,
            }
        )

    def _build_and_evaluation(self, build: int) -> tuple[BuildRow | None, EvaluationRow | None]:
        row = self.engine.state.build(build)
        return row, (self.engine.state.evaluation(row.evaluation) if row is not None else None)

    async def build_log(self, request: web.Request) -> web.StreamResponse:
        build = _build_id(request)
        follow = request.query.get("follow", "0") not in ("0", "", "false", "no")
        row = await asyncio.to_thread(self.engine.state.build, build)
        if row is None:
            fail(404, f"no build {build}")
        path = self.log_path(row.log)
        if not follow or not row.state.active:
            if path is None or not await asyncio.to_thread(path.is_file):
                fail(404, f"build {build} has no log")
            follow = False
        response = web.StreamResponse(headers=TEXT_HEADERS)
        await response.prepare(request)
        try:
            await send_log(
                request, response, self.streams, self.engine, build, path, self.log_path,
                follow=follow,
            )  # fmt: skip
            await response.write_eof()
        except ConnectionError:
            pass  # the reader went away: nothing to finish
        except Exception:  # the headers are sent: end the stream, never answer twice
            log.exception("following the log of build %d failed", build)
            _abort(request)
        return response

    def log_path(self, value: str | None) -> Path | None:
        """The log file a build row names, if it is inside the logs directory."""
        if value is None:
            return None
        logs = os.path.normpath(self.config.logs)
        path = os.path.normpath(os.path.join(logs, value))  # an absolute value stays itself
        if os.path.commonpath([logs, path]) != logs or path == logs:
            log.warning("refusing to serve a log outside %s: %s", logs, value)
            return None
        return Path(path)

    async def events(self, request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers=EVENT_HEADERS)
        await response.prepare(request)
        try:
            await send_events(request, response, self.streams, self.engine)
            await response.write_eof()
        except ConnectionError:
            pass
        except Exception:
            log.exception("the event stream failed")
            _abort(request)
        return response

    async def key(self, request: web.Request) -> web.Response:
        key = request.match_info["key"]
        if not _KEY.fullmatch(key):
            fail(400, "not a build key: expected 64 lowercase hex digits")
        try:
            entry = await asyncio.to_thread(self.engine.repo.find_key, key)
        except RepoError as error:
            log.error("substituter query for %s: %s", key, error)
            fail(503, "the repository cannot be read")
        if entry is None:
            fail(404, f"no package has build key {key}")
        url = f"/repo/{self.engine.repo.arch}/packages/{entry.file}"
        return json_response(
            {"key": key, "package": entry_json(entry), "url": url, "signature": url + ".minisig"}
        )

    async def push(self, request: web.Request) -> web.Response:
        self._authorize(request)
        body = await _read_body(request, self.config.max_request_bytes)
        refs = []
        for number, line in enumerate(_text(body).splitlines(), 1):
            if not line.strip():
                continue
            parts = line.split()
            if (
                len(parts) != 3
                or not _OBJECT.fullmatch(parts[0])
                or not _OBJECT.fullmatch(parts[1])
                or not _REF.fullmatch(parts[2])
            ):
                fail(400, f"line {number}: expected '<old> <new> <ref>' as git's post-receive")
            refs.append({"old": parts[0], "new": parts[1], "ref": parts[2]})
        log.info("push: %s", ", ".join(ref["ref"] for ref in refs) or "(no refs listed)")
        self.engine.trigger("hook")
        return json_response({"triggered": True, "refs": refs}, 202)

    async def rebuild(self, request: web.Request) -> web.Response:
        self._authorize(request)
        body = await _read_body(request, self.config.max_request_bytes)
        try:
            data = json.loads(body)
        except (ValueError, UnicodeDecodeError):
            fail(400, 'expected JSON: {"ports": ["name", ...]}')
        ports = data.get("ports") if isinstance(data, dict) else None
        if (
            not isinstance(ports, list)
            or not ports
            or len(ports) > MAX_PORTS
            or not all(isinstance(p, str) and NAME_PATTERN.fullmatch(p) for p in ports)
        ):
            fail(400, f'expected {{"ports": [...]}}: 1 to {MAX_PORTS} port names')
        names = list(dict.fromkeys(ports))
        accepted = await asyncio.to_thread(self.engine.rebuild, names)
        return json_response({"requested": names, "accepted": list(accepted)}, 202)

    def _authorize(self, request: web.Request) -> None:
        """401 unless the request carries the hook's bearer token."""
        scheme, _, presented = request.headers.get("Authorization", "").partition(" ")
        if scheme.lower() == "bearer" and presented.strip():
            try:
                expected = self.config.token_file.read_bytes().strip()
            except OSError as error:
                log.warning("no token, refusing %s: %s", request.path, error)
                expected = b""
            given = presented.strip().encode("utf-8", "surrogateescape")
            if expected and hmac.compare_digest(given, expected):
                return
        fail(401, "a valid bearer token is required", {"WWW-Authenticate": "Bearer"})


def _abort(request: web.Request) -> None:
    """Cut a response short: its client must not take a truncated body for a whole one."""
    if request.transport is not None:
        request.transport.abort()


def _build_id(request: web.Request) -> int:
    value = request.match_info["id"]
    if not _ID.fullmatch(value):
        fail(404, f"no build {value!r}")
    return int(value)


def _integer(
    query: Any, name: str, default: int | None, low: int, high: int
) -> int | None:  # fmt: skip
    value = query.get(name)
    if value is None:
        return default
    if not _ID.fullmatch(value) or not low <= int(value) <= high:
        fail(400, f"{name}: expected an integer from {low} to {high}, got {value!r}")
    return int(value)


def _text(body: bytes) -> str:
    try:
        return body.decode("utf-8")
    except UnicodeDecodeError:
        fail(400, "the body is not UTF-8")


async def _read_body(request: web.Request, client_max_size: int) -> bytes:
    """The request body, or 413 past ``MAX_BODY`` (or ``client_max_size``) bytes; a declared
    Content-Length is checked before anything is read."""
    limit = min(MAX_BODY, client_max_size)
    too_large = f"the body is larger than {limit} bytes"
    if request.content_length is not None and request.content_length > limit:
        fail(413, too_large)
    chunks: list[bytes] = []
    size = 0
    while chunk := await request.content.read(limit + 1 - size):
        chunks.append(chunk)
        size += len(chunk)
        if size > limit:
            fail(413, too_large)
    return b"".join(chunks)

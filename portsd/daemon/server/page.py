"""The status page: ``GET /``, its static files and the fragments that keep it live.

The page is complete server-rendered HTML (Jinja2, autoescaped), readable without
JavaScript. ``static/page.js`` only enhances it: it listens to the API's event stream
(route ``api-events``, ``/api/v1/events``) and, on an event, fetches the sections the event
may have changed from ``/ui/fragments`` and swaps them in; and it follows each running
build's log (route ``api-build-log``, ``/api/v1/builds/<id>/log?follow=1``) into its
``<pre>``.

Routes (added by ``setup``):

    GET /                      the page; ``?history=N`` starts the build history at N
    GET /static/{file}         page.css, page.js (URLs carry a content hash)
    GET /ui/fragments          ?sections=status,plan,... -> {"status": "<section ...>", ...}
    GET /ui/graph.svg          the plan's dependency graph alone (404 when it is a list)
    GET /port/{name}           one port: its current problem, its builds, how to retry
    GET /key.pub               the repository's public signing key

Every engine view (the daemon's ``status()`` and ``plan_graph()`` read its database), log
read and template rendering runs in a worker thread; the event loop only routes.
"""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from aiohttp import web
from jinja2 import Environment, FileSystemLoader, StrictUndefined, select_autoescape

from portsd.config import Config
from portsd.core.recipe import NAME_PATTERN
from portsd.daemon.engine import Engine, EngineStatus, PlanGraph, Running
from portsd.daemon.problems import Problem, Problems, one_line
from portsd.daemon.server.appkeys import CONFIG, ENGINE
from portsd.daemon.server.graphview import (
    BLOCKED,
    COLOURS,
    Drawing,
    GraphView,
    node_state,
    state_class,
)
from portsd.daemon.state import BuildRow, BuildState, EvaluationRow, State
from portsd.errors import PortsdError
from portsd.fsio import file_sha256
from portsd.pkg.sign import PublicKey

_HERE = Path(__file__).parent
TEMPLATES = _HERE / "templates"
STATIC = _HERE / "static"

SECTIONS = ("status", "running", "plan", "graph", "failures", "history")
"""The page's live sections: each is a ``<section id=NAME>`` and a fragment."""

PLAN_LIMIT = 200  # queued builds listed (the count says how many more)
FAILURE_LIMIT = 10  # recent failures shown with their log tails
TAIL_LINES = 40  # lines of a log shown inline
TAIL_BYTES = 64 * 1024  # read from the end of a log to find them
HISTORY_PAGE = 50
HISTORY_EVALUATIONS = 20
MAX_HISTORY_OFFSET = 10_000  # State.builds has no cursor: deeper pages cost a longer read

FINISHED = tuple(state for state in BuildState if not state.active)
_ANSI = re.compile(r"\x1b\[[0-9;?]*[ -/]*[@-~]")

_HTML_HEADERS = {
    # Defence in depth behind autoescaping: no inline script can run, whatever a port name,
    # reason or log line holds. The page's own script and style are files under /static/.
    "Content-Security-Policy": (
        "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
        "object-src 'none'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'"
    ),
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "same-origin",
    "Cache-Control": "no-store",
}


@dataclass(frozen=True, slots=True)
class LogTail:
    """The last lines of a log; ``cut``: earlier lines exist; ``missing``: no such file."""

    lines: tuple[str, ...] = ()
    cut: bool = False
    missing: bool = False

    @property
    def text(self) -> str:
        return "\n".join(self.lines)


@dataclass(frozen=True, slots=True)
class Links:
    """URLs of the JSON API's routes the page points the browser to, by route name."""

    router: web.UrlDispatcher

    @property
    def events(self) -> str:
        return str(self.router["api-events"].url_for())

    def log(self, build: int, *, follow: bool = False) -> str:
        url = self.router["api-build-log"].url_for(id=str(build))
        return str(url.with_query(follow="1") if follow else url)


@dataclass(frozen=True, slots=True)
class RunningView:
    build: BuildRow
    step: str
    tail: LogTail


@dataclass(frozen=True, slots=True)
class FailureView:
    problem: Problem
    tail: LogTail

    @property
    def build(self) -> BuildRow:
        assert self.problem.build is not None
        return self.problem.build


@dataclass(frozen=True, slots=True)
class RunBar:
    """poudriere's top line, for the builds the latest evaluation queued."""

    queued: int
    built: int
    failed: int
    skipped: int
    remaining: int  # queued or running now
    elapsed: float  # since the evaluation began, until the last build ended


@dataclass(frozen=True, slots=True)
class UseBox:
    """How a client machine uses this repository: its URL and the key that signs it."""

    url: str
    key_id: str | None  # None: no signing key yet


def read_tail(path: Path, lines: int = TAIL_LINES, max_bytes: int = TAIL_BYTES) -> LogTail:
    """The last ``lines`` lines of the log at ``path`` (blocking; reads at most ``max_bytes``),
    decoded leniently and without terminal colour codes."""
    try:
        with path.open("rb") as file:
            size = file.seek(0, 2)
            start = max(0, size - max_bytes)
            file.seek(start)
            data = file.read(max_bytes)
    except FileNotFoundError:
        return LogTail(missing=True)
    text = _ANSI.sub("", data.decode("utf-8", "replace"))
    found = text.splitlines()
    if start > 0 and found:
        found = found[1:]  # the first line was cut by the seek
    return LogTail(tuple(found[-lines:]), cut=start > 0 or len(found) > lines)


def duration(seconds: float | None) -> str:
    """``0.29 s``, ``4.1 s``, ``12 s``, ``3 min 05 s``, ``2 h 03 min``; an em dash for
    unknown. Below ten seconds the fractions matter: most builds of a small port take one."""
    if seconds is None:
        return "—"
    if seconds < 0.995:
        return f"{max(seconds, 0.0):.2f} s"
    if seconds < 9.95:
        return f"{seconds:.1f} s"
    whole = max(0, round(seconds))
    if whole < 60:
        return f"{whole} s"
    minutes, secs = divmod(whole, 60)
    if minutes < 60:
        return f"{minutes} min {secs:02d} s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes:02d} min"


def _when(timestamp: float | None) -> str:
    if timestamp is None:
        return "—"
    return time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(timestamp))


def _iso(timestamp: float | None) -> str:
    if timestamp is None:
        return ""
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(timestamp))


def _result(evaluation: EvaluationRow, outcomes: dict[BuildState, int]) -> tuple[str, str]:
    """An evaluation's result and its badge's state: done only when every build it queued
    was built (or nothing was queued)."""
    if evaluation.error:
        return "error", "failed"
    if evaluation.finished is None:
        return "evaluating", "running"
    active = outcomes.get(BuildState.QUEUED, 0) + outcomes.get(BuildState.RUNNING, 0)
    failed = outcomes.get(BuildState.FAILED, 0)
    skipped = outcomes.get(BuildState.SKIPPED, 0)
    parts = [
        f"{n} {state.value}"
        for state in (BuildState.FAILED, BuildState.SKIPPED, BuildState.CANCELLED)
        if (n := outcomes.get(state, 0))
    ]
    if active:
        return f"building ({active} to go)", "running"
    if failed or skipped:
        return "done with failures: " + ", ".join(parts), "failed"
    return "done", "built"


def _short(commit: str | None) -> str:
    return commit[:12] if commit else "—"


def _first_line(text: str | None) -> str:
    return (text or "").strip().split("\n", 1)[0]


def _eta(status: EngineStatus) -> str:
    if not status.queued and not status.running:
        return "idle"
    if status.eta is None:
        return "unknown"
    return f"about {duration(status.eta)}"


class Page:
    """Renders the page and its fragments for one application; owns the template
    environment, the static files' versioned URLs and the graph cache."""

    def __init__(
        self,
        config: Config,
        engine: Engine,
        router: web.UrlDispatcher,
        graphs: GraphView | None = None,
    ) -> None:
        self.config = config
        self.engine = engine
        self.graphs = graphs or GraphView()
        self.links = Links(router)
        self._static = {
            path.name: f"/static/{path.name}?v={file_sha256(path)[:12]}"
            for path in sorted(STATIC.iterdir())
            if path.is_file()
        }
        self._templates = Environment(
            loader=FileSystemLoader(TEMPLATES),
            autoescape=select_autoescape(default=True, default_for_string=True),
            undefined=StrictUndefined,
            trim_blocks=True,
            lstrip_blocks=True,
        )
        self._templates.filters.update(
            when=_when,
            iso=_iso,
            short=_short,
            duration=duration,
            first_line=_first_line,
            reason=lambda text, port: one_line(port, text),
            node_state=node_state,
            state_class=state_class,
        )
        self._templates.globals.update(static=self._static.__getitem__, colours=COLOURS)

    # -- routes --------------------------------------------------------------------------

    async def index(self, request: web.Request) -> web.Response:
        offset = _history_offset(request)
        status, graph, drawing = await self._views(SECTIONS)
        use = await asyncio.to_thread(self._use_box, f"{request.scheme}://{request.host}")
        html = await asyncio.to_thread(self._render_page, status, graph, drawing, offset, use)
        return web.Response(text=html, content_type="text/html", headers=_HTML_HEADERS)

    async def port(self, request: web.Request) -> web.Response:
        """``/port/NAME``: one port's current problem, its builds, the end of its last failed
        build's log, and how to retry it."""
        name = request.match_info["name"]
        if not NAME_PATTERN.fullmatch(name):
            raise web.HTTPNotFound(text=f"not a port name: {name!r}")
        html = await asyncio.to_thread(self._render_port, name)
        if html is None:
            raise web.HTTPNotFound(text=f"no builds of {name} and no such port")
        return web.Response(text=html, content_type="text/html", headers=_HTML_HEADERS)

    async def public_key(self, _request: web.Request) -> web.Response:
        """``/key.pub``: the public key that signs the repository, for clients to trust
        (after comparing its id with the one the build host's operator gives them)."""
        try:
            text = await asyncio.to_thread(self.config.public_key.read_text)
        except FileNotFoundError:
            raise web.HTTPNotFound(text="no signing key yet") from None
        return web.Response(
            text=text, content_type="text/plain", headers={"Cache-Control": "no-cache"}
        )

    async def fragments(self, request: web.Request) -> web.Response:
        wanted = [name for name in request.query.get("sections", "").split(",") if name]
        unknown = sorted(set(wanted) - set(SECTIONS))
        if not wanted or unknown:
            raise web.HTTPBadRequest(
                text=f"sections: name some of {', '.join(SECTIONS)}"
                + (f" (unknown: {', '.join(unknown)})" if unknown else "")
            )
        offset = _history_offset(request)
        status, graph, drawing = await self._views(wanted)
        parts = await asyncio.to_thread(
            self._render_sections, wanted, status, graph, drawing, offset
        )
        return web.json_response(parts, headers={"Cache-Control": "no-store"})

    async def _views(
        self, names: Iterable[str]
    ) -> tuple[EngineStatus, PlanGraph | None, Drawing | None]:
        """The engine's views the sections ``names`` need. The daemon builds them from the
        database, so they are asked for on a worker thread."""
        wanted = set(names)
        status = await asyncio.to_thread(self.engine.status)
        graph = None
        if wanted & {"plan", "graph"}:
            graph = await asyncio.to_thread(self.engine.plan_graph)
        drawing = await self.graphs.draw(graph) if graph is not None and "graph" in wanted else None
        return status, graph, drawing

    async def graph_svg(self, request: web.Request) -> web.Response:
        drawing = await self.graphs.draw(await asyncio.to_thread(self.engine.plan_graph))
        if drawing.svg is None:
            raise web.HTTPNotFound(text=f"no drawing: {drawing.note}")
        return web.Response(
            text=drawing.svg,
            content_type="image/svg+xml",
            headers={"Content-Security-Policy": "default-src 'none'", "Cache-Control": "no-store"},
        )

    # -- rendering (worker threads) -------------------------------------------------------

    def _render_page(
        self,
        status: EngineStatus,
        graph: PlanGraph | None,
        drawing: Drawing | None,
        offset: int,
        use: UseBox,
    ) -> str:
        context = self._context(SECTIONS, status, graph, drawing, offset)
        context["use"] = use
        return self._templates.get_template("page.html").render(context)

    def _use_box(self, url: str) -> UseBox:
        try:
            key_id: str | None = PublicKey.load(self.config.public_key).key_id
        except (OSError, PortsdError):
            key_id = None
        return UseBox(url, key_id)

    def _render_port(self, name: str) -> str | None:
        builds = self.engine.state.builds(port=name, limit=HISTORY_PAGE)
        problems = self.engine.problems()
        problem = next(
            (p for kind in (problems.failed, problems.skipped, problems.blocked) for p in kind
             if p.port == name),
            None,
        )  # fmt: skip
        if not builds and problem is None:
            return None
        failed = next((b for b in builds if b.state is BuildState.FAILED), None)
        return self._templates.get_template("port.html").render(
            name=name,
            builds=builds,
            problem=problem,
            failing=problem is not None and problem in problems.failed,
            failed=failed,
            tail=self._tail(failed) if failed is not None else None,
            links=self.links,
        )

    def _render_sections(
        self,
        names: Sequence[str],
        status: EngineStatus,
        graph: PlanGraph | None,
        drawing: Drawing | None,
        offset: int,
    ) -> dict[str, str]:
        context = self._context(names, status, graph, drawing, offset)
        return {
            name: self._templates.get_template(f"{name}.html").render(context) for name in names
        }

    def _context(
        self,
        names: Iterable[str],
        status: EngineStatus,
        graph: PlanGraph | None,
        drawing: Drawing | None,
        offset: int,
    ) -> dict[str, Any]:
        """What the templates of ``names`` need (blocking: reads the database and logs)."""
        state = self.engine.state
        wanted = set(names)
        context: dict[str, Any] = {
            "status": status,
            "links": self.links,
            "eta": _eta(status),
            "title": f"portsd: {len(status.running)} running, {status.queued} queued",
        }
        if wanted & {"status", "plan"}:
            context["latest"] = state.latest_evaluation()
        if "status" in wanted:
            context["bar"] = _bar(state, status, context["latest"])
        if "running" in wanted:
            context["running"] = [self._running(item) for item in status.running]
        if "plan" in wanted:
            queued = state.builds(states=[BuildState.QUEUED], limit=PLAN_LIMIT)
            context["queued"] = sorted(queued, key=lambda build: build.id)
            nodes = graph.nodes if graph is not None else ()
            context["blocked"] = [n for n in nodes if node_state(n) == BLOCKED][:PLAN_LIMIT]
        if "graph" in wanted:
            context["drawing"] = drawing
        if "failures" in wanted:
            problems: Problems = self.engine.problems()
            views = [
                FailureView(p, self._tail(p.build) if n < FAILURE_LIMIT else LogTail(missing=True))
                for n, p in enumerate(problems.failed)
                if p.build is not None
            ]
            context["problems"] = problems
            context["newly"] = [view for view in views if view.problem.newly]
            context["still"] = [view for view in views if not view.problem.newly]
        if "history" in wanted:
            rows = state.builds(states=FINISHED, limit=offset + HISTORY_PAGE + 1)
            evaluations = state.evaluations(limit=HISTORY_EVALUATIONS)
            outcomes = state.evaluation_outcomes([e.id for e in evaluations])
            context["evaluations"] = [(e, _result(e, outcomes.get(e.id, {}))) for e in evaluations]
            context["history"] = rows[offset : offset + HISTORY_PAGE]
            context["offset"] = offset
            context["newer"] = max(0, offset - HISTORY_PAGE) if offset else None
            more = len(rows) > offset + HISTORY_PAGE and offset + HISTORY_PAGE <= MAX_HISTORY_OFFSET
            context["older"] = offset + HISTORY_PAGE if more else None
        return context

    def _running(self, item: Running) -> RunningView:
        return RunningView(item.build, item.step, self._tail(item.build))

    def _tail(self, build: BuildRow) -> LogTail:
        if build.log is None:
            return LogTail(missing=True)
        return read_tail(self._log_path(build))

    def _log_path(self, build: BuildRow) -> Path:
        assert build.log is not None
        path = Path(build.log)
        return path if path.is_absolute() else self.config.logs / path


def _bar(state: State, status: EngineStatus, latest: EvaluationRow | None) -> RunBar | None:
    if latest is None:
        return None
    counts = state.evaluation_outcomes([latest.id]).get(latest.id, {})
    remaining = status.queued + len(status.running)
    end = time.time()
    if not remaining and latest.finished is not None:
        end = state.last_finished(latest.id) or latest.finished
    return RunBar(
        queued=sum(counts.values()),
        built=counts.get(BuildState.BUILT, 0),
        failed=counts.get(BuildState.FAILED, 0),
        skipped=counts.get(BuildState.SKIPPED, 0),
        remaining=remaining,
        elapsed=max(0.0, end - latest.created),
    )


def _history_offset(request: web.Request) -> int:
    try:
        offset = int(request.query.get("history", "0"))
    except ValueError:
        raise web.HTTPBadRequest(text="history: a number of builds to skip") from None
    return min(max(offset, 0), MAX_HISTORY_OFFSET)


PAGE = web.AppKey("page", Page)


def setup(app: web.Application) -> None:
    """Add the status page's routes to ``app``, built by ``create_app``: it holds the engine
    and the config, and the API routes the page links to (``api-events``,
    ``api-build-log``). The page is ``app[PAGE]``; its ``graphs`` may be replaced before
    the app starts (another ``dot``, other limits)."""
    page = Page(app[CONFIG], app[ENGINE], app.router)
    app[PAGE] = page
    app.router.add_get("/", page.index, name="page")
    app.router.add_static("/static/", STATIC, name="page-static")
    app.router.add_get("/ui/fragments", page.fragments, name="page-fragments")
    app.router.add_get("/ui/graph.svg", page.graph_svg, name="page-graph")
    app.router.add_get("/port/{name}", page.port, name="page-port")
    app.router.add_get("/key.pub", page.public_key, name="page-key")

"""The status page: server-rendered HTML over a real State, its fragments, the Graphviz
drawing of the plan, escaping of hostile content, and live updates in a real headless
Chromium (selenium + Debian's chromedriver)."""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import json
import re
import subprocess
import threading
import time
import urllib.error
import urllib.request
import xml.etree.ElementTree as ElementTree
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from html.parser import HTMLParser
from pathlib import Path

import pytest
from aiohttp import web
from selenium.webdriver.chrome.webdriver import WebDriver

from portsd.config import Config
from portsd.daemon.engine import EngineStatus, PlanGraph, PlanNode, Running
from portsd.daemon.events import EventBus
from portsd.daemon.problems import Problems, find_problems
from portsd.daemon.server import page
from portsd.daemon.server.app import create_app, create_runner
from portsd.daemon.server.graphview import (
    BLOCKED,
    COLOURS,
    CUT_OFF,
    PENDING,
    UP_TO_DATE,
    GraphView,
    node_state,
    state_class,
)
from portsd.daemon.state import BuildState, NewBuild, State
from portsd.pkg.repo import Repository
from portsd.pkg.sign import PublicKey, SecretKey
from tests.browser import CHROMIUM_FLAGS, chromium, mark, same_page, text, until

ARCH = "x86_64"
HEAD = "a1b2c3d4e5f6" + "0" * 28
KEY = "f" * 64


class TableEngine:
    """A small real implementation of the Engine protocol: status and plan are read from the
    State, which the tests change the way the daemon does (then they publish events)."""

    def __init__(self, config: Config, state: State, repo: Repository, events: EventBus) -> None:
        self.config = config
        self.state = state
        self.repo = repo
        self.events = events
        self.branch = "main"
        self.head: str | None = None
        self.evaluating = False
        self.steps: dict[int, str] = {}
        self.more_nodes: tuple[PlanNode, ...] = ()  # blocked or up to date
        self.edges: tuple[tuple[str, str, str], ...] = ()
        self.triggers: list[str] = []

    def trigger(self, source: str) -> None:
        self.triggers.append(source)

    def rebuild(self, names: Sequence[str]) -> list[str]:
        self.state.forget_failures(names)
        return list(names)

    def status(self) -> EngineStatus:
        latest = self.state.latest_evaluation()
        done = latest if latest is not None and latest.finished is not None else None
        running = tuple(
            Running(build, self.steps.get(build.id, "build"))
            for build in reversed(self.state.builds(states=[BuildState.RUNNING]))
        )
        queued = self.state.counts()[BuildState.QUEUED]
        return EngineStatus(
            branch=self.branch,
            head=self.head,
            evaluated=done.revision if done else None,
            evaluation=done.id if done else None,
            evaluating=self.evaluating,
            queued=queued,
            running=running,
            eta=90.0 * (queued + len(running)) if queued or running else None,
            blocked=done.blocked if done else 0,
        )

    def problems(self) -> Problems:
        """The daemon's own computation, with the newest build of each port as its key."""
        keys = {b.port: b.key for b in reversed(self.state.builds(limit=100_000))}
        blocked = {n.port: n.reason for n in self.more_nodes if node_state(n) == BLOCKED}
        return find_problems(self.state, keys, blocked, self.repo.stored_keys())

    def plan_graph(self) -> PlanGraph:
        latest = self.state.latest_evaluation()
        if latest is None:
            return PlanGraph(None)
        builds = self.state.builds(evaluation=latest.id, limit=100_000)
        nodes = tuple(PlanNode(b.port, b.key, b.state, b.reason) for b in reversed(builds))
        return PlanGraph(latest.revision, nodes + self.more_nodes, self.edges)


@dataclass
class Served:
    """The real app (create_app + page.setup) on 127.0.0.1, its loop on a thread."""

    url: str
    engine: TableEngine
    state: State
    config: Config
    loop: asyncio.AbstractEventLoop

    def get(self, path: str) -> tuple[int, dict[str, str], str]:
        try:
            with urllib.request.urlopen(self.url + path, timeout=30) as response:
                return response.status, dict(response.headers), response.read().decode()
        except urllib.error.HTTPError as error:
            return error.code, dict(error.headers), error.read().decode()

    def html(self, path: str = "/") -> str:
        status, _, body = self.get(path)
        assert status == 200, body
        return body

    def publish(self, kind: str, **data: object) -> None:
        self.engine.events.publish(kind, **data)

    def flood(self, events: int) -> None:
        """Publish ``events`` at once on the server's loop: more than a subscriber may fall
        behind (events.QUEUE_LIMIT), so every event stream is cut."""

        def burst() -> None:
            for n in range(events):
                self.engine.events.publish("log", id=0, line=f"noise {n}")

        self.loop.call_soon_threadsafe(burst)

    def evaluate(self, revision: str, builds: Sequence[NewBuild], blocked: int = 0) -> list[int]:
        """An evaluation that queues ``builds``, as the daemon records one; their ids."""
        evaluation = self.state.start_evaluation(revision, "main", "hook")
        rows = self.state.finish_evaluation(evaluation, builds, blocked=blocked)
        self.engine.head = revision
        return [row.id for row in rows]

    def start(self, build: int, lines: Sequence[str] = (), step: str = "build") -> Path:
        row = self.state.build(build)
        assert row is not None
        log = self.config.logs / row.port / f"{build}.log"
        log.parent.mkdir(parents=True, exist_ok=True)
        log.write_text("".join(f"{line}\n" for line in lines))
        self.state.start_build(build, str(log))
        self.engine.steps[build] = step
        return log


@contextmanager
def serving(tmp_path: Path, graphs: GraphView | None = None) -> Iterator[Served]:
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    config = Config(state_dir=tmp_path / "state", arch=ARCH)
    config.logs.mkdir(parents=True)
    state = State(config.database)
    repo = Repository(config.repo, ARCH, SecretKey.generate())
    engine = TableEngine(config, state, repo, EventBus(loop))
    app = create_app(config, engine)
    if graphs is not None:
        app[page.PAGE].graphs = graphs
    runner = create_runner(app)

    async def start() -> str:
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", 0).start()
        return f"http://127.0.0.1:{runner.addresses[0][1]}"

    try:
        url = asyncio.run_coroutine_threadsafe(start(), loop).result(timeout=30)
        yield Served(url, engine, state, config, loop)
    finally:
        asyncio.run_coroutine_threadsafe(runner.cleanup(), loop).result(timeout=30)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(timeout=10)
        loop.close()
        state.close()


@pytest.fixture
def served(tmp_path: Path) -> Iterator[Served]:
    with serving(tmp_path) as server:
        yield server


def section(html: str, name: str) -> str:
    match = re.search(rf'<section id="{name}".*?</section>', html, re.S)
    assert match, f"no section {name}"
    return match.group(0)


def new(port: str, reason: str = "", version: str = "1.0-1") -> NewBuild:
    key = hashlib.sha256(f"{port} {version}".encode()).hexdigest()  # a key per port, as built
    return NewBuild(port, version, key, reason or f"{port} must be built: it is new")


# -- the page over a real State ---------------------------------------------------------


def test_page_shows_branch_plan_running_failures_and_history(served: Served) -> None:
    why = "zlib must be rebuilt: key 0123456789ab -> 9876543210fe\n  ports/zlib changed"
    cycle = "gcc cannot be built: dependency cycle: gcc -> binutils -> gcc"
    served.engine.more_nodes = (PlanNode("gcc", None, None, cycle), PlanNode("libc", KEY, None))
    zlib, busybox, make, musl = served.evaluate(
        HEAD, [new("zlib", why), new("busybox"), new("make"), new("musl")], blocked=1
    )
    served.start(busybox, [f"compiling file {n}" for n in range(60)], step="check")
    served.start(make, [f"make line {n}" for n in range(1, 101)])
    served.state.finish_build(make, BuildState.FAILED, "make: check failed: exit 2")
    served.start(musl, ["ok"])
    served.state.finish_build(musl, BuildState.BUILT)

    status, headers, html = served.get("/")
    assert status == 200
    assert headers["Content-Type"].startswith("text/html")
    assert "script-src 'self'" in headers["Content-Security-Policy"]

    top = section(html, "status")
    assert "main" in top and HEAD[:12] in top and "(evaluation #1)" in top
    assert "<dt>Queued</dt><dd>1</dd>" in top and "<dt>Running</dt><dd>1</dd>" in top
    assert "about 3 min 00 s" in top  # the engine's ETA: 2 builds x 90 s
    assert "<dt>Blocked</dt><dd>1 port cannot be built</dd>" in top

    plan = section(html, "plan")
    assert f'<li id="build-{zlib}">' in plan
    assert "ports/zlib changed" in plan  # the whole `ports why` text, not only its verdict
    verdict = "zlib must be rebuilt: key 0123456789ab -&gt; 9876543210fe"
    assert f'<span class="why-line">{verdict}' in plan
    assert "busybox" not in plan and "musl" not in plan
    assert f'<li><span class="port">gcc</span>: {cycle.replace(">", "&gt;")}</li>' in plan

    running = section(html, "running")
    assert 'class="badge state-running">check</span>' in running
    assert "compiling file 59" in running and "compiling file 20" in running
    assert "compiling file 19\n" not in running  # the tail only: the last 40 lines
    assert f'data-follow="/api/v1/builds/{busybox}/log?follow=1"' in running

    failures = section(html, "failures")
    assert '<p class="detail">check failed: exit 2</p>' in failures  # its name said once
    assert "Newly failing" in failures and "<code>portsd rebuild make</code>" in failures
    assert "make line 100" in failures and "make line 61" in failures
    assert "make line 60\n" not in failures
    assert f'href="/api/v1/builds/{make}/log"' in failures

    history = section(html, "history")
    assert '<span class="badge state-built">built</span>' in history
    assert '<span class="badge state-failed">failed</span>' in history
    assert f'<code title="{HEAD}">' in history

    graph = section(html, "graph")
    assert "<svg" in graph and ">zlib</text>" in graph and ">blocked</text>" in graph


def test_page_of_a_daemon_that_has_done_nothing_yet(served: Served) -> None:
    html = served.html()
    assert "Nothing is queued." in html and "Nothing is building." in html
    assert "No failures." in html and "No evaluations yet." in html
    assert re.search(r"<dt>Evaluated</dt><dd>\s*not yet", html)
    assert "Nothing is planned." in html
    assert "<dt>ETA</dt><dd>idle</dd>" in html


def test_fragments_are_the_page_sections(served: Served) -> None:
    served.evaluate(HEAD, [new("zlib", "zlib must be built: it is new\n  recipe added")])
    html = served.html()
    status, headers, body = served.get("/ui/fragments?sections=plan,history,status")
    assert status == 200 and headers["Content-Type"].startswith("application/json")
    parts = json.loads(body)
    assert sorted(parts) == ["history", "plan", "status"]
    assert parts["plan"] == section(html, "plan")
    assert parts["history"] == section(html, "history")
    for name, fragment in parts.items():
        assert fragment.startswith(f'<section id="{name}"')

    assert served.get("/ui/fragments?sections=plan,nope")[0] == 400
    assert served.get("/ui/fragments")[0] == 400
    assert served.get("/ui/fragments?sections=history&history=x")[0] == 400


def test_history_and_queue_stay_short_with_1300_builds(served: Served) -> None:
    ids = served.evaluate(HEAD, [new(f"port{n:04d}") for n in range(1300)])
    for build in ids[:1000]:
        served.state.finish_build(build, BuildState.BUILT)

    started = time.perf_counter()
    html = served.html()
    elapsed = time.perf_counter() - started
    history = section(html, "history")
    rows = re.findall(r'<td class="port"><a href="/port/port\d+">(port\d+)</a></td>', history)
    assert rows == [f"port{n:04d}" for n in range(999, 949, -1)]  # newest 50
    assert 'href="/?history=50#history"' in history and 'rel="prev"' not in history
    plan = section(html, "plan")
    assert plan.count("<li id=") == page.PLAN_LIMIT and "… and 100 more." in plan
    graph = section(html, "graph")  # 1300 planned: too many to draw, a capped list
    assert "1300 ports to build are too many to draw" in graph and "<svg" not in graph
    assert graph.count('<li><span class="badge') == 200

    older = section(served.html("/?history=50"), "history")
    rows = re.findall(r'<td class="port"><a href="/port/port\d+">(port\d+)</a></td>', older)
    assert rows == [f"port{n:04d}" for n in range(949, 899, -1)]
    assert 'href="/?history=0#history"' in older and 'href="/?history=100#history"' in older
    last = section(served.html("/?history=950"), "history")
    assert len(re.findall(r'<td class="port">', last)) == 50 and 'rel="next"' not in last
    print(f"GET / with 1300 builds: {elapsed * 1000:.0f} ms")
    assert elapsed < 5


# -- hostile content ----------------------------------------------------------------------

HOSTILE = {
    "port": "<script>alert(1)</script>",
    "version": '"><img src=x onerror=alert(2)>',
    "reason": "</pre><script>alert(3)</script>\n  <iframe src=javascript:alert(4)>",
    "detail": "<b onmouseover=alert(5)>boom</b>",
    "log": "</pre><script>alert(6)</script>",
    "step": "<svg onload=alert(7)>",
    "branch": "<style>*{display:none}</style>",
}


class Elements(HTMLParser):
    """Every start tag of a document, with its attributes."""

    def __init__(self) -> None:
        super().__init__()
        self.tags: list[tuple[str, dict[str, str | None]]] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.append((tag, dict(attrs)))


def assert_inert(html: str) -> None:
    parser = Elements()
    parser.feed(html)
    scripts = [attrs for tag, attrs in parser.tags if tag == "script"]
    assert len(scripts) <= 1 and all((s.get("src") or "").startswith("/static/") for s in scripts)
    assert not [tag for tag, _ in parser.tags if tag in ("iframe", "img", "b", "style")]
    handlers = [(tag, name) for tag, attrs in parser.tags for name in attrs if name[:2] == "on"]
    assert not handlers
    for hostile in HOSTILE.values():
        assert hostile.split("\n")[0] not in html


def test_hostile_names_reasons_and_logs_are_escaped(served: Served) -> None:
    served.engine.branch = HOSTILE["branch"]
    evil = NewBuild(HOSTILE["port"], HOSTILE["version"], KEY, HOSTILE["reason"])
    other = dataclasses.replace(evil, key="e" * 64)  # the failure is of another key
    running, queued, failed = served.evaluate(HEAD, [evil, evil, other])
    served.start(running, [HOSTILE["log"]] * 3, step=HOSTILE["step"])
    served.start(failed, [HOSTILE["log"]])
    served.state.finish_build(failed, BuildState.FAILED, HOSTILE["detail"])

    html = served.html()
    assert_inert(html)
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in section(html, "plan")
    assert "&lt;/pre&gt;&lt;script&gt;alert(6)&lt;/script&gt;" in section(html, "running")
    assert "&lt;b onmouseover=alert(5)&gt;boom&lt;/b&gt;" in section(html, "failures")
    graph = section(html, "graph")
    assert "<svg" in graph and "&lt;script&gt;alert(1)&lt;/script&gt;" in graph

    status, _, body = served.get("/ui/fragments?sections=" + ",".join(page.SECTIONS))
    assert status == 200
    for fragment in json.loads(body).values():
        assert_inert(fragment)


# -- the dependency graph -----------------------------------------------------------------

SVG = "{http://www.w3.org/2000/svg}"
XLINK = "{http://www.w3.org/1999/xlink}"


@dataclass(frozen=True)
class DrawnNode:
    title: str
    label: tuple[str, ...]
    fill: str
    tooltip: str
    css: str


def drawn_nodes(svg: str) -> dict[str, DrawnNode]:
    root = ElementTree.fromstring(svg)
    found = {}
    for group in root.iter(f"{SVG}g"):
        css = group.get("class", "")
        if not css.startswith("node"):
            continue
        title = group.findtext(f"{SVG}title") or ""
        shape = next(e for e in group.iter() if e.tag in (f"{SVG}path", f"{SVG}polygon"))
        link = next(group.iter(f"{SVG}a"))
        label = tuple(text.text or "" for text in group.iter(f"{SVG}text"))
        found[title] = DrawnNode(
            title, label, shape.get("fill", ""), link.get(f"{XLINK}title", ""), css
        )
    return found


def drawn_edges(svg: str) -> list[str]:
    root = ElementTree.fromstring(svg)
    return [
        group.findtext(f"{SVG}title") or ""
        for group in root.iter(f"{SVG}g")
        if group.get("class") == "edge"
    ]


def reason_of(name: str) -> str:
    return "" if name == UP_TO_DATE else f"why {name}\n  more"


def every_state() -> PlanGraph:
    """A node in each state: the states of builds, blocked (no build, a reason), pending
    (waiting for a build), cut off (that build came out identical) and up to date (no
    build, no reason); each named p-<state>."""
    nodes = [
        PlanNode(f"p-{name.replace(' ', '-')}", KEY, state, reason_of(name))
        for name, state in [
            *((s.value, s) for s in BuildState),
            (BLOCKED, None),
            (UP_TO_DATE, None),
        ]
    ] + [
        PlanNode("p-pending", None, None, reason_of(PENDING), pending="p-queued"),
        PlanNode("p-cut-off", KEY, None, reason_of(CUT_OFF), cut_off=True),
    ]
    edges = (
        ("p-queued", "p-built", "build"),
        ("p-running", "p-up-to-date", "depends"),
        ("p-skipped", "p-failed", "depends"),
        ("p-queued", "not-drawn", "depends"),
    )
    return PlanGraph("abc", tuple(nodes), edges)


def test_graph_nodes_are_coloured_by_state_with_reasons_as_tooltips() -> None:
    drawing = asyncio.run(GraphView().draw(every_state()))
    assert drawing.svg is not None and drawing.svg.startswith('<svg role="img"')
    nodes = drawn_nodes(drawing.svg)
    assert len(nodes) == len(COLOURS) == 11
    for name, colour in COLOURS.items():
        node = nodes[f"p-{name.replace(' ', '-')}"]
        assert node.fill == colour
        assert node.label == (node.title, name)  # the state in words, not colour alone
        tooltip = reason_of(name).replace("  ", " \xa0") or f"{node.title}: up to date"
        assert node.tooltip == tooltip
        assert state_class(name) in node.css.split()
    # dependency -> dependent; an edge to a node not drawn is left out
    assert sorted(drawn_edges(drawing.svg)) == sorted(
        ["p-built->p-queued", "p-up-to-date->p-running", "p-failed->p-skipped"]
    )


@pytest.mark.parametrize(
    "port, reason",
    [
        ("<script>alert(1)</script>", "<img src=x onerror=alert(1)> & &amp; &lt;"),
        ('quote"d', 'a "quoted" reason\\'),
        ("back\\slash\\N", "\\N \\G \\n \\\\ \\l \\E"),
        ("new\nline", "line one\nline two"),
        ("dash-->comment", "--> <!-- -->"),
    ],
)
def test_graph_says_names_and_reasons_exactly(port: str, reason: str) -> None:
    graph = PlanGraph("abc", (PlanNode(port, KEY, BuildState.QUEUED, reason),))
    drawing = asyncio.run(GraphView().draw(graph))
    assert drawing.svg is not None
    for raw in ("<script", "<img", "<!-- -->"):
        assert raw not in drawing.svg
    (node,) = drawn_nodes(drawing.svg).values()
    assert node.label == (*port.split("\n"), "queued")
    assert node.tooltip == reason
    assert node.fill == COLOURS["queued"]


def counting_dot(tmp_path: Path, body: str = 'exec dot "$@"') -> tuple[str, Callable[[], int]]:
    """A real `dot` behind a script that counts its runs."""
    runs = tmp_path / "runs"
    script = tmp_path / "dot"
    script.write_text(f'#!/bin/sh\necho run >> "{runs}"\n{body}\n')
    script.chmod(0o755)
    return str(script), lambda: len(runs.read_text().split()) if runs.exists() else 0


def test_graph_is_drawn_once_per_evaluation_and_states(tmp_path: Path) -> None:
    dot, runs = counting_dot(tmp_path)
    view = GraphView(dot=dot)
    graph = every_state()

    async def main() -> None:
        drawings = await asyncio.gather(*(view.draw(graph) for _ in range(8)))
        assert all(d.svg is not None and d.svg == drawings[0].svg for d in drawings)
        assert runs() == 1
        await view.draw(graph)
        assert runs() == 1
        changed = PlanGraph(
            graph.revision,
            (PlanNode("p-queued", KEY, BuildState.RUNNING, "why"), *graph.nodes[1:]),
            graph.edges,
        )
        drawn = await view.draw(changed)
        assert runs() == 2 and drawn.svg is not None
        assert drawn_nodes(drawn.svg)["p-queued"].fill == COLOURS["running"]
        await view.draw(graph)
        assert runs() == 2  # both pictures are cached

    asyncio.run(main())


def test_graph_is_cached_across_page_views(tmp_path: Path) -> None:
    dot, runs = counting_dot(tmp_path)
    with serving(tmp_path, GraphView(dot=dot)) as server:
        server.evaluate(HEAD, [new("zlib"), new("make")])
        for _ in range(3):
            assert "<svg" in section(server.html(), "graph")
        status, headers, svg = server.get("/ui/graph.svg")
        assert status == 200 and headers["Content-Type"].startswith("image/svg+xml")
        assert set(drawn_nodes(svg)) == {"zlib", "make"}
        assert runs() == 1
        server.state.start_build(1, str(server.config.logs / "zlib.log"))
        assert "state-running" in section(server.html(), "graph")
        assert runs() == 2


def test_a_huge_graph_is_cut_to_what_is_planned() -> None:
    planned = tuple(PlanNode(f"new{n}", KEY, BuildState.QUEUED, "new") for n in range(3))
    planned += (PlanNode("stuck", None, None, "stuck cannot be built: no recipe for x"),)
    current = tuple(PlanNode(f"old{n}", KEY, None) for n in range(600))
    edges = (("new0", "old1", "depends"), ("new1", "new0", "depends"))
    drawing = asyncio.run(GraphView().draw(PlanGraph("abc", planned + current, edges)))
    assert drawing.svg is not None and drawing.omitted == 600
    assert set(drawn_nodes(drawing.svg)) == {"new0", "new1", "new2", "stuck"}
    assert drawn_edges(drawing.svg) == ["new0->new1"]

    too_many = asyncio.run(GraphView(max_nodes=2).draw(PlanGraph("abc", planned + current)))
    assert too_many.svg is None and too_many.nodes == planned and too_many.omitted == 600
    assert too_many.note == "4 ports to build are too many to draw"


def test_without_dot_or_when_it_hangs_the_plan_is_a_list(tmp_path: Path) -> None:
    graph = every_state()
    missing = asyncio.run(GraphView(dot=str(tmp_path / "no-dot")).draw(graph))
    assert missing.svg is None and missing.nodes == graph.nodes
    assert "could not be drawn" in missing.note

    hanging, runs = counting_dot(tmp_path, "exec sleep 30")
    started = time.monotonic()
    slow = asyncio.run(GraphView(dot=hanging, timeout=0.5).draw(graph))
    assert slow.svg is None and time.monotonic() - started < 10 and runs() == 1

    with serving(tmp_path, GraphView(dot=str(tmp_path / "no-dot"))) as server:
        server.evaluate(HEAD, [new("zlib", "zlib must be built: it is new")])
        graph_html = section(server.html(), "graph")
        assert "<svg" not in graph_html
        assert '<span class="badge state-queued">queued</span> <span class="port">zlib</span>' in (
            graph_html
        )
        assert server.get("/ui/graph.svg")[0] == 404


def test_page_css_colours_states_like_the_graph() -> None:
    css = (page.STATIC / "page.css").read_text()
    rules = dict(re.findall(r"\.state-([a-z-]+) \{ background-color: (#[0-9a-f]{6}); \}", css))
    assert rules == {
        state_class(name).removeprefix("state-"): colour for name, colour in COLOURS.items()
    }


# -- a real browser -----------------------------------------------------------------------


@pytest.fixture
def browser(tmp_path: Path) -> Iterator[WebDriver]:
    with chromium(tmp_path / "chromium") as driver:
        yield driver


def live(driver: WebDriver) -> str:
    return str(driver.execute_script("return document.body.dataset.live"))


def refreshes(driver: WebDriver) -> int:
    return int(driver.execute_script("return window.portsd.refreshes"))


def open_live(driver: WebDriver, served: Served) -> None:
    """Open the page, wait for its event stream and the refresh that follows connecting
    (sections, graph), and mark the window: a reload loses the mark."""
    driver.get(served.url + "/")
    until(driver, lambda: live(driver) == "1" and refreshes(driver) >= 2, "live")
    mark(driver)


@pytest.mark.slow
def test_browser_follows_a_build_from_queued_to_built_without_reloading(
    served: Served, browser: WebDriver
) -> None:
    driver = browser
    open_live(driver, served)
    assert "Nothing is queued." in text(driver, "#plan")

    # an evaluation queues a build
    served.engine.evaluating = True
    served.publish("status", evaluating=True)
    until(driver, lambda: "evaluating" in text(driver, "#status"), "evaluating shown")
    served.engine.evaluating = False
    (build,) = served.evaluate(HEAD, [new("zlib", "zlib must be built: it is new\n  ports/zlib")])
    served.publish("evaluation", id=1, revision=HEAD)
    served.publish("build", id=build, port="zlib", state="queued")
    queued = f"#plan li#build-{build}"
    until(driver, lambda: "zlib must be built: it is new" in text(driver, queued), "queued")
    until(driver, lambda: "zlib" in text(driver, "#graph svg"), "graph drawn")
    assert "queued" in text(driver, "#graph svg")

    # it runs, and its log grows line by line: only the log stream carries those lines
    log = served.start(build, ["configure: ok"], step="build")
    served.publish("build", id=build, port="zlib", state="running")
    pre = f"#running pre[data-build='{build}']"
    until(driver, lambda: "configure: ok" in text(driver, pre), "running")
    assert "Nothing is queued." in text(driver, "#plan")
    for n in range(1, 6):
        with log.open("a") as file:
            file.write(f"cc -c part{n}.c\n")

        def shows(line: str = f"part{n}.c") -> bool:
            return line in text(driver, pre)

        until(driver, shows, f"log line {n}")
    assert text(driver, pre).count("configure: ok") == 1
    served.engine.steps[build] = "package"
    served.publish("build", id=build, step="package")
    until(driver, lambda: "package" in text(driver, f"#build-{build} .badge"), "next step")
    assert "part5.c" in text(driver, pre)  # the followed log survived the swap
    until(driver, lambda: "running" in text(driver, "#graph svg"), "graph recoloured")

    # it is built
    served.state.finish_build(build, BuildState.BUILT)
    served.publish("build", id=build, port="zlib", state="built")
    until(driver, lambda: "Nothing is building." in text(driver, "#running"), "finished")
    until(driver, lambda: "built" in text(driver, "#builds tbody"), "in the history")
    assert "zlib" in text(driver, "#builds tbody")
    assert driver.title == "portsd: 0 running, 0 queued"
    assert same_page(driver)
    assert refreshes(driver) >= 5
    log = driver.get_log("browser")  # type: ignore[no-untyped-call]  # selenium leaves it untyped
    severe = [entry for entry in log if entry.get("level") == "SEVERE"]
    assert not severe


@pytest.mark.slow
def test_browser_reconnects_and_catches_up_after_losing_the_event_stream(
    served: Served, browser: WebDriver
) -> None:
    driver = browser
    open_live(driver, served)
    served.flood(1500)  # the bus drops the page's stream: it fell behind
    until(driver, lambda: live(driver) == "0", "stream cut")
    # what happened while the page was not listening reaches it when it is back
    (build,) = served.evaluate(HEAD, [new("zlib")])
    until(driver, lambda: "zlib" in text(driver, f"#plan li#build-{build}"), "caught up")
    assert live(driver) == "1"
    assert same_page(driver)


def test_headless_chromium_with_a_virtual_time_budget_loads_the_page(
    served: Served, tmp_path: Path
) -> None:
    """`chromium --headless --virtual-time-budget` (how screenshots and crawlers load a
    page) waits for `load`: an event stream opened before it kept the page loading."""
    zlib, _ = served.evaluate(HEAD, [new("zlib"), new("musl")])
    served.start(zlib, ["compiling zlib"])  # its log is followed: another endless request
    started = time.monotonic()
    dumped = subprocess.run(
        ["/usr/bin/chromium", *CHROMIUM_FLAGS, f"--user-data-dir={tmp_path / 'profile'}"]
        + ["--virtual-time-budget=3000", "--dump-dom", served.url + "/"],
        capture_output=True,
        text=True,
        timeout=90,
    )
    assert dumped.returncode == 0, dumped.stderr[-2000:]
    assert 'id="status"' in dumped.stdout and "compiling zlib" in dumped.stdout
    assert time.monotonic() - started < 60


def test_page_says_what_fails_now_what_was_fixed_and_how_to_use_the_repository(
    served: Served,
) -> None:
    secret = SecretKey.generate()
    served.config.public_key.parent.mkdir(parents=True)
    secret.public_key.save(served.config.public_key)
    first = served.evaluate(HEAD, [new("liba"), new("libb"), new("hello")])
    outcomes = (BuildState.FAILED, BuildState.FAILED, BuildState.BUILT)
    for build, state in zip(first, outcomes, strict=True):
        served.start(build, [f"log of build {build}"])
        served.state.finish_build(build, state, "exit 2" if state is BuildState.FAILED else None)
    second = "b" * 40
    liba, libb, nodep = served.evaluate(
        second, [new("liba", version="2.0-1"), new("libb", version="2.0-1"), new("nodep")]
    )
    for build in (liba, libb, nodep):
        served.start(build, ["compiling", "the end of the log"])
    served.state.finish_build(liba, BuildState.BUILT)
    served.state.finish_build(libb, BuildState.FAILED, "libb: check failed (exit 1)")
    host_log = served.config.logs / "nodep" / f"{nodep}.log"
    served.state.finish_build(
        nodep, BuildState.FAILED, f"nodep: build failed (exit 2); log: {host_log}"
    )

    html = served.html()
    assert str(served.config.state_dir) not in html  # no path of the build host
    failures = section(html, "failures")
    newly, still = failures.split("Still failing")
    assert "Newly failing" in newly and 'href="/port/nodep"' in newly and "libb" not in newly
    assert '<p class="detail">build failed (exit 2)</p>' in newly  # "nodep: " said once
    assert 'href="/port/libb"' in still and '<p class="detail">check failed (exit 1)</p>' in still
    assert "<code>portsd rebuild libb</code>" in still
    fixed = failures.split('id="fixed-heading"')[1]
    assert 'href="/port/liba"' in fixed and f"by build #{liba}" in fixed
    assert 'id="failure-' + str(first[0]) not in failures  # liba's old failure is history
    assert "4 ports: 0 published, 2 failing, 0 skipped" in failures

    top = section(html, "status")
    for name, count in (("queued", 3), ("built", 1), ("failed", 2), ("skipped", 0)):
        assert f'data-count="{name}">{count}</span>' in top
    assert 'data-count="remaining">0</span>' in top
    assert re.search(r'data-count="elapsed">\d\.\d\d s</span>', top)  # not "0 s"

    evaluations = section(html, "history").split('<table id="builds">')[0]
    assert "done with failures: 2 failed" in evaluations and ">done<" not in evaluations

    use = html.split('<aside id="use"')[1].split("</aside>")[0]
    assert f"<code>{served.url}</code>" in use and f"<code>{secret.key_id}</code>" in use
    assert f"curl -o /etc/ports/build.pub {served.url}/key.pub" in use
    status, _, key = served.get("/key.pub")
    assert status == 200 and PublicKey.parse(key).key_id == secret.key_id

    port = served.html("/port/libb")
    assert "check failed (exit 1)" in port and "<code>portsd rebuild libb</code>" in port
    assert port.count('<td><span class="badge state-failed">failed</span></td>') == 2
    assert "the end of the log" in port
    assert served.get("/port/nope")[0] == 404 and served.get("/port/..evil")[0] == 404


@pytest.mark.parametrize(
    ("seconds", "shown"),
    [(0.29, "0.29 s"), (0.004, "0.00 s"), (4.06, "4.1 s"), (12.4, "12 s"), (185, "3 min 05 s")],
)
def test_durations_keep_their_fractions_below_ten_seconds(seconds: float, shown: str) -> None:
    assert page.duration(seconds) == shown

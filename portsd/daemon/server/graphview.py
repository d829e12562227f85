"""The plan as a picture: a PlanGraph drawn by Graphviz ``dot -Tsvg``, or a list when it can't be.

Drawing runs ``dot`` through ``portsd.build.run.run`` in a worker thread, so the event loop never
waits on it, and caches each SVG by its DOT source: the source is a function of the
evaluation's nodes, their states and the edges, so a page with many viewers (or many
refreshes) runs ``dot`` once per change of state, and concurrent requests for the same
picture share one run. When ``dot`` is missing, fails or times out, or the graph is too big
to be readable, the caller gets the nodes as a list instead (``Drawing.svg is None``).

The SVG is inlined into the status page, so nothing user-controlled may reach it
unescaped: DOT strings are quoted here and ``dot`` XML-escapes every label, title and
tooltip, and even ``-`` in comments (tests/test_page.py checks hostile port names).
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import tempfile
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from portsd.build.run import run
from portsd.daemon.engine import PlanGraph, PlanNode
from portsd.daemon.state import BuildState

log = logging.getLogger(__name__)

UP_TO_DATE = "up to date"
BLOCKED = "blocked"
PENDING = "pending"  # its key waits for a planned build's package
CUT_OFF = "cut off"  # was pending; the build it waited for came out identical

COLOURS: dict[str, str] = {
    BuildState.QUEUED.value: "#cfdcf0",
    BuildState.RUNNING.value: "#ffd966",
    BuildState.BUILT.value: "#9fdf9f",
    BuildState.FAILED.value: "#f08c8c",
    BuildState.SKIPPED.value: "#f7c98b",
    BuildState.CANCELLED.value: "#d0d0d0",
    BuildState.INTERRUPTED.value: "#d6c4f0",
    BLOCKED: "#eeb0d8",
    PENDING: "#e8eef8",
    CUT_OFF: "#e0f2e0",
    UP_TO_DATE: "#ffffff",
}
"""Fill colour of each state of a node, on the graph and (page.css) in the legend and badges."""

# Edge kinds as the engine names dependency kinds; anything else is drawn solid.
_EDGE_STYLES = {"build": "dashed", "check": "dotted"}


def node_state(node: PlanNode) -> str:
    """The state of a plan node in words: its build's state, or, without a build,
    ``pending`` while its key waits for a build, ``cut off`` when that build came out
    identical, ``blocked`` when it has a reason (why it cannot be built), else
    ``up to date``."""
    if node.state is not None:
        return node.state.value
    if node.pending is not None:
        return PENDING
    if node.cut_off:
        return CUT_OFF
    return BLOCKED if node.reason.strip() else UP_TO_DATE


def state_class(name: str) -> str:
    """The CSS class of a state name: ``state-up-to-date``."""
    return "state-" + name.replace(" ", "-")


@dataclass(frozen=True, slots=True)
class Drawing:
    """What the page shows for a plan.

    ``svg`` is an ``<svg>`` element ready to inline (no XML prolog), or None: show
    ``nodes`` as a list, and ``note`` (a sentence) says why. ``omitted`` counts the
    up-to-date nodes left out of a big graph, which is then cut down to what is planned
    or blocked.
    """

    revision: str | None
    nodes: tuple[PlanNode, ...]
    svg: str | None
    omitted: int = 0
    note: str = ""


class GraphView:
    """Draws plans with ``dot``; one per application (it owns the cache).

    ``max_nodes``: above it, only the planned (and blocked) nodes are drawn; if those are
    still more, a list is shown. ``cache_size`` pictures are kept, least recently used
    dropped first.
    """

    def __init__(
        self,
        *,
        dot: str = "dot",
        timeout: float = 30.0,
        max_nodes: int = 500,
        cache_size: int = 16,
    ) -> None:
        self.dot = dot
        self.timeout = timeout
        self.max_nodes = max_nodes
        self.cache_size = cache_size
        self._cache: OrderedDict[str, str | None] = OrderedDict()  # DOT digest -> SVG
        self._pending: dict[str, asyncio.Future[str | None]] = {}

    async def draw(self, graph: PlanGraph) -> Drawing:
        """The picture of ``graph``: from the cache, or from one ``dot`` run shared by all
        callers that ask for it meanwhile."""
        nodes = graph.nodes
        omitted = 0
        if len(nodes) > self.max_nodes:
            nodes = tuple(node for node in graph.nodes if node_state(node) != UP_TO_DATE)
            omitted = len(graph.nodes) - len(nodes)
        if not nodes:
            return Drawing(graph.revision, (), None, omitted, "Nothing is planned")
        if len(nodes) > self.max_nodes:
            note = f"{len(nodes)} ports to build are too many to draw"
            return Drawing(graph.revision, nodes, None, omitted, note)
        source = dot_source(nodes, graph.edges)
        digest = hashlib.sha256(source.encode()).hexdigest()
        svg = await self._svg(digest, source)
        note = "" if svg is not None else "The graph could not be drawn (see the daemon's log)"
        return Drawing(graph.revision, nodes, svg, omitted, note)

    async def _svg(self, digest: str, source: str) -> str | None:
        if digest in self._cache:
            self._cache.move_to_end(digest)
            return self._cache[digest]
        pending = self._pending.get(digest)
        if pending is not None:
            return await asyncio.shield(pending)
        future: asyncio.Future[str | None] = asyncio.get_running_loop().create_future()
        self._pending[digest] = future
        try:
            svg = await asyncio.to_thread(self._render, source)
        except BaseException as error:
            future.set_exception(error)
            future.exception()  # retrieved: no "never retrieved" warning without waiters
            raise
        else:
            # A failure is cached too: the next change of state tries again, but a dot that
            # timed out is not re-run for every viewer of the same picture.
            future.set_result(svg)
            self._cache[digest] = svg
            while len(self._cache) > self.cache_size:
                self._cache.popitem(last=False)
            return svg
        finally:
            del self._pending[digest]

    def _render(self, source: str) -> str | None:
        """Run dot (blocking); the SVG without its prolog, or None after logging why not."""
        with tempfile.TemporaryDirectory(prefix="portsd-graph-") as work:
            given = Path(work, "plan.dot")
            drawn = Path(work, "plan.svg")
            given.write_text(source, encoding="utf-8")
            errors: list[str] = []
            # -o: dot's warnings (on stderr) must not end up inside the SVG
            result = run(
                [self.dot, "-Tsvg", "-o", str(drawn), str(given)],
                on_line=errors.append,
                timeout=self.timeout,
            )
            if not result.ok:
                detail = "; ".join(errors[-3:])
                log.warning("cannot draw the plan: %s: %s %s", self.dot, result.status, detail)
                return None
            svg = drawn.read_text(encoding="utf-8", errors="replace")
        start = svg.find("<svg")
        if start < 0:
            log.warning("cannot draw the plan: %s wrote no <svg> element", self.dot)
            return None
        return svg[start:].replace(
            "<svg ", '<svg role="img" aria-label="dependency graph of the plan" ', 1
        )


def dot_source(nodes: Sequence[PlanNode], edges: Sequence[tuple[str, str, str]]) -> str:
    """The DOT text of ``nodes`` and the ``edges`` (port, dependency, kind) between them.

    Arrows point from a dependency to what needs it: the graph reads in build order.
    Each node shows its name and state in words (colour is not the only cue), and its
    reason as the tooltip.
    """
    lines = [
        "digraph plan {",
        '  graph [rankdir=LR, bgcolor="transparent", nodesep=0.15, ranksep=0.4];',
        '  node [shape=box, style="rounded,filled", fontname="sans-serif", fontsize=11,'
        ' color="#555555", height=0.3];',
        '  edge [color="#777777", arrowsize=0.6];',
    ]
    ids: dict[str, str] = {}
    for index, node in enumerate(nodes):
        ids[node.port] = _node_id(node.port, index)
        name = node_state(node)
        label = f"{node.port}\n{name}"
        tooltip = node.reason.strip() or f"{node.port}: {name}"
        lines.append(
            f"  {ids[node.port]} [id=node{index}, class={_quote(state_class(name), 1)},"
            f" label={_quote(label, 1)}, fillcolor={_quote(COLOURS[name], 1)},"
            f" tooltip={_quote(tooltip, 2)}];"
        )
    for port, dependency, kind in edges:
        if port in ids and dependency in ids:
            style = _EDGE_STYLES.get(kind, "solid")
            lines.append(f"  {ids[dependency]} -> {ids[port]} [style={style}];")
    lines.append("}")
    return "\n".join(lines) + "\n"


def _node_id(port: str, index: int) -> str:
    """The port's name as the DOT node id (it becomes the node's SVG <title>), unless the name
    holds what a DOT ID cannot say plainly (the lexer only knows ``\\"``)."""
    if "\\" in port or "\n" in port or "\r" in port:
        return f"n{index}"
    return _quote(port, 0)


def _quote(text: str, passes: int) -> str:
    """``text`` as a DOT double-quoted string that dot shows as ``text`` itself.

    ``passes``: how many times dot expands escapes in the attribute: 0 for IDs, 1 for labels
    (escString: ``\\N``, ``\\n``, ``\\\\``...), 2 for tooltips (expanded once more when
    written). Backslashes are doubled once per pass; ``&`` is written ``&amp;`` because dot
    passes entities through; newlines become ``\\n``.
    """
    escaped = text
    for _ in range(passes):
        escaped = escaped.replace("\\", "\\\\")
    escaped = escaped.replace('"', '\\"').replace("&", "&amp;")
    if passes:
        escaped = escaped.replace("\r\n", "\n").replace("\r", "\n").replace("\n", "\\n")
    return f'"{escaped}"'

"""``GET /metrics``: the daemon in Prometheus' text exposition format (version 0.0.4).

Two sources: what the HTTP surface counts itself since it started (``Counters``: responses
by status code, repository bytes sent), and the engine's state read at scrape time (queue,
running builds, builds by state, evaluations, build durations, event subscribers). Every
family has ``# HELP`` and ``# TYPE`` lines; label values are escaped as the format says.
"""

from __future__ import annotations

import asyncio
import bisect
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from aiohttp import web

from portsd.daemon.engine import Engine, EngineStatus
from portsd.daemon.state import BuildState

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
DURATION_BUCKETS = (1.0, 5.0, 15.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1200.0, 1800.0, 3600.0)
"""Upper bounds (seconds) of the build duration histogram; builds take seconds to an hour."""


class Counters:
    """What the HTTP surface counts as it serves; mutated on the event loop only."""

    __slots__ = ("responses", "repo_bytes", "streams")

    def __init__(self) -> None:
        self.responses: Counter[int] = Counter()  # by status code
        self.repo_bytes = 0  # repository file bytes handed to the kernel
        self.streams = 0  # open log-follow and event streams

    async def on_response_prepare(
        self, _request: web.Request, response: web.StreamResponse
    ) -> None:
        """The application's ``on_response_prepare`` signal: count every response."""
        self.responses[response.status] += 1


@dataclass(frozen=True, slots=True)
class EngineSnapshot:
    """The engine's side of a scrape, read in one go on a worker thread."""

    status: EngineStatus
    counts: dict[BuildState, int]
    durations: tuple[float, ...]
    evaluations: int
    subscribers: int


def snapshot(engine: Engine) -> EngineSnapshot:
    """Read the engine's state (blocking: sqlite, maybe git)."""
    latest = engine.state.latest_evaluation()
    return EngineSnapshot(
        status=engine.status(),
        counts=engine.state.counts(),
        durations=tuple(engine.state.finished_durations()),
        # ids are sqlite rowids, never reused: the latest is how many there have been
        evaluations=latest.id if latest is not None else 0,
        subscribers=engine.events.subscribers,
    )


def render(counters: Counters, snap: EngineSnapshot) -> str:
    """The exposition text of ``counters`` and ``snap``."""
    out: list[str] = []
    status = snap.status
    _family(out, "portsd_queue_length", "gauge", "Builds queued, not yet running.", status.queued)
    _family(out, "portsd_running_builds", "gauge", "Builds running now.", len(status.running))
    _family(out, "portsd_evaluating", "gauge", "1 while a commit is evaluated.", status.evaluating)
    _family(
        out,
        "portsd_blocked_ports",
        "gauge",
        "Ports of the commit that cannot build.",
        status.blocked,
    )
    _family(
        out,
        "portsd_builds",
        "gauge",
        "Builds recorded in the state database, by state.",
        *((value, {"state": state.value}) for state, value in snap.counts.items()),
    )
    _family(
        out,
        "portsd_evaluations_total",
        "counter",
        "Commits evaluated since the state database was created.",
        snap.evaluations,
    )
    _histogram(
        out,
        "portsd_build_duration_seconds",
        "Durations of finished (built or failed) builds.",
        snap.durations,
        DURATION_BUCKETS,
    )
    _family(
        out,
        "portsd_repo_sent_bytes_total",
        "counter",
        "Bytes of repository files sent to clients since the server started.",
        counters.repo_bytes,
    )
    _family(
        out,
        "portsd_http_responses_total",
        "counter",
        "HTTP responses since the server started, by status code.",
        *((n, {"code": str(code)}) for code, n in sorted(counters.responses.items())),
    )
    _family(
        out, "portsd_event_subscribers", "gauge", "Subscribers to the event bus.", snap.subscribers
    )
    _family(
        out,
        "portsd_http_streams",
        "gauge",
        "Open streaming responses (followed logs, event streams) of the API.",
        counters.streams,
    )
    return "".join(out)


Sample = float | int | bool | tuple[float | int, dict[str, str]]


def _family(out: list[str], name: str, kind: str, help_: str, *samples: Sample) -> None:
    out.append(f"# HELP {name} {_escape_help(help_)}\n# TYPE {name} {kind}\n")
    for sample in samples:
        value, labels = sample if isinstance(sample, tuple) else (sample, {})
        out.append(f"{name}{_labels(labels)} {_number(value)}\n")


def _histogram(
    out: list[str], name: str, help_: str, values: Iterable[float], bounds: Sequence[float]
) -> None:
    ordered = sorted(values)
    out.append(f"# HELP {name} {_escape_help(help_)}\n# TYPE {name} histogram\n")
    for bound in bounds:
        below = bisect.bisect_right(ordered, bound)  # buckets are cumulative, le = "<="
        out.append(f'{name}_bucket{{le="{_number(bound)}"}} {below}\n')
    out.append(f'{name}_bucket{{le="+Inf"}} {len(ordered)}\n')
    out.append(f"{name}_sum {_number(sum(ordered))}\n{name}_count {len(ordered)}\n")


def _labels(labels: dict[str, str]) -> str:
    if not labels:
        return ""
    inner = ",".join(f'{key}="{_escape_label(value)}"' for key, value in labels.items())
    return f"{{{inner}}}"


def _escape_label(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _escape_help(text: str) -> str:
    return text.replace("\\", "\\\\").replace("\n", "\\n")


def _number(value: float | int | bool) -> str:
    if isinstance(value, bool | int):
        return str(int(value))
    return repr(float(value))


class MetricsView:
    """The ``/metrics`` route of one application."""

    def __init__(self, engine: Engine, counters: Counters) -> None:
        self.engine = engine
        self.counters = counters

    async def get(self, _request: web.Request) -> web.Response:
        snap = await asyncio.to_thread(snapshot, self.engine)
        return web.Response(
            text=render(self.counters, snap),
            headers={"Content-Type": CONTENT_TYPE, "Cache-Control": "no-store"},
        )

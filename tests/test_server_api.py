"""The JSON API, its streams, the hook's triggers and /metrics, on a real server."""

from __future__ import annotations

import asyncio
import hashlib
import json
import re
import sqlite3
import threading
import time
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from portsd.daemon.events import EventBus
from portsd.daemon.server.api import MAX_BODY
from portsd.daemon.server.app import create_app, create_runner
from portsd.daemon.server.appkeys import COUNTERS
from portsd.daemon.state import BuildRow, BuildState, NewBuild, State
from tests.serving import (
    ARCH,
    CANARY,
    TOKEN,
    BrokenEngine,
    Server,
    TinyEngine,
    World,
    make_world,
    run,
)

AUTH = {"Authorization": f"Bearer {TOKEN}"}
REF = "0" * 40 + " " + "a" * 40 + " refs/heads/main\n"


@pytest.fixture
def world(tmp_path: Path) -> World:
    return make_world(tmp_path)


def queue_builds(world: World, *ports: str) -> list[int]:
    """An evaluation that queued a build of each of ``ports``; their row ids."""
    evaluation = world.state.start_evaluation("c0ffee" * 6 + "abcd", "main", "test")
    rows = world.state.finish_evaluation(
        evaluation,
        [NewBuild(port, "1.0", hashlib.sha256(port.encode()).hexdigest(), "new") for port in ports],
        blocked=0,
    )
    return [row.id for row in rows]


def start(world: World, build: int, port: str) -> Path:
    """Mark ``build`` running with a log where the daemon puts them; the log's path."""
    log = world.config.logs / port / f"{build}.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    log.write_bytes(b"")
    world.state.start_build(build, str(log))
    return log


async def json_of(response: aiohttp.ClientResponse) -> Any:
    assert response.content_type == "application/json", await response.text()
    return await response.json()


# -- reading ------------------------------------------------------------------------------


def test_status_and_builds(world: World) -> None:
    zlib, hello, big = queue_builds(world, "zlib", "hello", "big")
    start(world, zlib, "zlib")
    world.state.finish_build(hello, BuildState.FAILED, "exit 2")

    async def scenario(server: Server) -> None:
        async with server.session.get(server.url + "/api/v1/status") as response:
            status = await json_of(response)
        assert status["counts"] == {
            "queued": 1, "running": 1, "built": 0, "failed": 1, "skipped": 0, "cancelled": 0,
            "interrupted": 0,
        }  # fmt: skip
        assert status["queued"] == 1 and status["branch"] == "main"
        assert [item["build"]["port"] for item in status["running"]] == ["zlib"]

        async with server.session.get(server.url + "/api/v1/builds") as response:
            builds = (await json_of(response))["builds"]
        assert [b["id"] for b in builds] == [big, hello, zlib]  # newest first
        assert builds[2]["log"] == f"/api/v1/builds/{zlib}/log" and builds[0]["log"] is None

        for query, expected in [
            ("?state=failed", [hello]),
            ("?state=failed,running", [hello, zlib]),
            ("?state=queued&state=running", [big, zlib]),
            ("?port=zlib", [zlib]),
            ("?limit=1", [big]),
            (f"?evaluation={builds[0]['evaluation']}&port=big", [big]),
            ("?evaluation=999", []),
        ]:
            async with server.session.get(server.url + "/api/v1/builds" + query) as response:
                assert [b["id"] for b in (await json_of(response))["builds"]] == expected, query

        for query in ["?state=nope", "?limit=0", "?limit=100000", "?limit=x", "?port=Bad!"]:
            async with server.session.get(server.url + "/api/v1/builds" + query) as response:
                assert response.status == 400, query
                assert "error" in await json_of(response)

        async with server.session.get(server.url + f"/api/v1/builds/{hello}") as response:
            one = await json_of(response)
        assert one["build"]["state"] == "failed" and one["build"]["detail"] == "exit 2"
        assert one["evaluation"]["id"] == one["build"]["evaluation"]
        assert one["evaluation"]["trigger"] == "test"

        for path in ["/api/v1/builds/999", "/api/v1/builds/abc", "/api/v1/builds/-1"]:
            async with server.session.get(server.url + path) as response:
                assert response.status == 404, path
                assert "error" in await json_of(response)

    run(world, scenario)


def test_errors_are_json_without_details(world: World) -> None:
    async def scenario(server: Server) -> None:
        async with server.session.get(server.url + "/api/v1/nothing-here") as response:
            assert response.status == 404
            assert (await json_of(response)) == {"error": "not found"}
        async with server.session.post(server.url + "/api/v1/status") as response:
            assert response.status == 405
            assert "GET" in response.headers["Allow"]
            assert "error" in await json_of(response)
        async with server.session.get(server.url + "/api/v1/status") as response:
            assert response.status == 500
            body = await response.read()
            assert json.loads(body) == {"error": "internal error (see the daemon's log)"}
            assert CANARY not in body and b"Traceback" not in body

    run(world, scenario, engine_class=BrokenEngine)


def test_build_log(world: World) -> None:
    (build,) = queue_builds(world, "zlib")
    log = start(world, build, "zlib")
    log.write_bytes(b"==> build\n" + b"x" * 200_000 + b"\ndone\n")
    world.state.finish_build(build, BuildState.BUILT)
    (other,) = queue_builds(world, "hello")
    outside = world.root / "canary"
    world.state.start_build(other, str(outside))  # a row naming a file outside the logs

    async def scenario(server: Server) -> None:
        for query in ("", "?follow=1"):  # a finished build's log, followed or not, ends
            async with server.session.get(f"{server.url}/api/v1/builds/{build}/log{query}") as r:
                assert r.status == 200
                assert r.headers["Content-Type"].startswith("text/plain")
                assert await r.read() == log.read_bytes()
        async with server.session.get(f"{server.url}/api/v1/builds/{other}/log") as response:
            assert response.status == 404
            assert CANARY not in await response.read()
        async with server.session.get(f"{server.url}/api/v1/builds/12345/log") as response:
            assert response.status == 404

    run(world, scenario)


def test_log_follow_streams_live_and_ends_with_the_build(world: World) -> None:
    (build,) = queue_builds(world, "zlib")
    log = start(world, build, "zlib")
    received_some = threading.Event()
    finished_at: list[float] = []

    def builder() -> None:
        with log.open("ab", buffering=0) as out:
            for n in range(1, 6):
                out.write(f"line {n}\n".encode())
                time.sleep(0.05)
            # the build cannot end before the follower has seen its first lines
            assert received_some.wait(20), "nothing reached the follower while the build ran"
            for n in range(6, 11):
                out.write(f"line {n}\n".encode())
        finished_at.append(time.monotonic())
        world.state.finish_build(build, BuildState.BUILT)

    async def scenario(server: Server) -> None:
        url = f"{server.url}/api/v1/builds/{build}/log?follow=1"
        async with server.session.get(url) as response:
            assert response.status == 200
            thread = threading.Thread(target=builder)
            thread.start()
            lines: list[tuple[bytes, float]] = []
            async for line in response.content:  # ends when the server ends the stream
                lines.append((line, time.monotonic()))
                if len(lines) == 3:
                    received_some.set()
            ended = time.monotonic()
        await asyncio.to_thread(thread.join, 20)
        assert [text for text, _ in lines] == [f"line {n}\n".encode() for n in range(1, 11)]
        assert lines[2][1] < finished_at[0] <= ended
        assert server.app[COUNTERS].streams == 0

    run(world, scenario)


def test_log_follow_waits_for_a_queued_build(world: World) -> None:
    (build,) = queue_builds(world, "zlib")

    def daemon() -> None:
        time.sleep(0.3)
        log = start(world, build, "zlib")
        log.write_bytes(b"started late\n")
        time.sleep(0.3)
        world.state.finish_build(build, BuildState.FAILED, "exit 1")

    async def scenario(server: Server) -> None:
        thread = threading.Thread(target=daemon)
        thread.start()
        async with server.session.get(f"{server.url}/api/v1/builds/{build}/log?follow=1") as r:
            assert await r.read() == b"started late\n"
        await asyncio.to_thread(thread.join, 10)

    run(world, scenario)


def test_log_follower_leaving_ends_its_task(world: World) -> None:
    (build,) = queue_builds(world, "zlib")
    log = start(world, build, "zlib")
    log.write_bytes(b"first line\n")

    async def scenario(server: Server) -> None:
        counters = server.app[COUNTERS]
        tasks_before = len(asyncio.all_tasks())
        reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
        writer.write(
            f"GET /api/v1/builds/{build}/log?follow=1 HTTP/1.1\r\nHost: x\r\n\r\n".encode()
        )
        await reader.readuntil(b"first line\n")
        assert counters.streams == 1
        writer.close()
        for _ in range(100):
            if counters.streams == 0 and len(asyncio.all_tasks()) <= tasks_before:
                break
            await asyncio.sleep(0.05)
        assert counters.streams == 0  # the build still runs: only the disconnect ended it
        assert len(asyncio.all_tasks()) <= tasks_before

    run(world, scenario)


class FailingState(State):
    """A state database that breaks after ``working`` reads of a build."""

    def __init__(self, path: Path, working: int) -> None:
        super().__init__(path)
        self.working = working

    def build(self, build: int) -> BuildRow | None:
        self.working -= 1
        if self.working < 0:
            raise sqlite3.OperationalError("disk I/O error")
        return super().build(build)


def test_a_stream_that_fails_is_cut_not_answered_twice(world: World) -> None:
    (build,) = queue_builds(world, "zlib")
    start(world, build, "zlib").write_bytes(b"first line\n")
    world.state = FailingState(world.config.database, working=1)

    async def scenario(server: Server) -> None:
        url = f"{server.url}/api/v1/builds/{build}/log?follow=1"
        async with server.session.get(url) as response:
            assert response.status == 200
            with pytest.raises(aiohttp.ClientPayloadError):
                await response.read()  # cut short: not a complete (chunked) body
        assert server.app[COUNTERS].streams == 0
        status, _, _ = await server.get(f"/repo/{ARCH}/packages/{world.packages['zlib'].file}")
        assert status == 200

    run(world, scenario)


def test_events_stream_receives_published_events(world: World) -> None:
    async def scenario(server: Server) -> None:
        async with server.session.get(server.url + "/api/v1/events") as response:
            assert response.headers["Content-Type"] == "text/event-stream"
            assert (await response.content.readuntil(b"\n\n")).startswith(b"retry:")
            assert server.engine.events.subscribers == 1
            # published from another thread, as builds do
            await asyncio.to_thread(server.engine.events.publish, "build", id=7, state="built")
            frame = await asyncio.wait_for(response.content.readuntil(b"\n\n"), 10)
        fields = dict(line.split(": ", 1) for line in frame.decode().strip().split("\n"))
        assert fields["event"] == "build"
        assert json.loads(fields["data"]) == {"id": 7, "state": "built"}
        for _ in range(100):
            if server.engine.events.subscribers == 0:
                break
            await asyncio.sleep(0.05)
        assert server.engine.events.subscribers == 0

    run(world, scenario)


def test_shutdown_ends_streams_at_once(world: World) -> None:
    (build,) = queue_builds(world, "zlib")
    start(world, build, "zlib").write_bytes(b"running\n")

    async def main() -> None:
        engine = TinyEngine(
            world.config, world.state, world.repo, EventBus(asyncio.get_running_loop())
        )
        runner = create_runner(create_app(world.config, engine))
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        url = f"http://127.0.0.1:{runner.addresses[0][1]}"
        async with aiohttp.ClientSession() as session:
            events = await session.get(url + "/api/v1/events")
            follow = await session.get(f"{url}/api/v1/builds/{build}/log?follow=1")
            await events.content.readuntil(b"\n\n")
            await follow.content.readuntil(b"running\n")
            began = time.monotonic()
            await runner.cleanup()
            assert time.monotonic() - began < 3
            assert await asyncio.wait_for(events.read(), 5) == b""  # ended cleanly
            assert await asyncio.wait_for(follow.read(), 5) == b""
            events.release()
            follow.release()

    asyncio.run(asyncio.wait_for(main(), 30))


# -- substituter query --------------------------------------------------------------------


def test_keys(world: World) -> None:
    entry = world.packages["zlib"]

    async def scenario(server: Server) -> None:
        async with server.session.get(
            f"{server.url}/api/v1/keys/{entry.meta.build_key}"
        ) as response:
            found = await json_of(response)
        assert found["key"] == entry.meta.build_key
        assert found["package"]["sha256"] == entry.sha256
        assert found["package"]["name"] == "zlib" and found["package"]["size"] == entry.size
        assert found["url"] == f"/repo/{ARCH}/packages/{entry.file}"
        status, _, body = await server.get(found["url"])
        assert status == 200 and hashlib.sha256(body).hexdigest() == entry.sha256
        status, _, signature = await server.get(found["signature"])
        assert status == 200 and signature.startswith(b"untrusted comment:")

        async with server.session.get(f"{server.url}/api/v1/keys/{'ab' * 32}") as response:
            assert response.status == 404
            assert "error" in await json_of(response)
        for bad in [
            entry.meta.build_key.upper(),
            entry.meta.build_key[:63],
            entry.meta.build_key + "0",
            "..%2f..%2fkeys",
            "z" * 64,
        ]:
            async with server.session.get(f"{server.url}/api/v1/keys/{bad}") as response:
                assert response.status in (400, 404), bad
                assert "error" in await json_of(response)
        async with server.session.get(
            f"{server.url}/api/v1/keys/{entry.meta.build_key.upper()}"
        ) as response:
            assert response.status == 400

    run(world, scenario)


# -- triggers -----------------------------------------------------------------------------


def test_push_needs_the_token(world: World) -> None:
    async def scenario(server: Server) -> None:
        url = server.url + "/api/v1/push"
        for headers in [
            {},
            {"Authorization": "Bearer wrong"},
            {"Authorization": f"Bearer {TOKEN}x"},
            {"Authorization": f"Basic {TOKEN}"},
            {"Authorization": "Bearer "},
            {"Authorization": TOKEN},
        ]:
            async with server.session.post(url, data=REF, headers=headers) as response:
                assert response.status == 401, headers
                assert response.headers["WWW-Authenticate"] == "Bearer"
                assert "error" in await json_of(response)
        assert server.engine.triggers == []

        async with server.session.post(url, data=REF, headers=AUTH) as response:
            assert response.status == 202
            answer = await json_of(response)
        assert server.engine.triggers == ["hook"]
        assert answer["refs"] == [{"old": "0" * 40, "new": "a" * 40, "ref": "refs/heads/main"}]

        async with server.session.post(url, headers=AUTH) as response:  # no body: fine
            assert response.status == 202
        async with server.session.post(url, data="not a ref line\n", headers=AUTH) as response:
            assert response.status == 400
        assert server.engine.triggers == ["hook", "hook"]

    run(world, scenario)


def test_push_refused_without_a_token_file(world: World) -> None:
    world.config.token_file.write_text("\n")  # an empty token must not let "Bearer " in

    async def scenario(server: Server) -> None:
        for headers in [{"Authorization": "Bearer "}, {"Authorization": "Bearer   "}, AUTH]:
            async with server.session.post(server.url + "/api/v1/push", headers=headers) as r:
                assert r.status == 401
        world.config.token_file.unlink()
        async with server.session.post(server.url + "/api/v1/push", headers=AUTH) as response:
            assert response.status == 401
        assert server.engine.triggers == []

    run(world, scenario)


def test_oversize_bodies_are_refused(world: World) -> None:
    big = REF * (MAX_BODY // len(REF) + 1)

    async def chunked() -> Any:
        for start in range(0, len(big), 4096):
            yield big[start : start + 4096].encode()

    async def scenario(server: Server) -> None:
        url = server.url + "/api/v1/push"
        async with server.session.post(url, data=big, headers=AUTH) as response:
            assert response.status == 413
            assert "error" in await json_of(response)
        async with server.session.post(url, data=chunked(), headers=AUTH) as response:
            assert response.status == 413  # no Content-Length: counted while read
        assert server.engine.triggers == []
        async with server.session.post(url, data=REF * 100, headers=AUTH) as response:
            assert response.status == 202

    run(world, scenario)


def test_rebuild(world: World) -> None:
    async def scenario(server: Server) -> None:
        url = server.url + "/api/v1/rebuild"
        body = {"ports": ["zlib", "nosuchport", "zlib"]}
        async with server.session.post(url, json=body) as response:
            assert response.status == 401
        assert server.engine.rebuilds == []
        async with server.session.post(url, json=body, headers=AUTH) as response:
            assert response.status == 202
            answer = await json_of(response)
        assert answer == {"requested": ["zlib", "nosuchport"], "accepted": ["zlib"]}
        assert server.engine.rebuilds == [["zlib", "nosuchport"]]
        for bad in [b"{", b"[]", b'{"ports": []}', b'{"ports": ["Bad Name"]}', b'{"ports": [1]}']:
            async with server.session.post(url, data=bad, headers=AUTH) as response:
                assert response.status == 400, bad
                assert "error" in await json_of(response)
        assert len(server.engine.rebuilds) == 1

    run(world, scenario)


# -- metrics ------------------------------------------------------------------------------

_NAME = r"[a-zA-Z_:][a-zA-Z0-9_:]*"
_LABEL = r'[a-zA-Z_][a-zA-Z0-9_]*="(?:[^"\\\n]|\\[\\"n])*"'
_SAMPLE = re.compile(
    rf"({_NAME})(\{{{_LABEL}(?:,{_LABEL})*\}})? (-?[0-9]+(?:\.[0-9]+)?(?:e[+-]?[0-9]+)?|\+Inf|NaN)"
)


def parse_metrics(text: str) -> dict[str, float]:
    """Check the exposition format line by line; samples by ``name{labels}``."""
    types: dict[str, str] = {}
    helped: set[str] = set()
    samples: dict[str, float] = {}
    assert text.endswith("\n")
    for line in text.splitlines():
        if line.startswith("# HELP "):
            helped.add(line.split(" ")[2])
        elif line.startswith("# TYPE "):
            _, _, name, kind = line.split(" ")
            assert kind in ("counter", "gauge", "histogram"), line
            assert name not in types, f"two TYPE lines for {name}"
            types[name] = kind
        else:
            match = _SAMPLE.fullmatch(line)
            assert match is not None, f"not a sample line: {line!r}"
            name = match.group(1)
            family = re.sub(r"_(bucket|sum|count)$", "", name)
            family = family if family in types else name
            assert family in types and family in helped, f"no HELP/TYPE before {name}"
            if types[family] == "counter":
                assert name.endswith("_total"), name
            samples[name + (match.group(2) or "")] = float(match.group(3))
    return samples


def test_metrics(world: World) -> None:
    zlib, hello, big = queue_builds(world, "zlib", "hello", "big")
    start(world, zlib, "zlib")
    start(world, hello, "hello")
    world.state.finish_build(hello, BuildState.BUILT)
    package = world.packages["zlib"]

    async def scenario(server: Server) -> None:
        async def scrape() -> dict[str, float]:
            async with server.session.get(server.url + "/metrics") as response:
                assert response.status == 200
                assert response.headers["Content-Type"].startswith("text/plain; version=0.0.4")
                return parse_metrics(await response.text())

        first = await scrape()
        assert first["portsd_queue_length"] == 1
        assert first["portsd_running_builds"] == 1
        assert first['portsd_builds{state="built"}'] == 1
        assert first['portsd_builds{state="running"}'] == 1
        assert first['portsd_builds{state="failed"}'] == 0
        assert first["portsd_evaluations_total"] == 1
        assert first["portsd_build_duration_seconds_count"] == 1
        assert first['portsd_build_duration_seconds_bucket{le="+Inf"}'] == 1
        assert first['portsd_build_duration_seconds_bucket{le="1.0"}'] == 1
        sent = first["portsd_repo_sent_bytes_total"]

        status, _, body = await server.get(f"/repo/{ARCH}/packages/{package.file}")
        assert status == 200 and len(body) == package.size
        status, _, body = await server.get(
            f"/repo/{ARCH}/packages/{package.file}", headers={"Range": "bytes=0-9"}
        )
        assert status == 206
        status, _, _ = await server.get(f"/repo/{ARCH}/packages/missing")
        assert status == 404

        async with server.session.get(server.url + "/api/v1/events") as events:
            await events.content.readuntil(b"\n\n")
            during = await scrape()
        assert during["portsd_event_subscribers"] == 1
        assert during["portsd_http_streams"] == 1
        assert during["portsd_repo_sent_bytes_total"] == sent + package.size + 10
        assert during['portsd_http_responses_total{code="206"}'] == 1
        assert during['portsd_http_responses_total{code="404"}'] == 1
        assert during['portsd_http_responses_total{code="200"}'] >= 2

    run(world, scenario)

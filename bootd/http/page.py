"""The status page: where every node is, and why, for an operator's browser.

Theory of operation
-------------------

The page is served by the admin listener (unix socket or loopback, never the boot
network) and draws the answers of the same admin API `bootd status` reads.

Rules:

1. Everything renders on the server: the overview (nodes per stage, one cell per node,
   the last errors, the boot-time histogram, the whole table) and a node's timeline are
   plain HTML and SVG, readable without JavaScript; filters are a GET form.
2. JavaScript (static/status.js, no library) only makes it live: it reads
   /api/v1/status, then follows /api/v1/status/stream, a Server-Sent Events stream of
   the nodes that changed since the version it has (a new event, or a stall that began),
   so that 5,000 nodes cost one full read and then small updates. The stream's event id
   is "version:time", so a reconnecting browser resumes where it was.
3. Every string from a node is shown as text: Jinja2 escapes HTML, `printable` shows
   control characters as \\xNN, the script only ever sets textContent. Stages are a
   closed set (bootd.state.events.STAGES), so they can name CSS classes.
4. A stream ends by itself after STREAM_LIFETIME (the browser reconnects) and at once
   when the server shuts down, so that no page holds a drain open.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from importlib import resources
from typing import Any
from urllib.parse import quote

from aiohttp import web
from jinja2 import Environment, PackageLoader, select_autoescape

from bootd.fleet.directory import NodeDirectory
from bootd.fleet.mac import normalize_mac
from bootd.ops.text import ago, duration, printable
from bootd.state import events
from bootd.state.events import Attempt, NodeState
from bootd.state.recorder import Recorder
from bootd.state.timelines import PHASES, Bar, Gap, Storm, bars, gaps, last_storm

POLL = 0.5  # how often a stream looks for changes (a stage reaches the page within ~1 s)
HEARTBEAT = 15.0  # a comment line keeps proxies and `ssh -L` from closing a quiet stream
STREAM_LIFETIME = 600.0
STORM_GAP = 600.0  # joined attempts further apart than this are not one storm
LAST_ERRORS = 10
# Table rows drawn, troubled nodes first: all 5,000 would double the page (2.7 MB) and
# the browser's layout time; the cells above show every node, the filters narrow it.
TABLE_ROWS = 500

_env = Environment(loader=PackageLoader("bootd.http", "templates"),
                   autoescape=select_autoescape(default=True), trim_blocks=True,
                   lstrip_blocks=True)
_env.filters["text"] = printable
_env.filters["lines"] = lambda value: "\n".join(map(printable, str(value).split("\n")))
_env.filters["duration"] = duration
_env.globals["STAGES"] = events.STAGES
_env.globals["TABLE_ROWS"] = TABLE_ROWS
_STATIC = {"status.js": "text/javascript", "status.css": "text/css"}


@dataclass(frozen=True)
class Explainer:
    """`bootd explain` for the page, wired by the daemon (the admin API does not import
    the DHCP code): run(mac, arch, ipxe) -> its text."""

    arches: tuple[str, ...]
    run: Callable[[str, str, bool], str]


@dataclass(frozen=True)
class PageSources:
    """What the page reads, from the admin app: the current snapshot's node directory and
    the recorder (None: a process without one, where the page says so)."""

    directory: Callable[[], NodeDirectory]
    recorder: Recorder | None
    explainer: Explainer | None
    closing: asyncio.Event


SOURCES = web.AppKey("page_sources", PageSources)


def _document(sources: PageSources, only: Iterable[str] | None = None) -> dict[str, Any]:
    recorder = sources.recorder
    directory = sources.directory()
    if recorder is None:
        return {"now": time.time(), "version": 0, "nodes": []}
    return recorder.status_document(directory.nodes, directory.inventory.network_name,
                                    only=only, desired=directory.desired_image)


def row_class(row: Mapping[str, Any]) -> str:
    """CSS classes of a node's cell and row: its stage, and whether it is stalled."""
    stage = str(row["stage"])
    stage = stage if stage in events.STAGES or stage == "never-seen" else events.OTHER
    return f"s-{stage}" + (" stalled" if row["stalled"] else "")


def row_key(row: Mapping[str, Any]) -> str:
    """The recorder's key of a node: its name, else its MAC."""
    return str(row["node"] or row["mac"] or "?")


def _order(row: Mapping[str, Any]) -> tuple[int, str, str]:
    bad = row["stalled"] or row["stage"] in (events.FAILED, events.REFUSED)
    rank = 0 if bad else 2 if row["stage"] in (events.JOINED, "never-seen") else 1
    return rank, row["pool"] or "~", row_key(row)


FILTERS = ("pool", "network", "stage", "image")


def _decorated(row: Mapping[str, Any]) -> dict[str, Any]:
    """A row with what its cell shows, worked out here: 5,000 cells through Jinja2
    filters cost the page ~0.4 s more."""
    key = row_key(row)
    stalled = " (stalled)" if row["stalled"] else ""
    return {**row, "key": key, "cls": row_class(row), "href": "/nodes/" + quote(key, safe=""),
            "title": printable(f"{key}: {row['stage']}{stalled}")}


def matches(row: Mapping[str, Any], wanted: Mapping[str, str]) -> bool:
    for name in FILTERS:
        value = wanted.get(name)
        if not value:
            continue
        if name == "stage" and value == "stalled":
            if not row["stalled"]:
                return False
        elif str(row.get(name) or "") != value:
            return False
    return True


def _natural(text: str) -> list[str | int]:
    """Sort key that puts rack2 before rack10: digit runs compare as numbers (the split
    alternates text and digits, so the types line up)."""
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", text)]


def group_of(row: Mapping[str, Any], by: str) -> str:
    return str(row.get(by) or f"(no {by})")


@dataclass(frozen=True)
class Overview:
    now: float
    version: int
    total: int
    rows: list[dict[str, Any]]  # after the filters, in `bootd status` order
    table: list[dict[str, Any]]  # the first TABLE_ROWS of them
    groups: list[tuple[str, list[dict[str, Any]]]]
    counts: list[tuple[str, int]]  # per stage ("stalled" apart), in boot order
    errors: list[dict[str, Any]]  # the latest LAST_ERRORS nodes with an error
    choices: dict[str, list[str]]  # the values each filter can take
    wanted: dict[str, str]
    group_by: str


def overview(document: Mapping[str, Any], wanted: Mapping[str, str],
             group_by: str | None = None) -> Overview:
    all_rows: list[dict[str, Any]] = list(document["nodes"])
    networks = {r.get("network") for r in all_rows} - {None}
    by = group_by if group_by in ("pool", "network") else (
        "network" if len(networks) > 1 else "pool")
    rows = sorted((_decorated(r) for r in all_rows if matches(r, wanted)), key=_order)
    groups: dict[str, list[dict[str, Any]]] = {}
    for row in sorted(rows, key=lambda r: (_natural(group_of(r, by)), _natural(r["key"]))):
        groups.setdefault(group_of(row, by), []).append(row)
    tally: dict[str, int] = {}
    for row in rows:
        key = "stalled" if row["stalled"] else str(row["stage"])
        tally[key] = tally.get(key, 0) + 1
    order = ["never-seen", *events.STAGES, "stalled"]
    counts = sorted(tally.items(), key=lambda kv: order.index(kv[0]) if kv[0] in order
                    else len(order))
    errors = sorted((r for r in rows if r.get("last_error")),
                    key=lambda r: -(r.get("last_seen") or 0))[:LAST_ERRORS]
    choices = {name: sorted({str(r[name]) for r in all_rows if r.get(name)})
               for name in FILTERS}
    choices["stage"] = [s for s in order if s in {str(r["stage"]) for r in all_rows}
                        or (s == "stalled" and any(r["stalled"] for r in all_rows))]
    return Overview(float(document["now"]), int(document.get("version", 0)), len(all_rows),
                    rows, rows[:TABLE_ROWS], list(groups.items()), counts, errors, choices,
                    {k: v for k, v in wanted.items() if k in FILTERS and v}, by)


# ---------------------------------------------------------------------- pictures


@dataclass(frozen=True)
class Chart:
    """One attempt as a Gantt chart: lanes of bars on a shared time scale."""

    attempt: Attempt
    lanes: list[str]
    bars: tuple[Bar, ...]
    gaps: tuple[Gap, ...]
    origin: float  # seconds at the left edge (negative: work began before the first event)
    span: float  # seconds across the chart
    ticks: list[float]


CHART_WIDTH = 640  # SVG user units of the time axis
LANE_HEIGHT = 18


def _ticks(origin: float, span: float) -> list[float]:
    step = next(s for s in (0.5, 1, 2, 5, 10, 15, 30, 60, 120, 300, 600, 1800, 3600, 7200)
                if span / s <= 8) if span <= 57600 else span / 8
    first = step * int(origin // step)
    return [first + i * step for i in range(int(span // step) + 2)
            if origin <= first + i * step <= origin + span]


def charts(attempts: list[Attempt]) -> list[Chart]:
    """The attempts' charts on one scale and one set of lanes, so that they compare."""
    drawn = [(a, bars(a)) for a in attempts]
    origin = min([0.0, *(b.start for _, bs in drawn for b in bs)])
    end = max([1.0, *(b.end for _, bs in drawn for b in bs)])
    used = {b.phase for _, bs in drawn for b in bs}
    lanes = [p for p in PHASES if p in used]
    span = end - origin
    return [Chart(a, lanes, bs, gaps(bs), origin, span, _ticks(origin, span))
            for a, bs in drawn]


def x_of(chart: Chart, seconds: float) -> float:
    return round((seconds - chart.origin) / chart.span * CHART_WIDTH, 1)


_env.globals["x_of"] = x_of
_env.globals["CHART_WIDTH"] = CHART_WIDTH
_env.globals["LANE_HEIGHT"] = LANE_HEIGHT


# ---------------------------------------------------------------------- routes

routes = web.RouteTableDef()


def _sources(request: web.Request) -> PageSources:
    return request.app[SOURCES]


async def _html(template: str, **context: Any) -> web.Response:
    # Rendered off the event loop: 5,000 nodes take ~0.5 s, and DHCP shares the loop.
    # The context is immutable data by now (documents, frozen states).
    text = await asyncio.to_thread(_env.get_template(template).render, **context)
    response = web.Response(text=text, content_type="text/html", charset="utf-8",
                            headers={"Content-Security-Policy": CSP,
                                     "X-Content-Type-Options": "nosniff"})
    response.enable_compression()
    return response


# Nothing but this server's own script and style: a node's text can never run as code.
CSP = ("default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; "
       "connect-src 'self'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'")


def _storm(recorder: Recorder | None) -> Storm | None:
    return None if recorder is None else last_storm(recorder.states(), STORM_GAP)


@routes.get("/")
async def page(request: web.Request) -> web.Response:
    sources = _sources(request)
    view = overview(_document(sources), request.query, request.query.get("group"))
    return await _html("overview.html.j2", view=view, storm=_storm(sources.recorder),
                 ago=ago,
                 recording=sources.recorder is not None)


@routes.get("/fragments/boot-times")
async def boot_times_fragment(request: web.Request) -> web.Response:
    return await _html("boot_times.html.j2", storm=_storm(_sources(request).recorder))


@routes.get("/api/v1/boot-times")
async def boot_times(request: web.Request) -> web.Response:
    storm = _storm(_sources(request).recorder)
    return web.json_response(None if storm is None else storm.to_json())


def _find(recorder: Recorder, wanted: str) -> NodeState:
    state = recorder.find(wanted)
    if state is None:
        raise web.HTTPNotFound(text=f"bootd: no boot events for {printable(wanted)!r}\n")
    return state


@routes.get("/nodes/{key}")
async def node_page(request: web.Request) -> web.Response:
    sources = _sources(request)
    if sources.recorder is None:
        raise web.HTTPNotImplemented(text="bootd: no event recorder in this process\n")
    state = _find(sources.recorder, request.match_info["key"])
    recent = list(state.history[-2:])
    drawn = charts(list(reversed(recent)))  # the latest first, the previous beside it
    network = sources.directory().inventory.network_name(state.ip)
    fragment = request.query.get("fragment") == "1"  # the overview's side panel
    return await _html("node_body.html.j2" if fragment else "node.html.j2", state=state,
                 network=network, charts=drawn, now=time.time(), ago=ago,
                 cls=row_class({"stage": state.stage, "stalled": state.stalled}))


@routes.get("/explain/{mac}")
async def explain_page(request: web.Request) -> web.Response:
    explainer = _sources(request).explainer
    if explainer is None:
        raise web.HTTPNotImplemented(text="bootd: explain is not wired in this process\n")
    try:
        mac = normalize_mac(request.match_info["mac"])
    except ValueError as exc:
        raise web.HTTPBadRequest(text=f"bootd: {exc}\n") from None
    arch = request.query.get("arch", explainer.arches[0])
    if arch not in explainer.arches:
        raise web.HTTPBadRequest(text=f"bootd: arch is one of {', '.join(explainer.arches)}\n")
    ipxe = request.query.get("ipxe") == "1"
    return await _html("explain.html.j2", mac=mac, arch=arch, ipxe=ipxe,
                 text=explainer.run(mac, arch, ipxe), arches=explainer.arches)


@routes.get("/static/{name}")
async def static(request: web.Request) -> web.Response:
    name = request.match_info["name"]
    if name not in _STATIC:
        raise web.HTTPNotFound()
    body = resources.files("bootd.http").joinpath("static", name).read_bytes()
    return web.Response(body=body, content_type=_STATIC[name],
                        headers={"Cache-Control": "no-cache"})


def _resume_point(request: web.Request, recorder: Recorder) -> tuple[int, float]:
    """Where a stream starts: the browser's Last-Event-ID on a reconnect, else the
    `since` and `at` of the document it read."""
    raw = request.headers.get("Last-Event-ID") or (
        f"{request.query['since']}:{request.query.get('at', time.time())}"
        if "since" in request.query else f"{recorder.version}:{time.time()}")
    try:
        version, _, at = raw.partition(":")
        return int(version), float(at or time.time())
    except ValueError:
        raise web.HTTPBadRequest(text="bootd: since is a version number\n") from None


@routes.get("/api/v1/status/stream")
async def status_stream(request: web.Request) -> web.StreamResponse:
    """Server-Sent Events: `nodes` events carrying {"now", "version", "nodes": [rows of
    the nodes that changed]}, in the schema of /api/v1/status."""
    sources = _sources(request)
    recorder = sources.recorder
    if recorder is None:
        raise web.HTTPNotImplemented(text="bootd: no event recorder in this process\n")
    version, at = _resume_point(request, recorder)
    response = web.StreamResponse(headers={
        "Content-Type": "text/event-stream", "Cache-Control": "no-cache",
        "X-Accel-Buffering": "no"})
    await response.prepare(request)
    started = quiet_since = time.monotonic()
    with contextlib.suppress(ConnectionError, asyncio.CancelledError):
        await response.write(b"retry: 2000\n\n")
        while time.monotonic() - started < STREAM_LIFETIME and not sources.closing.is_set():
            now = time.time()
            keys = recorder.changed_since(version, at, now)
            if keys:
                document = _document(sources, only=keys)
                version, at = int(document["version"]), now
                data = json.dumps(document, separators=(",", ":"))
                await response.write(
                    f"id: {version}:{at}\nevent: nodes\ndata: {data}\n\n".encode())
                quiet_since = time.monotonic()
            elif time.monotonic() - quiet_since > HEARTBEAT:
                await response.write(b": still here\n\n")
                quiet_since = time.monotonic()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(sources.closing.wait(), POLL)
    return response


def add_page(app: web.Application, sources: PageSources) -> None:
    """Serve the page from `app` (the admin API's)."""
    app[SOURCES] = sources

    async def closing(_: web.Application) -> None:
        sources.closing.set()

    app.on_shutdown.append(closing)
    app.add_routes(routes)

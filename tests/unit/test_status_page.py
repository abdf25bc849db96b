"""The status page through aiohttp's test client: overview, node timeline, explain, the
live stream, node text shown as text, and the weight of 5,000 nodes."""

from __future__ import annotations

import asyncio
import gzip
import json
import re
import time
from collections.abc import AsyncIterator
from html.parser import HTMLParser
from pathlib import Path

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient

from bootd.cli.explain import ARCH_CODES, explain
from bootd.fleet.config import parse_config
from bootd.http.admin import admin_app
from bootd.http.page import Explainer
from bootd.live import View
from bootd.ops.metrics import Metrics
from bootd.state import events as ev
from bootd.state.events import BootEvent
from bootd.state.recorder import EventPolicy, Recorder
from bootd.state.store import Store
from tests.unit.test_http_app import client_for, context, make_config
from tests.unit.test_timelines import boot, event

HOSTILE = '<script>alert(1)</script>\x1b[2J\x1b]0;pwned\x07 "quoted" & <b>bold</b>'


class Page(HTMLParser):
    """The elements of a page as (tag, attrs) and its text, as a browser would parse."""

    def __init__(self, html: str) -> None:
        super().__init__()
        self.elements: list[tuple[str, dict[str, str | None]]] = []
        self.text: list[str] = []
        self.feed(html)

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.elements.append((tag, dict(attrs)))

    def handle_data(self, data: str) -> None:
        self.text.append(data)

    def all(self, tag: str, **wanted: str) -> list[dict[str, str | None]]:
        return [a for t, a in self.elements if t == tag
                and all(wanted[k] in (a.get(k.rstrip("_")) or "").split() or
                        a.get(k.rstrip("_")) == wanted[k] for k in wanted)]


@pytest.fixture
def recorder() -> Recorder:
    rec = Recorder(None, EventPolicy(stall_after=600, keep_attempts=3))
    now = time.time()
    for e in boot(now - 400, "me", "w", took=30) + boot(now - 100, "me", "w", took=40):
        rec.record(e)
    rec.record(BootEvent(now - 50, ev.DHCP_DISCOVER, None, "52:54:00:00:00:99", None, None))
    rec.record(BootEvent(now - 40, ev.FAILED, "other", "02:00:00:00:00:02", "127.0.0.2",
                         "w", "error", {"message": HOSTILE, "reported": True}))
    return rec


@pytest.fixture
async def admin(tree: Path, recorder: Recorder,
                ) -> AsyncIterator[TestClient[web.Request, web.Application]]:
    config = parse_config(make_config(tree))
    explainer = Explainer(tuple(ARCH_CODES), lambda mac, arch, ipxe: explain(
        config, mac, arch, ipxe))
    client = await client_for(admin_app(View.fixed(context(tree).admin), Metrics(), recorder,
                                        explainer=explainer))
    yield client
    await client.close()


async def test_overview_draws_every_node_by_stage(
        admin: TestClient[web.Request, web.Application]) -> None:
    resp = await admin.get("/")
    assert resp.status == 200 and resp.content_type == "text/html"
    assert "script-src 'self'" in resp.headers["Content-Security-Policy"]
    page = Page(await resp.text())
    cells = {a["data-k"]: a["class"] for a in page.all("a", class_="c")}
    assert cells == {"me": "c s-joined", "other": "c s-failed",
                     "52:54:00:00:00:99": "c s-dhcp-discover", "noimg": "c s-never-seen"}
    rows = {a["data-k"] for a in page.all("tr") if a.get("data-k")}
    assert rows == set(cells)
    legend = "".join(page.text)
    assert "1 joined" in re.sub(r"\s+", " ", legend)
    # the histogram of the last storm: me's two boots are 300 s apart, one storm
    assert page.all("figure", class_="hist")
    assert page.all("script", src="/static/status.js")


async def test_overview_filters_without_javascript(
        admin: TestClient[web.Request, web.Application]) -> None:
    page = Page(await (await admin.get("/?stage=failed")).text())
    assert [a["data-k"] for a in page.all("a", class_="c")] == ["other"]
    page = Page(await (await admin.get("/?pool=w&stage=joined")).text())
    assert [a["data-k"] for a in page.all("a", class_="c")] == ["me"]
    selected = [a for a in page.all("option") if "selected" in a]
    assert {a["value"] for a in selected} >= {"w", "joined"}


async def test_node_text_is_shown_as_text_everywhere(
        admin: TestClient[web.Request, web.Application]) -> None:
    for path in ("/", "/nodes/other", "/nodes/other?fragment=1"):
        html = await (await admin.get(path)).text()
        assert "<script>alert" not in html and "<b>bold" not in html
        assert "\x1b" not in html and "\x07" not in html
        assert "&lt;script&gt;alert(1)&lt;/script&gt;\\x1b[2J\\x1b]0;pwned\\x07" in html
    status = await (await admin.get("/api/v1/status")).json()
    failed = next(n for n in status["nodes"] if n["node"] == "other")
    assert HOSTILE in failed["last_error"]  # JSON carries it intact, escaped by the codec


async def test_node_timeline_is_a_gantt_of_the_last_two_attempts(
        admin: TestClient[web.Request, web.Application]) -> None:
    page = Page(await (await admin.get("/nodes/me")).text())
    attempts = page.all("section", class_="attempt")
    assert [a["data-attempt"] for a in attempts] == ["2", "1"]  # latest first
    phases = [a["data-phase"] for a in page.all("rect", class_="bar")]
    one = ["DHCP", "TFTP", "DHCP", "iPXE script", "kernel", "initrd", "initramfs", "DHCP",
           "rootfs", "join", "joined"]
    assert phases == one + one
    assert page.all("rect", class_="gap")  # the kernel booting: bootd saw nothing
    widths = [float(a["width"] or 0) for a in page.all("rect", class_="bar")]
    # one time scale for both: the 40 s boot's bars are wider than the 30 s boot's
    assert widths[len(one) + 8] < widths[8]
    assert page.all("a", href="/explain/02%3A00%3A00%3A00%3A00%3A01")
    # the same data as a table: one row per event
    assert len(page.all("tr", class_="o-ok")) == 2 * len(boot(0))
    # by MAC too, and a fragment for the overview's panel has no page around it
    assert (await admin.get("/nodes/02-00-00-00-00-01")).status == 200
    fragment = await (await admin.get("/nodes/me?fragment=1")).text()
    assert "<html" not in fragment and 'class="gantt"' in fragment
    assert (await admin.get("/nodes/nobody")).status == 404


async def test_explain_page_is_bootd_explain(
        admin: TestClient[web.Request, web.Application], tree: Path) -> None:
    config = parse_config(make_config(tree))
    html = await (await admin.get("/explain/02:00:00:00:00:01?arch=efi64&ipxe=1")).text()
    pre = html.split('<pre class="explain">', 1)[1].split("</pre>", 1)[0]
    expected = explain(config, "02:00:00:00:00:01", "efi64", True)
    assert pre.replace("&lt;", "<").replace("&gt;", ">").replace("&#34;", '"').replace(
        "&#39;", "'").replace("&amp;", "&") == expected
    assert (await admin.get("/explain/02:00:00:00:00:01?arch=z80")).status == 400
    assert (await admin.get("/explain/not-a-mac")).status == 400


async def test_static_files_and_nothing_else(
        admin: TestClient[web.Request, web.Application]) -> None:
    js = await admin.get("/static/status.js")
    assert js.status == 200 and js.content_type == "text/javascript"
    assert (await admin.get("/static/status.css")).content_type == "text/css"
    for bad in ("/static/..%2fpage.py", "/static/page.py", "/static/..%2f..%2fconfig.py"):
        assert (await admin.get(bad)).status == 404


async def test_boot_times_api(admin: TestClient[web.Request, web.Application]) -> None:
    storm = await (await admin.get("/api/v1/boot-times")).json()
    assert [p["pool"] for p in storm["pools"]] == ["(all)", "w"]
    assert storm["pools"][0]["count"] == 1 and storm["pools"][0]["p50"] == pytest.approx(40)
    fragment = await (await admin.get("/fragments/boot-times")).text()
    assert 'data-pool="w"' in fragment and "<html" not in fragment


async def read_event(resp: web.StreamResponse | object, timeout: float = 3.0,
                     ) -> tuple[str, dict[str, object]]:
    """The next `nodes` event of an SSE response: its id and data."""
    content = resp.content  # type: ignore[attr-defined]
    fields: dict[str, str] = {}
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        line = (await asyncio.wait_for(content.readline(), deadline - time.monotonic())
                ).decode().rstrip("\n")
        if not line:
            if fields.get("event") == "nodes":
                return fields["id"], json.loads(fields["data"])
            fields = {}
        elif not line.startswith(":") and ":" in line:
            name, _, value = line.partition(":")
            fields[name] = value.strip()
    raise TimeoutError("no nodes event")


async def test_stream_sends_what_changed_then_resumes(
        admin: TestClient[web.Request, web.Application], recorder: Recorder) -> None:
    start = await (await admin.get("/api/v1/status")).json()
    stream = await admin.get(f"/api/v1/status/stream?since={start['version']}"
                             f"&at={start['now']}")
    assert stream.headers["Content-Type"] == "text/event-stream"
    sent = time.monotonic()
    unknown = "52:54:00:00:00:99"
    recorder.record(BootEvent(time.time(), ev.KERNEL, None, unknown, "127.0.1.3", None,
                              detail={"duration": 0.5, "image": "k8s"}))
    event_id, data = await read_event(stream)
    assert time.monotonic() - sent < 2.0  # a stage reaches the page within 2 s
    nodes = data["nodes"]
    assert isinstance(nodes, list) and [n["mac"] for n in nodes] == [unknown]
    assert nodes[0]["stage"] == "kernel" and nodes[0]["image"] == "k8s"
    stream.close()
    # a browser reconnecting sends Last-Event-ID: only what changed after it
    recorder.record(event(time.time(), ev.INITRD, "me"))
    again = await admin.get("/api/v1/status/stream", headers={"Last-Event-ID": event_id})
    _, data = await read_event(again)
    assert [n["node"] for n in data["nodes"]] == ["me"]  # type: ignore[union-attr]
    again.close()
    assert (await admin.get("/api/v1/status/stream?since=x")).status == 400


async def test_stream_ends_when_the_server_shuts_down(tree: Path, recorder: Recorder) -> None:
    client = await client_for(admin_app(View.fixed(context(tree).admin), Metrics(), recorder))
    stream = await client.get("/api/v1/status/stream")
    started = time.monotonic()
    await client.close()  # the app's shutdown: the stream must not hold the drain
    assert time.monotonic() - started < 2.0
    stream.close()


def fleet(n: int, store: Store | None = None) -> Recorder:
    """`n` nodes in 50 pools mid-storm: most joined, some at every stage, some stalled
    (flushed to `store` if given, as a bootd that ran the storm would have)."""
    rec = Recorder(store, EventPolicy(stall_after=600, keep_attempts=3))
    now = time.time()
    for i in range(n):
        events = boot(now - 900 + i * 0.1, f"node-{i:05d}", f"pool-{i % 50}", took=30 + i % 60)
        stop = len(events) if i % 4 else 1 + i % len(events)  # a quarter still booting
        if i % 97 == 0:
            events = [BootEvent(now - 3600, ev.DHCP_DISCOVER, f"node-{i:05d}", None,
                                None, f"pool-{i % 50}")]  # stalled an hour ago
            stop = 1
        for e in events[:stop]:
            rec.record(e)
    rec.flush()
    return rec


async def test_five_thousand_nodes_stay_small(tree: Path) -> None:
    """The budget the README states: the status document of 5,000 nodes under 2.5 MB
    (200 KB gzipped, as the browser fetches it), the overview page under 1.5 MB."""
    recorder = fleet(5000)
    client = await client_for(admin_app(View.fixed(context(tree).admin), Metrics(), recorder))
    try:
        resp = await client.get("/api/v1/status", headers={"Accept-Encoding": "gzip"})
        body = await resp.read()
        assert len(json.loads(body)["nodes"]) == 5003  # and the three configured nodes
        assert len(body) < 2_500_000
        assert len(gzip.compress(body)) < 200_000
        page = await (await client.get("/")).text()
        assert page.count('class="c ') == 5003 and len(page.encode()) < 1_500_000
        assert 'class="c s-dhcp-discover stalled"' in page
    finally:
        await client.close()


def test_status_web_names_a_loopback_api_and_the_tunnel(capsys: pytest.CaptureFixture[str],
                                                        ) -> None:
    from bootd.cli.main import main

    assert main(["status", "--web", "--api", "127.0.0.1:9090"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0] == "bootd status page: http://127.0.0.1:9090/"
    assert out[1].startswith("from a laptop: ssh -L 9090:127.0.0.1:9090 root@")
    assert "kubectl -n bootd port-forward pod/<bootd pod> 9090:9090" in out[2]


def test_status_web_says_when_no_daemon_answers(tmp_path: Path,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    from bootd.cli.main import main

    assert main(["status", "--web", "--api", str(tmp_path / "none.sock")]) == 1
    assert "cannot reach the daemon" in capsys.readouterr().err


def test_groups_sort_racks_as_numbers() -> None:
    from bootd.http.page import overview

    rows = [{"node": f"n{i}", "mac": None, "pool": "w", "network": f"rack{i}",
             "stage": "joined", "stalled": False} for i in (10, 2, 1)]
    rows.append({**rows[0], "node": "n0", "network": None})
    view = overview({"now": 0, "nodes": rows}, {})
    assert view.group_by == "network"  # more than one network: racks
    assert [g for g, _ in view.groups] == ["(no network)", "rack1", "rack2", "rack10"]

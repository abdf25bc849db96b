#!/usr/bin/env python3
"""The status page's weight and speed for a big fleet, in headless Chromium.

    python bench/page.py [--nodes 5000] [--runs 3]

Serves the admin app (overview, status document, live stream) on loopback with N nodes
mid-storm in the recorder (most joined, some at every stage, some stalled), then loads
the page in Debian's Chromium and prints, per run: bytes (raw and gzipped), time to the
first byte, to the parsed DOM, to the script's first live update, and how long a single
stage change takes to reach the open page. No incumbent serves such a page (pixiecore's
is a list, MAAS's a full UI): the figures are bootd's own, for the budget in the README.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

# the project root instead of bench/, whose http.py would shadow the standard library
sys.path[0] = str(Path(__file__).resolve().parents[1])

from aiohttp import web

from bootd.http.admin import AdminSettings, admin_app
from bootd.live import View
from bootd.ops.metrics import Metrics
from bootd.state import events as ev
from bootd.state.events import BootEvent
from tests.browser import Browser, available
from tests.unit.test_http_app import context
from tests.unit.test_status_page import fleet


def serve(app: web.Application) -> tuple[str, asyncio.AbstractEventLoop, web.AppRunner]:
    """The app on a loopback port, from a thread (Chromium is driven synchronously)."""
    loop = asyncio.new_event_loop()
    ready = threading.Event()
    where: list[str] = []
    runner = web.AppRunner(app, access_log=None, shutdown_timeout=1)

    def run() -> None:
        asyncio.set_event_loop(loop)
        loop.run_until_complete(runner.setup())
        site = web.TCPSite(runner, "127.0.0.1", 0)
        loop.run_until_complete(site.start())
        port = runner.addresses[0][1]
        where.append(f"http://127.0.0.1:{port}/")
        ready.set()
        loop.run_forever()

    threading.Thread(target=run, daemon=True).start()
    ready.wait(30)
    return where[0], loop, runner


MEASURE = """(() => {
  const nav = performance.getEntriesByType('navigation')[0];
  const api = performance.getEntriesByName(location.origin + '/api/v1/status')[0];
  return {page_bytes: nav.decodedBodySize, page_gzip: nav.encodedBodySize,
          first_byte_ms: nav.responseStart - nav.startTime,
          dom_ms: nav.domContentLoadedEventEnd - nav.startTime,
          status_bytes: api ? api.decodedBodySize : null,
          status_gzip: api ? api.encodedBodySize : null};
})()"""


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nodes", type=int, default=5000)
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    if (why := available()) is not None:
        print(f"bench/page.py: {why}", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory(prefix="bootd-bench-page-") as d:
        tmp = Path(d)
        for name in ("img", "tftp"):
            (tmp / name).mkdir()
        built = time.perf_counter()
        recorder = fleet(args.nodes)
        print(f"{args.nodes} nodes recorded in {time.perf_counter() - built:.1f}s")
        settings: AdminSettings = context(tmp).admin
        url, loop, runner = serve(admin_app(View.fixed(settings), Metrics(), recorder))
        rows = []
        for run in range(args.runs):
            with Browser(tmp / f"chromium-{run}") as b:
                started = time.monotonic()
                b.goto(url, timeout=120)
                b.wait_for("document.body.dataset.version !== undefined", timeout=120)
                live = time.monotonic() - started
                figures = b.eval(MEASURE)
                key = f"node-{run + 1:05d}"  # one that joined, a new one per run
                event = BootEvent(time.time(), ev.FAILED, key, None, None, "pool-1", "error",
                                  {"message": "bench"})
                sent = time.monotonic()
                loop.call_soon_threadsafe(recorder.record, event)
                b.wait_for(f"(document.querySelector('#grid a[data-k={key}]') || {{}})"
                           ".className.includes('s-failed')", timeout=10)
                update = time.monotonic() - sent
                cells = b.eval("document.querySelectorAll('#grid a.c').length")
            rows.append({**figures, "live_ms": live * 1000, "update_ms": update * 1000,
                         "cells": cells})
            print(f"run {run + 1}: " + json.dumps({k: round(v) if isinstance(v, float) else v
                                                   for k, v in rows[-1].items()}))
        asyncio.run_coroutine_threadsafe(runner.cleanup(), loop).result(10)
        loop.call_soon_threadsafe(loop.stop)
    med = {k: statistics.median(r[k] for r in rows) for k in ("first_byte_ms", "dom_ms",
                                                              "live_ms", "update_ms")}
    print(f"\n{args.nodes} nodes, median of {args.runs}: page {rows[0]['page_bytes'] / 1e6:.2f}"
          f" MB ({rows[0]['page_gzip'] / 1e3:.0f} KB gzipped), status document "
          f"{rows[0]['status_bytes'] / 1e6:.2f} MB ({rows[0]['status_gzip'] / 1e3:.0f} KB "
          f"gzipped); first byte {med['first_byte_ms']:.0f} ms, DOM {med['dom_ms']:.0f} ms, "
          f"live {med['live_ms']:.0f} ms; one stage change on the page in "
          f"{med['update_ms']:.0f} ms")
    return 0


if __name__ == "__main__":
    sys.exit(main())

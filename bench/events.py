#!/usr/bin/env python3
"""Boot-storm benchmark for the event store: 1,000 nodes booting at once.

    python bench/events.py [--nodes 1000]

Records every node's ~17-event boot (DHCP x3, TFTP, iPXE, kernel, initrd, rootfs, join,
node reports) through the recorder with the real SQLite store, flushed in batches as the
daemon does, and, for comparison, with one commit per event (the naive writer). Then
queries the status of all nodes and one node's timeline, and reloads from disk.
"""

from __future__ import annotations

import argparse
import random
import sys
import tempfile
import time
from pathlib import Path
from types import MappingProxyType

# the project root instead of bench/, whose http.py would shadow the standard library
sys.path[0] = str(Path(__file__).resolve().parents[1])

from bootd.state.events import BootEvent
from bootd.state.recorder import EventPolicy, Recorder
from bootd.state.store import Store

BOOT = [("dhcp-discover", 0.0), ("dhcp-offer", 0.01), ("dhcp-ack", 0.3), ("tftp", 1.0),
        ("dhcp-discover", 2.0), ("dhcp-ack", 2.2), ("ipxe-script", 2.5), ("kernel", 3.0),
        ("initrd", 4.0), ("kernel-handoff", 4.1), ("dhcp-discover", 6.0), ("dhcp-ack", 6.2),
        ("rootfs", 9.0), ("rootfs-mounted", 10.0), ("join-script", 11.0),
        ("scripts-done", 12.0), ("joined", 20.0)]


def storm(nodes: int, seed: int = 1) -> list[BootEvent]:
    rng = random.Random(seed)
    out = []
    for n in range(nodes):
        start = rng.uniform(0, 60)  # power-on spread over a minute
        mac = f"02:00:00:{n >> 16 & 255:02x}:{n >> 8 & 255:02x}:{n & 255:02x}"
        firmware = iter(("bios", "ipxe", "os"))
        stretch = rng.uniform(0.8, 1.5)  # slower and faster machines
        for stage, offset in BOOT:
            detail = {"firmware": next(firmware)} if stage == "dhcp-discover" else {
                "bytes": 74213}
            out.append(BootEvent(start + offset * stretch, stage, f"node-{n}", mac,
                                 f"10.1.{n >> 8}.{n & 255}", "workers", "ok",
                                 MappingProxyType(detail)))
    out.sort(key=lambda e: e.ts)
    return out


def run(events: list[BootEvent], path: Path, batch: int) -> dict[str, float]:
    store = Store(path)
    rec = Recorder(store, EventPolicy(600, 10), clock=lambda: 200.0)
    t = time.perf_counter()
    record_s = flush_s = 0.0
    for i, event in enumerate(events, 1):
        r0 = time.perf_counter()
        rec.record(event)
        record_s += time.perf_counter() - r0
        if i % batch == 0:
            f0 = time.perf_counter()
            rec.flush()
            flush_s += time.perf_counter() - f0
    f0 = time.perf_counter()
    rec.flush()
    flush_s += time.perf_counter() - f0
    total = time.perf_counter() - t
    q0 = time.perf_counter()
    states = rec.states()
    status_s = time.perf_counter() - q0
    q0 = time.perf_counter()
    one = rec.find("node-500") or rec.states()[0]
    detail_s = time.perf_counter() - q0
    store.close()
    l0 = time.perf_counter()
    again = Recorder(Store(path), EventPolicy(600, 10), clock=lambda: 200.0)
    loaded = again.load()
    load_s = time.perf_counter() - l0
    assert all(s.stage == "joined" for s in states) and one.attempts == 1
    assert loaded == len(events)
    return {"total": total, "record": record_s, "flush": flush_s, "status": status_s,
            "detail": detail_s, "load": load_s, "nodes": len(states)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--nodes", type=int, default=1000)
    args = parser.parse_args()
    events = storm(args.nodes)
    print(f"{args.nodes} nodes, {len(events)} events")
    results = {}
    with tempfile.TemporaryDirectory() as d:
        for name, batch in (("batched (daemon: ~every 0.25s)", 500),
                            ("one commit per event", 1)):
            results[name] = run(events, Path(d) / f"{batch}.sqlite3", batch)
    print(f"{'writer':32}{'events/s':>10}{'record us':>11}{'flush ms':>10}{'status ms':>11}"
          f"{'node ms':>9}{'reload ms':>11}")
    for name, r in results.items():
        n = len(events)
        print(f"{name:32}{n / r['total']:10.0f}{r['record'] / n * 1e6:11.1f}"
              f"{r['flush'] * 1000:10.0f}{r['status'] * 1000:11.1f}{r['detail'] * 1000:9.2f}"
              f"{r['load'] * 1000:11.0f}")
    b, s = results["batched (daemon: ~every 0.25s)"], results["one commit per event"]
    print(f"\nbatched vs per-event commits: x{s['total'] / b['total']:.1f} faster")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

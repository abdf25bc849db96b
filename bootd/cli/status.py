"""`bootd status`: the boot of every node at a glance, from the daemon or its database.

Output `-o json` is a stable schema: {"now": <unix time>, "nodes": [{"node", "mac", "ip",
"pool", "network", "stage", "stalled", "since", "first_seen", "last_seen", "attempts", "last_error",
"last_boot_time", "image" (NAME@VERSION it booted), "desired_image" (what it would boot now),
"drift"}]}; `bootd status NODE -o json` adds "history": [{"number", "started",
"outcome", "duration", "steps": [{"stage", "offset", "duration", "outcome", "detail"}]}].
"""

from __future__ import annotations

import time
from typing import Any

from bootd.fleet.config import Config
from bootd.fleet.directory import NodeDirectory
from bootd.fleet.imagestore import ImageStore
from bootd.fleet.inventory import Inventory
from bootd.ops.text import ago, duration, printable
from bootd.state.recorder import EventPolicy, Recorder
from bootd.state.store import Store

RESET, RED, GREEN, YELLOW, DIM = "\033[0m", "\033[31m", "\033[32m", "\033[33m", "\033[2m"


def from_database(config: Config) -> tuple[dict[str, Any], Recorder]:
    """The same answer as GET /api/v1/status, read-only from the state database, and the
    recorder holding the histories (for one node's timeline)."""
    path = config.server.state_dir / "bootd.sqlite3"
    inventory = Inventory(config)
    store = Store(path, read_only=True)
    try:
        recorder = Recorder(store, EventPolicy(config.events.stall_after,
                                               config.events.keep_attempts))
        recorder.load(node.name for node in inventory.nodes)
    finally:
        store.close()
    directory = NodeDirectory.build(
        inventory, images=ImageStore(config.server.image_store).catalog(config.images))
    return recorder.status_document(inventory.nodes, inventory.network_name,
                                    desired=directory.desired_image), recorder


def _colour(row: dict[str, Any]) -> str:
    if row["stage"] == "joined":
        return GREEN
    if row["stalled"] or row["stage"] in ("failed", "refused"):
        return RED
    if row["stage"] == "never-seen":
        return DIM
    return YELLOW


def _order(row: dict[str, Any]) -> tuple[int, str, str]:
    bad = row["stalled"] or row["stage"] in ("failed", "refused")
    rank = 0 if bad else 2 if row["stage"] in ("joined", "never-seen") else 1
    return rank, row["pool"] or "~", row["node"] or row["mac"] or ""


def table(answer: dict[str, Any], *, wide: bool, colour: bool, pool: str | None = None,
          stage: str | None = None) -> str:
    now = float(answer["now"])
    rows = [r for r in answer["nodes"]
            if (pool is None or r["pool"] == pool)
            and (stage is None or r["stage"] == stage
                 or (stage == "stalled" and r["stalled"]))]
    rows.sort(key=_order)
    # a routed fleet: which network each node is on (one network: nothing to tell)
    routed = wide or len({r.get("network") for r in answer["nodes"]} - {None}) > 1
    header = ["NAME", "MAC", "IP", "POOL", "STAGE", "SINCE", "IMAGE", "BOOT TIME",
              "LAST ERROR"]
    if wide:
        header[8:8] = ["ATTEMPTS", "FIRST SEEN", "LAST SEEN"]
    if routed:
        header[4:4] = ["NETWORK"]
    lines = [header]
    for r in rows:
        stage_text = r["stage"] + (" (stalled)" if r["stalled"] else "")
        if r.get("rollout"):
            stage_text += f" [rollout {r['rollout'].rpartition(': ')[2]}]"
        cells = [r["node"] or "(unknown)", r["mac"] or "-", r["ip"] or "-", r["pool"] or "-",
                 stage_text, ago(r["since"], now), _image_cell(r),
                 duration(r["last_boot_time"]), r["last_error"] or "-"]
        if wide:
            cells[8:8] = [str(r["attempts"]), ago(r["first_seen"], now),
                          ago(r["last_seen"], now)]
        else:
            cells[-1] = cells[-1][:60]
        if routed:
            cells[4:4] = [r.get("network") or "-"]
        lines.append([printable(cell) for cell in cells])
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    out = []
    for n, line in enumerate(lines):
        text = "  ".join(cell.ljust(widths[i]) for i, cell in enumerate(line)).rstrip()
        if colour and n > 0:
            text = _colour(rows[n - 1]) + text + RESET
        out.append(text)
    counts: dict[str, int] = {}
    for r in rows:
        key = "stalled" if r["stalled"] else r["stage"]
        counts[key] = counts.get(key, 0) + 1
    out.append("")
    drifted = sum(1 for r in rows if r.get("drift"))
    out.append(f"{len(rows)} nodes: " + ", ".join(f"{v} {k}" for k, v in sorted(counts.items()))
               + (f"; {drifted} not on the image they would boot now (drift)" if drifted
                  else ""))
    return "\n".join(out)


def _image_cell(row: dict[str, Any]) -> str:
    """What the node runs; with drift, also what it would boot now."""
    image = row.get("image") or "-"
    return f"{image} (drift: now {row['desired_image']})" if row.get("drift") else image


def timeline(answer: dict[str, Any]) -> str:
    now = float(answer["now"])
    out = [f"{answer['node'] or '(unknown)'}  mac {answer['mac'] or '-'}  ip "
           f"{answer['ip'] or '-'}  pool {answer['pool'] or '-'}  image "
           f"{answer.get('image') or '-'}",
           f"stage {answer['stage']}{' (stalled)' if answer['stalled'] else ''} since "
           f"{ago(answer['since'], now)}; attempts {answer['attempts']}; last boot "
           f"{duration(answer['last_boot_time'])}; last error {answer['last_error'] or '-'}"]
    for attempt in answer.get("history", []):
        started = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(attempt["started"]))
        out.append("")
        out.append(f"attempt {attempt['number']}  started {started}  "
                   f"{attempt['outcome'] or 'in progress'}  ({duration(attempt['duration'])})")
        for step in attempt["steps"]:
            detail = " ".join(f"{k}={v}" for k, v in step["detail"].items() if v is not None)
            mark = "" if step["outcome"] == "ok" else f" [{step['outcome']}]"
            took = duration(step["duration"]) if step["duration"] is not None else ""
            out.append(f"  +{step['offset']:9.3f}s  {step['stage']:<16}{took:>9}{mark}  "
                       f"{detail}".rstrip())
    return "\n".join(printable(line) for line in out)

"""`bootd rollout start|status|pause|resume|abort`: the daemon's rollout, over its API."""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable
from typing import Any

from bootd.fleet.config import parse_duration
from bootd.ops.text import ago, duration


def add_parser(sub: Any, with_config: Callable[[argparse.ArgumentParser], None]) -> None:
    from bootd.cli.main import verb_adder

    p = sub.add_parser("rollout", help="roll an image version over a pool: canary, waves, "
                       "halt and revert on failures")
    verb = verb_adder(p, with_config, cmd_rollout)

    v = verb("start", "point POOL at NAME@VERSION and boot its nodes onto it, wave by wave")
    v.add_argument("pool")
    v.add_argument("--image", required=True, metavar="NAME@VERSION")
    v.add_argument("--canary", type=int, default=1, help="nodes booted first; any failure "
                   "halts (default 1)")
    v.add_argument("--max-unavailable", default="10%", metavar="N|P%",
                   help="nodes booting at once after the canary (default 10%%)")
    v.add_argument("--max-failed", type=int, default=1,
                   help="halt when more nodes than this fail (default 1)")
    v.add_argument("--timeout", default="15m", help="per node, power cycle to joined "
                   "(default 15m)")
    v.add_argument("--wait", action="store_true", help="follow it until it ends; exit 0 "
                   "only if it completed")
    v = verb("status", "the current or last rollout: waves, nodes, versions, why it halted")
    v.add_argument("-o", "--output", choices=["table", "json"], default="table")
    v.add_argument("--wait", action="store_true", help="follow it until it ends")
    verb("pause", "start no new wave (booting nodes are still watched)")
    verb("resume", "go on after a pause")
    verb("abort", "stop; the pool points back at its earlier version, nothing is cycled")


def cmd_rollout(args: argparse.Namespace) -> int:
    from bootd.cli.main import _api_path, _daemon_json

    api = _api_path(args)
    if args.verb == "start":
        try:
            timeout = parse_duration(args.timeout)
        except ValueError as exc:
            print(f"bootd rollout: --timeout: {exc}", file=sys.stderr)
            return 2
        body = {"pool": args.pool, "image": args.image, "canary": args.canary,
                "max_unavailable": args.max_unavailable, "max_failed": args.max_failed,
                "timeout": timeout}
        doc = _daemon_json("rollout", api, "POST", "/api/v1/rollout", body)
    elif args.verb == "status":
        doc = _daemon_json("rollout", api, "GET", "/api/v1/rollout")
    else:
        doc = _daemon_json("rollout", api, "POST", f"/api/v1/rollout/{args.verb}")
    if doc is None:
        return 1
    current = doc.get("current", doc) if args.verb == "status" else doc
    if getattr(args, "wait", False):
        return _follow(api)
    if getattr(args, "output", "table") == "json":
        print(json.dumps(doc, indent=2))
    elif current is None:
        print("no rollout yet")
    else:
        print(format_rollout(current, time.time()))
    return 0


def _follow(api: str, interval: float = 2.0) -> int:
    """Print each new log line until the rollout ends; 0 if it completed."""
    from bootd.cli.main import _daemon_json

    printed = 0
    while True:
        doc = _daemon_json("rollout", api, "GET", "/api/v1/rollout")
        if doc is None:
            return 1
        current = doc["current"]
        if current is None:
            print("no rollout")
            return 1
        log = current["log"]
        for at, message in log[printed:]:
            print(f"{time.strftime('%H:%M:%S', time.localtime(at))}  {message}", flush=True)
        printed = len(log)
        reverting = any(n["state"] == "reverting" for n in current["nodes"])
        if current["phase"] not in ("running", "paused") and not reverting:
            print()
            print(format_rollout(current, time.time()))
            return 0 if current["phase"] == "completed" else 1
        time.sleep(interval)


def format_rollout(r: dict[str, Any], now: float) -> str:
    spec = r["spec"]
    old = f"{spec['image']}@{spec['previous']}" if spec["previous"] else "-"
    wave = "canary" if r["wave"] == 0 else f"wave {r['wave']}" if r["wave"] > 0 else "-"
    lines = [f"rollout {r['id']}: pool {spec['pool']} -> {spec['image']}@{spec['version']} "
             f"(from {old})",
             f"  {r['phase'].upper()}" + (f": {r['reason']}" if r["reason"] else "")
             + f"; {wave}; started {ago(r['started'], now)}"
             + (f", took {duration(r['finished'] - r['started'])}" if r["finished"] else ""),
             f"  canary {spec['canary']}, max unavailable {spec['max_unavailable']}, "
             f"max failed {spec['max_failed']}, timeout per node {duration(spec['timeout'])}",
             ""]
    rows = [("NODE", "WAVE", "STATE", "SINCE", "ERROR")]
    for n in r["nodes"]:
        rows.append((n["name"], "-" if n["wave"] is None else
                     ("canary" if n["wave"] == 0 else str(n["wave"])), n["state"],
                     ago(n["since"], now) if n["since"] else "-", n["error"] or "-"))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines += ["  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip()
              for row in rows]
    counts: dict[str, int] = {}
    for n in r["nodes"]:
        counts[n["state"]] = counts.get(n["state"], 0) + 1
    lines += ["", ", ".join(f"{v} {k}" for k, v in sorted(counts.items())), "", "log:"]
    lines += [f"  {time.strftime('%H:%M:%S', time.localtime(at))}  {message}"
              for at, message in r["log"][-15:]]
    return "\n".join(lines)

"""`bootd power NODE...|--pool P status|on|off|cycle|pxe`: BMCs, straight from this host.

The command reads the config (no daemon needed), templates each node's `power:` and
runs the action on all of them at once, at most --parallel at a time; every node gets
a line, and the exit code is 1 if any failed.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from collections.abc import Callable
from typing import Any

from bootd.fleet.config import ConfigError, load_config
from bootd.fleet.inventory import Inventory
from bootd.power.bmc import (
    ACTIONS,
    DEFAULT_PARALLEL,
    PowerControl,
    PowerError,
    PowerResult,
    PowerTarget,
    target_for,
)


def add_parser(sub: Any, with_config: Callable[[argparse.ArgumentParser], None]) -> None:
    p = sub.add_parser("power", help="power nodes on, off, cycle them or PXE boot them once "
                       "through their BMCs (IPMI, Redfish)")
    with_config(p)
    p.add_argument("nodes", nargs="*", metavar="NODE", help="configured node names")
    p.add_argument("action", choices=ACTIONS,
                   help="pxe: a one-time network boot, then a power cycle")
    p.add_argument("--pool", help="every configured node of this pool")
    p.add_argument("--parallel", type=int, default=DEFAULT_PARALLEL,
                   help=f"BMCs at once (default {DEFAULT_PARALLEL})")
    p.add_argument("-o", "--output", choices=["table", "json"], default="table")
    p.set_defaults(func=cmd_power)


def cmd_power(args: argparse.Namespace) -> int:
    if bool(args.nodes) == bool(args.pool):
        print("bootd power: name nodes, or --pool P", file=sys.stderr)
        return 2
    try:
        inventory = Inventory(load_config(args.config))
    except ConfigError as exc:
        for issue in exc.issues:
            print(issue, file=sys.stderr)
        return 1
    if args.pool:
        nodes = [n for n in inventory.nodes if n.pool == args.pool]
        if not nodes:
            print(f"bootd power: no configured nodes in pool {args.pool!r}", file=sys.stderr)
            return 1
    else:
        nodes = []
        for name in args.nodes:
            node = inventory.named(name)
            if node is None:
                print(f"bootd power: {name!r} is not a configured node", file=sys.stderr)
                return 1
            nodes.append(node)
    targets: list[PowerTarget] = []
    failed: list[PowerResult] = []
    for node in nodes:
        try:
            targets.append(target_for(node))
        except PowerError as exc:
            failed.append(PowerResult(node.name, args.action, False, None, str(exc), 0.0))
    results = failed + asyncio.run(_run(targets, args.action, args.parallel))
    results.sort(key=lambda r: r.node)
    if args.output == "json":
        print(json.dumps({"results": [r.to_json() for r in results]}, indent=2))
    else:
        print(table(results))
    return 0 if all(r.ok for r in results) else 1


async def _run(targets: list[PowerTarget], action: Any, parallel: int) -> list[PowerResult]:
    return await PowerControl(max(1, parallel)).many(targets, action)


def table(results: list[PowerResult]) -> str:
    rows = [("NODE", "BMC", "ACTION", "RESULT", "TIME")]
    for r in results:
        rows.append((r.node, r.where or "-", r.action,
                     f"ok, power {r.state}" if r.ok else f"FAILED: {r.error}",
                     f"{r.seconds:.1f}s"))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip()
             for r in rows]
    bad = sum(1 for r in results if not r.ok)
    lines.append(f"{len(results) - bad} ok, {bad} failed" if bad else f"{len(results)} ok")
    return "\n".join(lines)

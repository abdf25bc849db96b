"""`bootd` command line: serve the fleet, ask the daemon, and try things out.

Daemon: serve, reload. Fleet and boots: check, explain, nodes, status, approve, promote.
Diagnosis: probe. Cluster mode: cluster status.
Demo: lab.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import sys
import time
import urllib.parse
from collections.abc import Callable, Sequence
from ipaddress import IPv4Address
from pathlib import Path
from typing import Any

from bootd import __version__
from bootd.fleet.config import DEFAULT_CONFIG_PATH, Config, ConfigError, load_config
from bootd.fleet.inventory import Inventory, NodeProfile
from bootd.ops.text import duration


def _summary(config: Config, path: str) -> str:
    inv = Inventory(config)
    lines = [f"{path}: OK"]
    lines.append(f"  server   {config.server.address} on {', '.join(config.server.interfaces)}"
                 f" (http :{config.server.http_port}, tftp :{config.server.tftp_port})")
    for net in config.all_networks():
        lines.append(f"  network  {net.name}: {net.subnet}, lease {int(net.lease_time)}s"
                     + (f", next-server {net.next_server}" if net.next_server else ""))
    lines.append(f"  pools    {len(config.pools)}: " + ", ".join(
        f"{p.name} ({len(p.nodes)} nodes{', catch-all' if p.dynamic else ''})"
        for p in config.pools))
    lines.append(f"  nodes    {len(inv.nodes)} reserved, "
                 f"{sum(len(n.macs) for n in inv.nodes)} MACs")
    lines.append(f"  tags     {len(config.tags)}: {', '.join(config.tags) or '-'}")
    if inv.catch_all is not None:
        pool = inv.catch_all
        ranges = ", ".join(f"{r} ({r.network})" if len(inv.networks) > 1 else str(r)
                           for r in pool.ranges)
        lines.append(f"  dynamic  {ranges} ({pool.size} addresses) in pool "
                     f"{pool.name}, names {pool.name_template!r}")
    else:
        lines.append("  dynamic  none: unknown MACs get no answer")
    from bootd.fleet.imagestore import ImageStore

    catalog = ImageStore(config.server.image_store).catalog(config.images)
    managed = [f"{name}@{catalog.promoted.get(name, '?')} ({len(versions)} versions)"
               for name, versions in sorted(catalog.versions.items())]
    lines.append(f"  images   {', '.join([*config.images, *managed]) or '-'}; "
                 f"clusters {', '.join(config.clusters) or '-'}")
    if managed:
        lines.append(f"           (versions in {config.server.image_store})")
    powered = sum(1 for n in inv.nodes if n.power is not None)
    if powered:
        lines.append(f"  power    {powered} of {len(inv.nodes)} nodes have a BMC")
    ha = config.cluster
    if ha is None:
        lines.append("  cluster  none: one instance, state in SQLite")
    else:
        lines.append(f"  cluster  member {ha.member} on etcd {', '.join(ha.etcd.endpoints)} "
                     f"(prefix {ha.etcd.prefix}, {'TLS' if ha.etcd.tls else 'plaintext'}), "
                     f"member_ttl {ha.member_ttl:g}s, takeover after {ha.takeover_after:g}s")
    return "\n".join(lines)


def cmd_check(args: argparse.Namespace) -> int:
    try:
        config = load_config(args.config)
    except ConfigError as exc:
        for issue in exc.issues:
            print(issue, file=sys.stderr)
        print(f"{args.config}: {len(exc.issues)} error(s)", file=sys.stderr)
        return 1
    print(_summary(config, str(args.config)))
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    from bootd.daemon import serve
    from bootd.ops.logs import configure_logging
    from bootd.state.store import StoreError

    configure_logging(json=args.log_format == "json" if args.log_format else None,
                      level=args.log_level)
    try:
        return asyncio.run(serve(args.config))
    except ConfigError as exc:
        for issue in exc.issues:
            print(issue, file=sys.stderr)
        return 1
    except (StoreError, OSError) as exc:
        print(f"bootd: {exc}", file=sys.stderr)
        return 1


def cmd_lab(args: argparse.Namespace) -> int:
    from bootd.lab.demo import run_lab, run_vm_lab

    if args.dhcp_only:
        return run_lab()
    if args.rollout:
        from bootd.lab.rollout import run_rollout_lab

        try:
            return run_rollout_lab()
        except KeyboardInterrupt:
            print("\nbootd lab: interrupted; namespaces, BMCs and VMs removed",
                  file=sys.stderr)
            return 130
    try:
        return run_vm_lab(args.vms, args.uefi, image=args.image, racks=args.racks)
    except KeyboardInterrupt:
        print("\nbootd lab: interrupted; namespaces and VMs removed", file=sys.stderr)
        return 130


def _api_path(args: argparse.Namespace) -> str:
    if args.api:
        return str(args.api)
    try:
        return load_config(args.config).server.api
    except ConfigError:
        return "/run/bootd/api.sock"


async def _admin_request(api: str, method: str, path: str,
                         body: object | None = None) -> tuple[int, str]:
    """One request to the admin API (unix socket or loopback host:port)."""
    import aiohttp

    if api.startswith("/"):
        connector: aiohttp.BaseConnector = aiohttp.UnixConnector(path=api)
        url = f"http://bootd{path}"
    else:
        connector = aiohttp.TCPConnector()
        url = f"http://{api}{path}"
    timeout = aiohttp.ClientTimeout(total=30)
    async with (aiohttp.ClientSession(connector=connector, timeout=timeout) as session,
                session.request(method, url, json=body) as resp):
        return resp.status, await resp.text()


def _ask_daemon(command: str, api: str, method: str, path: str,
                body: object | None = None) -> tuple[int, str] | None:
    """One admin request on behalf of `bootd COMMAND`: (status, text), or None after
    saying on stderr that the daemon cannot be reached."""
    import aiohttp

    try:
        return asyncio.run(_admin_request(api, method, path, body))
    except (aiohttp.ClientError, OSError) as exc:
        print(f"bootd {command}: cannot reach the daemon at {api}: {exc}", file=sys.stderr)
        return None


def _daemon_json(command: str, api: str, method: str, path: str,
                 body: object | None = None) -> Any:
    """The daemon's JSON answer to one admin request, or None after saying on stderr why
    there is none (unreachable, or an answer other than 200)."""
    answer = _ask_daemon(command, api, method, path, body)
    if answer is None:
        return None
    code, text = answer
    if code != 200:
        print(text.strip(), file=sys.stderr)
        return None
    return json.loads(text)


def verb_adder(parent: argparse.ArgumentParser,
               with_config: Callable[[argparse.ArgumentParser], None],
               func: Callable[[argparse.Namespace], int],
               ) -> Callable[[str, str], argparse.ArgumentParser]:
    """For `bootd NOUN VERB` commands: adds a VERB taking -c and --api, run by `func`."""
    verbs = parent.add_subparsers(dest="verb", required=True)

    def verb(name: str, text: str) -> argparse.ArgumentParser:
        v: argparse.ArgumentParser = verbs.add_parser(name, help=text)
        with_config(v)
        v.add_argument("--api", help="admin API (default: server.api from the config)")
        v.set_defaults(func=func)
        return v

    return verb


def cmd_approve(args: argparse.Namespace) -> int:
    """Let catch-all machines of a `join: approve` pool join (they wait until then)."""
    if bool(args.nodes) == bool(args.all):
        print("bootd approve: name nodes, or --all (every node awaiting now)",
              file=sys.stderr)
        return 2
    body = {"all": True} if args.all else {"nodes": args.nodes}
    answer = _ask_daemon("approve", _api_path(args), "POST", "/api/v1/approve", body)
    if answer is None:
        return 1
    status, text = answer
    if status != 200:
        print(f"bootd approve: {text.strip()}", file=sys.stderr)
        return 1
    approved = json.loads(text)["approved"]
    print(f"approved: {', '.join(approved)}" if approved else "nothing new to approve")
    return 0


def cmd_promote(args: argparse.Namespace) -> int:
    """A catch-all node becomes a reserved one: written to `<config>.d/`, checked as
    `bootd check` does, and loaded by the daemon (reload)."""
    import yaml

    from bootd.fleet.config import dropin_dir

    def fail(message: str) -> int:
        print(f"bootd promote: {message}", file=sys.stderr)
        return 1

    config = _load_or_report(args.config)
    if config is None:
        return 1
    catch_all = Inventory(config).catch_all
    if catch_all is None:
        return fail("the config has no catch-all pool")
    if args.pool not in {p.name for p in config.pools} or args.pool == catch_all.name:
        return fail(f"{args.pool!r} is not a pool of reserved nodes in {args.config}")
    api = _api_path(args)
    found = _ask_daemon("promote", api, "GET",
                        f"/api/v1/status/{urllib.parse.quote(args.node, safe='')}")
    listed = _ask_daemon("promote", api, "GET", "/api/v1/approvals") if found else None
    if found is None or listed is None:
        return 1
    (code, body), (approvals_code, approvals) = found, listed
    if code != 200:
        return fail(f"no catch-all node {args.node!r} has booted ({body.strip()})")
    row = json.loads(body)
    if row.get("pool") != catch_all.name or not row.get("mac"):
        return fail(f"{args.node} is not a catch-all node (pool {row.get('pool')})")
    pool = next(p for p in config.pools if p.name == catch_all.name)
    if (pool.dynamic is not None and pool.dynamic.join == "approve"
            and (approvals_code != 200
                 or args.node not in json.loads(approvals).get("approved", []))):
        return fail(f"{args.node} is not approved: bootd approve {args.node} first")
    target = dropin_dir(args.config) / f"promoted-{args.name}.yaml"
    if target.exists():
        return fail(f"{target} exists already")
    node = {"pool": args.pool, "name": args.name, "mac": row["mac"], "ip": str(args.ip)}
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(f"# bootd promote {args.node} --pool {args.pool} --name {args.name} "
                      f"--ip {args.ip}, {time.strftime('%Y-%m-%d %H:%M:%S')}\n"
                      + yaml.safe_dump({"nodes": [node]}, sort_keys=False))
    checked = _load_or_report(args.config)  # the whole config with the new drop-in
    if checked is None:
        target.unlink()
        return fail(f"not promoted: the config would not be valid ({target} removed)")
    print(f"{args.node} ({row['mac']}) is now {args.name} in pool {args.pool}, ip {args.ip}: "
          f"{target}")
    reloaded = _ask_daemon("promote", api, "POST", "/api/v1/reload")
    if reloaded is None:
        return fail("written, but not loaded: `bootd reload` once the daemon answers")
    if reloaded[0] != 200:
        return fail(f"written, but the reload failed: {reloaded[1].strip()[:300]}")
    print("the daemon reloaded: the node boots as reserved from its next DHCP request")
    return 0


def cmd_reload(args: argparse.Namespace) -> int:
    answer = _ask_daemon("reload", _api_path(args), "POST", "/api/v1/reload")
    if answer is None:
        return 2
    status, body = answer
    try:
        result = json.loads(body)
    except ValueError:
        print(f"bootd reload: unexpected answer ({status}): {body[:200]}", file=sys.stderr)
        return 2
    if result.get("ok"):
        print("bootd: config reloaded")
        for key in result.get("restart_required", []):
            print(f"  {key} changed: takes effect after a restart")
        return 0
    for line in result.get("errors", []):
        print(line, file=sys.stderr)
    print("bootd reload: refused; the running config stays", file=sys.stderr)
    return 1


def _status_answer(args: argparse.Namespace) -> tuple[dict[str, Any] | None, int]:
    """The status document from the daemon, else read-only from its database."""
    import aiohttp

    from bootd.cli import status
    from bootd.state.store import StoreError

    config = None
    with contextlib.suppress(ConfigError):
        config = load_config(args.config)
    api = args.api or (config.server.api if config else "/run/bootd/api.sock")
    path = "/api/v1/status"
    if args.node:
        path += f"/{urllib.parse.quote(args.node, safe='')}?attempts={args.attempts}"
    try:
        code, body = asyncio.run(_admin_request(api, "GET", path))
    except (aiohttp.ClientError, OSError):
        if config is None:
            print(f"bootd status: no daemon at {api} and no readable config {args.config}",
                  file=sys.stderr)
            return None, 2
        try:
            answer, recorder = status.from_database(config)
        except StoreError as exc:
            print(f"bootd status: no daemon at {api}, and {exc}", file=sys.stderr)
            return None, 2
        print(f"bootd: daemon not running; read-only view of "
              f"{config.server.state_dir / 'bootd.sqlite3'}", file=sys.stderr)
        if args.node:
            state = recorder.find(args.node)
            if state is None:
                print(f"bootd status: no boot events for {args.node!r}", file=sys.stderr)
                return None, 1
            return {"now": answer["now"], **state.to_json(with_history=args.attempts)}, 0
        return answer, 0
    if code == 404 and args.node:
        print(f"bootd status: no boot events for {args.node!r}", file=sys.stderr)
        return None, 1
    if code != 200:
        print(f"bootd status: the daemon answered {code}: {body[:200]}", file=sys.stderr)
        return None, 2
    answer = json.loads(body)
    assert isinstance(answer, dict)
    return answer, 0


def _laptop_hint(api: str, port: int) -> str:
    """How to open the page from another machine: a tunnel to this host's loopback or
    unix socket (the admin API is never on the boot network)."""
    import socket

    tunnel = (f"from a laptop: ssh -L {port}:{api} root@{socket.gethostname()}, then open "
              f"http://localhost:{port}/")
    if api.startswith("/"):
        return tunnel + " (OpenSSH forwards to a unix socket)"
    return (tunnel + f"\nin Kubernetes (a hostNetwork pod): kubectl -n bootd port-forward "
            f"pod/<bootd pod> {port}:{api.rpartition(':')[2]}")


def cmd_status_web(args: argparse.Namespace) -> int:
    """Where the status page is; for a unix-socket API, serve it on loopback until
    Ctrl-C (a browser cannot open a unix socket)."""
    from bootd.http.forward import start_forwarder

    api = _api_path(args)
    if not api.startswith("/"):
        print(f"bootd status page: http://{api}/")
        print(_laptop_hint(api, int(api.rpartition(":")[2])))
        return 0
    health = _ask_daemon("status --web", api, "GET", "/healthz")
    if health is None:
        return 1
    if health[0] != 200:
        print(f"bootd status --web: the daemon at {api} answered {health[0]}",
              file=sys.stderr)
        return 1
    host, _, port_text = args.listen.rpartition(":")

    async def serve() -> None:
        try:
            server = await start_forwarder(api, host or "127.0.0.1", int(port_text))
        except OSError as exc:  # 8080 taken: any free port will do
            server = await start_forwarder(api, host or "127.0.0.1", 0)
            print(f"({args.listen}: {exc.strerror}; using a free port)", flush=True)
        bound = server.sockets[0].getsockname()
        print(f"bootd status page: http://{bound[0]}:{bound[1]}/  (forwarding to {api}; "
              "Ctrl-C to stop)", flush=True)
        print(_laptop_hint(api, int(bound[1])), flush=True)
        async with server:
            await server.serve_forever()

    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(serve())
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    from bootd.cli import status

    if args.web:
        return cmd_status_web(args)
    while True:
        answer, rc = _status_answer(args)
        if answer is None:
            return rc
        if args.output == "json":
            text = json.dumps(answer, indent=2)
        elif args.node:
            text = status.timeline(answer)
        else:
            text = status.table(answer, wide=args.output == "wide",
                                colour=sys.stdout.isatty(), pool=args.pool, stage=args.stage)
        if not args.watch:
            print(text)
            return 0
        print("\033[H\033[2J" + text, flush=True)  # redraw in place
        try:
            time.sleep(args.interval)
        except KeyboardInterrupt:
            return 0


def _load_or_report(path: Path) -> Config | None:
    """The config, or None after printing every problem as `bootd check` does."""
    try:
        return load_config(path)
    except ConfigError as exc:
        for issue in exc.issues:
            print(issue, file=sys.stderr)
        return None


def cmd_explain(args: argparse.Namespace) -> int:
    from bootd.cli.explain import explain
    from bootd.fleet.mac import normalize_mac

    config = _load_or_report(args.config)
    if config is None:
        return 1
    try:
        mac = normalize_mac(args.mac)
    except ValueError as exc:
        print(f"bootd explain: {exc}", file=sys.stderr)
        return 2
    print(explain(config, mac, args.arch, args.ipxe, args.relay, args.circuit_id))
    if config.cluster is not None:
        print("(cluster mode: image pointers are in etcd, not read here; the status "
              "page's explain, run by the daemon, names the version this node gets)")
    return 0


def cmd_nodes(args: argparse.Namespace) -> int:
    """The configured inventory, and whether each node has been seen booting."""
    config = _load_or_report(args.config)
    if config is None:
        return 1
    args.node, args.attempts = None, 1
    answer, _ = _status_answer(args)
    seen = {n["node"]: n for n in (answer or {}).get("nodes", []) if n.get("attempts")}
    nodes = Inventory(config).nodes

    def identity(n: NodeProfile) -> str:
        """MACs, or the switch port (and the MAC last seen there)."""
        if n.port is None:
            return ",".join(n.macs)
        seen_mac = seen[n.name]["mac"] if n.name in seen else None
        port = f"port {n.port.relay}/{n.port.circuit_id.decode()}"
        return f"{port} ({seen_mac})" if seen_mac else port

    if args.output == "json":
        print(json.dumps([{
            "node": n.name, "pool": n.pool, "macs": list(n.macs), "ip": str(n.ip),
            "network": n.network, "port": None if n.port is None else {
                "relay": str(n.port.relay), "circuit_id": n.port.circuit_id.decode()},
            "tags": list(n.tags), "labels": dict(n.labels), "taints": list(n.taints),
            "seen": seen[n.name]["stage"] if n.name in seen else "never"} for n in nodes],
            indent=2))
        return 0
    header = ["NAME", "POOL", "NETWORK", "MACS", "IP", "TAGS", "LABELS", "TAINTS", "SEEN"]
    table = [header] + [[n.name, n.pool, n.network or "-", identity(n), str(n.ip),
                         ",".join(n.tags) or "-",
                         ",".join(f"{k}={v}" for k, v in n.labels.items()) or "-",
                         ",".join(n.taints) or "-",
                         str(seen[n.name]["stage"]) if n.name in seen else "never"]
                        for n in nodes]
    widths = [max(len(row[i]) for row in table) for i in range(len(header))]
    for row in table:
        print("  ".join(c.ljust(widths[i]) for i, c in enumerate(row)).rstrip())
    return 0


def cmd_probe(args: argparse.Namespace) -> int:
    import importlib

    for client in ("scapy.layers.dhcp", "tftpy"):  # imported late by the probe's steps
        try:
            importlib.import_module(client)
        except ImportError as exc:
            print(f"bootd probe: cannot import {client} ({exc}); it comes with bootd's "
                  "dependencies: pip install scapy tftpy", file=sys.stderr)
            return 2
    from bootd.cli.probe import probe

    try:
        return probe(args.interface, args.mac, args.arch, args.ipxe, args.timeout)
    except PermissionError:
        print("bootd probe: needs root (raw sockets)", file=sys.stderr)
        return 2
    except (OSError, ValueError) as exc:
        print(f"bootd probe: {exc}", file=sys.stderr)
        return 2


def cmd_cluster(args: argparse.Namespace) -> int:
    """`bootd cluster status`: this member's view of the cluster, from its admin API."""
    doc = _daemon_json("cluster", _api_path(args), "GET", "/api/v1/cluster")
    if doc is None:
        return 1
    if args.output == "json":
        print(json.dumps(doc, indent=2))
        return 0
    print(format_cluster(doc, time.time()))
    return 0 if doc["registered"] and doc["etcd"].get("healthy") else 2


def format_cluster(doc: dict[str, Any], now: float) -> str:
    etcd = doc["etcd"]
    health = (f"healthy, {etcd['latency_ms']} ms, etcd {etcd.get('version')}"
              if etcd.get("healthy") else f"UNREACHABLE: {etcd.get('error')}")
    lines = [f"member {doc['member']}: "
             f"{'registered' if doc['registered'] else 'NOT REGISTERED (allocates nothing)'}"
             f"; member_ttl {doc['member_ttl']:g}s, takeover after {doc['takeover_after']:g}s",
             f"etcd {', '.join(etcd['endpoints'])} (prefix {etcd['prefix']}): {health}",
             f"lease records: {doc['leases']}"]
    if doc.get("last_error"):
        lines.append(f"last error: {doc['last_error']}")
    rows = [("MEMBER", "ADDRESS", "UP", "OWNS", "IMAGE VERSIONS HELD")]
    for m in doc["members"]:
        held = ", ".join(f"{image} {len(versions)}"
                         for image, versions in m.get("versions", {}).items()) or "-"
        rows.append((m["name"] + (" (this)" if m["me"] else ""),
                     f"{m['address']}:{m['http_port']}", duration(now - float(m["since"])),
                     str(m["owns_active_leases"]), held))
    if len(rows) == 1:
        lines.append("no live members seen")
    else:
        widths = [max(len(r[i]) for r in rows) for i in range(5)]
        lines += ["  ".join(cell.ljust(w) for cell, w in zip(r, widths, strict=True)).rstrip()
                  for r in rows]
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="bootd", description=__doc__)
    parser.add_argument("--version", action="version", version=f"bootd {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    def with_config(p: argparse.ArgumentParser) -> None:
        p.add_argument("-c", "--config", type=Path, default=DEFAULT_CONFIG_PATH,
                       help=f"config file (default {DEFAULT_CONFIG_PATH})")

    p = sub.add_parser("check", help="validate a config file and summarise it")
    with_config(p)
    p.set_defaults(func=cmd_check)

    p = sub.add_parser("serve", help="run the daemon in the foreground")
    with_config(p)
    p.add_argument("--log-format", choices=["json", "console"], default=None,
                   help="default: console on a TTY, JSON otherwise")
    p.add_argument("--log-level", default="info",
                   choices=["debug", "info", "warning", "error"])
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("reload", help="ask the running daemon to re-read its config")
    with_config(p)
    p.add_argument("--api", help="admin API: unix socket path or loopback host:port "
                   "(default: server.api from the config)")
    p.set_defaults(func=cmd_reload)

    p = sub.add_parser("approve", help="let catch-all machines awaiting approval join")
    with_config(p)
    p.add_argument("nodes", nargs="*", metavar="NODE", help="node names (bootd status)")
    p.add_argument("--all", action="store_true", help="every node awaiting approval now")
    p.add_argument("--api", help="admin API (default: server.api from the config)")
    p.set_defaults(func=cmd_approve)

    p = sub.add_parser("promote", help="make a catch-all node a reserved one (a drop-in "
                       "config file, checked, then reloaded)")
    with_config(p)
    p.add_argument("node", help="the catch-all node's name (bootd status)")
    p.add_argument("--pool", required=True, help="the pool of reserved nodes it joins")
    p.add_argument("--name", required=True, help="its name from now on")
    p.add_argument("--ip", required=True, type=IPv4Address, help="its reserved address")
    p.add_argument("--api", help="admin API (default: server.api from the config)")
    p.set_defaults(func=cmd_promote)

    p = sub.add_parser("status", help="where every node is in its boot")
    with_config(p)
    p.add_argument("node", nargs="?", help="a node's name, MAC or IP: its timeline")
    p.add_argument("--api", help="admin API (default: server.api from the config)")
    p.add_argument("-o", "--output", choices=["table", "wide", "json"], default="table")
    p.add_argument("--pool", help="only nodes of this pool")
    p.add_argument("--stage", help="only nodes at this stage ('stalled' for stalled ones)")
    p.add_argument("--attempts", type=int, default=1, help="attempts to show for NODE")
    p.add_argument("--watch", action="store_true", help="refresh in place until Ctrl-C")
    p.add_argument("--interval", type=float, default=2.0, help=argparse.SUPPRESS)
    p.add_argument("--web", action="store_true",
                   help="the status page: print its URL and how to reach it from a laptop "
                        "(a unix-socket API is served on --listen until Ctrl-C)")
    p.add_argument("--listen", default="127.0.0.1:8080", metavar="HOST:PORT",
                   help="with --web and a unix-socket API: where to serve the page")
    p.set_defaults(func=cmd_status)

    p = sub.add_parser("explain", help="dry run: what would this MAC get? (config only)")
    with_config(p)
    p.add_argument("mac")
    p.add_argument("--arch", choices=["bios", "efi32", "efi64", "arm64", "http"],
                   default="bios")
    p.add_argument("--ipxe", action="store_true", help="the request comes from iPXE")
    p.add_argument("--relay", type=IPv4Address, metavar="GIADDR",
                   help="the request is relayed by this relay agent (giaddr)")
    p.add_argument("--circuit-id", help="with --relay: option 82 circuit-id (switch port)")
    p.set_defaults(func=cmd_explain)

    p = sub.add_parser("nodes", help="configured inventory and whether each was seen")
    with_config(p)
    p.add_argument("--api", help="admin API (default: server.api from the config)")
    p.add_argument("-o", "--output", choices=["table", "json"], default="table")
    p.set_defaults(func=cmd_nodes)

    p = sub.add_parser("cluster", help="cluster mode: members, who owns how many clients, "
                       "etcd health")
    p.add_argument("action", choices=["status"])
    with_config(p)
    p.add_argument("--api", help="admin API (default: server.api from the config)")
    p.add_argument("-o", "--output", choices=["table", "json"], default="table")
    p.set_defaults(func=cmd_cluster)

    from bootd.cli import images, power, rollout
    images.add_parser(sub, with_config)
    power.add_parser(sub, with_config)
    rollout.add_parser(sub, with_config)

    p = sub.add_parser("probe", help="play a PXE client against the boot server on an "
                       "interface (any server: bootd, dnsmasq, ...)")
    p.add_argument("--interface", "-i", required=True)
    p.add_argument("--mac", help="client MAC to claim (default: the interface's)")
    p.add_argument("--arch", choices=["bios", "efi32", "efi64", "arm64", "http"],
                   default="bios")
    p.add_argument("--ipxe", action="store_true", help="send user class iPXE")
    p.add_argument("--timeout", type=float, default=5.0)
    p.set_defaults(func=cmd_probe)

    p = sub.add_parser("lab", help="demo: VMs PXE boot from bootd on a throw-away network "
                       "(root)")
    p.add_argument("--vms", type=int, default=2, help="how many VMs (default 2)")
    p.add_argument("--uefi", action="store_true", help="OVMF UEFI instead of BIOS")
    p.add_argument("--image", type=Path, metavar="DIR",
                   help="boot this image (from images/build-production-image.sh) instead "
                   "of the test image")
    p.add_argument("--racks", type=int, default=0, metavar="N",
                   help="put the VMs in N rack subnets behind a router and a DHCP relay")
    p.add_argument("--dhcp-only", action="store_true",
                   help="no VMs: DHCP clients speaking like firmware, iPXE and Linux")
    p.add_argument("--rollout", action="store_true",
                   help="updating the fleet: two VMs with IPMI BMCs boot image v1, then a "
                   "rollout moves them to v2")
    p.set_defaults(func=cmd_lab)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    rc: int = args.func(args)
    return rc

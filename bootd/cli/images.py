"""`bootd image add|list|promote|rollback|prune`: image versions in the image store.

The store is files on this host (bootd/fleet/imagestore.py), so these commands work with
or without a running daemon; after a change they ask the daemon to reload, which is when
new boots see it. How many nodes run each version comes from `bootd status` (the daemon,
else its database).

In cluster mode the pointers and the version records are in etcd (bootd/fleet/
imagesync.py): `add` imports the build into this host's store and asks this host's
daemon to publish it (the other members then fetch it); `list`, `promote`, `rollback`
and `prune` ask the daemon, which changes etcd.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bootd.fleet.config import ConfigError, cluster_mode_of, image_store_of, load_config
from bootd.fleet.imagestore import ImageStore, ImageStoreError
from bootd.ops.text import ago


def add_parser(sub: Any, with_config: Callable[[argparse.ArgumentParser], None]) -> None:
    from bootd.cli.main import verb_adder

    p = sub.add_parser("image", help="image versions: add, list, promote, rollback, prune")
    verb = verb_adder(p, with_config, cmd_image)

    v = verb("add", "import a build (images/build-production-image.sh's output) as a new "
             "version")
    v.add_argument("name")
    v.add_argument("dir", type=Path)
    v.add_argument("--cmdline", help="kernel command line (default: its bootd-image.yaml's)")
    v = verb("list", "versions, sizes, which is current and how many nodes run each")
    v.add_argument("name", nargs="?")
    v.add_argument("-o", "--output", choices=["table", "json"], default="table")
    v = verb("promote", "make VERSION the one new boots of NAME get (every pool)")
    v.add_argument("name")
    v.add_argument("version")
    v = verb("rollback", "return NAME to the version promoted before")
    v.add_argument("name")
    v = verb("prune", "delete versions that no node runs and nothing points at or pins")
    v.add_argument("name")
    v.add_argument("--keep", type=int, default=2, help="keep the N newest anyway (default 2)")


def _fail(message: str) -> int:
    print(f"bootd image: {message}", file=sys.stderr)
    return 1


def cmd_image(args: argparse.Namespace) -> int:
    try:
        store = ImageStore(image_store_of(args.config))
        clustered = cluster_mode_of(args.config)
    except (ConfigError, OSError) as exc:
        return _fail(f"cannot read the config's server block: {exc}")
    if clustered:
        try:
            return _in_cluster(args, store)
        except ImageStoreError as exc:
            return _fail(str(exc))
    try:
        if args.verb == "add":
            added = store.add(args.name, args.dir, args.cmdline)
            state = ("promoted (the image's first version)" if added.promoted
                     else "not promoted: `bootd image promote` when ready")
            print(f"{args.name}@{added.version}: "
                  f"{'added' if added.new else 'already in the store'}; {state}")
            return _reload(args) if added.new else 0
        if args.verb == "promote":
            store.promote(args.name, args.version)
            print(f"{args.name}@{args.version} promoted: new boots of every pool get it")
            return _reload(args)
        if args.verb == "rollback":
            back = store.rollback(args.name)
            print(f"{args.name} rolled back to {back.promoted}")
            return _reload(args)
        if args.verb == "prune":
            running = _node_images(args)
            if running is None:
                return _fail("cannot tell which versions nodes run (no daemon, no "
                             "database): nothing pruned")
            pinned = _pinned(args.config, args.name)
            in_use = {ref.partition("@")[2] for ref in running if ref.startswith(
                args.name + "@")} | pinned
            removed = store.prune(args.name, args.keep, in_use)
            print(f"pruned {', '.join(removed)}" if removed else "nothing to prune")
            return 0
        return _list(args, store)
    except ImageStoreError as exc:
        return _fail(str(exc))


def _in_cluster(args: argparse.Namespace, store: ImageStore) -> int:
    from bootd.cli.main import _api_path, _ask_daemon

    api = _api_path(args)
    if args.verb == "add":
        added = store.add(args.name, args.dir, args.cmdline, own_pointers=False)
        print(f"{args.name}@{added.version}: "
              f"{'added' if added.new else 'already in the store'} on this member")
        answer = _ask_daemon("image", api, "POST", f"/api/v1/images/{args.name}/publish",
                             {"version": added.version})
        if answer is None:
            print(f"(no daemon at {api}: this member publishes it to the cluster when "
                  "bootd starts)")
            return 0
        code, text = answer
        if code != 200:
            return _fail(f"the daemon could not publish it: {text.strip()[:400]}")
        promoted = json.loads(text).get("promoted")
        print("published to the cluster; the other members fetch it now; "
              + ("promoted (the image's first version)" if promoted
                 else "not promoted: `bootd image promote` when every member holds it"))
        return 0
    if args.verb == "list":
        path = "/api/v1/images" + (f"?name={args.name}" if args.name else "")
        return _cluster_answer(_ask_daemon("image", api, "GET", path), args, api)
    body: dict[str, Any] = {}
    if args.verb == "promote":
        body = {"version": args.version}
    elif args.verb == "prune":
        body = {"keep": args.keep}
    return _cluster_answer(_ask_daemon("image", api, "POST",
                                       f"/api/v1/images/{args.name}/{args.verb}", body),
                           args, api)


def _cluster_answer(answer: tuple[int, str] | None, args: argparse.Namespace,
                    api: str) -> int:
    if answer is None:
        return _fail(f"cluster mode: the image pointers are in etcd; `bootd image "
                     f"{args.verb}` asks this host's daemon, and none answers at {api}")
    code, text = answer
    if code != 200:
        return _fail(text.strip().removeprefix("bootd: ")[:400])
    doc = json.loads(text)
    if args.verb == "list":
        return _print_versions(args, doc["images"], "the cluster")
    if args.verb == "promote":
        print(f"{args.name}@{args.version} promoted in the cluster: new boots of every "
              "pool get it")
    elif args.verb == "rollback":
        print(f"{args.name} rolled back to {doc['promoted']} in the cluster")
    else:
        removed = doc["pruned"]
        print(f"pruned {', '.join(removed)} (every member deletes its copy)" if removed
              else "nothing to prune")
    return 0


def _reload(args: argparse.Namespace) -> int:
    import aiohttp

    from bootd.cli.main import _admin_request, _api_path

    api = _api_path(args)
    try:
        code, text = asyncio.run(_admin_request(api, "POST", "/api/v1/reload"))
    except (aiohttp.ClientError, OSError):
        print(f"(no daemon at {api}: it picks this up when it starts or reloads)")
        return 0
    if code != 200 or not json.loads(text).get("ok"):
        return _fail(f"the daemon refused to reload: {text.strip()[:400]}")
    print("the daemon reloaded: new boots see it now")
    return 0


def _pinned(config_path: Path, name: str) -> set[str]:
    """Versions of `name` the config pins (`image: NAME@VERSION`)."""
    try:
        config = load_config(config_path)
    except ConfigError:
        return set()
    profiles = [config.defaults, *config.tags.values(), *config.pools,
                *(n for p in config.pools for n in p.nodes)]
    return {p.image.partition("@")[2] for p in profiles
            if p.image and p.image.startswith(name + "@")}


def _node_images(args: argparse.Namespace) -> Counter[str] | None:
    """How many nodes report each image reference (NAME@VERSION)."""
    from bootd.cli.main import _status_answer

    ns = argparse.Namespace(config=args.config, api=args.api, node=None, attempts=1)
    answer, _ = _status_answer(ns)
    if answer is None:
        return None
    return Counter(str(n["image"]) for n in answer["nodes"] if n.get("image"))


def _list(args: argparse.Namespace, store: ImageStore) -> int:
    running = _node_images(args) or Counter()
    names = [args.name] if args.name else sorted(store.names())
    doc: list[dict[str, Any]] = []
    for name in names:
        ptr = store.pointers(name)
        for info in store.versions(name):
            doc.append({
                "image": name, "version": info.version, "added": info.added,
                "size": sum(info.sizes.values()), "promoted": info.version == ptr.promoted,
                "pools": sorted(p for p, v in ptr.pools.items() if v == info.version),
                "nodes": running.get(f"{name}@{info.version}", 0),
                "sha256": dict(info.digests), "cmdline": info.cmdline})
    if args.name and not doc:
        return _fail(f"no image {args.name!r} in {store.root}")
    return _print_versions(args, doc, str(store.root))


def _print_versions(args: argparse.Namespace, doc: list[dict[str, Any]], where: str) -> int:
    if args.output == "json":
        print(json.dumps({"images": doc}, indent=2))
        return 0
    if not doc:
        print(f"no images in {where} (bootd image add NAME DIR)")
        return 0
    clustered = any("held_by" in d for d in doc)
    rows = [("IMAGE", "VERSION", "SIZE", "ADDED", "CURRENT", "NODES",
             *(("MEMBERS",) if clustered else ()))]
    now = time.time()
    for d in doc:
        current = ", ".join((["promoted"] if d["promoted"] else [])
                            + [f"pool {p}" for p in d["pools"]]) or "-"
        members: tuple[str, ...] = ()
        if clustered:
            held = len(d["held_by"])
            members = (f"{held}/{held + len(d['missing_on'])}"
                       + (f" (not {','.join(d['missing_on'])})" if d["missing_on"] else ""),)
        rows.append((d["image"], d["version"], f"{d['size'] / 2**20:.1f} MiB",
                     ago(d["added"], now), current, str(d["nodes"]), *members))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for r in rows:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip())
    return 0

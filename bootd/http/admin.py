"""The admin API: status, nodes, tokens, metrics and reload, for operators and the CLI.

It listens on a unix socket or a loopback address (`server.api`), never on the boot
network: nothing here is for a booting node, and reload is not for anyone on the LAN.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any, TypeVar

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from bootd.fleet.directory import NodeDirectory
from bootd.fleet.images import split_ref
from bootd.fleet.imagestore import ImageStoreError
from bootd.fleet.imagesync import SharedImages
from bootd.fleet.inventory import NodeProfile
from bootd.fleet.mac import normalize_mac
from bootd.fleet.tokens import TokenProvider
from bootd.http.page import Explainer, PageSources, add_page
from bootd.live import View
from bootd.ops.metrics import Metrics
from bootd.power.rollouts import RolloutError, Rollouts
from bootd.state.approvals import Approvals
from bootd.state.etcd import NotRegistered
from bootd.state.recorder import Recorder


@dataclass(frozen=True)
class AdminSettings:
    """What the admin API takes from one config load."""

    directory: NodeDirectory
    tokens: Mapping[str, TokenProvider]


@dataclass(frozen=True)
class ReloadResult:
    ok: bool
    errors: list[str]
    restart_required: list[str]


Reload = Callable[[], ReloadResult]
ClusterStatus = Callable[[], Awaitable[dict[str, Any]]]

SETTINGS = web.AppKey[View[AdminSettings]]("settings")
METRICS = web.AppKey("metrics", Metrics)
RECORDER = web.AppKey[Recorder | None]("recorder")
RELOAD = web.AppKey[Reload | None]("reload")
APPROVALS = web.AppKey[Approvals | None]("approvals")
CLUSTER = web.AppKey[ClusterStatus | None]("cluster")
ROLLOUTS = web.AppKey[Rollouts | None]("rollouts")
IMAGES = web.AppKey[SharedImages | None]("images")

routes = web.RouteTableDef()
T = TypeVar("T")


def _node_json(node: NodeProfile, directory: NodeDirectory) -> dict[str, object]:
    learned = directory.learned.get(node.name)
    return {
        "name": node.name, "pool": node.pool, "macs": list(node.macs),
        "ip": str(node.ip) if node.ip else None, "network": node.network,
        "port": None if node.port is None else {
            "relay": str(node.port.relay), "circuit_id": node.port.circuit_id.decode(),
            "remote_id": node.port.remote_id.decode() if node.port.remote_id else None},
        "learned_mac": learned, "tags": list(node.tags),
        "image": node.image, "cluster": node.cluster, "labels": dict(node.labels),
        "taints": list(node.taints), "kernel_args": list(node.kernel_args),
        "dynamic": node.dynamic,
    }


def _all_nodes(directory: NodeDirectory) -> list[dict[str, object]]:
    """Configured nodes, then catch-all nodes holding an active lease."""
    out = [_node_json(n, directory) for n in directory.nodes]
    for holder, ip, expires in directory.active_leases(time.time()):
        out.append({**_node_json(holder.node, directory), "ip": str(ip),
                    "network": directory.inventory.network_name(ip),
                    "lease_expires": expires})
    return out


def _wired(request: web.Request, key: web.AppKey[T | None], what: str) -> T:
    """A part the daemon wires in (tests and tools may leave it out): 501 without it."""
    part = request.app[key]
    if part is None:
        raise web.HTTPNotImplemented(text=f"bootd: {what} is not wired in this process\n")
    return part


@routes.get("/healthz")
async def healthz(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})


@routes.get("/metrics")
async def metrics(request: web.Request) -> web.Response:
    registry = request.app[METRICS]
    for name, provider in request.app[SETTINGS].get().tokens.items():
        status = provider.status()
        registry.token_failures.labels(name).set(status.failures)
        registry.token_available.labels(name).set(1 if status.has_token else 0)
        if provider.config.per_node:
            for kind in ("minted", "revoked", "refused", "outstanding"):
                registry.tokens_minted.labels(name, kind).set(getattr(status, kind))
    recorder = request.app[RECORDER]
    if recorder is not None:
        recorder.update_gauges()
    return web.Response(body=generate_latest(registry.registry),
                        headers={"Content-Type": CONTENT_TYPE_LATEST})


@routes.get("/api/v1/nodes")
async def nodes(request: web.Request) -> web.Response:
    return web.json_response(_all_nodes(request.app[SETTINGS].get().directory))


@routes.get("/api/v1/nodes/{name}")
async def node_detail(request: web.Request) -> web.Response:
    wanted = request.match_info["name"]
    with contextlib.suppress(ValueError):  # a MAC in any spelling
        wanted = normalize_mac(wanted)
    for entry in _all_nodes(request.app[SETTINGS].get().directory):
        macs = entry["macs"]
        assert isinstance(macs, list)
        if wanted in (entry["name"], entry["ip"], entry["learned_mac"], *macs):
            return web.json_response(entry)
    raise web.HTTPNotFound(text=f"no node {wanted!r}\n")


@routes.get("/api/v1/tokens")
async def tokens_status(request: web.Request) -> web.Response:
    tokens = request.app[SETTINGS].get().tokens
    return web.json_response({name: vars(p.status()) for name, p in tokens.items()})


@routes.get("/api/v1/status")
async def status(request: web.Request) -> web.Response:
    """Every node seen or configured: where it is in its boot (see `bootd status`)."""
    directory = request.app[SETTINGS].get().directory
    recorder = _wired(request, RECORDER, "the event recorder")
    document = recorder.status_document(directory.nodes, directory.inventory.network_name,
                                        desired=directory.desired_image)
    rollouts = request.app[ROLLOUTS]
    if rollouts is not None:
        for row in document["nodes"]:
            row["rollout"] = rollouts.node_note(row["node"]) if row["node"] else None
    response = web.json_response(document)
    response.enable_compression()  # 5,000 nodes: 1.7 MB, ~0.2 MB gzipped (`ssh -L`)
    return response


@routes.get("/api/v1/status/{node}")
async def status_detail(request: web.Request) -> web.Response:
    recorder = _wired(request, RECORDER, "the event recorder")
    wanted = request.match_info["node"]
    state = recorder.find(wanted)
    if state is None:
        raise web.HTTPNotFound(text=f"bootd: no boot events for {wanted!r}\n")
    try:
        attempts = max(1, int(request.query.get("attempts", "1")))
    except ValueError:
        raise web.HTTPBadRequest(text="bootd: attempts must be a number\n") from None
    network = request.app[SETTINGS].get().directory.inventory.network_name(state.ip)
    return web.json_response({"now": time.time(), **state.to_json(with_history=attempts),
                              "network": network})


@routes.get("/api/v1/approvals")
async def approvals_status(request: web.Request) -> web.Response:
    """Catch-all nodes awaiting an operator (with when they last asked), and approved."""
    approvals = _wired(request, APPROVALS, "approval")
    return web.json_response({"awaiting": dict(approvals.awaiting),
                              "approved": sorted(approvals.approved)})


@routes.post("/api/v1/approve")
async def approve(request: web.Request) -> web.Response:
    """{"nodes": [NAME, ...]} or {"all": true}: every node awaiting now."""
    approvals = _wired(request, APPROVALS, "approval")
    try:
        body = await request.json()
        nodes = [str(n) for n in body.get("nodes", [])]
        everyone = body.get("all") is True
    except (ValueError, AttributeError, TypeError):
        raise web.HTTPBadRequest(text='bootd: expected {"nodes": [...]} or {"all": true}\n',
                                 ) from None
    now = time.time()
    unknown = [n for n in nodes if n not in approvals.awaiting
               and n not in approvals.approved]
    if unknown:  # a typo must not approve a name no machine has asked with
        raise web.HTTPNotFound(text=f"bootd: no catch-all node awaiting approval is "
                                    f"named {', '.join(unknown)}\n")
    approved = approvals.approve_all(now) if everyone else approvals.approve(nodes, now)
    return web.json_response({"approved": approved})


@routes.get("/api/v1/cluster")
async def cluster_status(request: web.Request) -> web.Response:
    """Members, liveness, owners, etcd health: `bootd cluster status`."""
    status = request.app[CLUSTER]
    if status is None:
        raise web.HTTPNotFound(text="bootd: not in cluster mode (no `cluster:` in the "
                                    "config)\n")
    return web.json_response(await status())


def _rollouts(request: web.Request) -> Rollouts:
    return _wired(request, ROLLOUTS, "rollouts")


@routes.get("/api/v1/rollout")
async def rollout_status(request: web.Request) -> web.Response:
    """The current (or last) rollout and the ones before: `bootd rollout status`."""
    return web.json_response(_rollouts(request).status())


@routes.post("/api/v1/rollout")
async def rollout_start(request: web.Request) -> web.Response:
    """{"pool", "image": NAME@VERSION, "canary", "max_unavailable", "max_failed",
    "timeout"}: `bootd rollout start`."""
    try:
        body = await request.json()
        pool, image = str(body["pool"]), str(body["image"])
        canary, max_failed = int(body.get("canary", 1)), int(body.get("max_failed", 1))
        max_unavailable = str(body.get("max_unavailable", "10%"))
        timeout = float(body.get("timeout", 900.0))
    except (ValueError, KeyError, TypeError, AttributeError):
        raise web.HTTPBadRequest(text='bootd: expected {"pool": ..., "image": '
                                      '"NAME@VERSION", ...}\n') from None
    try:
        started = await _rollouts(request).start(pool, image, canary=canary,
                                                 max_unavailable=max_unavailable,
                                                 max_failed=max_failed, timeout=timeout)
    except RolloutError as exc:
        raise web.HTTPConflict(text=f"bootd: {exc}\n") from None
    return web.json_response(started.to_json())


@routes.post("/api/v1/rollout/{verb}")
async def rollout_verb(request: web.Request) -> web.Response:
    """pause, resume or abort the current rollout."""
    rollouts = _rollouts(request)
    verb = request.match_info["verb"]
    change = {"pause": rollouts.pause, "resume": rollouts.resume,
              "abort": rollouts.abort}.get(verb)
    if change is None:
        raise web.HTTPNotFound(text=f"bootd: no rollout verb {verb!r}\n")
    try:
        return web.json_response((await change()).to_json())
    except RolloutError as exc:
        raise web.HTTPConflict(text=f"bootd: {exc}\n") from None


# ---------------------------------------------------------------------------- images
# Cluster mode only: the pointers and version records are etcd's (bootd/fleet/imagesync.py),
# so `bootd image` asks a member. A single instance's store is files the CLI changes itself.


def _images(request: web.Request) -> SharedImages:
    images = request.app[IMAGES]
    if images is None:
        raise web.HTTPNotFound(text="bootd: not in cluster mode: `bootd image` works on "
                                    "the image store directly\n")
    return images


def _running(request: web.Request) -> Counter[str]:
    """How many nodes report each image reference."""
    directory = request.app[SETTINGS].get().directory
    recorder = _wired(request, RECORDER, "the event recorder")
    rows = recorder.status_document(directory.nodes, directory.inventory.network_name,
                                    desired=directory.desired_image)["nodes"]
    return Counter(str(r["image"]) for r in rows if r.get("image"))


async def _image_change(change: Awaitable[T]) -> T:
    try:
        return await change
    except ImageStoreError as exc:
        raise web.HTTPConflict(text=f"bootd: {exc}\n") from None
    except NotRegistered as exc:
        raise web.HTTPServiceUnavailable(text=f"bootd: {exc}\n") from None
    except (OSError, TimeoutError) as exc:  # etcd did not answer in time
        raise web.HTTPServiceUnavailable(text=f"bootd: etcd: {exc or 'timed out'}\n",
                                         ) from None


async def _body(request: web.Request) -> dict[str, Any]:
    try:
        body = await request.json() if request.can_read_body else {}
    except ValueError:
        body = None
    if not isinstance(body, dict):
        raise web.HTTPBadRequest(text="bootd: expected a JSON object\n")
    return body


@routes.get("/api/v1/images")
async def images_list(request: web.Request) -> web.Response:
    """Every version in the cluster, who holds it and how many nodes run it."""
    name = request.query.get("name") or None
    doc = _images(request).listing(name, _running(request))
    if name and not doc:
        raise web.HTTPNotFound(text=f"bootd: no image {name!r} in the cluster\n")
    return web.json_response({"images": doc})


@routes.post("/api/v1/images/{name}/{verb}")
async def images_verb(request: web.Request) -> web.Response:
    """publish {"version"}, promote {"version"}, rollback, prune {"keep"}."""
    images, name, verb = _images(request), request.match_info["name"], \
        request.match_info["verb"]
    body = await _body(request)
    version = str(body.get("version", ""))
    if verb == "publish":
        promoted = await _image_change(images.publish(name, version))
        return web.json_response({"promoted": promoted})
    if verb == "promote":
        ptr = await _image_change(images.promote(name, version))
    elif verb == "rollback":
        ptr = await _image_change(images.rollback(name))
    elif verb == "prune":
        try:
            keep = int(body.get("keep", 2))
        except (TypeError, ValueError):
            raise web.HTTPBadRequest(text="bootd: keep must be a number\n") from None
        directory = request.app[SETTINGS].get().directory
        profiles = [*directory.nodes]
        if directory.inventory.catch_all is not None:
            profiles.append(directory.inventory.catch_all.base)
        pinned = {v for n in profiles if n.image and (ref := split_ref(n.image))[0] == name
                  and (v := ref[1]) is not None}
        running = {split_ref(ref)[1] or "" for ref in _running(request)
                   if split_ref(ref)[0] == name}
        removed = await _image_change(images.prune(name, keep, running | pinned))
        return web.json_response({"pruned": removed})
    else:
        raise web.HTTPNotFound(text=f"bootd: no image verb {verb!r}\n")
    return web.json_response(ptr.to_json())


@routes.post("/api/v1/reload")
async def reload_config(request: web.Request) -> web.Response:
    result = _wired(request, RELOAD, "reload")()
    return web.json_response({"ok": result.ok, "errors": result.errors,
                              "restart_required": result.restart_required},
                             status=200 if result.ok else 422)


def admin_app(settings: View[AdminSettings], metrics: Metrics,
              recorder: Recorder | None = None, reload: Reload | None = None,
              explainer: Explainer | None = None, approvals: Approvals | None = None,
              cluster: ClusterStatus | None = None, rollouts: Rollouts | None = None,
              images: SharedImages | None = None) -> web.Application:
    """The admin API, and the status page (bootd.http.page) that draws its answers."""
    app = web.Application()
    app[SETTINGS] = settings
    app[METRICS] = metrics
    app[RECORDER] = recorder
    app[RELOAD] = reload
    app[APPROVALS] = approvals
    app[CLUSTER] = cluster
    app[ROLLOUTS] = rollouts
    app[IMAGES] = images
    app.add_routes(routes)
    add_page(app, PageSources(lambda: settings.get().directory, recorder, explainer,
                              asyncio.Event()))
    return app

"""aiohttp applications: the boot network (scripts, images, join) and the admin API.

Scripts are rendered in memory per request (aiohttp's FileResponse costs a thread hop per
file, fine for a 500 MB rootfs, wasteful for 1 KiB of text); images stream with sendfile.
The admin API is a separate application bound to a unix socket or loopback only.
"""

from __future__ import annotations

import contextlib
import json
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from ipaddress import IPv4Address
from pathlib import Path
from types import MappingProxyType

import structlog
from aiohttp import web
from aiohttp.abc import AbstractStreamWriter
from multidict import CIMultiDict
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from bootd.dhcp.decide import DhcpContext
from bootd.fleet.config import ClusterConfig, Config
from bootd.fleet.filetree import FileResolver
from bootd.fleet.grub import GrubConfigs
from bootd.fleet.images import PARTS, FileVersion, ImageHashes, image_path, version_of
from bootd.fleet.inventory import NodeProfile
from bootd.fleet.mac import mac_dashed, normalize_mac
from bootd.fleet.render import (
    cloud_meta_data,
    cloud_network_config,
    cloud_user_data,
    cloud_vendor_data,
    ipxe_generic,
    ipxe_give_up,
    ipxe_node,
    join_script,
)
from bootd.fleet.tokens import TokenProvider
from bootd.ops.metrics import Metrics
from bootd.ops.ratelimit import TokenBucket
from bootd.state import events
from bootd.state.events import BootEvent
from bootd.state.recorder import Recorder
from bootd.tftp.protocol import ErrorCode, TftpError

log = structlog.get_logger("bootd.http")

EVENT_MAX_BYTES = 4096
EVENT_RATE, EVENT_BURST = 5.0, 20.0  # per node: bursts of 20 reports, then 5 a second
_STAGE = re.compile(r"^[a-z][a-z0-9-]{0,31}$")
_TOKEN_LIKE = re.compile(r"\b[a-z0-9]{6}\.[a-z0-9]{16}\b")  # kubeadm bootstrap token
TEXT = "text/plain; charset=utf-8"


@dataclass(frozen=True)
class ReloadResult:
    ok: bool
    errors: list[str]
    restart_required: list[str]


@dataclass
class HttpContext:
    config: Config
    dhcp: DhcpContext
    hashes: ImageHashes
    tokens: dict[str, TokenProvider]
    files: FileResolver
    grub: GrubConfigs
    metrics: Metrics
    url: str
    reload: Callable[[], ReloadResult] | None = None
    recorder: Recorder | None = None

    def event(self, stage: str, node: NodeProfile | None, mac: str | None,
              request: web.BaseRequest, outcome: str = "ok", **detail: object) -> None:
        """A boot event for `bootd status`; never carries secrets."""
        if self.recorder is None or (node is None and mac is None):
            return
        self.recorder.record(BootEvent(
            time.time(), stage, node.name if node else None, mac, request.remote,
            node.pool if node else None, outcome,
            MappingProxyType({k: v for k, v in detail.items() if v is not None})))

    def client_ip(self, request: web.BaseRequest) -> IPv4Address | None:
        peer = request.remote
        try:
            return IPv4Address(peer) if peer else None
        except ValueError:
            return None


CTX = web.AppKey("ctx", HttpContext)
EVENT_LIMIT = web.AppKey("event_limit", TokenBucket)


def _mac_or_400(text: str) -> str:
    try:
        return normalize_mac(text)
    except ValueError:
        raise web.HTTPBadRequest(text=f"malformed MAC address {text!r}\n") from None


def _node_fields(node: NodeProfile | None, mac: str | None = None) -> dict[str, object]:
    if node is None:
        return {"mac": mac} if mac else {}
    return {"node": node.name, "mac": mac or node.macs[0], "pool": node.pool}


# ---------------------------------------------------------------------------- boot network


async def generic_script(request: web.Request) -> web.Response:
    ctx = request.app[CTX]
    mac = request.query.get("mac")
    if mac:
        return await _node_script(ctx, _mac_or_400(mac), request)
    return web.Response(text=ipxe_generic(ctx.url), content_type="text/plain")


async def node_script(request: web.Request) -> web.Response:
    ctx = request.app[CTX]
    return await _node_script(ctx, _mac_or_400(request.match_info["mac"]), request)


async def _node_script(ctx: HttpContext, mac: str, request: web.Request) -> web.Response:
    def give_up(what: str) -> web.Response:
        ctx.event(events.REFUSED if node is None else events.IPXE_SCRIPT, node, mac, request,
                  "refused" if node is None else "error", reason=what)
        try:
            attempt = max(1, int(request.query.get("attempt", "1")))
        except ValueError:
            attempt = 1
        text = ipxe_give_up(what, f"{ctx.url}/nodes/{mac_dashed(mac)}/boot.ipxe", attempt,
                            ctx.config.ipxe.attempts, int(ctx.config.ipxe.retry_interval))
        return web.Response(text=text, content_type="text/plain")

    node = ctx.dhcp.inventory.resolve(mac)
    if node is None:
        log.warning("http ipxe-script unknown-mac", mac=mac, client=request.remote)
        return give_up(f"{mac} is not in bootd's inventory and there is no catch-all pool")
    image = ctx.config.images.get(node.image) if node.image else None
    if image is None:
        log.warning("http ipxe-script no-image", **_node_fields(node, mac))
        return give_up(f"no image is configured for {node.name}")
    missing = [str(p) for p in (image.kernel, image.initrd) if version_of(p) is None]
    if missing:
        log.error("http ipxe-script image-missing", **_node_fields(node, mac), missing=missing)
        return give_up(f"image {node.image} for {node.name} is missing on the server: "
                       + ", ".join(missing))
    rootfs_sha = None
    if image.rootfs is not None and (version := version_of(image.rootfs)) is not None:
        rootfs_sha = await ctx.hashes.sha256(version)
    log.info("http ipxe-script", **_node_fields(node, mac), client=request.remote)
    ctx.event(events.IPXE_SCRIPT, node, mac, request, image=node.image)
    return web.Response(text=ipxe_node(node, mac, image, ctx.url, rootfs_sha),
                        content_type="text/plain")


async def grub_config(request: web.Request) -> web.Response:
    ctx = request.app[CTX]
    mac = _mac_or_400(request.match_info["mac"])
    return web.Response(text=ctx.grub.for_mac(mac), content_type="text/plain")


async def beacon(request: web.Request) -> web.Response:
    ctx = request.app[CTX]
    mac = _mac_or_400(request.match_info["mac"])
    node = ctx.dhcp.inventory.resolve(mac)
    log.info("http kernel-handoff", **_node_fields(node, mac), client=request.remote)
    ctx.event(events.KERNEL_HANDOFF, node, mac, request)
    return web.Response(text="bootd: kernel handed control\n", content_type="text/plain")


def _image_version(ctx: HttpContext, name: str, part: str) -> FileVersion:
    """The current version of a configured image file, or 404 saying what is wrong."""
    image = ctx.config.images.get(name)
    path = image_path(image, part) if image is not None and part in PARTS else None
    if path is None:
        raise web.HTTPNotFound(text=f"no image file {name}/{part}\n")
    version = version_of(path)
    if version is None:
        log.error("http image file missing", image=name, part=part, path=str(path))
        raise web.HTTPNotFound(text=f"{name}/{part} is configured but {path} is missing\n")
    return version


async def image_file(request: web.Request) -> web.StreamResponse:
    ctx = request.app[CTX]
    name, part = request.match_info["image"], request.match_info["part"]
    version = _image_version(ctx, name, part)
    response = _ImageResponse(version.path, ctx, name, part,
                              _honour_if_range(request, version))
    digest = ctx.hashes.cached(version)
    if digest is not None:
        response.headers["X-Checksum-Sha256"] = digest
    return response


def _honour_if_range(request: web.Request, version: FileVersion) -> web.Request:
    """aiohttp reads If-Range only as a date; an entity tag there would be ignored and a
    node resuming a replaced image would get a 206 of the new file spliced onto the old.
    A non-matching tag drops the Range, so the whole new file is sent (RFC 9110 13.1.5)."""
    tag = request.headers.get("If-Range", "")
    is_tag = tag.startswith('"') or tag.startswith("W/")
    if "Range" in request.headers and is_tag and tag != version.etag:
        headers = CIMultiDict(request.headers)
        del headers["Range"]
        return request.clone(headers=headers)
    return request


class _ImageResponse(web.FileResponse):
    """sendfile with Range/ETag from aiohttp; logs the fetch once the body is sent."""

    def __init__(self, path: Path, ctx: HttpContext, image: str, part: str,
                 request: web.Request) -> None:
        super().__init__(path, chunk_size=256 * 1024)
        self._ctx, self._image, self._part = ctx, image, part
        self._effective = request  # the request as we decided to answer it

    async def prepare(self, request: web.BaseRequest) -> AbstractStreamWriter | None:
        started = time.monotonic()
        try:
            return await super().prepare(self._effective)
        finally:
            if request.method == "GET":
                self._record(request, time.monotonic() - started)

    def _record(self, request: web.BaseRequest, duration: float) -> None:
        ctx = self._ctx
        sent = self.content_length or 0
        client = ctx.client_ip(request)
        found = ctx.dhcp.node_for_ip(client, time.time()) if client else None
        ctx.metrics.http_image_bytes.labels(self._part).inc(sent)
        if found is not None:
            ctx.event(self._part, found[0], found[1], request,
                      "ok" if self.status < 400 else "error", image=self._image, bytes=sent,
                      status=self.status, range=request.headers.get("Range"),
                      duration=round(duration, 4))
        log.info(f"http {self._part}", image=self._image, status=self.status, bytes=sent,
                 range=request.headers.get("Range"), client=request.remote,
                 duration_s=round(duration, 4), **(_node_fields(*found) if found else {}))


async def image_sha256(request: web.Request) -> web.Response:
    ctx = request.app[CTX]
    name, part = request.match_info["image"], request.match_info["part"]
    digest = await ctx.hashes.sha256(_image_version(ctx, name, part))
    return web.Response(text=f"{digest}  {part}\n", content_type="text/plain")


async def boot_file(request: web.Request) -> web.Response:
    """TFTP-root files over HTTP, for UEFI HTTP boot; same path rules as TFTP."""
    ctx = request.app[CTX]
    client = ctx.client_ip(request) or IPv4Address(0)
    try:
        source = ctx.files.open(request.match_info["path"], client)
    except TftpError as exc:
        status = 404 if exc.code == ErrorCode.FILE_NOT_FOUND else 403
        return web.Response(status=status, text=exc.message + "\n")
    try:
        body = source.read(0, source.size)
    finally:
        close = getattr(source, "close", None)
        if close is not None:
            close()
    return web.Response(body=body, content_type="application/octet-stream")


def _refusal(ctx: HttpContext, request: web.Request, node: NodeProfile | None,
             mac: str) -> str | None:
    """Why this request may not have the node's secrets, or None if it comes from the
    node's own address."""
    if node is None:
        return "unknown MAC"
    client = ctx.client_ip(request)
    own = ctx.dhcp.address_of(node, mac, time.time())
    if client is None or own != client:
        return f"request from {client}, node address is {own or 'not leased'}"
    return None


def _secret_material(ctx: HttpContext, request: web.Request, mac: str, what: str,
                     ) -> tuple[NodeProfile, ClusterConfig | None, str | None]:
    """Node, cluster and token for a secret-bearing document, or 403/503."""
    node = ctx.dhcp.inventory.resolve(mac)
    refused = _refusal(ctx, request, node, mac)
    if refused is not None or node is None:
        ctx.metrics.http_refusals.labels(what).inc()
        log.warning(f"http {what} refused", mac=mac, client=request.remote, reason=refused)
        ctx.event(events.REFUSED, node, mac, request, "refused", reason=f"{what}: {refused}")
        raise web.HTTPForbidden(text=f"bootd: {what} is served only to its node\n")
    cluster = ctx.config.clusters.get(node.cluster) if node.cluster else None
    token = None
    if cluster is not None and node.cluster is not None:
        provider = ctx.tokens.get(node.cluster)
        token = provider.token() if provider is not None else None
        if token is None:
            log.error(f"http {what} no-token", **_node_fields(node, mac))
            raise web.HTTPServiceUnavailable(
                text=f"bootd: no join token for cluster {node.cluster} yet\n")
    log.info(f"http {what}", **_node_fields(node, mac), client=request.remote)
    ctx.event(events.JOIN_SCRIPT, node, mac, request, via=what)
    return node, cluster, token


async def join(request: web.Request) -> web.Response:
    ctx = request.app[CTX]
    mac = _mac_or_400(request.match_info["mac"])
    node, cluster, token = _secret_material(ctx, request, mac, "join-script")
    return web.Response(text=join_script(node, mac, ctx.url, cluster, token),
                        content_type="text/x-shellscript", headers={"Cache-Control": "no-store"})


async def cloud_init(request: web.Request) -> web.Response:
    """NoCloud datasource: ds=nocloud;s=http://<bootd>/cloud-init/<mac>/"""
    ctx = request.app[CTX]
    mac = _mac_or_400(request.match_info["mac"])
    doc = request.match_info["doc"]
    if doc == "user-data":
        node, cluster, token = _secret_material(ctx, request, mac, "cloud-init-user-data")
        text = cloud_user_data(node, mac, ctx.url, cluster, token, ctx.config.network.domain)
        return web.Response(text=text, content_type="text/cloud-config",
                            headers={"Cache-Control": "no-store"})
    if doc == "vendor-data":
        return web.Response(text=cloud_vendor_data(), content_type="text/cloud-config")
    found = ctx.dhcp.inventory.resolve(mac)
    if found is None:
        raise web.HTTPNotFound(text=f"bootd: {mac} is not in the inventory\n")
    if doc == "meta-data":
        return web.Response(text=cloud_meta_data(found, mac), content_type="text/plain")
    if doc == "network-config":
        return web.Response(text=cloud_network_config(found), content_type="text/plain")
    raise web.HTTPNotFound(text=f"bootd: no cloud-init document {doc!r}\n")


async def node_event(request: web.Request) -> web.Response:
    ctx = request.app[CTX]
    client = ctx.client_ip(request)
    found = ctx.dhcp.node_for_ip(client, time.time()) if client else None
    if found is None:
        ctx.metrics.http_refusals.labels("event").inc()
        log.warning("http event refused", client=request.remote, reason="not a node address")
        raise web.HTTPForbidden(text="bootd: events are accepted only from a node's address\n")
    if (request.content_length or 0) > EVENT_MAX_BYTES:
        raise web.HTTPRequestEntityTooLarge(max_size=EVENT_MAX_BYTES,
                                            actual_size=request.content_length or 0)
    if not request.app[EVENT_LIMIT].allow(str(client), time.monotonic()):
        raise web.HTTPTooManyRequests(text="bootd: slow down\n")
    raw = await request.content.read(EVENT_MAX_BYTES + 1)
    if len(raw) > EVENT_MAX_BYTES:
        raise web.HTTPRequestEntityTooLarge(max_size=EVENT_MAX_BYTES, actual_size=len(raw))
    try:
        body = json.loads(raw)
        stage = str(body["stage"])
        message = str(body.get("message", ""))[:500]
    except (ValueError, KeyError, TypeError):
        raise web.HTTPBadRequest(
            text='bootd: expected {"stage": ..., "message": ...}\n') from None
    if not _STAGE.match(stage):
        raise web.HTTPBadRequest(text=f"bootd: bad stage {stage[:40]!r}\n")
    node, mac = found
    message = _TOKEN_LIKE.sub("<token>", message)  # a node's own report may echo its token
    ctx.metrics.node_events.labels(stage).inc()
    log.info(f"node {stage}", **_node_fields(node, mac), message=message,
             client=request.remote)
    ctx.event(stage, node, mac, request, "error" if stage == events.FAILED else "ok",
              message=message or None, reported=True)
    return web.Response(status=204)


def boot_app(ctx: HttpContext) -> web.Application:
    app = web.Application(client_max_size=EVENT_MAX_BYTES * 4)
    app[CTX] = ctx
    app[EVENT_LIMIT] = TokenBucket(EVENT_RATE, EVENT_BURST, 65536)
    app.router.add_get("/boot.ipxe", generic_script)
    app.router.add_get("/nodes/{mac}/boot.ipxe", node_script)
    app.router.add_get("/nodes/{mac}/grub.cfg", grub_config)
    app.router.add_get("/nodes/{mac}/beacon", beacon)
    app.router.add_get("/nodes/{mac}/join.sh", join)
    app.router.add_get("/cloud-init/{mac}/{doc}", cloud_init)
    app.router.add_get("/images/{image}/{part}.sha256", image_sha256)
    app.router.add_get("/images/{image}/{part}", image_file)  # HEAD too
    app.router.add_get("/boot/{path:.+}", boot_file)
    app.router.add_post("/api/v1/events", node_event)
    return app


# ---------------------------------------------------------------------------- admin API


def _node_json(node: NodeProfile) -> dict[str, object]:
    return {
        "name": node.name, "pool": node.pool, "macs": list(node.macs),
        "ip": str(node.ip) if node.ip else None, "tags": list(node.tags),
        "image": node.image, "cluster": node.cluster, "labels": dict(node.labels),
        "taints": list(node.taints), "kernel_args": list(node.kernel_args),
        "dynamic": node.dynamic,
    }


async def healthz(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})


async def metrics(request: web.Request) -> web.Response:
    ctx = request.app[CTX]
    for name, provider in ctx.tokens.items():
        status = provider.status()
        ctx.metrics.token_failures.labels(name).set(status.failures)
        ctx.metrics.token_available.labels(name).set(1 if status.has_token else 0)
    if ctx.recorder is not None:
        ctx.recorder.update_gauges()
    return web.Response(body=generate_latest(ctx.metrics.registry),
                        headers={"Content-Type": CONTENT_TYPE_LATEST})


def _all_nodes(ctx: HttpContext) -> list[dict[str, object]]:
    """Configured nodes, then catch-all nodes holding an active lease."""
    out = [_node_json(n) for n in ctx.dhcp.inventory.nodes]
    if ctx.dhcp.leases is not None:
        now = time.time()
        for lease in ctx.dhcp.leases.leases():
            node = ctx.dhcp.inventory.resolve(lease.mac)
            if node is not None and lease.active(now):
                out.append({**_node_json(node), "ip": str(lease.ip),
                            "lease_expires": lease.expires})
    return out


async def nodes(request: web.Request) -> web.Response:
    return web.json_response(_all_nodes(request.app[CTX]))


async def node_detail(request: web.Request) -> web.Response:
    wanted = request.match_info["name"]
    with contextlib.suppress(ValueError):  # a MAC in any spelling
        wanted = normalize_mac(wanted)
    for entry in _all_nodes(request.app[CTX]):
        macs = entry["macs"]
        assert isinstance(macs, list)
        if wanted in (entry["name"], entry["ip"], *macs):
            return web.json_response(entry)
    raise web.HTTPNotFound(text=f"no node {wanted!r}\n")


async def tokens_status(request: web.Request) -> web.Response:
    ctx = request.app[CTX]
    return web.json_response({name: vars(p.status()) for name, p in ctx.tokens.items()})


async def status(request: web.Request) -> web.Response:
    """Every node seen or configured: where it is in its boot (see `bootd status`)."""
    ctx = request.app[CTX]
    if ctx.recorder is None:
        raise web.HTTPNotImplemented(text="bootd: no event recorder in this process\n")
    return web.json_response(ctx.recorder.status_document(ctx.dhcp.inventory))


async def status_detail(request: web.Request) -> web.Response:
    ctx = request.app[CTX]
    if ctx.recorder is None:
        raise web.HTTPNotImplemented(text="bootd: no event recorder in this process\n")
    wanted = request.match_info["node"]
    with contextlib.suppress(ValueError):
        wanted = normalize_mac(wanted)
    state = ctx.recorder.find(wanted)
    if state is None:
        raise web.HTTPNotFound(text=f"bootd: no boot events for {wanted!r}\n")
    try:
        attempts = max(1, int(request.query.get("attempts", "1")))
    except ValueError:
        raise web.HTTPBadRequest(text="bootd: attempts must be a number\n") from None
    return web.json_response({"now": time.time(), **state.to_json(with_history=attempts)})


async def reload_config(request: web.Request) -> web.Response:
    ctx = request.app[CTX]
    if ctx.reload is None:
        raise web.HTTPNotImplemented(text="bootd: reload is not wired in this process\n")
    result = ctx.reload()
    return web.json_response({"ok": result.ok, "errors": result.errors,
                              "restart_required": result.restart_required},
                             status=200 if result.ok else 422)


def admin_app(ctx: HttpContext) -> web.Application:
    app = web.Application()
    app[CTX] = ctx
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/metrics", metrics)
    app.router.add_get("/api/v1/nodes", nodes)
    app.router.add_get("/api/v1/nodes/{name}", node_detail)
    app.router.add_get("/api/v1/tokens", tokens_status)
    app.router.add_post("/api/v1/reload", reload_config)
    app.router.add_get("/api/v1/status", status)
    app.router.add_get("/api/v1/status/{node}", status_detail)
    return app

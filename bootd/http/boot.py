"""The boot network's HTTP app: what a booting node fetches, and nothing else.

Everything here is reachable by any machine on the boot LAN, so it serves only what a
booting node needs: iPXE and GRUB scripts, image files, boot files for UEFI HTTP boot,
join scripts and cloud-init documents (only to the node's own address: they carry the
cluster token), and the stage reports nodes POST. The admin API is another app
(`bootd.http.admin`) on another listener.

Scripts are served from memory (aiohttp's FileResponse costs a thread hop per file: fine
for a 500 MB rootfs, wasteful for 1 KiB of text); files stream with sendfile. Each request
reads the current runtime snapshot once (`BootSettings`).

A node's iPXE script is rendered once per snapshot and kept (`BootSettings.scripts`),
keyed by everything it is made of that can differ within a snapshot: the node, its MAC,
the URL the client reaches bootd by, and the rootfs hash (a rebuilt rootfs is a new
key). A reload brings a new snapshot and with it an empty cache. Join scripts and
cloud-init documents are not cached: they carry tokens minted or read per request.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import re
import time
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass, field
from ipaddress import IPv4Address
from pathlib import Path
from types import MappingProxyType

import structlog
from aiohttp import web
from aiohttp.abc import AbstractStreamWriter
from multidict import CIMultiDict

from bootd.fleet.config import ClusterConfig
from bootd.fleet.directory import Holder, NodeDirectory
from bootd.fleet.filetree import FileTree, Forbidden, NotFound
from bootd.fleet.grub import GrubConfigs
from bootd.fleet.images import (
    PARTS,
    BootImage,
    FileVersion,
    ImageCatalog,
    ImageHashes,
    image_path,
    version_of,
)
from bootd.fleet.inventory import NodeProfile
from bootd.fleet.mac import mac_dashed, normalize_mac
from bootd.fleet.render import (
    base_url,
    cloud_meta_data,
    cloud_network_config,
    cloud_user_data,
    cloud_vendor_data,
    ipxe_generic,
    ipxe_give_up,
    ipxe_node,
    join_script,
    join_wait_script,
)
from bootd.fleet.tokens import TokenProvider, TokenRefused
from bootd.live import View
from bootd.ops.metrics import Metrics
from bootd.ops.ratelimit import TokenBucket
from bootd.state import events
from bootd.state.approvals import Approvals
from bootd.state.events import BootEvent
from bootd.state.recorder import Recorder

log = structlog.get_logger("bootd.http")

EVENT_MAX_BYTES = 4096
EVENT_RATE, EVENT_BURST = 5.0, 20.0  # per node: bursts of 20 reports, then 5 a second
_STAGE = re.compile(r"[a-z][a-z0-9-]{0,31}")  # fullmatch: "failed\n" is not a stage
_IMAGE_REF = re.compile(r"[a-z0-9][a-z0-9._-]{0,62}(@[0-9a-f]{1,64})?")  # a reported image
# a kubeadm bootstrap token, wherever it stands (also glued to other word characters)
_TOKEN_LIKE = re.compile(r"[a-z0-9]{6}\.[a-z0-9]{16}", re.IGNORECASE)
_EMPTY_SUFFIX = re.compile(r"\s*bytes\s*=\s*-0+\s*")  # "the last 0 bytes": unsatisfiable
MAX_CACHED_SCRIPTS = 20_000  # per snapshot; the oldest goes first
LOOK_AGAIN = 0.05  # seconds: how stale the script lookup's view of an image file may be
# the boot event an image part's fetch is recorded as
PART_STAGES = MappingProxyType({"kernel": events.KERNEL, "initrd": events.INITRD,
                                "rootfs": events.ROOTFS})


@dataclass(frozen=True)
class BootSettings:
    """What the boot network app takes from one config load."""

    directory: NodeDirectory
    http_port: int
    images: ImageCatalog
    clusters: Mapping[str, ClusterConfig]
    tokens: Mapping[str, TokenProvider]
    hashes: ImageHashes  # shared across loads: a file version's hash never changes
    files: FileTree
    grub: GrubConfigs
    ipxe_attempts: int
    ipxe_retry_interval: int
    # cluster mode: the other live members' URLs, in the order a MAC fails over to them,
    # of those serving the same files of the image (MAC, image reference)
    peers: Callable[[str, str | None], tuple[str, ...]] = field(
        default=lambda mac, image: (), compare=False)
    # rendered iPXE scripts of this snapshot, see the module's docstring
    scripts: dict[tuple[str, str, str, str, str | None, tuple[str, ...]], str] = field(
        default_factory=dict, compare=False, repr=False)
    # what the script lookup last saw of an image file declared by paths, and when
    looked: dict[Path, tuple[float, FileVersion | None]] = field(
        default_factory=dict, compare=False, repr=False)
    urls: dict[IPv4Address | None, str] = field(default_factory=dict, compare=False,
                                                repr=False)

    def node_script(self, node: NodeProfile, mac: str, image: BootImage, url: str,
                    rootfs_sha: str | None) -> str:
        peers = self.peers(mac, image.ref)
        key = (node.name, mac, image.ref, url, rootfs_sha, peers)
        text = self.scripts.get(key)
        if text is None:
            if len(self.scripts) >= MAX_CACHED_SCRIPTS:  # made-up catch-all MACs: bounded
                del self.scripts[next(iter(self.scripts))]
            text = self.scripts[key] = ipxe_node(node, mac, image, url, rootfs_sha, peers)
        return text

    def domain_for(self, node: NodeProfile) -> str | None:
        """The DNS domain of the node's network (a catch-all node's: by its address)."""
        inventory = self.directory.inventory
        net = next((n for n in inventory.networks if n.name == node.network), None)
        if net is None and (mac := self.directory.mac_of(node)) is not None:
            address = self.directory.address_of(node, mac, time.time())
            net = inventory.network_of(address) if address is not None else None
        return net.domain if net is not None else None

    def url_for(self, client: IPv4Address | None) -> str:
        """How this client reaches this app: its network's next_server (else
        server.address) and the HTTP port. Kept per client for this snapshot (bounded:
        a boot LAN's addresses)."""
        url = self.urls.get(client)
        if url is None:
            if len(self.urls) >= MAX_CACHED_SCRIPTS:
                del self.urls[next(iter(self.urls))]
            url = self.urls[client] = base_url(
                str(self.directory.inventory.next_server_for(client)), self.http_port)
        return url

    def recent_version(self, path: Path, now: float) -> FileVersion | None:
        """version_of(path), looked at again once LOOK_AGAIN has passed: a file declared
        by path that is replaced is seen by the script lookup within LOOK_AGAIN."""
        seen = self.looked.get(path)
        if seen is not None and now - seen[0] < LOOK_AGAIN:
            return seen[1]
        version = version_of(path)
        self.looked[path] = (now, version)
        return version

    def image_versions(self) -> list[FileVersion]:
        """The files of images declared by path present now (hashed in the background at
        load); a managed version's sha256 is in its record (`_recorded_digest`)."""
        paths = [image_path(files, part) for files in self.images.unmanaged.values()
                 for part in PARTS]
        return [v for p in paths if p is not None and (v := version_of(p)) is not None]


SETTINGS = web.AppKey[View[BootSettings]]("settings")
METRICS = web.AppKey("metrics", Metrics)
RECORDER = web.AppKey[Recorder | None]("recorder")
APPROVALS = web.AppKey[Approvals | None]("approvals")
EVENT_LIMIT = web.AppKey("event_limit", TokenBucket)


def _settings(request: web.Request) -> BootSettings:
    return request.app[SETTINGS].get()


def _event(request: web.Request, stage: str, node: NodeProfile | None, mac: str | None,
           outcome: str = "ok", **detail: object) -> None:
    """A boot event for `bootd status`; never carries secrets."""
    record_event(request.app[RECORDER], request.remote, stage, node, mac, outcome, **detail)


def record_event(recorder: Recorder | None, remote: str | None, stage: str,
                 node: NodeProfile | None, mac: str | None, outcome: str = "ok",
                 **detail: object) -> None:
    if recorder is None or (node is None and mac is None):
        return
    # a MAC in a URL is anyone's to invent: refusals of unknown or catch-all machines are
    # remembered boundedly (a node with a history stays, see bootd.state.recorder)
    recorder.record(BootEvent(
        time.time(), stage, node.name if node else None, mac, remote,
        node.pool if node else None, outcome,
        MappingProxyType({k: v for k, v in detail.items() if v is not None})),
        transient=node is None or (node.dynamic and stage == events.REFUSED))


def _client_ip(request: web.BaseRequest) -> IPv4Address | None:
    return _address(request.remote) if request.remote else None


@functools.lru_cache(maxsize=4096)  # parsed per request; the boot LAN's clients repeat
def _address(text: str) -> IPv4Address | None:
    try:
        return IPv4Address(text)
    except ValueError:
        return None


def _image_ref(request: web.Request, node: NodeProfile) -> str | None:
    """The image reference the node would boot now (which peers serve the same files)."""
    return _settings(request).images.desired_ref(node.image, node.pool)


def _holder(settings: BootSettings, request: web.BaseRequest) -> Holder | None:
    client = _client_ip(request)
    return settings.directory.holder_of(client, time.time()) if client else None


def _mac_or_400(text: str) -> str:
    try:
        return normalize_mac(text)
    except ValueError:
        raise web.HTTPBadRequest(text=f"malformed MAC address {text!r}\n") from None


def _node_fields(node: NodeProfile | None, mac: str | None = None) -> dict[str, object]:
    if node is None:
        return {"mac": mac} if mac else {}
    return {"node": node.name, "mac": mac or node.macs[0], "pool": node.pool}


routes = web.RouteTableDef()


# ---------------------------------------------------------------------------- scripts


@routes.get("/boot.ipxe")
async def generic_script(request: web.Request) -> web.Response:
    settings = _settings(request)
    mac = request.query.get("mac")
    if mac:
        return await _node_script(settings, _mac_or_400(mac), request)
    return web.Response(text=ipxe_generic(settings.url_for(_client_ip(request))),
                        content_type="text/plain")


@routes.get("/nodes/{mac}/boot.ipxe")
async def node_script(request: web.Request) -> web.Response:
    return await _node_script(_settings(request), _mac_or_400(request.match_info["mac"]),
                              request)


@dataclass(frozen=True)
class ScriptHit:
    node: NodeProfile
    image: BootImage
    text: str


def cached_script(settings: BootSettings, mac: str, client: IPv4Address | None,
                  ) -> ScriptHit | None:
    """A node's iPXE script if this snapshot has rendered it from what it would be made
    of now: every request's first try, and all the fast lane (bootd/http/fastlane.py)
    answers. A managed version's files never change (imagestore rule 1): no stat; an
    image declared by paths is looked at every LOOK_AGAIN at most (a replaced file is a
    new key: the time it takes to be seen is no wider a window than a script fetched
    just before the replace already has). None
    when the full path must decide: an unknown node, a missing file, a rootfs not hashed
    yet, a first request."""
    node = settings.directory.resolve(mac)
    if node is None:
        return None
    image = settings.images.resolve(node.image, node.pool)
    if image is None:
        return None
    files = image.files
    rootfs_sha = image.digests.get("rootfs") if files.rootfs is not None else None
    if image.version is None:
        now = time.monotonic()
        if settings.recent_version(files.kernel, now) is None \
                or settings.recent_version(files.initrd, now) is None:
            return None
        if files.rootfs is not None:
            found = settings.recent_version(files.rootfs, now)
            rootfs_sha = settings.hashes.cached(found) if found is not None else None
            if rootfs_sha is None:
                return None
    url = settings.url_for(client)
    text = settings.scripts.get(
        (node.name, mac, image.ref, url, rootfs_sha, settings.peers(mac, image.ref)))
    return ScriptHit(node, image, text) if text is not None else None


def script_served(recorder: Recorder | None, remote: str | None, hit: ScriptHit,
                  mac: str) -> None:
    """What serving a node's script leaves behind: a log line and a boot event."""
    log.info("http ipxe-script", **_node_fields(hit.node, mac), client=remote)
    record_event(recorder, remote, events.IPXE_SCRIPT, hit.node, mac, image=hit.image.ref)


async def _node_script(settings: BootSettings, mac: str, request: web.Request,
                       ) -> web.Response:
    client = _client_ip(request)
    hit = cached_script(settings, mac, client)
    if hit is not None:
        script_served(request.app[RECORDER], request.remote, hit, mac)
        return web.Response(text=hit.text, content_type="text/plain")
    url = settings.url_for(client)

    def give_up(what: str) -> web.Response:
        _event(request, events.REFUSED if node is None else events.IPXE_SCRIPT, node, mac,
               "refused" if node is None else "error", reason=what)
        try:
            attempt = max(1, int(request.query.get("attempt", "1")))
        except ValueError:
            attempt = 1
        text = ipxe_give_up(what, f"{url}/nodes/{mac_dashed(mac)}/boot.ipxe",
                            attempt, settings.ipxe_attempts, settings.ipxe_retry_interval)
        return web.Response(text=text, content_type="text/plain")

    node = settings.directory.resolve(mac)
    if node is None:
        log.warning("http ipxe-script unknown-mac", mac=mac, client=request.remote)
        return give_up(f"{mac} is not in bootd's inventory and there is no catch-all pool")
    image = settings.images.resolve(node.image, node.pool)
    if image is None:
        log.warning("http ipxe-script no-image", **_node_fields(node, mac), image=node.image)
        return give_up(f"no image is configured for {node.name}" if node.image is None
                       else f"image {node.image} of {node.name} is not on the server")
    files = image.files
    if image.remote:
        # cluster mode: this member has not fetched the version yet; the script's
        # fallbacks (the members holding it) serve it
        if not settings.peers(mac, image.ref):
            log.error("http ipxe-script image-nowhere", **_node_fields(node, mac),
                      image=image.ref)
            return give_up(f"image {image.ref} for {node.name} is on no live member yet")
    else:
        missing = [str(p) for p in (files.kernel, files.initrd) if version_of(p) is None]
        if missing:
            log.error("http ipxe-script image-missing", **_node_fields(node, mac),
                      missing=missing)
            return give_up(f"image {image.ref} for {node.name} is missing on the server: "
                           + ", ".join(missing))
    # a managed version's digests are in its record: nothing to hash
    rootfs_sha = image.digests.get("rootfs") if files.rootfs is not None else None
    if rootfs_sha is None and files.rootfs is not None \
            and (version := version_of(files.rootfs)) is not None:
        rootfs_sha = await settings.hashes.sha256(version)
    hit = ScriptHit(node, image, settings.node_script(node, mac, image, url, rootfs_sha))
    script_served(request.app[RECORDER], request.remote, hit, mac)
    return web.Response(text=hit.text, content_type="text/plain")


@routes.get("/nodes/{mac}/grub.cfg")
async def grub_config(request: web.Request) -> web.Response:
    mac = _mac_or_400(request.match_info["mac"])
    text = _settings(request).grub.for_mac(mac, _client_ip(request))
    return web.Response(text=text, content_type="text/plain")


@routes.get("/nodes/{mac}/beacon")
async def beacon(request: web.Request) -> web.Response:
    mac = _mac_or_400(request.match_info["mac"])
    node = _settings(request).directory.resolve(mac)
    log.info("http kernel-handoff", **_node_fields(node, mac), client=request.remote)
    _event(request, events.KERNEL_HANDOFF, node, mac)
    return web.Response(text="bootd: kernel handed control\n", content_type="text/plain")


# ---------------------------------------------------------------------------- files


def _image_version(settings: BootSettings, name: str, version: str | None,
                   part: str) -> FileVersion:
    """The file behind an image URL (`version` None: an unmanaged image), or 404 saying
    what is wrong."""
    files = settings.images.files(name, version)
    path = image_path(files, part) if files is not None and part in PARTS else None
    what = name if version is None else f"{name}/{version}"
    if path is None:
        raise web.HTTPNotFound(text=f"no image file {what}/{part}\n")
    found = version_of(path)
    if found is None:
        log.error("http image file missing", image=what, part=part, path=str(path))
        raise web.HTTPNotFound(text=f"{what}/{part} is configured but {path} is missing\n")
    return found


async def _sha256_response(request: web.Request, version: str | None) -> web.Response:
    settings = _settings(request)
    name, part = request.match_info["image"], request.match_info["part"]
    found = _image_version(settings, name, version, part)
    digest = _recorded_digest(settings, name, version, part)
    if digest is None:
        digest = await settings.hashes.sha256(found)
    return web.Response(text=f"{digest}  {part}\n", content_type="text/plain")


def _recorded_digest(settings: BootSettings, name: str, version: str | None,
                     part: str) -> str | None:
    """A managed version's sha256 per part, from its record: checked when it entered the
    store and never changed since (imagestore rule 1), so never hashed again."""
    return settings.images.digests.get((name, version), {}).get(part) if version else None


def _file_response(request: web.Request, version: str | None) -> web.StreamResponse:
    settings = _settings(request)
    name, part = request.match_info["image"], request.match_info["part"]
    found = _image_version(settings, name, version, part)
    _refuse_empty_suffix(request, lambda: found.size)
    ref = name if version is None else f"{name}@{version}"
    response = _ImageResponse(found.path, settings, ref, part, _honour_if_range(request, found))
    digest = _recorded_digest(settings, name, version, part) or settings.hashes.cached(found)
    if digest is not None:
        response.headers["X-Checksum-Sha256"] = digest
    return response


@routes.get("/images/{image}/{part}.sha256")
async def image_sha256(request: web.Request) -> web.Response:
    return await _sha256_response(request, None)


@routes.get("/images/{image}/{version}/{part}.sha256")
async def version_sha256(request: web.Request) -> web.Response:
    return await _sha256_response(request, request.match_info["version"])


@routes.get("/images/{image}/{part}")  # HEAD too
async def image_file(request: web.Request) -> web.StreamResponse:
    """An unmanaged image's file (declared by path under `images:`)."""
    return _file_response(request, None)


@routes.get("/images/{image}/{version}/{part}")  # HEAD too
async def version_file(request: web.Request) -> web.StreamResponse:
    """One version of a managed image: immutable, so a boot finishes on the version its
    script named whatever is promoted meanwhile."""
    return _file_response(request, request.match_info["version"])


def _refuse_empty_suffix(request: web.Request, size: Callable[[], int]) -> None:
    """`Range: bytes=-0` asks for the last zero bytes: 416 (RFC 9110 14.1.2), where
    aiohttp would send the whole file as a 206. `size` is asked only then."""
    if _EMPTY_SUFFIX.fullmatch(request.headers.get("Range", "")):
        raise web.HTTPRequestRangeNotSatisfiable(
            headers={"Content-Range": f"bytes */{size()}"})


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
    """sendfile with Range/ETag from aiohttp; records the fetch once the body is sent."""

    def __init__(self, path: Path, settings: BootSettings, image: str, part: str,
                 request: web.Request) -> None:
        super().__init__(path, chunk_size=256 * 1024)
        self._settings, self._image, self._part = settings, image, part
        self._effective = request  # the request as we decided to answer it

    async def prepare(self, request: web.BaseRequest) -> AbstractStreamWriter | None:
        started = time.monotonic()
        try:
            return await super().prepare(self._effective)
        finally:
            if request.method == "GET":
                self._record(self._effective, time.monotonic() - started)

    def _record(self, request: web.Request, duration: float) -> None:
        sent = self.content_length or 0
        found = _holder(self._settings, request)
        request.app[METRICS].http_image_bytes.labels(self._part).inc(sent)
        if found is not None:
            _event(request, PART_STAGES[self._part], found.node, found.mac,
                   "ok" if self.status < 400 else "error", image=self._image, bytes=sent,
                   status=self.status, range=request.headers.get("Range"),
                   duration=round(duration, 4))
        log.info(f"http {self._part}", image=self._image, status=self.status, bytes=sent,
                 range=request.headers.get("Range"), client=request.remote,
                 duration_s=round(duration, 4),
                 **(_node_fields(found.node, found.mac) if found else {}))


@routes.get("/boot/{path:.+}")
async def boot_file(request: web.Request) -> web.StreamResponse:
    """Boot-file-tree files over HTTP, for UEFI HTTP boot: same names and rules as TFTP;
    files stream with sendfile, rendered ones from memory."""
    settings = _settings(request)
    client = _client_ip(request) or IPv4Address(0)
    try:
        found = settings.files.locate(request.match_info["path"], client, time.time())
    except NotFound as exc:
        raise web.HTTPNotFound(text=f"{exc}\n") from None
    except Forbidden as exc:
        raise web.HTTPForbidden(text=f"{exc}\n") from None
    if isinstance(found, bytes):
        return web.Response(body=found, content_type="text/plain")
    with contextlib.suppress(OSError):  # vanished since: FileResponse answers 404
        _refuse_empty_suffix(request, lambda: found.stat().st_size)
    return web.FileResponse(found, headers={"Content-Type": "application/octet-stream"})


# ---------------------------------------------------------------------------- secrets


async def _secret_material(request: web.Request, mac: str, what: str,
                           ) -> tuple[NodeProfile, ClusterConfig | None, str | None]:
    """Node, cluster and token for a secret-bearing document: only to a request from the
    node's own address (403 otherwise), and 503 while the cluster has no token yet (or,
    for per-node tokens, none could be minted for this node now)."""
    settings = _settings(request)
    node = settings.directory.resolve(mac)
    client = _client_ip(request)
    own = settings.directory.address_of(node, mac, time.time()) if node else None
    if node is None or client is None or own != client:
        refused = ("unknown MAC" if node is None
                   else f"request from {client}, node address is {own or 'not leased'}")
        request.app[METRICS].http_refusals.labels(what).inc()
        log.warning(f"http {what} refused", mac=mac, client=request.remote, reason=refused)
        _event(request, events.REFUSED, node, mac, "refused", reason=f"{what}: {refused}")
        raise web.HTTPForbidden(text=f"bootd: {what} is served only to its node\n")
    approvals = request.app[APPROVALS]
    if (node.approval_poll is not None and approvals is not None
            and not approvals.is_approved(node.name)):
        approvals.ask(node.name, time.time())
        _event(request, events.AWAITING_APPROVAL, node, mac, via=what)
        raise AwaitingApproval(node, mac, node.approval_poll)
    cluster = settings.clusters.get(node.cluster) if node.cluster else None
    token = None
    if cluster is not None and node.cluster is not None:
        provider = settings.tokens.get(node.cluster)
        recorder = request.app[RECORDER]
        state = recorder.state(node.name) if recorder is not None else None
        try:
            # (no events yet: this request's own event begins attempt 1)
            token = None if provider is None else await provider.token_for(
                node.name, mac, str(client), state.attempts if state else 1,
                catch_all=node.dynamic)
        except TokenRefused as exc:
            log.warning(f"http {what} token refused", **_node_fields(node, mac),
                        reason=str(exc))
            raise web.HTTPServiceUnavailable(
                text=f"bootd: no join token for this node now: {exc}\n",
                headers={"Retry-After": "60"}) from None
        if token is None:
            log.error(f"http {what} no-token", **_node_fields(node, mac))
            raise web.HTTPServiceUnavailable(
                text=f"bootd: no join token for cluster {node.cluster} yet\n")
    log.info(f"http {what}", **_node_fields(node, mac), client=request.remote)
    _event(request, events.JOIN_SCRIPT, node, mac, via=what)
    return node, cluster, token


class AwaitingApproval(Exception):
    """A catch-all node of a `join: approve` pool that an operator has not approved."""

    def __init__(self, node: NodeProfile, mac: str, poll: float) -> None:
        super().__init__(f"{node.name} awaits `bootd approve {node.name}`")
        self.node, self.mac, self.poll = node, mac, poll


@routes.get("/nodes/{mac}/join.sh")
async def join(request: web.Request) -> web.Response:
    mac = _mac_or_400(request.match_info["mac"])
    url = _settings(request).url_for(_client_ip(request))
    try:
        node, cluster, token = await _secret_material(request, mac, "join-script")
    except AwaitingApproval as wait:
        text = join_wait_script(wait.node, mac, url, wait.poll)
    else:
        text = join_script(node, mac, url, cluster, token,
                           _settings(request).peers(mac, _image_ref(request, node)))
    return web.Response(text=text, content_type="text/x-shellscript",
                        headers={"Cache-Control": "no-store"})


@routes.get("/cloud-init/{mac}/{doc}")
async def cloud_init(request: web.Request) -> web.Response:
    """NoCloud datasource: ds=nocloud;s=http://<bootd>/cloud-init/<mac>/"""
    settings = _settings(request)
    mac = _mac_or_400(request.match_info["mac"])
    doc = request.match_info["doc"]
    if doc == "user-data":
        try:
            node, cluster, token = await _secret_material(request, mac,
                                                          "cloud-init-user-data")
        except AwaitingApproval as wait:  # cloud-init asks again on its next boot
            raise web.HTTPServiceUnavailable(text=f"bootd: {wait}\n") from None
        text = cloud_user_data(node, mac, settings.url_for(_client_ip(request)), cluster,
                               token, settings.domain_for(node))
        return web.Response(text=text, content_type="text/cloud-config",
                            headers={"Cache-Control": "no-store"})
    if doc == "vendor-data":
        return web.Response(text=cloud_vendor_data(), content_type="text/cloud-config")
    found = settings.directory.resolve(mac)
    if found is None:
        raise web.HTTPNotFound(text=f"bootd: {mac} is not in the inventory\n")
    if doc == "meta-data":
        return web.Response(text=cloud_meta_data(found, mac), content_type="text/plain")
    if doc == "network-config":
        return web.Response(text=cloud_network_config(found), content_type="text/plain")
    raise web.HTTPNotFound(text=f"bootd: no cloud-init document {doc!r}\n")


# ---------------------------------------------------------------------------- reports


@routes.post("/api/v1/events")
async def node_event(request: web.Request) -> web.Response:
    """A stage a node reports about itself: from its own address only, small, limited."""
    found = _holder(_settings(request), request)
    metrics = request.app[METRICS]
    if found is None:
        metrics.http_refusals.labels("event").inc()
        log.warning("http event refused", client=request.remote, reason="not a node address")
        raise web.HTTPForbidden(text="bootd: events are accepted only from a node's address\n")
    if (request.content_length or 0) > EVENT_MAX_BYTES:
        raise web.HTTPRequestEntityTooLarge(max_size=EVENT_MAX_BYTES,
                                            actual_size=request.content_length or 0)
    if not request.app[EVENT_LIMIT].allow(str(request.remote), time.monotonic()):
        raise web.HTTPTooManyRequests(text="bootd: slow down\n")
    raw = b""
    while len(raw) <= EVENT_MAX_BYTES:  # a body may arrive in several TCP segments
        chunk = await request.content.read(EVENT_MAX_BYTES + 1 - len(raw))
        if not chunk:
            break
        raw += chunk
    if len(raw) > EVENT_MAX_BYTES:
        raise web.HTTPRequestEntityTooLarge(max_size=EVENT_MAX_BYTES, actual_size=len(raw))
    try:
        body = json.loads(raw)
        stage = str(body["stage"])
        message = str(body.get("message", ""))[:500]
        image = str(body.get("image") or "") or None
    except (ValueError, KeyError, TypeError, AttributeError):
        raise web.HTTPBadRequest(
            text='bootd: expected {"stage": ..., "message": ...}\n') from None
    if not _STAGE.fullmatch(stage):
        raise web.HTTPBadRequest(text=f"bootd: bad stage {stage[:40]!r}\n")
    if image is not None and not _IMAGE_REF.fullmatch(image):
        raise web.HTTPBadRequest(text=f"bootd: bad image {image[:80]!r}\n")
    message = _TOKEN_LIKE.sub("<token>", message)  # a node's own report may echo its token
    # a closed set: a node inventing stage names grows no metric and no page colour
    known = stage if stage in events.REPORTED else events.OTHER
    metrics.node_events.labels(known).inc()
    log.info(f"node {known}", **_node_fields(found.node, found.mac), message=message,
             client=request.remote, reported_stage=stage if known != stage else None)
    _event(request, known, found.node, found.mac, "error" if known == events.FAILED else "ok",
           message=message or None, reported=True,
           reported_stage=stage if known != stage else None, image=image)
    if known in events.FINISHED and found.node.cluster is not None:
        provider = _settings(request).tokens.get(found.node.cluster)
        if provider is not None:
            provider.finish(found.node.name, f"the node reported {known}")
    return web.Response(status=204)


# ---------------------------------------------------------------------------- the app


async def keep_fresh(settings: BootSettings) -> None:
    """One snapshot's background work until cancelled: its join tokens refreshed, and its
    image files hashed now rather than on the first boot that needs them."""
    async def hash_one(version: FileVersion) -> None:
        try:
            await settings.hashes.sha256(version)
        except OSError as exc:  # replaced or removed since: hashed when next asked for
            log.warning("image hash failed", path=str(version.path), error=str(exc))

    tasks = [asyncio.create_task(p.run()) for p in settings.tokens.values()]
    tasks += [asyncio.create_task(hash_one(v)) for v in settings.image_versions()]
    try:
        await asyncio.gather(*tasks)
        await asyncio.get_running_loop().create_future()  # hold until cancelled
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


async def _background(app: web.Application) -> AsyncIterator[None]:
    """cleanup_ctx: the current snapshot's background work, moved to each new one."""
    view = app[SETTINGS]

    async def follow() -> None:
        while True:
            current = asyncio.create_task(keep_fresh(view.get()))
            try:
                await view.changed()
            finally:
                current.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await current

    task = asyncio.create_task(follow())
    yield
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task


def boot_app(settings: View[BootSettings], metrics: Metrics,
             recorder: Recorder | None = None, approvals: Approvals | None = None,
             ) -> web.Application:
    app = web.Application(client_max_size=EVENT_MAX_BYTES * 4)
    app[SETTINGS] = settings
    app[METRICS] = metrics
    app[RECORDER] = recorder
    app[APPROVALS] = approvals
    app[EVENT_LIMIT] = TokenBucket(EVENT_RATE, EVENT_BURST, 65536)
    app.add_routes(routes)
    app.cleanup_ctx.append(_background)
    return app

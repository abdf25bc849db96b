"""`bootd serve`: the runtime snapshot wired to its listeners, signals and sd_notify.

Order of start-up: config -> store -> (cluster mode: etcd session) -> runtime (snapshot,
recorder) -> DHCP endpoints -> TFTP -> boot HTTP -> admin API -> READY=1. SIGHUP reloads
(see `bootd.runtime`); SIGTERM/SIGINT drain: every listener stops taking new work, TFTP
transfers and HTTP downloads in flight get `server.drain_timeout`, pending boot events are
flushed; a cluster member then leaves the membership at once, not after member_ttl.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import time
from collections.abc import Callable
from pathlib import Path
from types import MappingProxyType
from typing import Any

import structlog

from bootd.cli.explain import ARCH_CODES, explain
from bootd.dhcp.service import DhcpService
from bootd.dhcp.transport import open_endpoints
from bootd.fleet.config import Config, load_config
from bootd.fleet.images import image_digests
from bootd.fleet.imagestore import ImageStore
from bootd.fleet.imagesync import SharedImages
from bootd.fleet.inventory import NodeProfile
from bootd.http.admin import admin_app
from bootd.http.boot import boot_app
from bootd.http.fastlane import Lane
from bootd.http.page import Explainer
from bootd.http.serve import serve_http
from bootd.ops.metrics import Metrics
from bootd.ops.sdnotify import Notifier
from bootd.power.rollout import NodeSeen
from bootd.power.rollouts import Book, LocalBook, Rollouts, SharedBook
from bootd.runtime import Runtime
from bootd.state import events
from bootd.state.etcd import EtcdCluster
from bootd.state.events import BootEvent
from bootd.state.store import Store
from bootd.tftp.report import TransferReporter
from bootd.tftp.server import start_tftp

log = structlog.get_logger("bootd")

IMAGE_ADVERTISE_INTERVAL = 10.0  # seconds between checks of this member's image files
IMAGE_REFRESH_DELAY = 0.2  # seconds from a change of the cluster's image records to a
# new snapshot: one rebuild for a burst of changed keys


async def serve(config_path: Path) -> int:
    config = load_config(config_path)
    store = Store.in_state_dir(config.server.state_dir)
    try:
        return await _serve(config, config_path, store)
    finally:
        store.close()


def _explain(rt: Runtime, mac: str, arch: str, ipxe: bool) -> str:
    """`bootd explain` on the running snapshot, for the status page: through the relay
    and switch port a port-identified node is known by."""
    snapshot = rt.snapshot
    node = snapshot.directory.resolve(mac)
    port = node.port if node is not None else None
    return explain(snapshot.config, mac, arch, ipxe, port.relay if port else None,
                   port.circuit_id.decode(errors="replace") if port else None,
                   snapshot.boot.images)


async def _join_cluster(config: Config, metrics: Metrics,
                        runtime: list[Runtime]) -> EtcdCluster | None:
    """Cluster mode: a session with etcd, started (and its lease records read, if etcd
    answers within member_ttl) before the first snapshot is built from them."""
    if config.cluster is None:
        return None
    cluster = EtcdCluster(
        config.cluster, metrics,
        lambda: runtime[0].snapshot.directory.leases if runtime else None,
        address=str(config.server.address), http_port=config.server.http_port)
    await cluster.start(wait=config.cluster.member_ttl)
    return cluster


async def _serve(config: Config, config_path: Path, store: Store) -> int:
    metrics = Metrics()
    runtimes: list[Runtime] = []  # filled below: the cluster session asks for its leases
    cluster = await _join_cluster(config, metrics, runtimes)
    try:
        return await _serve_runtime(config, config_path, store, metrics, cluster, runtimes)
    finally:
        if cluster is not None:
            await cluster.close()


async def _serve_runtime(config: Config, config_path: Path, store: Store, metrics: Metrics,
                         cluster: EtcdCluster | None, runtimes: list[Runtime]) -> int:
    images = (SharedImages(cluster, ImageStore(config.server.image_store))
              if cluster is not None else None)
    rt = Runtime(config_path, config, store, metrics,
                 shared=cluster.leases if cluster is not None else None,
                 peers=cluster.peer_urls if cluster is not None else lambda mac, image: (),
                 shared_images=images.catalog if images is not None else None)
    runtimes.append(rt)
    if images is not None:
        images.on_change = _Debounced(rt.refresh_images, IMAGE_REFRESH_DELAY)
        images.on_local_change = rt.refresh_images
    if cluster is not None:
        cluster.attach(rt.recorder)  # one fleet view: timelines shared through etcd
    live = rt.live
    notifier = Notifier()
    server = config.server  # socket-bound settings: fixed until a restart
    drain = server.drain_timeout
    async with contextlib.AsyncExitStack() as stack:
        dhcp = DhcpService(lambda: live.current.dhcp, store, rt.metrics, rt.recorder,
                           cluster)
        dhcp_endpoints = await open_endpoints(server.interfaces, server.dhcp_port, dhcp)
        for endpoint in dhcp_endpoints:
            stack.callback(endpoint.close)
        tftp = await start_tftp(lambda: live.current.tftp, server.tftp_port,
                                single_port=config.tftp.single_port,
                                on_record=TransferReporter(rt.metrics, rt.recorder))
        stack.callback(tftp.close)
        flusher = asyncio.create_task(rt.recorder.run_flusher())
        stack.push_async_callback(_cancel_and_wait, flusher)  # flushes what is pending
        if cluster is not None and images is not None:
            advertiser = asyncio.create_task(_advertise_images(rt, cluster))
            stack.push_async_callback(_cancel_and_wait, advertiser)
            syncer = asyncio.create_task(images.run())
            stack.push_async_callback(_cancel_and_wait, syncer)
        boot_runner = await stack.enter_async_context(serve_http(
            boot_app(live.view(lambda s: s.boot), rt.metrics, rt.recorder, rt.approvals),
            host="0.0.0.0", port=server.http_port, drain=drain, front=Lane))
        rollouts = _rollouts(rt, cluster, images)
        roller = asyncio.create_task(rollouts.run())
        stack.push_async_callback(_cancel_and_wait, roller)
        await stack.enter_async_context(serve_http(
            admin_app(live.view(lambda s: s.admin), rt.metrics, rt.recorder, rt.reload,
                      Explainer(tuple(ARCH_CODES), lambda *a: _explain(rt, *a)),
                      rt.approvals, cluster.status if cluster is not None else None,
                      rollouts, images),
            api=server.api))

        def summary() -> str:
            return (f"serving {len(rt.snapshot.directory.nodes)} nodes on "
                    f"{','.join(server.interfaces)}: dhcp :{server.dhcp_port}, "
                    f"tftp :{server.tftp_port}, http :{server.http_port}")

        log.info("bootd serving", config=str(config_path), interfaces=server.interfaces,
                 address=str(server.address), dhcp_port=server.dhcp_port,
                 tftp_port=server.tftp_port, http_port=server.http_port, api=server.api,
                 tftp_root=str(config.tftp.root), nodes=len(rt.snapshot.directory.nodes))
        notifier.ready(summary())  # every listener is bound by now
        if notifier.watchdog_interval:
            pinger = asyncio.create_task(_watchdog(notifier, notifier.watchdog_interval))
            stack.push_async_callback(_cancel_and_wait, pinger)

        def reload() -> None:
            notifier.reloading()
            result = rt.reload()
            notifier.ready(summary() if result.ok else f"{summary()}; last reload refused")

        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        loop.add_signal_handler(signal.SIGHUP, reload)
        await stop.wait()

        # Drain: stop taking new work everywhere, then let work in flight finish.
        notifier.stopping()
        log.info("bootd draining", timeout=drain, tftp_transfers=len(tftp.active))
        for endpoint in dhcp_endpoints:
            endpoint.close()
        left, _ = await asyncio.gather(tftp.drain(drain), boot_runner.cleanup())
        if left:
            log.warning("tftp transfers cut short by shutdown", count=left)
    log.info("bootd stopped")
    return 0


def _rollouts(rt: Runtime, cluster: EtcdCluster | None,
              images: SharedImages | None) -> Rollouts:
    """Rollouts over the runtime's pools, nodes and boot events, kept in the state
    directory and the image store, or in cluster mode in etcd."""
    server = rt.snapshot.config.server

    def pool_nodes(pool: str) -> list[NodeProfile]:
        return [n for n in rt.snapshot.directory.nodes if n.pool == pool]

    def seen(name: str) -> NodeSeen | None:
        state = rt.recorder.state(name)
        if state is None:
            return None
        error = state.last_error.removeprefix("failed: ") if state.last_error else None
        return NodeSeen(name, state.stage, state.image, state.since, error)

    def record(name: str, at: float, outcome: str, detail: dict[str, Any]) -> None:
        node = rt.snapshot.directory.inventory.named(name)
        rt.recorder.record(BootEvent(
            at, events.POWER, name, node.macs[0] if node and node.macs else None,
            None, node.pool if node else None, outcome,
            MappingProxyType({k: v for k, v in detail.items() if v is not None})))

    book: Book = (SharedBook(cluster, images) if cluster is not None and images is not None
                  else LocalBook(server.state_dir / "rollouts.json",
                                 ImageStore(server.image_store), time.time,
                                 repoint=rt.refresh_images))
    return Rollouts(book, pool_nodes=pool_nodes, seen=seen, record=record)


class _Debounced:
    """Calls `action` once, `delay` after the first of a burst of calls (a rollout's
    transaction changes several records; each is heard)."""

    def __init__(self, action: Callable[[], None], delay: float) -> None:
        self.action, self.delay = action, delay
        self._pending: asyncio.TimerHandle | None = None

    def __call__(self) -> None:
        if self._pending is None:
            self._pending = asyncio.get_running_loop().call_later(self.delay, self._fire)

    def _fire(self) -> None:
        self._pending = None
        try:
            self.action()
        except Exception:  # the running snapshot stays; the next change tries again
            log.exception("cannot rebuild the runtime snapshot for new image pointers")


async def _advertise_images(rt: Runtime, cluster: EtcdCluster) -> None:
    """Cluster mode: tell the other members which image files this member serves, now and
    whenever a reload or a replaced file changes them (hashes are cached per file
    version, so an unchanged image costs a stat per file)."""
    while True:
        try:
            await cluster.advertise_images(await image_digests(rt.snapshot.config.images,
                                                               rt.hashes))
        except OSError as exc:  # an unreadable image: the next round tries again
            log.warning("cluster: cannot hash the image files", error=str(exc))
        await asyncio.sleep(IMAGE_ADVERTISE_INTERVAL)


async def _watchdog(notifier: Notifier, interval: float) -> None:
    while True:
        notifier.watchdog()
        await asyncio.sleep(interval)


async def _cancel_and_wait(task: asyncio.Task[None]) -> None:
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task

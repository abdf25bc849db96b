"""Wiring: config -> inventory -> servers, signals, state. The only place that reads clocks."""

from __future__ import annotations

import asyncio
import contextlib
import signal
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType

import structlog
from aiohttp import web

from bootd.dhcp.bootfile import is_boot_client
from bootd.dhcp.decide import DhcpContext, DhcpSettings, Outcome, Reply, decide
from bootd.dhcp.packet import DhcpError, DhcpPacket, MessageType, decode
from bootd.dhcp.transport import open_endpoints
from bootd.fleet.config import Config, ConfigError, load_config
from bootd.fleet.filetree import FileResolver
from bootd.fleet.grub import GrubConfigs
from bootd.fleet.images import PARTS, ImageHashes, image_path, version_of
from bootd.fleet.inventory import Inventory
from bootd.fleet.render import base_url
from bootd.fleet.tokens import providers
from bootd.http.app import HttpContext, ReloadResult, admin_app, boot_app
from bootd.ops.metrics import Metrics
from bootd.ops.ratelimit import RateLimiter
from bootd.ops.sdnotify import Notifier
from bootd.state import events
from bootd.state.events import BootEvent
from bootd.state.leases import LeaseTable
from bootd.state.recorder import Recorder
from bootd.state.store import Store
from bootd.tftp.protocol import Limits
from bootd.tftp.server import TftpServer, TransferRecord, start_tftp

log = structlog.get_logger("bootd")

UNKNOWN_MAC_LOG_INTERVAL = 60.0
UNKNOWN_MAC_MEMORY = 4096


@dataclass
class DhcpService:
    """decode -> decide -> persist -> reply; logs one line per outcome."""

    ctx: DhcpContext
    store: Store
    metrics: Metrics
    unknown_log: RateLimiter
    recorder: Recorder | None = None

    def handle(self, data: bytes, interface: str) -> Reply | None:
        now = time.time()
        try:
            request = decode(data)
        except DhcpError as exc:
            self.metrics.dhcp_packets.labels("malformed").inc()
            log.debug("dhcp drop malformed", interface=interface, error=str(exc))
            return None
        outcome = decide(request, self.ctx, now)
        if self.ctx.leases is not None:
            changes = self.ctx.leases.drain_changes()
            if changes:
                # Durable before the reply leaves: an ACKed lease survives kill -9.
                self.store.apply_lease_changes(changes)
                self.metrics.dhcp_leases.set(len(self.ctx.leases))
        self.metrics.dhcp_packets.labels(outcome.kind).inc()
        self._log(outcome, request, interface, now)
        if self.recorder is not None:
            self._record(self.recorder, request, outcome, now)
        return outcome.reply

    @staticmethod
    def _record(recorder: Recorder, request: DhcpPacket, outcome: Outcome, now: float) -> None:
        try:
            mac = request.mac
        except DhcpError:
            return
        node = outcome.node
        ip = str(outcome.ip) if outcome.ip is not None else None

        def event(stage: str, result: str = "ok", **detail: object) -> None:
            recorder.record(BootEvent(now, stage, node.name if node else None, mac, ip,
                                      node.pool if node else None, result,
                                      MappingProxyType(detail)))

        if outcome.kind == "unknown-mac":
            event(events.REFUSED, "refused", reason="unknown MAC (DHCP)")
            return
        firmware = outcome.boot.firmware.value if outcome.boot is not None else (
            "unknown" if is_boot_client(request) else "os")
        if request.message_type is MessageType.DISCOVER and node is not None:
            event(events.DHCP_DISCOVER, firmware=firmware, vendor_class=request.vendor_class)
        if outcome.kind == "offer":
            event(events.DHCP_OFFER, firmware=firmware)
        elif outcome.kind == "ack":
            boot = outcome.boot.bootfile if outcome.boot is not None else None
            event(events.DHCP_ACK, firmware=firmware, state=outcome.detail, bootfile=boot)
        elif outcome.kind == "nak":
            event(events.DHCP_NAK, "error", reason=outcome.detail)

    def _log(self, outcome: Outcome, request: DhcpPacket, interface: str, now: float) -> None:
        fields: dict[str, object] = {"interface": interface, "xid": f"{request.xid:08x}"}
        if outcome.node is not None:
            fields.update(node=outcome.node.name, pool=outcome.node.pool)
        with contextlib.suppress(DhcpError):
            fields["mac"] = request.mac
        if outcome.ip is not None:
            fields["ip"] = str(outcome.ip)
        if outcome.boot is not None:
            fields.update(firmware=outcome.boot.firmware.value, bootfile=outcome.boot.bootfile)
        if outcome.detail:
            fields["detail"] = outcome.detail
        if outcome.kind == "unknown-mac":
            if self.unknown_log.allow(outcome.detail.split()[0], now):
                log.warning("dhcp unknown-mac", **fields)
        elif outcome.kind in ("drop", "ignore"):
            log.debug(f"dhcp {outcome.kind}", **fields)
        else:
            log.info(f"dhcp {outcome.kind}", **fields)


def build_leases(inventory: Inventory, store: Store, metrics: Metrics) -> LeaseTable | None:
    """The catch-all range's lease table, restored from the store (None without one)."""
    pool = inventory.catch_all
    if pool is None:
        return None
    leases = LeaseTable(pool.first, pool.last, inventory.reserved_ips)
    kept = leases.restore(store.load_leases())
    metrics.dhcp_leases.set(kept)
    log.info("leases restored", count=kept, range=f"{pool.first}-{pool.last}")
    return leases


def build_dhcp(config: Config, store: Store, metrics: Metrics) -> DhcpService:
    inventory = Inventory(config)
    ctx = DhcpContext(inventory, build_leases(inventory, store, metrics),
                      DhcpSettings.from_config(config))
    return DhcpService(ctx, store, metrics,
                       RateLimiter(UNKNOWN_MAC_LOG_INTERVAL, UNKNOWN_MAC_MEMORY))


def interface_mtu(name: str) -> int | None:
    try:
        return int(Path(f"/sys/class/net/{name}/mtu").read_text())
    except (OSError, ValueError):
        return None


def tftp_limits(config: Config) -> Limits:
    """Block size capped so one DATA packet fits the smallest interface MTU."""
    t = config.tftp
    max_blksize = t.max_blksize
    if max_blksize is None:
        mtus = [m for m in map(interface_mtu, config.server.interfaces) if m]
        max_blksize = max(512, min(mtus, default=1500) - 32)  # IP 20 + UDP 8 + TFTP 4
    return Limits(max_blksize=max_blksize, max_windowsize=t.max_windowsize,
                  initial_timeout=t.timeout, max_timeout=max(8.0, t.timeout),
                  max_retries=t.retries)


@dataclass
class TftpService:
    """Turns finished transfers into log lines and metrics, named by node."""

    ctx: DhcpContext
    metrics: Metrics
    recorder: Recorder | None = None

    def record(self, r: TransferRecord) -> None:
        now = time.time()
        found = self.ctx.node_for_ip(r.client, now)
        if self.recorder is not None and found is not None:
            node, mac = found
            self.recorder.record(BootEvent(
                now, events.TFTP, node.name, mac, str(r.client), node.pool,
                "ok" if r.outcome in ("ok", "unconfirmed") else "error", MappingProxyType({
                    "file": r.filename, "bytes": r.size, "blksize": r.blksize,
                    "windowsize": r.windowsize, "duration": round(r.duration, 4),
                    "result": r.outcome, "reason": r.detail or None})))
        fields: dict[str, object] = {
            "client": f"{r.client}:{r.port}", "file": r.filename, "size": r.size,
            "blksize": r.blksize, "windowsize": r.windowsize,
            "duration_s": round(r.duration, 4), "outcome": r.outcome,
        }
        if found is not None:
            fields.update(node=found[0].name, mac=found[1], pool=found[0].pool)
        if r.retransmits:
            fields["retransmits"] = r.retransmits
        if r.detail:
            fields["detail"] = r.detail
        self.metrics.tftp_transfers.labels(r.outcome).inc()
        self.metrics.tftp_bytes.inc(r.bytes_sent)
        if r.outcome == "ok":
            log.info("tftp transfer", **fields)
        else:
            log.warning("tftp transfer", **fields)


async def serve(config_path: Path) -> int:
    config = load_config(config_path)
    store = Store.in_state_dir(config.server.state_dir)
    try:
        return await _serve(config, config_path, store)
    finally:
        store.close()


# Settings bound to sockets or files at start-up: a reload reports them, a restart applies.
RESTART_ONLY = ("interfaces", "dhcp_port", "tftp_port", "http_port", "api", "state_dir")


class Runtime:
    """The config and everything derived from it, swapped whole by a reload while the
    listeners, the store and transfers in flight stay as they are."""

    def __init__(self, config_path: Path, config: Config, store: Store,
                 metrics: Metrics) -> None:
        self.config_path = config_path
        self.config = config
        self.store = store
        self.metrics = metrics
        self.recorder = Recorder(store, stall_after=config.events.stall_after,
                                 keep_attempts=config.events.keep_attempts, metrics=metrics)
        loaded = self.recorder.load()
        log.info("boot events restored", count=loaded)
        self.dhcp = build_dhcp(config, store, metrics)
        self.dhcp.recorder = self.recorder
        self.grub = GrubConfigs(self.dhcp.ctx, config.images, str(config.server.address),
                                config.server.http_port)
        self.files = FileResolver(config.tftp.root, config.tftp.fallback_dirs, self.grub)
        self.http = HttpContext(config, self.dhcp.ctx, ImageHashes(), providers(config.clusters),
                                self.files, self.grub, metrics,
                                base_url(str(config.server.address), config.server.http_port),
                                reload=self.reload, recorder=self.recorder)
        self.tftp: TftpServer | None = None
        self._tasks: list[asyncio.Task[object]] = []
        self._token_tasks: list[asyncio.Task[None]] = []

    def start_background(self, *, tokens: bool = True) -> None:
        """Token refreshers and image hashing (now, not on the first boot)."""
        if tokens:
            for task in self._token_tasks:
                task.cancel()
            self._token_tasks = [asyncio.create_task(p.run())
                                 for p in self.http.tokens.values()]
        self._tasks = [t for t in self._tasks if not t.done()]
        for image in self.config.images.values():
            for part in PARTS:
                path = image_path(image, part)
                version = version_of(path) if path is not None else None
                if version is not None:
                    self._tasks.append(asyncio.create_task(self.http.hashes.sha256(version)))

    def stop_background(self) -> None:
        for task in [*self._tasks, *self._token_tasks]:
            task.cancel()

    def reload(self) -> ReloadResult:
        """Re-read the config file; a valid one applies to new requests, an invalid one is
        refused with the same errors as `bootd check` and the running config stays."""
        try:
            new = load_config(self.config_path)
        except ConfigError as exc:
            errors = [str(issue) for issue in exc.issues]
            for line in errors:
                log.error("config reload refused", error=line)
            self.metrics.reloads.labels("refused").inc()
            return ReloadResult(False, errors, [])
        old = self.config
        restart = [f"server.{key}" for key in RESTART_ONLY
                   if getattr(new.server, key) != getattr(old.server, key)]
        if new.tftp.single_port != old.tftp.single_port:
            restart.append("tftp.single_port")
        new = new.model_copy(update={
            "server": new.server.model_copy(
                update={key: getattr(old.server, key) for key in RESTART_ONLY}),
            "tftp": new.tftp.model_copy(update={"single_port": old.tftp.single_port}),
        })
        ctx = self.dhcp.ctx
        ctx.inventory = Inventory(new)
        ctx.leases = build_leases(ctx.inventory, self.store, self.metrics)
        ctx.settings = DhcpSettings.from_config(new)
        self.grub.images = new.images
        self.grub.server = str(new.server.address)
        self.files.set_dirs(new.tftp.root, new.tftp.fallback_dirs)
        if self.tftp is not None:
            self.tftp.limits = tftp_limits(new)
            self.tftp.max_transfers = new.tftp.max_transfers
        self.recorder.stall_after = new.events.stall_after
        self.recorder.keep_attempts = new.events.keep_attempts
        self.http.config = new
        self.http.url = base_url(str(new.server.address), new.server.http_port)
        self.config = new
        clusters_changed = new.clusters != old.clusters
        if clusters_changed:
            self.http.tokens = providers(new.clusters)
        self.start_background(tokens=clusters_changed)
        self.metrics.reloads.labels("applied").inc()
        log.info("config reloaded", nodes=len(ctx.inventory.nodes),
                 restart_required=restart or None)
        return ReloadResult(True, [], restart)


async def _serve(config: Config, config_path: Path, store: Store) -> int:
    rt = Runtime(config_path, config, store, Metrics())
    notifier = Notifier()
    drain = config.server.drain_timeout
    async with contextlib.AsyncExitStack() as stack:
        dhcp_transports = [t for t, _ in await open_endpoints(
            config.server.interfaces, config.server.dhcp_port, rt.dhcp.handle)]
        for transport in dhcp_transports:
            stack.callback(transport.close)
        rt.tftp = await start_tftp(
            rt.files, tftp_limits(config), config.server.tftp_port,
            single_port=config.tftp.single_port, max_transfers=config.tftp.max_transfers,
            on_record=TftpService(rt.dhcp.ctx, rt.metrics, rt.recorder).record)
        stack.callback(rt.tftp.close)
        flusher = asyncio.create_task(rt.recorder.run_flusher())
        stack.push_async_callback(_cancel_and_wait, flusher)  # flushes what is pending
        rt.start_background()
        stack.callback(rt.stop_background)
        boot_runner = await stack.enter_async_context(serve_http(
            boot_app(rt.http), host="0.0.0.0", port=config.server.http_port, drain=drain))
        await stack.enter_async_context(serve_http(admin_app(rt.http), api=config.server.api))

        summary = (f"serving {len(rt.dhcp.ctx.inventory.nodes)} nodes on "
                   f"{','.join(config.server.interfaces)}: dhcp :{config.server.dhcp_port}, "
                   f"tftp :{config.server.tftp_port}, http :{config.server.http_port}")
        log.info("bootd serving", config=str(config_path),
                 interfaces=config.server.interfaces, address=str(config.server.address),
                 dhcp_port=config.server.dhcp_port, tftp_port=config.server.tftp_port,
                 http_port=config.server.http_port, api=config.server.api,
                 tftp_root=str(config.tftp.root), nodes=len(rt.dhcp.ctx.inventory.nodes))
        notifier.ready(summary)  # every listener is bound by now
        if notifier.watchdog_interval:
            pinger = asyncio.create_task(_watchdog(notifier, notifier.watchdog_interval))
            stack.push_async_callback(_cancel_and_wait, pinger)

        def reload() -> None:
            notifier.reloading()
            result = rt.reload()
            notifier.ready(summary if result.ok else f"{summary}; last reload refused")

        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        loop.add_signal_handler(signal.SIGHUP, reload)
        await stop.wait()

        # Drain: stop taking new work everywhere, then let work in flight finish.
        notifier.stopping()
        log.info("bootd draining", timeout=drain, tftp_transfers=len(rt.tftp.active))
        for transport in dhcp_transports:
            transport.close()
        left, _ = await asyncio.gather(rt.tftp.drain(drain), boot_runner.cleanup())
        if left:
            log.warning("tftp transfers cut short by shutdown", count=left)
    log.info("bootd stopped")
    return 0


async def _watchdog(notifier: Notifier, interval: float) -> None:
    while True:
        notifier.watchdog()
        await asyncio.sleep(interval)


async def _cancel_and_wait(task: asyncio.Task[None]) -> None:
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task


@contextlib.asynccontextmanager
async def serve_http(app: web.Application, *, host: str | None = None, port: int = 0,
                     api: str | None = None, drain: float = 5.0,
                     ) -> AsyncIterator[web.AppRunner]:
    """Run an aiohttp app on host:port, or on `api` (a unix socket path or loopback
    host:port, never the boot network). On exit it stops listening and gives requests in
    flight up to `drain` seconds."""
    runner = web.AppRunner(app, access_log=None, handle_signals=False,
                           shutdown_timeout=drain)
    await runner.setup()
    try:
        site: web.BaseSite
        if api is not None and api.startswith("/"):
            Path(api).parent.mkdir(parents=True, exist_ok=True)
            with contextlib.suppress(FileNotFoundError):
                Path(api).unlink()  # a stale socket from an earlier run
            site = web.UnixSite(runner, api)
        elif api is not None:
            api_host, _, api_port = api.rpartition(":")
            site = web.TCPSite(runner, api_host.strip("[]"), int(api_port))
        else:
            site = web.TCPSite(runner, host, port, reuse_address=True)
        try:
            await site.start()
        except OSError as exc:
            where = api or f"{host}:{port}"
            raise OSError(exc.errno, f"cannot listen for HTTP on {where}: {exc.strerror}",
                          ) from exc
        yield runner
    finally:
        if runner.server is not None:  # not already drained by the caller
            await runner.cleanup()

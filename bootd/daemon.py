"""Wiring: config -> inventory -> servers, signals, state. The only place that reads clocks."""

from __future__ import annotations

import asyncio
import contextlib
import signal
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import structlog
from aiohttp import web

from bootd.config import Config, load_config
from bootd.dhcp.leases import LeaseTable
from bootd.dhcp.packet import DhcpError, decode
from bootd.dhcp.server import DhcpContext, DhcpSettings, Outcome, Reply, decide
from bootd.dhcp.transport import open_endpoints
from bootd.http.app import HttpContext, admin_app, boot_app
from bootd.images import PARTS, ImageHashes, image_path, version_of
from bootd.inventory import Inventory
from bootd.metrics import Metrics
from bootd.ratelimit import RateLimiter
from bootd.render import base_url
from bootd.store import Store
from bootd.tftp.dynamic import GrubConfigs
from bootd.tftp.files import FileResolver
from bootd.tftp.protocol import Limits
from bootd.tftp.server import TransferRecord, start_tftp
from bootd.tokens import providers

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
        self._log(outcome, request.xid, interface, now)
        return outcome.reply

    def _log(self, outcome: Outcome, xid: int, interface: str, now: float) -> None:
        fields: dict[str, object] = {"interface": interface, "xid": f"{xid:08x}"}
        if outcome.node is not None:
            fields.update(node=outcome.node.name, mac=outcome.node.macs[0],
                          pool=outcome.node.pool)
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


def build_dhcp(config: Config, store: Store, metrics: Metrics) -> DhcpService:
    inventory = Inventory(config)
    leases = None
    if inventory.catch_all is not None:
        pool = inventory.catch_all
        leases = LeaseTable(pool.first, pool.last, inventory.reserved_ips)
        kept = leases.restore(store.load_leases())
        metrics.dhcp_leases.set(kept)
        log.info("leases restored", count=kept, range=f"{pool.first}-{pool.last}")
    ctx = DhcpContext(inventory, leases, DhcpSettings.from_config(config))
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

    def record(self, r: TransferRecord) -> None:
        found = self.ctx.node_for_ip(r.client, time.time())
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


async def _serve(config: Config, config_path: Path, store: Store) -> int:
    metrics = Metrics()
    dhcp = build_dhcp(config, store, metrics)
    grub = GrubConfigs(dhcp.ctx, config.images, str(config.server.address),
                       config.server.http_port)
    files = FileResolver(config.tftp.root, config.tftp.fallback_dirs, grub)
    async with contextlib.AsyncExitStack() as stack:
        for transport, _ in await open_endpoints(config.server.interfaces,
                                                 config.server.dhcp_port, dhcp.handle):
            stack.callback(transport.close)
        tftp = await start_tftp(
            files, tftp_limits(config), config.server.tftp_port,
            single_port=config.tftp.single_port, max_transfers=config.tftp.max_transfers,
            on_record=TftpService(dhcp.ctx, metrics).record)
        stack.callback(tftp.close)

        tokens = providers(config.clusters)
        for provider in tokens.values():
            task = asyncio.create_task(provider.run())
            stack.callback(task.cancel)
        http = HttpContext(config, dhcp.ctx, ImageHashes(), tokens, files, grub, metrics,
                           base_url(str(config.server.address), config.server.http_port))
        for image in config.images.values():  # hash images now, not on the first boot
            for part in PARTS:
                path = image_path(image, part)
                version = version_of(path) if path is not None else None
                if version is not None:
                    hashing = asyncio.create_task(http.hashes.sha256(version))
                    stack.callback(hashing.cancel)
        await stack.enter_async_context(
            serve_http(boot_app(http), host="0.0.0.0", port=config.server.http_port))
        await stack.enter_async_context(serve_http(admin_app(http), api=config.server.api))

        log.info("bootd serving", config=str(config_path),
                 interfaces=config.server.interfaces, address=str(config.server.address),
                 dhcp_port=config.server.dhcp_port, tftp_port=config.server.tftp_port,
                 http_port=config.server.http_port, api=config.server.api,
                 tftp_root=str(config.tftp.root), nodes=len(dhcp.ctx.inventory.nodes))
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        await stop.wait()
    log.info("bootd stopped")
    return 0


@contextlib.asynccontextmanager
async def serve_http(app: web.Application, *, host: str | None = None, port: int = 0,
                     api: str | None = None) -> AsyncIterator[None]:
    """Run an aiohttp app on host:port, or on `api` (a unix socket path or loopback
    host:port, never the boot network)."""
    runner = web.AppRunner(app, access_log=None, handle_signals=False)
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
        yield
    finally:
        await runner.cleanup()

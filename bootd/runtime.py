"""The runtime snapshot: everything derived from one config load, built whole, swapped whole.

Rules:

1. A snapshot is built from a validated `Config` and nothing else it could go stale
   against: the node directory (with the catch-all leases read back from the store), the
   DHCP context, the TFTP settings and file tree, the boot network's and the admin API's
   settings, the events policy.
2. It is frozen. Nothing patches a snapshot; a reload builds a new one off to the side
   and swaps the one `Live` reference that DHCP, TFTP and HTTP read per request.
3. A build that fails changes nothing: the running snapshot stays.
4. Settings bound to sockets at start-up (interfaces, ports, api, state_dir, single-port
   TFTP) keep their running values in every later snapshot and are reported as needing a
   restart when the file changes them.
5. What must outlive a load is passed in, not rebuilt: the image hash cache (a file
   version's hash never changes) and the join-token providers while `clusters:` is
   unchanged (so a reload does not re-run `kubeadm token create`).
6. Work in flight keeps the snapshot it started with (a TFTP transfer its file and
   limits, an HTTP request the settings it read).
"""

from __future__ import annotations

import fcntl
import socket
import struct
from collections.abc import Callable
from dataclasses import dataclass
from ipaddress import IPv4Address
from pathlib import Path

import structlog

from bootd.dhcp.decide import DhcpContext, DhcpSettings
from bootd.fleet.config import Config, ConfigError, load_config
from bootd.fleet.directory import NodeDirectory
from bootd.fleet.filetree import FileTree
from bootd.fleet.grub import GrubConfigs
from bootd.fleet.images import ImageCatalog, ImageHashes
from bootd.fleet.imagestore import ImageStore, SharedCatalog
from bootd.fleet.inventory import Inventory
from bootd.fleet.tokens import TokenProvider, providers
from bootd.http.admin import AdminSettings, ReloadResult
from bootd.http.boot import BootSettings
from bootd.live import Live
from bootd.ops.metrics import Metrics
from bootd.state.approvals import Approvals
from bootd.state.leases import Lease
from bootd.state.recorder import EventPolicy, Recorder
from bootd.state.store import Store
from bootd.tftp.protocol import Limits
from bootd.tftp.server import TftpSettings

log = structlog.get_logger("bootd")

# Settings bound to sockets or files at start-up: a reload reports them, a restart applies.
RESTART_ONLY = ("interfaces", "dhcp_port", "tftp_port", "http_port", "api", "state_dir")
SIOCGIFADDR = 0x8915


@dataclass(frozen=True)
class Snapshot:
    config: Config
    directory: NodeDirectory
    dhcp: DhcpContext
    tftp: TftpSettings
    boot: BootSettings
    admin: AdminSettings
    events: EventPolicy


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
                  max_retries=t.retries, unconfirmed_retries=t.unconfirmed_retries)


def interface_address(name: str) -> IPv4Address | None:
    """An interface's (primary) IPv4 address: it tells which network requests arriving
    on it without a relay belong to."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        try:
            raw = fcntl.ioctl(sock.fileno(), SIOCGIFADDR,
                              struct.pack("256s", name.encode()[:15]))
        except OSError:
            return None  # no such interface, or no IPv4 address on it (yet)
    return IPv4Address(raw[20:24])


def build_directory(inventory: Inventory, store: Store,
                    shared: Callable[[], list[Lease]] | None = None,
                    images: ImageCatalog | None = None) -> NodeDirectory:
    """The node directory, with leases and learned MACs read back from the store; in
    cluster mode (`shared`) the leases are the shared store's."""
    leases = shared() if shared is not None else store.load_leases()
    directory = NodeDirectory.build(inventory, leases, store.load_learned(),
                                    shared=shared is not None, images=images)
    if directory.leases is not None:
        log.info("leases restored", count=len(directory.leases),
                 ranges=[str(r) for r in inventory.catch_all.ranges]
                 if inventory.catch_all else [])
    return directory


def build_snapshot(config: Config, store: Store, *, hashes: ImageHashes,
                   tokens: dict[str, TokenProvider] | None = None,
                   shared: Callable[[], list[Lease]] | None = None,
                   peers: Callable[[str, str | None], tuple[str, ...]] = lambda mac, image: (),
                   shared_images: Callable[[], SharedCatalog] | None = None,
                   ) -> Snapshot:
    """`tokens`: providers to keep (the running ones, when `clusters:` did not change);
    `shared`: cluster mode's lease records; `peers`: the other members' URLs for a MAC;
    `shared_images`: cluster mode's image pointers and version records."""
    inventory = Inventory(config)
    server = config.server
    images = ImageStore(server.image_store).catalog(
        config.images, shared_images() if shared_images is not None else None)
    directory = build_directory(inventory, store, shared, images)
    grub = GrubConfigs(directory, images, server.http_port)
    addresses = {name: a for name in server.interfaces
                 if (a := interface_address(name)) is not None}
    files = FileTree(config.tftp.root, config.tftp.fallback_dirs, grub)
    tokens = tokens if tokens is not None else providers(config.clusters)
    return Snapshot(
        config=config,
        directory=directory,
        dhcp=DhcpContext(directory, DhcpSettings.from_config(config, addresses)),
        tftp=TftpSettings(files, tftp_limits(config), config.tftp.max_transfers,
                          config.tftp.max_transfers_per_client, directory),
        boot=BootSettings(
            directory=directory, http_port=server.http_port, images=images,
            clusters=config.clusters, tokens=tokens, hashes=hashes, files=files, grub=grub,
            ipxe_attempts=config.ipxe.attempts,
            ipxe_retry_interval=int(config.ipxe.retry_interval), peers=peers),
        admin=AdminSettings(directory, tokens),
        events=EventPolicy(config.events.stall_after, config.events.keep_attempts),
    )


class Runtime:
    """The live snapshot and what a reload needs to build the next one; plus the state
    that outlives every snapshot (store, recorder, metrics)."""

    def __init__(self, config_path: Path, config: Config, store: Store,
                 metrics: Metrics, shared: Callable[[], list[Lease]] | None = None,
                 peers: Callable[[str, str | None], tuple[str, ...]] = lambda mac, image: (),
                 shared_images: Callable[[], SharedCatalog] | None = None) -> None:
        self.config_path = config_path
        self.store = store
        self.metrics = metrics
        self.shared, self.peers, self.shared_images = shared, peers, shared_images
        self.hashes = ImageHashes()
        self.live = Live(build_snapshot(config, store, hashes=self.hashes, shared=shared,
                                        peers=peers, shared_images=shared_images))
        self._count_leases(self.live.current)
        self.recorder = Recorder(store, lambda: self.live.current.events, metrics=metrics)
        self.approvals = Approvals(store)
        log.info("boot events restored", count=self.recorder.load(
            node.name for node in self.snapshot.directory.nodes))

    @property
    def snapshot(self) -> Snapshot:
        return self.live.current

    def reload(self) -> ReloadResult:
        """Re-read the config file; a valid one applies to new requests, an invalid one is
        refused with the same errors as `bootd check` and the running snapshot stays."""
        try:
            new = load_config(self.config_path)
        except ConfigError as exc:
            return self._refuse([str(issue) for issue in exc.issues])
        old = self.snapshot.config
        restart = [f"server.{key}" for key in RESTART_ONLY
                   if getattr(new.server, key) != getattr(old.server, key)]
        if new.tftp.single_port != old.tftp.single_port:
            restart.append("tftp.single_port")
        if new.cluster != old.cluster:
            restart.append("cluster")
        new = new.model_copy(update={
            "server": new.server.model_copy(
                update={key: getattr(old.server, key) for key in RESTART_ONLY}),
            "tftp": new.tftp.model_copy(update={"single_port": old.tftp.single_port}),
            "cluster": old.cluster,
        })
        kept = dict(self.snapshot.boot.tokens) if new.clusters == old.clusters else None
        try:
            snapshot = build_snapshot(new, self.store, hashes=self.hashes, tokens=kept,
                                      shared=self.shared, peers=self.peers,
                                      shared_images=self.shared_images)
        except Exception as exc:  # e.g. the store cannot be read: keep what runs
            return self._refuse([f"cannot build the new runtime: {exc}"])
        self.live.swap(snapshot)
        self._count_leases(snapshot)
        self.metrics.reloads.labels("applied").inc()
        log.info("config reloaded", nodes=len(snapshot.directory.nodes),
                 restart_required=restart or None)
        return ReloadResult(True, [], restart)

    def refresh_images(self) -> None:
        """The image pointers or versions changed (a rollout, a promote, in cluster mode
        a version fetched): the same config, a new snapshot, so that new boots get the
        version now pointed at."""
        snapshot = build_snapshot(self.snapshot.config, self.store, hashes=self.hashes,
                                  tokens=dict(self.snapshot.boot.tokens), shared=self.shared,
                                  peers=self.peers, shared_images=self.shared_images)
        self.live.swap(snapshot)
        log.info("image pointers reloaded")

    def _refuse(self, errors: list[str]) -> ReloadResult:
        for line in errors:
            log.error("config reload refused", error=line)
        self.metrics.reloads.labels("refused").inc()
        return ReloadResult(False, errors, [])

    def _count_leases(self, snapshot: Snapshot) -> None:
        leases = snapshot.directory.leases
        self.metrics.dhcp_leases.set(len(leases) if leases is not None else 0)

"""MAC -> resolved node profile: the one question DHCP, TFTP and HTTP ask about a node.

Like pixiecore's Booter, this is the single seam between the protocol servers and the
policy in the config. Profiles are merged once at load (defaults < pool < pool tags <
node < node tags); a lookup is a dict access.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from ipaddress import IPv4Address
from types import MappingProxyType
from typing import TypeVar

from bootd.fleet.config import (
    BootConfig,
    Config,
    NamedNetworkConfig,
    PowerConfig,
    ProfileConfig,
    dhcp_option_bytes,
    range_bounds,
)

DYNAMIC_CACHE_SIZE = 65536  # catch-all profiles kept, oldest dropped first

K = TypeVar("K")
V = TypeVar("V")


@dataclass(frozen=True)
class BootFiles:
    """Boot program per firmware family, after merging every layer."""

    bios: str = "undionly.kpxe"
    efi32: str = "snponly-i386.efi"
    efi64: str = "snponly.efi"
    arm64: str = "snponly-arm64.efi"
    ipxe_script: str | None = None


@dataclass(frozen=True)
class PortId:
    """A switch port as a relay names it in option 82: the relay's address (giaddr),
    circuit-id and remote-id (RFC 3046 sub-options 1 and 2)."""

    relay: IPv4Address
    circuit_id: bytes
    remote_id: bytes | None = None  # in a node's identity: None matches any


@dataclass(frozen=True)
class NodeProfile:
    """Everything bootd needs to boot one node, with no reference back to the config."""

    name: str
    macs: tuple[str, ...]  # empty for a node known only by its switch port
    ip: IPv4Address | None  # None: a catch-all node, address comes from the lease
    pool: str
    network: str | None = None  # a reserved node's network; catch-all: by lease
    port: PortId | None = None
    tags: tuple[str, ...] = ()  # in merge order
    dynamic: bool = False
    approval_poll: float | None = None  # a catch-all node that joins once approved
    image: str | None = None
    cluster: str | None = None
    timezone: str | None = None
    ssh_authorized_keys: tuple[str, ...] = ()
    kernel_modules: tuple[str, ...] = ()
    kernel_args: tuple[str, ...] = ()
    labels: Mapping[str, str] = field(default_factory=lambda: MappingProxyType({}))
    taints: tuple[str, ...] = ()
    dhcp_options: tuple[tuple[int, bytes], ...] = ()
    scripts: tuple[tuple[str, str], ...] = ()
    boot: BootFiles = BootFiles()
    power: PowerConfig | None = None  # its BMC, host/url not yet templated


def _append_unique(old: tuple[str, ...], new: Iterable[str]) -> tuple[str, ...]:
    out = list(old)
    for item in new:
        if item not in out:
            out.append(item)
    return tuple(out)


def _merge_by_key(old: Iterable[tuple[K, V]], new: Iterable[tuple[K, V]],
                  ) -> tuple[tuple[K, V], ...]:
    merged: dict[K, V] = dict(old)
    for key, value in new:
        merged.pop(key, None)  # a later layer moves the key to its own position
        merged[key] = value
    return tuple(merged.items())


def _merge_boot(old: BootFiles, new: BootConfig) -> BootFiles:
    changes = {k: v for k, v in new.model_dump().items() if v is not None}
    return replace(old, **changes) if changes else old


def merge_layer(base: NodeProfile, layer: ProfileConfig) -> NodeProfile:
    """Apply one config layer: scalars override, lists append, mappings update."""
    return replace(
        base,
        image=layer.image if layer.image is not None else base.image,
        cluster=layer.cluster if layer.cluster is not None else base.cluster,
        timezone=layer.timezone if layer.timezone is not None else base.timezone,
        ssh_authorized_keys=_append_unique(base.ssh_authorized_keys, layer.ssh_authorized_keys),
        kernel_modules=_append_unique(base.kernel_modules, layer.kernel_modules),
        kernel_args=base.kernel_args + tuple(layer.kernel_args),
        labels=MappingProxyType({**base.labels, **layer.labels}),
        taints=_append_unique(base.taints, layer.taints),
        dhcp_options=_merge_by_key(base.dhcp_options, dhcp_option_bytes(layer.dhcp_options)),
        scripts=_merge_by_key(base.scripts, layer.scripts.items()),
        boot=_merge_boot(base.boot, layer.boot),
        power=layer.power if layer.power is not None else base.power,
    )


@dataclass(frozen=True)
class AddressRange:
    network: str
    first: IPv4Address
    last: IPv4Address

    def __contains__(self, ip: object) -> bool:
        return isinstance(ip, IPv4Address) and self.first <= ip <= self.last

    @property
    def size(self) -> int:
        return int(self.last) - int(self.first) + 1

    def __str__(self) -> str:
        return f"{self.first}-{self.last}"


@dataclass(frozen=True)
class DynamicPool:
    name: str
    ranges: tuple[AddressRange, ...]  # in config order; each inside one network
    name_template: str
    base: NodeProfile

    def __contains__(self, ip: object) -> bool:
        return any(ip in r for r in self.ranges)

    @property
    def size(self) -> int:
        return sum(r.size for r in self.ranges)


class Inventory:
    """Resolved node profiles keyed by every MAC they own, plus the catch-all pool."""

    def __init__(self, config: Config) -> None:
        by_mac: dict[str, NodeProfile] = {}
        by_port: dict[tuple[IPv4Address, bytes], list[NodeProfile]] = {}
        nodes: list[NodeProfile] = []
        self.networks: tuple[NamedNetworkConfig, ...] = tuple(config.all_networks())
        self.server = config.server.address
        self.catch_all: DynamicPool | None = None
        root = merge_layer(NodeProfile(name="", macs=(), ip=None, pool=""), config.defaults)
        for pool in config.pools:
            pool_prof = merge_layer(replace(root, pool=pool.name, tags=tuple(pool.tags)), pool)
            for tag in pool.tags:
                pool_prof = merge_layer(pool_prof, config.tags[tag])
            for node in pool.nodes:
                prof = merge_layer(pool_prof, node)
                for tag in node.tags:
                    prof = merge_layer(prof, config.tags[tag])
                port = None
                if node.port is not None:
                    remote = node.port.remote_id
                    port = PortId(node.port.relay, node.port.circuit_id.encode(),
                                  remote.encode() if remote is not None else None)
                prof = replace(prof, name=node.name, macs=tuple(node.mac), ip=node.ip,
                               tags=_append_unique(pool_prof.tags, node.tags),
                               network=self.network_name(node.ip), port=port)
                nodes.append(prof)
                for mac in node.mac:
                    by_mac[mac] = prof
                if port is not None:
                    by_port.setdefault((port.relay, port.circuit_id), []).append(prof)
            if pool.dynamic is not None and self.catch_all is None:
                ranges = []
                for text in pool.dynamic.all_ranges():
                    first, last = range_bounds(text)
                    ranges.append(AddressRange(self.network_name(first) or "", first, last))
                poll = pool.dynamic.approval_poll if pool.dynamic.join == "approve" else None
                self.catch_all = DynamicPool(pool.name, tuple(ranges), pool.dynamic.name,
                                             replace(pool_prof, dynamic=True,
                                                     approval_poll=poll))
        self._by_mac = by_mac
        self._by_port = by_port
        self.nodes: tuple[NodeProfile, ...] = tuple(nodes)
        self.reserved_ips: frozenset[IPv4Address] = frozenset(
            n.ip for n in nodes if n.ip is not None)
        self._by_ip = {n.ip: n for n in nodes}
        self._by_name = {n.name: n for n in nodes}
        self._dynamic_cache: dict[str, NodeProfile] = {}

    def reserved_macs(self) -> Iterable[str]:
        """Every configured MAC (canonical form)."""
        return self._by_mac.keys()

    def reserved(self, mac: str) -> NodeProfile | None:
        """The configured node owning this (canonical) MAC, if any."""
        return self._by_mac.get(mac)

    def resolve(self, mac: str) -> NodeProfile | None:
        """The profile for a MAC: its reservation, else a catch-all node, else None."""
        node = self._by_mac.get(mac)
        if node is not None:
            return node
        pool = self.catch_all
        if pool is None:
            return None
        node = self._dynamic_cache.get(mac)
        if node is None:
            # The template was validated at load; a canonical MAC only adds hex and dashes.
            dashed = mac.replace(":", "-")
            name = pool.name_template.format(mac=dashed, mac_hex=dashed.replace("-", ""))
            node = replace(pool.base, name=name, macs=(mac,))
            if len(self._dynamic_cache) >= DYNAMIC_CACHE_SIZE:
                self._dynamic_cache.pop(next(iter(self._dynamic_cache)))
            self._dynamic_cache[mac] = node
        return node

    def by_ip(self, ip: IPv4Address) -> NodeProfile | None:
        return self._by_ip.get(ip)

    def named(self, name: str) -> NodeProfile | None:
        return self._by_name.get(name)

    def by_port(self, port: PortId) -> NodeProfile | None:
        """The node cabled to this switch port (a node naming no remote-id matches any)."""
        candidates = self._by_port.get((port.relay, port.circuit_id), ())
        exact = [n for n in candidates if n.port is not None
                 and n.port.remote_id is not None and n.port.remote_id == port.remote_id]
        wildcard = [n for n in candidates if n.port is not None and n.port.remote_id is None]
        return next(iter(exact or wildcard), None)

    def network_of(self, ip: IPv4Address) -> NamedNetworkConfig | None:
        for net in self.networks:
            if ip in net.subnet:
                return net
        return None

    def next_server_for(self, client: IPv4Address | None) -> IPv4Address:
        """bootd's address as a client's network reaches it (for URLs and GRUB)."""
        net = self.network_of(client) if client is not None else None
        if net is None or net.next_server is None:
            return self.server
        return net.next_server

    def network_name(self, ip: IPv4Address | str | None) -> str | None:
        """The name of the network holding an address (given as text too), if any."""
        try:
            address = IPv4Address(ip) if ip is not None else None
        except ValueError:
            return None
        net = self.network_of(address) if address is not None else None
        return net.name if net is not None else None

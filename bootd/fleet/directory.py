"""The node directory: which node a MAC, an address or a request belongs to.

It is the one seam between the protocol front ends and the fleet (as pixiecore's Booter
is): DHCP, TFTP and HTTP ask it and never read the config or each other. It joins the
two places a node's identity lives:

- the inventory, resolved from the config once per load (reserved MACs and addresses,
  the catch-all pool that names unknown MACs), and
- the catch-all range's lease table, the only part that changes between loads.

Rules:
- A reserved node's address is its reservation, whatever any lease says.
- A catch-all node holds an address only through an active lease on its MAC.
- By address, a reservation wins over a lease; an expired or released lease names nobody.
- A node identified by its switch port (option 82) is that node whatever MAC boots
  there; the MAC it was last seen with is learned, so TFTP and HTTP (which see no
  option 82) find it by MAC and address like any other node.
- Lookup order for a DHCP request: switch port, then reserved MAC, then a learned MAC,
  then the catch-all pool.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from ipaddress import IPv4Address

from bootd.fleet.images import ImageCatalog
from bootd.fleet.inventory import Inventory, NodeProfile, PortId
from bootd.state.leases import Lease, RangeLeases

_NOTHING_LEARNED: list[tuple[str, str]] = []  # shared and never mutated


@dataclass(frozen=True)
class Holder:
    """Who holds an address: the node, and the MAC it holds it through."""

    node: NodeProfile
    mac: str


@dataclass(frozen=True)
class NodeDirectory:
    inventory: Inventory
    leases: RangeLeases | None  # None: no catch-all pool, so no dynamic addresses
    # port-identified node name -> the MAC it was last seen with (mutated by `learn`)
    learned: dict[str, str] = field(default_factory=dict)
    _learned_by_mac: dict[str, str] = field(default_factory=dict)
    _learned_new: list[tuple[str, str]] = field(default_factory=list)
    # what each node boots now (pointers and pins resolved): for drift in `bootd status`
    images: ImageCatalog = field(default_factory=lambda: ImageCatalog.of({}))
    # configured MACs as the 6 bytes of chaddr: the flood path's first, cheapest test
    _reserved_raw: frozenset[bytes] = field(default=frozenset(), init=False)

    def __post_init__(self) -> None:
        self._learned_by_mac.update({mac: name for name, mac in self.learned.items()})
        object.__setattr__(self, "_reserved_raw", frozenset(
            bytes.fromhex(mac.replace(":", "")) for mac in self.inventory.reserved_macs()))

    @classmethod
    def build(cls, inventory: Inventory, stored: Iterable[Lease] = (),
              learned: Iterable[tuple[str, str]] = (), *, shared: bool = False,
              images: ImageCatalog | None = None) -> NodeDirectory:
        """A directory with the catch-all ranges' tables, filled from stored leases and
        learned MACs (those of nodes no longer in the config are dropped). `shared`:
        the leases live in a store other members write too (cluster mode), so offers
        are claims and are queued for it like binds."""
        pool = inventory.catch_all
        leases = None
        if pool is not None:
            leases = RangeLeases(((r.network, r.first, r.last) for r in pool.ranges),
                                 inventory.reserved_ips, durable_offers=shared)
            leases.restore(stored)
        ported = {n.name for n in inventory.nodes if n.port is not None}
        return cls(inventory, leases, {name: mac for name, mac in learned if name in ported},
                   images=images if images is not None else ImageCatalog.of({}))

    def desired_image(self, name: str | None, mac: str | None) -> str | None:
        """The image (NAME@VERSION, or NAME if unmanaged) the node would boot now."""
        node = self.inventory.named(name) if name else None
        if node is None and mac:
            node = self.resolve(mac)
        return self.images.desired_ref(node.image, node.pool) if node is not None else None

    def is_known_raw(self, chaddr: bytes) -> bool:
        """Is this 6-byte hardware address a configured MAC, one learned for a
        port-identified node, or one holding a bound lease? Asked of every datagram of a
        flood: ~1.5 us (3.5 with string lookups first), which is what lets the transport
        read as fast as the flood arrives."""
        if chaddr in self._reserved_raw:
            return True
        mac = chaddr.hex(":")
        if mac in self._learned_by_mac:
            return True
        return self.leases is not None and self.leases.is_bound(mac)

    @property
    def nodes(self) -> tuple[NodeProfile, ...]:
        """The configured (reserved) nodes, in config order."""
        return self.inventory.nodes

    def resolve(self, mac: str, port: PortId | None = None) -> NodeProfile | None:
        """The node for a (canonical) MAC, and the switch port a relay reported it on."""
        if port is not None and (node := self.inventory.by_port(port)) is not None:
            return node
        node = self.inventory.reserved(mac)
        if node is not None:
            return node
        name = self._learned_by_mac.get(mac)
        if name is not None and (found := self.inventory.named(name)) is not None:
            return found
        return self.inventory.resolve(mac)

    def learn(self, node: NodeProfile, mac: str) -> None:
        """Remember the MAC a port-identified node booted with."""
        old = self.learned.get(node.name)
        if node.port is None or old == mac:
            return
        if old is not None:
            self._learned_by_mac.pop(old, None)
        self.learned[node.name] = mac
        self._learned_by_mac[mac] = node.name
        self._learned_new.append((node.name, mac))

    def drain_learned(self) -> list[tuple[str, str]]:
        """MACs learned since the last call, for the store (asked on every packet: the
        common case, nothing new, allocates nothing)."""
        if not self._learned_new:
            return _NOTHING_LEARNED
        new = list(self._learned_new)
        self._learned_new.clear()
        return new

    def mac_of(self, node: NodeProfile) -> str | None:
        """A node's configured MAC, else the one it was last seen with."""
        return node.macs[0] if node.macs else self.learned.get(node.name)

    def address_of(self, node: NodeProfile, mac: str, now: float) -> IPv4Address | None:
        """The address this node holds through `mac`: its reservation or active lease."""
        if node.ip is not None:
            return node.ip
        lease = self.leases.lookup(mac) if self.leases is not None else None
        return lease.ip if lease is not None and lease.active(now) else None

    def holder_of(self, ip: IPv4Address, now: float) -> Holder | None:
        """The node holding `ip` now: by reservation, else by an active lease."""
        node = self.inventory.by_ip(ip)
        if node is not None:
            mac = self.mac_of(node)
            return Holder(node, mac) if mac is not None else None
        if self.leases is not None:
            lease = self.leases.holder(ip)
            if lease is not None and lease.active(now):
                found = self.inventory.resolve(lease.mac)
                if found is not None:
                    return Holder(found, lease.mac)
        return None

    def active_leases(self, now: float) -> list[tuple[Holder, IPv4Address, float]]:
        """Catch-all nodes holding an active lease: (holder, address, expiry)."""
        if self.leases is None:
            return []
        out = []
        for lease in self.leases.leases():
            node = self.inventory.resolve(lease.mac)
            if node is not None and lease.active(now):
                out.append((Holder(node, lease.mac), lease.ip, lease.expires))
        return out

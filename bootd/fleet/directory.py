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
"""

from __future__ import annotations

from dataclasses import dataclass
from ipaddress import IPv4Address

from bootd.fleet.inventory import DynamicPool, Inventory, NodeProfile
from bootd.state.leases import LeaseTable


@dataclass(frozen=True)
class Holder:
    """Who holds an address: the node, and the MAC it holds it through."""

    node: NodeProfile
    mac: str


@dataclass(frozen=True)
class NodeDirectory:
    inventory: Inventory
    leases: LeaseTable | None  # None: no catch-all pool, so no dynamic addresses

    @property
    def nodes(self) -> tuple[NodeProfile, ...]:
        """The configured (reserved) nodes, in config order."""
        return self.inventory.nodes

    @property
    def catch_all(self) -> DynamicPool | None:
        return self.inventory.catch_all

    def resolve(self, mac: str) -> NodeProfile | None:
        """The node for a (canonical) MAC: its reservation, else a catch-all node."""
        return self.inventory.resolve(mac)

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
            return Holder(node, node.macs[0])
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

"""Dynamic-range lease table: which MAC holds which address, until when.

Sans-I/O: the table lives in memory and every durable change is queued; the caller writes
the queue to the store (`drain_changes`) before it sends the reply that depends on it, so a
crash after an ACK never forgets the address it handed out. Offers are held in memory only.

Leases are keyed on the hardware address, not the client identifier: firmware PXE, iPXE
and the booted Linux send different client-ids (or none) from the same NIC, and a boot
server must give all three the same address.
"""

from __future__ import annotations

import heapq
import itertools
from collections.abc import Iterable
from dataclasses import dataclass, replace
from enum import StrEnum
from ipaddress import IPv4Address

# Seconds an offered address stays reserved for the client: PXE firmware REQUESTs
# within its 4 s offer-collection window; a longer hold only lets a flood of DISCOVERs
# from random MACs keep the range exhausted more cheaply (issue 16, finding 2).
OFFER_HOLD = 15.0
DECLINE_QUARANTINE = 600.0  # seconds a declined address is not handed out


class LeaseState(StrEnum):
    OFFERED = "offered"
    BOUND = "bound"
    RELEASED = "released"
    DECLINED = "declined"


@dataclass(frozen=True)
class Lease:
    ip: IPv4Address
    mac: str
    state: LeaseState
    expires: float
    hostname: str | None = None

    def active(self, now: float) -> bool:
        return self.expires > now and self.state is not LeaseState.RELEASED


@dataclass(frozen=True)
class LeaseDeleted:
    ip: IPv4Address


LeaseChange = Lease | LeaseDeleted


class LeaseTable:
    """The dynamic range's addresses and their holders; reservations never enter it."""

    def __init__(self, first: IPv4Address, last: IPv4Address,
                 reserved: Iterable[IPv4Address] = (), *, offer_hold: float = OFFER_HOLD,
                 quarantine: float = DECLINE_QUARANTINE, durable_offers: bool = False,
                 ) -> None:
        self.first, self.last = first, last
        self.reserved = frozenset(reserved)
        self.offer_hold = offer_hold
        self.quarantine = quarantine
        # cluster mode: an offer is a claim in the shared store, so it is queued like a bind
        self.durable_offers = durable_offers
        self._by_ip: dict[IPv4Address, Lease] = {}
        self._by_mac: dict[str, Lease] = {}
        # Every lease set, by (expires, ip): the one that expired longest ago is at the
        # top once stale entries (replaced or deleted leases) are popped. It replaced a
        # scan of the whole range per DISCOVER once no fresh address was left (1.5 ms
        # per packet for 50 addresses under a flood).
        self._expiry: list[tuple[float, int, int, Lease]] = []
        self._seq = itertools.count()
        # never-used addresses are scanned from a cursor that wraps at the end of the
        # range; `_unscanned` counts what is left of one lap (cluster mode starts each
        # member's lap at its own slice: `scan_from`)
        self._cursor = int(first)
        self._unscanned = int(last) - int(first) + 1
        self._changes: list[LeaseChange] = []

    # -- queries

    def __contains__(self, ip: object) -> bool:
        return isinstance(ip, IPv4Address) and self.first <= ip <= self.last

    def __len__(self) -> int:
        return len(self._by_ip)

    def lookup(self, mac: str) -> Lease | None:
        """The client's latest lease (any state but declined), even if it has expired."""
        return self._by_mac.get(mac)

    def holder(self, ip: IPv4Address) -> Lease | None:
        return self._by_ip.get(ip)

    def leases(self) -> list[Lease]:
        return list(self._by_ip.values())

    def is_free_for(self, ip: IPv4Address, mac: str, now: float) -> bool:
        """May `mac` have `ip` now? In range, not reserved, and nobody else holds it."""
        if ip not in self or ip in self.reserved:
            return False
        held = self._by_ip.get(ip)
        if held is None:
            return True
        if held.state is LeaseState.DECLINED:
            return held.expires <= now
        return held.mac == mac or not held.active(now)

    # -- allocation

    def offer(self, mac: str, now: float, requested: IPv4Address | None = None,
              ) -> IPv4Address | None:
        """Pick and hold an address for `mac`; None when the range is exhausted.

        Preference: the client's previous address, the one it asks for if nobody ever
        held it, a never-used address, then the address that expired longest ago.
        """
        prev = self._by_mac.get(mac)
        if prev is not None and self.is_free_for(prev.ip, mac, now):
            if prev.state is LeaseState.BOUND and prev.active(now):
                return prev.ip
            self._hold(prev.ip, mac, now)
            return prev.ip
        if (requested is not None and requested in self and requested not in self.reserved
                and requested not in self._by_ip):
            self._hold(requested, mac, now)
            return requested
        ip = self._fresh() or self._oldest_expired(now, mac)
        if ip is not None:
            self._hold(ip, mac, now)
        return ip

    def _fresh(self) -> IPv4Address | None:
        first, last = int(self.first), int(self.last)
        while self._unscanned > 0:
            value = self._cursor
            self._cursor = value + 1 if value < last else first
            self._unscanned -= 1
            ip = IPv4Address(value)
            if ip not in self._by_ip and ip not in self.reserved:
                return ip
        return None

    def scan_from(self, k: int, n: int) -> None:
        """Start a new lap of the never-used scan k/n of the way into the range (member k
        of n in cluster mode): members then rarely race for the same address."""
        size = int(self.last) - int(self.first) + 1
        self._cursor = int(self.first) + size * k // max(n, 1)
        self._unscanned = size

    def _oldest_expired(self, now: float, mac: str) -> IPv4Address | None:
        """The free address whose lease expired longest ago. A released lease expires
        when released and a declined one when its quarantine ends, so the earliest
        expiry is the only candidate: if it is not free yet, none is."""
        heap = self._expiry
        while heap:
            lease = heap[0][3]
            if self._by_ip.get(lease.ip) is not lease:
                heapq.heappop(heap)  # replaced or deleted since
                continue
            return lease.ip if self.is_free_for(lease.ip, mac, now) else None
        return None

    def _hold(self, ip: IPv4Address, mac: str, now: float) -> None:
        self._set(Lease(ip, mac, LeaseState.OFFERED, now + self.offer_hold),
                  durable=self.durable_offers)

    def bind(self, mac: str, ip: IPv4Address, now: float, lease_time: float,
             hostname: str | None = None) -> Lease:
        """Commit `ip` to `mac` (the caller checked `is_free_for`); queued for the store."""
        prev = self._by_mac.get(mac)
        if prev is not None and prev.ip != ip and self._by_ip.get(prev.ip) is prev:
            del self._by_ip[prev.ip]
            self._changes.append(LeaseDeleted(prev.ip))
        lease = Lease(ip, mac, LeaseState.BOUND, now + lease_time, hostname)
        self._set(lease, durable=True)
        return lease

    def release(self, mac: str, ip: IPv4Address, now: float) -> bool:
        """RELEASE: the address goes back to the pool, but stays the client's first choice."""
        lease = self._by_ip.get(ip)
        if lease is None or lease.mac != mac or lease.state is LeaseState.DECLINED:
            return False
        self._set(replace(lease, state=LeaseState.RELEASED, expires=now), durable=True)
        return True

    def decline(self, mac: str, ip: IPv4Address, now: float) -> bool:
        """DECLINE: someone else answers ARP for this address; quarantine it."""
        lease = self._by_ip.get(ip)
        if lease is None or lease.mac != mac:
            return False
        if self._by_mac.get(mac) is lease:
            del self._by_mac[mac]
        self._set(Lease(ip, mac, LeaseState.DECLINED, now + self.quarantine), durable=True)
        return True

    def forget_offer(self, mac: str) -> None:
        """The client took another server's offer: free what we held for it."""
        lease = self._by_mac.get(mac)
        if lease is not None and lease.state is LeaseState.OFFERED:
            del self._by_mac[mac]
            if self._by_ip.get(lease.ip) is lease:
                del self._by_ip[lease.ip]

    def _set(self, lease: Lease, *, durable: bool) -> None:
        old = self._by_ip.get(lease.ip)
        if old is not None and old.mac != lease.mac and self._by_mac.get(old.mac) is old:
            del self._by_mac[old.mac]
        self._by_ip[lease.ip] = lease
        if lease.state is not LeaseState.DECLINED:
            self._by_mac[lease.mac] = lease
        if len(self._expiry) > 2 * len(self._by_ip) + 64:  # mostly stale: rebuild
            self._expiry = [(held.expires, int(held.ip), next(self._seq), held)
                            for held in self._by_ip.values()]
            heapq.heapify(self._expiry)
        else:
            heapq.heappush(self._expiry,
                           (lease.expires, int(lease.ip), next(self._seq), lease))
        if durable:
            self._changes.append(lease)

    # -- persistence hooks

    def restore(self, leases: Iterable[Lease]) -> int:
        """Load leases read back from the store; returns how many were kept."""
        kept = 0
        for lease in leases:
            if lease.ip not in self or lease.ip in self.reserved:
                continue  # the range or the reservations changed since: drop it
            self._set(lease, durable=False)
            kept += 1
        return kept

    def apply_remote(self, ip: IPv4Address, lease: Lease | None) -> None:
        """Another member's write (or the shared store's current record after a lost
        race): `lease` now holds `ip`, or nobody does. Not queued: it is stored already."""
        if ip not in self or ip in self.reserved:
            return
        if lease is not None:
            self._set(lease, durable=False)
            return
        old = self._by_ip.pop(ip, None)
        if old is not None and self._by_mac.get(old.mac) is old:
            del self._by_mac[old.mac]

    def pending(self) -> int:
        """Changes queued for the store."""
        return len(self._changes)

    def drain_changes(self) -> list[LeaseChange]:
        changes, self._changes = self._changes, []
        return changes

    def requeue(self, changes: list[LeaseChange]) -> None:
        """Changes the store could not take: written first with the next batch."""
        self._changes = changes + self._changes


class RangeLeases:
    """The catch-all pool's lease tables, one per address range, each tagged with the
    network it lies in. A client is offered an address only from its own network's
    ranges; everything else finds the table that holds the address."""

    def __init__(self, ranges: Iterable[tuple[str, IPv4Address, IPv4Address]],
                 reserved: Iterable[IPv4Address] = (), *, durable_offers: bool = False,
                 **table_args: float) -> None:
        held = frozenset(reserved)
        self.tables: tuple[tuple[str, LeaseTable], ...] = tuple(
            (network, LeaseTable(first, last, held, durable_offers=durable_offers,
                                 **table_args))
            for network, first, last in ranges)
        self.slice = (0, 1)
        self._by_network: dict[str, list[LeaseTable]] = {}
        for network, table in self.tables:
            self._by_network.setdefault(network, []).append(table)

    def table_for(self, ip: IPv4Address) -> LeaseTable | None:
        return next((t for _, t in self.tables if ip in t), None)

    def __contains__(self, ip: object) -> bool:
        return isinstance(ip, IPv4Address) and self.table_for(ip) is not None

    def __len__(self) -> int:
        return sum(len(t) for _, t in self.tables)

    def is_bound(self, mac: str) -> bool:
        """Does the client hold a bound lease in any range?"""
        for _, table in self.tables:
            lease = table.lookup(mac)
            if lease is not None and lease.state is LeaseState.BOUND:
                return True
        return False

    def lookup(self, mac: str) -> Lease | None:
        """The client's latest lease in any range (the one that expires last)."""
        found = [lease for _, t in self.tables if (lease := t.lookup(mac)) is not None]
        return max(found, key=lambda lease: lease.expires, default=None)

    def holder(self, ip: IPv4Address) -> Lease | None:
        table = self.table_for(ip)
        return table.holder(ip) if table is not None else None

    def leases(self) -> list[Lease]:
        return [lease for _, t in self.tables for lease in t.leases()]

    def is_free_for(self, ip: IPv4Address, mac: str, now: float) -> bool:
        table = self.table_for(ip)
        return table is not None and table.is_free_for(ip, mac, now)

    def offer(self, mac: str, now: float, requested: IPv4Address | None, network: str,
              ) -> IPv4Address | None:
        """An address from `network`'s ranges, in config order; None when all are full."""
        tables = self._by_network.get(network, ())
        for table in tables:  # the client's previous address first, in any of them
            prev = table.lookup(mac)
            if prev is not None and table.is_free_for(prev.ip, mac, now):
                return table.offer(mac, now, requested)
        for table in tables:
            ip = table.offer(mac, now, requested if requested in table else None)
            if ip is not None:
                return ip
        return None

    def bind(self, mac: str, ip: IPv4Address, now: float, lease_time: float,
             hostname: str | None = None) -> Lease:
        table = self.table_for(ip)
        assert table is not None, f"{ip} is in no range (callers check is_free_for)"
        return table.bind(mac, ip, now, lease_time, hostname)

    def release(self, mac: str, ip: IPv4Address, now: float) -> bool:
        table = self.table_for(ip)
        return table is not None and table.release(mac, ip, now)

    def decline(self, mac: str, ip: IPv4Address, now: float) -> bool:
        table = self.table_for(ip)
        return table is not None and table.decline(mac, ip, now)

    def forget_offer(self, mac: str) -> None:
        for _, table in self.tables:
            table.forget_offer(mac)

    def scan_from(self, k: int, n: int) -> None:
        """Cluster mode: member k of n scans for never-used addresses from its own slice
        (asked once a batch: a new lap starts only when k or n changed)."""
        if (k, n) != self.slice:
            self.slice = (k, n)
            for _, table in self.tables:
                table.scan_from(k, n)

    def apply_remote(self, ip: IPv4Address, lease: Lease | None) -> None:
        table = self.table_for(ip)
        if table is not None:
            table.apply_remote(ip, lease)

    def restore(self, leases: Iterable[Lease]) -> int:
        kept = 0
        for lease in leases:
            table = self.table_for(lease.ip)
            if table is not None:
                kept += table.restore([lease])
        return kept

    def pending(self) -> int:
        return sum(t.pending() for _, t in self.tables)

    def drain_changes(self) -> list[LeaseChange]:
        return [change for _, t in self.tables for change in t.drain_changes()]

    def requeue(self, changes: list[LeaseChange]) -> None:
        for _, table in self.tables:
            mine = [c for c in changes if c.ip in table]
            if mine:
                table.requeue(mine)

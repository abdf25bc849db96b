"""Cluster mode's pure core: which member answers a client, and how a lease is kept in etcd.

Several bootd instances ("members") serve one fleet. They share the catch-all leases and
their membership through etcd (`bootd.state.etcd` moves the bytes); everything here is
pure, so every rule below is unit-tested without an etcd.

Theory of operation
-------------------

1. Every live member holds a key `PREFIX members/NAME` attached to an etcd lease of
   `member_ttl` seconds that it keeps alive. The set of those keys is the membership;
   a member that dies drops out when its lease expires.
2. Each client is owned by exactly one live member: the one for which a hash of
   (member, MAC) is highest (rendezvous hashing). That gives RFC 3074's "one answer per
   client" without RFC 3074's fixed bucket table: when a member leaves, only its own
   clients move, spread over the others; when it returns they move back.
3. A registered member answers the clients it owns, and any client whose `secs` field
   says it has waited `takeover_after` or longer (Kea's max-ack-delay): a client's
   failover need not wait for the owner's etcd lease to expire.
4. A member that is not registered (etcd unreachable, or its lease lost) answers every
   client it is asked by, but allocates nothing: a reserved node's answer needs no shared
   state and is the same from every member, so reserved nodes keep booting with etcd
   down; a dynamic client's answer would need a claim in etcd, and no offer is better
   than a duplicate.
5. A lease lives at `PREFIX leases/IP` as JSON. Every write (offer, bind, release,
   decline, delete) is a compare-and-swap on the key's mod revision as this member last
   saw it (0: absent). Two members can race for one address; exactly one wins, the other
   withholds its reply, learns the winner's record and the client asks again.
6. To make that race rare, each member scans a range for never-used addresses from its
   own slice: member k of n starts k/n of the way in (`fresh_slice`).
7. The fleet view is shared per node: `PREFIX nodes/KEY` holds the node's last
   SHARED_ATTEMPTS boot attempts (at most SHARED_EVENTS events), each event naming the
   member that served it. A member that records an event for a node writes the union of
   what it knows of that node (compare-and-swap again; a loser merges the winner's and
   writes the union next time), and every member merges what the others write. Unknown
   machines without an address (a DISCOVER flood) are not shared.
8. A node's iPXE script and kernel command line name the other live members too, in
   `ranked` order for its MAC, after the member serving it, so a node whose server dies
   mid-boot fetches the rest from the next one (its initramfs and join script try them
   in that order).
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from ipaddress import IPv4Address
from types import MappingProxyType

import orjson

from bootd.state.events import STAGES, BootEvent
from bootd.state.leases import Lease, LeaseState

MEMBERS = "members/"
LEASES = "leases/"
NODES = "nodes/"


def owner(client: str, members: Sequence[str]) -> str | None:
    """The member that owns `client` (rule 2); None when there is no live member."""
    best, best_score = None, b""
    tail = b"\0" + client.encode()
    for member in members:
        score = hashlib.blake2b(member.encode() + tail, digest_size=8).digest()
        if score > best_score:
            best, best_score = member, score
    return best


def ranked(client: str, members: Sequence[str]) -> list[str]:
    """Every member in the order it would own `client`: the owner, then the member that
    owns it once the owner is gone, and so on (the order a node tries servers in)."""
    tail = b"\0" + client.encode()
    return sorted(members, reverse=True, key=lambda m: hashlib.blake2b(
        m.encode() + tail, digest_size=8).digest())


@dataclass(frozen=True)
class Membership:
    """One member's view of the cluster at one moment."""

    me: str
    members: tuple[str, ...]  # live members, sorted; includes `me` when registered
    registered: bool
    takeover_after: float

    def answers(self, mac: str, secs: int) -> bool:
        """Does this member answer this client now (rules 3 and 4)?"""
        if not self.registered:
            return True
        return secs >= self.takeover_after or owner(mac, self.members) == self.me

    def may_allocate(self) -> bool:
        return self.registered

    def fresh_slice(self) -> tuple[int, int]:
        """(k, n): this member is k-th of n live members (rule 6); (0, 1) when alone."""
        if self.me not in self.members:
            return 0, 1
        return self.members.index(self.me), len(self.members)


SHARED_ATTEMPTS = 2
SHARED_EVENTS = 200


def node_key(prefix: str, key: str) -> bytes:
    return f"{prefix}{NODES}{key}".encode()


def node_of(prefix: str, key: bytes) -> str | None:
    text = key.decode(errors="replace")
    start = prefix + NODES
    return text[len(start):] or None if text.startswith(start) else None


def encode_timeline(events: list[BootEvent]) -> bytes:
    return orjson.dumps([e.to_json() for e in events], default=str)


def decode_timeline(value: bytes) -> list[BootEvent]:
    """A node's shared timeline; BadRecord if it is not one."""
    try:
        items = orjson.loads(value)
        if not isinstance(items, list):
            raise BadRecord("not a list")
        out = []
        for item in items:
            detail = item.get("detail")
            detail = {} if detail is None else detail
            if not isinstance(detail, dict):
                raise BadRecord("detail is not an object")
            if item["stage"] not in STAGES:  # stages become labels and page colours
                raise BadRecord(f"unknown stage {item['stage']!r}")
            out.append(BootEvent(float(item["ts"]), str(item["stage"]), _text(item["node"]),
                                 _text(item.get("mac")), _text(item.get("ip")),
                                 _text(item.get("pool")), str(item.get("outcome", "ok")),
                                 MappingProxyType(detail)))
        return out
    except BadRecord:
        raise
    except (ValueError, KeyError, TypeError, AttributeError, orjson.JSONDecodeError) as exc:
        raise BadRecord(f"timeline: {exc}") from exc


def _text(value: object) -> str | None:
    return None if value is None else str(value)


def member_key(prefix: str, member: str) -> bytes:
    return f"{prefix}{MEMBERS}{member}".encode()


def lease_key(prefix: str, ip: IPv4Address) -> bytes:
    return f"{prefix}{LEASES}{ip}".encode()


def encode_lease(lease: Lease, member: str) -> bytes:
    record: dict[str, object] = {"mac": lease.mac, "state": lease.state.value,
                                 "expires": lease.expires, "member": member}
    if lease.hostname is not None:
        record["hostname"] = lease.hostname
    return orjson.dumps(record)


@dataclass(frozen=True)
class StoredLease:
    lease: Lease
    member: str  # who wrote it


class BadRecord(ValueError):
    pass


def decode_lease(prefix: str, key: bytes, value: bytes) -> StoredLease:
    """A lease record read from etcd; BadRecord if it is not one of ours."""
    try:
        text = key.decode()
        if not text.startswith(prefix + LEASES):
            raise BadRecord(f"not a lease key: {text!r}")
        ip = IPv4Address(text[len(prefix) + len(LEASES):])
        record = orjson.loads(value)
        if not isinstance(record, dict):
            raise BadRecord("not an object")
        hostname = record.get("hostname")
        lease = Lease(ip, str(record["mac"]), LeaseState(record["state"]),
                      float(record["expires"]),
                      hostname if isinstance(hostname, str) else None)
        return StoredLease(lease, str(record.get("member", "")))
    except BadRecord:
        raise
    except (ValueError, KeyError, TypeError, UnicodeDecodeError, orjson.JSONDecodeError) as exc:
        raise BadRecord(f"{key!r}: {exc}") from exc


def member_of(prefix: str, key: bytes) -> str | None:
    """The member name in a membership key, or None if the key is not one."""
    text = key.decode(errors="replace")
    start = prefix + MEMBERS
    return text[len(start):] or None if text.startswith(start) else None

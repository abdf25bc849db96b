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
9. Image versions (bootd/fleet/imagesync.py): `images/NAME/versions/V` is a version's
   record (its files' sha256 and sizes, command line, who added it; `pruned` once
   pruned), `images/NAME/pointers` the image's promoted version, rollback history and
   pool pointers, the one truth for what new boots get. Each member keeps its own copy
   of every version not pruned, fetched from a member that holds it and checked against
   the record, and says in its membership key which versions it holds (`sync_plan`).
10. Rollouts (bootd/power/rollouts.py): `rollouts/current` is the rollout, written by
   compare-and-swap by whichever member changes it; `rollouts/runner` names the one
   member that drives it (watches nodes, powers them), under that member's lease, so a
   dead runner's successor takes over once its lease expires.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from ipaddress import IPv4Address
from types import MappingProxyType

import orjson

from bootd.fleet.images import version_id
from bootd.fleet.imagestore import Pointers, VersionInfo
from bootd.state.events import STAGES, BootEvent
from bootd.state.leases import Lease, LeaseState

MEMBERS = "members/"
LEASES = "leases/"
NODES = "nodes/"
# records mirrored whole and written by compare-and-swap (rules 9 and 10)
IMAGES = "images/"
ROLLOUTS = "rollouts/"
SHARED = (IMAGES, ROLLOUTS)


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


# ---------------------------------------------------------------------------- images (rule 9)

VERSIONS_PART = "/versions/"
POINTERS_PART = "/pointers"


def image_pointers_key(prefix: str, name: str) -> bytes:
    return f"{prefix}{IMAGES}{name}{POINTERS_PART}".encode()


def image_version_key(prefix: str, name: str, version: str) -> bytes:
    return f"{prefix}{IMAGES}{name}{VERSIONS_PART}{version}".encode()


def image_key_of(prefix: str, key: bytes) -> tuple[str, str | None] | None:
    """(image, version) for a version record's key, (image, None) for a pointers key,
    None for anything else."""
    text = key.decode(errors="replace")
    start = prefix + IMAGES
    if not text.startswith(start):
        return None
    rest = text[len(start):]
    if rest.endswith(POINTERS_PART) and "/" not in rest[:-len(POINTERS_PART)]:
        return rest[:-len(POINTERS_PART)], None
    name, sep, version = rest.partition(VERSIONS_PART)
    if sep and name and version and "/" not in name + version:
        return name, version
    return None


@dataclass(frozen=True)
class VersionRecord:
    """A version as the cluster knows it (rule 9)."""

    info: VersionInfo
    by: str  # the member that added it
    pruned: float | None = None  # when it was pruned: members delete their copies


def encode_version(record: VersionRecord) -> bytes:
    doc: dict[str, object] = {"added": record.info.added, "cmdline": record.info.cmdline,
                              "files": record.info.files_json(), "by": record.by}
    if record.pruned is not None:
        doc["pruned"] = record.pruned
    return orjson.dumps(doc)


def decode_version(name: str, version: str, value: bytes) -> VersionRecord:
    """BadRecord if it is not a version record whose name is its content."""
    try:
        doc = orjson.loads(value)
        info = VersionInfo.from_json(name, version, doc)
        pruned = doc.get("pruned")
        record = VersionRecord(info, str(doc.get("by", "")),
                               None if pruned is None else float(pruned))
    except (ValueError, KeyError, TypeError, AttributeError, orjson.JSONDecodeError) as exc:
        raise BadRecord(f"image {name}@{version}: {exc}") from exc
    if version_id(info.digests, info.cmdline) != version:  # what a fetch is checked by
        raise BadRecord(f"image {name}@{version}: the version does not name its content")
    return record


def encode_pointers(pointers: Pointers) -> bytes:
    return orjson.dumps(pointers.to_json())


def decode_pointers(name: str, value: bytes) -> Pointers:
    try:
        doc = orjson.loads(value)
        if not isinstance(doc, dict):
            raise BadRecord("not an object")
        return Pointers.from_json(doc)
    except BadRecord:
        raise
    except (ValueError, TypeError, AttributeError, orjson.JSONDecodeError) as exc:
        raise BadRecord(f"image {name} pointers: {exc}") from exc


@dataclass(frozen=True)
class Fetch:
    name: str
    version: str
    sources: tuple[str, ...]  # members that hold it, the adder first


@dataclass(frozen=True)
class SyncPlan:
    """What one member does to its image store to match the cluster's (rule 9)."""

    publish: tuple[tuple[str, str], ...] = ()  # held here, unknown to the cluster
    delete: tuple[tuple[str, str], ...] = ()  # held here, pruned in the cluster
    fetch: tuple[Fetch, ...] = ()  # in the cluster, not here, held by a live member
    stranded: tuple[tuple[str, str], ...] = ()  # in the cluster, held by no live member


def sync_plan(me: str, local: Mapping[str, Mapping[str, float]],
              records: Mapping[str, Mapping[str, VersionRecord]],
              holders: Mapping[tuple[str, str], Sequence[str]]) -> SyncPlan:
    """Rule 9 as a plan: `local` is what this member's store holds complete (version ->
    when it was added), `records` every version record in etcd, `holders` the live
    members that say they hold each version. A copy older than its version's pruning is
    deleted, never published again; one added after it (`bootd image add` of the same
    build again) brings the version back."""
    publish, delete, fetch, stranded = [], [], [], []
    for name, versions in sorted(local.items()):
        for version, added in sorted(versions.items()):
            record = records.get(name, {}).get(version)
            if record is None or (record.pruned is not None and added > record.pruned):
                publish.append((name, version))
            elif record.pruned is not None:
                delete.append((name, version))
    for name, recorded in sorted(records.items()):
        have = set(local.get(name, ()))
        for version, known in sorted(recorded.items()):
            if known.pruned is not None or version in have:
                continue
            sources = [m for m in holders.get((name, version), ()) if m != me]
            if not sources:
                stranded.append((name, version))
                continue
            by = known.by
            sources.sort(key=lambda m: (m != by, m))
            fetch.append(Fetch(name, version, tuple(sources)))
    return SyncPlan(tuple(publish), tuple(delete), tuple(fetch), tuple(stranded))


# ---------------------------------------------------------------------------- rollouts (rule 10)

ROLLOUT_CURRENT = ROLLOUTS + "current"
ROLLOUT_RUNNER = ROLLOUTS + "runner"
ROLLOUT_HISTORY = ROLLOUTS + "history/"

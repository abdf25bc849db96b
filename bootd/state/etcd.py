"""Cluster mode's I/O shell: membership and the shared lease records, on etcd.

The rules of who answers and how a lease is written are pure (`bootd.state.cluster`);
this module only moves them to and from etcd.

Theory of operation
-------------------

1. One session at a time: connect, grant a lease of `member_ttl`, register
   `members/NAME` under it, read every record under the prefix at one revision R, watch
   the prefix from R + 1, and keep the lease alive every `member_ttl / 3`. Any failure
   (a refused or timed-out request, an ended watch, a lease etcd no longer knows) ends
   the session; the next one starts after a short back-off and reads everything again.
   etcd is the truth and the mirror is rebuilt from it, so nothing is lost in between.
2. The member counts as registered only while its last keep-alive is younger than
   `member_ttl`: a member cut off from etcd stops allocating at the moment its peers may
   start to take its clients over (cluster rule 4).
3. The mirror maps each address with a record to (record, mod revision). Lease writes
   compare the key's mod revision with the mirror's (cluster rule 5); the winner's
   revision goes into the mirror, a loser reads the key back in the same transaction and
   the mirror and the lease table take what it holds.
4. Watch events feed the mirror and the current lease table; an event not newer than
   what the mirror holds is one of our own writes coming back, and is skipped.
5. Transitions are logged once each ("cluster registered", "cluster session lost"), not
   per packet; the DHCP path reads `membership()` once per batch.
6. Node timelines (cluster rule 7): the recorder names each node with news; every
   SHARE_INTERVAL the session writes those nodes' timelines, SHARE_CHUNK to a
   transaction, each compared with the revision last seen (a lost race merges the other
   member's timeline and the node is written again next time). Watch events and the
   session's first read are merged into the recorder; a node this member knows more of
   than etcd holds is written. While etcd is away the names pile up (a set, one entry a
   node) and are written when a session starts.
7. Images: each member writes into its membership key the sha256 of every file of every
   image it serves (`advertise_images`, at start, after a reload and when a file is
   replaced). A member whose files of an image differ, or who lacks the image, is not
   named as a fallback to nodes booting that image, is logged once, and shows in
   `bootd cluster status`: a node never gets a kernel from one build and an initrd from
   another. A managed version is named by its content, so for `NAME@VERSION` the test
   is simpler: a member is a fallback if it says it holds that version
   (`advertise_versions`).
8. Shared records (cluster rules 9 and 10: `images/`, `rollouts/`) are mirrored whole,
   key by key with their mod revisions, and written only by `cas`: one transaction that
   compares every key it touches (and any other it is told to) with the revision the
   mirror holds, so two members changing one record cannot both win; the loser's mirror
   takes what etcd holds and the caller decides again. Listeners hear of every key that
   changed, whoever changed it, and of every change of a member's key.

Client: aetcd (asyncio over grpc.aio), chosen after a spike against Debian's etcd 3.4
(put/get, compare-and-swap transactions, leases and watches all worked; `etcetra` could
not be installed next to it, and python-etcd3 is thread-based). aetcd 1.0 opens only a
plaintext channel to one host, so `_Client.connect` below opens the channel itself: TLS
when `tls:` is given, and every endpoint in one channel (gRPC moves to the next address
when one fails).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from ipaddress import IPv4Address, ip_address
from typing import Any
from urllib.parse import urlsplit

import aetcd
import grpc
import orjson
import structlog
from aetcd import rpc, watcher

from bootd.fleet.config import MembershipConfig
from bootd.ops.metrics import Metrics
from bootd.state.cluster import (
    LEASES,
    NODES,
    SHARED,
    SHARED_ATTEMPTS,
    SHARED_EVENTS,
    BadRecord,
    Membership,
    StoredLease,
    decode_lease,
    decode_timeline,
    encode_lease,
    encode_timeline,
    lease_key,
    member_key,
    member_of,
    node_key,
    node_of,
    owner,
    ranked,
)
from bootd.state.events import BootEvent
from bootd.state.leases import Lease, LeaseChange, LeaseDeleted, RangeLeases
from bootd.state.recorder import Recorder

log = structlog.get_logger("bootd.cluster")

BACKOFF_FIRST, BACKOFF_MAX = 0.2, 2.0
CLAIM_CHUNK = 64  # addresses per transaction: etcd refuses more than 128 operations
CLAIM_LOG_INTERVAL = 60.0
SHARE_INTERVAL = 0.25  # seconds between writes of the nodes with news (cluster rule 7)
SHARE_CHUNK = 32  # node timelines per transaction


# Every endpoint is used (round robin), so losing one etcd member leaves the others'
# connections in place instead of one channel reconnecting from scratch; gRPC's default
# first reconnect waits a second. Measured (tests/integration/test_cluster.py, the etcd
# leader killed during perfdhcp at 100/s): 62 % of exchanges completed with pick_first and
# the default backoff (one run), 61-85 % with these (four runs): what is left is etcd's
# election, 1.8-2.1 s without an ACK.
CHANNEL_OPTIONS = (("grpc.lb_policy_name", "round_robin"),
                   ("grpc.initial_reconnect_backoff_ms", 100),
                   ("grpc.min_reconnect_backoff_ms", 100),
                   ("grpc.max_reconnect_backoff_ms", 2000),
                   ("grpc.keepalive_time_ms", 5000),
                   ("grpc.keepalive_timeout_ms", 2000))


class _Client(aetcd.Client):  # type: ignore[misc]
    """aetcd's client on a channel of our making (see the module's last paragraph)."""

    def __init__(self, target: str, credentials: grpc.ChannelCredentials | None,
                 timeout: float) -> None:
        super().__init__(timeout=timeout)
        self._target, self._credentials = target, credentials

    async def connect(self) -> None:
        if self._connected.is_set():
            return
        if self._credentials is not None:
            self.channel = rpc.secure_channel(self._target, self._credentials,
                                              options=CHANNEL_OPTIONS)
        else:
            self.channel = rpc.insecure_channel(self._target, options=CHANNEL_OPTIONS)
        self.kvstub = rpc.KVStub(self.channel)
        self.clusterstub = rpc.ClusterStub(self.channel)
        self.leasestub = rpc.LeaseStub(self.channel)
        self.maintenancestub = rpc.MaintenanceStub(self.channel)
        self._watcher = watcher.Watcher(rpc.WatchStub(self.channel), timeout=self._timeout,
                                        metadata=self.metadata)
        self._connected.set()


async def channel_target(endpoints: Sequence[str]) -> str:
    """One gRPC target for every endpoint: `ipv4:a:p,b:p` (names resolved now, so a
    session started later sees DNS changes)."""
    loop = asyncio.get_running_loop()
    addresses: list[str] = []
    for url in endpoints:
        parts = urlsplit(url)
        host, port = parts.hostname or "", parts.port or 2379
        try:
            addresses.append(f"{ip_address(host)}:{port}")
            continue
        except ValueError:
            pass
        for *_, sockaddr in await loop.getaddrinfo(host, port, type=0, proto=6):
            if len(sockaddr) == 2 and f"{sockaddr[0]}:{port}" not in addresses:
                addresses.append(f"{sockaddr[0]}:{port}")
    if not addresses:
        raise OSError(f"no address for the etcd endpoints {', '.join(endpoints)}")
    return "ipv4:" + ",".join(addresses)


def credentials(config: MembershipConfig) -> grpc.ChannelCredentials | None:
    tls = config.etcd.tls
    if tls is None:
        return None
    return grpc.ssl_channel_credentials(
        root_certificates=tls.ca.read_bytes(),
        private_key=tls.key.read_bytes() if tls.key is not None else None,
        certificate_chain=tls.cert.read_bytes() if tls.cert is not None else None)


@dataclass(frozen=True)
class MemberInfo:
    name: str
    address: str
    http_port: int
    since: float
    # image name -> {part: sha256}: what the member serves (rule 7 of this module)
    images: Mapping[str, Mapping[str, str]] = field(default_factory=dict)
    # managed image name -> the versions it holds complete (rule 7)
    versions: Mapping[str, frozenset[str]] = field(default_factory=dict)

    @property
    def url(self) -> str | None:
        return f"http://{self.address}:{self.http_port}" if self.address else None


class SessionLost(Exception):
    pass


class NotRegistered(Exception):
    """A shared record cannot be written now: this member has no etcd session."""


class EtcdCluster:
    """This member's session with etcd: its registration, the live members, the mirror
    of every lease record, and the claims the DHCP path makes (see the module's rules)."""

    def __init__(self, config: MembershipConfig, metrics: Metrics,
                 leases: Callable[[], RangeLeases | None], *, address: str,
                 http_port: int) -> None:
        self.config = config
        self.prefix = config.etcd.prefix
        self.me = config.member
        self.metrics = metrics
        self._leases = leases  # the current snapshot's lease table
        self._identity = {"address": address, "http_port": http_port, "since": time.time()}
        self._images: dict[str, dict[str, str]] = {}  # what this member serves (rule 7)
        self._grant: Any = None  # this session's membership lease
        self._mismatch_logged: set[tuple[str, str, str]] = set()
        self._client: _Client | None = None
        self._members: dict[str, MemberInfo] = {}
        self._mirror: dict[IPv4Address, tuple[StoredLease | None, int]] = {}
        # the newest revision seen per lease key, deletions included: an event not newer
        # is skipped before its value is decoded (most are our own writes coming back)
        self._seen: dict[bytes, int] = {}
        self._alive_until = 0.0  # monotonic: registered until then (rule 2)
        self._view: Membership | None = None
        self._state = "starting"
        self._last_error: str | None = None
        self._claim_logged = -CLAIM_LOG_INTERVAL
        self._loaded = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        # rule 6: the recorder (attached once the runtime exists), nodes with news, and
        # the timelines read at the session's start before it was attached
        self._recorder: Recorder | None = None
        self._news: set[str] = set()
        self._unmerged: dict[str, list[BootEvent]] = {}
        # rule 8: shared records by key -> (value, mod revision), and who hears of changes
        self._kv: dict[bytes, tuple[bytes, int]] = {}
        self._listeners: list[Callable[[bytes], None]] = []
        self._versions: dict[str, list[str]] = {}  # what this member holds (rule 7)

    # -- what the DHCP path and the rest of the daemon ask

    def membership(self) -> Membership:
        registered = time.monotonic() < self._alive_until
        view = self._view
        if view is None or view.registered != registered:
            view = Membership(self.me, tuple(sorted(self._members)) if registered else (),
                              registered, self.config.takeover_after)
            self._view = view
        return view

    def peer_urls(self, mac: str, image: str | None = None) -> tuple[str, ...]:
        """The other live members' boot URLs, in the order `mac` would fail over to
        them (cluster rule 8); none while this member is not registered. A member whose
        files of `image` differ from this member's (or who lacks it) is left out, so a
        node never boots one member's kernel with another's initrd (rule 7)."""
        view = self.membership()
        if not view.registered:
            return ()
        name_of, _, version = (image or "").partition("@")
        mine = self._images.get(image) if image is not None and not version else None
        out = []
        for name in ranked(mac, view.members):
            info = self._members.get(name)
            if name == self.me or info is None or not info.address or not info.http_port:
                continue
            if version and version not in info.versions.get(name_of, ()):
                continue  # it has not fetched that version (yet)
            if mine is not None and info.images.get(image or "") != mine:
                self._mismatch(name, image or "", info)
                continue
            out.append(f"http://{info.address}:{info.http_port}")
        return tuple(out)

    def holders(self, name: str, version: str) -> list[str]:
        """The live members that say they hold NAME@VERSION (this one included)."""
        view = self.membership()
        return [m for m in view.members
                if (info := self._members.get(m)) is not None
                and version in info.versions.get(name, ())]

    def member(self, name: str) -> MemberInfo | None:
        return self._members.get(name)

    async def advertise_versions(self, held: dict[str, list[str]]) -> None:
        """The managed versions this member holds complete (rule 7)."""
        if held == self._versions:
            return
        self._versions = held
        await self._advertise()

    def _mismatch(self, name: str, image: str, info: MemberInfo) -> None:
        if not info.images:
            return  # it has not said yet what it serves (just started): left out quietly
        theirs = info.images.get(image)
        key = (name, image, repr(sorted(theirs.items())) if theirs else "")
        if key in self._mismatch_logged:
            return
        self._mismatch_logged.add(key)
        differ = sorted(part for part, digest in self._images.get(image, {}).items()
                        if (theirs or {}).get(part) != digest)
        log.warning("cluster: another member serves different files for an image; it is "
                    "not named as a fallback for nodes booting it", member=name,
                    image=image, parts=differ if theirs else "missing there")

    async def advertise_images(self, images: dict[str, dict[str, str]]) -> None:
        """What this member serves, by image and part (sha256): written to its membership
        key, so the others can tell identical images from different ones."""
        if images == self._images:
            return
        self._images = images
        await self._advertise()

    async def _advertise(self) -> None:
        client, grant = self._client, self._grant
        if client is None or grant is None or not self.membership().registered:
            return  # the next session writes it
        with contextlib.suppress(Exception):  # a failure here ends no session: retried
            await asyncio.wait_for(client.put(member_key(self.prefix, self.me),
                                              self._info(), lease=grant),
                                   self.config.etcd.timeout)

    def _info(self) -> bytes:
        return orjson.dumps({**self._identity, "images": self._images,
                             "versions": self._versions})

    # -- shared records (rule 8)

    def key(self, relative: str) -> bytes:
        return f"{self.prefix}{relative}".encode()

    def shared(self, key: bytes) -> tuple[bytes, int] | None:
        """A shared record as the mirror holds it: (value, mod revision)."""
        return self._kv.get(key)

    def shared_items(self, relative_prefix: str) -> list[tuple[bytes, bytes, int]]:
        start = self.key(relative_prefix)
        return [(k, v, r) for k, (v, r) in self._kv.items() if k.startswith(start)]

    def on_shared_change(self, listener: Callable[[bytes], None]) -> None:
        self._listeners.append(listener)

    def _changed(self, keys: Iterable[bytes]) -> None:
        for key in keys:
            for listener in self._listeners:
                try:
                    listener(key)
                except Exception:  # a listener's bug must not end the session
                    log.exception("cluster: a shared-record listener failed")

    async def cas(self, writes: Mapping[bytes, bytes | None],
                  expect: Mapping[bytes, int] | None = None,
                  leased: frozenset[bytes] = frozenset()) -> bool:
        """Write (a value) or delete (None) shared records in one transaction, if every
        written key, and every key in `expect`, still has the mod revision given
        (written keys: the mirror's; 0 = absent). True if written; False if another
        member got there first, and the mirror then holds what etcd holds. `leased`
        keys live and die with this member's membership lease. NotRegistered without a
        session; etcd's errors (a timeout, an election) pass through."""
        client, grant = self._client, self._grant
        if client is None or grant is None or not self.membership().registered:
            raise NotRegistered("this member has no etcd session now")
        compare_on = {key: self._kv.get(key, (b"", 0))[1] for key in writes}
        compare_on.update(expect or {})
        keys = list(compare_on)
        tx = client.transactions
        ops = [tx.delete(key) if value is None else
               tx.put(key, value, lease=grant) if key in leased else tx.put(key, value)
               for key, value in writes.items()]
        succeeded, responses = await asyncio.wait_for(client.transaction(
            compare=[tx.mod(key) == compare_on[key] for key in keys], success=ops,
            failure=[tx.get(key) for key in keys]), self.config.etcd.timeout)
        if succeeded:
            for (key, value), response in zip(writes.items(), responses, strict=True):
                if value is None:
                    self._kv.pop(key, None)
                    self._seen[key] = response.response_delete_range.header.revision
                else:
                    revision = response.response_put.header.revision
                    self._kv[key] = (value, revision)
                    self._seen[key] = revision
            self._changed(writes)
            return True
        changed = []
        for key, found in zip(keys, responses, strict=True):
            before = self._kv.get(key)
            if found:
                value, meta = found[0]
                self._kv[key] = (value, meta.mod_revision)
                self._seen[key] = max(self._seen.get(key, 0), meta.mod_revision)
            else:
                self._kv.pop(key, None)
            if self._kv.get(key) != before:
                changed.append(key)
        self._changed(changed)
        return False

    def image_differences(self) -> dict[str, list[str]]:
        """Per other member, the images whose files differ from this member's."""
        out: dict[str, list[str]] = {}
        for name, info in self._members.items():
            if name != self.me:
                differ = sorted(img for img, parts in self._images.items()
                                if info.images.get(img) != parts)
                if differ:
                    out[name] = differ
        return out

    def leases(self) -> list[Lease]:
        """Every lease record in the mirror: what a new snapshot's table starts from."""
        return [stored.lease for stored, _ in self._mirror.values() if stored is not None]

    async def claim(self, changes: Sequence[LeaseChange]) -> bool:
        """Write a batch's lease changes (rule 3); True if every one was written. Only
        the last change per address counts (what the table holds now), and they go in
        one transaction per CLAIM_CHUNK addresses: one raft proposal and one fsync for a
        batch instead of one per change (measured: a batch of 32 as 32 concurrent
        transactions took 25 ms on one etcd here; see bench/cluster.py). A transaction
        is all or nothing, so one lost race withholds the batch's replies that needed a
        change; the records read back then make the next attempt succeed. Nothing is
        queued again: a lost or failed write is decided anew when the client asks."""
        client = self._client
        if client is None or not self.membership().registered:
            self.metrics.cluster_claims.labels("skipped").inc(len(changes))
            return False
        latest = {change.ip: change for change in changes}
        items = list(latest.values())
        began = time.perf_counter()
        try:
            results = await asyncio.wait_for(asyncio.gather(
                *(self._claim_chunk(client, items[i:i + CLAIM_CHUNK])
                  for i in range(0, len(items), CLAIM_CHUNK))), self.config.etcd.timeout)
        except (TimeoutError, aetcd.ClientError, grpc.RpcError, OSError) as exc:
            # a leader election or a lost etcd member: the claims fail and the replies wait
            # for the client's retransmission; only the keep-alive decides whether this
            # member is still registered (rule 2), so a blip does not stop allocation
            self.metrics.cluster_claims.labels("failed").inc(len(items))
            self._last_error = f"claim: {type(exc).__name__}: {exc}"
            now = time.monotonic()
            if now - self._claim_logged >= CLAIM_LOG_INTERVAL:
                self._claim_logged = now
                log.warning("cluster: lease claims failed; their replies are withheld "
                            "(logged once a minute)", error=self._last_error,
                            changes=len(items))
            return False
        self.metrics.cluster_claim_seconds.observe(time.perf_counter() - began)
        won = sum(n for ok, n in results if ok)
        self.metrics.cluster_claims.labels("won").inc(won)
        if won < len(items):
            self.metrics.cluster_claims.labels("lost").inc(len(items) - won)
        return won == len(items)

    async def _claim_chunk(self, client: _Client, chunk: Sequence[LeaseChange],
                           ) -> tuple[bool, int]:
        tx = client.transactions
        keys = [lease_key(self.prefix, change.ip) for change in chunk]
        compare = [tx.mod(key) == self._mirror.get(change.ip, (None, 0))[1]
                   for key, change in zip(keys, chunk, strict=True)]
        writes = [tx.delete(key) if isinstance(change, LeaseDeleted)
                  else tx.put(key, encode_lease(change, self.me))
                  for key, change in zip(keys, chunk, strict=True)]
        succeeded, responses = await client.transaction(
            compare=compare, success=writes, failure=[tx.get(key) for key in keys])
        if succeeded:
            for key, change, response in zip(keys, chunk, responses, strict=True):
                if isinstance(change, LeaseDeleted):
                    self._mirror[change.ip] = (None, 0)
                    self._seen[key] = response.response_delete_range.header.revision
                else:
                    revision = response.response_put.header.revision
                    self._mirror[change.ip] = (StoredLease(change, self.me), revision)
                    self._seen[key] = revision
            return True, len(chunk)
        for key, change, found in zip(keys, chunk, responses, strict=True):
            if found:  # [(value, meta)]: what another member wrote
                value, meta = found[0]
                self._learn(key, value, meta.mod_revision)
            else:
                self._forget(change.ip)
        return False, len(chunk)

    async def status(self) -> dict[str, Any]:
        """`bootd cluster status`: members, liveness, owners, etcd health and latency."""
        view = self.membership()
        counts: dict[str, int] = {name: 0 for name in view.members}
        differences = self.image_differences()
        now = time.time()
        for stored, _ in self._mirror.values():
            if stored is not None and stored.lease.active(now):
                who = owner(stored.lease.mac, view.members)
                if who is not None:
                    counts[who] += 1
        etcd: dict[str, Any] = {"endpoints": self.config.etcd.endpoints,
                                "prefix": self.prefix}
        client = self._client
        if client is not None:
            began = time.perf_counter()
            try:
                st = await asyncio.wait_for(client.status(), self.config.etcd.timeout)
                etcd.update(healthy=True, latency_ms=round(
                    (time.perf_counter() - began) * 1000, 2), version=st.version,
                    leader=f"{st.leader.id:x}" if st.leader is not None else None,
                    db_size=st.db_size)
            except Exception as exc:  # any failure is the answer: etcd is not healthy
                etcd.update(healthy=False, error=str(exc) or type(exc).__name__)
        else:
            etcd.update(healthy=False, error=self._last_error or "not connected")
        return {
            "member": self.me, "registered": view.registered, "state": self._state,
            "last_error": self._last_error, "member_ttl": self.config.member_ttl,
            "takeover_after": self.config.takeover_after,
            "members": [{"name": name, "address": m.address, "http_port": m.http_port,
                         "since": m.since, "owns_active_leases": counts.get(name, 0),
                         "me": name == self.me,
                         "images_differ": differences.get(name, []),
                         "versions": {image: sorted(held)
                                      for image, held in sorted(m.versions.items())}}
                        for name, m in sorted(self._members.items())],
            "leases": sum(1 for stored, _ in self._mirror.values() if stored is not None),
            "etcd": etcd,
        }

    def attach(self, recorder: Recorder) -> None:
        """Share the fleet view through this recorder (rule 6)."""
        recorder.member = self.me
        recorder.on_record = self._note
        self._recorder = recorder
        self._merge_all(self._unmerged)
        self._unmerged = {}

    def _note(self, key: str) -> None:
        self._news.add(key)  # not bound once: `_share` swaps the set

    def _merge_all(self, timelines: dict[str, list[BootEvent]]) -> None:
        """Timelines read whole from etcd: merged, and every node this member knows more
        of (or etcd knows nothing of) is written."""
        recorder = self._recorder
        if recorder is None:
            self._unmerged = timelines
            return
        for key, events in timelines.items():
            _, ours_only = recorder.merge(key, events)
            if ours_only:
                self._news.add(key)
        self._news.update(k for k in recorder.shareable() if k not in timelines)

    async def _share(self, client: _Client) -> None:
        """Rule 6: write the timelines of the nodes with news, for as long as the session
        lasts."""
        while True:
            await asyncio.sleep(SHARE_INTERVAL)
            recorder = self._recorder
            if recorder is None or not self._news:
                continue
            news, self._news = sorted(self._news), set()
            for start in range(0, len(news), SHARE_CHUNK):
                chunk = news[start:start + SHARE_CHUNK]
                try:
                    await asyncio.wait_for(self._share_chunk(client, recorder, chunk),
                                           self.config.etcd.timeout)
                except BaseException:
                    self._news.update(news[start:])  # written by the next session
                    raise

    async def _share_chunk(self, client: _Client, recorder: Recorder,
                           keys: list[str]) -> None:
        tx = client.transactions
        names = [node_key(self.prefix, key) for key in keys]
        values = [encode_timeline(recorder.timeline(key, SHARED_ATTEMPTS, SHARED_EVENTS))
                  for key in keys]
        succeeded, responses = await client.transaction(
            compare=[tx.mod(name) == self._seen.get(name, 0) for name in names],
            success=[tx.put(name, value) for name, value in zip(names, values, strict=True)],
            failure=[tx.get(name) for name in names])
        if succeeded:
            for name, response in zip(names, responses, strict=True):
                self._seen[name] = response.response_put.header.revision
            self.metrics.cluster_timeline_writes.inc(len(keys))
            return
        for key, name, found in zip(keys, names, responses, strict=True):
            if found:
                value, meta = found[0]
                self._seen[name] = meta.mod_revision
                self._merge_one(key, value)
            self._news.add(key)  # the union goes out next time

    def _merge_one(self, key: str, value: bytes) -> None:
        try:
            events = decode_timeline(value)
        except BadRecord as exc:
            log.warning("cluster: skipping a node timeline", node=key, error=str(exc))
            return
        if self._recorder is None:
            self._unmerged[key] = events
            return
        _, ours_only = self._recorder.merge(key, events)
        if ours_only:
            self._news.add(key)

    # -- the session (rule 1)

    async def start(self, wait: float) -> None:
        """Run sessions in the background; wait up to `wait` s for the first to load."""
        self._task = asyncio.create_task(self._run())
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(self._loaded.wait(), wait)
        if not self._loaded.is_set():
            log.error("cluster: etcd not reachable at start; serving reserved nodes only "
                      "until it is", endpoints=self.config.etcd.endpoints,
                      error=self._last_error)

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        # a clean stop hands this member's clients over now, not after member_ttl
        client = self._client
        if client is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(client.delete(member_key(self.prefix, self.me)), 1.0)
            with contextlib.suppress(Exception):
                await asyncio.wait_for(client.close(), 1.0)
        self._client = None

    async def _run(self) -> None:
        backoff = BACKOFF_FIRST
        while True:
            try:
                await self._session()
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # any failure ends the session (rule 1)
                self._trouble(exc)
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, BACKOFF_MAX)
            if self._state == "registered":
                backoff = BACKOFF_FIRST

    async def _session(self) -> None:
        timeout = self.config.etcd.timeout
        ttl = self.config.member_ttl
        client = _Client(await channel_target(self.config.etcd.endpoints),
                         credentials(self.config), timeout)
        old, self._client = self._client, client
        if old is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(old.close(), 1.0)
        grant = await asyncio.wait_for(client.lease(max(1, round(ttl))), timeout)
        await asyncio.wait_for(client.put(member_key(self.prefix, self.me), self._info(),
                                          lease=grant), timeout)
        self._grant = grant
        renewed = time.monotonic()
        snapshot = await asyncio.wait_for(client.get_prefix(self.prefix.encode()), timeout)
        self._load(snapshot)
        watch = await asyncio.wait_for(client.watch_prefix(
            self.prefix.encode(), start_revision=snapshot.header.revision + 1), timeout)
        follower = asyncio.create_task(self._follow(watch))
        sharer = asyncio.create_task(self._share(client))
        self._alive_until = renewed + ttl
        self._registered()
        try:
            while True:
                await asyncio.sleep(ttl / 3)
                for task, what in ((follower, "the watch"), (sharer, "the timeline writer")):
                    if task.done():
                        task.result()  # raises what ended it
                        raise SessionLost(f"{what} ended")
                asked = time.monotonic()
                reply = await asyncio.wait_for(grant.refresh(), timeout)
                if reply is None or reply.TTL <= 0:
                    raise SessionLost("etcd no longer knows this member's lease")
                self._alive_until = asked + ttl
        finally:
            self._alive_until = 0.0
            self._publish()
            for task in (follower, sharer):
                task.cancel()
                with contextlib.suppress(BaseException):
                    await task

    def _load(self, snapshot: Any) -> None:
        """Everything under the prefix at one revision: members, and every lease record
        (the current lease table is made to hold exactly what etcd holds)."""
        members: dict[str, MemberInfo] = {}
        mirror: dict[IPv4Address, tuple[StoredLease | None, int]] = {}
        seen: dict[bytes, int] = {}
        timelines: dict[str, list[BootEvent]] = {}
        shared: dict[bytes, tuple[bytes, int]] = {}
        shared_starts = tuple((self.prefix + p).encode() for p in SHARED)
        for kv in snapshot:
            name = member_of(self.prefix, kv.key)
            if name is not None:
                members[name] = _member_info(name, kv.value)
                continue
            if kv.key.startswith(shared_starts):
                shared[kv.key] = (kv.value, kv.mod_revision)
                seen[kv.key] = kv.mod_revision
                continue
            node = node_of(self.prefix, kv.key)
            if node is not None:
                seen[kv.key] = kv.mod_revision
                try:
                    timelines[node] = decode_timeline(kv.value)
                except BadRecord as exc:
                    log.warning("cluster: skipping a node timeline", node=node,
                                error=str(exc))
                continue
            try:
                stored = decode_lease(self.prefix, kv.key, kv.value)
            except BadRecord as exc:
                log.warning("cluster: skipping a record that is not a lease", error=str(exc))
                continue
            mirror[stored.lease.ip] = (stored, kv.mod_revision)
            seen[kv.key] = kv.mod_revision
        table = self._leases()
        if table is not None:
            for held in table.leases():
                if held.ip not in mirror:
                    table.apply_remote(held.ip, None)
            for ip, (found, _) in mirror.items():
                table.apply_remote(ip, found.lease if found is not None else None)
        self._members, self._mirror, self._seen = members, mirror, seen
        before, self._kv = self._kv, shared
        self._merge_all(timelines)
        self._loaded.set()
        self._changed(k for k in before.keys() | shared.keys() if before.get(k) != shared.get(k))

    async def _follow(self, watch: Any) -> None:
        prefix = self.prefix
        leases, nodes = (prefix + LEASES).encode(), (prefix + NODES).encode()
        shared = tuple((prefix + p).encode() for p in SHARED)
        async for event in watch:
            key = event.kv.key
            deleted = event.kind == aetcd.EventKind.DELETE
            name = member_of(prefix, key)
            if name is not None:
                if deleted:
                    self._members.pop(name, None)
                else:
                    self._members[name] = _member_info(name, event.kv.value)
                self._publish()
                self._changed((key,))  # what it holds may have changed (rule 7)
            elif key.startswith(shared):
                revision = event.kv.mod_revision
                if self._seen.get(key, 0) >= revision:
                    continue  # our own write (or delete) coming back
                self._seen[key] = revision
                if deleted:
                    self._kv.pop(key, None)
                else:
                    self._kv[key] = (event.kv.value, revision)
                self._changed((key,))
            elif key.startswith(nodes):
                revision = event.kv.mod_revision
                if deleted or self._seen.get(key, 0) >= revision:
                    continue
                self._seen[key] = revision
                self._merge_one(key[len(nodes):].decode(errors="replace"), event.kv.value)
            elif key.startswith(leases):
                revision = event.kv.mod_revision
                if self._seen.get(key, 0) >= revision:
                    continue  # our own write coming back, or older than what we hold
                self._seen[key] = revision
                if deleted:
                    self._forget_key(key)
                else:
                    self._learn(key, event.kv.value, revision)

    def _learn(self, key: bytes, value: bytes, revision: int) -> None:
        try:
            stored = decode_lease(self.prefix, key, value)
        except BadRecord as exc:
            log.warning("cluster: skipping a record that is not a lease", error=str(exc))
            return
        ip = stored.lease.ip
        if self._mirror.get(ip, (None, 0))[1] >= revision:
            return  # not newer than what we hold (rule 4)
        self._seen[key] = max(self._seen.get(key, 0), revision)
        self._mirror[ip] = (stored, revision)
        table = self._leases()
        if table is not None:
            table.apply_remote(ip, stored.lease)

    def _forget_key(self, key: bytes) -> None:
        try:
            ip = IPv4Address(key.decode()[len(self.prefix) + len(LEASES):])
        except ValueError:
            return
        self._forget(ip)

    def _forget(self, ip: IPv4Address) -> None:
        self._mirror[ip] = (None, 0)
        table = self._leases()
        if table is not None:
            table.apply_remote(ip, None)

    # -- transitions (rule 5)

    def _registered(self) -> None:
        self.metrics.cluster_sessions.labels("started").inc()
        self._state = "registered"
        self._last_error = None
        self._publish()
        log.info("cluster registered", member=self.me, members=sorted(self._members),
                 leases=len(self.leases()))

    def _trouble(self, exc: BaseException) -> None:
        error = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
        if self._state != "lost":
            self.metrics.cluster_sessions.labels("lost").inc()
            log.error("cluster session lost: no address is allocated until etcd answers "
                      "again; reserved nodes are still served", member=self.me, error=error)
        self._state = "lost"
        self._last_error = error
        self._alive_until = 0.0
        self._publish()

    def _publish(self) -> None:
        """Members or registration changed: a new view for the next batch."""
        self._view = None
        view = self.membership()
        self.metrics.cluster_registered.set(1 if view.registered else 0)
        self.metrics.cluster_members.set(len(view.members))


def _member_info(name: str, value: bytes) -> MemberInfo:
    try:
        data = orjson.loads(value)
        images = data.get("images") or {}
        versions = data.get("versions") or {}
        return MemberInfo(name, str(data.get("address", "")), int(data.get("http_port", 0)),
                          float(data.get("since", 0.0)),
                          {str(k): {str(p): str(d) for p, d in v.items()}
                           for k, v in images.items()},
                          {str(k): frozenset(str(x) for x in v) for k, v in versions.items()})
    except (orjson.JSONDecodeError, AttributeError, TypeError, ValueError):
        return MemberInfo(name, "", 0, 0.0)


"""The DHCP service: a batch of datagrams in, at most one reply for each out.

Theory of operation
-------------------

The whole data path is in `DhcpService.handle_batch`, in this order:

    bytes --decode--> DhcpPacket --decide--> Outcome   (each datagram of the batch)
    --persist-->                                       (once: one store transaction)
    --encode--> Datagram                               (each reply)

The transport hands over every datagram one wakeup read (group commit): a burst of N
requests costs one SQLite transaction instead of N, which is most of what a commit per
packet cost (issue 15's profile), and durability is unchanged: no reply of the batch
exists before the transaction that holds its lease has committed.

Rules:

1. Decode and encode happen here and nowhere else; the transport below only moves bytes
   (and, for a client without an address, teaches the kernel its MAC).
2. `decide()` is pure: it reads the node directory and the settings of the current
   runtime snapshot and queues lease changes in the lease table. Decisions later in a
   batch see the changes queued by earlier ones (two DISCOVERs in one batch get two
   addresses), exactly as they would one wakeup apart.
3. Queued lease changes are written to the store *before* any reply is encoded. If the
   write fails, a reply whose decision queued a change is not sent: a client is never
   told about an address the store does not have, and the changes stay queued for the
   next write. Replies that depend on no change (reserved nodes, NAKs) still go.
4. Every outcome is a frozen class (`bootd.dhcp.outcomes`); its log line, metric and boot
   event are chosen by a `match` on the class, never by reading text.
5. Logging an unknown MAC is limited per MAC (once a minute), so a client retrying
   every second logs once, and many unknown machines are each logged once. The same
   holds for a reserved node seen on the wrong network (per MAC), a relay in no declared
   network (per relay address), an exhausted range (per network) and a failing lease
   store: never one line per packet.
6. The snapshot is read once per batch: a reload between two batches swaps it, a
   reload never lands in the middle of one.
7. INFORM is answered at most INFORM_BURST at once and INFORM_RATE a second per client
   address; beyond that it is counted and dropped, unlogged.
8. Cluster mode (`handle_batch_shared`): the same path, but a client this member does
   not answer (`bootd.state.cluster`, rules 2-4) is dropped before it is queued
   (`answers`, asked by the transport), offers
   are queued like binds, and "persist" is a compare-and-swap per change in etcd, awaited
   before any reply of the batch is encoded. A lost or failed claim withholds the
   batch's replies that needed a change and is not retried: the client asks again and is
   decided against what etcd holds by then.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from ipaddress import IPv4Address
from types import MappingProxyType
from typing import Protocol

import structlog

from bootd.dhcp.bootfile import BootAnswer, is_boot_client
from bootd.dhcp.decide import DhcpContext, decide
from bootd.dhcp.outcomes import (
    Acked,
    Declined,
    Dropped,
    Exhausted,
    Informed,
    Nakked,
    NotForUs,
    Offered,
    Outcome,
    Released,
    UnknownMac,
    UnknownRelay,
    WrongNetwork,
)
from bootd.dhcp.packet import DhcpError, DhcpPacket, MessageType, decode, encode
from bootd.fleet.inventory import NodeProfile
from bootd.ops.metrics import Metrics
from bootd.ops.ratelimit import RateLimiter, TokenBucket
from bootd.state import events
from bootd.state.cluster import Membership
from bootd.state.events import BootEvent
from bootd.state.leases import LeaseChange
from bootd.state.recorder import Recorder
from bootd.state.store import Store

log = structlog.get_logger("bootd.dhcp")

UNKNOWN_MAC_LOG_INTERVAL = 60.0
UNKNOWN_MAC_MEMORY = 4096
INFORM_RATE, INFORM_BURST = 1.0, 5.0


class SharedLeases(Protocol):
    """Cluster mode's shared lease store (`bootd.state.etcd.EtcdCluster`)."""

    def membership(self) -> Membership: ...

    async def claim(self, changes: Sequence[LeaseChange]) -> bool: ...


@dataclass(frozen=True)
class Datagram:
    """An encoded reply and where it goes."""

    payload: bytes
    dest: IPv4Address
    port: int
    # set when the client has no address yet: deliver to `dest` at this hardware address
    # (the transport adds an ARP entry, or broadcasts if it may not)
    hw_unicast_to: bytes | None = None


class DhcpService:
    def __init__(self, context: Callable[[], DhcpContext], store: Store, metrics: Metrics,
                 recorder: Recorder | None = None, cluster: SharedLeases | None = None,
                 ) -> None:
        self.context = context  # the current snapshot's DHCP context
        self.store = store
        self.cluster = cluster
        self.shared = cluster is not None
        self.metrics = metrics
        self.recorder = recorder
        self.unknown_log = RateLimiter(UNKNOWN_MAC_LOG_INTERVAL, UNKNOWN_MAC_MEMORY)
        self.relay_log = RateLimiter(UNKNOWN_MAC_LOG_INTERVAL, UNKNOWN_MAC_MEMORY)
        self.trouble_log = RateLimiter(UNKNOWN_MAC_LOG_INTERVAL, 64)  # per kind of trouble
        self.informs = TokenBucket(INFORM_RATE, INFORM_BURST, UNKNOWN_MAC_MEMORY)
        self._packets = {kind: metrics.dhcp_packets.labels(kind) for kind in (
            "malformed", "store-failed", "rate-limited", "shed", "not-owned", "claim-lost",
            *(c.kind for c in _OUTCOME_CLASSES))}

    def is_known(self, data: bytes) -> bool:
        """Is this datagram from a machine bootd knows (a configured or learned MAC, or
        one holding a bound lease)? Read off chaddr without decoding: the transport asks
        it of every datagram of a flood, to answer these first."""
        if len(data) < 34 or data[2] != 6:
            return False
        return self.context().directory.is_known_raw(data[28:34])

    def answers(self, data: bytes) -> bool:
        """Cluster mode: does this member answer this datagram's client (its chaddr and
        `secs` read without decoding, `bootd.state.cluster` rules 2-4)? The transport
        asks before queueing, so the clients of other members cost no queue space."""
        if self.cluster is None or len(data) < 34 or data[2] != 6:
            return True  # a malformed datagram is dropped, and counted, by decode
        if self.cluster.membership().answers(data[28:34].hex(":"),
                                             int.from_bytes(data[8:10])):
            return True
        self._packets["not-owned"].inc()
        return False

    def shed(self, count: int) -> None:
        """Datagrams of unknown machines the transport dropped under load, unanswered."""
        self._packets["shed"].inc(count)

    def handle(self, data: bytes, interface: str, now: float) -> Datagram | None:
        """One datagram: a batch of one."""
        replies = self.handle_batch((data,), interface, now)
        return replies[0] if replies else None

    def handle_batch(self, batch: Sequence[bytes], interface: str, now: float,
                     ) -> list[Datagram]:
        """The replies to a batch of datagrams, in their order (see the module's rules)."""
        ctx = self.context()
        decided = self._decide(batch, ctx, interface, now)
        if not decided:
            return []
        return self._answer(decided, self._persist(ctx, now), interface, now)

    async def handle_batch_shared(self, batch: Sequence[bytes], interface: str, now: float,
                                  ) -> list[Datagram]:
        """Cluster mode's `handle_batch` (rule 8): only the clients this member answers
        are decided, and the lease changes are claimed in the shared store."""
        assert self.cluster is not None
        ctx = self.context()
        view = self.cluster.membership()
        leases = ctx.directory.leases
        if leases is not None:
            leases.scan_from(*view.fresh_slice())
        decided = self._decide(batch, ctx, interface, now)
        if not decided:
            return []
        stored = await self._persist_shared(self.cluster, ctx, view, now)
        return self._answer(decided, stored, interface, now)

    def _decide(self, batch: Sequence[bytes], ctx: DhcpContext, interface: str, now: float,
                ) -> list[tuple[DhcpPacket, Outcome, bool]]:
        leases = ctx.directory.leases
        decided: list[tuple[DhcpPacket, Outcome, bool]] = []
        for data in batch:
            try:
                request = decode(data)
            except DhcpError as exc:
                self._packets["malformed"].inc()
                log.debug("dhcp drop malformed", interface=interface, error=str(exc))
                continue
            if request.message_type is MessageType.INFORM and not self.informs.allow(
                    str(request.ciaddr), now):
                self._packets["rate-limited"].inc()
                continue
            queued = leases.pending() if leases is not None else 0
            outcome = decide(request, ctx, now, interface)
            decided.append((request, outcome,
                            leases is not None and leases.pending() > queued))
        return decided

    def _answer(self, decided: list[tuple[DhcpPacket, Outcome, bool]], stored: bool,
                interface: str, now: float) -> list[Datagram]:
        replies: list[Datagram] = []
        for request, outcome, changed in decided:
            if changed and not stored:
                continue  # this reply depends on a change the store does not have
            self._packets[outcome.kind].inc()
            self._log(outcome, request, interface, now)
            if self.recorder is not None:
                self._record(self.recorder, request, outcome, now)
            match outcome:
                case Offered(reply=reply) | Acked(reply=reply) | Informed(
                        reply=reply) | Nakked(reply=reply):
                    packet = reply.packet
                    chaddr = packet.chaddr[:packet.hlen] if reply.hw_unicast else None
                    replies.append(Datagram(encode(packet, reply.max_size), reply.dest,
                                            reply.port, chaddr))
        return replies

    def _save_learned(self, ctx: DhcpContext) -> None:
        learned = ctx.directory.drain_learned()
        if learned:
            try:
                self.store.save_learned(learned)
            except Exception as exc:  # kept in memory; written again when next learned
                log.error("dhcp learned MAC store write failed", error=str(exc))

    async def _persist_shared(self, cluster: SharedLeases, ctx: DhcpContext,
                              view: Membership, now: float) -> bool:
        """Claim the batch's lease changes in the shared store; False (and no reply that
        needs them sent) if any claim was lost or etcd did not answer. Nothing is queued
        again: the client's next attempt is decided against what the store holds."""
        self._save_learned(ctx)
        leases = ctx.directory.leases
        changes = leases.drain_changes() if leases is not None else []
        if not changes:
            return True
        if not view.may_allocate():
            self._packets["store-failed"].inc()
            if self.trouble_log.allow("cluster", now):
                log.error("dhcp no address allocated: this member is not registered in the "
                          "cluster (etcd unreachable?); reserved nodes are still answered "
                          "(logged once a minute)", pending=len(changes))
            return False
        if await cluster.claim(changes):
            assert leases is not None
            self.metrics.dhcp_leases.set(len(leases))
            return True
        self._packets["claim-lost"].inc()
        return False

    def _persist(self, ctx: DhcpContext, now: float) -> bool:
        """Write queued lease changes and learned MACs; False (and nothing sent) if the
        store failed."""
        self._save_learned(ctx)
        leases = ctx.directory.leases
        if leases is None:
            return True
        changes = leases.drain_changes()
        if not changes:
            return True
        try:
            self.store.apply_lease_changes(changes)
        except Exception as exc:  # a full or broken disk: answer nobody, keep the changes
            leases.requeue(changes)
            self._packets["store-failed"].inc()
            if self.trouble_log.allow("store", now):
                log.error("dhcp lease store write failed; replies that need it withheld "
                          "until it works (logged once a minute)", error=str(exc),
                          pending=len(changes))
            return False
        self.metrics.dhcp_leases.set(len(leases))
        return True

    def _log(self, outcome: Outcome, request: DhcpPacket, interface: str, now: float) -> None:
        fields: dict[str, object] = {"interface": interface, "xid": f"{request.xid:08x}"}
        with contextlib.suppress(DhcpError):
            fields["mac"] = request.mac
        match outcome:
            case UnknownMac(mac=mac, message_type=mtype):
                if self.unknown_log.allow(mac, now):
                    log.warning("dhcp unknown-mac", **fields, message=mtype.name,
                                detail="not in the inventory and there is no catch-all pool")
                return
            case Offered(node=node, ip=ip, boot=boot, note=note) | Informed(
                    node=node, ip=ip, boot=boot, note=note):
                log.info(f"dhcp {outcome.kind}", **fields, **_node_fields(node), ip=str(ip),
                         **_boot_fields(boot), **({"detail": note} if note else {}))
            case Acked(node=node, ip=ip, boot=boot, state=state, note=note):
                log.info("dhcp ack", **fields, **_node_fields(node), ip=str(ip),
                         **_boot_fields(boot), detail="; ".join(filter(None, (state, note))))
            case Nakked(node=node, ip=ip, reason=reason):
                log.info("dhcp nak", **fields, **_node_fields(node),
                         ip=str(ip) if ip else None, detail=reason)
            case Released(node=node, ip=ip, reason=reason) | Declined(
                    node=node, ip=ip, reason=reason):
                log.info(f"dhcp {outcome.kind}", **fields, **_node_fields(node), ip=str(ip),
                         detail=reason)
            case WrongNetwork(node=node, mac=mac, seen_on=seen_on):
                if self.unknown_log.allow(mac, now):
                    log.warning("dhcp wrong-network", **fields, **_node_fields(node),
                                network=seen_on, detail=f"node {node.name} seen on {seen_on}"
                                f", reserved on {node.network}: not served there")
            case UnknownRelay(giaddr=giaddr):
                if self.relay_log.allow(str(giaddr), now):
                    log.warning("dhcp unknown-relay", **fields, relay=str(giaddr),
                                detail="relay address in no declared network: not answered")
            case Exhausted(node=node, network=network):
                if self.trouble_log.allow(f"exhausted:{network}", now):
                    log.warning("dhcp exhausted", **fields, **_node_fields(node),
                                network=network, detail="the catch-all ranges of this network"
                                " have no free address (logged once a minute)")
            case NotForUs(server_id=server, ip=ip):
                log.debug("dhcp not-for-us", **fields, ip=str(ip) if ip else None,
                          detail=f"client selected server {server}")
            case Dropped(reason=reason, node=node):
                log.debug("dhcp drop", **fields, **_node_fields(node), detail=reason)

    @staticmethod
    def _record(recorder: Recorder, request: DhcpPacket, outcome: Outcome, now: float) -> None:
        try:
            mac = request.mac
        except DhcpError:
            return

        def event(stage: str, node: NodeProfile | None, ip: IPv4Address | None,
                  result: str = "ok", **detail: object) -> None:
            # an unknown or catch-all machine is transient until it has an address
            transient = (node is None or node.dynamic) and stage != events.DHCP_ACK
            recorder.record(BootEvent(now, stage, node.name if node else None, mac,
                                      str(ip) if ip is not None else None,
                                      node.pool if node else None, result,
                                      MappingProxyType(detail)), transient)

        def firmware(boot: BootAnswer | None) -> str:
            if boot is not None:
                return boot.firmware.value
            return "unknown" if is_boot_client(request) else "os"

        match outcome:
            case UnknownMac():
                event(events.REFUSED, None, None, "refused", reason="unknown MAC (DHCP)")
            case WrongNetwork(node=node, seen_on=seen_on):
                event(events.REFUSED, node, None, "refused",
                      reason=f"node {node.name} seen on {seen_on}")
            case Offered(node=node, ip=ip, boot=boot):
                event(events.DHCP_DISCOVER, node, ip, firmware=firmware(boot),
                      vendor_class=request.vendor_class)
                event(events.DHCP_OFFER, node, ip, firmware=firmware(boot))
            case Exhausted(node=node):
                event(events.DHCP_DISCOVER, node, None, firmware=firmware(None),
                      vendor_class=request.vendor_class)
            case Acked(node=node, ip=ip, boot=boot, state=state):
                event(events.DHCP_ACK, node, ip, firmware=firmware(boot), state=str(state),
                      bootfile=boot.bootfile if boot is not None else None)
            case Nakked(node=node, ip=ip, reason=reason):
                event(events.DHCP_NAK, node, ip, "error", reason=reason)
            case Dropped(node=node) if node is not None and (
                    request.message_type is MessageType.DISCOVER):
                event(events.DHCP_DISCOVER, node, None, firmware=firmware(None),
                      vendor_class=request.vendor_class)


_OUTCOME_CLASSES = (Offered, Acked, Informed, Nakked, Released, Declined, UnknownMac,
                    WrongNetwork, UnknownRelay, Exhausted, NotForUs, Dropped)


def _node_fields(node: NodeProfile | None) -> dict[str, object]:
    return {"node": node.name, "pool": node.pool} if node is not None else {}


def _boot_fields(boot: BootAnswer | None) -> dict[str, object]:
    if boot is None:
        return {}
    return {"firmware": boot.firmware.value, "bootfile": boot.bootfile}

"""Cluster mode's pure parts: ownership, who answers, lease records, the lease table's
slice scan and remote writes, the config block, and the DHCP service's shared path
against a fake shared store (the real etcd is in tests/integration/test_cluster.py)."""

from __future__ import annotations

import asyncio
import textwrap
from collections import Counter
from collections.abc import Sequence
from ipaddress import IPv4Address
from pathlib import Path
from types import MappingProxyType

import pytest
from hypothesis import given
from hypothesis import strategies as st

from bootd.dhcp.decide import DhcpContext, DhcpSettings
from bootd.dhcp.options import Opt
from bootd.dhcp.packet import BOOTREQUEST, DhcpPacket, MessageType, decode, encode
from bootd.dhcp.service import DhcpService
from bootd.fleet.config import ConfigError, expand_env, parse_config
from bootd.fleet.directory import NodeDirectory
from bootd.fleet.inventory import Inventory
from bootd.fleet.mac import mac_to_bytes
from bootd.ops.metrics import Metrics
from bootd.state.cluster import (
    BadRecord,
    Membership,
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
from bootd.state.events import DHCP_ACK, DHCP_DISCOVER, DHCP_OFFER, JOINED, KERNEL, BootEvent
from bootd.state.leases import Lease, LeaseChange, LeaseDeleted, LeaseState, LeaseTable
from bootd.state.recorder import EventPolicy, Recorder
from bootd.state.store import Store

MEMBERS = ["cp1", "cp2", "cp3"]
MACS = [f"02:00:00:{i >> 16 & 0xff:02x}:{i >> 8 & 0xff:02x}:{i & 0xff:02x}"
        for i in range(3000)]


# -- ownership (rendezvous hashing)

def test_every_client_has_one_owner_and_the_load_is_spread() -> None:
    counts = Counter(owner(mac, MEMBERS) for mac in MACS)
    assert set(counts) == set(MEMBERS)
    assert all(800 <= n <= 1200 for n in counts.values()), counts
    assert owner(MACS[0], []) is None
    assert owner(MACS[0], ["solo"]) == "solo"


def test_ownership_does_not_depend_on_the_order_members_are_listed() -> None:
    for mac in MACS[:200]:
        assert owner(mac, MEMBERS) == owner(mac, list(reversed(MEMBERS)))


def test_a_member_leaving_moves_only_its_own_clients_and_spreads_them() -> None:
    before = {mac: owner(mac, MEMBERS) for mac in MACS}
    after = {mac: owner(mac, ["cp1", "cp3"]) for mac in MACS}
    moved = [mac for mac in MACS if before[mac] != after[mac]]
    assert all(before[mac] == "cp2" for mac in moved)
    assert len(moved) == sum(1 for o in before.values() if o == "cp2")
    spread = Counter(after[mac] for mac in moved)
    assert min(spread.values()) > len(moved) / 3
    # and when it comes back, exactly those move back
    assert {mac: owner(mac, MEMBERS) for mac in MACS} == before


@given(st.lists(st.from_regex(r"[a-z][a-z0-9]{0,8}", fullmatch=True), min_size=1,
                max_size=6, unique=True), st.sampled_from(MACS))
def test_the_owner_is_always_a_live_member(members: list[str], mac: str) -> None:
    assert owner(mac, members) in members


# -- who answers

def test_a_registered_member_answers_its_own_clients_and_those_that_waited_too_long() -> None:
    views = {m: Membership(m, tuple(MEMBERS), True, 4.0) for m in MEMBERS}
    for mac in MACS[:300]:
        answering = [m for m, v in views.items() if v.answers(mac, 0)]
        assert answering == [owner(mac, MEMBERS)]
        assert all(v.answers(mac, 4) for v in views.values())  # takeover
        assert [m for m, v in views.items() if v.answers(mac, 3)] == answering


def test_an_unregistered_member_answers_everyone_but_allocates_nothing() -> None:
    view = Membership("cp1", (), False, 4.0)
    assert all(view.answers(mac, 0) for mac in MACS[:100])
    assert not view.may_allocate()
    assert view.fresh_slice() == (0, 1)
    assert Membership("cp2", tuple(MEMBERS), True, 4.0).fresh_slice() == (1, 3)


# -- records in etcd

def test_lease_records_round_trip_and_bad_ones_are_refused() -> None:
    lease = Lease(IPv4Address("10.0.0.7"), MACS[1], LeaseState.BOUND, 1234.5, "node-x")
    key = lease_key("/bootd/", lease.ip)
    assert key == b"/bootd/leases/10.0.0.7"
    stored = decode_lease("/bootd/", key, encode_lease(lease, "cp2"))
    assert stored.lease == lease and stored.member == "cp2"
    no_name = Lease(lease.ip, lease.mac, LeaseState.OFFERED, 9.0)
    assert decode_lease("/bootd/", key, encode_lease(no_name, "cp1")).lease == no_name
    for bad_key, value in [
            (b"/other/leases/10.0.0.7", encode_lease(lease, "cp1")),
            (b"/bootd/leases/10.0.0.300", encode_lease(lease, "cp1")),
            (key, b"not json"), (key, b"[]"), (key, b'{"mac": "x"}'),
            (key, b'{"mac": "x", "state": "stolen", "expires": 1}'),
            (key, b'{"mac": "x", "state": "bound", "expires": "soon"}'),
            (b"\xff\xfe", b"{}")]:
        with pytest.raises(BadRecord):
            decode_lease("/bootd/", bad_key, value)


def test_member_keys() -> None:
    assert member_key("/bootd/", "cp1") == b"/bootd/members/cp1"
    assert member_of("/bootd/", b"/bootd/members/cp1") == "cp1"
    assert member_of("/bootd/", b"/bootd/members/") is None
    assert member_of("/bootd/", b"/bootd/leases/10.0.0.1") is None


# -- the lease table's side of it

def ip(n: int) -> IPv4Address:
    return IPv4Address(f"10.0.0.{n}")


def test_each_member_scans_from_its_own_slice_and_wraps_round() -> None:
    tables = [LeaseTable(ip(10), ip(39)) for _ in MEMBERS]
    for k, t in enumerate(tables):
        t.scan_from(k, 3)
    firsts = [t.offer(MACS[k], 0) for k, t in enumerate(tables)]
    assert firsts == [ip(10), ip(20), ip(30)]
    last = tables[2]
    got = [last.offer(mac, 0) for mac in MACS[10:39]]  # the other 29 addresses
    assert got[:9] == [ip(n) for n in range(31, 40)]
    assert got[9:] == [ip(n) for n in range(10, 30)]  # wrapped round to the start
    assert last.offer(MACS[99], 0) is None  # one lap and nothing fresh is left


def test_a_new_lap_skips_what_is_held_and_finds_what_was_freed() -> None:
    t = LeaseTable(ip(10), ip(13))
    for mac in MACS[:4]:
        t.offer(mac, 0)
    t.apply_remote(ip(12), None)  # another member deleted it
    t.scan_from(1, 2)
    assert t.offer(MACS[9], 0) == ip(12)


def test_offers_are_queued_in_cluster_mode_only() -> None:
    plain, shared = LeaseTable(ip(10), ip(13)), LeaseTable(ip(10), ip(13),
                                                           durable_offers=True)
    assert plain.offer(MACS[0], 0) == shared.offer(MACS[0], 0)
    assert plain.pending() == 0
    assert [c.state for c in shared.drain_changes() if isinstance(c, Lease)] == [
        LeaseState.OFFERED]


def test_remote_writes_update_the_table_without_being_queued() -> None:
    t = LeaseTable(ip(10), ip(13), [ip(11)])
    theirs = Lease(ip(10), MACS[5], LeaseState.BOUND, 100.0)
    t.apply_remote(ip(10), theirs)
    assert t.holder(ip(10)) == theirs and t.lookup(MACS[5]) == theirs
    assert not t.is_free_for(ip(10), MACS[6], 50.0)
    assert t.offer(MACS[6], 50.0) == ip(12)  # skips theirs and the reserved one
    t.drain_changes()
    t.apply_remote(ip(11), Lease(ip(11), MACS[7], LeaseState.BOUND, 100.0))  # reserved
    t.apply_remote(ip(99), Lease(ip(99), MACS[7], LeaseState.BOUND, 100.0))  # not ours
    assert t.holder(ip(11)) is None and t.holder(ip(99)) is None
    t.apply_remote(ip(10), None)
    assert t.holder(ip(10)) is None and t.lookup(MACS[5]) is None
    assert t.pending() == 0


# -- config

BASE = textwrap.dedent("""\
    server: {interfaces: [br0], address: 10.0.0.1}
    network: {subnet: 10.0.0.0/24}
    pools:
      - name: any
        dynamic: {range: 10.0.0.100-10.0.0.110}
    """)


def test_cluster_block_defaults() -> None:
    cfg = parse_config(BASE + "cluster: {member: cp1, etcd: {endpoints: "
                       "[http://10.0.0.11:2379, 'http://etcd-b:2379/']}}\n")
    assert cfg.cluster is not None
    assert cfg.cluster.etcd.endpoints == ["http://10.0.0.11:2379", "http://etcd-b:2379"]
    assert cfg.cluster.etcd.prefix == "/bootd/" and cfg.cluster.member_ttl == 5.0
    assert cfg.cluster.takeover_after == 4.0
    assert parse_config(BASE).cluster is None


@pytest.mark.parametrize(("block", "message"), [
    ("{etcd: {endpoints: []}}", "at least 1"),
    ("{etcd: {endpoints: [10.0.0.11:2379]}}", "http(s)://host:port"),
    ("{etcd: {endpoints: ['http://a:2379', 'https://b:2379'], tls: {ca: /x}}}", "mix"),
    ("{etcd: {endpoints: ['https://a:2379']}}", "need `tls`"),
    ("{etcd: {endpoints: ['http://a:2379'], tls: {ca: /x}}}", "need `tls`"),
    ("{etcd: {endpoints: ['https://a:2379'], tls: {ca: /x, cert: /y}}}", "both cert and key"),
    ("{etcd: {endpoints: ['http://a:2379'], prefix: bootd}}", "start and end with '/'"),
    ("{member: CP1, etcd: {endpoints: ['http://a:2379']}}", "lower case"),
    ("{etcd: {endpoints: ['http://a:2379']}, member_ttl: 0s}", "positive"),
    ("{etcd: {endpoints: ['http://a:2379']}, members: 3}", "Extra inputs"),
])
def test_bad_cluster_blocks_are_refused_with_a_reason(block: str, message: str) -> None:
    with pytest.raises(ConfigError) as caught:
        parse_config(BASE + f"cluster: {block}\n")
    assert message in str(caught.value)


def test_tls_files_must_exist(tmp_path: Path) -> None:
    ca = tmp_path / "ca.crt"
    ca.write_text("x")
    text = BASE + (f"cluster: {{etcd: {{endpoints: ['https://a:2379'], tls: {{ca: {ca}, "
                   f"cert: {tmp_path}/no.crt, key: {tmp_path}/no.key}}}}}}\n")
    with pytest.raises(ConfigError) as caught:
        parse_config(text)
    assert "no such file" in str(caught.value) and "cluster.etcd.tls.cert" in str(caught.value)


# -- the DHCP service's shared path

CONFIG = BASE + """\
  - name: w
    nodes: [{name: n1, mac: "02:00:00:00:00:01", ip: 10.0.0.5}]
"""


class FakeShared:
    def __init__(self, view: Membership, results: Sequence[bool] = ()) -> None:
        self.view = view
        self.results = list(results)
        self.claimed: list[list[LeaseChange]] = []

    def membership(self) -> Membership:
        return self.view

    async def claim(self, changes: Sequence[LeaseChange]) -> bool:
        self.claimed.append(list(changes))
        return self.results.pop(0) if self.results else True


def shared_service(tmp: Path, shared: FakeShared) -> DhcpService:
    cfg = parse_config(CONFIG)
    ctx = DhcpContext(NodeDirectory.build(Inventory(cfg), shared=True),
                      DhcpSettings.from_config(cfg))
    return DhcpService(lambda: ctx, Store(tmp / "s.sqlite3"), Metrics(), None, shared)


def discover(mac: str, secs: int = 0) -> bytes:
    return encode(DhcpPacket(op=BOOTREQUEST, xid=7, secs=secs, chaddr=mac_to_bytes(mac),
                             flags=0x8000,
                             options={Opt.MESSAGE_TYPE: bytes((MessageType.DISCOVER,))}))


def test_only_the_owner_answers_and_an_offer_is_claimed_first(tmp_path: Path) -> None:
    mine = next(m for m in MACS if owner(m, MEMBERS) == "cp1")
    theirs = next(m for m in MACS if owner(m, MEMBERS) == "cp2")
    shared = FakeShared(Membership("cp1", tuple(MEMBERS), True, 4.0))
    svc = shared_service(tmp_path, shared)
    assert svc.answers(discover(mine)) and not svc.answers(discover(theirs))
    assert svc.answers(discover(theirs, secs=4))  # waited too long: taken over
    assert svc.answers(b"short")  # left to decode, which counts it as malformed
    replies = asyncio.run(svc.handle_batch_shared([discover(mine)], "br0", 0.0))
    assert [decode(r.payload).message_type for r in replies] == [MessageType.OFFER]
    [changes] = shared.claimed
    assert [(c.mac, c.state) for c in changes if isinstance(c, Lease)] == [
        (mine, LeaseState.OFFERED)]


def test_a_lost_claim_withholds_the_reply_but_not_a_reserved_nodes(tmp_path: Path) -> None:
    shared = FakeShared(Membership("cp1", tuple(MEMBERS), True, 4.0), results=[False])
    svc = shared_service(tmp_path, shared)
    batch = [discover(MACS[40]), discover("02:00:00:00:00:01")]
    replies = asyncio.run(svc.handle_batch_shared(batch, "br0", 0.0))
    assert [decode(r.payload).yiaddr for r in replies] == [IPv4Address("10.0.0.5")]
    assert len(shared.claimed) == 1
    # not queued again: the next claim holds only what the next batch decided
    asyncio.run(svc.handle_batch_shared([discover(MACS[41])], "br0", 1.0))
    assert [c.mac for c in shared.claimed[1] if isinstance(c, Lease)] == [MACS[41]]


def test_an_unregistered_member_claims_nothing_and_answers_reserved_nodes(
        tmp_path: Path) -> None:
    shared = FakeShared(Membership("cp1", (), False, 4.0))
    svc = shared_service(tmp_path, shared)
    batch = [discover(MACS[50]), discover("02:00:00:00:00:01")]
    replies = asyncio.run(svc.handle_batch_shared(batch, "br0", 0.0))
    assert [decode(r.payload).yiaddr for r in replies] == [IPv4Address("10.0.0.5")]
    assert shared.claimed == []


def test_deletes_are_claimed_too(tmp_path: Path) -> None:
    """A client that moves to another address deletes its old record: a LeaseDeleted
    goes to the shared store like any other change."""
    t = LeaseTable(ip(10), ip(13), durable_offers=True)
    t.bind(MACS[0], ip(10), 0.0, 60.0)
    t.bind(MACS[0], ip(11), 1.0, 60.0)
    assert LeaseDeleted(ip(10)) in t.drain_changes()


# -- the shared fleet view (cluster rule 7)

def event(ts: float, stage: str, member: str, **detail: object) -> BootEvent:
    return BootEvent(ts, stage, "n1", "02:00:00:00:00:01", "10.0.0.5", "w", "ok",
                     MappingProxyType({**detail, "served_by": member}))


def recorder() -> Recorder:
    return Recorder(None, EventPolicy(stall_after=600, keep_attempts=3))


def test_timelines_round_trip_and_bad_ones_are_refused() -> None:
    events = [event(1.0, DHCP_DISCOVER, "cp1", firmware="bios"), event(1.5, DHCP_ACK, "cp1")]
    assert decode_timeline(encode_timeline(events)) == events
    assert node_key("/bootd/", "n1") == b"/bootd/nodes/n1"
    assert node_of("/bootd/", b"/bootd/nodes/n1") == "n1"
    assert node_of("/bootd/", b"/bootd/leases/10.0.0.1") is None
    for bad in (b"{}", b"nope", b'[{"ts": 1}]', b'[{"ts": 1, "stage": "hacked", "node": null}]',
                b'[{"ts": 1, "stage": "dhcp-ack", "node": null, "detail": []}]'):
        with pytest.raises(BadRecord):
            decode_timeline(bad)


def test_a_member_records_with_its_name_and_hears_of_news() -> None:
    r = recorder()
    news: list[str] = []
    r.member, r.on_record = "cp1", news.append
    r.record(BootEvent(1.0, DHCP_DISCOVER, None, "02:00:00:00:00:99"), transient=True)
    r.record(event(2.0, DHCP_DISCOVER, "x"))
    assert news == ["n1"]  # an unknown machine without an address is not shared
    [shared] = r.timeline("n1", 2, 100)
    assert shared.detail["served_by"] == "cp1"


def test_merging_another_members_timeline_gives_the_whole_boot() -> None:
    mine, theirs = recorder(), recorder()
    for e in (event(1.0, DHCP_DISCOVER, "cp1", firmware="bios"), event(1.1, DHCP_OFFER, "cp1"),
              event(1.2, DHCP_ACK, "cp1")):
        mine.record(e)
    for e in (event(5.0, KERNEL, "cp2"), event(9.0, JOINED, "cp2")):
        theirs.record(e)
    added, ours_only = mine.merge("n1", theirs.timeline("n1", 2, 100))
    assert added and ours_only  # cp2 lacks the DHCP steps: cp1 must write the union
    state = mine.state("n1")
    assert state is not None and state.stage == JOINED and state.attempts == 1
    assert [e.stage for e in mine.timeline("n1", 2, 100)] == [
        DHCP_DISCOVER, DHCP_OFFER, DHCP_ACK, KERNEL, JOINED]
    # the union comes back: nothing new, nothing missing
    assert mine.merge("n1", mine.timeline("n1", 2, 100)) == (False, False)
    added, ours_only = theirs.merge("n1", mine.timeline("n1", 2, 100))
    assert added and not ours_only
    assert theirs.timeline("n1", 2, 100) == mine.timeline("n1", 2, 100)


def test_shared_timelines_are_bounded() -> None:
    r = recorder()
    for boot in range(5):  # five finished boots
        r.record(event(100.0 * boot, DHCP_DISCOVER, "cp1", firmware="bios"))
        r.record(event(100.0 * boot + 9, JOINED, "cp1"))
    assert len(r.timeline("n1", 2, 100)) == 4  # the last two attempts
    assert len(r.timeline("n1", 2, 3)) == 3
    merged = recorder()  # keeps 3 attempts: merging 4 keeps the last 3
    merged.merge("n1", [*r.timeline("n1", 3, 100),
                        event(1000.0, DHCP_DISCOVER, "cp2", firmware="bios")])
    assert [e.ts for e in merged.timeline("n1", 99, 1000)] == [300, 309, 400, 409, 1000]


def test_failover_order_starts_with_the_owner_and_follows_the_next_owners() -> None:
    for mac in MACS[:200]:
        order = ranked(mac, MEMBERS)
        assert sorted(order) == sorted(MEMBERS) and order[0] == owner(mac, MEMBERS)
        assert order[1] == owner(mac, [m for m in MEMBERS if m != order[0]])


def test_env_references_fill_in_what_differs_per_member() -> None:
    text = "a: ${env:NODE_NAME}\nb: ${X} stays shell's\nc: ${env:NODE_IP}/${env:NODE_IP}\n"
    assert expand_env(text, "f.yaml", {"NODE_NAME": "cp1", "NODE_IP": "10.0.0.1"}) == (
        "a: cp1\nb: ${X} stays shell's\nc: 10.0.0.1/10.0.0.1\n")
    with pytest.raises(ConfigError) as caught:
        expand_env(text, "f.yaml", {"NODE_NAME": "cp1"})
    [issue] = caught.value.issues
    assert (issue.file, issue.line) == ("f.yaml", 3) and "NODE_IP is not set" in issue.message


def test_members_serving_other_files_of_an_image_are_not_named_as_fallbacks() -> None:
    import time as clock

    from structlog.testing import capture_logs

    from bootd.state.etcd import EtcdCluster, MemberInfo

    cfg = parse_config(BASE + "cluster: {member: cp1, etcd: {endpoints: "
                       "['http://10.0.0.11:2379']}}\n").cluster
    assert cfg is not None
    cluster = EtcdCluster(cfg, Metrics(), lambda: None, address="10.0.0.1", http_port=8080)
    build = {"kernel": "k1", "initrd": "i1", "rootfs": "r1"}
    cluster._images = {"node": build}
    cluster._members = {
        "cp1": MemberInfo("cp1", "10.0.0.1", 8080, 0.0, {"node": build}),
        "cp2": MemberInfo("cp2", "10.0.0.2", 8080, 0.0, {"node": build}),
        "cp3": MemberInfo("cp3", "10.0.0.3", 8080, 0.0, {"node": {**build, "initrd": "i2"}}),
        "cp4": MemberInfo("cp4", "10.0.0.4", 8080, 0.0, {}),  # not said yet
    }
    cluster._alive_until = clock.monotonic() + 60
    mac = MACS[0]
    order = [m for m in ranked(mac, ["cp1", "cp2", "cp3", "cp4"]) if m != "cp1"]
    every = tuple(f"http://10.0.0.{m[2]}:8080" for m in order)
    with capture_logs() as logs:
        assert cluster.peer_urls(mac, "node") == ("http://10.0.0.2:8080",)
        cluster.peer_urls(MACS[1], "node")  # logged once, not per script
    assert [(e["member"], e["parts"]) for e in logs] == [("cp3", ["initrd"])]
    assert cluster.peer_urls(mac, None) == every  # no image: nothing to compare
    cluster._images = {}  # this member's digests are not known yet: no judgement
    assert cluster.peer_urls(mac, "node") == every
    cluster._images = {"node": build}
    assert cluster.image_differences() == {"cp3": ["node"], "cp4": ["node"]}
    cluster._alive_until = 0.0  # unregistered: no peers at all
    assert cluster.peer_urls(mac, "node") == ()

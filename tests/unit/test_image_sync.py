"""Cluster mode's image versions and rollouts over a shared store: the pure parts
(records, sync plans, takeover) and the shells (bootd/fleet/imagesync.py,
bootd/power/rollouts.py's SharedBook) over an in-memory stand-in for etcd that keeps its
compare-and-swap semantics and lets each member's mirror lag until it is delivered. The
real etcd, real BMCs and three real members: tests/integration/test_cluster_rollout.py."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterable, Mapping
from dataclasses import replace
from ipaddress import IPv4Address
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import orjson
import pytest

from bootd.fleet.config import IpmiConfig, PowerConfig, SecretConfig
from bootd.fleet.images import version_id
from bootd.fleet.imagestore import ImageStore, ImageStoreError, Pointers, VersionInfo
from bootd.fleet.imagesync import SharedImages
from bootd.fleet.inventory import NodeProfile
from bootd.power import rollout as ro
from bootd.power.bmc import PowerResult
from bootd.power.rollouts import RolloutError, Rollouts, SharedBook
from bootd.state.cluster import (
    BadRecord,
    Fetch,
    VersionRecord,
    decode_pointers,
    decode_version,
    encode_pointers,
    encode_version,
    image_key_of,
    image_pointers_key,
    image_version_key,
    sync_plan,
)
from bootd.state.etcd import NotRegistered

PREFIX = "/bootd/"


def info(name: str = "k8s", tag: str = "a", added: float = 100.0) -> VersionInfo:
    digests = {"kernel": tag * 64, "initrd": "b" * 64}
    return VersionInfo(name, version_id(digests, "quiet"), added, "quiet",
                       {"kernel": 10, "initrd": 20}, digests)


# ---------------------------------------------------------------------------- records


def test_version_records_round_trip_and_refuse_forgeries() -> None:
    record = VersionRecord(info(), "b1")
    value = encode_version(record)
    assert decode_version("k8s", record.info.version, value) == record
    pruned = replace(record, pruned=200.0)
    assert decode_version("k8s", record.info.version, encode_version(pruned)) == pruned
    # a record whose name is not its content would let a member serve other files
    with pytest.raises(BadRecord, match="does not name its content"):
        decode_version("k8s", "0123456789ab", value)
    doc = orjson.loads(value)
    for broken in (b"{not json", b"[]", orjson.dumps({**doc, "files": {}}),
                   orjson.dumps({**doc, "files": {"bzImage": {"sha256": "x", "size": 1}}}),
                   orjson.dumps({**doc, "added": "soon"}),
                   orjson.dumps({k: v for k, v in doc.items() if k != "cmdline"})):
        with pytest.raises(BadRecord):
            decode_version("k8s", record.info.version, broken)


def test_pointer_records_and_keys() -> None:
    ptr = Pointers("v2", ("v1",), {"w": "v3"})
    assert decode_pointers("k8s", encode_pointers(ptr)) == ptr
    for broken in (b"", b"[1]", b'{"previous": 3}'):
        with pytest.raises(BadRecord):
            decode_pointers("k8s", broken)
    assert image_key_of(PREFIX, image_pointers_key(PREFIX, "k8s")) == ("k8s", None)
    assert image_key_of(PREFIX, image_version_key(PREFIX, "k8s", "v1")) == ("k8s", "v1")
    for other in (b"/bootd/images/k8s", b"/bootd/images/a/b/pointers",
                  b"/bootd/images/k8s/versions/", b"/bootd/leases/10.0.0.1",
                  b"/other/images/k8s/pointers"):
        assert image_key_of(PREFIX, other) is None


def test_pointer_arithmetic_is_the_single_instance_one() -> None:
    ptr = Pointers().promote("v1").promote("v2").with_pool("w", "v3")
    assert ptr == Pointers("v2", ("v1",), {"w": "v3"})
    assert ptr.promote("v2") == Pointers("v2", ("v1",), {})  # a promote resets rollouts
    assert ptr.with_pool("w", None).pools == {}
    assert ptr.held() == {"v1", "v2", "v3"}
    assert ptr.rollback({"v1", "v2"}, "k8s") == Pointers("v1", (), {})
    with pytest.raises(ImageStoreError, match="no earlier"):
        ptr.rollback({"v2"}, "k8s")  # v1 is gone: nothing to return to
    history = Pointers()
    for i in range(30):
        history = history.promote(f"v{i}")
    assert len(history.previous) == 20 and history.previous[-1] == "v28"


# ---------------------------------------------------------------------------- sync plans


def test_sync_plan_publishes_deletes_fetches_and_strands() -> None:
    old, new, gone, back = info(tag="1"), info(tag="2"), info(tag="3"), info(tag="4")
    records = {"k8s": {
        old.version: VersionRecord(old, "b1"),
        new.version: VersionRecord(new, "b2"),
        gone.version: VersionRecord(gone, "b1", pruned=150.0),
        back.version: VersionRecord(back, "b1", pruned=150.0)}}
    mine = info(name="gpu", tag="5")
    local = {"k8s": {old.version: 100.0, gone.version: 100.0, back.version: 160.0},
             "gpu": {mine.version: 100.0}}
    holders = {("k8s", new.version): ["b3", "b2", "b1"]}
    plan = sync_plan("b1", local, records, holders)
    # unknown to the cluster, or added again after its pruning: published
    assert set(plan.publish) == {("gpu", mine.version), ("k8s", back.version)}
    assert plan.delete == (("k8s", gone.version),)  # a copy from before the pruning
    # fetched from its adder first, never from this member
    assert plan.fetch == (Fetch("k8s", new.version, ("b2", "b3")),)
    assert plan.stranded == ()
    assert sync_plan("b1", local, records, {}).stranded == (("k8s", new.version),)
    assert sync_plan("b2", {"k8s": {new.version: 1.0}}, records,
                     {("k8s", old.version): ["b1"]}).fetch == (
        Fetch("k8s", old.version, ("b1",)),)


# ---------------------------------------------------------------------------- takeover


def rollout_of(states: Iterable[tuple[str, bool]], runner: str | None = "b1") -> ro.Rollout:
    spec = ro.RolloutSpec("w", "k8s", "v2", "v1", ("n1", "n2", "n3"), max_unavailable=2)
    nodes = tuple(ro.NodeProgress(f"n{i}", state, 0, 10.0, None, powered)
                  for i, (state, powered) in enumerate(states, 1))
    return ro.Rollout("r1", spec, ro.RUNNING, nodes, 0, 0.0, 10.0, runner=runner)


def test_a_takeover_cycles_again_only_what_no_bmc_confirmed() -> None:
    r = rollout_of([(ro.BOOTING, True), (ro.BOOTING, False), (ro.WAITING, False)])
    r2, cmds = ro.taken_over(r, "b2", 50.0)
    assert r2.runner == "b2"
    assert [n.since for n in r2.nodes] == [10.0, 50.0, 10.0]  # n2's deadline restarts
    assert [c for c in cmds if isinstance(c, ro.PowerPxe)] == [ro.PowerPxe("n2", "rollout")]
    assert "b2 took over the rollout from b1; cycling n2" in r2.log[-1][1]
    assert "drives the rollout again" in ro.taken_over(r, "b1", 50.0)[0].log[-1][1]
    assert ro.taken_over(rollout_of([], None), "b3", 1.0)[0].log[-1][1] == \
        "b3 drives the rollout"
    done = replace(r, phase=ro.COMPLETED, nodes=())
    assert ro.taken_over(done, "b2", 50.0) == (done, [])
    assert ro.Rollout.from_json(r2.to_json()) == r2
    legacy = r.to_json()
    del legacy["runner"]  # a rollouts.json from before cluster mode had rollouts
    assert ro.Rollout.from_json(legacy).runner is None


def test_a_halt_makes_reverts_unconfirmed_and_stale_bmc_answers_change_nothing() -> None:
    r = rollout_of([(ro.BOOTING, True), (ro.WAITING, False), (ro.WAITING, False)])
    r = replace(r, nodes=(replace(r.nodes[0], wave=0), *r.nodes[1:]))
    halted, _ = ro.observe(r, ro.NodeSeen("n1", "failed", "k8s@v2", 20.0), 20.0)
    assert halted.phase == ro.HALTED
    n1 = halted.node("n1")
    assert n1 is not None and n1.state == ro.REVERTING and n1.since == 20.0
    assert not n1.powered  # its revert's cycle is not confirmed by the rollout's one
    # the BMC's answer to the rollout's cycle (since 10.0) arrives late: ignored
    assert ro.power_done(halted, "n1", True, None, 21.0, since=10.0) == (halted, [])
    confirmed, _ = ro.power_done(halted, "n1", True, None, 21.0, since=20.0)
    assert confirmed.node("n1").powered  # type: ignore[union-attr]


# ---------------------------------------------------------------------------- the shells


class FakeEtcd:
    """One etcd: keys with mod revisions, compare-and-swap, leases by member."""

    def __init__(self) -> None:
        self.kv: dict[bytes, tuple[bytes, int]] = {}
        self.revision = 0
        self.members: dict[str, FakeMember] = {}
        self.leased: dict[bytes, str] = {}


class FakeMember:
    """What imagesync and SharedBook use of EtcdCluster. The mirror is updated on this
    member's own writes and lost races (as the real one), and otherwise only when
    `deliver` is called (a watch that lags)."""

    prefix = PREFIX

    def __init__(self, etcd: FakeEtcd, me: str) -> None:
        self.etcd, self.me = etcd, me
        self._kv: dict[bytes, tuple[bytes, int]] = {}
        self._listeners: list[Callable[[bytes], None]] = []
        self.versions: dict[str, list[str]] = {}
        self.registered = True
        etcd.members[me] = self
        self.url = f"http://{me}"

    def key(self, relative: str) -> bytes:
        return f"{self.prefix}{relative}".encode()

    def shared(self, key: bytes) -> tuple[bytes, int] | None:
        return self._kv.get(key)

    def shared_items(self, relative: str) -> list[tuple[bytes, bytes, int]]:
        start = self.key(relative)
        return [(k, v, r) for k, (v, r) in self._kv.items() if k.startswith(start)]

    def on_shared_change(self, listener: Callable[[bytes], None]) -> None:
        self._listeners.append(listener)

    def deliver(self, keys: Iterable[bytes] | None = None) -> None:
        for key in list(keys if keys is not None else {*self._kv, *self.etcd.kv}):
            before, now = self._kv.get(key), self.etcd.kv.get(key)
            if now is None:
                self._kv.pop(key, None)
            else:
                self._kv[key] = now
            if before != now:
                for listener in self._listeners:
                    listener(key)

    async def cas(self, writes: Mapping[bytes, bytes | None],
                  expect: Mapping[bytes, int] | None = None,
                  leased: frozenset[bytes] = frozenset()) -> bool:
        if not self.registered:
            raise NotRegistered("no session")
        compare = {k: self._kv.get(k, (b"", 0))[1] for k in writes}
        compare.update(expect or {})
        if all(self.etcd.kv.get(k, (b"", 0))[1] == rev for k, rev in compare.items()):
            self.etcd.revision += 1
            for key, value in writes.items():
                if value is None:
                    self.etcd.kv.pop(key, None)
                else:
                    self.etcd.kv[key] = (value, self.etcd.revision)
                if key in leased:
                    self.etcd.leased[key] = self.me
            self.deliver(writes)
            return True
        self.deliver(compare)
        return False

    def membership(self) -> Any:
        return SimpleNamespace(registered=self.registered,
                               members=tuple(sorted(self.etcd.members)))

    def holders(self, name: str, version: str) -> list[str]:
        return [m for m, member in sorted(self.etcd.members.items())
                if version in member.versions.get(name, ())]

    def member(self, name: str) -> Any:
        return self.etcd.members.get(name)

    async def advertise_versions(self, held: dict[str, list[str]]) -> None:
        self.versions = held

    def die(self) -> None:
        """Its lease expires: its leased keys go, the others hear of it."""
        self.registered = False
        del self.etcd.members[self.me]
        for key, owner in list(self.etcd.leased.items()):
            if owner == self.me:
                self.etcd.kv.pop(key, None)
                del self.etcd.leased[key]
        for other in self.etcd.members.values():
            other.deliver()


def build(tmp: Path, tag: str) -> Path:
    out = tmp / f"build-{tag}"
    out.mkdir()
    (out / "vmlinuz").write_bytes(b"kernel " + tag.encode())
    (out / "initrd.img").write_bytes(b"initrd " + tag.encode())
    return out


def member(etcd: FakeEtcd, tmp: Path, name: str) -> tuple[FakeMember, SharedImages]:
    cluster = FakeMember(etcd, name)
    return cluster, SharedImages(cluster, ImageStore(tmp / name / "images"))  # type: ignore[arg-type]


def test_versions_are_published_promoted_and_pruned_through_the_shared_store(
        tmp_path: Path) -> None:
    async def scenario() -> None:
        etcd = FakeEtcd()
        a, images_a = member(etcd, tmp_path, "b1")
        b, images_b = member(etcd, tmp_path, "b2")
        v1 = images_a.store.add("k8s", build(tmp_path, "1"), own_pointers=False).version
        assert not (images_a.store.root / "k8s" / "pointers.json").exists()  # etcd's
        assert await images_a.publish("k8s", v1) is True  # the image's first: promoted
        assert await images_a.publish("k8s", v1) is False  # once
        b.deliver()
        # b2 has no copy yet: v1 is remote there, named by its record's digests
        catalog = images_b.store.catalog({}, images_b.catalog())
        image = catalog.resolve("k8s", "w")
        assert image is not None and image.remote and image.version == v1
        assert image.digests == images_a.store.info("k8s", v1).digests  # type: ignore[union-attr]
        assert catalog.files("k8s", v1) is None and catalog.all_files() == []

        v2 = images_a.store.add("k8s", build(tmp_path, "2"), own_pointers=False).version
        assert await images_a.publish("k8s", v2) is False  # later ones wait for promote
        a.versions = {"k8s": [v1, v2]}
        b.deliver()
        with pytest.raises(ImageStoreError, match="not on b2 yet"):
            await images_b.promote("k8s", v2)  # b2 could not serve it
        b.versions = {"k8s": [v1, v2]}
        await images_b.promote("k8s", v2)
        # b1's mirror is stale: its rollout pointer loses the race, is decided again on
        # what won, and keeps b2's promote
        ptr = await images_a.update_pointers("k8s", lambda p, _: p.with_pool("w", v1))
        assert ptr == Pointers(v2, (v1,), {"w": v1})
        assert decode_pointers("k8s", etcd.kv[image_pointers_key(PREFIX, "k8s")][0]) == ptr

        # prune: v3 is held by nothing; v1 and v2 by the pointers
        v3 = images_a.store.add("k8s", build(tmp_path, "3"), own_pointers=False).version
        await images_a.publish("k8s", v3)
        b.deliver()
        assert await images_b.prune("k8s", keep=0, in_use=set()) == [v3]
        a.deliver()
        assert v3 not in images_a.live_versions("k8s")
        assert images_a.records()["k8s"][v3].pruned is not None  # a tombstone
        local = {"k8s": {v: 1.0 for v in (v1, v2, v3)}}
        plan = sync_plan("b1", local, images_a.records(), {})
        assert plan.delete == (("k8s", v3),) and plan.publish == ()
        # a bad record in etcd is left out, not fatal
        etcd.kv[image_version_key(PREFIX, "k8s", "0123456789ab")] = (b"{}", 99)
        a.deliver()
        assert set(images_a.live_versions("k8s")) == {v1, v2}
        a.registered = False
        with pytest.raises(NotRegistered):
            await images_a.promote("k8s", v1)

    asyncio.run(scenario())


class FakePower:
    def __init__(self) -> None:
        self.asked: list[str] = []

    async def one(self, target: Any, action: str) -> PowerResult:
        self.asked.append(target.node)
        return PowerResult(target.node, "pxe", True, "on", None, 0.0)


def test_a_rollout_is_shared_driven_by_one_member_and_taken_over(tmp_path: Path) -> None:
    power = PowerConfig(ipmi=IpmiConfig(host="10.0.9.{ip_last}", username="a",
                                        password=SecretConfig(value="p")))
    nodes = [NodeProfile(f"n{i}", (f"02:00:00:00:00:0{i}",), IPv4Address(f"10.0.0.{i}"),
                         "w", image="k8s", power=power) for i in (1, 2, 3)]
    seen: dict[str, ro.NodeSeen] = {}
    clock = [1000.0]

    async def scenario() -> None:
        etcd = FakeEtcd()
        members = {}
        for name in ("b1", "b2", "b3"):
            cluster, images = member(etcd, tmp_path, name)
            fake = FakePower()
            shell = Rollouts(SharedBook(cluster, images),  # type: ignore[arg-type]
                             pool_nodes=lambda pool: nodes, seen=seen.get,
                             record=lambda *a: None,
                             power=fake, clock=lambda: clock[0])  # type: ignore[arg-type]
            members[name] = (cluster, images, shell, fake)
        b1, images1, shell1, power1 = members["b1"]
        b2, _, shell2, power2 = members["b2"]
        b3, _, shell3, _ = members["b3"]
        v1 = images1.store.add("k8s", build(tmp_path, "1"), own_pointers=False).version
        await images1.publish("k8s", v1)
        v2 = images1.store.add("k8s", build(tmp_path, "2"), own_pointers=False).version
        await images1.publish("k8s", v2)
        for cluster, *_ in members.values():
            cluster.versions = {"k8s": [v1, v2]}
            cluster.deliver()

        # started on b3; b1 claims the runner and powers the canary
        r = await shell3.start("w", f"k8s@{v2}", max_unavailable=2)
        assert r.runner is None and power1.asked == []
        pointers = decode_pointers("k8s", etcd.kv[image_pointers_key(PREFIX, "k8s")][0])
        assert pointers.pools == {"w": v2}  # in the same transaction as the rollout
        with pytest.raises(RolloutError, match="running"):
            await shell2.start("w", f"k8s@{v2}")  # b2's mirror is stale: CAS, then refused
        b1.deliver()
        await shell1.round()
        await asyncio.sleep(0)  # the BMC answers
        await asyncio.sleep(0)
        assert power1.asked == ["n1"]
        b2.deliver()
        await shell2.round()  # not the runner: it neither ticks nor powers
        assert power2.asked == []
        assert shell2.status()["runner"] == "b1"
        current = shell2.current
        assert current is not None and current.runner == "b1"
        assert current.node("n1").powered  # type: ignore[union-attr]

        # b1 dies; b2 takes over, leaves the confirmed canary alone, finishes the wave
        b1.die()
        clock[0] += 5
        await shell2.round()
        current = shell2.current
        assert current is not None and current.runner == "b2"
        assert "b2 took over the rollout from b1" in current.log[-1][1]
        assert power2.asked == []
        seen["n1"] = ro.NodeSeen("n1", "joined", f"k8s@{v2}", clock[0])
        await shell2.round()
        await asyncio.sleep(0)
        await asyncio.sleep(0)
        assert sorted(power2.asked) == ["n2", "n3"]
        # pause from b3, which does not drive it: b2 sees it on its next round
        b3.deliver()
        paused = await shell3.pause()
        assert paused.phase == ro.PAUSED
        for name in ("n2", "n3"):
            seen[name] = ro.NodeSeen(name, "joined", f"k8s@{v2}", clock[0] + 1)
        b2.deliver()
        await shell2.round()
        assert shell2.current.phase == ro.PAUSED  # type: ignore[union-attr]
        await shell3.resume()
        b2.deliver()
        await shell2.round()
        done = shell2.current
        assert done is not None and done.phase == ro.COMPLETED

        # the next rollout archives this one (history in etcd)
        clock[0] += 10  # the nodes' joins on v2 are older than its power cycles
        b3.deliver()
        r2 = await shell3.start("w", f"k8s@{v1}")
        assert [h["id"] for h in shell3.status()["history"]] == [done.id]
        assert r2.runner is None  # b3 does not drive: the runner takes it over first
        b2.deliver()
        await shell2.round()
        await asyncio.sleep(0)
        await asyncio.sleep(0)
        current = shell2.current
        assert current is not None and current.id == r2.id and current.runner == "b2"
        assert any(m.startswith("b2 drives the rollout; cycling n1") for _, m in current.log)
        assert power2.asked.count("n1") == 1

    asyncio.run(scenario())


def test_a_version_is_fetched_from_a_member_and_checked_against_its_record(
        tmp_path: Path) -> None:
    """Rule 4 of imagesync: a member that serves other bytes (a disk that lied, a hostile
    peer) is not believed; the next round tries again, and the right bytes are kept."""
    from aiohttp import ClientSession, web
    from aiohttp.test_utils import TestServer

    served: dict[str, bytes] = {}

    async def part(request: web.Request) -> web.Response:
        body = served.get(request.match_info["part"])
        return web.Response(body=body) if body is not None else web.Response(status=404)

    async def scenario() -> None:
        app = web.Application()
        app.router.add_get("/images/{name}/{version}/{part}", part)
        server = TestServer(app, host="127.0.0.1")
        await server.start_server()
        etcd = FakeEtcd()
        adder, images_adder = member(etcd, tmp_path, "b1")
        b, images_b = member(etcd, tmp_path, "b2")
        adder.url = str(server.make_url("")).rstrip("/")
        version = images_adder.store.add("k8s", build(tmp_path, "1"),
                                         own_pointers=False).version
        await images_adder.publish("k8s", version)
        adder.versions = {"k8s": [version]}
        b.deliver()
        local_changes: list[int] = []
        images_b.on_local_change = lambda: local_changes.append(1)
        good = {p: (images_adder.store.root / "k8s" / version / p).read_bytes()
                for p in ("kernel", "initrd")}
        try:
            async with ClientSession() as http:
                served.update(good, initrd=b"initrd from another build")
                await images_b.sync_once(http)
                assert images_b.store.complete() == {}  # refused, nothing left behind
                assert b.versions == {} and local_changes == []
                assert list((images_b.store.root / "k8s").iterdir()) == []
                served.update(good)
                await images_b.sync_once(http)  # backing off: not tried again yet
                assert images_b.store.complete() == {}
                images_b._backoff.clear()
                await images_b.sync_once(http)
                assert set(images_b.store.complete()["k8s"]) == {version}
                assert b.versions == {"k8s": [version]} and local_changes == [1]
                # the record's `added`, not the fetch's: every member lists one time
                assert images_b.store.info("k8s", version).added == \
                    images_adder.store.info("k8s", version).added  # type: ignore[union-attr]
        finally:
            await server.close()

    asyncio.run(scenario())


def test_a_store_from_before_cluster_mode_is_published_with_its_pointers(
        tmp_path: Path) -> None:
    from aiohttp import ClientSession

    async def scenario() -> None:
        etcd = FakeEtcd()
        cluster, images = member(etcd, tmp_path, "b1")
        v1 = images.store.add("k8s", build(tmp_path, "1")).version  # single instance
        v2 = images.store.add("k8s", build(tmp_path, "2")).version
        images.store.promote("k8s", v2)
        async with ClientSession() as http:
            await images.sync_once(http)
        assert set(images.live_versions("k8s")) == {v1, v2}
        assert images.pointers("k8s") == Pointers(v2, (v1,), {})  # what the fleet booted
        assert cluster.versions == {"k8s": sorted([v1, v2])}
        # a second member with its own older store does not override them
        other, images_other = member(etcd, tmp_path, "b2")
        images_other.store.add("k8s", build(tmp_path, "3"))
        other.deliver()
        async with ClientSession() as http:
            await images_other.sync_once(http)
        assert images_other.pointers("k8s") == Pointers(v2, (v1,), {})
        assert len(images_other.live_versions("k8s")) == 3

    asyncio.run(scenario())


async def test_the_admin_api_speaks_for_the_cluster_s_images(tree: Path) -> None:
    from bootd.http.admin import admin_app
    from bootd.live import View
    from bootd.ops.metrics import Metrics
    from bootd.state.recorder import EventPolicy, Recorder
    from tests.unit.test_http_app import client_for, context

    etcd = FakeEtcd()
    cluster, images = member(etcd, tree, "b1")
    other, _ = member(etcd, tree, "b2")
    version = images.store.add("k8s", build(tree, "1"), own_pointers=False).version
    recorder = Recorder(None, EventPolicy(600, 2))
    settings = View.fixed(context(tree).admin)
    client = await client_for(admin_app(settings, Metrics(), recorder, images=images))
    plain = await client_for(admin_app(settings, Metrics(), recorder))
    try:
        published = await client.post("/api/v1/images/k8s/publish", json={"version": version})
        assert await published.json() == {"promoted": True}
        cluster.versions = {"k8s": [version]}
        listed = (await (await client.get("/api/v1/images")).json())["images"]
        assert [(d["version"], d["promoted"], d["held_by"], d["missing_on"]) for d in listed] \
            == [(version, True, ["b1"], ["b2"])]
        refused = await client.post("/api/v1/images/k8s/promote", json={"version": version})
        assert refused.status == 409 and "not on b2 yet" in await refused.text()
        other.versions = {"k8s": [version]}
        assert (await client.post("/api/v1/images/k8s/promote",
                                  json={"version": version})).status == 200
        rollback = await client.post("/api/v1/images/k8s/rollback")
        assert rollback.status == 409 and "no earlier" in await rollback.text()
        assert (await client.post("/api/v1/images/k8s/prune", json={"keep": "x"})).status == 400
        assert (await client.post("/api/v1/images/k8s/prune", data=b"{not")).status == 400
        assert (await client.post("/api/v1/images/k8s/frob")).status == 404
        assert (await client.get("/api/v1/images?name=gpu")).status == 404
        pruned = await client.post("/api/v1/images/k8s/prune", json={"keep": 0})
        assert await pruned.json() == {"pruned": []}  # the promoted version stays
        cluster.registered = False  # no etcd session: nothing can be written
        v2 = images.store.add("k8s", build(tree, "2"), own_pointers=False).version
        assert (await client.post("/api/v1/images/k8s/publish",
                                  json={"version": v2})).status == 503
        single = await plain.get("/api/v1/images")
        assert single.status == 404 and "not in cluster mode" in await single.text()
    finally:
        await client.close()
        await plain.close()

"""Boots as pictures: Gantt bars and gaps of an attempt, the last storm's histogram, and
what a live page is told changed."""

from __future__ import annotations

import contextlib
from pathlib import Path
from types import MappingProxyType

import pytest
from prometheus_client import generate_latest

from bootd.state import events as ev
from bootd.state.events import BootEvent, derive
from bootd.state.recorder import EventPolicy, Recorder
from bootd.state.timelines import (
    ALL,
    bars,
    bucket_width,
    gaps,
    last_storm,
    percentile,
    phase_of,
)


def event(ts: float, stage: str, node: str = "n1", pool: str | None = "w",
          outcome: str = "ok", **detail: object) -> BootEvent:
    return BootEvent(ts, stage, node, "02:00:00:00:00:01", "10.0.0.2", pool, outcome,
                     MappingProxyType(detail))


def boot(start: float, node: str = "n1", pool: str = "w", took: float = 30.0,
         ) -> list[BootEvent]:
    """A whole boot as bootd records it; `took` seconds from DISCOVER to joined."""
    k = took / 30.0
    return [
        event(start, ev.DHCP_DISCOVER, node, pool, firmware="bios"),
        event(start + 0.01 * k, ev.DHCP_OFFER, node, pool),
        event(start + 1.0 * k, ev.DHCP_ACK, node, pool),
        event(start + 2.0 * k, ev.TFTP, node, pool, duration=0.8 * k),
        event(start + 3.0 * k, ev.DHCP_DISCOVER, node, pool),
        event(start + 3.1 * k, ev.DHCP_ACK, node, pool),
        event(start + 3.2 * k, ev.IPXE_SCRIPT, node, pool),
        event(start + 5.0 * k, ev.KERNEL, node, pool, duration=1.5 * k, image="k8s"),
        event(start + 6.0 * k, ev.INITRD, node, pool, duration=0.9 * k, image="k8s"),
        event(start + 6.1 * k, ev.KERNEL_HANDOFF, node, pool),
        event(start + 16.0 * k, ev.DHCP_DISCOVER, node, pool),
        event(start + 16.1 * k, ev.DHCP_ACK, node, pool),
        event(start + 20.0 * k, ev.ROOTFS, node, pool, duration=3.5 * k, image="k8s"),
        event(start + 20.5 * k, ev.ROOTFS_MOUNTED, node, pool),
        event(start + 21.0 * k, ev.JOIN_SCRIPT, node, pool),
        event(start + 25.0 * k, ev.KUBEADM, node, pool),
        event(start + 30.0 * k, ev.JOINED, node, pool),
    ]


def attempt_of(events: list[BootEvent]) -> ev.Attempt:
    state = derive(events, now=events[-1].ts, stall_after=600)
    assert state is not None
    return state.history[-1]


def test_bars_follow_the_phases_of_a_boot() -> None:
    chart = bars(attempt_of(boot(1000.0)))
    assert [b.phase for b in chart] == [
        "DHCP", "TFTP", "DHCP", "iPXE script", "kernel", "initrd", "initramfs", "DHCP",
        "rootfs", "join", "joined"]
    first = chart[0]
    assert (first.start, first.end, first.stages) == (0.0, 1.0, ("dhcp-discover",
                                                                "dhcp-offer", "dhcp-ack"))
    # a transfer's bar starts when the transfer did, not when it was recorded
    tftp = chart[1]
    assert tftp.start == pytest.approx(1.2) and tftp.end == pytest.approx(2.0)
    rootfs = chart[8]
    assert rootfs.start == pytest.approx(16.5) and rootfs.end == pytest.approx(20.5)
    assert rootfs.stages == ("rootfs", "rootfs-mounted")
    assert chart[9].stages == ("join-script", "kubeadm")


def test_bars_fold_repeats_and_keep_the_worst_outcome() -> None:
    events = [event(0, ev.DHCP_DISCOVER), event(1, ev.DHCP_DISCOVER),
              event(2, ev.DHCP_OFFER), event(3, ev.DHCP_NAK, outcome="error"),
              event(4, ev.DHCP_ACK), event(5, ev.REFUSED, outcome="refused"),
              event(6, ev.OTHER, reported_stage="firmware-update")]
    chart = bars(attempt_of(events))
    assert [(b.phase, b.outcome) for b in chart] == [
        ("DHCP", "error"), ("other", "refused")]
    assert chart[0].stages == ("dhcp-discover", "dhcp-offer", "dhcp-nak", "dhcp-ack")
    assert phase_of("no-such-stage") == "other"


def test_a_transfer_that_began_before_the_first_event_starts_left_of_zero() -> None:
    chart = bars(attempt_of([event(10, ev.TFTP, duration=4.0), event(11, ev.IPXE_SCRIPT)]))
    assert chart[0].start == pytest.approx(-4.0)


def test_gaps_are_the_stretches_no_bar_covers() -> None:
    chart = bars(attempt_of(boot(0.0)))
    found = [(round(g.start, 2), round(g.end, 2)) for g in gaps(chart, at_least=1.0)]
    # iPXE starting, the kernel booting to its DHCP, kubeadm's wait before `joined`
    assert found == [(2.0, 3.0), (6.1, 16.0), (25.0, 30.0)]
    assert gaps(chart, at_least=100) == ()


def test_percentile_is_nearest_rank() -> None:
    values = [float(v) for v in range(1, 101)]
    assert percentile(values, 50) == 50.0
    assert percentile(values, 99) == 99.0
    assert percentile(values, 100) == 100.0
    assert percentile([7.0], 99) == 7.0


@pytest.mark.parametrize("longest,buckets,width", [
    (30.0, 20, 2.0), (19.9, 20, 1.0), (20.0, 20, 2.0), (95.0, 20, 5.0), (101.0, 20, 10.0),
    (0.004, 20, 0.0005), (3600.0, 20, 200.0), (0.0, 20, 0.00001)])
def test_bucket_width_is_a_1_2_5_step(longest: float, buckets: int, width: float) -> None:
    assert bucket_width(longest, buckets) == pytest.approx(width)
    assert longest / bucket_width(longest, buckets) < buckets


def states_of(events: list[BootEvent]) -> list[ev.NodeState]:
    by_node: dict[str, list[BootEvent]] = {}
    for e in events:
        by_node.setdefault(e.key, []).append(e)
    out = [derive(es, now=10**6, stall_after=600) for es in by_node.values()]
    return [s for s in out if s is not None]


def test_last_storm_is_the_latest_run_of_joined_boots_per_pool() -> None:
    events: list[BootEvent] = []
    # an old storm (a day ago) that must not count
    for i in range(5):
        events += boot(0.0 + i, f"old{i}", "w", took=500.0)
    # the last storm: 10 workers of 30-39 s and 2 gpu nodes of 90 s, starts 20 s apart
    for i in range(10):
        events += boot(86_400.0 + 20 * i, f"w{i}", "w", took=30.0 + i)
    events += boot(86_400.0 + 5, "g0", "gpu", took=90.0)
    events += boot(86_400.0 + 7, "g1", "gpu", took=90.0)
    # a node booted twice in the storm counts once, with its latest boot
    events += boot(86_400.0 + 300, "w0", "w", took=60.0)
    storm = last_storm(states_of(events), gap=600)
    assert storm is not None
    pools = {d.pool: d for d in storm.pools}
    assert [d.pool for d in storm.pools] == [ALL, "gpu", "w"]
    assert pools[ALL].count == 12 and pools["w"].count == 10 and pools["gpu"].count == 2
    assert pools["gpu"].p50 == pools["gpu"].p99 == 90.0
    assert pools["w"].p50 == 35.0 and pools["w"].slowest == 60.0
    assert storm.started == 86_400.0 + 5 and storm.last_started == 86_400.0 + 300
    assert storm.width == 5.0
    assert all(len(d.counts) == len(pools[ALL].counts) for d in storm.pools)
    assert sum(pools["w"].counts) == 10 and pools["gpu"].counts[18] == 2
    assert storm.to_json()["bucket_seconds"] == 5.0


def test_no_storm_without_a_joined_boot() -> None:
    unfinished = boot(0.0)[:-1]
    assert last_storm(states_of(unfinished)) is None
    assert last_storm([]) is None


def test_a_storm_ends_at_the_first_gap_longer_than_gap() -> None:
    events = boot(0.0, "a") + boot(100.0, "b") + boot(1000.0, "c") + boot(1100.0, "d")
    storm = last_storm(states_of(events), gap=600)
    assert storm is not None and storm.pools[0].count == 2
    whole = last_storm(states_of(events), gap=10_000)
    assert whole is not None and whole.pools[0].count == 4


def test_node_state_names_its_image_and_when_its_last_boot_began() -> None:
    state = derive(boot(50.0), now=100.0, stall_after=600)
    assert state is not None
    assert state.image == "k8s" and state.last_boot_started == 50.0
    assert state.to_json()["image"] == "k8s"


def test_changed_since_names_new_events_and_new_stalls() -> None:
    clock = [1000.0]
    recorder = Recorder(None, EventPolicy(stall_after=60, keep_attempts=3),
                        clock=lambda: clock[0])
    recorder.record(event(1000.0, ev.DHCP_DISCOVER, "a"))
    recorder.record(event(1000.0, ev.DHCP_DISCOVER, "b"))
    recorder.record(event(1001.0, ev.JOINED, "b"))
    seen = recorder.version
    assert sorted(recorder.changed_since(0, 1000.0, 1001.0)) == ["a", "b"]
    assert recorder.changed_since(seen, 1001.0, 1001.0) == []
    recorder.record(event(1002.0, ev.TFTP, "a"))
    assert recorder.changed_since(seen, 1001.0, 1002.0) == ["a"]
    seen = recorder.version
    # a stalls at 1062 (its last event + stall_after); b finished and never stalls
    assert recorder.changed_since(seen, 1002.0, 1061.0) == []
    assert recorder.changed_since(seen, 1061.0, 1063.0) == ["a"]
    assert recorder.changed_since(seen, 1063.0, 1200.0) == []  # told once
    document = recorder.status_document([], only=["a"])
    assert [n["node"] for n in document["nodes"]] == ["a"]
    assert document["version"] == recorder.version


def test_unknown_machines_without_an_address_are_remembered_boundedly(
        tmp_path: Path) -> None:
    """Issue 16, finding 1: a DISCOVER flood from random MACs wrote a node per MAC to
    memory and to the store. Transient keys are capped, least recent forgotten first."""
    from bootd.ops.metrics import Metrics
    from bootd.state import recorder as rec_module
    from bootd.state.store import Store

    store = Store(tmp_path / "s.sqlite3")
    metrics = Metrics()
    recorder = Recorder(store, EventPolicy(stall_after=600, keep_attempts=3), metrics=metrics)
    cap = rec_module.MAX_TRANSIENT
    recorder.record(event(0.0, ev.DHCP_DISCOVER, "reserved"))  # a known node: permanent
    # a catch-all node that got its address early in the flood stays too
    recorder.record(BootEvent(0.5, ev.DHCP_DISCOVER, "node-a", "52:54:00:00:00:0a", None,
                              "any"), transient=True)
    recorder.record(BootEvent(0.6, ev.DHCP_ACK, "node-a", "52:54:00:00:00:0a", "10.0.0.100",
                              "any"))
    for i in range(cap * 3):
        mac = f"02:ff:{i >> 16 & 255:02x}:{i >> 8 & 255:02x}:{i & 255:02x}:01"
        recorder.record(BootEvent(1.0 + i * 1e-4, ev.REFUSED, None, mac, None, None,
                                  "refused"), transient=True)
        if i % 500 == 0:
            recorder.flush()
    recorder.flush()
    keys = {s.key for s in recorder.states()}
    assert "reserved" in keys and "node-a" in keys
    assert len(keys) == cap + 2
    assert "02:ff:00:00:00:01" not in keys  # the oldest went first
    assert f"02:ff:00:{(cap * 3 - 1) >> 8 & 255:02x}:{(cap * 3 - 1) & 255:02x}:01" in keys
    exposed = generate_latest(metrics.registry).decode()
    assert f"bootd_nodes_forgotten_total {float(cap * 2)}" in exposed
    # the store holds what memory holds, and a restart brings back no more
    store.close()
    again = Recorder(Store(tmp_path / "s.sqlite3"), EventPolicy(600, 3))
    again.load(known=["reserved"])
    assert {s.key for s in again.states()} == keys
    # a forgotten machine that comes back is simply new
    recorder.record(BootEvent(9.0, ev.REFUSED, None, "02:ff:00:00:00:01", None, None,
                              "refused"), transient=True)
    assert recorder.state("02:ff:00:00:00:01") is not None


def test_a_failing_event_store_is_logged_once_a_minute_and_counted(
        monkeypatch: pytest.MonkeyPatch) -> None:
    import asyncio

    from bootd.ops.metrics import Metrics
    from bootd.state import recorder as rec_module

    class FullDisk:
        def append_events(self, *args: object, **kwargs: object) -> None:
            raise OSError("database or disk is full")

    metrics = Metrics()
    recorder = Recorder(FullDisk(), EventPolicy(600, 3), metrics=metrics)  # type: ignore[arg-type]
    recorder.record(event(0.0, ev.DHCP_DISCOVER, "a"))
    lines: list[str] = []
    monkeypatch.setattr(rec_module.log, "error", lambda msg, **kw: lines.append(msg))

    async def run() -> None:
        task = asyncio.create_task(recorder.run_flusher(interval=0.01))
        await asyncio.sleep(0.3)
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task

    asyncio.run(run())
    exposed = generate_latest(metrics.registry).decode()
    failures = float(exposed.split("\nbootd_event_store_failures_total ")[1].split()[0])
    assert failures >= 10 and len(lines) == 1  # every flush failed, one line said so
    assert len(recorder._pending) == 1  # kept for when the disk has room again

"""Node state from boot events: attempts, current stage, stalls, durations; the recorder
and its SQLite persistence with retention."""

from __future__ import annotations

import contextlib
from dataclasses import replace
from pathlib import Path
from types import MappingProxyType

import pytest

from bootd.state import events as ev
from bootd.state.events import BootEvent, derive, split_attempts, starts_attempt
from bootd.state.recorder import EventPolicy, Recorder
from bootd.state.store import Store

STALL = 600.0


def e(ts: float, stage: str, node: str | None = "n1", outcome: str = "ok",
      **detail: object) -> BootEvent:
    return BootEvent(ts, stage, node, "02:00:00:00:00:01", "10.0.0.5", "w", outcome,
                     MappingProxyType(detail))


HEALTHY = [
    e(0, ev.DHCP_DISCOVER, firmware="bios"), e(0.1, ev.DHCP_OFFER), e(0.3, ev.DHCP_ACK),
    e(1.0, ev.TFTP, file="undionly.kpxe"), e(2.0, ev.DHCP_DISCOVER, firmware="ipxe"),
    e(2.2, ev.DHCP_ACK), e(2.5, ev.IPXE_SCRIPT), e(3.0, ev.KERNEL), e(4.0, ev.INITRD),
    e(4.1, ev.KERNEL_HANDOFF), e(6.0, ev.DHCP_DISCOVER, firmware="os"), e(6.2, ev.DHCP_ACK),
    e(9.0, ev.ROOTFS, bytes=100), e(10.0, "rootfs-mounted"), e(11.0, ev.JOIN_SCRIPT),
    e(12.0, "scripts-done"), e(20.0, ev.JOINED),
]


def test_healthy_boot_is_one_attempt() -> None:
    state = derive(HEALTHY, now=30, stall_after=STALL)
    assert state is not None
    assert state.attempts == 1 and len(state.history) == 1
    assert state.stage == ev.JOINED and not state.stalled
    assert state.last_boot_time == 20.0 and state.last_error is None
    assert (state.first_seen, state.last_seen, state.since) == (0, 20.0, 20.0)
    steps = state.history[0].steps
    assert [s.stage for s in steps][:3] == [ev.DHCP_DISCOVER, ev.DHCP_OFFER, ev.DHCP_ACK]
    assert steps[3].offset == 1.0 and steps[3].duration == 1.0
    assert steps[-1].duration is None


def test_renewals_after_joined_do_not_change_stage() -> None:
    state = derive([*HEALTHY, e(1800, ev.DHCP_ACK, state="renewing/rebinding")], 1900, STALL)
    assert state is not None and state.stage == ev.JOINED and not state.stalled
    assert state.attempts == 1


def test_discover_after_finished_boot_starts_new_attempt() -> None:
    events = [*HEALTHY, e(100, ev.DHCP_DISCOVER, firmware="bios"), e(100.2, ev.DHCP_OFFER)]
    state = derive(events, 101, STALL)
    assert state is not None
    assert state.attempts == 2 and state.stage == ev.DHCP_OFFER
    assert state.last_boot_time == 20.0  # from the completed attempt


def test_a_power_cycle_by_bootd_starts_an_attempt_and_is_not_progress() -> None:
    cycled = [*HEALTHY, e(100, ev.POWER, action="pxe", rollout="r1")]
    state = derive(cycled, 101, STALL)
    assert state is not None and state.attempts == 2 and state.stage == ev.POWER
    rebooting = [*cycled, *(replace(x, ts=x.ts + 101) for x in HEALTHY[:3])]
    state = derive(rebooting, 105, STALL)
    assert state is not None and state.attempts == 2 and state.stage == ev.DHCP_ACK
    # the boot's time runs from the power cycle to `joined`
    done = [*cycled, *(replace(x, ts=x.ts + 101) for x in HEALTHY)]
    state = derive(done, 130, STALL)
    assert state is not None and state.last_boot_time == 21.0
    # a refused power action starts nothing, and is not the node's stage
    refused = [*HEALTHY, e(100, ev.POWER, outcome="error", message="BMC did not answer")]
    state = derive(refused, 101, STALL)
    assert state is not None and state.attempts == 1 and state.stage == ev.JOINED


def test_firmware_discover_after_kernel_handoff_is_a_reboot() -> None:
    events = [*HEALTHY[:10], e(30, ev.DHCP_DISCOVER, firmware="efi64")]
    assert len(split_attempts(events, STALL)) == 2
    # iPXE's and the booted OS's DISCOVERs inside one boot are not
    assert len(split_attempts(HEALTHY, STALL)) == 1


def test_discover_after_a_stall_starts_new_attempt() -> None:
    events = [*HEALTHY[:5], e(5000, ev.DHCP_DISCOVER, firmware="ipxe")]
    assert len(split_attempts(events, STALL)) == 2
    assert starts_attempt([], e(0, ev.KERNEL), STALL)  # the first event always does
    assert not starts_attempt(HEALTHY[:3], e(1, ev.TFTP), STALL)


def test_stalled_detection() -> None:
    events = HEALTHY[:9]  # got the initrd, then nothing
    assert not derive(events, 4.0 + STALL - 1, STALL).stalled  # type: ignore[union-attr]
    state = derive(events, 4.0 + STALL + 1, STALL)
    assert state is not None and state.stalled and state.stage == ev.INITRD


def test_errors_and_failed_attempt() -> None:
    events = [*HEALTHY[:13], e(14, ev.FAILED, outcome="error", message="kubeadm join failed")]
    state = derive(events, 15, STALL)
    assert state is not None
    assert state.stage == ev.FAILED and state.last_error == "failed: kubeadm join failed"
    assert state.history[0].outcome == ev.FAILED and state.last_boot_time is None


def test_refusals_do_not_become_the_stage() -> None:
    refusal = e(3, ev.REFUSED, outcome="refused", reason="join-script: wrong address")
    events = [*HEALTHY[:5], refusal]
    state = derive(events, 4, STALL)
    assert state is not None and state.stage == ev.DHCP_DISCOVER
    assert state.last_error == "refused: join-script: wrong address"


def test_unknown_mac_key() -> None:
    unknown = e(0, ev.REFUSED, node=None, outcome="refused", reason="unknown MAC")
    assert unknown.key == "02:00:00:00:00:01"
    state = derive([unknown], 1, STALL)
    assert state is not None and state.name is None and state.stage == ev.REFUSED


def test_recorder_keeps_last_attempts_and_survives_restart(tmp_path: Path) -> None:
    store = Store.in_state_dir(tmp_path)
    rec = Recorder(store, EventPolicy(STALL, 2), clock=lambda: 1000.0)
    for boot in range(3):
        for event in HEALTHY:
            rec.record(e(boot * 100 + event.ts, event.stage, **event.detail))
    rec.record(e(0, ev.REFUSED, node=None, outcome="refused"))  # other key (MAC)
    assert rec.flush() == 3 * len(HEALTHY) + 1
    state = rec.state("n1")
    assert state is not None and state.attempts == 3 and len(state.history) == 2
    assert [a.number for a in state.history] == [2, 3]
    store.close()

    again = Recorder(Store.in_state_dir(tmp_path), EventPolicy(STALL, 2),
                     clock=lambda: 1000.0)
    assert again.load() == 2 * len(HEALTHY) + 1  # the oldest attempt was pruned
    restored = again.state("n1")
    assert restored is not None
    assert restored.attempts == 3 and [a.number for a in restored.history] == [2, 3]
    assert restored.stage == ev.JOINED and restored.history[-1].steps == state.history[-1].steps
    assert again.find("10.0.0.5") is not None and again.find("nobody") is None
    again.record(e(500, ev.DHCP_DISCOVER, firmware="bios"))
    assert again.state("n1").attempts == 4  # type: ignore[union-attr]


def test_recorder_bounds_events_per_attempt(monkeypatch: object) -> None:
    import bootd.state.recorder as module

    assert hasattr(monkeypatch, "setattr")
    monkeypatch.setattr(module, "MAX_EVENTS_PER_ATTEMPT", 5)
    rec = Recorder(None, EventPolicy(STALL, 3))
    for i in range(20):
        rec.record(e(i, ev.TFTP if i else ev.DHCP_DISCOVER))
    state = rec.state("n1")
    assert state is not None and len(state.history[0].steps) == 5
    assert state.history[0].steps[0].stage == ev.DHCP_DISCOVER


def test_failed_store_write_keeps_events_for_next_flush(tmp_path: Path) -> None:
    store = Store.in_state_dir(tmp_path)
    rec = Recorder(store, EventPolicy(STALL, 2))
    rec.record(HEALTHY[0])
    store.close()
    with contextlib.suppress(Exception):
        rec.flush()  # the store is closed: the write fails, the event stays queued
    rec.store = Store.in_state_dir(tmp_path)
    assert rec.flush() == 1


def test_recorder_metrics() -> None:
    from bootd.ops.metrics import Metrics

    metrics = Metrics()
    rec = Recorder(None, EventPolicy(STALL, 2), metrics=metrics, clock=lambda: 25.0)
    for event in HEALTHY:
        rec.record(event)
    rec.record(e(21, ev.DHCP_ACK))
    reg = metrics.registry
    assert reg.get_sample_value("bootd_boot_events_total",
                                {"stage": "joined", "outcome": "ok"}) == 1
    assert reg.get_sample_value("bootd_boot_seconds_count") == 1
    assert reg.get_sample_value("bootd_boot_seconds_sum") == 20.0
    assert reg.get_sample_value("bootd_boot_stage_seconds_count", {"stage": "tftp"}) == 1
    rec.update_gauges()
    assert reg.get_sample_value("bootd_nodes", {"stage": "joined"}) == 1


async def test_the_flusher_writes_in_chunks_and_lets_the_loop_run(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A storm's events go to the store in transactions of FLUSH_CHUNK, with the event
    loop running between them; a node forgotten meanwhile is not revived by a later
    chunk."""
    import asyncio

    import bootd.state.recorder as module

    monkeypatch.setattr(module, "FLUSH_CHUNK", 4)
    monkeypatch.setattr(module, "MAX_TRANSIENT", 1)
    store = Store.in_state_dir(tmp_path)
    sizes: list[int] = []
    real = store.append_events

    def noting(batch: list[tuple[ev.BootEvent, int]], keep: int, forget: object = ()) -> None:
        sizes.append(len(batch))
        real(batch, keep, forget)  # type: ignore[arg-type]

    monkeypatch.setattr(store, "append_events", noting)
    rec = Recorder(store, EventPolicy(STALL, 2))
    for i in range(9):  # a known node: permanent
        rec.record(e(i, ev.TFTP if i else ev.DHCP_DISCOVER))
    stranger = ev.BootEvent(1, ev.DHCP_DISCOVER, None, "02:00:00:00:0a:01", None, None,
                            "ok", MappingProxyType({}))
    rec.record(stranger, transient=True)
    rec.record(replace(stranger, mac="02:00:00:00:0a:02"), transient=True)  # forgets 0a:01
    ticks = 0

    async def other_work() -> None:
        nonlocal ticks
        while True:
            ticks += 1
            await asyncio.sleep(0)

    worker = asyncio.ensure_future(other_work())
    flusher = asyncio.ensure_future(rec.run_flusher(interval=0.01))
    for _ in range(100):
        await asyncio.sleep(0.01)
        if not rec._pending and sizes:
            break
    flusher.cancel()
    worker.cancel()
    assert sizes[:3] == [4, 4, 2] and ticks >= 3
    keys = {event.key for event, _ in store.load_events()}
    assert keys == {"n1", "02:00:00:00:0a:02"}

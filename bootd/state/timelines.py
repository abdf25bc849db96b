"""Boots as pictures, in data: one attempt's phases for a Gantt chart, and the whole-boot
times of the last boot storm for a histogram. Pure: states in, figures out.

Theory of operation
-------------------

The status page draws what `bootd status` knows; this module decides what the shapes
are, so that the page's templates only place them and the rules are tested here.

Rules:

1. A phase is one part of a boot: DHCP (discover, offer, ack, nak), TFTP, iPXE script,
   kernel, initrd, initramfs (the kernel hand-off beacon, the initramfs report), rootfs
   (its fetch, the mounted report), join (join.sh, scripts, kubeadm), and the finish
   (joined or failed). Refusals and unknown reported stages are phase "other".
2. A bar is a run of consecutive events of one phase. It ends at its last event and
   starts when its first event's work started: an event that records a transfer carries
   its `duration` and was recorded when the transfer ended.
3. Between bars is a gap: time in which bootd saw nothing (firmware loading iPXE, a
   kernel booting, a node's own work). Gaps stay empty in the chart, and are listed.
4. The last storm is the run of joined attempts, across all nodes, whose starts are each
   within `gap` of the previous one, ending at the latest start. A node counts once: its
   latest joined attempt in that run.
5. Percentiles are nearest-rank. Histogram buckets are shared by all pools (one scale,
   so that pools compare), `width` a 1-2-5 step with at most `buckets` buckets.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass

from bootd.state import events as ev
from bootd.state.events import Attempt, NodeState

PHASE_OF = {
    ev.DHCP_DISCOVER: "DHCP", ev.DHCP_OFFER: "DHCP", ev.DHCP_ACK: "DHCP", ev.DHCP_NAK: "DHCP",
    ev.TFTP: "TFTP", ev.IPXE_SCRIPT: "iPXE script", ev.KERNEL: "kernel",
    ev.INITRD: "initrd", ev.KERNEL_HANDOFF: "initramfs", ev.INITRAMFS: "initramfs",
    ev.ROOTFS: "rootfs", ev.ROOTFS_MOUNTED: "rootfs", ev.AWAITING_APPROVAL: "join",
    ev.JOIN_SCRIPT: "join",
    ev.SCRIPTS_DONE: "join", ev.KUBEADM: "join", ev.JOINED: "joined", ev.FAILED: "failed",
}
# Lanes of the chart, top to bottom, in the order a healthy boot passes them.
PHASES = ("DHCP", "TFTP", "iPXE script", "kernel", "initrd", "initramfs", "rootfs", "join",
          "joined", "failed", "other")
_WORST = {"ok": 0, "refused": 1, "error": 2}
ALL = "(all)"  # every pool together; parentheses: no pool can be named so


@dataclass(frozen=True)
class Bar:
    phase: str
    start: float  # seconds since the attempt's first event (negative: work began before)
    end: float
    outcome: str  # the worst of its events: ok < refused < error
    stages: tuple[str, ...]  # the stages it covers, in order, repeats folded


@dataclass(frozen=True)
class Gap:
    start: float
    end: float


def phase_of(stage: str) -> str:
    return PHASE_OF.get(stage, "other")


def bars(attempt: Attempt) -> tuple[Bar, ...]:
    out: list[Bar] = []
    for step in attempt.steps:
        phase = phase_of(step.stage)
        took = step.detail.get("duration")
        start = step.offset - (float(took) if isinstance(took, int | float) and took > 0
                               else 0.0)
        if out and out[-1].phase == phase:
            last = out[-1]
            worse = max(last.outcome, step.outcome, key=lambda o: _WORST.get(o, 2))
            stages = last.stages if last.stages[-1] == step.stage else (*last.stages,
                                                                        step.stage)
            out[-1] = Bar(phase, min(last.start, start), step.offset, worse, stages)
        else:
            out.append(Bar(phase, start, step.offset, step.outcome, (step.stage,)))
    return tuple(out)


def gaps(chart: Iterable[Bar], at_least: float = 0.5) -> tuple[Gap, ...]:
    """Stretches of at least `at_least` seconds that no bar covers."""
    out: list[Gap] = []
    covered_to: float | None = None
    for bar in sorted(chart, key=lambda b: b.start):
        if covered_to is not None and bar.start - covered_to >= at_least:
            out.append(Gap(covered_to, bar.start))
        covered_to = bar.end if covered_to is None else max(covered_to, bar.end)
    return tuple(out)


@dataclass(frozen=True)
class Distribution:
    pool: str
    count: int
    p50: float
    p99: float
    slowest: float
    counts: tuple[int, ...]  # per bucket of the storm's shared scale


@dataclass(frozen=True)
class Storm:
    started: float  # the first joined attempt's start
    last_started: float
    width: float  # seconds per bucket
    pools: tuple[Distribution, ...]  # "(all)" first, then each pool by name

    def to_json(self) -> dict[str, object]:
        return {"started": self.started, "last_started": self.last_started,
                "bucket_seconds": self.width,
                "pools": [vars(d) | {"counts": list(d.counts)} for d in self.pools]}


def percentile(ordered: list[float], p: float) -> float:
    """Nearest rank of an ascending list (not empty)."""
    return ordered[max(0, math.ceil(p / 100 * len(ordered)) - 1)]


def bucket_width(longest: float, buckets: int) -> float:
    """The smallest 1-2-5 step that fits `longest` in at most `buckets` buckets."""
    exponent = math.floor(math.log10(max(longest, 1e-3) / buckets))
    for base in (1, 2, 5, 10):
        width = base * 10.0 ** exponent
        if longest / width < buckets:
            return width
    raise AssertionError("unreachable: 10 * 10**e > longest / buckets")


def last_storm(states: Iterable[NodeState], gap: float = 600.0,
               buckets: int = 20) -> Storm | None:
    joined = sorted(((a.started, a.duration, s.pool or "(no pool)", s.key)
                     for s in states for a in s.history if a.outcome == ev.JOINED),
                    reverse=True)
    if not joined:
        return None
    storm: dict[str, tuple[float, float, str]] = {}  # node -> its latest joined attempt
    previous = joined[0][0]
    for started, took, pool, key in joined:
        if previous - started > gap:
            break
        storm.setdefault(key, (started, took, pool))
        previous = started
    width = bucket_width(max(t for _, t, _ in storm.values()), buckets)
    by_pool: dict[str, list[float]] = {ALL: []}
    for _, took, pool in storm.values():
        by_pool[ALL].append(took)
        by_pool.setdefault(pool, []).append(took)
    size = max(1, math.ceil(max(by_pool[ALL]) / width + 1e-9))
    pools = []
    for pool in [ALL, *sorted(p for p in by_pool if p != ALL)]:
        times = sorted(by_pool[pool])
        counts = [0] * size
        for t in times:
            counts[min(size - 1, int(t // width))] += 1
        pools.append(Distribution(pool, len(times), percentile(times, 50),
                                  percentile(times, 99), times[-1], tuple(counts)))
    starts = [s for s, _, _ in storm.values()]
    return Storm(min(starts), max(starts), width, tuple(pools))

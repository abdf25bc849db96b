"""Boot events and what they say about a node: attempts, current stage, stalls, timings.

Theory of operation
-------------------

bootd records every step of a boot it sees (DHCP from the service's typed outcomes, each
TFTP transfer, each HTTP fetch, the beacon iPXE fetches just before the kernel, refusals)
and every stage a node reports itself. `bootd status` is this module applied to them:
events in, state out, with `now` as a parameter and no I/O.

Rules:

1. Events are keyed on the node's name, else on the MAC (an unknown machine).
2. An attempt is the run of events from one boot. A DISCOVER starts a new attempt when
   the last one finished (`joined` or `failed`), when nothing happened for `stall_after`,
   or when it comes from firmware after the node had reached its kernel (it rebooted).
   A power action bootd took through the node's BMC (a rollout's power cycle) starts one
   too. Any other event belongs to the current attempt.
3. A node's stage is the last `joined`/`failed` of its current attempt if there is one
   (lease renewals after joining do not move it back), else its latest step; refusals
   and what bootd did to the node's BMC do not count as progress.
4. A node is stalled when its current attempt has not finished and nothing happened for
   `stall_after`.
5. A step's duration is the time to the next step; a boot's time is its attempt's first
   to last event, counted only for attempts that reached `joined`.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

# Stages bootd observes, in the order a healthy boot passes them.
DHCP_DISCOVER = "dhcp-discover"
DHCP_OFFER = "dhcp-offer"
DHCP_ACK = "dhcp-ack"
DHCP_NAK = "dhcp-nak"
TFTP = "tftp"
IPXE_SCRIPT = "ipxe-script"
KERNEL = "kernel"
INITRD = "initrd"
KERNEL_HANDOFF = "kernel-handoff"
ROOTFS = "rootfs"
JOIN_SCRIPT = "join-script"
AWAITING_APPROVAL = "awaiting-approval"  # a catch-all node's join.sh waits for an operator
# Stages nodes report (POST /api/v1/events): a closed set, so that a node cannot invent
# metric label values or page colours; any other name is stored as OTHER with the name
# in the event's detail (`reported_stage`).
INITRAMFS = "initramfs"
ROOTFS_MOUNTED = "rootfs-mounted"
SCRIPTS_DONE = "scripts-done"
KUBEADM = "kubeadm"
JOINED = "joined"
FAILED = "failed"
OTHER = "other"
REPORTED = frozenset({INITRAMFS, ROOTFS_MOUNTED, JOIN_SCRIPT, SCRIPTS_DONE, KUBEADM, JOINED,
                      FAILED, OTHER})
# Requests bootd refused (unknown MAC, 403, malformed packet): an event, not a stage.
REFUSED = "refused"
# What bootd did to the node's BMC (a rollout's power cycle): an event, not a stage.
POWER = "power"
NOT_PROGRESS = frozenset({REFUSED, POWER})
# Every stage an event can carry, in boot order: the only values of a stage label.
STAGES = (DHCP_DISCOVER, DHCP_OFFER, DHCP_ACK, DHCP_NAK, TFTP, IPXE_SCRIPT, KERNEL, INITRD,
          KERNEL_HANDOFF, INITRAMFS, ROOTFS, ROOTFS_MOUNTED, AWAITING_APPROVAL, JOIN_SCRIPT,
          SCRIPTS_DONE,
          KUBEADM, JOINED, FAILED, OTHER, REFUSED, POWER)

FINISHED = frozenset({JOINED, FAILED})
FIRMWARE = frozenset({"bios", "efi32", "efi64", "arm64"})
# Once a node got this far, a firmware DISCOVER means it rebooted: a new attempt.
PAST_FIRMWARE = frozenset({KERNEL_HANDOFF, ROOTFS, JOIN_SCRIPT})


@dataclass(frozen=True)
class BootEvent:
    ts: float
    stage: str
    node: str | None  # None: a MAC bootd does not know
    mac: str | None = None
    ip: str | None = None
    pool: str | None = None
    outcome: str = "ok"  # ok | error | refused
    detail: Mapping[str, Any] = field(default_factory=lambda: MappingProxyType({}))

    @property
    def key(self) -> str:
        """Who this event is about: the node's name, else its MAC."""
        return self.node or self.mac or "?"

    def to_json(self) -> dict[str, Any]:
        return {"ts": self.ts, "stage": self.stage, "node": self.node, "mac": self.mac,
                "ip": self.ip, "pool": self.pool, "outcome": self.outcome,
                "detail": dict(self.detail)}


def starts_attempt(current: list[BootEvent], event: BootEvent, stall_after: float) -> bool:
    """Does `event` begin a new boot attempt after the events of the current one?"""
    if not current:
        return True
    if event.stage == POWER and event.outcome == "ok":
        return True  # bootd (re)started the machine: a boot begins here
    if event.stage != DHCP_DISCOVER:
        return False
    last = current[-1]
    if last.stage in FINISHED or event.ts - last.ts > stall_after:
        return True
    rebooted = event.detail.get("firmware") in FIRMWARE
    return rebooted and any(e.stage in PAST_FIRMWARE for e in current)


def split_attempts(events: Iterable[BootEvent], stall_after: float) -> list[list[BootEvent]]:
    attempts: list[list[BootEvent]] = []
    for event in sorted(events, key=lambda e: e.ts):
        if not attempts or starts_attempt(attempts[-1], event, stall_after):
            attempts.append([])
        attempts[-1].append(event)
    return attempts


@dataclass(frozen=True)
class Step:
    stage: str
    offset: float  # seconds since the attempt began
    duration: float | None  # until the next step; None for the last one
    outcome: str
    detail: Mapping[str, Any]


@dataclass(frozen=True)
class Attempt:
    number: int
    started: float
    steps: tuple[Step, ...]
    outcome: str | None  # joined | failed | None (still going or stalled)
    duration: float  # first to last event

    def to_json(self) -> dict[str, Any]:
        return {"number": self.number, "started": self.started, "outcome": self.outcome,
                "duration": self.duration,
                "steps": [{"stage": s.stage, "offset": round(s.offset, 3),
                           "duration": None if s.duration is None else round(s.duration, 3),
                           "outcome": s.outcome, "detail": dict(s.detail)}
                          for s in self.steps]}


def attempt_of(number: int, events: list[BootEvent]) -> Attempt:
    start = events[0].ts
    steps = tuple(
        Step(e.stage, e.ts - start,
             events[i + 1].ts - e.ts if i + 1 < len(events) else None, e.outcome, e.detail)
        for i, e in enumerate(events))
    finished = next((e.stage for e in reversed(events) if e.stage in FINISHED), None)
    return Attempt(number, start, steps, finished, events[-1].ts - start)


@dataclass(frozen=True)
class NodeState:
    key: str
    name: str | None
    mac: str | None
    ip: str | None
    pool: str | None
    stage: str  # the latest stage, or "stalled:<stage>" semantics via `stalled`
    since: float  # when that stage was reached
    stalled: bool
    first_seen: float
    last_seen: float
    attempts: int
    last_error: str | None
    last_boot_time: float | None  # duration of the last attempt that reached `joined`
    last_boot_started: float | None  # when that attempt began
    image: str | None  # the image its latest kernel/initrd/rootfs fetch named
    history: tuple[Attempt, ...]

    def to_json(self, with_history: int = 0) -> dict[str, Any]:
        out: dict[str, Any] = {
            "node": self.name, "mac": self.mac, "ip": self.ip, "pool": self.pool,
            "stage": self.stage, "stalled": self.stalled, "since": self.since,
            "first_seen": self.first_seen, "last_seen": self.last_seen,
            "attempts": self.attempts, "last_error": self.last_error,
            "last_boot_time": self.last_boot_time, "last_boot_started": self.last_boot_started,
            "image": self.image,
        }
        if with_history:
            out["history"] = [a.to_json() for a in self.history[-with_history:]]
        return out


def _error_text(event: BootEvent) -> str:
    message = event.detail.get("message") or event.detail.get("reason") or event.outcome
    return f"{event.stage}: {message}"


def derive(events: Iterable[BootEvent], now: float, stall_after: float,
           first_attempt: int = 1) -> NodeState | None:
    """A node's state from its events (all of one node, any order)."""
    attempts = split_attempts(events, stall_after)
    if not attempts:
        return None
    history = tuple(attempt_of(first_attempt + i, a) for i, a in enumerate(attempts))
    flat = [e for a in attempts for e in a]
    last = flat[-1]
    progress = [e for e in attempts[-1] if e.stage not in NOT_PROGRESS] or attempts[-1]
    finishing = [e for e in progress if e.stage in FINISHED]
    # after `joined`, lease renewals and the like do not change what the node is doing
    current = finishing[-1] if finishing else progress[-1]
    errors = [e for e in flat if e.outcome != "ok" or e.stage == FAILED]
    joined = [a for a in history if a.outcome == JOINED]
    known = next((e for e in reversed(flat) if e.node), last)
    return NodeState(
        key=last.key, name=known.node, mac=next((e.mac for e in reversed(flat) if e.mac), None),
        ip=next((e.ip for e in reversed(flat) if e.ip), None),
        pool=next((e.pool for e in reversed(flat) if e.pool), None),
        stage=current.stage, since=current.ts,
        stalled=not finishing and now - last.ts > stall_after,
        first_seen=flat[0].ts, last_seen=last.ts, attempts=history[-1].number,
        last_error=_error_text(errors[-1]) if errors else None,
        last_boot_time=joined[-1].duration if joined else None,
        last_boot_started=joined[-1].started if joined else None,
        image=next((str(e.detail["image"]) for e in reversed(flat) if "image" in e.detail),
                   None),
        history=history,
    )

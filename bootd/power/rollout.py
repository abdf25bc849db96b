"""A rollout of an image version over a pool, as a pure state machine.

Theory of operation
-------------------

`start` takes the plan and what every node of the pool is doing; `observe` takes what a
node was last seen doing (its stage, the image it reported, when); `power_done` takes a
BMC's answer; `tick` takes the time; `pause`, `resume`, `abort` and `interrupted` take
the operator's word. Each returns the new Rollout and the commands for the I/O shell
(bootd/power/rollouts.py): point the pool at a version, power-cycle a node into a
one-time network boot, note a step. Nothing here reads a clock or a socket, so every
branch is tested with time as a parameter.

Rules:

1. `start` points the pool at the new version, then boots the canary wave (the first
   `canary` nodes by name). Nodes already joined on the new version are healthy from
   the start and never power-cycled.
2. A node power-cycled at T is healthy when it reports `joined` on the new version at or
   after T; it has failed when it reports `failed`, joins on another version, its BMC
   refuses the action, or `timeout` passes first.
3. A wave ends when none of its nodes is still booting. Then the next wave takes at most
   `max_unavailable` waiting nodes; when none wait, the rollout is completed and the pool
   stays on the new version.
4. The rollout halts when any canary fails, or when more than `max_failed` nodes have
   failed. Halting points the pool back at the version it had, and power-cycles every
   failed node and every node still booting back onto it (`reverting`); a reverting node
   is `reverted` when it joins on the old version, `revert-failed` otherwise. Nodes never
   reached stay untouched.
5. `pause` starts no new wave (nodes already booting are still watched, and a halt still
   happens); `resume` continues. `abort` ends the rollout and points the pool back, but
   power-cycles nothing. `interrupted` ends it without touching the pointer (someone else
   moved it: their word wins).
6. A finished rollout (completed, halted, aborted) takes no more commands, except that
   the nodes it is reverting are still watched until they are back.
7. After a restart of bootd, a node whose power cycle was asked for but never confirmed
   by its BMC is cycled again (the restart may have cut the request short); its deadline
   starts again. A confirmed one keeps its deadline.
8. In cluster mode one member drives a rollout at a time (`runner`); whichever member
   takes over (the first, or the next when the runner died) does what rule 7 does after
   a restart (`taken_over`). A BMC's answer names the cycle it answers (`since`): one
   that arrives after the node moved on (a halt started its revert) changes nothing.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Any

RUNNING, PAUSED, HALTED, COMPLETED, ABORTED = ("running", "paused", "halted", "completed",
                                               "aborted")
WAITING, BOOTING, HEALTHY, FAILED = "waiting", "booting", "healthy", "failed"
REVERTING, REVERTED, REVERT_FAILED = "reverting", "reverted", "revert-failed"
LOG_LIMIT = 200  # steps kept in a rollout's own log


@dataclass(frozen=True)
class RolloutSpec:
    pool: str
    image: str  # the image's name
    version: str  # the version rolled out
    previous: str | None  # the version the pool booted before (None: none was stored)
    nodes: tuple[str, ...]  # the pool's nodes, in rollout order
    canary: int = 1
    max_unavailable: int = 1
    max_failed: int = 1
    timeout: float = 900.0  # per node: from its power cycle to `joined`
    # the pool's own pointer before (None: it followed the promoted version); a halt or
    # an abort puts it back
    pointer_before: str | None = None

    @property
    def new_ref(self) -> str:
        return f"{self.image}@{self.version}"

    @property
    def old_ref(self) -> str | None:
        return f"{self.image}@{self.previous}" if self.previous else None


@dataclass(frozen=True)
class NodeProgress:
    name: str
    state: str = WAITING
    wave: int | None = None
    since: float | None = None  # when its current power cycle was asked for
    error: str | None = None
    powered: bool = False  # its BMC confirmed that power cycle


@dataclass(frozen=True)
class NodeSeen:
    """What bootd last saw of a node: its stage, the image it reported, and when."""

    name: str
    stage: str
    image: str | None
    at: float
    message: str | None = None


@dataclass(frozen=True)
class Rollout:
    id: str
    spec: RolloutSpec
    phase: str
    nodes: tuple[NodeProgress, ...]
    wave: int  # the wave booting now (0: the canary)
    started: float
    updated: float
    finished: float | None = None
    reason: str | None = None  # why it halted, was aborted or paused
    log: tuple[tuple[float, str], ...] = ()
    runner: str | None = None  # cluster mode: the member driving it (rule 8)

    @property
    def active(self) -> bool:
        """Still something to do or watch (rule 6)."""
        return self.phase in (RUNNING, PAUSED) or any(n.state == REVERTING
                                                      for n in self.nodes)

    def node(self, name: str) -> NodeProgress | None:
        return next((n for n in self.nodes if n.name == name), None)

    def count(self, state: str) -> int:
        return sum(1 for n in self.nodes if n.state == state)

    def to_json(self) -> dict[str, Any]:
        return {"id": self.id, "spec": {**vars(self.spec), "nodes": list(self.spec.nodes)},
                "phase": self.phase, "nodes": [vars(n) for n in self.nodes],
                "wave": self.wave, "started": self.started, "updated": self.updated,
                "finished": self.finished, "reason": self.reason,
                "log": [list(entry) for entry in self.log], "runner": self.runner}

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Rollout:
        spec = RolloutSpec(**{**data["spec"], "nodes": tuple(data["spec"]["nodes"])})
        return cls(str(data["id"]), spec, str(data["phase"]),
                   tuple(NodeProgress(**n) for n in data["nodes"]), int(data["wave"]),
                   float(data["started"]), float(data["updated"]), data.get("finished"),
                   data.get("reason"), tuple((float(t), str(m)) for t, m in data["log"]),
                   None if data.get("runner") is None else str(data["runner"]))


# ---------------------------------------------------------------------------- commands


@dataclass(frozen=True)
class PointPool:
    """Point `pool` at `version` of `image` (None: follow the promoted version)."""

    image: str
    pool: str
    version: str | None


@dataclass(frozen=True)
class PowerPxe:
    """A one-time network boot, then a power cycle (`bootd power NODE pxe`)."""

    node: str
    reason: str  # "rollout" or "revert"


@dataclass(frozen=True)
class Step:
    """Something worth a log line, a metric and the rollout's own log."""

    kind: str  # started, wave, healthy, failed, halted, completed, paused, resumed, ...
    node: str | None
    message: str


Command = PointPool | PowerPxe | Step
Result = tuple[Rollout, list[Command]]


# ---------------------------------------------------------------------------- transitions


def start(spec: RolloutSpec, rollout_id: str, now: float,
          current: Mapping[str, NodeSeen]) -> Result:
    """Rule 1."""
    if not spec.nodes:
        raise ValueError(f"pool {spec.pool} has no nodes to roll out to")
    if spec.max_unavailable < 1 or spec.canary < 0 or spec.max_failed < 0:
        raise ValueError("canary >= 0, max_unavailable >= 1 and max_failed >= 0")
    nodes = []
    for name in spec.nodes:
        seen = current.get(name)
        if seen is not None and seen.stage == "joined" and seen.image == spec.new_ref:
            nodes.append(NodeProgress(name, HEALTHY, error=None))
        else:
            nodes.append(NodeProgress(name))
    rollout = Rollout(rollout_id, spec, RUNNING, tuple(nodes), -1, now, now)
    cmds: list[Command] = [
        PointPool(spec.image, spec.pool, spec.version),
        Step("started", None, f"{spec.pool} -> {spec.new_ref} (from "
             f"{spec.old_ref or 'no earlier version'}); {len(spec.nodes)} nodes, canary "
             f"{spec.canary}, max unavailable {spec.max_unavailable}, max failed "
             f"{spec.max_failed}")]
    already = [n.name for n in nodes if n.state == HEALTHY]
    if already:
        cmds.append(Step("skipped", None, f"already on {spec.new_ref}: "
                         + ", ".join(already)))
    return _advance(rollout, now, cmds)


def observe(r: Rollout, seen: NodeSeen, now: float) -> Result:
    """Rule 2 (and rule 4's reverting nodes)."""
    node = r.node(seen.name)
    if node is None or node.since is None or seen.at < node.since:
        return r, []
    spec = r.spec
    if node.state == BOOTING and r.phase in (RUNNING, PAUSED):
        if seen.stage == "joined" and seen.image == spec.new_ref:
            return _node(r, node, HEALTHY, now, None, Step(
                "healthy", node.name, f"joined on {spec.new_ref}"))
        if seen.stage == "joined":
            return _node(r, node, FAILED, now, f"joined on {seen.image or 'an unknown image'}"
                         f", not {spec.new_ref}")
        if seen.stage == "failed":
            return _node(r, node, FAILED, now, "reported failed"
                         + (f": {seen.message}" if seen.message else ""))
        return r, []
    if node.state == REVERTING:
        if seen.stage == "joined" and (spec.old_ref is None or seen.image == spec.old_ref):
            return _node(r, node, REVERTED, now, node.error, Step(
                "reverted", node.name, f"back on {seen.image}"))
        if seen.stage in ("joined", "failed"):
            return _node(r, node, REVERT_FAILED, now, f"revert: {seen.stage} on "
                         f"{seen.image or 'an unknown image'}")
    return r, []


def power_done(r: Rollout, name: str, ok: bool, error: str | None, now: float,
               since: float | None = None) -> Result:
    """A BMC's answer to a PowerPxe: a refusal fails the node (rule 2). `since`: the
    cycle it answers; a stale answer changes nothing (rule 8)."""
    node = r.node(name)
    if node is None or (since is not None and node.since != since):
        return r, []
    if ok:
        if node.state in (BOOTING, REVERTING) and not node.powered:
            r = replace(r, nodes=tuple(replace(n, powered=True) if n.name == name else n
                                       for n in r.nodes), updated=now)
        return r, []
    if node.state == BOOTING:
        return _node(r, node, FAILED, now, f"power: {error}")
    if node.state == REVERTING:
        return _node(r, node, REVERT_FAILED, now, f"revert power: {error}")
    return r, []


def tick(r: Rollout, now: float) -> Result:
    """Nodes past their timeout fail (rule 2)."""
    cmds: list[Command] = []
    for node in r.nodes:
        if node.since is None or now - node.since <= r.spec.timeout:
            continue
        if node.state == BOOTING and r.phase in (RUNNING, PAUSED):
            r, more = _node(r, node, FAILED, now, f"not joined on {r.spec.new_ref} within "
                            f"{r.spec.timeout:g}s")
            cmds += more
        elif node.state == REVERTING:
            r, more = _node(r, node, REVERT_FAILED, now, f"not back within "
                            f"{r.spec.timeout:g}s")
            cmds += more
    return r, cmds


def restarted(r: Rollout, now: float) -> Result:
    """bootd restarted (rule 7): cycles asked for but never confirmed are asked again."""
    if not r.active:
        return r, []
    again = [n for n in r.nodes if n.state in (BOOTING, REVERTING) and not n.powered]
    nodes = tuple(replace(n, since=now) if n in again else n for n in r.nodes)
    r = replace(r, nodes=nodes, updated=now)
    note = f"bootd restarted: the rollout goes on ({r.phase})"
    if again:
        note += "; cycling again " + ", ".join(n.name for n in again)
    cmds: list[Command] = [Step("restarted", None, note)]
    cmds += [PowerPxe(n.name, "rollout" if n.state == BOOTING else "revert") for n in again]
    return _logged(r, now, cmds)


def taken_over(r: Rollout, member: str, now: float) -> Result:
    """Rule 8: `member` drives the rollout from now on (after its own restart, too)."""
    if not r.active:
        return r, []
    again = [n for n in r.nodes if n.state in (BOOTING, REVERTING) and not n.powered]
    nodes = tuple(replace(n, since=now) if n in again else n for n in r.nodes)
    before = r.runner
    r = replace(r, nodes=nodes, runner=member, updated=now)
    note = (f"{member} drives the rollout" if before is None else
            f"{member} drives the rollout again" if before == member else
            f"{member} took over the rollout from {before}")
    if again:
        note += "; cycling " + ", ".join(n.name for n in again)
    cmds: list[Command] = [Step("runner", None, note)]
    cmds += [PowerPxe(n.name, "rollout" if n.state == BOOTING else "revert") for n in again]
    return _logged(r, now, cmds)


def pause(r: Rollout, now: float, reason: str = "paused by the operator") -> Result:
    if r.phase != RUNNING:
        return r, []
    r = replace(r, phase=PAUSED, reason=reason, updated=now)
    return _logged(r, now, [Step("paused", None, reason)])


def resume(r: Rollout, now: float) -> Result:
    if r.phase != PAUSED:
        return r, []
    r = replace(r, phase=RUNNING, reason=None, updated=now)
    return _advance(r, now, [Step("resumed", None, "resumed")])


def abort(r: Rollout, now: float) -> Result:
    """Rule 5: the pointer goes back, nothing is power-cycled."""
    if r.phase not in (RUNNING, PAUSED):
        return r, []
    r = replace(r, phase=ABORTED, reason="aborted by the operator", finished=now,
                updated=now)
    return _logged(r, now, [PointPool(r.spec.image, r.spec.pool, r.spec.pointer_before),
                            Step("aborted", None, f"aborted; {r.spec.pool} points back at "
                                 f"{r.spec.old_ref or 'its earlier version'}")])


def interrupted(r: Rollout, now: float, reason: str) -> Result:
    """Rule 5: someone else moved the pool's pointer; the rollout steps aside."""
    if r.phase not in (RUNNING, PAUSED):
        return r, []
    r = replace(r, phase=ABORTED, reason=reason, finished=now, updated=now)
    return _logged(r, now, [Step("aborted", None, reason)])


# ---------------------------------------------------------------------------- helpers


def _node(r: Rollout, node: NodeProgress, state: str, now: float, error: str | None,
          step: Step | None = None) -> Result:
    changed = replace(node, state=state, error=error)
    r = replace(r, nodes=tuple(changed if n.name == node.name else n for n in r.nodes),
                updated=now)
    cmds: list[Command] = [step] if step is not None else [
        Step(state, node.name, error or state)]
    return _advance(r, now, cmds)


def _logged(r: Rollout, now: float, cmds: list[Command]) -> Result:
    lines = [(now, (f"{c.node}: " if c.node else "") + c.message)
             for c in cmds if isinstance(c, Step)]
    if lines:
        r = replace(r, log=(*r.log, *lines)[-LOG_LIMIT:])
    return r, cmds


def _advance(r: Rollout, now: float, cmds: list[Command]) -> Result:
    """Rules 3 and 4, after any change."""
    if r.phase not in (RUNNING, PAUSED):
        return _logged(r, now, cmds)
    spec = r.spec
    failed = [n for n in r.nodes if n.state == FAILED]
    canary_failed = [n for n in failed if n.wave == 0 and spec.canary > 0]
    if canary_failed or len(failed) > spec.max_failed:
        why = (f"canary {canary_failed[0].name} failed: {canary_failed[0].error}"
               if canary_failed else
               f"{len(failed)} nodes failed (max {spec.max_failed}): "
               + "; ".join(f"{n.name}: {n.error}" for n in failed))
        return _halt(r, now, why, cmds)
    if any(n.state == BOOTING for n in r.nodes):
        return _logged(r, now, cmds)
    if r.phase == PAUSED:
        return _logged(r, now, cmds)
    waiting = [n for n in r.nodes if n.state == WAITING]
    if not waiting:
        r = replace(r, phase=COMPLETED, finished=now, updated=now)
        done = f"completed: {r.count(HEALTHY)} of {len(r.nodes)} nodes on {spec.new_ref}"
        if failed:
            done += f", {len(failed)} failed (within max {spec.max_failed})"
        return _logged(r, now, [*cmds, Step("completed", None, done)])
    wave = r.wave + 1
    size = spec.canary if wave == 0 and spec.canary > 0 else spec.max_unavailable
    if wave == 0 and spec.canary == 0:
        wave = 1  # no canary: the first wave is an ordinary one
    chosen = {n.name for n in waiting[:size]}
    nodes = tuple(replace(n, state=BOOTING, wave=wave, since=now, error=None)
                  if n.name in chosen else n for n in r.nodes)
    r = replace(r, nodes=nodes, wave=wave, updated=now)
    label = "canary" if wave == 0 else f"wave {wave}"
    cmds = [*cmds, Step("wave", None, f"{label}: " + ", ".join(sorted(chosen)))]
    cmds += [PowerPxe(name, "rollout") for name in sorted(chosen)]
    return _logged(r, now, cmds)


def _halt(r: Rollout, now: float, why: str, cmds: list[Command]) -> Result:
    spec = r.spec
    back = [n.name for n in r.nodes if n.state in (FAILED, BOOTING)]
    # a revert is a new power cycle: unconfirmed until its BMC answers (rule 7)
    nodes = tuple(replace(n, state=REVERTING, since=now, powered=False) if n.name in back
                  else n for n in r.nodes)
    r = replace(r, phase=HALTED, nodes=nodes, reason=why, finished=now, updated=now)
    cmds = [*cmds, PointPool(spec.image, spec.pool, spec.pointer_before),
            Step("halted", None, f"halted: {why}; {spec.pool} points back at "
                 f"{spec.old_ref or 'its earlier version'}"
                 + (f"; reverting {', '.join(back)}" if back else ""))]
    cmds += [PowerPxe(name, "revert") for name in back]
    return _logged(r, now, cmds)

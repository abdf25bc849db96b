"""The rollout shell: runs bootd/power/rollout.py's commands, feeds it what nodes do.

Once a second it gives the state machine the time and what each node it waits for was
last seen doing (from the boot-event recorder), then carries out the commands it
returns: a pool pointer written to the image store (and the runtime snapshot rebuilt so
new boots see it), a one-time network boot through the node's BMC (in the background;
its answer is fed back), a log line, a metric and a `power` event in the node's
timeline. After every change the rollout is written to `<state_dir>/rollouts.json`
(temporary file, fsync, rename), so a restarted bootd picks it up where it was: a
running rollout goes on, with each node's deadline counted from its power cycle. One
rollout runs at a time; the last finished ones are kept for `bootd rollout status`.
"""

from __future__ import annotations

import asyncio
import json
import math
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import structlog
from prometheus_client import Counter

from bootd.fleet.images import ImageCatalog, split_ref
from bootd.fleet.imagestore import ImageStore
from bootd.fleet.inventory import NodeProfile
from bootd.power import rollout as ro
from bootd.power.bmc import PowerControl, PowerError, target_for

log = structlog.get_logger("bootd.rollout")

TICK = 1.0
HISTORY = 10  # finished rollouts kept
STEPS = Counter("bootd_rollout_steps", "Rollout steps, by kind (wave, healthy, failed, "
                "halted, completed, ...)", ["kind"])


class RolloutError(Exception):
    """Why a rollout request cannot be carried out, for the operator."""


def parse_count(text: str | int, total: int) -> int:
    """`--max-unavailable 2` or `10%` (of the pool, rounded up, at least 1)."""
    value = str(text).strip()
    try:
        if value.endswith("%"):
            return max(1, math.ceil(total * float(value[:-1]) / 100))
        return int(value)
    except ValueError:
        raise RolloutError(f"expected a number or a percentage, got {value!r}") from None


class Rollouts:
    def __init__(self, path: Path, store: ImageStore, *,
                 pool_nodes: Callable[[str], list[NodeProfile]],
                 images: Callable[[], ImageCatalog],
                 seen: Callable[[str], ro.NodeSeen | None],
                 repoint: Callable[[], None],
                 record: Callable[[str, float, str, dict[str, Any]], None],
                 power: PowerControl | None = None, clustered: bool = False,
                 clock: Callable[[], float] = time.time) -> None:
        """`pool_nodes`: a pool's configured nodes; `images`: the running snapshot's
        catalog; `seen`: what a node was last seen doing; `repoint`: rebuild the runtime
        snapshot after a pointer change; `record`: a `power` event in a node's timeline
        (node, when, outcome, detail). `clustered`: cluster mode, where rollouts are
        refused (see start)."""
        self.path, self.store = path, store
        self.clustered = clustered
        self.pool_nodes, self.images, self.seen = pool_nodes, images, seen
        self.repoint, self.record = repoint, record
        self.power = power or PowerControl()
        self.clock = clock
        self.current: ro.Rollout | None = None
        self.history: list[dict[str, Any]] = []
        self._restart: list[ro.Command] = []  # a resumed rollout's first commands
        self._powering: set[asyncio.Task[None]] = set()
        self._load()

    # ------------------------------------------------------------------ persistence

    def _load(self) -> None:
        try:
            data = json.loads(self.path.read_text())
        except FileNotFoundError:
            return
        except (OSError, ValueError) as exc:
            log.error("rollout state unreadable: none resumed", path=str(self.path),
                      error=str(exc))
            return
        try:
            self.history = list(data.get("history", []))[-HISTORY:]
            if data.get("current") is not None:
                self.current = ro.Rollout.from_json(data["current"])
        except (KeyError, TypeError, ValueError) as exc:
            log.error("rollout state unreadable: none resumed", path=str(self.path),
                      error=str(exc))
            return
        if self.current is not None and self.current.active:
            self.current, self._restart = ro.restarted(self.current, self.clock())
            log.warning("rollout resumed after a restart", id=self.current.id,
                        phase=self.current.phase, pool=self.current.spec.pool)

    def _save(self) -> None:
        data = {"current": self.current.to_json() if self.current else None,
                "history": self.history[-HISTORY:]}
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(f".{self.path.name}.tmp")
        with tmp.open("w") as f:
            json.dump(data, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.path)

    # ------------------------------------------------------------------ requests

    def start(self, pool: str, image_ref: str, *, canary: int = 1,
              max_unavailable: str | int = "10%", max_failed: int = 1,
              timeout: float = 900.0) -> ro.Rollout:
        if self.clustered:
            # NOT BUILT: in cluster mode the pointers would have to live in etcd; each
            # member's image store has its own, so members would disagree about what the
            # pool boots and a node could get the old version from another member
            raise RolloutError("rollouts are not available in cluster mode yet: image "
                               "pointers live in each member's image store, not in etcd")
        if self.current is not None and self.current.active:
            raise RolloutError(f"rollout {self.current.id} ({self.current.spec.pool}) is "
                               f"{self.current.phase}: abort it or let it finish first")
        name, version = split_ref(image_ref)
        if version is None:
            raise RolloutError("name the version: --image NAME@VERSION")
        if version not in self.store.names().get(name, set()):
            raise RolloutError(f"image {name} has no version {version} in the image store")
        nodes = sorted(self.pool_nodes(pool), key=lambda n: n.name)
        if not nodes:
            raise RolloutError(f"no configured nodes in pool {pool!r}")
        other = sorted({n.image or "-" for n in nodes if split_ref(n.image or "")[0] != name})
        pinned = sorted(n.name for n in nodes if n.image and split_ref(n.image)[1])
        if other:
            raise RolloutError(f"pool {pool} boots {', '.join(other)}, not {name}")
        if pinned:
            raise RolloutError(f"{', '.join(pinned)} pin a version of {name} in the config; "
                               "a rollout moves only nodes that follow the image")
        missing = [n.name for n in nodes if n.power is None]
        if missing:
            raise RolloutError(f"no `power:` for {', '.join(missing)}: bootd cannot boot "
                               "them onto the new version")
        previous = self.images().version_for(name, pool)
        spec = ro.RolloutSpec(
            pool=pool, image=name, version=version, previous=previous,
            nodes=tuple(n.name for n in nodes), canary=canary,
            max_unavailable=parse_count(max_unavailable, len(nodes)), max_failed=max_failed,
            timeout=timeout, pointer_before=self.store.pointers(name).pools.get(pool))
        now = self.clock()
        current = {n.name: s for n in nodes if (s := self.seen(n.name)) is not None}
        try:
            rollout, cmds = ro.start(spec, f"r{int(now)}", now, current)
        except ValueError as exc:
            raise RolloutError(str(exc)) from None
        if self.current is not None:
            self.history.append(self.current.to_json())
        self.current = rollout
        self._apply(cmds)
        return self.current

    def pause(self) -> ro.Rollout:
        return self._operator(ro.pause)

    def resume(self) -> ro.Rollout:
        return self._operator(ro.resume)

    def abort(self) -> ro.Rollout:
        return self._operator(ro.abort)

    def _operator(self, change: Callable[[ro.Rollout, float], ro.Result]) -> ro.Rollout:
        if self.current is None:
            raise RolloutError("no rollout")
        self.current, cmds = change(self.current, self.clock())
        self._apply(cmds)
        return self.current

    def status(self) -> dict[str, Any]:
        return {"current": self.current.to_json() if self.current else None,
                "history": self.history[-HISTORY:]}

    def node_note(self, name: str) -> str | None:
        """A node's part in the current rollout, for `bootd status`."""
        r = self.current
        node = r.node(name) if r is not None and r.active else None
        if r is None or node is None:
            return None
        return f"{r.id} {r.spec.new_ref}: {node.state}"

    # ------------------------------------------------------------------ the loop

    async def run(self) -> None:
        if self._restart:
            self._apply(self._restart)
            self._restart = []
        try:
            while True:
                self.step()
                await asyncio.sleep(TICK)
        finally:
            for task in list(self._powering):
                task.cancel()

    def step(self) -> None:
        r = self.current
        if r is None or not r.active:
            return
        now = self.clock()
        cmds: list[ro.Command] = []
        if r.phase in (ro.RUNNING, ro.PAUSED):
            pointer = self.store.pointers(r.spec.image).pools.get(r.spec.pool)
            if pointer != r.spec.version:
                r, more = ro.interrupted(r, now, f"the pool's pointer was changed outside "
                                         f"the rollout (now {pointer or 'none'})")
                cmds += more
        r, more = ro.tick(r, now)
        cmds += more
        for node in r.nodes:
            if node.state in (ro.BOOTING, ro.REVERTING):
                seen = self.seen(node.name)
                if seen is not None:
                    r, more = ro.observe(r, seen, now)
                    cmds += more
        changed = r != self.current
        self.current = r
        if changed or cmds:
            self._apply(cmds)

    def _apply(self, cmds: list[ro.Command]) -> None:
        r = self.current
        assert r is not None
        repoint = False
        for cmd in cmds:
            if isinstance(cmd, ro.PointPool):
                self.store.set_pool(cmd.image, cmd.pool, cmd.version)
                repoint = True
            elif isinstance(cmd, ro.PowerPxe):
                task = asyncio.get_running_loop().create_task(self._pxe(r.id, cmd))
                self._powering.add(task)
                task.add_done_callback(self._powering.discard)
            else:
                STEPS.labels(cmd.kind).inc()
                log.info(f"rollout {cmd.kind}", id=r.id, pool=r.spec.pool,
                         image=r.spec.new_ref, node=cmd.node, message=cmd.message)
        self._save()
        if repoint:
            self.repoint()

    async def _pxe(self, rollout_id: str, cmd: ro.PowerPxe) -> None:
        # the event is recorded when the cycle is asked for: the machine may boot and
        # report before its BMC's answer comes back, and its timeline must begin here
        detail = {"action": "pxe", "rollout": rollout_id, "reason": cmd.reason}
        self.record(cmd.node, self.clock(), "ok", detail)
        node = next((n for n in self.pool_nodes(self._pool()) if n.name == cmd.node), None)
        try:
            if node is None:
                raise PowerError(f"{cmd.node} is no longer in the config")
            result = await self.power.one(target_for(node), "pxe")
            ok, error = result.ok, result.error
        except PowerError as exc:
            ok, error = False, str(exc)
        if not ok:
            self.record(cmd.node, self.clock(), "error", {**detail, "message": error})
            log.warning("rollout power failed", id=rollout_id, node=cmd.node, error=error)
        if self.current is not None and self.current.id == rollout_id:
            self.current, more = ro.power_done(self.current, cmd.node, ok, error,
                                               self.clock())
            if more or not ok:
                self._apply(more)

    def _pool(self) -> str:
        return self.current.spec.pool if self.current is not None else ""

"""The rollout shell: runs bootd/power/rollout.py's transitions, feeds it what nodes do.

Theory of operation
-------------------

A rollout and the pool pointers it moves are kept in a book: `LocalBook` (a single
instance: `<state_dir>/rollouts.json`, written by temporary file, fsync and rename, and
the image store's pointers) or `SharedBook` (cluster mode: `rollouts/current` and
`images/NAME/pointers` in etcd, bootd/state/cluster.py rule 10).

Rules:

1. Every change is read -> pure transition -> write, and the write is conditional on
   nothing having changed since the read (in etcd: one compare-and-swap transaction
   holding the rollout and the pointers it moves, so no member ever sees one without
   the other). A lost race is decided again on what won, a few times at most. Any
   member may change a rollout: `start`, `pause`, `resume`, `abort` work wherever the
   operator asks.
2. One member drives it: the one holding the book's runner claim (a single instance
   always does; in cluster mode `rollouts/runner`, under the member's lease, so that
   when the runner dies the claim expires and another member takes over, with
   rollout.py rule 8). Only the runner ticks the rollout, feeds it what nodes did, and
   powers nodes.
3. Power is level-triggered: the runner power-cycles every node that the rollout has
   booting or reverting, whose cycle its BMC has not confirmed, and that it has not
   asked for yet (keyed by the cycle's start). So a wave started by another member, a
   halt's reverts, and the cycles a dead runner never saw confirmed are all carried out
   by the same path. The power event in the node's timeline bears the time the cycle
   was asked for: the machine may boot and report before its BMC's answer comes back.
4. The steps a transition returns are logged and counted by the member that made it;
   the pointers it moved are seen by the next runtime snapshot: the book rebuilds it
   (LocalBook's `repoint`), and in cluster mode every member's image records listener
   does (bootd/fleet/imagesync.py rule 2).
5. After a restart of a single instance the rollout goes on (rollout.py rule 7); the
   last finished rollouts are kept for `bootd rollout status`.
"""

from __future__ import annotations

import asyncio
import json
import math
import os
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any, Protocol

import orjson
import structlog
from prometheus_client import Counter

from bootd.fleet.images import split_ref
from bootd.fleet.imagestore import ImageStore, ImageStoreError, Pointers
from bootd.fleet.imagesync import SharedImages
from bootd.fleet.inventory import NodeProfile
from bootd.power import rollout as ro
from bootd.power.bmc import PowerControl, PowerError, target_for
from bootd.state.cluster import (
    ROLLOUT_CURRENT,
    ROLLOUT_HISTORY,
    ROLLOUT_RUNNER,
    encode_pointers,
    image_pointers_key,
)
from bootd.state.etcd import EtcdCluster, NotRegistered

log = structlog.get_logger("bootd.rollout")

TICK = 1.0
HISTORY = 10  # finished rollouts kept
ATTEMPTS = 5  # rule 1's rounds before a change gives up
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


# ---------------------------------------------------------------------------- books


class Book(Protocol):
    member: str | None  # cluster mode: this member's name (rollout.py rule 8)

    def read(self) -> tuple[ro.Rollout | None, int]:
        """The rollout and a token that `write` is conditional on."""

    def history(self) -> list[dict[str, Any]]: ...

    def pointers(self, image: str) -> Pointers: ...

    def check_version(self, image: str, version: str) -> None:
        """RolloutError unless every member can serve the version."""

    async def write(self, token: int, new: ro.Rollout, points: list[ro.PointPool],
                    archive: ro.Rollout | None) -> bool:
        """The rollout, and the pointers it moves, if nothing changed since `token`
        (rule 1); `archive`: a finished rollout the new one replaces."""

    async def claim(self) -> bool:
        """Whether this member drives the rollout (rule 2)."""


class LocalBook:
    """A single instance's: rollouts.json and the image store's pointers."""

    member: str | None = None

    def __init__(self, path: Path, store: ImageStore, clock: Callable[[], float],
                 repoint: Callable[[], None] = lambda: None) -> None:
        """`repoint`: rebuild the runtime snapshot after a pointer change."""
        self.path, self.store, self.repoint = path, store, repoint
        self._current: ro.Rollout | None = None
        self._history: list[dict[str, Any]] = []
        self._token = 0
        self._load(clock())

    def _load(self, now: float) -> None:
        try:
            data = json.loads(self.path.read_text())
            history = list(data.get("history", []))[-HISTORY:]
            current = (ro.Rollout.from_json(data["current"])
                       if data.get("current") is not None else None)
        except FileNotFoundError:
            return
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
            log.error("rollout state unreadable: none resumed", path=str(self.path),
                      error=str(exc))
            return
        self._history = history
        if current is not None and current.active:
            current, _ = ro.restarted(current, now)  # rule 5; the cycles: rule 3
            log.warning("rollout resumed after a restart", id=current.id,
                        phase=current.phase, pool=current.spec.pool)
        self._current = current

    def read(self) -> tuple[ro.Rollout | None, int]:
        return self._current, self._token

    def history(self) -> list[dict[str, Any]]:
        return self._history[-HISTORY:]

    def pointers(self, image: str) -> Pointers:
        return self.store.pointers(image)

    def check_version(self, image: str, version: str) -> None:
        if version not in self.store.names().get(image, set()):
            raise RolloutError(f"image {image} has no version {version} in the image store")

    async def write(self, token: int, new: ro.Rollout, points: list[ro.PointPool],
                    archive: ro.Rollout | None) -> bool:
        if token != self._token:
            return False
        for point in points:
            self.store.set_pool(point.image, point.pool, point.version)
        if archive is not None:
            self._history = [*self._history, archive.to_json()][-HISTORY:]
        self._current, self._token = new, token + 1
        data = {"current": new.to_json(), "history": self._history}
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(f".{self.path.name}.tmp")
        with tmp.open("w") as f:
            json.dump(data, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.path)
        if points:
            self.repoint()
        return True

    async def claim(self) -> bool:
        return True


class SharedBook:
    """Cluster mode's: the rollout, its history and the runner claim in etcd."""

    def __init__(self, cluster: EtcdCluster, images: SharedImages) -> None:
        self.cluster, self.images = cluster, images
        self.member: str | None = cluster.me
        self._current = cluster.key(ROLLOUT_CURRENT)
        self._runner = cluster.key(ROLLOUT_RUNNER)
        self._decoded: tuple[int, ro.Rollout | None] = (0, None)

    def read(self) -> tuple[ro.Rollout | None, int]:
        found = self.cluster.shared(self._current)
        if found is None:
            return None, 0
        value, revision = found
        if self._decoded[0] != revision:  # status asks per node: decode once per change
            try:
                rollout: ro.Rollout | None = ro.Rollout.from_json(orjson.loads(value))
            except (ValueError, KeyError, TypeError, AttributeError) as exc:
                log.error("cluster: rollout record unreadable: treated as none",
                          error=str(exc))
                rollout = None
            self._decoded = (revision, rollout)
        return self._decoded[1], revision

    def _history_items(self) -> list[tuple[bytes, dict[str, Any]]]:
        out = []
        for key, value, _ in self.cluster.shared_items(ROLLOUT_HISTORY):
            try:
                doc = orjson.loads(value)
                out.append((key, doc, float(doc["started"])))
            except (ValueError, KeyError, TypeError):
                continue
        return [(k, d) for k, d, _ in sorted(out, key=lambda item: item[2])]

    def history(self) -> list[dict[str, Any]]:
        return [doc for _, doc in self._history_items()][-HISTORY:]

    def pointers(self, image: str) -> Pointers:
        return self.images.pointers(image)

    def check_version(self, image: str, version: str) -> None:
        try:
            self.images.require_everywhere(image, version)
        except ImageStoreError as exc:
            raise RolloutError(str(exc)) from None

    async def write(self, token: int, new: ro.Rollout, points: list[ro.PointPool],
                    archive: ro.Rollout | None) -> bool:
        writes: dict[bytes, bytes | None] = {self._current: orjson.dumps(new.to_json())}
        moved: dict[str, Pointers] = {}
        for point in points:
            ptr = moved.get(point.image) or self.images.pointers(point.image)
            moved[point.image] = ptr.with_pool(point.pool, point.version)
        for image, ptr in moved.items():
            writes[image_pointers_key(self.cluster.prefix, image)] = encode_pointers(ptr)
        if archive is not None:
            writes[self.cluster.key(ROLLOUT_HISTORY + archive.id)] = orjson.dumps(
                archive.to_json())
            for key, _ in self._history_items()[:-(HISTORY - 1)]:
                writes[key] = None
        return await self.cluster.cas(writes, expect={self._current: token})

    async def claim(self) -> bool:
        if not self.cluster.membership().registered:
            return False
        me = self.cluster.me.encode()
        found = self.cluster.shared(self._runner)
        if found is not None:
            return found[0] == me
        return await self.cluster.cas({self._runner: me}, leased=frozenset({self._runner}))

    def runner(self) -> str | None:
        found = self.cluster.shared(self._runner)
        return found[0].decode(errors="replace") if found is not None else None


# ---------------------------------------------------------------------------- the shell

Change = Callable[[ro.Rollout | None], ro.Result | None]


class Rollouts:
    def __init__(self, book: Book, *,
                 pool_nodes: Callable[[str], list[NodeProfile]],
                 seen: Callable[[str], ro.NodeSeen | None],
                 record: Callable[[str, float, str, dict[str, Any]], None],
                 power: PowerControl | None = None,
                 clock: Callable[[], float] = time.time) -> None:
        """`pool_nodes`: a pool's configured nodes; `seen`: what a node was last seen
        doing; `record`: a `power` event in a node's timeline (node, when, outcome,
        detail)."""
        self.book = book
        self.pool_nodes, self.seen = pool_nodes, seen
        self.record = record
        self.power = power or PowerControl()
        self.clock = clock
        self._driving = book.member is None  # a single instance always drives
        self._asked: set[tuple[str, str, str, float]] = set()  # rule 3
        self._powering: set[asyncio.Task[None]] = set()

    @property
    def current(self) -> ro.Rollout | None:
        return self.book.read()[0]

    # ------------------------------------------------------------------ requests

    async def start(self, pool: str, image_ref: str, *, canary: int = 1,
                    max_unavailable: str | int = "10%", max_failed: int = 1,
                    timeout: float = 900.0) -> ro.Rollout:
        name, version = split_ref(image_ref)
        if version is None:
            raise RolloutError("name the version: --image NAME@VERSION")
        self.book.check_version(name, version)
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

        def begin(current: ro.Rollout | None) -> ro.Result:
            if current is not None and current.active:
                raise RolloutError(f"rollout {current.id} ({current.spec.pool}) is "
                                   f"{current.phase}: abort it or let it finish first")
            ptr = self.book.pointers(name)
            spec = ro.RolloutSpec(
                pool=pool, image=name, version=version,
                previous=ptr.pools.get(pool) or ptr.promoted,
                nodes=tuple(n.name for n in nodes), canary=canary,
                max_unavailable=parse_count(max_unavailable, len(nodes)),
                max_failed=max_failed, timeout=timeout, pointer_before=ptr.pools.get(pool))
            now = self.clock()
            seen = {n.name: s for n in nodes if (s := self.seen(n.name)) is not None}
            try:
                rollout, cmds = ro.start(spec, f"r{int(now)}", now, seen)
            except ValueError as exc:
                raise RolloutError(str(exc)) from None
            # the driving member powers the canary now; any other leaves it to the
            # runner, which takes the rollout over first (rollout.py rule 8)
            driver = self.book.member if self._driving else None
            return replace(rollout, runner=driver), cmds

        started = await self._change(begin, archive=True)
        assert started is not None
        return started

    async def pause(self) -> ro.Rollout:
        return await self._operator(ro.pause)

    async def resume(self) -> ro.Rollout:
        return await self._operator(ro.resume)

    async def abort(self) -> ro.Rollout:
        return await self._operator(ro.abort)

    async def _operator(self, verb: Callable[[ro.Rollout, float], ro.Result]) -> ro.Rollout:
        def change(current: ro.Rollout | None) -> ro.Result:
            if current is None:
                raise RolloutError("no rollout")
            return verb(current, self.clock())

        done = await self._change(change)
        assert done is not None
        return done

    def status(self) -> dict[str, Any]:
        current = self.current
        doc: dict[str, Any] = {"current": current.to_json() if current else None,
                               "history": self.book.history()}
        if isinstance(self.book, SharedBook):
            doc["runner"] = self.book.runner()
        return doc

    def node_note(self, name: str) -> str | None:
        """A node's part in the current rollout, for `bootd status`."""
        r = self.current
        node = r.node(name) if r is not None and r.active else None
        if r is None or node is None:
            return None
        return f"{r.id} {r.spec.new_ref}: {node.state}"

    # ------------------------------------------------------------------ rule 1

    async def _change(self, change: Change, archive: bool = False) -> ro.Rollout | None:
        for _ in range(ATTEMPTS):
            current, token = self.book.read()
            result = change(current)
            if result is None:
                return current
            new, cmds = result
            if new == current and not cmds:
                return current
            replaced = current if archive and current is not None else None
            points = [c for c in cmds if isinstance(c, ro.PointPool)]
            if await self.book.write(token, new, points, replaced):
                self._carry_out(new, cmds)
                return new
        raise RolloutError("the rollout kept changing under this request (another "
                           "member changed it); try again")

    def _carry_out(self, r: ro.Rollout, cmds: list[ro.Command]) -> None:
        """Rule 4 (power: rule 3)."""
        for cmd in cmds:
            if isinstance(cmd, ro.Step):
                STEPS.labels(cmd.kind).inc()
                log.info(f"rollout {cmd.kind}", id=r.id, pool=r.spec.pool,
                         image=r.spec.new_ref, node=cmd.node, message=cmd.message)
        if self._driving:
            self._power_due(r)

    # ------------------------------------------------------------------ the loop (rule 2)

    async def run(self) -> None:
        try:
            while True:
                try:
                    await self.round()
                except (RolloutError, NotRegistered) as exc:
                    log.warning("rollout round skipped", error=str(exc))
                except Exception as exc:  # etcd's errors (a timeout, an election)
                    log.warning("rollout round failed; trying again",
                                error=str(exc) or type(exc).__name__)
                await asyncio.sleep(TICK)
        finally:
            for task in list(self._powering):
                task.cancel()

    async def round(self) -> None:
        r = self.current
        if r is None or not r.active:
            return
        if not await self.book.claim():
            self._driving = False
            return
        member, first = self.book.member, not self._driving
        self._driving = True
        if member is not None and (first or r.runner != member):
            await self._change(lambda r: ro.taken_over(r, member, self.clock())
                               if r is not None and r.active else None)
        await self.step()
        r = self.current
        if r is not None:
            self._power_due(r)

    async def step(self) -> None:
        def advance(r: ro.Rollout | None) -> ro.Result | None:
            if r is None or not r.active:
                return None
            now = self.clock()
            cmds: list[ro.Command] = []
            if r.phase in (ro.RUNNING, ro.PAUSED):
                pointer = self.book.pointers(r.spec.image).pools.get(r.spec.pool)
                if pointer != r.spec.version:
                    r, more = ro.interrupted(r, now, "the pool's pointer was changed "
                                             f"outside the rollout (now {pointer or 'none'})")
                    cmds += more
            r, more = ro.tick(r, now)
            cmds += more
            for node in r.nodes:
                if node.state in (ro.BOOTING, ro.REVERTING):
                    seen = self.seen(node.name)
                    if seen is not None:
                        r, more = ro.observe(r, seen, now)
                        cmds += more
            return r, cmds

        await self._change(advance)

    def _power_due(self, r: ro.Rollout) -> None:
        """Rule 3."""
        for node in r.nodes:
            if node.state not in (ro.BOOTING, ro.REVERTING) or node.powered \
                    or node.since is None:
                continue
            key = (r.id, node.name, node.state, node.since)
            if key in self._asked:
                continue
            self._asked = {k for k in self._asked if k[0] == r.id} | {key}
            reason = "rollout" if node.state == ro.BOOTING else "revert"
            task = asyncio.get_running_loop().create_task(
                self._pxe(r.id, r.spec.pool, node.name, reason, node.since))
            self._powering.add(task)
            task.add_done_callback(self._powering.discard)

    async def _pxe(self, rollout_id: str, pool: str, name: str, reason: str,
                   since: float) -> None:
        detail = {"action": "pxe", "rollout": rollout_id, "reason": reason}
        self.record(name, self.clock(), "ok", detail)
        node = next((n for n in self.pool_nodes(pool) if n.name == name), None)
        try:
            if node is None:
                raise PowerError(f"{name} is no longer in the config")
            result = await self.power.one(target_for(node), "pxe")
            ok, error = result.ok, result.error
        except PowerError as exc:
            ok, error = False, str(exc)
        if not ok:
            self.record(name, self.clock(), "error", {**detail, "message": error})
            log.warning("rollout power failed", id=rollout_id, node=name, error=error)
        try:
            await self._change(lambda r: ro.power_done(r, name, ok, error, self.clock(),
                                                       since)
                               if r is not None and r.id == rollout_id else None)
        except Exception as exc:  # the next round's level trigger does not re-ask a
            # confirmed cycle; an unrecorded refusal is caught by the node's timeout
            log.warning("rollout: a BMC's answer could not be recorded", node=name,
                        error=str(exc) or type(exc).__name__)

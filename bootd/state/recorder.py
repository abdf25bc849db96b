"""Where boot events go: per-node histories in memory, batched into SQLite by one writer.

A boot storm of a thousand nodes produces thousands of events a second; recording one is
a list append, and the store sees one transaction per flush interval.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import structlog

from bootd.fleet.inventory import NodeProfile
from bootd.ops.metrics import Metrics
from bootd.state.events import (
    FINISHED,
    JOINED,
    REFUSED,
    BootEvent,
    NodeState,
    derive,
    starts_attempt,
)
from bootd.state.store import Store

log = structlog.get_logger("bootd.events")

MAX_EVENTS_PER_ATTEMPT = 2000  # a node in a retry loop cannot grow memory without bound
FLUSH_INTERVAL = 0.25
MAX_PENDING = 200_000  # events held while the store cannot be written


@dataclass(frozen=True)
class EventPolicy:
    """The config's `events:` block, one value per config load."""

    stall_after: float  # no progress this long: the node is stalled
    keep_attempts: int  # boot attempts kept per node


@dataclass
class _History:
    first_attempt: int = 1
    attempts: deque[list[BootEvent]] = field(default_factory=deque)

    @property
    def number(self) -> int:
        return self.first_attempt + len(self.attempts) - 1


class Recorder:
    def __init__(self, store: Store | None, policy: EventPolicy | Callable[[], EventPolicy], *,
                 clock: Callable[[], float] = time.time, metrics: Metrics | None = None,
                 ) -> None:
        """`policy`: a fixed one, or the current runtime snapshot's (read per event)."""
        self.store = store
        self.metrics = metrics
        self.policy = policy if callable(policy) else (lambda: policy)
        self.clock = clock
        self._nodes: dict[str, _History] = {}
        self._pending: list[tuple[BootEvent, int]] = []

    def load(self) -> int:
        """Rebuild histories from the store (after a restart); returns events loaded."""
        if self.store is None:
            return 0
        rows = self.store.load_events()
        for event, attempt in rows:
            h = self._nodes.setdefault(event.key, _History(first_attempt=attempt))
            while h.number < attempt:
                h.attempts.append([])
            h.attempts[-1].append(event)
        for h in self._nodes.values():
            while h.attempts and not h.attempts[0]:
                h.attempts.popleft()
                h.first_attempt += 1
        return len(rows)

    def record(self, event: BootEvent) -> None:
        h = self._nodes.setdefault(event.key, _History())
        policy = self.policy()
        if not h.attempts or starts_attempt(h.attempts[-1], event, policy.stall_after):
            h.attempts.append([])
            while len(h.attempts) > policy.keep_attempts:
                h.attempts.popleft()
                h.first_attempt += 1
        current = h.attempts[-1]
        if self.metrics is not None:
            self._observe(self.metrics, current, event)
        if len(current) >= MAX_EVENTS_PER_ATTEMPT:
            del current[1]  # keep how it started, drop the oldest repetition
        current.append(event)
        self._pending.append((event, h.number))

    @staticmethod
    def _observe(metrics: Metrics, current: list[BootEvent], event: BootEvent) -> None:
        metrics.boot_events.labels(event.stage, event.outcome).inc()
        if current and event.stage != REFUSED:
            previous = current[-1]
            metrics.stage_seconds.labels(previous.stage).observe(max(0.0, event.ts - previous.ts))
            if event.stage == JOINED and not any(e.stage in FINISHED for e in current):
                metrics.boot_seconds.observe(max(0.0, event.ts - current[0].ts))

    def update_gauges(self) -> None:
        """Nodes per stage, for a Prometheus scrape."""
        if self.metrics is None:
            return
        counts: dict[str, int] = {}
        for state in self.states():
            key = "stalled" if state.stalled else state.stage
            counts[key] = counts.get(key, 0) + 1
        self.metrics.nodes_by_stage.clear()
        for stage, count in counts.items():
            self.metrics.nodes_by_stage.labels(stage).set(count)

    def flush(self) -> int:
        batch, self._pending = self._pending, []
        if batch and self.store is not None:
            try:
                self.store.append_events(batch, self.policy().keep_attempts)
            except Exception:
                # keep them for the next flush (bounded: the newest win)
                self._pending = (batch + self._pending)[-MAX_PENDING:]
                raise
        return len(batch)

    async def run_flusher(self, interval: float = FLUSH_INTERVAL) -> None:
        try:
            while True:
                await asyncio.sleep(interval)
                try:
                    self.flush()
                except Exception as exc:  # a full disk must not stop nodes booting
                    log.error("event store write failed; will retry", error=str(exc),
                              pending=len(self._pending))
        finally:
            with contextlib.suppress(Exception):
                self.flush()

    def state(self, key: str) -> NodeState | None:
        h = self._nodes.get(key)
        if h is None:
            return None
        events = [e for attempt in h.attempts for e in attempt]
        return derive(events, self.clock(), self.policy().stall_after, h.first_attempt)

    def states(self) -> list[NodeState]:
        return [s for key in self._nodes if (s := self.state(key)) is not None]

    def status_document(self, configured: Iterable[NodeProfile],
                        network_of: Callable[[str | None], str | None] = lambda ip: None,
                        ) -> dict[str, Any]:
        """The `bootd status -o json` document: every node seen, then every configured
        node never seen (stage `never-seen`); `network_of` names the network of an
        address."""
        seen = {s.key: s for s in self.states()}
        nodes = [{**s.to_json(), "network": network_of(s.ip)} for s in seen.values()]
        for node in configured:
            if node.name not in seen:
                nodes.append({"node": node.name, "mac": node.macs[0] if node.macs else None,
                              "ip": str(node.ip) if node.ip else None, "pool": node.pool,
                              "network": node.network,
                              "stage": "never-seen", "stalled": False, "since": None,
                              "first_seen": None, "last_seen": None, "attempts": 0,
                              "last_error": None, "last_boot_time": None})
        return {"now": self.clock(), "nodes": nodes}

    def find(self, wanted: str) -> NodeState | None:
        """By node name, MAC or IP."""
        state = self.state(wanted)
        if state is not None:
            return state
        return next((s for s in self.states() if wanted in (s.mac, s.ip, s.name)), None)

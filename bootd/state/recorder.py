"""Where boot events go: per-node histories in memory, batched into SQLite by one writer.

A boot storm of a thousand nodes produces thousands of events a second; recording one is
a list append, and the store sees a few transactions per flush interval: at most
FLUSH_CHUNK events each, with the event loop let run between them. Writing an event
costs ~17 us, so one transaction for a quarter second of a 1,000 exchanges/s storm
(750 events) held every DHCP reply for ~13 ms (issue 15: the p99 at 1,000/s); a chunk
holds them for ~2 ms.

Machines bootd does not know that never got an address (a DISCOVER flood from random
MACs, a catch-all range that is full) are transient: at most MAX_TRANSIENT of them are
remembered, the least recently seen forgotten first, in memory and in the store, and
counted in bootd_nodes_forgotten_total. Any other event (an ACK, a download, a report)
makes a node permanent. A flood thus costs bounded memory and rows (issue 16, finding
1: 123,216 node keys and 324 MB before).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, replace
from types import MappingProxyType
from typing import Any

import structlog
from prometheus_client import Counter, Histogram

from bootd.fleet.inventory import NodeProfile
from bootd.fleet.mac import normalize_mac
from bootd.ops.metrics import Metrics
from bootd.state.events import (
    DHCP_DISCOVER,
    DHCP_NAK,
    DHCP_OFFER,
    FINISHED,
    JOINED,
    NOT_PROGRESS,
    REFUSED,
    BootEvent,
    NodeState,
    derive,
    split_attempts,
    starts_attempt,
)
from bootd.state.store import Store

log = structlog.get_logger("bootd.events")

MAX_EVENTS_PER_ATTEMPT = 2000  # a node in a retry loop cannot grow memory without bound
FLUSH_INTERVAL = 0.25
FLUSH_CHUNK = 128  # events per transaction, the loop runs between (see above)
MAX_PENDING = 200_000  # events held while the store cannot be written
MAX_TRANSIENT = 1000  # unknown machines without an address, remembered at once
STORE_LOG_INTERVAL = 60.0  # a failing store is logged once a minute, not per flush
UNPROVEN = frozenset({DHCP_DISCOVER, DHCP_OFFER, DHCP_NAK, REFUSED})


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
        self._event_counters: dict[tuple[str, str], Counter] = {}
        self._stage_histograms: dict[str, Histogram] = {}
        # (event, attempt, version): the version tells events of a forgotten node from
        # those of its next visit
        self._pending: list[tuple[BootEvent, int, int]] = []
        self._transient: OrderedDict[str, None] = OrderedDict()  # least recent first
        self._forgotten: dict[str, int] = {}  # key -> version when forgotten, until flushed
        self._store_logged = -STORE_LOG_INTERVAL
        # A counter bumped per event, and the value it had at each node's latest event:
        # a live page asks for what changed since the version it has.
        self.version = 0
        self._changed: dict[str, int] = {}
        self._derived: dict[str, tuple[tuple[int, float], NodeState]] = {}
        # cluster mode: this member's name goes into each event it records (`served_by`),
        # and `on_record` hears which node has news to share with the other members
        self.member: str | None = None
        self.on_record: Callable[[str], None] | None = None

    def load(self, known: Iterable[str] = ()) -> int:
        """Rebuild histories from the store (after a restart); returns events loaded.
        `known`: the configured nodes' names, never transient."""
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
        self._derived.clear()
        configured = set(known)
        unproven = [(h.attempts[-1][-1].ts if h.attempts and h.attempts[-1] else 0.0, key)
                    for key, h in self._nodes.items() if key not in configured
                    and all(e.stage in UNPROVEN for attempt in h.attempts for e in attempt)]
        for _, key in sorted(unproven):  # never got an address: transient again, by recency
            self._transient[key] = None
        while len(self._transient) > MAX_TRANSIENT:
            self._forget(next(iter(self._transient)))
        return len(rows)

    def record(self, event: BootEvent, transient: bool = False) -> None:
        """`transient`: about a machine bootd does not know that has no address (yet);
        see the module's docstring."""
        if self.member is not None:
            event = replace(event, detail=MappingProxyType({**event.detail,
                                                            "served_by": self.member}))
        key = event.key
        if not transient:
            self._transient.pop(key, None)
        elif key in self._transient or key not in self._nodes:
            self._transient[key] = None
            self._transient.move_to_end(key)
            if len(self._transient) > MAX_TRANSIENT:
                self._forget(next(iter(self._transient)))
        h = self._nodes.setdefault(key, _History())
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
        self.version += 1
        self._pending.append((event, h.number, self.version))
        self._changed[key] = self.version
        if self.on_record is not None and key not in self._transient:
            self.on_record(key)

    # -- cluster mode: the same node seen by several members

    def timeline(self, key: str, attempts: int, limit: int) -> list[BootEvent]:
        """The node's last `attempts` attempts, at most `limit` events (the newest): what
        this member shares of it."""
        h = self._nodes.get(key)
        if h is None:
            return []
        events = [e for attempt in list(h.attempts)[-attempts:] for e in attempt]
        return events[-limit:]

    def merge(self, key: str, events: list[BootEvent]) -> tuple[bool, bool]:
        """Another member's timeline of node `key`: events not seen here are added (in
        time order; attempts are split again as `derive` would). Returns (anything
        added, this member holds events the other timeline lacks). Merged events are not
        written to this member's store: each member keeps what it recorded, and the
        shared store holds the union."""
        h = self._nodes.get(key)
        local = [e for attempt in h.attempts for e in attempt] if h is not None else []
        known = {_identity(e) for e in local}
        theirs = {_identity(e) for e in events}
        new = [e for e in events if _identity(e) not in known]
        ours_only = any(_identity(e) not in theirs for e in local)
        if not new:
            return False, ours_only
        self._transient.pop(key, None)
        policy = self.policy()
        attempts = split_attempts(local + new, policy.stall_after)
        first = h.first_attempt if h is not None else 1
        while len(attempts) > policy.keep_attempts:
            attempts.pop(0)
            first += 1
        self._nodes[key] = _History(first, deque(attempts))
        self.version += 1
        self._changed[key] = self.version
        return True, ours_only

    def shareable(self) -> list[str]:
        """Nodes worth sharing: every one but the transient."""
        return [key for key in self._nodes if key not in self._transient]

    def _forget(self, key: str) -> None:
        del self._transient[key]
        self._nodes.pop(key, None)
        self._changed.pop(key, None)
        self._derived.pop(key, None)
        self._forgotten[key] = self.version
        if self.metrics is not None:
            self.metrics.nodes_forgotten.inc()

    def _observe(self, metrics: Metrics, current: list[BootEvent], event: BootEvent) -> None:
        # labelled children looked up once (labels() costs more than the increment); as
        # bounded as the metrics' own label sets
        key = (event.stage, event.outcome)
        if (counter := self._event_counters.get(key)) is None:
            counter = self._event_counters[key] = metrics.boot_events.labels(*key)
        counter.inc()
        if current and event.stage not in NOT_PROGRESS:
            previous = current[-1]
            if (histogram := self._stage_histograms.get(previous.stage)) is None:
                histogram = self._stage_histograms[previous.stage] = \
                    metrics.stage_seconds.labels(previous.stage)
            histogram.observe(max(0.0, event.ts - previous.ts))
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

    def flush(self, limit: int | None = None) -> int:
        """Write pending events (the oldest `limit` of them, else all) and forgotten
        nodes in one transaction; the number of events written."""
        forgotten, self._forgotten = self._forgotten, {}
        if forgotten:  # all of them, not just this chunk: a later chunk must not revive one
            self._pending = [p for p in self._pending if p[2] > forgotten.get(p[0].key, -1)]
        if limit is None or len(self._pending) <= limit:
            pending, self._pending = self._pending, []
        else:
            pending, self._pending = self._pending[:limit], self._pending[limit:]
        batch = [(e, attempt) for e, attempt, _version in pending]
        if (batch or forgotten) and self.store is not None:
            try:
                self.store.append_events(batch, self.policy().keep_attempts,
                                         forget=list(forgotten))
            except Exception:
                # keep them for the next flush (bounded: the newest win)
                self._pending = (pending + self._pending)[-MAX_PENDING:]
                self._forgotten = {**forgotten, **self._forgotten}
                raise
        return len(batch)

    async def run_flusher(self, interval: float = FLUSH_INTERVAL) -> None:
        try:
            while True:
                await asyncio.sleep(interval)
                try:
                    self.flush(FLUSH_CHUNK)
                    while self._pending:
                        await asyncio.sleep(0)  # DHCP and TFTP run between chunks
                        self.flush(FLUSH_CHUNK)
                except Exception as exc:  # a full disk must not stop nodes booting
                    if self.metrics is not None:
                        self.metrics.event_store_failures.inc()
                    now = time.monotonic()
                    if now - self._store_logged >= STORE_LOG_INTERVAL:
                        self._store_logged = now
                        log.error("event store write failed; events kept in memory and "
                                  "retried (logged once a minute)", error=str(exc),
                                  pending=len(self._pending))
        finally:
            with contextlib.suppress(Exception):
                self.flush()

    def state(self, key: str) -> NodeState | None:
        h = self._nodes.get(key)
        if h is None:
            return None
        stall_after = self.policy().stall_after
        now = self.clock()
        # Derived once per change of the node (or of stall_after); in between only
        # `stalled` moves with the clock. 5,000 nodes: ~0.5 s derived, ~10 ms cached.
        stamp = (self._changed.get(key, 0), stall_after)
        cached = self._derived.get(key)
        if cached is not None and cached[0] == stamp:
            state = cached[1]
            stalled = state.history[-1].outcome is None and now - state.last_seen > stall_after
            return state if stalled == state.stalled else replace(state, stalled=stalled)
        events = [e for attempt in h.attempts for e in attempt]
        derived = derive(events, now, stall_after, h.first_attempt)
        if derived is not None:
            self._derived[key] = (stamp, derived)
        return derived

    def states(self) -> list[NodeState]:
        return [s for key in self._nodes if (s := self.state(key)) is not None]

    def changed_since(self, version: int, since: float, now: float) -> list[str]:
        """Keys of the nodes whose state may differ from what a reader saw at `version`
        and time `since`: a new event, or a stall that began in (since, now]."""
        stall_after = self.policy().stall_after
        out = []
        for key, h in self._nodes.items():
            if self._changed.get(key, 0) > version:
                out.append(key)
                continue
            current = h.attempts[-1] if h.attempts else None
            if (current and since < current[-1].ts + stall_after <= now
                    and not any(e.stage in FINISHED for e in current)):
                out.append(key)
        return out

    def status_document(self, configured: Iterable[NodeProfile],
                        network_of: Callable[[str | None], str | None] = lambda ip: None,
                        only: Iterable[str] | None = None,
                        desired: Callable[[str | None, str | None], str | None] = (
                            lambda name, mac: None)) -> dict[str, Any]:
        """The `bootd status -o json` document: every node seen, then every configured
        node never seen (stage `never-seen`); `network_of` names the network of an
        address. `only`: just the nodes with these keys (a live page's update).
        `desired`: the image a node (name, MAC) would boot now; a node whose reported
        image differs has `drift`."""
        if only is None:
            seen = {s.key: s for s in self.states()}
        else:
            seen = {s.key: s for key in only if (s := self.state(key)) is not None}
        nodes = []
        for s in seen.values():
            want = desired(s.name, s.mac)
            nodes.append({**s.to_json(), "network": network_of(s.ip), "desired_image": want,
                          "drift": s.image is not None and want is not None
                          and s.image != want})
        for node in configured if only is None else ():
            if node.name not in seen:
                nodes.append({"node": node.name, "mac": node.macs[0] if node.macs else None,
                              "ip": str(node.ip) if node.ip else None, "pool": node.pool,
                              "network": node.network,
                              "stage": "never-seen", "stalled": False, "since": None,
                              "first_seen": None, "last_seen": None, "attempts": 0,
                              "last_error": None, "last_boot_time": None,
                              "last_boot_started": None, "image": None,
                              "desired_image": desired(node.name, None), "drift": False})
        return {"now": self.clock(), "version": self.version, "nodes": nodes}

    def find(self, wanted: str) -> NodeState | None:
        """By node name, MAC (in any spelling) or IP."""
        state = self.state(wanted)
        if state is not None:
            return state
        with contextlib.suppress(ValueError):
            wanted = normalize_mac(wanted)  # an unknown machine's key is its MAC
            if (state := self.state(wanted)) is not None:
                return state
        return next((s for s in self.states() if wanted in (s.mac, s.ip, s.name)), None)


def _identity(event: BootEvent) -> tuple[float, str, str, str | None]:
    """One event as every member stores it (its time is the recording member's clock)."""
    return event.ts, event.stage, event.outcome, event.mac

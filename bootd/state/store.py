"""SQLite state under `server.state_dir`: catch-all leases and boot events. One writer.

WAL with synchronous=NORMAL: a commit survives the process being killed (kill -9, OOM),
which is what "a restart loses no lease" needs, at tens of microseconds per commit.
"""

from __future__ import annotations

import contextlib
import json
import sqlite3
from collections.abc import Iterable, Iterator
from ipaddress import IPv4Address
from pathlib import Path
from types import MappingProxyType

import orjson

from bootd.state.events import BootEvent
from bootd.state.leases import Lease, LeaseChange, LeaseDeleted, LeaseState

# 2: boot events; 3: MACs learned for port-identified nodes; 4: catch-all approvals
SCHEMA_VERSION = 4

_SCHEMA = """
CREATE TABLE IF NOT EXISTS leases (
    ip       TEXT PRIMARY KEY,
    mac      TEXT NOT NULL,
    state    TEXT NOT NULL,
    expires  REAL NOT NULL,
    hostname TEXT
);
CREATE INDEX IF NOT EXISTS leases_mac ON leases (mac);
CREATE TABLE IF NOT EXISTS events (
    id      INTEGER PRIMARY KEY,
    ts      REAL NOT NULL,
    key     TEXT NOT NULL,
    attempt INTEGER NOT NULL,
    stage   TEXT NOT NULL,
    node    TEXT,
    mac     TEXT,
    ip      TEXT,
    pool    TEXT,
    outcome TEXT NOT NULL,
    detail  TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS events_key ON events (key, attempt);
CREATE TABLE IF NOT EXISTS learned_macs (
    node TEXT PRIMARY KEY,
    mac  TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS approvals (
    node TEXT PRIMARY KEY,
    at   REAL NOT NULL
);
"""


class StoreError(RuntimeError):
    pass


class Store:
    def __init__(self, path: Path, *, read_only: bool = False) -> None:
        """read_only: for `bootd status` while the daemon is down; never writes."""
        self.path = path
        if read_only:
            try:
                self._db = sqlite3.connect(f"file:{path}?mode=ro", uri=True,
                                           check_same_thread=False)
                self._db.execute("SELECT 1 FROM events LIMIT 1")
            except sqlite3.Error as exc:
                raise StoreError(f"cannot read state database {path}: {exc}") from exc
            return
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            self._db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=NORMAL")
            self._db.execute("PRAGMA busy_timeout=5000")
            version = self._db.execute("PRAGMA user_version").fetchone()[0]
            if version > SCHEMA_VERSION:
                raise StoreError(f"{path} was written by a newer bootd (schema {version})")
            self._db.executescript(_SCHEMA)
            self._db.execute(f"PRAGMA user_version={SCHEMA_VERSION}")
        except (sqlite3.Error, OSError) as exc:
            raise StoreError(f"cannot open state database {path}: {exc}") from exc

    @contextlib.contextmanager
    def _transaction(self) -> Iterator[sqlite3.Cursor]:
        """One write transaction: committed whole, or rolled back and re-raised."""
        cur = self._db.cursor()
        cur.execute("BEGIN IMMEDIATE")
        try:
            yield cur
            cur.execute("COMMIT")
        except BaseException:
            cur.execute("ROLLBACK")
            raise

    @classmethod
    def in_state_dir(cls, state_dir: Path) -> Store:
        return cls(state_dir / "bootd.sqlite3")

    def load_leases(self) -> list[Lease]:
        rows = self._db.execute("SELECT ip, mac, state, expires, hostname FROM leases")
        out = []
        for ip, mac, state, expires, hostname in rows:
            try:
                out.append(Lease(IPv4Address(ip), mac, LeaseState(state), expires, hostname))
            except ValueError:
                continue  # a row we cannot read is skipped, not fatal
        return out

    def apply_lease_changes(self, changes: Iterable[LeaseChange]) -> None:
        """Write a batch of lease changes in one transaction."""
        rows = list(changes)
        if not rows:
            return
        with self._transaction() as cur:
            for change in rows:
                if isinstance(change, LeaseDeleted):
                    cur.execute("DELETE FROM leases WHERE ip = ?", (str(change.ip),))
                else:
                    cur.execute(
                        "INSERT OR REPLACE INTO leases (ip, mac, state, expires, hostname)"
                        " VALUES (?, ?, ?, ?, ?)",
                        (str(change.ip), change.mac, change.state.value, change.expires,
                         change.hostname),
                    )

    def load_learned(self) -> list[tuple[str, str]]:
        """(node, MAC) for nodes identified by switch port: the MAC each was last seen
        with. An older database without the table has none."""
        try:
            return list(self._db.execute("SELECT node, mac FROM learned_macs"))
        except sqlite3.OperationalError:
            return []

    def load_approvals(self) -> set[str]:
        """Catch-all nodes an operator approved (`bootd approve`)."""
        try:
            return {row[0] for row in self._db.execute("SELECT node FROM approvals")}
        except sqlite3.OperationalError:  # an older database, opened read-only
            return set()

    def save_approvals(self, nodes: Iterable[str], at: float) -> None:
        with self._transaction() as cur:
            cur.executemany("INSERT OR REPLACE INTO approvals (node, at) VALUES (?, ?)",
                            [(node, at) for node in nodes])

    def save_learned(self, rows: Iterable[tuple[str, str]]) -> None:
        with self._transaction() as cur:
            cur.executemany("INSERT OR REPLACE INTO learned_macs (node, mac) VALUES (?, ?)",
                            list(rows))

    def append_events(self, batch: list[tuple[BootEvent, int]], keep_attempts: int,
                      forget: Iterable[str] = ()) -> None:
        """One transaction: the events of the nodes to `forget` are deleted, the batch is
        written, then each touched node's attempts beyond the last `keep_attempts` are
        deleted."""
        with self._transaction() as cur:
            cur.executemany("DELETE FROM events WHERE key = ?", [(k,) for k in forget])
            cur.executemany(
                "INSERT INTO events (ts, key, attempt, stage, node, mac, ip, pool, outcome,"
                " detail) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                [(e.ts, e.key, attempt, e.stage, e.node, e.mac, e.ip, e.pool, e.outcome,
                  orjson.dumps(dict(e.detail), default=str).decode()) for e, attempt in batch])
            latest: dict[str, int] = {}
            for e, attempt in batch:
                latest[e.key] = max(attempt, latest.get(e.key, 0))
            # only nodes past keep_attempts have anything to delete: in a storm of first
            # boots that is none (with orjson for the details, a flush went from 24.8 to
            # 16.7 us an event)
            cur.executemany("DELETE FROM events WHERE key = ? AND attempt <= ?",
                            [(key, top - keep_attempts) for key, top in latest.items()
                             if top > keep_attempts])


    def load_events(self) -> list[tuple[BootEvent, int]]:
        rows = self._db.execute(
            "SELECT ts, key, attempt, stage, node, mac, ip, pool, outcome, detail FROM events"
            " ORDER BY key, attempt, id")
        out = []
        for ts, _key, attempt, stage, node, mac, ip, pool, outcome, detail in rows:
            try:
                parsed = json.loads(detail)
            except ValueError:
                parsed = {}
            out.append((BootEvent(ts, stage, node, mac, ip, pool, outcome,
                                  MappingProxyType(parsed)), attempt))
        return out

    def close(self) -> None:
        self._db.close()

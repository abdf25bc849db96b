"""SQLite state under `server.state_dir`: leases now, boot events later. One writer.

WAL with synchronous=NORMAL: a commit survives the process being killed (kill -9, OOM),
which is what "a restart loses no lease" needs, at tens of microseconds per commit.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterable
from ipaddress import IPv4Address
from pathlib import Path

from bootd.dhcp.leases import Lease, LeaseChange, LeaseDeleted, LeaseState

SCHEMA_VERSION = 1

_SCHEMA = """
CREATE TABLE IF NOT EXISTS leases (
    ip       TEXT PRIMARY KEY,
    mac      TEXT NOT NULL,
    state    TEXT NOT NULL,
    expires  REAL NOT NULL,
    hostname TEXT
);
CREATE INDEX IF NOT EXISTS leases_mac ON leases (mac);
"""


class StoreError(RuntimeError):
    pass


class Store:
    def __init__(self, path: Path) -> None:
        self.path = path
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
        cur = self._db.cursor()
        cur.execute("BEGIN IMMEDIATE")
        try:
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
            cur.execute("COMMIT")
        except BaseException:
            cur.execute("ROLLBACK")
            raise

    def close(self) -> None:
        self._db.close()

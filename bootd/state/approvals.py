"""Catch-all machines waiting for an operator (`dynamic: {join: approve}`), and those
an operator approved, as MAAS enlists machines.

Rules:

1. A catch-all node of an approval pool that asks for its join.sh before it is approved
   gets a script that waits and asks again; it is then `awaiting` (with when it last
   asked) and `bootd status` shows it at stage `awaiting-approval`.
2. `bootd approve NODE...` or `--all` (every node awaiting now) approves; approvals are
   written to the store before they are acknowledged, so a restart keeps them.
3. Awaiting nodes are remembered boundedly (MAX_AWAITING, least recent dropped): a flood
   of fake machines cannot grow this list, and dropping one only means it asks again.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable

from bootd.state.store import Store

MAX_AWAITING = 1000


class Approvals:
    def __init__(self, store: Store | None) -> None:
        self.store = store
        self.approved: set[str] = store.load_approvals() if store is not None else set()
        self.awaiting: OrderedDict[str, float] = OrderedDict()

    def is_approved(self, node: str) -> bool:
        return node in self.approved

    def ask(self, node: str, now: float) -> None:
        """`node` asked for its join.sh and is not approved yet."""
        self.awaiting[node] = now
        self.awaiting.move_to_end(node)
        while len(self.awaiting) > MAX_AWAITING:
            self.awaiting.popitem(last=False)

    def approve(self, nodes: Iterable[str], now: float) -> list[str]:
        """Approve these nodes (persisted first); the ones newly approved."""
        new = sorted(set(nodes) - self.approved)
        if new and self.store is not None:
            self.store.save_approvals(new, now)
        self.approved.update(new)
        for node in new:
            self.awaiting.pop(node, None)
        return new

    def approve_all(self, now: float) -> list[str]:
        return self.approve(list(self.awaiting), now)

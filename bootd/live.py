"""One reference that every service reads and a reload swaps.

Services never hold a piece of the configuration; they hold a `View` of the current
runtime snapshot and call `get()` once per request. A reload builds a whole new snapshot
off to the side and `swap()`s it in: between two requests, never in the middle of one.
Background work that belongs to a snapshot (token refreshers, image hashing) waits on
`changed()` to move to the new one.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Generic, TypeVar

T = TypeVar("T")
U = TypeVar("U")


class View(Generic[T]):
    """Read access to a part of the current value, and a wait for the next swap."""

    def __init__(self, get: Callable[[], T], swapped: Callable[[], Awaitable[None]]) -> None:
        self.get = get
        self._swapped = swapped

    @classmethod
    def fixed(cls, value: T) -> View[T]:
        """A view that never changes (tools and tests that load one config)."""
        return cls(lambda: value, _forever)

    async def changed(self) -> T:
        """Wait for the next swap; the new part."""
        await self._swapped()
        return self.get()


async def _forever() -> None:
    await asyncio.get_running_loop().create_future()


class Live(Generic[T]):
    def __init__(self, value: T) -> None:
        self._value = value
        self._swap = asyncio.Event()

    @property
    def current(self) -> T:
        return self._value

    def swap(self, new: T) -> T:
        """Install `new`; returns the value it replaced."""
        old, self._value = self._value, new
        self._swap.set()
        self._swap = asyncio.Event()
        return old

    async def swapped(self) -> None:
        await self._swap.wait()

    def view(self, part: Callable[[T], U]) -> View[U]:
        return View(lambda: part(self._value), self.swapped)

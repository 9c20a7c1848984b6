"""The executor's view of the action catalogue: the core pack plus what workers registered."""

from __future__ import annotations

from collections.abc import Iterable

import asyncpg

from common.actions import CORE_ACTIONS, ActionSpec
from common.queries import actions as q


class Catalogue:
    def __init__(self, pool: asyncpg.Pool) -> None:
        self._pool = pool
        self._cache: dict[str, ActionSpec] = {}

    def invalidate(self) -> None:
        """Forget cached entries; called when a worker registers (its actions may have changed)."""
        self._cache.clear()

    async def resolve(self, refs: Iterable[str]) -> dict[str, ActionSpec]:
        """Specs for the refs that are known; unknown refs are absent. One query for all misses;
        misses are not cached, since a worker may register the action at any moment."""
        wanted = set(refs)
        missing = [r for r in wanted if r not in self._cache]
        if missing:
            for row in await self._pool.fetch(q.GET_MANY, missing):
                self._cache[row["ref"]] = ActionSpec(**dict(row))
        found = {r: self._cache[r] for r in wanted if r in self._cache}
        for ref in wanted - found.keys():
            if ref in CORE_ACTIONS:
                found[ref] = CORE_ACTIONS[ref]
        return found

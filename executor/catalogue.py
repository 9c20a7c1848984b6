"""The executor's view of the action catalogue: the core pack plus what workers registered."""

from __future__ import annotations

from collections.abc import Iterable

import asyncpg

from common.actions import CORE_ACTIONS, CORE_PREFIX, ActionSpec
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
        # `core.*` comes from Baton's own code: no registration can shadow it.
        found = {r: CORE_ACTIONS[r] for r in wanted if r in CORE_ACTIONS}
        missing = [r for r in wanted - found.keys() if r not in self._cache]
        if missing:
            for row in await self._pool.fetch(q.GET_MANY, missing):
                if not row["ref"].startswith(CORE_PREFIX):
                    self._cache[row["ref"]] = ActionSpec(**dict(row))
        found.update({r: self._cache[r] for r in wanted - found.keys() if r in self._cache})
        return found

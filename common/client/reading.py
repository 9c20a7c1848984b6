"""Reading executions, workers and the action catalogue from PostgreSQL, the source of truth."""

from __future__ import annotations

import datetime as dt
import uuid
from typing import Any, cast

from common.actions import CORE_ACTIONS, ActionSpec
from common.client.base import ClientBase
from common.queries import actions as aq
from common.queries import executions as q
from common.queries import workers as wq
from common.schemas import ExecutionSummary, FinishedMinute, Status, WorkerSummary, jsonable_row


class Reading(ClientBase):
    async def list_page(
        self, *, status: str | None = None, action_ref: str | None = None, worker: str | None = None,
        since: dt.datetime | None = None, until: dt.datetime | None = None, after: tuple[dt.datetime, uuid.UUID] | None = None,
        id_prefix: str | None = None, limit: int = 50,
    ) -> list[ExecutionSummary]:
        """A page of executions, newest first; ``after`` is the last row of the previous page
        (its `created_at` and `id`): keyset paging, as cheap on page 100 as on page 1."""
        if status is not None and status not in {s.value for s in Status}:
            raise ValueError(f"no status {status!r}: one of {', '.join(s.value for s in Status)}")
        low = high = None
        if id_prefix:
            digits = id_prefix.strip().lower().replace("-", "")
            if not digits or len(digits) > 32 or any(c not in "0123456789abcdef" for c in digits):
                raise ValueError(f"{id_prefix!r} is not an id or a prefix of one")
            low, high = uuid.UUID(digits.ljust(32, "0")), uuid.UUID(digits.ljust(32, "f"))
        rows = await (await self.pool()).fetch(
            q.LIST_PAGE, status, action_ref, worker, since, until, after[0] if after else None,
            after[1] if after else None, low, high, limit,
        )
        return [cast(ExecutionSummary, dict(r)) for r in rows]

    async def finished_per_minute(self) -> list[FinishedMinute]:
        return [cast(FinishedMinute, dict(r)) for r in await (await self.pool()).fetch(q.FINISHED_PER_MINUTE)]

    async def count_active(self) -> dict[str, int]:
        return {r["status"]: r["n"] for r in await (await self.pool()).fetch(q.COUNT_ACTIVE_BY_STATUS)}

    async def list_workers(self) -> list[WorkerSummary]:
        pool = await self.pool()
        return [cast(WorkerSummary, jsonable_row(r)) for r in await pool.fetch(wq.LIST)]

    async def list_actions(self) -> list[ActionSpec]:
        """Baton's built-ins and every action a worker registered."""
        rows = await (await self.pool()).fetch(aq.LIST)
        return sorted([*CORE_ACTIONS.values(), *(ActionSpec(**dict(r)) for r in rows)], key=lambda a: a.ref)

    async def action(self, action_ref: str) -> ActionSpec | None:
        if action_ref in CORE_ACTIONS:
            return CORE_ACTIONS[action_ref]
        row = await (await self.pool()).fetchrow(aq.GET, action_ref)
        return ActionSpec(**dict(row)) if row is not None else None

    async def action_schema(self, action_ref: str) -> dict[str, Any] | None:
        if action_ref in CORE_ACTIONS:
            return CORE_ACTIONS[action_ref].parameters_schema
        pool = await self.pool()
        row = await pool.fetchrow(aq.GET, action_ref)
        return row["parameters_schema"] if row is not None else None

"""What an operator changes: cancel, pause, resume, signal and retry runs; schedules; gone workers."""

from __future__ import annotations

import uuid
from typing import Any

import asyncpg

from common import retention, schedules
from common.client.base import ClientBase
from common.notifications import publish_terminal
from common.queries import executions as q
from common.queries import schedules as sq
from common.queries import workflows as wfq
from common.retry import retry_lost_races
from common.schemas import execution_json, jsonable_row


class Controls(ClientBase):
    async def _explain(self, execution_id: uuid.UUID, verb: str, allowed: str) -> ValueError:
        row = await (await self.pool()).fetchrow(q.GET, execution_id)
        if row is None:
            return ValueError(f"no execution {execution_id}: see `baton executions list` for the ids there are")
        durable = await (await self.pool()).fetchval(wfq.IS_DURABLE, row["action_ref"])
        if "durable" in allowed and not durable:
            return ValueError(
                f"cannot {verb} execution {execution_id}: {row['action_ref']} is not a durable workflow "
                f"(only durable runs can {verb})"
            )
        return ValueError(f"cannot {verb} execution {execution_id}: it is {row['status']} ({verb} takes {allowed})")

    async def _announce(self, rows: list[asyncpg.Record]) -> None:
        """Terminal transitions an operator made: one notification each, as any other has."""
        if not rows:
            return
        channel, _ = await self._amqp()
        exchange = await channel.get_exchange(self.names.notifications_exchange)
        await publish_terminal(exchange, rows)

    async def cancel(self, execution_id: uuid.UUID | str) -> list[dict[str, Any]]:
        """Cancel an execution that has not finished, and the children it started; a running one is
        stopped on its worker within a moment. Returns the executions cancelled."""
        execution_id = await self.resolve_id(execution_id)
        error = {"error": "cancelled by an operator", "failed_by": "operator"}
        pool = await self.pool()

        async def cancel_tree() -> list[asyncpg.Record]:
            async with pool.acquire() as conn, conn.transaction():
                await conn.fetchval(wfq.LOCK_EXECUTION, execution_id)
                return await conn.fetch(wfq.CANCEL, execution_id, error)

        # A run of the tree suspending at that moment locks its row and then its child's, and the
        # cancel's update may take them the other way round: PostgreSQL then aborts one of the two,
        # and this tries again. (Not after a lost connection: the cancel may have committed.)
        rows = await retry_lost_races(cancel_tree)
        if not rows:
            raise await self._explain(execution_id, "cancel", "an execution that has not finished")
        await self._announce(rows)
        return [execution_json({k: v for k, v in dict(r).items() if k not in ("control", "wake")}) for r in rows]

    async def pause(self, execution_id: uuid.UUID | str) -> str:
        """Pause a durable run: at once if no worker holds it, else at its next step boundary.
        Returns its status now (`paused`, or `running` until it reaches the boundary)."""
        execution_id = await self.resolve_id(execution_id)
        status = await (await self.pool()).fetchval(wfq.PAUSE, execution_id)
        if status is None:
            raise await self._explain(execution_id, "pause", "a durable run that has not finished")
        return str(status)

    async def resume(self, execution_id: uuid.UUID | str) -> str:
        execution_id = await self.resolve_id(execution_id)
        status = await (await self.pool()).fetchval(wfq.RESUME, execution_id)
        if status is None:
            raise await self._explain(execution_id, "resume", "a paused run, or one asked to pause")
        return str(status)

    async def signal(self, execution_id: uuid.UUID | str, name: str, data: Any = None) -> bool:
        """Deliver a signal; returns whether it woke a run waiting for it (otherwise it waits in
        the run's mailbox for its `ctx.wait_for_signal`)."""
        execution_id = await self.resolve_id(execution_id)
        if not name or len(name) > 200:
            raise ValueError("a signal name is 1 to 200 characters")
        row = await (await self.pool()).fetchrow(wfq.SIGNAL, execution_id, name, data)
        if row is None:
            raise await self._explain(execution_id, "signal", "a durable run that has not finished")
        return bool(row["wakes"])

    async def retry(self, execution_id: uuid.UUID | str) -> uuid.UUID:
        """Rerun a finished run. A durable one that failed, was cancelled or timed out resumes from
        its checkpoint under its own id; any other is rerun from scratch as a new execution linked
        to the old one. Returns the id of the run that will run."""
        execution_id = await self.resolve_id(execution_id)
        pool = await self.pool()
        if await pool.fetchval(wfq.RETRY_DURABLE, execution_id) is not None:
            return execution_id
        new_id = await pool.fetchval(wfq.RETRY_FRESH, execution_id, uuid.uuid4())
        if new_id is None:
            raise await self._explain(execution_id, "retry", "a finished execution")
        return uuid.UUID(str(new_id))

    # -- schedules -------------------------------------------------------------------------------

    async def add_schedule(
        self, name: str, cron_expr: str, action_ref: str, parameters: dict[str, Any] | None = None, *,
        catch_up: str = "latest", timezone: str = "UTC",
    ) -> dict[str, Any]:
        """Add (or change) a schedule; the executors fire it from its next due time on."""
        if not name or len(name) > 200:
            raise ValueError("a schedule name is 1 to 200 characters")
        if catch_up not in ("latest", "all", "none"):
            raise ValueError(f"catch_up is latest, all or none, not {catch_up!r}")
        schedules.check(cron_expr, timezone)
        pool = await self.pool()
        now = await pool.fetchval(q.NOW)
        row = await pool.fetchrow(
            sq.UPSERT, name, cron_expr, action_ref, parameters or {}, catch_up, timezone, "cli",
            schedules.next_after(cron_expr, timezone, now),
        )
        if row is None:
            raise ValueError(f"schedule {name!r} comes from the YAML `schedules:` section: change it there")
        return {k: v for k, v in jsonable_row(row).items() if k != "pg_notify"}

    async def list_schedules(self) -> list[dict[str, Any]]:
        return [jsonable_row(r) for r in await (await self.pool()).fetch(sq.LIST)]

    async def remove_schedule(self, name: str) -> None:
        if await (await self.pool()).fetchval(sq.DELETE, name) is None:
            raise ValueError(f"no schedule {name!r}")

    # -- workers -------------------------------------------------------------------------------

    async def prune_workers(self, older_than_s: float) -> tuple[list[str], list[str]]:
        """Remove `inactive` and `lost` workers not seen for ``older_than_s``, with their queues
        if empty: (removed, kept for a queue still holding dispatches)."""
        await self._amqp()
        assert self._connection is not None
        return await retention.prune_workers(
            await self.pool(), self._connection, self.names, older_than_s=older_than_s, batch_size=10_000
        )

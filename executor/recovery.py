"""Recovery of interrupted runs: back in line (restart, or resume for durable runs) or failed.

Runs after every sweep over all `interrupted` executions, whoever interrupted them: the sweeper
(worker lost), or a worker that stopped past its drain deadline (signal).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from common import metrics
from common.logging import get_logger
from common.notifications import publish_terminal
from common.queries import executions as q
from common.recovery import decide, resolve_policy

if TYPE_CHECKING:
    from executor.context import ExecutorContext

log = get_logger("baton.executor.recovery")

BATCH = 500


async def recover_interrupted(ctx: ExecutorContext) -> int:
    """One pass; returns how many runs it moved on."""
    failed = []
    recovered = 0
    async with ctx.pool.acquire() as conn, conn.transaction():
        rows = await conn.fetch(q.SELECT_INTERRUPTED, BATCH)
        if not rows:
            return 0
        specs = await ctx.catalogue.resolve({r["action_ref"] for r in rows if r["action_ref"]})
        for row in rows:
            policy = resolve_policy(specs.get(row["action_ref"]), ctx.settings.recovery)
            decision = decide(policy, row["recovery_attempts"])
            fields = {"execution_id": str(row["id"]), "attempt": row["attempt"], "worker": row["worker"]}
            if decision.recover:
                if await conn.fetchrow(q.RECOVER, row["id"], row["attempt"]) is not None:
                    recovered += 1
                    metrics.RECOVERIES.labels("recovered").inc()
                    log.info("execution_recovering", detail=decision.reason, recovery_attempt=row["recovery_attempts"] + 1, **fields)
                continue
            error = {
                "error": f"Execution interrupted: {decision.reason}",
                "failed_by": "recovery",
                "recovery_attempts": row["recovery_attempts"],
                "max_recovery_attempts": policy.max_recovery_attempts,
            }
            done = await conn.fetchrow(q.FAIL, row["id"], "interrupted", row["attempt"], error)
            if done is not None:
                failed.append(done)
                metrics.RECOVERIES.labels("failed").inc()
                log.warning("execution_failed", error=error["error"], **fields)
    await publish_terminal(ctx.exchanges.notifications, failed)
    if recovered:
        ctx.wake.set()
    return recovered + len(failed)

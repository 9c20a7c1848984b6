"""The durable workflow the chaos soak runs: steps that append to a ledger (one line per step run,
with the run's id and attempt), a durable sleep, parallel steps and a child action."""

from __future__ import annotations

import asyncio
import os

from worker import step, workflow


def _note(ledger: str, run: str, what: str, attempt: int) -> None:
    with open(ledger, "a") as f:
        f.write(f"{run} {what} {attempt} {os.getpid()}\n")


@step
async def ledger_step(ledger: str, run: str, what: str, attempt: int, seconds: float) -> str:
    await asyncio.sleep(seconds)
    _note(ledger, run, what, attempt)
    return what


@workflow("chaos.flow", durable=True, max_recovery_attempts=20)
async def flow(ctx, ledger: str, step_s: float = 0.2, sleep_s: float = 0.5) -> list[str]:
    run = ctx.execution_id
    first = await ledger_step(ledger, run, "first", ctx.attempt, step_s)
    await ctx.sleep(sleep_s)
    left, right = await asyncio.gather(
        ledger_step(ledger, run, "left", ctx.attempt, step_s), ledger_step(ledger, run, "right", ctx.attempt, step_s)
    )
    child = await ctx.run("core.echo", {"message": f"child of {run}"})
    last = await ledger_step(ledger, run, "last", ctx.attempt, step_s)
    return [first, left, right, child["message"][:5], last]

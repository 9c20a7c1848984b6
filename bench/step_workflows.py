"""The workflows `bench/steps.py` measures: N no-op steps, durable and not."""

from __future__ import annotations

from worker import step, workflow


@step
async def noop(i: int) -> int:
    return i


@workflow("bench.steps", durable=True)
async def steps(ctx, steps: int = 100) -> int:
    for i in range(steps):
        await noop(i)
    return steps


@workflow("bench.steps_transient", durable=False)
async def steps_transient(ctx, steps: int = 100) -> int:
    for i in range(steps):
        await noop(i)
    return steps

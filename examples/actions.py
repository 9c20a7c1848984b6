"""Example Python actions: `from worker import action` is all an action module needs."""

from __future__ import annotations

import asyncio

from worker import action


@action("examples.add", description="Adds two numbers.")
async def add(a: float, b: float) -> dict[str, float]:
    return {"sum": a + b}


@action("examples.divide", description="Divides a by b; b = 0 fails the execution.")
def divide(a: float, b: float) -> dict[str, float]:
    return {"quotient": a / b}


@action("examples.slow", timeout_s=2, description="Sleeps; its own timeout is 2 s.")
async def slow(seconds: float = 5) -> None:
    await asyncio.sleep(seconds)

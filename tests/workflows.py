"""Workflows used only by the tests (loaded through worker.action_modules). Steps append a line to
the file named by the `path` parameter, so a test can count how often each step really ran."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

from worker import step, workflow


def note(path: str, what: str) -> None:
    with Path(path).open("a") as f:
        f.write(f"{what} {os.getpid()}\n")


@step
async def mark(path: str, what: str, seconds: float = 0.0) -> str:
    note(path, f"{what}.start")
    await asyncio.sleep(seconds)
    note(path, what)
    return what


@workflow("tests.three_steps", durable=True)
async def three_steps(ctx, path: str, gap_s: float = 0.0, step2_s: float = 0.0, sleep_s: float = 0.0) -> dict:
    a = await mark(path, "one")
    note(path, "gap")
    await asyncio.sleep(gap_s)  # not a step: a crash here falls between step 1 and step 2
    b = await mark(path, "two", step2_s)
    await ctx.sleep(sleep_s)
    note(path, "slept")
    c = await mark(path, "three")
    return {"steps": [a, b, c], "recovery_attempts": ctx.recovery_attempts}


@workflow("tests.limited", durable=True, max_recovery_attempts=1)
async def limited(ctx, path: str, seconds: float = 30.0) -> str:
    return await mark(path, "long", seconds)


@workflow("tests.transient", durable=False)
async def transient(ctx, path: str, seconds: float = 30.0) -> str:
    return await mark(path, "long", seconds)


@workflow("tests.transient_restart", durable=False, recover_on_worker_loss=True)
async def transient_restart(ctx, path: str, seconds: float = 30.0) -> str:
    note(path, "begin")
    return await mark(path, "long", seconds)


@workflow("tests.stored", durable=True)
async def stored(ctx, path: str, seconds: float = 30.0) -> dict:
    await ctx.store.set("count", (await ctx.store.get("count", 0)) + 1)
    await mark(path, "first")
    await ctx.store.set("after_first", await ctx.store.get("count"))
    await mark(path, "long", seconds)
    return {"count": await ctx.store.get("count"), "after_first": await ctx.store.get("after_first")}


@workflow("tests.parallel", durable=True)
async def parallel(ctx, path: str, seconds: float = 30.0) -> list:
    fast, slow = await asyncio.gather(mark(path, "fast"), mark(path, "slow", seconds))
    tail = await mark(path, "tail")
    return [fast, slow, tail]


@step
async def alpha(path: str) -> str:
    note(path, "alpha")
    return "alpha"


@step
async def beta(path: str) -> str:
    note(path, "beta")
    return "beta"


@workflow("tests.changing", durable=True)
async def changing(ctx, path: str, seconds: float = 30.0) -> str:
    # Which step comes first is read from a file: a test changes it while a run is in flight, as a
    # deployment of changed code would.
    first = alpha if Path(path + ".order").read_text().strip() == "alpha" else beta
    await first(path)
    await mark(path, "long", seconds)
    return "done"


@step(retries=2, retry_delay_s=0.05)
async def flaky(path: str, failures: int) -> int:
    note(path, "flaky")
    tries = sum(1 for line in Path(path).read_text().splitlines() if line.startswith("flaky "))
    if tries <= failures:
        raise RuntimeError(f"flaky failure {tries}")
    return tries


@workflow("tests.retrying", durable=True)
async def retrying(ctx, path: str, failures: int) -> int:
    return await flaky(path, failures)


@workflow("tests.sleeper", durable=True)
async def sleeper(ctx, path: str, seconds: float) -> str:
    await mark(path, "before")
    await ctx.sleep(seconds)
    await mark(path, "after")
    return "woke"


@workflow("tests.parent", durable=True)
async def parent(ctx, path: str, cmd: list[str]) -> dict:
    await mark(path, "before")
    child = await ctx.run("core.local", {"cmd": cmd})
    await mark(path, "after")
    return child


@workflow("tests.waits_for_signal", durable=True)
async def waits_for_signal(ctx, path: str, timeout_s: float | None = None) -> dict:
    await mark(path, "before")
    got = await ctx.wait_for_signal("approved", timeout_s=timeout_s)
    await mark(path, "after")
    return {"got": got}


@workflow("tests.steps_then_long", durable=True)
async def steps_then_long(ctx, path: str, steps: int = 3, seconds: float = 30.0) -> int:
    for i in range(steps):
        await mark(path, f"s{i}")
    await mark(path, "long", seconds)
    return steps


@workflow("tests.fails_at_step", durable=True)
async def fails_at_step(ctx, path: str) -> str:
    await mark(path, "ok")
    if Path(path + ".fail").exists():
        raise RuntimeError("told to fail")
    await mark(path, "after")
    return "done"

"""Actions used only by the tests (loaded through worker.action_modules)."""

from __future__ import annotations

import asyncio
import os
import time

from worker import action


@action("tests.fail")
async def fail(message: str = "boom") -> None:
    raise RuntimeError(message)


@action("tests.blocking_sleep")
def blocking_sleep(seconds: float) -> dict[str, float]:
    time.sleep(seconds)
    return {"slept_s": seconds}


@action("tests.big_result")
async def big_result(size: int) -> str:
    return "x" * size


@action("tests.pid")
async def pid() -> dict[str, int]:
    return {"pid": os.getpid()}


@action("tests.typed")
async def typed(count: int, ratio: float = 0.5, tags: list[str] | None = None) -> dict:
    return {"count": count, "ratio": ratio, "tags": tags or []}


@action("tests.sleep_then_echo")
async def sleep_then_echo(seconds: float, message: str) -> dict[str, str]:
    await asyncio.sleep(seconds)
    return {"message": message}


@action("tests.restartable", recover_on_worker_loss=True, max_recovery_attempts=1)
async def restartable(seconds: float) -> dict[str, float]:
    await asyncio.sleep(seconds)
    return {"slept_s": seconds}


@action("tests.nan")
async def nan() -> float:
    return float("nan")


@action("tests.nul_text")
async def nul_text() -> str:
    return "before\x00after"


@action("tests.takes_dict")
async def takes_dict(data: dict) -> int:
    return len(data)

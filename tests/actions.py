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


@action("tests.flaky", retries=3, retry_delay_s=0.2, backoff=2.0, retry_on=(RuntimeError,))
async def flaky(path: str, failures: int) -> int:
    """Fails its first ``failures`` tries (counted in the file at ``path``), then succeeds."""
    with open(path, "a") as f:
        f.write(f"try {time.time()}\n")
    with open(path) as f:
        tries = sum(1 for _ in f)
    if tries <= failures:
        raise RuntimeError(f"failure {tries}")
    return tries


@action("tests.not_retried", retries=3, retry_delay_s=0.1, retry_on=(RuntimeError,))
async def not_retried(path: str) -> None:
    with open(path, "a") as f:
        f.write("try\n")
    raise ValueError("not a RuntimeError: not retried")


@action("tests.limited_sleep", max_concurrency=2)
async def limited_sleep(seconds: float) -> dict[str, float]:
    start = time.time()
    await asyncio.sleep(seconds)
    return {"start": start, "end": time.time()}

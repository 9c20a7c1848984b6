"""The Celery application `bench/compare.py` and `bench/sweep.py` run beside Baton: one no-op task,
acks late, as a durable-minded Celery deployment would run it. Broker, result backend and queue come
from the environment (BENCH_BROKER, BENCH_BACKEND, BENCH_QUEUE)."""

from __future__ import annotations

import os
import time

from celery import Celery

app = Celery("baton_bench", broker=os.environ["BENCH_BROKER"], backend=os.environ["BENCH_BACKEND"])
app.conf.update(
    task_acks_late=True,
    worker_prefetch_multiplier=4,
    task_default_queue=os.environ.get("BENCH_QUEUE", "baton_bench"),
    result_expires=3600,
    worker_hijack_root_logger=False,
)


@app.task(name="bench.noop")
def noop() -> float:
    """Does nothing; returns when it started (``time.time()``), for the post -> start latency."""
    return time.time()

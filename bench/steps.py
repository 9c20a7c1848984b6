#!/usr/bin/env python
"""Checkpoint overhead per durable step: a workflow of 100 no-op steps, durable against
`durable=False`, run one at a time, many times, end to end through a real executor and worker.

Against a fresh database (`--database-url`, default `.../baton_bench_steps`, dropped and created)
and a fresh queue prefix, it starts `baton executor` and one `baton worker`, then runs `--runs`
durable and `--runs` transient runs of `bench.steps` (alternating, so that the machine's drift
hits both alike), each through the Python client (post, then wait for the outcome).

Two figures per step:
- **checkpoint latency**: the time between consecutive `step.completed` events of a durable run
  (their `created_at` is the start of the transaction that recorded the step, so the difference
  is one whole step: the no-op, the round trip, the commit and its fsync);
- **overhead per step**: (durable run time - median transient run time) / steps, per durable run,
  run time being the execution's `started_at` -> `finished_at`.

Prints median and p99 of both, PostgreSQL's `fsync` and `synchronous_commit` (the target assumes
both on), and one JSON line. Target: median checkpoint overhead <= 2 ms per step.

    .venv/bin/python bench/steps.py --runs 30
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import itertools
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import asyncpg

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bench.measure import drop_database, pct, recreate_database  # noqa: E402
from common import amqp  # noqa: E402
from common.client import BatonClient  # noqa: E402
from common.settings import load_settings  # noqa: E402


def spawn(env: dict[str, str], log_dir: Path, label: str, *args: str) -> subprocess.Popen:
    log = open(log_dir / f"{label}.log", "wb")  # noqa: SIM115 - closed with the process
    return subprocess.Popen([sys.executable, "-m", "cli", *args], cwd=REPO, env=env, stdout=log, stderr=log)


async def wait_for_worker(pool: asyncpg.Pool, procs: list[subprocess.Popen], timeout_s: float = 60) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if any(p.poll() is not None for p in procs):
            raise SystemExit("a service exited during start-up; see its log")
        try:
            if await pool.fetchval("SELECT count(*) FROM workers WHERE status = 'active'"):
                return
        except asyncpg.UndefinedTableError:
            pass
        await asyncio.sleep(0.1)
    raise SystemExit("the worker did not register in time")


async def run(args: argparse.Namespace) -> dict[str, Any]:
    await recreate_database(args.database_url)
    prefix = f"bench_steps_{uuid.uuid4().hex[:8]}"
    log_dir = Path(tempfile.mkdtemp(prefix="baton-bench-steps-"))
    env = {k: v for k, v in os.environ.items() if not k.startswith("BATON")}
    env.update(
        BATON_CONFIG=str(REPO / "config" / "config.yaml"),
        BATON__DATABASE__URL=args.database_url,
        BATON__MESSAGE_QUEUE__URL=args.amqp_url,
        BATON__MESSAGE_QUEUE__PREFIX=prefix,
        BATON__WORKER__ACTION_MODULES='["bench.step_workflows"]',
        BATON__LOGGING__LEVEL="warning",
        PYTHONPATH=str(REPO),
    )
    procs = [spawn(env, log_dir, "executor", "executor")]
    procs.append(spawn(env, log_dir, "worker", "worker", "--name", "bench-steps", "--concurrency", "1"))
    settings = load_settings(database={"url": args.database_url}, message_queue={"url": args.amqp_url, "prefix": prefix})
    pool = await asyncpg.create_pool(args.database_url, min_size=1, max_size=2)
    try:
        await wait_for_worker(pool, procs)
        fsync = await pool.fetchval("SHOW fsync")
        sync_commit = await pool.fetchval("SHOW synchronous_commit")
        durable_s: list[float] = []
        transient_s: list[float] = []
        step_gaps_ms: list[float] = []
        async with BatonClient(settings) as client:
            for i in range(args.warmup + args.runs):
                for ref, times in (("bench.steps", durable_s), ("bench.steps_transient", transient_s)):
                    done = await client.run(ref, {"steps": args.steps}, wait_timeout_s=120)
                    if done["status"] != "completed":
                        raise SystemExit(f"{ref} ended {done['status']}: {done['error']}")
                    if i < args.warmup:
                        continue
                    row = await pool.fetchrow(
                        "SELECT extract(epoch FROM finished_at - started_at) AS s FROM executions WHERE id = $1",
                        uuid.UUID(done["id"]),
                    )
                    times.append(float(row["s"]))
                    if ref == "bench.steps":
                        stamps = [e["created_at"] for e in done["events"] if e["type"] == "step.completed"]
                        assert len(stamps) == args.steps, f"{len(stamps)} step events"
                        starts = [dt.datetime.fromisoformat(s) for s in stamps]
                        step_gaps_ms += [(b - a).total_seconds() * 1000 for a, b in itertools.pairwise(starts)]
                print(f"run {i + 1}/{args.warmup + args.runs}: durable {durable_s[-1] * 1000 if durable_s and i >= args.warmup else 0:.1f} ms, "
                      f"transient {transient_s[-1] * 1000 if transient_s and i >= args.warmup else 0:.1f} ms", flush=True)
    finally:
        for p in procs:
            p.terminate()
        for p in procs:
            try:
                p.wait(30)
            except subprocess.TimeoutExpired:
                p.kill()
        await pool.close()
        await amqp.delete_topology(args.amqp_url, amqp.Names(prefix), ["bench-steps"])
        await drop_database(args.database_url)
    base = statistics.median(transient_s)
    overhead_ms = [(d - base) / args.steps * 1000 for d in durable_s]
    return {
        "steps": args.steps, "runs": args.runs, "fsync": fsync, "synchronous_commit": sync_commit,
        "checkpoint_latency_ms": {"median": round(statistics.median(step_gaps_ms), 3), "p99": round(pct(step_gaps_ms, 99), 3),
                                  "n": len(step_gaps_ms)},
        "overhead_per_step_ms": {"median": round(statistics.median(overhead_ms), 3), "p99": round(pct(overhead_ms, 99), 3)},
        "durable_run_ms": {"median": round(statistics.median(durable_s) * 1000, 1), "p99": round(pct(durable_s, 99) * 1000, 1)},
        "transient_run_ms": {"median": round(base * 1000, 1), "p99": round(pct(transient_s, 99) * 1000, 1)},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--database-url", default="postgresql://postgres@127.0.0.1:5432/baton_bench_steps")
    parser.add_argument("--amqp-url", default="amqp://guest:guest@127.0.0.1:5672/")
    args = parser.parse_args()
    result = asyncio.run(run(args))
    print(f"fsync={result['fsync']} synchronous_commit={result['synchronous_commit']}, {args.runs} runs x {args.steps} steps")
    print(f"checkpoint latency per step: median {result['checkpoint_latency_ms']['median']} ms, "
          f"p99 {result['checkpoint_latency_ms']['p99']} ms (n={result['checkpoint_latency_ms']['n']})")
    print(f"overhead per step (durable - transient): median {result['overhead_per_step_ms']['median']} ms, "
          f"p99 {result['overhead_per_step_ms']['p99']} ms")
    print(json.dumps(result))
    target_ok = result["overhead_per_step_ms"]["median"] <= 2.0
    sys.exit(0 if target_ok else 1)


if __name__ == "__main__":
    main()

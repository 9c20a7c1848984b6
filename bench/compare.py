#!/usr/bin/env python
"""`make bench`: Baton side by side with Celery on the same machine, and Baton's own figures.

- **Burst**: `--n` no-op tasks posted at once and run to completion, each system with two worker
  processes: Baton (`bench/throughput.py`, 2 workers x 50: every state durable in PostgreSQL),
  Celery with RabbitMQ and the RPC result backend (prefork -c 2, acks late), and Celery with a
  PostgreSQL result backend (`db+postgresql+psycopg2://`; a few hundred tasks/s, so it runs
  `--celery-pg-n` tasks, 5,000 by default). For each: tasks per second (first post -> last
  start or finish), post -> start latency p50/p99 (Celery's task returns when it started), and CPU
  per task: the CPU seconds (from /proc) of the system's own processes during the run (Baton:
  executor, workers, the PostgreSQL backends of its database, RabbitMQ; Celery: the worker and its
  pool, RabbitMQ, and the backends of the results database), divided by the tasks. RabbitMQ is
  the machine's, so anything else using it meanwhile is counted too.
- **Per-step checkpoint overhead** of a durable workflow (`bench/steps.py`).
- **Recovery time** of a run whose worker is SIGKILLed or SIGSTOPped (`bench/recovery.py`).
- `--with-sweep`: the rate sweep (`bench/sweep.py`: throughput and p99 latency against offered
  rate, Baton and Celery, plotted); `--with-history`: history growth (`bench/history.py`).

Celery comes from the optional `bench` extra (`.venv/bin/pip install -e '.[bench]'`); without it
those rows say so. Prints a table and writes it all as JSON (`--out`, default `bench/results.json`).

    .venv/bin/python bench/compare.py --n 20000          # or: make bench
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import json
import os
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bench.measure import (  # noqa: E402
    cpu_snapshot,
    cpu_split,
    drop_database,
    pct,
    python_speed_ms,
    recreate_database,
)

PG = "postgresql://postgres@127.0.0.1:5432"
AMQP = "amqp://guest:guest@127.0.0.1:5672/"
CELERY_RESULTS_DB = "celery_bench_results"
CELERY_PG_BACKEND = f"db+{PG.replace('postgresql://', 'postgresql+psycopg2://')}/{CELERY_RESULTS_DB}"
#: Requests per message in the batched Baton row (`BatonClient.submit_many` takes up to 1,000).
BATCH = 500
#: CPU that counts as the system's own, per system (roles of measure.cpu_split).
OWN_CPU = {"baton": ("executor", "workers", "postgres", "rabbitmq"), "celery": ("celery", "postgres", "rabbitmq")}


def machine() -> str:
    """Cores, CPU model, and how fast it runs Python (`bench.measure.python_speed_ms`)."""
    model = ""
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    return f"{os.cpu_count()} cores{', ' + model if model else ''}; a fixed Python loop in {python_speed_ms():.0f} ms"


def run_script(*args: str) -> list[str]:
    """Run one of the bench scripts, showing its output as it comes; returns its lines."""
    print(f"  $ python {' '.join(args)}", flush=True)
    lines: list[str] = []
    cmd = [sys.executable, *args]
    with subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) as proc:
        assert proc.stdout is not None
        for line in proc.stdout:
            lines.append(line)
            if not line.startswith("{"):
                print(f"  | {line}", end="", flush=True)
    return lines


def last_json(lines: list[str]) -> dict[str, Any]:
    for line in reversed(lines):
        if line.startswith("{"):
            return json.loads(line)
    raise RuntimeError("no JSON line in:\n" + "".join(lines[-30:]))


# -- Baton -----------------------------------------------------------------------------------------


def baton_run(
    n: int, rate: float | None = None, database: str = "baton_bench_compare", batch: int = 0, client: bool = False
) -> dict[str, Any]:
    """bench/throughput.py: n no-ops, at once or at ``rate`` per second; ``batch`` posts a burst as
    batch messages of that many requests (what `BatonClient.submit_many` does); ``client`` posts
    through `BatonClient.submit`, a call per request (those made at once go out together)."""
    extra = ["--rate", str(rate)] if rate else []
    extra += ["--batch", str(batch)] if batch else []
    extra += ["--client"] if client else []
    result = last_json(run_script("bench/throughput.py", "--n", str(n), "--database-url", f"{PG}/{database}", *extra))
    cpu_s = sum(result["cpu_s"].get(k, 0) for k in OWN_CPU["baton"])
    return {"n": n, "completed": result["completed"], "per_s": round(result["executions_per_s"]),
            "posted_per_s": round(n / result["post_s"]) if result["post_s"] else None,
            "start_p50_ms": result["started_p50_ms"], "start_p99_ms": result["started_p99_ms"],
            "cpu_ms_per_task": round(cpu_s / n * 1000, 2), "cpu_s": result["cpu_s"]}


# -- Celery ----------------------------------------------------------------------------------------


def _pg_backends(database: str) -> set[int]:
    """The PostgreSQL backends serving ``database`` now (a Celery results database)."""
    import psycopg2

    conn = psycopg2.connect(f"{PG}/postgres")
    try:
        with conn.cursor() as cur:
            cur.execute("SELECT pid FROM pg_stat_activity WHERE datname = %s", (database,))
            return {pid for (pid,) in cur.fetchall()}
    finally:
        conn.close()


def celery_run(n: int, backend: str, rate: float | None = None, timeout_s: float = 600) -> dict[str, Any]:
    """A Celery worker (prefork -c 2, acks late; `bench/celery_app.py`) on a fresh queue; n no-ops
    posted at once, or at ``rate`` per second (what is due every 20 ms), each post's time recorded;
    each task returns when it started. Returns what `baton_run` does, or a note if it could not run."""
    if importlib.util.find_spec("celery") is None:
        return {"n": n, "note": "celery is not installed: pip install -e '.[bench]'"}
    from celery import Celery
    from celery.exceptions import TimeoutError as CeleryTimeout

    queue = f"baton_bench_{uuid.uuid4().hex[:8]}"
    node = f"{queue}@localhost"
    env = {**os.environ, "BENCH_BROKER": AMQP, "BENCH_BACKEND": backend, "BENCH_QUEUE": queue, "PYTHONPATH": str(REPO)}
    worker = subprocess.Popen(
        [sys.executable, "-m", "celery", "-A", "bench.celery_app", "worker", "-c", "2", "-P", "prefork", "-n", node,
         "--loglevel=WARNING", "-Q", queue, "--without-gossip", "--without-mingle", "--without-heartbeat"],
        cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    # A client app of its own per run: a Celery app keeps the first result backend it made.
    app = Celery("baton_bench_client", broker=AMQP, backend=backend)
    app.conf.update(task_default_queue=queue, result_expires=3600)
    try:
        deadline = time.monotonic() + 60
        while not app.control.ping(destination=[node], timeout=1.0):
            if time.monotonic() > deadline or worker.poll() is not None:
                return {"n": n, "note": "the Celery worker did not start"}
        roles = {worker.pid: "celery", os.getpid(): "bench"}
        cpu_before = cpu_snapshot()
        posted: list[tuple[float, Any]] = []
        step = max(1, int(rate * 0.02)) if rate else n
        t0 = time.monotonic()
        for start_at in range(0, n, step):
            if rate:
                time.sleep(max(0.0, t0 + start_at / rate - time.monotonic()))
            for _ in range(min(step, n - start_at)):
                posted.append((time.time(), app.send_task("bench.noop", queue=queue)))
        post_s = posted[-1][0] - posted[0][0]
        started: list[float] = []
        give_up = time.monotonic() + timeout_s
        for _, result in posted:
            try:
                started.append(result.get(timeout=max(1.0, give_up - time.monotonic())))
            except CeleryTimeout:
                return {"n": n, "note": f"timed out: {len(started)} of {n} started within {timeout_s:.0f} s"}
        pg_backends = _pg_backends(CELERY_RESULTS_DB) if backend.startswith("db+") else set()
        split, _ = cpu_split(cpu_before, cpu_snapshot(), roles, pg_backends)
    finally:
        worker.terminate()
        try:
            worker.wait(30)
        except subprocess.TimeoutExpired:
            worker.kill()
            worker.wait()
        with app.connection_for_write() as connection:
            connection.default_channel.queue_delete(queue)
            # Celery declared an exchange of the queue's name too: leave nothing on the broker.
            connection.default_channel.exchange_delete(queue)
        app.close()
    latencies = [s - p for (p, _), s in zip(posted, started, strict=True)]
    wall_s = max(started) - posted[0][0]  # first post -> last start (a no-op ends as it starts)
    cpu_s = sum(split.get(k, 0.0) for k in OWN_CPU["celery"])
    return {"n": n, "completed": len(started), "per_s": round(n / wall_s),
            "posted_per_s": round(n / post_s) if post_s > 0 else None,
            "start_p50_ms": round(pct(latencies, 50) * 1000, 1), "start_p99_ms": round(pct(latencies, 99) * 1000, 1),
            "cpu_ms_per_task": round(cpu_s / n * 1000, 2), "cpu_s": {k: round(v, 2) for k, v in sorted(split.items())}}


# -- the comparison --------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=20_000, help="tasks in the burst (default 20000)")
    parser.add_argument("--celery-pg-n", type=int, default=5000,
                        help="tasks for Celery with PostgreSQL results, which is slow (default 5000)")
    parser.add_argument("--steps-runs", type=int, default=10, help="bench/steps.py --runs (default 10)")
    parser.add_argument("--recovery-trials", type=int, default=5, help="bench/recovery.py --trials (default 5)")
    parser.add_argument("--with-sweep", action="store_true", help="also run bench/sweep.py (a few minutes)")
    parser.add_argument("--with-history", action="store_true", help="also run bench/history.py (long: seeds 1M rows)")
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results.json")
    args = parser.parse_args()

    where = machine()  # before anything runs: its Python speed is measured on an idle machine
    print(f"== on {where}", flush=True)
    print(f"== burst of {args.n} no-ops: Baton", flush=True)
    rows = [{"system": "Baton (durable, PostgreSQL)", **baton_run(args.n)}]
    print(f"== burst of {args.n} no-ops: Baton, posted in batches of {BATCH}", flush=True)
    rows.append({"system": f"Baton, batch posts ({BATCH}/message)", **baton_run(args.n, batch=BATCH)})
    print(f"== burst of {args.n} no-ops: Baton, through BatonClient.submit", flush=True)
    rows.append({"system": "Baton, BatonClient.submit (500 at once)", **baton_run(args.n, client=True)})
    print("== Celery (RabbitMQ, RPC results)", flush=True)
    rows.append({"system": "Celery (RabbitMQ, RPC results)", **celery_run(args.n, "rpc://")})
    print("== Celery (RabbitMQ, PostgreSQL results)", flush=True)
    if importlib.util.find_spec("sqlalchemy") is None or importlib.util.find_spec("psycopg2") is None:
        rows.append({"system": "Celery (RabbitMQ, PostgreSQL results)", "n": args.celery_pg_n,
                     "note": "sqlalchemy and psycopg2 are not installed: pip install -e '.[bench]'"})
    else:
        asyncio.run(recreate_database(f"{PG}/{CELERY_RESULTS_DB}"))
        try:
            rows.append({"system": "Celery (RabbitMQ, PostgreSQL results)",
                         **celery_run(args.celery_pg_n, CELERY_PG_BACKEND)})
        finally:
            asyncio.run(drop_database(f"{PG}/{CELERY_RESULTS_DB}"))  # each `make bench` had left it on the server
    print("== durable workflow step checkpoints", flush=True)
    steps = last_json(run_script("bench/steps.py", "--runs", str(args.steps_runs)))
    print("== recovery of a run after its worker is SIGKILLed or SIGSTOPped", flush=True)
    recovery = last_json(run_script("bench/recovery.py", "--trials", str(args.recovery_trials)))
    results: dict[str, Any] = {"n": args.n, "celery_pg_n": args.celery_pg_n, "machine": where, "burst": rows,
                               "steps": steps, "recovery": recovery}
    for wanted, script in ((args.with_sweep, "sweep"), (args.with_history, "history")):
        if wanted:
            print(f"== bench/{script}.py", flush=True)
            out = REPO / "bench" / f"{script}.json"
            run_script(f"bench/{script}.py", "--out", str(out))
            results[script] = json.loads(out.read_text())

    print(f"\nburst of no-ops on this machine ({results['machine']}); latency from post to start:")
    print(f"{'system':40} {'tasks':>6} {'posted/s':>9} {'tasks/s':>8} {'start p50':>10} {'start p99':>10} "
          f"{'CPU/task':>9}")
    for r in rows:
        if "note" in r:
            print(f"{r['system']:40} {r['n']:>6} {r['note']}")
            continue
        print(f"{r['system']:40} {r['n']:>6} {r['posted_per_s']:>9} {r['per_s']:>8} {r['start_p50_ms']:>7.1f} ms "
              f"{r['start_p99_ms']:>7.1f} ms {r['cpu_ms_per_task']:>6.2f} ms")
    print("  posted/s: how fast the client published (Baton's: asyncio on uvloop with confirms, 500 in flight, one message "
          f"per request, or {BATCH} requests per message, or BatonClient.submit calls, 500 at once, each waiting "
          "for the executor's answer; Celery's: send_task in a loop), which bounds tasks/s")
    if args.celery_pg_n != args.n:
        print(f"  (Celery with PostgreSQL results ran {args.celery_pg_n} tasks, not {args.n}: it stores each result "
              "in its own transaction, a run of 20,000 would take minutes)")
    print("  CPU/task: CPU seconds of the system's own processes during the run / tasks (Baton: executor, workers, "
          "its PostgreSQL backends, RabbitMQ; Celery: worker and pool, RabbitMQ, results database backends)")
    print(f"durable workflow step checkpoint: overhead median {steps['overhead_per_step_ms']['median']} ms, "
          f"p99 {steps['overhead_per_step_ms']['p99']} ms per step (fsync {steps['fsync']})")
    for kind in ("sigkill", "sigstop"):
        r = recovery.get(kind, {})
        if "median_s" in r:
            print(f"recovery after {kind.upper()}: signal -> running on another worker, median {r['median_s']} s, "
                  f"max {r['max_s']} s over {len(r['times_s'])} trials (target {r['target_s']} s)")
    for script in ("sweep", "history"):
        if script in results:
            print(f"{script}: its table is above; its figures are in bench/{script}.json (and in {args.out.name})")
    args.out.write_text(json.dumps(results, indent=2))
    print(f"written to {args.out}")


if __name__ == "__main__":
    main()

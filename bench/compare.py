#!/usr/bin/env python
"""`make bench`: Baton side by side with Celery on the same machine, and Baton's own figures.

- **Burst throughput**: `--n` no-op tasks posted at once, run to completion, each system with two
  worker processes' worth of concurrency: Baton (`bench/throughput.py`: every state durable in
  PostgreSQL), Celery with RabbitMQ and the RPC result backend (prefork -c 2, acks late), and Celery
  with a PostgreSQL result backend. Celery comes from the optional `bench` extra
  (`.venv/bin/pip install -e '.[bench]'`); without it those rows say so.
- **Per-step checkpoint overhead** of a durable workflow (`bench/steps.py`).

Prints a table and writes it as JSON (`--out`, default `bench/results.json`).

    .venv/bin/python bench/compare.py --n 20000
"""

from __future__ import annotations

import argparse
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
PG = "postgresql://postgres@127.0.0.1:5432"
AMQP = "amqp://guest:guest@127.0.0.1:5672/"


def last_json(output: str) -> dict[str, Any]:
    for line in reversed(output.strip().splitlines()):
        if line.startswith("{"):
            return json.loads(line)
    raise RuntimeError(f"no JSON line in:\n{output[-2000:]}")


def baton_burst(n: int) -> dict[str, Any]:
    done = subprocess.run([sys.executable, "bench/throughput.py", "--n", str(n)], cwd=REPO, capture_output=True,
                          text=True, timeout=1800)
    result = last_json(done.stdout)
    cpu = sum(result["cpu_s"].get(k, 0) for k in ("executor", "workers", "postgres", "rabbitmq"))
    return {"system": "Baton (durable, PostgreSQL)", "per_s": round(result["executions_per_s"]),
            "start_p50_ms": result["started_p50_ms"], "start_p99_ms": result["started_p99_ms"],
            "cpu_ms_per_task": round(cpu / n * 1000, 2)}


def celery_burst(n: int, backend: str, label: str) -> dict[str, Any]:
    if importlib.util.find_spec("celery") is None:
        return {"system": label, "note": "celery is not installed: pip install -e '.[bench]'"}
    queue = f"baton_bench_{uuid.uuid4().hex[:8]}"
    env = {**os.environ, "BENCH_BROKER": AMQP, "BENCH_BACKEND": backend, "BENCH_QUEUE": queue, "PYTHONPATH": str(REPO)}
    worker = subprocess.Popen(
        [sys.executable, "-m", "celery", "-A", "bench.celery_app", "worker", "-c", "2", "-P", "prefork",
         "--loglevel=WARNING", "-Q", queue, "--without-gossip", "--without-mingle", "--without-heartbeat"],
        cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    try:
        os.environ.update({k: env[k] for k in ("BENCH_BROKER", "BENCH_BACKEND", "BENCH_QUEUE")})
        sys.path.insert(0, str(REPO))
        from bench import celery_app

        celery_app.app.conf.update(broker_url=AMQP, result_backend=backend, task_default_queue=queue)
        deadline = time.monotonic() + 60
        while not celery_app.app.control.ping(timeout=1.0):
            if time.monotonic() > deadline or worker.poll() is not None:
                return {"system": label, "note": "the Celery worker did not start"}
        from celery.exceptions import TimeoutError as CeleryTimeout

        started = time.monotonic()
        results = [celery_app.noop.delay() for _ in range(n)]
        for got, result in enumerate(results):
            try:
                result.get(timeout=max(60.0, 600 - (time.monotonic() - started)))
            except CeleryTimeout:
                return {"system": label, "note": f"timed out: {got} of {n} results after "
                                                 f"{time.monotonic() - started:.0f} s"}
        wall = time.monotonic() - started
        return {"system": label, "per_s": round(n / wall)}
    finally:
        worker.terminate()
        try:
            worker.wait(30)
        except subprocess.TimeoutExpired:
            worker.kill()


def steps_overhead() -> dict[str, Any]:
    done = subprocess.run([sys.executable, "bench/steps.py", "--runs", "10"], cwd=REPO, capture_output=True, text=True,
                          timeout=900)
    return last_json(done.stdout)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=20_000)
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results.json")
    args = parser.parse_args()
    rows = [baton_burst(args.n), celery_burst(args.n, "rpc://", "Celery (RabbitMQ, RPC results)")]
    if importlib.util.find_spec("sqlalchemy") is not None:
        import psycopg2  # noqa: F401 - the backend's driver

        name = "celery_bench_results"
        subprocess.run(["psql", "-h", "127.0.0.1", "-U", "postgres", "-qc", f"DROP DATABASE IF EXISTS {name} WITH (FORCE)"],
                       check=True)
        subprocess.run(["psql", "-h", "127.0.0.1", "-U", "postgres", "-qc", f"CREATE DATABASE {name}"], check=True)
        rows.append(celery_burst(args.n, f"db+{PG.replace('postgresql://', 'postgresql+psycopg2://')}/{name}",
                                 "Celery (RabbitMQ, PostgreSQL results)"))
    steps = steps_overhead()
    machine = f"{os.cpu_count()} cores, {os.uname().sysname} {os.uname().release}"
    print(f"\nburst of {args.n} no-ops on this machine ({machine}):")
    print(f"{'system':40} {'tasks/s':>8} {'start p50':>10} {'start p99':>10} {'CPU/task':>9}")
    for r in rows:
        if "note" in r:
            print(f"{r['system']:40} {r['note']}")
            continue
        print(f"{r['system']:40} {r['per_s']:>8} {r.get('start_p50_ms', '-'):>10} {r.get('start_p99_ms', '-'):>10} "
              f"{r.get('cpu_ms_per_task', '-'):>9}")
    print(f"durable workflow step checkpoint: median {steps['overhead_per_step_ms']['median']} ms, "
          f"p99 {steps['overhead_per_step_ms']['p99']} ms (fsync {steps['fsync']})")
    args.out.write_text(json.dumps({"n": args.n, "machine": machine, "burst": rows, "steps": steps}, indent=2))
    print(f"written to {args.out}")


if __name__ == "__main__":
    main()

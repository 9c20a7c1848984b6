#!/usr/bin/env python
"""End-to-end throughput benchmark: N `core.noop` invocations through RabbitMQ -> executor -> workers.

Starts one `baton executor` and `--workers` `baton worker` processes against a fresh database and a
unique RabbitMQ prefix, posts `--n` invocations (publisher confirms, concurrently in chunks), polls
PostgreSQL until all are `completed` (or `--timeout`), then prints wall time, executions per second,
latency percentiles (post -> created / scheduled / started / finished, from the database's
timestamps against the client's wall clock on the same machine), the CPU time each process group
used while the run was measured, the resident memory of the executor and of each worker over the run,
and a final one-line JSON summary. Everything it created (queues, exchanges, database) is removed
afterwards unless `--keep`; with `--reuse-database` the database is neither recreated nor dropped
(the executor migrates it on start), and only this run's executions are read.

    .venv/bin/python bench/throughput.py --n 5000 --workers 2 --concurrency 50
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import secrets
import shlex
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import aio_pika
import asyncpg

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bench.measure import (  # noqa: E402
    RssSampler,
    cpu_snapshot,
    cpu_split,
    drop_database,
    ms,
    pct,
    python_speed_ms,
    recreate_database,
    total_cpu_seconds,
)
from cli.app import run_on_uvloop  # noqa: E402
from common import amqp  # noqa: E402
from common.client import BatonClient  # noqa: E402
from common.ids import batch_execution_id  # noqa: E402
from common.settings import Settings  # noqa: E402

TERMINAL = ("completed", "failed", "timeout", "cancelled")


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


# -- database ------------------------------------------------------------------------------------


async def wait_for(predicate, *, timeout_s: float, what: str, procs: list[subprocess.Popen]) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        for p in procs:
            if p.poll() is not None:
                raise RuntimeError(f"{what}: a service exited early (pid {p.pid}, rc {p.returncode})")
        with contextlib.suppress(Exception):
            if await predicate():
                return
        if time.monotonic() > deadline:
            raise RuntimeError(f"timed out waiting for {what}")
        await asyncio.sleep(0.2)


# This run's executions only (created since it started, through `executions_created`): cheap however
# much history the table holds. $1 the run's start (epoch seconds)
PROGRESS = """
SELECT status, count(*) AS n FROM executions
WHERE created_at >= to_timestamp($1)
GROUP BY status
"""

XACTS = "SELECT xact_commit + xact_rollback FROM pg_stat_database WHERE datname = current_database()"

SCANS = "SELECT relname, seq_scan, seq_tup_read FROM pg_stat_user_tables"

BATCHES = """
SELECT count(DISTINCT created_at) AS intake,
       count(DISTINCT scheduled_at) AS schedule,
       count(DISTINCT (worker, started_at)) AS claim,
       count(DISTINCT (worker, finished_at)) AS finish
FROM executions
WHERE created_at >= to_timestamp($1)
"""

# $1 the run's start (epoch seconds)
TIMES = """
SELECT id::text AS id, status,
       extract(epoch FROM created_at)::float8 AS created,
       extract(epoch FROM scheduled_at)::float8 AS scheduled,
       extract(epoch FROM started_at)::float8 AS started,
       extract(epoch FROM finished_at)::float8 AS finished
FROM executions
WHERE created_at >= to_timestamp($1)
"""


# -- services --------------------------------------------------------------------------------------


def baton_command() -> list[str]:
    script = Path(sys.executable).parent / "baton"
    if script.exists():
        return [str(script)]
    return [sys.executable, "-m", "cli"]


def service_env(args: argparse.Namespace, prefix: str) -> dict[str, str]:
    env = dict(os.environ)
    env.setdefault("BATON_CONFIG", str(args.source / "config" / "config.yaml"))
    if args.source != REPO:  # run the services from another checkout (say a `git archive` of a commit)
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(args.source), env.get("PYTHONPATH")]))
    env["BATON__DATABASE__URL"] = args.database_url
    env["BATON__MESSAGE_QUEUE__URL"] = args.amqp_url
    env["BATON__MESSAGE_QUEUE__PREFIX"] = prefix
    env["BATON__LOGGING__LEVEL"] = args.log_level
    env["PYTHONUNBUFFERED"] = "1"
    return env


def start(cmd: list[str], env: dict[str, str], log_path: Path, cwd: Path) -> subprocess.Popen:
    # The child gets its own copy of the descriptor; this process need not keep one.
    with open(log_path, "wb") as out:
        return subprocess.Popen(cmd, env=env, cwd=cwd, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)


def stop(procs: list[subprocess.Popen], timeout_s: float = 60.0) -> dict[int, int | None]:
    for p in procs:
        if p.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                p.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + timeout_s
    codes: dict[int, int | None] = {}
    for p in procs:
        try:
            codes[p.pid] = p.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            log(f"pid {p.pid} did not stop within {timeout_s:.0f} s after SIGTERM; killing it")
            p.kill()
            codes[p.pid] = p.wait()
    return codes


# -- posting ---------------------------------------------------------------------------------------


async def ticks(n: int, rate: float) -> AsyncIterator[tuple[int, int]]:
    """A steady stream of ``n`` posts at ``rate`` per second: every 20 ms, what is due by then
    (latency without a backlog), as (index of the first, how many)."""
    step = max(1, int(rate * 0.02))
    t0 = time.monotonic()
    for start_at in range(0, n, step):
        delay = t0 + start_at / rate - time.monotonic()
        if delay > 0:
            await asyncio.sleep(delay)
        yield start_at, min(step, n - start_at)


async def post_all(
    amqp_url: str, names: amqp.Names, n: int, chunk: int, rate: float | None, batch: int = 0, reply: bool = False
) -> dict[str, float]:
    """Publish n noop requests with confirms, as fast as possible (``chunk`` in flight at once) or
    at ``rate`` per second; returns {execution id: wall-clock post time}. With ``reply``, each
    request asks for the executor's reply, as `BatonClient.submit` does (the replies are read and
    dropped)."""
    connection = await aio_pika.connect(amqp_url)
    posted: dict[str, float] = {}
    try:
        channel = await connection.channel(publisher_confirms=True)
        # Make sure the requests queue exists (and is bound) before anything is published to it.
        await amqp.declare_requests_queue(channel, names)
        exchange = await channel.get_exchange(names.executions_exchange)
        body = json.dumps({"action_ref": "core.noop", "parameters": {}}).encode()
        reply_to = None
        if reply:
            inbox = await channel.declare_queue(exclusive=True)  # server-named: amq.gen-*
            await inbox.consume(_drop, no_ack=True)
            reply_to = inbox.name

        async def one(execution_id: str) -> None:
            posted[execution_id] = time.time()
            await exchange.publish(
                aio_pika.Message(
                    body,
                    content_type="application/json",
                    delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
                    message_id=execution_id,
                    correlation_id=execution_id if reply_to else None,
                    reply_to=reply_to,
                ),
                routing_key=amqp.REQUESTED_KEY,
            )

        async def many(count: int) -> None:
            # One message holding ``count`` requests (`BatonClient.submit_many` posts the same).
            message_id = uuid.uuid4().hex
            now = time.time()
            for k in range(count):
                posted[str(batch_execution_id(message_id, k))] = now
            await exchange.publish(
                aio_pika.Message(
                    b"[" + b",".join([body] * count) + b"]",
                    content_type="application/json",
                    delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
                    message_id=message_id,
                ),
                routing_key=amqp.REQUESTED_KEY,
            )

        ids = [str(uuid.uuid4()) for _ in range(n)]
        if batch and not rate:
            await asyncio.gather(*(many(min(batch, n - start_at)) for start_at in range(0, n, batch)))
        elif rate:
            async for start_at, count in ticks(n, rate):
                await asyncio.gather(*(one(i) for i in ids[start_at : start_at + count]))
        else:
            for start_at in range(0, n, chunk):
                await asyncio.gather(*(one(i) for i in ids[start_at : start_at + chunk]))
    finally:
        await connection.close()
    return posted


async def post_with_client(settings: Settings, n: int, chunk: int, rate: float | None) -> dict[str, float]:
    """Post n noop requests through `BatonClient.submit`, each its own call (it posts what is
    submitted together in one message, and waits for the executor's answer), as fast as possible
    (``chunk`` at once) or at ``rate`` per second; returns {execution id: wall-clock post time}."""
    posted: dict[str, float] = {}
    async with BatonClient(settings) as client:

        async def one() -> None:
            at = time.time()
            submission = await client.submit("core.noop", {})
            if not submission.accepted:
                raise RuntimeError(f"no executor answered for {submission.execution_id}")
            posted[str(submission.execution_id)] = at

        if rate:
            # The answers are not waited for between ticks.
            calls = []
            async for _, count in ticks(n, rate):
                calls += [asyncio.create_task(one()) for _ in range(count)]
            await asyncio.gather(*calls)
        else:
            for start_at in range(0, n, chunk):
                await asyncio.gather(*(one() for _ in range(min(chunk, n - start_at))))
    return posted


async def _drop(_message: aio_pika.abc.AbstractIncomingMessage) -> None:
    """A reply, read and dropped: the run reads what it needs from PostgreSQL."""


# -- the run ---------------------------------------------------------------------------------------


async def run(args: argparse.Namespace) -> dict:
    prefix = f"bench_{secrets.token_hex(4)}"
    names = amqp.Names(prefix)
    worker_names = [f"{prefix}_w{i + 1}" for i in range(args.workers)]
    log_dir = Path(args.log_dir or f"/tmp/{prefix}")
    log_dir.mkdir(parents=True, exist_ok=True)
    env = service_env(args, prefix)
    cmd = shlex.split(args.baton_cmd) if args.baton_cmd else baton_command()
    procs: list[subprocess.Popen] = []
    roles: dict[int, str] = {os.getpid(): "bench"}
    summary: dict = {
        "n": args.n,
        "workers": args.workers,
        "concurrency": args.concurrency,
        "rate": args.rate,
        "batch": args.batch,
        "reply": args.reply,
        "client": args.client,
        "prefix": prefix,
        # Before the services start: how fast this machine runs Python now (it drifts over minutes).
        "python_speed_ms": python_speed_ms(),
    }
    pool: asyncpg.Pool | None = None
    rss_task: asyncio.Task | None = None
    log(f"prefix {prefix}, database {args.database_url}, service logs in {log_dir}")
    try:
        if not args.reuse_database:
            await recreate_database(args.database_url)
        executor = start([*cmd, "executor"], env, log_dir / "executor.log", args.source)
        procs.append(executor)
        roles[executor.pid] = "executor"
        (log_dir / "pids").write_text(f"executor {executor.pid}\n")

        pool = await asyncpg.create_pool(args.database_url, min_size=1, max_size=2)
        assert pool is not None

        async def migrated() -> bool:
            return await pool.fetchval("SELECT to_regclass('public.workers') IS NOT NULL")

        await wait_for(migrated, timeout_s=60, what="the executor to migrate the database", procs=procs)
        for w in worker_names:
            p = start(
                [*cmd, "worker", "--name", w, "--concurrency", str(args.concurrency), "--runtimes", "python"],
                env,
                log_dir / f"{w}.log",
                args.source,
            )
            procs.append(p)
            roles[p.pid] = "workers"
            with open(log_dir / "pids", "a") as f:
                f.write(f"worker {w} {p.pid}\n")

        async def registered() -> bool:
            n = await pool.fetchval(
                "SELECT count(*) FROM workers WHERE status = 'active' AND name = ANY($1::text[])", worker_names
            )
            return n >= args.workers

        await wait_for(registered, timeout_s=60, what="the workers to register", procs=procs)
        log(f"executor pid {executor.pid}; workers " + ", ".join(f"{w}={p.pid}" for w, p in zip(worker_names, procs[1:], strict=True)))
        if args.settle > 0:
            await asyncio.sleep(args.settle)

        xact_before = await pool.fetchval(XACTS)
        scans_before = {r["relname"]: r for r in await pool.fetch(SCANS)}
        cpu_before = cpu_snapshot()
        total_before = total_cpu_seconds()
        t_post = time.time()
        rss = RssSampler({"executor": executor.pid} | {f"w{i + 1}": p.pid for i, p in enumerate(procs[1:])}, t_post)
        rss.sample()
        rss_task = asyncio.create_task(rss.run(args.rss_interval))
        if args.client:
            client_settings = Settings(
                database={"url": args.database_url}, message_queue={"url": args.amqp_url, "prefix": prefix}
            )
            posted = await post_with_client(client_settings, args.n, args.chunk, args.rate)
        else:
            posted = await post_all(args.amqp_url, names, args.n, args.chunk, args.rate, args.batch, args.reply)
        t_posted = time.time()
        post_s = t_posted - t_post
        log(f"posted {args.n} requests in {post_s:.2f} s ({args.n / post_s:.0f}/s)")

        first_post = min(posted.values())
        deadline = time.time() + args.timeout
        last_done, last_t = 0, time.time()
        counts: dict[str, int] = {}
        while True:
            await asyncio.sleep(args.poll)
            rows = await pool.fetch(PROGRESS, t_post)
            counts = {r["status"]: r["n"] for r in rows}
            done = sum(counts.get(s, 0) for s in TERMINAL)
            now = time.time()
            rate = (done - last_done) / (now - last_t) if now > last_t else 0.0
            overall = done / (now - first_post)
            others = " ".join(f"{k}={v}" for k, v in sorted(counts.items()) if k != "completed")
            log(
                f"completed {counts.get('completed', 0):>6}/{args.n}  "
                f"{rate:7.0f}/s now  {overall:7.0f}/s overall  {others}"
            )
            last_done, last_t = done, now
            if done >= args.n:
                break
            for p in procs:
                if p.poll() is not None:
                    raise RuntimeError(f"service pid {p.pid} exited (rc {p.returncode}) during the run")
            if now > deadline:
                break
        cpu_after = cpu_snapshot()
        total_after = total_cpu_seconds()
        rss_task.cancel()
        rss.sample()
        xacts = await pool.fetchval(XACTS) - xact_before
        # Other projects may share this PostgreSQL: count only the backends serving our database.
        backends = await pool.fetch(
            "SELECT pid, backend_type = 'client backend' AS client, datname = current_database() AS ours"
            " FROM pg_stat_activity"
        )
        pg_backends = {r["pid"] for r in backends if r["client"] and r["ours"]}
        pg_background = {r["pid"] for r in backends if not r["client"]}
        batches = await pool.fetchrow(BATCHES, t_post)
        await asyncio.sleep(1.0)  # backends report table statistics at most once a second
        await pool.execute("SELECT pg_stat_clear_snapshot()")
        scans = {}
        for r in await pool.fetch(SCANS):
            b = scans_before.get(r["relname"])
            seq = r["seq_scan"] - (b["seq_scan"] if b else 0)
            if seq:
                scans[r["relname"]] = {"seq_scans": seq, "rows_read": r["seq_tup_read"] - (b["seq_tup_read"] if b else 0)}

        rows = await pool.fetch(TIMES, t_post)
        by_status: dict[str, int] = {}
        for r in rows:
            by_status[r["status"]] = by_status.get(r["status"], 0) + 1
        completed = [r for r in rows if r["status"] == "completed" and r["id"] in posted]
        missing = args.n - sum(1 for r in rows if r["id"] in posted)
        timed_out = len(completed) < args.n

        def lat(col: str) -> list[float]:
            return [r[col] - posted[r["id"]] for r in completed if r[col] is not None]

        latencies = {c: lat(c) for c in ("created", "scheduled", "started", "finished")}
        last_finish = max((r["finished"] for r in completed), default=time.time())
        wall_s = last_finish - first_post
        eps = len(completed) / wall_s if wall_s > 0 else 0.0
        window_s = max(1e-9, time.time() - t_post)

        print()
        print("=" * 72)
        if timed_out:
            print(f"TIMEOUT after {args.timeout:.0f} s: only {len(completed)}/{args.n} completed")
            print(f"  by status: {json.dumps(by_status, sort_keys=True)}; never recorded: {missing}")
        print(f"executions completed     {len(completed)}/{args.n}   (workers={args.workers}, concurrency={args.concurrency})")
        print(f"posting                  {post_s:8.2f} s   ({args.n / post_s:.0f} posts/s)")
        print(f"wall (first post -> last finish) {wall_s:8.2f} s")
        print(f"throughput end to end    {eps:8.0f} executions/s")
        print("latency from post        p50          p99          max")
        for col, label in (("created", "-> created"), ("scheduled", "-> scheduled"), ("started", "-> started"), ("finished", "-> finished")):
            v = latencies[col]
            print(f"  {label:<22} {ms(pct(v, 50))}  {ms(pct(v, 99))}  {ms(max(v) if v else float('nan'))}")
        split, others = cpu_split(cpu_before, cpu_after, roles, pg_backends, pg_background)
        total_cpu = total_after[0] - total_before[0]
        idle = total_after[1] - total_before[1]
        print(f"CPU during the run ({window_s:.1f} s window, {os.cpu_count()} cores, {100 * idle / total_cpu if total_cpu else 0:.0f}% idle):")
        for k in (
            "executor", "workers", "postgres", "postgres (background)", "rabbitmq", "bench", "kernel",
            "postgres (other)", "other",
        ):
            if k in split:
                print(f"  {k:<21} {split[k]:7.2f} s cpu   {100 * split[k] / window_s:6.1f}% of one core")
        if others:
            top = sorted(others.items(), key=lambda kv: -kv[1])[:5]
            print("  other is: " + ", ".join(f"{c} {v:.2f} s" for c, v in top))
        # now() is the transaction's start time, so distinct timestamps count the statements that
        # recorded each step: how well intake, scheduler, claims and finishes batch.
        print(f"database transactions    {xacts} ({xacts / max(1, len(completed)):.2f} per execution)")
        print(
            "statements per step (avg batch): "
            + ", ".join(
                f"{k} {batches[k]} ({len(completed) / batches[k]:.1f})" if batches[k] else f"{k} 0"
                for k in ("intake", "schedule", "claim", "finish")
            )
        )
        memory = rss.summary()
        print(f"resident memory (MB)     first     last      max   (sampled every {args.rss_interval:g} s)")
        for role, m in memory.items():
            print(f"  {role:<21} {m['first']:7.1f}  {m['last']:7.1f}  {m['max']:7.1f}")
        if scans:
            # Tables read whole, and how many rows that cost: a hot query that lost its index shows here.
            print(
                "sequential scans         "
                + ", ".join(f"{t} {v['seq_scans']} ({v['rows_read']} rows)" for t, v in sorted(scans.items()))
            )
        print("=" * 72)
        summary.update(
            {
                "completed": len(completed),
                "timed_out": timed_out,
                "by_status": by_status,
                "post_s": round(post_s, 3),
                "wall_s": round(wall_s, 3),
                "executions_per_s": round(eps, 1),
                "started_p50_ms": round(pct(latencies["started"], 50) * 1000, 1),
                "started_p99_ms": round(pct(latencies["started"], 99) * 1000, 1),
                "started_max_ms": round(max(latencies["started"], default=float("nan")) * 1000, 1),
                "finished_p50_ms": round(pct(latencies["finished"], 50) * 1000, 1),
                "finished_p99_ms": round(pct(latencies["finished"], 99) * 1000, 1),
                "cpu_s": {k: round(v, 2) for k, v in sorted(split.items())},
                "cpu_idle_pct": round(100 * idle / total_cpu, 1) if total_cpu else None,
                "db_xacts": xacts,
                "batches": dict(batches),
                "seq_scans": scans,
                "rss_mb": memory,
            }
        )
        return summary
    finally:
        if rss_task is not None:
            rss_task.cancel()
        if pool is not None:
            with contextlib.suppress(Exception):
                await pool.close()
        if procs:
            log("stopping services (SIGTERM)")
            codes = stop(procs)
            summary["exit_codes"] = list(codes.values())
            bad = {pid: rc for pid, rc in codes.items() if rc not in (0, -signal.SIGTERM)}
            if bad:
                log(f"services exited non-zero: {bad}; see logs in {log_dir}")
        with contextlib.suppress(Exception):
            await amqp.delete_topology(args.amqp_url, names, worker_names)
        if args.reuse_database:
            log(f"left database {args.database_url} in place (--reuse-database); queues and exchanges removed")
        elif not args.keep:
            with contextlib.suppress(Exception):
                await drop_database(args.database_url)
            log("removed queues, exchanges and the bench database")
        else:
            log(f"kept database {args.database_url} (queues and exchanges removed)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=5000, help="invocations to post (default 5000)")
    parser.add_argument("--workers", type=int, default=2, help="worker processes (default 2)")
    parser.add_argument("--concurrency", type=int, default=50, help="per worker (default 50)")
    parser.add_argument("--database-url", default="postgresql://postgres@127.0.0.1:5432/baton_bench")
    parser.add_argument("--amqp-url", default="amqp://guest:guest@127.0.0.1:5672/")
    parser.add_argument("--keep", action="store_true", help="keep the bench database afterwards")
    parser.add_argument(
        "--reuse-database", action="store_true",
        help="run on the database as it is (say, seeded with history): neither recreate nor drop it",
    )
    parser.add_argument(
        "--rss-interval", type=float, default=5.0, help="seconds between resident-memory samples (default 5)"
    )
    parser.add_argument("--timeout", type=float, default=300.0, help="give up after this many seconds")
    parser.add_argument("--poll", type=float, default=0.5, help="progress poll interval in seconds")
    parser.add_argument(
        "--rate", type=float, default=None, help="post at this many per second instead of all at once"
    )
    parser.add_argument("--chunk", type=int, default=500, help="publishes in flight at once while posting")
    parser.add_argument(
        "--batch", type=int, default=0,
        help="post a burst as batch messages of this many requests each (default 0: one message per request)",
    )
    parser.add_argument(
        "--reply", action="store_true",
        help="each request asks for the executor's reply (reply_to), as BatonClient.submit's do",
    )
    parser.add_argument(
        "--client", action="store_true",
        help="post through BatonClient.submit, a call per request (it posts requests submitted together in one "
             "message, and waits for the executor's answer to each)",
    )
    parser.add_argument("--settle", type=float, default=1.0, help="seconds to wait after registration")
    parser.add_argument("--log-level", default="warning", help="services' logging.level (default warning)")
    parser.add_argument(
        "--baton-cmd", default=None, help="command that starts a service (default: the baton script next to this Python)"
    )
    parser.add_argument(
        "--source", type=Path, default=REPO, help="source tree the services run from (default: this checkout)"
    )
    parser.add_argument("--log-dir", default=None, help="where service logs go (default /tmp/<prefix>)")
    args = parser.parse_args()
    args.source = args.source.resolve()
    # On uvloop, as Baton's services run: the load generator shares the cores with what it measures,
    # and on the default loop each confirmed publish cost it a third more CPU.
    summary = run_on_uvloop(run(args))
    print(json.dumps(summary, sort_keys=True))
    sys.exit(1 if summary.get("timed_out") else 0)


if __name__ == "__main__":
    main()

#!/usr/bin/env python
"""History growth: Baton's throughput, latency and periodic queries beside 1,000, 100,000 and
1,000,000 finished executions already in the tables.

Each history size (`--sizes`) gets a database of its own (`--database-url`, default
`.../baton_bench_history`, with `_<size>` appended; created and migrated with the executor's own
migrations). For each, the script

1. seeds that many finished executions (every 50th failed, the rest completed; finished over the
   last 29 days, inside the default 30-day retention) and their events, 4 each like real ones
   (requested, scheduled, started, completed/failed), one `INSERT ... SELECT` from
   `generate_series` per table, then `VACUUM ANALYZE` (what autovacuum has long done to old rows);
2. prints `EXPLAIN (ANALYZE, BUFFERS)` of every query the executor's periodic loops run against
   `executions` (scheduler, sweeper, recovery, both timeout monitors, timers, retention), with the
   configured parameters and some work in flight (requested, delayed, scheduled, running, sleeping
   and interrupted rows, live workers and a lost one, all inside a transaction that is rolled back):
   per query the plan's top nodes and every scan in it, the execution time and the shared buffers
   touched. Those must not grow with history: index scans on partial indexes, never a sequential
   scan of `executions` or `execution_events`.

Then it runs `bench/throughput.py --reuse-database` in rounds (`--repeat`, default 5): in each
round, on every size's database in turn (the first place rotating from round to round), a burst
(`--n`, default 10,000) and a steady stream (`--rate`, default 500/s, `--steady-n` 5,000),
deleting each run's executions afterwards so that the next run sees the same history. Sizes are
interleaved because this machine's speed drifts over minutes by more than history could move it:
run one size after another and the drift reads as a difference between sizes. The table shows
each figure's median over the rounds with the spread between them, and the largest history
against the smallest round by round: the median and the range of the rounds' ratios.

Prints the tables, writes everything as JSON (`--out`, default `bench/history.json`), and drops the
databases unless `--keep`.

    .venv/bin/python bench/history.py                      # or: make bench-history
    .venv/bin/python bench/history.py --sizes 1000,100000 --n 2000 --steady-n 2000 --rate 200
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import time
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import asyncpg

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bench.compare import last_json, run_script  # noqa: E402
from bench.measure import drop_database, recreate_database  # noqa: E402
from common import db  # noqa: E402
from common.queries import executions as q  # noqa: E402
from common.queries import workers as wq  # noqa: E402
from common.queries import workflows as fq  # noqa: E402
from common.settings import load_settings  # noqa: E402
from executor import recovery, requested_timeout, timeout_monitor, timers  # noqa: E402

HISTORY_SPAN_S = 29 * 86400.0  # inside the default retention (30 days): pruning finds nothing due

# $1 first row, $2 last row, $3 history size, $4 span in seconds, $5 the moment history ends.
# Row g finished g * span / size seconds before $5; its id is derived from g, so the events below
# can name it without reading the table.
SEED_EXECUTIONS = """
INSERT INTO executions (id, action_ref, parameters, status, attempt, worker, incarnation, result, error,
                        last_event_seq, created_at, scheduled_at, started_at, finished_at, updated_at)
SELECT md5('history:' || g)::uuid, 'core.noop', '{}'::jsonb,
       CASE WHEN g % 50 = 0 THEN 'failed' ELSE 'completed' END, 1, 'history_w' || (g % 2 + 1),
       md5('history_w' || (g % 2 + 1))::uuid, CASE WHEN g % 50 = 0 THEN NULL ELSE 'null'::jsonb END,
       CASE WHEN g % 50 = 0 THEN '{"error": "boom", "type": "RuntimeError"}'::jsonb END,
       4, t.at, t.at + interval '4 ms', t.at + interval '6 ms', t.at + interval '8 ms', t.at + interval '8 ms'
FROM generate_series($1::int, $2::int) AS g
CROSS JOIN LATERAL (SELECT $5::timestamptz - make_interval(secs => g * $4::float8 / $3::int) AS at) AS t
"""

# The same rows' events: execution.requested, .scheduled, .started, .completed (or .failed).
SEED_EVENTS = """
INSERT INTO execution_events (execution_id, seq, type, data, created_at)
SELECT md5('history:' || g)::uuid, s.seq,
       CASE s.seq WHEN 1 THEN 'execution.requested' WHEN 2 THEN 'execution.scheduled'
                  WHEN 3 THEN 'execution.started'
                  ELSE CASE WHEN g % 50 = 0 THEN 'execution.failed' ELSE 'execution.completed' END END,
       CASE WHEN s.seq = 1 THEN '{}'::jsonb
            ELSE CASE WHEN s.seq = 4 AND g % 50 = 0 THEN '{"error": "boom", "type": "RuntimeError"}'::jsonb
                      ELSE '{}'::jsonb END
                 || jsonb_build_object('worker', 'history_w' || (g % 2 + 1), 'attempt', 1) END,
       t.at + make_interval(secs => (s.seq - 1) * 0.002)
FROM generate_series($1::int, $2::int) AS g
CROSS JOIN generate_series(1, 4) AS s(seq)
CROSS JOIN LATERAL (SELECT $5::timestamptz - make_interval(secs => g * $4::float8 / $3::int) AS at) AS t
"""

# Benchmark runs' executions (created after the history, $1) and their events.
FORGET_RUNS = """
WITH gone AS (DELETE FROM executions WHERE created_at > $1 RETURNING id)
DELETE FROM execution_events WHERE execution_id IN (SELECT id FROM gone)
"""

# Work in flight while the queries are explained (inside the transaction that is rolled back):
# two live workers and a lost one, and executions in every state a periodic loop looks for.
FIXTURE_WORKERS = """
INSERT INTO workers (name, status, runtimes, actions, max_concurrent_tasks, heartbeat_interval_s,
                     last_heartbeat, incarnation)
VALUES ('explain_w1', 'active', '{python}', '{core.noop}', 50, 10, now(), gen_random_uuid()),
       ('explain_w2', 'active', '{python}', '{core.noop}', 50, 10, now(), gen_random_uuid()),
       ('explain_w3', 'lost', '{python}', '{core.noop}', 50, 10, now() - interval '1 minute', gen_random_uuid())
"""

FIXTURE_EXECUTIONS = """
INSERT INTO executions (id, action_ref, status, worker, attempt, not_before, wake_at, last_event_seq,
                        scheduled_at, started_at)
SELECT gen_random_uuid(), 'core.noop', f.status, f.worker, CASE WHEN f.status = 'requested' THEN 0 ELSE 1 END,
       CASE WHEN f.delayed THEN now() + interval '1 hour' END,
       CASE WHEN f.status = 'sleeping' THEN now() + interval '1 hour' END, 1,
       CASE WHEN f.status <> 'requested' THEN now() END, CASE WHEN f.status = 'running' THEN now() END
FROM (VALUES ('requested', NULL, false, 100), ('requested', NULL, true, 10), ('scheduled', 'explain_w1', false, 50),
             ('running', 'explain_w2', false, 50), ('running', 'explain_w3', false, 2),
             ('interrupted', 'explain_w3', false, 2), ('sleeping', NULL, false, 5))
     AS f(status, worker, delayed, n)
CROSS JOIN LATERAL generate_series(1, f.n)
"""

FIXTURE_IN_FLIGHT = "100 requested, 10 delayed, 50 scheduled, 52 running (2 on a lost worker), 2 interrupted, 5 sleeping"


def periodic_queries() -> list[tuple[str, str, tuple[Any, ...]]]:
    """(label, query, arguments) of what the executor's periodic loops run against `executions`,
    and intake's read of the workers' room on every batch, with the parameters the default
    configuration gives them."""
    settings = load_settings()
    cfg = settings.executor
    multiplier = cfg.heartbeat_staleness_multiplier
    return [
        ("scheduler: live workers and their load", wq.ELIGIBLE, (multiplier,)),
        ("scheduler: requested rows to place", q.SELECT_REQUESTED_FOR_UPDATE,
         (cfg.schedule_batch_size, ["core.noop"], [100])),
        ("scheduler: dispatched per limited action", q.ACTIVE_BY_ACTION, (["core.noop"],)),
        ("scheduler: actions waiting for room", q.ACTIONS_WAITING, (["core.noop", "core.echo"],)),
        ("intake: live workers, and actions with work waiting", q.ELIGIBLE_WITH_WAITING,
         (multiplier, ["core.noop", "core.echo"])),
        ("sweeper: scheduled on unavailable workers", q.SELECT_SCHEDULED_ON_UNAVAILABLE, ()),
        ("sweeper: running on stopped workers", q.SELECT_RUNNING_ON_STOPPED, ()),
        ("sweeper: held by a lost worker", q.SELECT_HELD_BY_WORKER, ("explain_w3",)),
        ("sweeper: active by status (metrics)", q.COUNT_ACTIVE_BY_STATUS, ()),
        ("recovery: interrupted runs", q.SELECT_INTERRUPTED, (recovery.BATCH,)),
        ("timeout monitor: scheduled too long", q.SELECT_SCHEDULED_TIMED_OUT,
         (cfg.scheduled_timeout_s, timeout_monitor.BATCH, multiplier)),
        ("requested timeout: unserved and expired", q.SELECT_REQUESTED_EXPIRED,
         (cfg.requested_timeout_s, ["bench.unserved"], requested_timeout.BATCH)),
        ("timers: next due time", fq.NEXT_WAKE_IN, ()),
        ("timers: wake due suspended runs", fq.WAKE_DUE, (timers.BATCH,)),
        ("timers: wake waiting runs whose child or signal is there", fq.WAKE_READY, (timers.BATCH,)),
        ("timers: release due delayed rows", fq.RELEASE_DELAYED, (timers.BATCH,)),
        ("retention: prune finished", q.PRUNE_FINISHED,
         (settings.retention.executions_days * 86400.0, settings.retention.batch_size)),
    ]


# -- seeding ---------------------------------------------------------------------------------------


async def seed(conn: asyncpg.Connection, size: int) -> dict[str, Any]:
    """Replace whatever history the tables hold with ``size`` finished executions and their events."""
    started = time.monotonic()
    await conn.execute("TRUNCATE executions, execution_events CASCADE")
    end = await conn.fetchval("SELECT now() - interval '1 minute'")
    async with conn.transaction():
        if await conn.fetchval("SELECT rolsuper FROM pg_roles WHERE rolname = current_user"):
            # The events name their executions by construction: skip a foreign-key check per row, if any.
            await conn.execute("SET LOCAL session_replication_role = replica")
        await conn.execute(SEED_EXECUTIONS, 1, size, size, HISTORY_SPAN_S, end)
        await conn.execute(SEED_EVENTS, 1, size, size, HISTORY_SPAN_S, end)
    inserted_s = time.monotonic() - started
    await conn.execute("VACUUM (ANALYZE) executions, execution_events")
    sizes = await conn.fetchrow(
        "SELECT pg_total_relation_size('executions') / 1048576.0 AS executions_mb,"
        " pg_total_relation_size('execution_events') / 1048576.0 AS events_mb,"
        " (SELECT count(*) FROM execution_events) AS events"
    )
    return {
        "executions": size,
        "events": sizes["events"],
        "executions_mb": round(float(sizes["executions_mb"]), 1),
        "events_mb": round(float(sizes["events_mb"]), 1),
        "insert_s": round(inserted_s, 1),
        "seed_s": round(time.monotonic() - started, 1),
        "history_ends": end,
    }


async def forget_runs(conn: asyncpg.Connection, history_ends: Any) -> None:
    """Delete what benchmark runs added after the history, with their events."""
    await conn.execute(FORGET_RUNS, history_ends)
    await conn.execute("VACUUM (ANALYZE) executions, execution_events")


# -- plans -----------------------------------------------------------------------------------------


def nodes(plan: dict[str, Any]) -> Iterator[dict[str, Any]]:
    yield plan
    for child in plan.get("Plans", []):
        yield from nodes(child)


def scan_label(node: dict[str, Any]) -> str | None:
    kind = node["Node Type"]
    if "Index Name" in node:
        return f"{kind} using {node['Index Name']}"
    if kind.endswith("Scan") and "Relation Name" in node:
        return f"{kind} on {node['Relation Name']}"
    return None


def top_nodes(plan: dict[str, Any], depth: int = 3) -> str:
    chain = []
    node: dict[str, Any] | None = plan
    while node is not None and len(chain) < depth:
        chain.append(node["Node Type"])
        children = node.get("Plans", [])
        node = children[0] if len(children) == 1 else None
    return " > ".join(chain)


async def undone(conn: asyncpg.Connection, run: Callable[[], Awaitable[Any]]) -> Any:
    """``run()`` inside a savepoint that is then rolled back: whatever it changed is undone."""
    savepoint = conn.transaction()
    await savepoint.start()
    try:
        return await run()
    finally:
        await savepoint.rollback()


async def explain(conn: asyncpg.Connection) -> dict[str, dict[str, Any]]:
    """EXPLAIN (ANALYZE, BUFFERS) of each periodic query beside the fixture's work in flight, each
    from the same state (run once to warm up, then explained); nothing of it is kept."""
    out: dict[str, dict[str, Any]] = {}
    tx = conn.transaction()
    await tx.start()
    try:
        await conn.execute(FIXTURE_WORKERS)
        await conn.execute(FIXTURE_EXECUTIONS)
        for label, sql, args in periodic_queries():
            await undone(conn, lambda sql=sql, args=args: conn.fetch(sql, *args))
            raw = await undone(
                conn, lambda sql=sql, args=args: conn.fetchval(f"EXPLAIN (ANALYZE, BUFFERS, FORMAT JSON) {sql}", *args)
            )
            result = (json.loads(raw) if isinstance(raw, str) else raw)[0]
            plan = result["Plan"]
            scans = list(dict.fromkeys(scan for n in nodes(plan) if (scan := scan_label(n))))
            out[label] = {
                "top": top_nodes(plan),
                "scans": scans,
                "seq_scan_of_history": any(
                    s in ("Seq Scan on executions", "Seq Scan on execution_events") for s in scans
                ),
                "rows": plan.get("Actual Rows"),
                "execution_ms": round(result["Execution Time"], 3),
                "shared_buffers": plan.get("Shared Hit Blocks", 0) + plan.get("Shared Read Blocks", 0),
            }
    finally:
        await tx.rollback()
    return out


# -- throughput ------------------------------------------------------------------------------------


def throughput(args: argparse.Namespace, url: str, *extra: str) -> dict[str, Any]:
    """bench/throughput.py on a seeded database; its output is shown as it comes, its summary returned."""
    return last_json(run_script("bench/throughput.py", "--reuse-database", "--database-url", url,
                                "--amqp-url", args.amqp_url, *extra))


#: The figures compared across history sizes: each is the median of the repeats.
COMPARED = ("executions_per_s", "started_p50_ms", "started_p99_ms", "finished_p99_ms")


def run_figures(summary: dict[str, Any]) -> dict[str, Any]:
    """What the history table shows of one throughput run."""
    keys = ("n", "rate", "completed", "timed_out", *COMPARED, "cpu_s", "seq_scans")
    figures = {k: summary.get(k) for k in keys}
    figures["rss_max_mb"] = {role: m["max"] for role, m in summary.get("rss_mb", {}).items()}
    return figures


def combined(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Repeated runs of one kind as one: the median of each compared figure, its range over the
    runs (``spread``, as a share of the median), and every run as it was."""
    out: dict[str, Any] = {"repeats": len(runs), "completed": sum(r["completed"] or 0 for r in runs),
                           "timed_out": any(r["timed_out"] for r in runs), "runs": runs}
    out["spread"] = {}
    for key in COMPARED:
        values = [r[key] for r in runs if r.get(key) is not None]
        if not values:
            continue
        out[key] = statistics.median(values)
        out["spread"][key] = round((max(values) - min(values)) / out[key], 3) if out[key] else 0.0
    out["rss_max_mb"] = {
        role: max(r["rss_max_mb"][role] for r in runs if role in r["rss_max_mb"])
        for role in {role for r in runs for role in r["rss_max_mb"]}
    }
    return out


# -- the run ---------------------------------------------------------------------------------------


async def migrated(url: str) -> None:
    """(Re)create the database, with the executor's own migrations."""
    await recreate_database(url)
    conn = await asyncpg.connect(url, server_settings=db.SERVER_SETTINGS)
    try:
        await db.migrate(conn)
    finally:
        await conn.close()


async def seed_and_explain(url: str, size: int) -> tuple[dict[str, Any], dict[str, Any]]:
    conn = await asyncpg.connect(url, server_settings=db.SERVER_SETTINGS)
    try:
        seeded = await seed(conn, size)
        return seeded, await explain(conn)
    finally:
        await conn.close()


async def forget(url: str, history_ends: Any) -> None:
    conn = await asyncpg.connect(url)
    try:
        await forget_runs(conn, history_ends)
    finally:
        await conn.close()


def size_url(url: str, size: int) -> str:
    """Each history size's own database: ``<database>_<size>``."""
    parts = urlsplit(url)
    return urlunsplit(parts._replace(path=f"{parts.path}_{size}"))


def rounds(sizes: list[int], repeat: int) -> Iterator[list[int]]:
    """The order of the sizes in each round: every round runs each size once, and the first place
    rotates, so that a drift in the machine's speed over the run falls on every size alike."""
    for r in range(repeat):
        k = r % len(sizes)
        yield sizes[k:] + sizes[:k]


def paired(runs: dict[int, dict[str, list[dict[str, Any]]]], first: int, last: int) -> dict[str, Any]:
    """The largest history against the smallest, round by round (the two ran minutes apart in
    the same round): per figure, the median of the rounds' ratios and their range."""
    out: dict[str, Any] = {"first": first, "last": last}
    for kind in ("burst", "steady"):
        out[kind] = {}
        for key in COMPARED:
            ratios = [
                b[key] / a[key] for a, b in zip(runs[first][kind], runs[last][kind], strict=True)
                if a.get(key) and b.get(key) is not None
            ]
            if ratios:
                out[kind][key] = {"median": round(statistics.median(ratios), 3),
                                  "low": round(min(ratios), 3), "high": round(max(ratios), 3)}
    return out


def run(args: argparse.Namespace) -> tuple[dict[str, Any], dict[str, Any]]:
    """Seed every size's database, then run the rounds; returns the figures by size and the
    largest size against the smallest, round by round."""
    results: dict[str, Any] = {}
    runs: dict[int, dict[str, list[dict[str, Any]]]] = {size: {"burst": [], "steady": []} for size in args.sizes}
    try:
        for size in args.sizes:
            url = size_url(args.database_url, size)
            print(f"\n== history of {size:,} finished executions ({urlsplit(url).path.lstrip('/')})", flush=True)
            asyncio.run(migrated(url))
            seeded, plans = asyncio.run(seed_and_explain(url, size))
            print(f"  seeded {seeded['executions']:,} executions ({seeded['executions_mb']} MB with indexes) and "
                  f"{seeded['events']:,} events ({seeded['events_mb']} MB) in {seeded['seed_s']} s", flush=True)
            results[str(size)] = {"seeded": seeded, "queries": plans}
        for number, order in enumerate(rounds(args.sizes, args.repeat), 1):
            print(f"\n== round {number} of {args.repeat}: {', '.join(f'{s:,}' for s in order)}", flush=True)
            for size in order:
                url, ends = size_url(args.database_url, size), results[str(size)]["seeded"]["history_ends"]
                runs[size]["burst"].append(run_figures(throughput(args, url, "--n", str(args.n))))
                asyncio.run(forget(url, ends))
                runs[size]["steady"].append(
                    run_figures(throughput(args, url, "--n", str(args.steady_n), "--rate", str(args.rate)))
                )
                asyncio.run(forget(url, ends))
        for size in args.sizes:
            seeded = results[str(size)]["seeded"]
            seeded["history_ends"] = seeded["history_ends"].isoformat()
            results[str(size)].update(burst=combined(runs[size]["burst"]), steady=combined(runs[size]["steady"]))
    finally:
        if not args.keep:
            for size in args.sizes:
                asyncio.run(drop_database(size_url(args.database_url, size)))
    return results, paired(runs, args.sizes[0], args.sizes[-1])


def report(results: dict[str, Any], pairs: dict[str, Any], args: argparse.Namespace) -> None:
    sizes = list(results)
    print(f"\nhistory growth: burst of {args.n:,}, steady {args.rate:g}/s x {args.steady_n:,}; "
          f"post -> start latency in ms; medians of {args.repeat} runs, (spread between runs, % of the median)")
    print(f"{'history':>10} {'table MB':>9} {'burst/s':>13} {'steady/s':>13} {'steady p50':>15} {'steady p99':>15} "
          f"{'executor RSS max':>17}")
    for size in sizes:
        r = results[size]
        b, s = r["burst"], r["steady"]
        mb = r["seeded"]["executions_mb"] + r["seeded"]["events_mb"]
        rss = max(b["rss_max_mb"].get("executor", 0), s["rss_max_mb"].get("executor", 0))
        print(f"{int(size):>10,} {mb:>9.0f} {_cell(b, 'executions_per_s', 0):>13} {_cell(s, 'executions_per_s', 0):>13} "
              f"{_cell(s, 'started_p50_ms', 1):>15} {_cell(s, 'started_p99_ms', 1):>15} {rss:>14.1f} MB")
    print(f"\n{int(sizes[-1]):,} against {int(sizes[0]):,}, round by round (the ratio's median and range "
          f"over {args.repeat} rounds; below 1 is lower with the larger history):")
    for kind in ("burst", "steady"):
        for key in COMPARED:
            if key in pairs[kind]:
                r = pairs[kind][key]
                print(f"  {kind:6} {key:18} x{r['median']:.3f}   ({r['low']:.3f} to {r['high']:.3f})")
    print(f"\nperiodic queries on executions (in flight: {FIXTURE_IN_FLIGHT}): execution ms / shared buffers")
    print(f"{'query':42}" + "".join(f"{int(size):>18,}" for size in sizes))
    for label in results[sizes[0]]["queries"]:
        cells = []
        for size in sizes:
            f = results[size]["queries"][label]
            cells.append(f"{f['execution_ms']:8.3f} / {f['shared_buffers']:<5}")
        print(f"{label:42}" + "".join(f"{c:>18}" for c in cells))
        largest = results[sizes[-1]]["queries"][label]
        flag = "  SEQUENTIAL SCAN OF HISTORY" if largest["seq_scan_of_history"] else ""
        print(f"    {largest['top']}: {', '.join(largest['scans']) or 'no table scan'}{flag}")


def _cell(figures: dict[str, Any], key: str, digits: int) -> str:
    """A median with the spread between its runs: ``512 (8%)`` (the runs span 8% of the median);
    ``n/a`` when no run gave the figure (each failed)."""
    if key not in figures:
        return "n/a"
    return f"{figures[key]:.{digits}f} ({figures['spread'][key]:.0%})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="1000,100000,1000000", help="history sizes (finished executions)")
    parser.add_argument("--n", type=int, default=10_000, help="executions in the burst (default 10000)")
    parser.add_argument("--rate", type=float, default=500.0, help="steady stream's rate per second (default 500)")
    parser.add_argument("--steady-n", type=int, default=5000, help="executions in the steady stream (default 5000)")
    parser.add_argument("--repeat", type=int, default=5, help="rounds: runs of each kind per size (default 5)")
    parser.add_argument("--database-url", default="postgresql://postgres@127.0.0.1:5432/baton_bench_history",
                        help="each size gets its own database, this name with _<size> appended")
    parser.add_argument("--amqp-url", default="amqp://guest:guest@127.0.0.1:5672/")
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "history.json")
    parser.add_argument("--keep", action="store_true", help="keep the databases (each with its history)")
    args = parser.parse_args()
    args.sizes = [int(s) for s in args.sizes.split(",")]
    if args.repeat < 1:
        parser.error("--repeat must be at least 1")
    results, pairs = run(args)
    # Written first: a long run's figures survive a report that cannot print them.
    args.out.write_text(json.dumps({"n": args.n, "rate": args.rate, "steady_n": args.steady_n, "repeat": args.repeat,
                                    "in_flight": FIXTURE_IN_FLIGHT, "sizes": results, "paired": pairs},
                                   indent=2, default=str))
    print(f"written to {args.out}")
    report(results, pairs, args)


if __name__ == "__main__":
    main()

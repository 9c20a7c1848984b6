#!/usr/bin/env python
"""A backlog of delayed executions costs the scheduler nothing: the scheduler's query, and the
timer loop's, against an empty table and against one holding `--backlog` (100,000) delayed
executions of the very action being scheduled.

On a fresh database (`--database-url`, default `.../baton_bench_delayed`, dropped and created and
migrated), with `--ready` (50) executions ready to run in both cases, it times each query `--repeat`
times (inside a transaction that is rolled back, as the scheduler's pass would lock its rows) and
prints the median time and the buffers each one touched, then the plan of each with the backlog in
place. Ends with one JSON line.

    .venv/bin/python bench/delayed.py
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import asyncpg

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bench.measure import recreate_database  # noqa: E402
from common import db  # noqa: E402
from common.queries import executions as q  # noqa: E402
from common.queries import workflows as wq  # noqa: E402

ACTION = "bench.noop"

# What each pass runs: (label, query, arguments).
QUERIES: list[tuple[str, str, tuple[Any, ...]]] = [
    ("scheduler: requested rows to place", q.SELECT_REQUESTED_FOR_UPDATE, (500, [ACTION], [500])),
    ("timers: next due time", wq.NEXT_WAKE_IN, ()),
    ("timers: release due delayed rows", wq.RELEASE_DELAYED, (500,)),
]

INSERT = """
INSERT INTO executions (id, action_ref, parameters, status, not_before, last_event_seq)
SELECT gen_random_uuid(), $1, '{}'::jsonb, 'requested',
       CASE WHEN $3 THEN now() + interval '1 day' + make_interval(secs => g) END, 0
FROM generate_series(1, $2) AS g
"""


async def measure(conn: asyncpg.Connection, repeat: int) -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {}
    for label, sql, args in QUERIES:
        times = []
        for _ in range(repeat):
            tx = conn.transaction()
            await tx.start()
            start = time.perf_counter()
            await conn.fetch(sql, *args)
            times.append((time.perf_counter() - start) * 1000)
            await tx.rollback()
        tx = conn.transaction()
        await tx.start()
        plan = await conn.fetchval(f"EXPLAIN (ANALYZE, BUFFERS, FORMAT JSON) {sql}", *args)
        text = await conn.fetch(f"EXPLAIN (ANALYZE, BUFFERS, COSTS OFF, TIMING OFF, SUMMARY OFF) {sql}", *args)
        await tx.rollback()
        top = (json.loads(plan) if isinstance(plan, str) else plan)[0]["Plan"]
        out[label] = {
            "median_ms": round(statistics.median(times), 3),
            "buffers": top.get("Shared Hit Blocks", 0) + top.get("Shared Read Blocks", 0),
            "rows": top.get("Actual Rows"),
            "plan": "\n".join(r[0] for r in text),
        }
    return out


async def run(args: argparse.Namespace) -> dict[str, Any]:
    await recreate_database(args.database_url)
    conn = await asyncpg.connect(args.database_url, server_settings=db.SERVER_SETTINGS)
    try:
        await db.migrate(conn)
        await conn.execute(INSERT, ACTION, args.ready, False)
        await conn.execute("VACUUM ANALYZE executions")
        empty = await measure(conn, args.repeat)
        # The same again with the backlog: fresh ready rows (the measured ones were locked many
        # times), the delayed ones of the very same action beside them.
        await conn.execute("TRUNCATE executions CASCADE")
        await conn.execute(INSERT, ACTION, args.backlog, True)
        await conn.execute(INSERT, ACTION, args.ready, False)
        await conn.execute("VACUUM ANALYZE executions")
        backlog = await measure(conn, args.repeat)
        total = await conn.fetchval("SELECT count(*) FROM executions")
    finally:
        await conn.close()
    return {"ready": args.ready, "backlog": args.backlog, "rows": total, "empty": empty, "with_backlog": backlog}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backlog", type=int, default=100_000)
    parser.add_argument("--ready", type=int, default=50)
    parser.add_argument("--repeat", type=int, default=200)
    parser.add_argument("--database-url", default="postgresql://postgres@127.0.0.1:5432/baton_bench_delayed")
    args = parser.parse_args()
    result = asyncio.run(run(args))
    print(f"{result['ready']} ready executions, then {result['backlog']} delayed ones of the same action "
          f"({result['rows']} rows); median of {args.repeat} runs each")
    print(f"{'query':40} {'empty ms':>9} {'buffers':>8} {'backlog ms':>11} {'buffers':>8}")
    for label in result["empty"]:
        e, b = result["empty"][label], result["with_backlog"][label]
        print(f"{label:40} {e['median_ms']:9.3f} {e['buffers']:8} {b['median_ms']:11.3f} {b['buffers']:8}")
    for label, figures in result["with_backlog"].items():
        print(f"\n-- {label}, with the backlog:\n{figures['plan']}")
    print(json.dumps({k: v for k, v in result.items() if k not in ("empty", "with_backlog")} | {
        part: {label: {k: v for k, v in f.items() if k != "plan"} for label, f in result[part].items()}
        for part in ("empty", "with_backlog")
    }))


if __name__ == "__main__":
    main()

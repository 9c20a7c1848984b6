#!/usr/bin/env python
"""Recovery-latency benchmark: how long a run stays stuck after its worker is SIGKILLed or SIGSTOPped.

For each kind (`sigkill`, `sigstop`) and each of `--trials` trials, against a fresh database (cloned
from a migrated template) and a fresh RabbitMQ prefix:

1. start `baton executor` and worker A (concurrency 1);
2. post `core.sleep` with seconds=60 through RabbitMQ (a persistent JSON message on
   `<prefix>.executions`, routing key `execution.requested`, message_id = the execution id) and wait
   until it is `running` on A;
3. start worker B and wait until it is registered (`active`), so that the run is on A first; then
   wait a random 0..`--jitter` s (default one interval), so that the signal falls at a random
   phase of A's heartbeat and of the sweeper's timer (A is also started a random 0..`--jitter` s
   after the executor, so that those two timers are not in phase with each other either);
4. signal A (SIGKILL, or SIGSTOP) and poll PostgreSQL every `--poll` seconds until the execution
   is `running` again with worker = B. The figure is signal -> running on B.

Intermediate timings come from two places: what the poll saw first (A `lost` in `workers`,
the execution `interrupted`), and the execution's events in `execution_events` (their
`created_at` is the start of the transaction that wrote them: `workflow.interrupted` = the sweep
that noticed, `execution.recovering`, `execution.scheduled`, `execution.started`), against the
bench's wall clock (same machine). For SIGSTOP it also shows how old A's last heartbeat was at the
signal and how long after the staleness threshold the sweeper acted; `--after-heartbeat` signals A
just after a heartbeat, the worst phase for SIGSTOP.

Targets: SIGKILL at most one sweep interval + 1 s (2 s with a 1 s sweep: the process-death signal,
a released advisory lock, is checked every sweep); SIGSTOP at most the staleness threshold
(multiplier x heartbeat interval) + one sweep interval (3 + 1 = 4 s by default).

Each trial gives up after `--trial-timeout` seconds and counts as a failure. Afterwards every
service is stopped (SIGTERM, then SIGKILL), the prefix's queues and exchanges are deleted and the
trial database (and the template) dropped. Ends with one JSON line. Exit status 1 if a trial failed
or a target was missed.

    .venv/bin/python bench/recovery.py --trials 5
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import secrets
import shutil
import signal
import statistics
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aio_pika
import asyncpg

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from common import amqp, db  # noqa: E402
from common.logging import configure_logging  # noqa: E402
from common.settings import LoggingSettings  # noqa: E402

TERMINAL = ("completed", "failed", "timeout", "cancelled")
KINDS = {"sigkill": signal.SIGKILL, "sigstop": signal.SIGSTOP}


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


def cpu_times() -> tuple[float, float]:
    """(all, idle+iowait) jiffies of the whole machine."""
    with open("/proc/stat") as f:
        values = [int(v) for v in f.readline().split()[1:9]]
    return float(sum(values)), float(values[3] + values[4])


def busy_pct(before: tuple[float, float], after: tuple[float, float]) -> float | None:
    total = after[0] - before[0]
    return 100.0 * (1 - (after[1] - before[1]) / total) if total > 0 else None


class Disturbed(RuntimeError):
    """Something outside the bench (a PostgreSQL or RabbitMQ restart) got in the way of a trial."""


# Connection-level failures: the infrastructure went away under the trial, not a recovery failure.
INFRA_ERRORS: tuple[type[BaseException], ...] = (
    OSError,
    asyncpg.exceptions.ConnectionDoesNotExistError,
    asyncpg.exceptions.CannotConnectNowError,
    asyncpg.exceptions.AdminShutdownError,
    asyncpg.exceptions.InterfaceError,
    aio_pika.exceptions.AMQPConnectionError,
)


# -- databases and topology ------------------------------------------------------------------------


async def admin_execute(pg_url: str, sql: str) -> None:
    admin = await asyncpg.connect(f"{pg_url}/postgres")
    try:
        await admin.execute(sql)
    finally:
        await admin.close()


async def make_template(pg_url: str, name: str) -> None:
    await admin_execute(pg_url, f'CREATE DATABASE "{name}"')
    conn = await db.connect_one(f"{pg_url}/{name}", max_wait_s=10)
    try:
        await db.migrate(conn)
    finally:
        await conn.close()


async def postmaster_start(pg_url: str) -> tuple[float, float]:
    """(PostgreSQL's start time as epoch, how long it has been up)."""
    admin = await asyncpg.connect(f"{pg_url}/postgres")
    try:
        row = await admin.fetchrow(
            "SELECT extract(epoch FROM pg_postmaster_start_time())::float8 AS t,"
            " extract(epoch FROM now() - pg_postmaster_start_time())::float8 AS up"
        )
    finally:
        await admin.close()
    return row["t"], row["up"]


async def settled_postgres(pg_url: str, window_s: float, timeout_s: float = 120.0) -> float:
    """Wait until PostgreSQL has been up for longer than the staleness window: before that the
    sweeper does not trust the advisory lock and counts staleness from PostgreSQL's start, so a
    trial right after a restart would measure that grace, not recovery. Returns the start time."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            started, up = await postmaster_start(pg_url)
            if up > window_s + 1.0:
                return started
            wait = window_s + 1.0 - up
        except INFRA_ERRORS:
            wait = 1.0
        if time.monotonic() > deadline:
            raise Disturbed("PostgreSQL did not stay up long enough to start a trial")
        log(f"PostgreSQL is not up or was restarted just now; waiting {wait:.1f} s before the trial")
        await asyncio.sleep(wait)


async def drop_database(pg_url: str, name: str) -> None:
    await admin_execute(pg_url, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


async def post_sleep(amqp_url: str, names: amqp.Names, seconds: float) -> uuid.UUID:
    """Post like any AMQP client would; the message id becomes the execution id."""
    execution_id = uuid.uuid4()
    connection = await aio_pika.connect(amqp_url)
    try:
        channel = await connection.channel(publisher_confirms=True)
        await amqp.declare_requests_queue(channel, names)  # exists (and is bound) before the publish
        exchange = await channel.get_exchange(names.executions_exchange)
        body = json.dumps({"action_ref": "core.sleep", "parameters": {"seconds": seconds}}).encode()
        await exchange.publish(
            aio_pika.Message(
                body,
                content_type="application/json",
                delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
                message_id=str(execution_id),
            ),
            routing_key=amqp.REQUESTED_KEY,
        )
    finally:
        await connection.close()
    return execution_id


# -- services --------------------------------------------------------------------------------------


def service_env(args: argparse.Namespace, db_url: str, prefix: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("BATON")}
    env.update(
        BATON_CONFIG=str(REPO / "config" / "config.yaml"),
        PYTHONPATH=str(REPO),
        PYTHONUNBUFFERED="1",
        BATON__DATABASE__URL=db_url,
        BATON__MESSAGE_QUEUE__URL=args.amqp_url,
        BATON__MESSAGE_QUEUE__PREFIX=prefix,
        BATON__EXECUTOR__SWEEP_INTERVAL=str(args.sweep_interval),
        BATON__WORKER__HEARTBEAT_INTERVAL=str(args.heartbeat_interval),
        BATON__EXECUTOR__HEARTBEAT_STALENESS_MULTIPLIER=str(args.staleness_multiplier),
        BATON__RECOVERY__RECOVER_ON_WORKER_LOSS="true",
        BATON__WORKER__ACTION_MODULES="[]",
        BATON__WORKER__SHUTDOWN_TIMEOUT="1",  # teardown: B's 60 s sleep need not drain
        BATON__LOGGING__LEVEL=args.log_level,
    )
    return env


def spawn(args: argparse.Namespace, env: dict[str, str], log_path: Path, *cli: str) -> subprocess.Popen:
    with open(log_path, "wb") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "cli", *cli],
            cwd=REPO,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # a Ctrl-C on the bench does not reach them; teardown stops them
        )


def stop_all(procs: list[subprocess.Popen], timeout_s: float = 10.0) -> None:
    for p in procs:
        if p.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                p.send_signal(signal.SIGCONT)  # a stopped process cannot act on SIGTERM
                p.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + timeout_s
    for p in procs:
        try:
            p.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()


async def wait_for(predicate, *, timeout_s: float, what: str, procs: list[subprocess.Popen], poll_s: float = 0.05):
    deadline = time.monotonic() + timeout_s
    while True:
        for p in procs:
            if p.poll() is not None:
                raise RuntimeError(f"{what}: a service exited early (pid {p.pid}, rc {p.returncode})")
        value = await predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise RuntimeError(f"timed out after {timeout_s:.0f} s waiting for {what}")
        await asyncio.sleep(poll_s)


# -- one trial -------------------------------------------------------------------------------------


@dataclass
class Trial:
    kind: str
    index: int
    ok: bool = False
    error: str | None = None
    recovered_s: float | None = None  # signal -> running on B, as polled
    seen: dict[str, float] = field(default_factory=dict)  # first poll that saw each state
    events: dict[str, float] = field(default_factory=dict)  # DB event times after the signal
    detected_by: str | None = None
    disturbed: bool = False  # PostgreSQL/RabbitMQ went away during the trial: not counted, retried
    busy_pct: float | None = None  # whole-machine CPU busy between the signal and recovery
    heartbeat_age_s: float | None = None  # A's last heartbeat, at the signal
    stale_slack_s: float | None = None  # detection - (last heartbeat + threshold), SIGSTOP

    def line(self) -> str:
        head = f"{self.kind} #{self.index}:"
        if not self.ok:
            what = "DISTURBED (not counted, retried)" if self.disturbed else "FAILED"
            return f"{head} {what}: {self.error}"
        parts = [f"{head} running on B after {self.recovered_s:6.3f} s"]
        ev = self.events
        if ev:
            stages = "  ".join(
                f"{k} {ev[k]:.3f}" for k in ("interrupted", "recovering", "scheduled", "started") if k in ev
            )
            parts.append(f"| db events: {stages}")
        if self.detected_by:
            parts.append(f"[{self.detected_by}]")
        if "worker_lost" in self.seen:
            parts.append(f"| polled: A lost {self.seen['worker_lost']:.3f}")
        if self.heartbeat_age_s is not None:
            parts.append(f"| A heartbeat age at signal {self.heartbeat_age_s:.2f}")
        if self.stale_slack_s is not None:
            parts.append(f"| swept {self.stale_slack_s:+.2f} after stale")
        if self.busy_pct is not None:
            parts.append(f"| cpu busy {self.busy_pct:.0f}%")
        return " ".join(parts)


POLL = """
SELECT e.status, e.worker, e.attempt, w.status AS a_status
FROM executions e LEFT JOIN workers w ON w.name = $2
WHERE e.id = $1
"""

EVENTS = """
SELECT seq, type, data, extract(epoch FROM created_at)::float8 AS at
FROM execution_events WHERE execution_id = $1 ORDER BY seq
"""


async def run_trial(args: argparse.Namespace, kind: str, index: int, template: str, log_dir: Path) -> Trial:
    trial = Trial(kind, index)
    prefix = f"rb{secrets.token_hex(5)}"
    names = amqp.Names(prefix)
    db_name = f"baton_rbench_{prefix}"
    db_url = f"{args.pg_url}/{db_name}"
    worker_a, worker_b = f"{prefix}_a", f"{prefix}_b"
    env = service_env(args, db_url, prefix)
    trial_dir = log_dir / f"{kind}_{index}"
    trial_dir.mkdir(parents=True, exist_ok=True)
    procs: list[subprocess.Popen] = []
    proc_a: subprocess.Popen | None = None
    conn: asyncpg.Connection | None = None
    created = False
    threshold = args.staleness_multiplier * args.heartbeat_interval
    try:
        pg_started = await settled_postgres(args.pg_url, threshold)
        await admin_execute(args.pg_url, f'CREATE DATABASE "{db_name}" TEMPLATE "{template}"')
        created = True
        conn = await asyncpg.connect(db_url)
        procs.append(spawn(args, env, trial_dir / "executor.log", "executor"))
        # Started together, the executor and A would run their sweep and heartbeat timers (same
        # period) at nearly the same phase every trial; a random offset gives a random phase.
        await asyncio.sleep(random.uniform(0, args.jitter))
        worker_cli = ("worker", "--concurrency", "1", "--runtimes", "python", "--name")
        proc_a = spawn(args, env, trial_dir / "worker_a.log", *worker_cli, worker_a)
        procs.append(proc_a)

        async def active(name: str) -> bool:
            return await conn.fetchval("SELECT status = 'active' FROM workers WHERE name = $1", name) or False

        await wait_for(lambda: active(worker_a), timeout_s=30, what="worker A to register", procs=procs)
        execution_id = await post_sleep(args.amqp_url, names, 60)

        async def running_on(name: str):
            row = await conn.fetchrow("SELECT status, worker, attempt FROM executions WHERE id = $1", execution_id)
            if row is not None and row["status"] in TERMINAL:
                raise RuntimeError(f"execution ended as {row['status']} before the signal")
            return row if row is not None and row["status"] == "running" and row["worker"] == name else None

        first = await wait_for(lambda: running_on(worker_a), timeout_s=30, what="the run to start on A", procs=procs)
        procs.append(spawn(args, env, trial_dir / "worker_b.log", *worker_cli, worker_b))
        await wait_for(lambda: active(worker_b), timeout_s=30, what="worker B to register", procs=procs)
        if not await running_on(worker_a):
            raise RuntimeError("the run left A before the signal")
        # A random phase against A's heartbeat (and the sweeper's timer), so that trials sample the
        # whole range instead of whatever phase the start-up sequence happens to produce.
        delay = args.settle + random.uniform(0, args.jitter)
        if delay > 0:
            await asyncio.sleep(delay)

        hb_sql = "SELECT extract(epoch FROM last_heartbeat)::float8 FROM workers WHERE name = $1"
        if args.after_heartbeat:
            # Worst phase for SIGSTOP: right after A has recorded a heartbeat, so that it goes stale
            # as late as it can (the sweeper's phase stays random).
            seen_hb = await conn.fetchval(hb_sql, worker_a)
            hb_deadline = time.monotonic() + 3 * args.heartbeat_interval + 1
            while await conn.fetchval(hb_sql, worker_a) == seen_hb:
                if time.monotonic() > hb_deadline:
                    raise RuntimeError("A recorded no heartbeat while waiting for one")
                await asyncio.sleep(0.005)

        # -- the measured part --------------------------------------------------------------
        hb_epoch = await conn.fetchval(hb_sql, worker_a)
        cpu0 = cpu_times()
        t0_wall = time.time()
        t0 = time.monotonic()
        os.kill(proc_a.pid, KINDS[kind])
        deadline = t0 + args.trial_timeout
        last: Any = None
        while True:
            row = await conn.fetchrow(POLL, execution_id, worker_a)
            now = time.monotonic() - t0
            last = dict(row) if row is not None else None
            if row is not None:
                if row["a_status"] == "lost":
                    trial.seen.setdefault("worker_lost", now)
                if row["status"] != "running" or row["attempt"] != first["attempt"]:
                    trial.seen.setdefault("left_a", now)
                if row["status"] == "interrupted":
                    trial.seen.setdefault("interrupted", now)
                if row["status"] == "running" and row["worker"] == worker_b:
                    trial.recovered_s = now
                    trial.busy_pct = busy_pct(cpu0, cpu_times())
                    break
                if row["status"] in TERMINAL:
                    raise RuntimeError(f"the run ended as {row['status']} instead of recovering")
            if time.monotonic() > deadline:
                raise RuntimeError(f"not running on B after {args.trial_timeout:.0f} s (last seen: {last})")
            await asyncio.sleep(args.poll)

        # -- breakdown from the database ------------------------------------------------------
        hb_after = await conn.fetchval(
            "SELECT extract(epoch FROM last_heartbeat)::float8 FROM workers WHERE name = $1", worker_a
        )
        if hb_after is not None:  # A cannot have written one since the signal
            hb_epoch = max(hb_epoch or 0.0, hb_after)
        trial.heartbeat_age_s = t0_wall - hb_epoch if hb_epoch else None
        events = list(await conn.fetch(EVENTS, execution_id))
        cut = max((i for i, ev in enumerate(events) if ev["type"] == "workflow.interrupted"), default=None)
        for ev in events[cut:] if cut is not None else []:  # the interruption and what followed it
            short = {
                "workflow.interrupted": "interrupted",
                "execution.recovering": "recovering",
                "execution.scheduled": "scheduled",
                "execution.started": "started",
            }.get(ev["type"])
            if short:
                trial.events[short] = ev["at"] - t0_wall  # the last of each: a re-dispatch counts
            if ev["type"] == "workflow.interrupted":
                data = ev["data"] if isinstance(ev["data"], dict) else json.loads(ev["data"])
                err = data.get("error") or ""
                trial.detected_by = next((s for s in ("process_died", "heartbeat_stale") if s in err), err[:60])
        if (await postmaster_start(args.pg_url))[0] != pg_started:
            raise Disturbed("PostgreSQL restarted during the trial")
        if kind == "sigstop" and hb_epoch and "interrupted" in trial.events:
            trial.stale_slack_s = (t0_wall + trial.events["interrupted"]) - (hb_epoch + threshold)
        trial.ok = True
    except (Disturbed, *INFRA_ERRORS) as exc:
        trial.disturbed = True
        trial.error = f"{type(exc).__name__}: {exc}"
    except Exception as exc:  # noqa: BLE001 - a failed trial is reported, the others still run
        trial.error = str(exc) or type(exc).__name__
    finally:
        if proc_a is not None and proc_a.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                proc_a.kill()
                proc_a.send_signal(signal.SIGCONT)
            proc_a.wait(10)
        workers: list[str] = []
        if conn is not None:
            with contextlib.suppress(Exception):
                workers = [r["name"] for r in await conn.fetch("SELECT name FROM workers")]
            with contextlib.suppress(Exception):
                await conn.close()
        stop_all(procs)
        with contextlib.suppress(Exception):
            await amqp.delete_topology(args.amqp_url, names, sorted(set(workers) | {worker_a, worker_b}))
        if created:
            with contextlib.suppress(Exception):
                await drop_database(args.pg_url, db_name)
    return trial


# -- the run ---------------------------------------------------------------------------------------


def summarize(kind: str, trials: list[Trial], target_s: float) -> dict[str, Any]:
    times = [t.recovered_s for t in trials if t.ok and t.recovered_s is not None]
    out: dict[str, Any] = {
        "times_s": [round(t, 3) for t in times],
        "failures": sum(1 for t in trials if not t.ok),
        "target_s": target_s,
        "cpu_busy_pct": [round(t.busy_pct) for t in trials if t.busy_pct is not None],
    }
    if times:
        out.update(
            median_s=round(statistics.median(times), 3),
            max_s=round(max(times), 3),
            min_s=round(min(times), 3),
        )
        for stage in ("interrupted", "recovering", "scheduled", "started"):
            vals = [t.events[stage] for t in trials if t.ok and stage in t.events]
            if vals:
                out[f"{stage}_median_s"] = round(statistics.median(vals), 3)
        detected = sorted({t.detected_by for t in trials if t.detected_by})
        out["detected_by"] = detected
    out["met"] = bool(times) and out["failures"] == 0 and max(times) <= target_s
    return out


async def run(args: argparse.Namespace) -> dict[str, Any]:
    run_id = secrets.token_hex(4)
    template = f"baton_rbench_tpl_{run_id}"
    log_dir = Path(args.log_dir or f"/tmp/baton-recovery-{run_id}")
    log_dir.mkdir(parents=True, exist_ok=True)
    targets = {
        "sigkill": args.sweep_interval + 1.0,
        "sigstop": args.staleness_multiplier * args.heartbeat_interval + args.sweep_interval,
    }
    summary: dict[str, Any] = {
        "trials": args.trials,
        "sweep_interval_s": args.sweep_interval,
        "heartbeat_interval_s": args.heartbeat_interval,
        "staleness_multiplier": args.staleness_multiplier,
        "cores": os.cpu_count(),
    }
    log(
        f"sweep {args.sweep_interval} s, heartbeat {args.heartbeat_interval} s x {args.staleness_multiplier} "
        f"(stale after {args.staleness_multiplier * args.heartbeat_interval:g} s); service logs in {log_dir}"
    )
    await settled_postgres(args.pg_url, 0)
    await make_template(args.pg_url, template)
    all_ok = True
    disturbed = 0
    try:
        for kind in args.kinds:
            trials: list[Trial] = []
            for i in range(1, args.trials + 1):
                for attempt in range(args.retries + 1):
                    trial = await run_trial(args, kind, i, template, log_dir / f"try{attempt}" if attempt else log_dir)
                    log(trial.line())
                    if not trial.disturbed:
                        break
                    disturbed += 1
                trials.append(trial)
            s = summarize(kind, trials, targets[kind])
            summary[kind] = s
            all_ok &= s["met"]
            print()
            print("=" * 72)
            if "median_s" in s:
                print(
                    f"{kind}: signal -> running on B   median {s['median_s']:.3f} s   max {s['max_s']:.3f} s   "
                    f"min {s['min_s']:.3f} s   ({len(s['times_s'])} ok, {s['failures']} failed)"
                )
                stages = ", ".join(
                    f"{st} {s[f'{st}_median_s']:.3f}"
                    for st in ("interrupted", "recovering", "scheduled", "started")
                    if f"{st}_median_s" in s
                )
                print(f"  stage medians (s after the signal, db events): {stages}; detected by {s['detected_by']}")
            else:
                print(f"{kind}: no trial succeeded ({s['failures']} failed)")
            print(f"  target: at most {targets[kind]:g} s -> {'MET' if s['met'] else 'MISSED'}")
            print("=" * 72)
            print()
    finally:
        with contextlib.suppress(Exception):
            await drop_database(args.pg_url, template)
    summary["ok"] = all_ok
    summary["disturbed_trials_retried"] = disturbed
    if all_ok and not args.keep_logs:
        shutil.rmtree(log_dir, ignore_errors=True)
    else:
        summary["log_dir"] = str(log_dir)
    return summary


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--trials", type=int, default=5, help="trials per kind (default 5)")
    parser.add_argument("--sweep-interval", type=float, default=1.0, help="executor.sweep_interval, s (default 1)")
    parser.add_argument(
        "--heartbeat-interval", type=float, default=1.0, help="worker.heartbeat_interval, s (default 1)"
    )
    parser.add_argument(
        "--staleness-multiplier", type=float, default=3.0, help="executor.heartbeat_staleness_multiplier (default 3)"
    )
    parser.add_argument(
        "--kinds", default="sigkill,sigstop", help="comma-separated: sigkill, sigstop (default both)"
    )
    parser.add_argument("--poll", type=float, default=0.02, help="database poll interval, s (default 0.02)")
    parser.add_argument("--trial-timeout", type=float, default=30.0, help="give a trial up after this many s")
    parser.add_argument(
        "--settle", type=float, default=0.0, help="seconds to wait between B registering and the signal"
    )
    parser.add_argument(
        "--retries", type=int, default=2,
        help="re-run a trial this many times if PostgreSQL/RabbitMQ went away during it (default 2)",
    )
    parser.add_argument(
        "--jitter", type=float, default=None,
        help="random extra wait (uniform 0..JITTER s) before the signal, to vary its phase against the "
        "heartbeat and sweep timers (default: the larger of the two intervals)",
    )
    parser.add_argument(
        "--after-heartbeat", action="store_true",
        help="signal A just after it records a heartbeat (the worst phase for SIGSTOP) instead of at random",
    )
    parser.add_argument("--pg-url", default="postgresql://postgres@127.0.0.1:5432", help="server, no database")
    parser.add_argument("--amqp-url", default="amqp://guest:guest@127.0.0.1:5672/")
    parser.add_argument("--log-level", default="warning", help="services' logging.level (default warning)")
    parser.add_argument("--log-dir", default=None, help="service logs (default /tmp/baton-recovery-<id>)")
    parser.add_argument("--keep-logs", action="store_true", help="keep service logs even when all went well")
    args = parser.parse_args()
    if args.jitter is None:
        args.jitter = max(args.heartbeat_interval, args.sweep_interval)
    args.kinds = [k.strip() for k in args.kinds.split(",") if k.strip()]
    unknown = [k for k in args.kinds if k not in KINDS]
    if unknown:
        parser.error(f"unknown kind(s) {unknown}; choose from {sorted(KINDS)}")
    configure_logging(LoggingSettings(level="warning", format="console"))  # quiet migrations
    summary = asyncio.run(run(args))
    print(json.dumps(summary, sort_keys=True))
    sys.exit(0 if summary["ok"] else 1)


if __name__ == "__main__":
    main()

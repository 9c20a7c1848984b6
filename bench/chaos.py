#!/usr/bin/env python
"""Chaos soak: a steady mixed load on two executors and three workers while a seeded schedule of
faults strikes, then the invariants, checked once the system is quiet.

Everything runs as real processes on a PostgreSQL and a RabbitMQ of the soak's own (their own ports
and data directories, started here and stopped at the end), so that restarting them never touches
the machine's shared servers. Worker `w3` reaches PostgreSQL through a proxy the soak can cut.

Load (`--rate` per second for `--duration` seconds, or on until `--min-faults` faults have
struck): no-ops, sleeps, shell commands, failing actions, and durable workflows (`chaos.flow`:
steps that write to a ledger, a durable sleep, parallel steps, a child action); a few are cancelled
and a few failed ones retried.

Faults (one every `--fault-every` seconds, chosen by the seeded generator): SIGKILL a worker and
start it again under its name; SIGTERM a worker and start a replacement; SIGSTOP a worker past the
staleness threshold, then SIGCONT; SIGKILL an executor and start it again; restart RabbitMQ
(`stop_app` / `start_app`); restart PostgreSQL; cut `w3` off from PostgreSQL, then heal; hold
`w3`'s packets to and from PostgreSQL (a blackhole: nothing arrives, nothing is refused), then heal.

Checks (printed as a table, written as JSON to `--report`): every invocation posted has exactly
one execution and every execution is terminal; no execution completed twice or has more than one
terminal event (fencing held); every durable workflow not failed by policy completed, with every
step in the ledger, and no step ran more often than its run was interrupted plus one; no service
logged an event at error level (an outage is a warning: an error is a bug); and counts
of interrupted, recovered, rescheduled, timed-out and cancelled runs, with the worst time from a fault
to an interrupted run running again.

    .venv/bin/python bench/chaos.py --duration 600 --seed 7        # or: make chaos
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import logging
import random
import signal
import sys
import tempfile
import time
import uuid
from collections import Counter
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from tests.harness import (  # noqa: E402
    Baton,
    CuttableProxy,
    PrivatePostgres,
    PrivateRabbit,
    Service,
    log_events,
    make_template,
)

TERMINAL = ("completed", "failed", "timeout", "cancelled")
#: Who may fail a run by policy (attempts spent), rather than by a fault of the run itself.
POLICY_FAILURES = ("recovery", "execution_timeout_monitor", "scheduler", "liveness_sweeper", "dead_letter_handler")
FAULTS = ("sigkill_worker", "sigterm_worker", "sigstop_worker", "kill_executor", "restart_rabbitmq",
          "restart_postgres", "cut_worker_db", "blackhole_worker_db", "blackhole_worker_pools")
#: Fast liveness, as in the test suite, so that a soak sees many recoveries.
CHAOS_ENV = {
    "BATON__WORKER__HEARTBEAT_INTERVAL": "0.5",
    "BATON__EXECUTOR__SWEEP_INTERVAL": "0.5",
    "BATON__EXECUTOR__SCHEDULED_TIMEOUT": "5",
    "BATON__EXECUTOR__TIMEOUT_CHECK_INTERVAL": "1",
    "BATON__WORKER__QUEUE_TTL": "10",
    "BATON__WORKER__SHUTDOWN_TIMEOUT": "2",
    "BATON__WORKER__MAX_INLINE_SLEEP": "0.2",
    "BATON__EXECUTOR__MAX_SCHEDULE_ATTEMPTS": "20",
    "BATON__RECOVERY__MAX_RECOVERY_ATTEMPTS": "20",
    "BATON__WORKER__ACTION_MODULES": '["tests.actions", "bench.chaos_workflows"]',
}


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


@dataclasses.dataclass
class Soak:
    args: argparse.Namespace
    world: Baton
    pg: PrivatePostgres
    rabbit: PrivateRabbit
    proxy: CuttableProxy
    ledger: Path
    rng: random.Random
    posted: dict[uuid.UUID, str] = dataclasses.field(default_factory=dict)  # id -> action
    uncertain: set[uuid.UUID] = dataclasses.field(default_factory=set)  # the broker went away mid-post
    faults: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    executors: dict[str, Service] = dataclasses.field(default_factory=dict)
    workers: dict[str, Service] = dataclasses.field(default_factory=dict)
    cancels: int = 0
    retries: int = 0
    load_s: float = 0.0  # how long the load ran: `--duration`, or longer to fit `--min-faults`

    # -- services ----------------------------------------------------------------------------------

    async def start_executor(self, name: str) -> None:
        self.executors[name] = await self.world.start_executor(name)

    async def start_worker(self, name: str) -> None:
        env = {"BATON__WORKER__ACTION_MODULES": CHAOS_ENV["BATON__WORKER__ACTION_MODULES"]}
        if name == "w3":
            env["BATON__DATABASE__URL"] = self.proxy.url(self.world.db_name)
        self.workers[name] = await self.world.start_worker(name, concurrency=6, **env)

    # -- load ----------------------------------------------------------------------------------------

    def invocation(self) -> tuple[str, dict[str, Any]]:
        roll = self.rng.random()
        if roll < 0.35:
            return "core.noop", {}
        if roll < 0.55:
            return "core.sleep", {"seconds": round(self.rng.uniform(0.1, 1.0), 2)}
        if roll < 0.65:
            return "core.local", {"cmd": ["sleep", str(round(self.rng.uniform(0.05, 0.5), 2))]}
        if roll < 0.75:
            return "tests.fail", {"message": "chaos"}
        return "chaos.flow", {"ledger": str(self.ledger), "step_s": 0.2, "sleep_s": 0.5}

    async def load(self, faults_over: asyncio.Event) -> None:
        client = await self.world.client()
        interval = 1.0 / self.args.rate
        next_at = time.monotonic()
        while not faults_over.is_set():
            action, params = self.invocation()
            try:
                submission = await client.submit(action, params, accept_timeout_s=2)
                self.posted[submission.execution_id] = action
            except Exception as exc:  # noqa: BLE001 - the broker may be away: the post may or may not have landed
                log(f"post failed ({type(exc).__name__}: {str(exc)[:80]})")
                await asyncio.sleep(0.5)
            if self.posted and self.rng.random() < 0.02:
                await self.cancel_one(client)
            next_at += interval
            await asyncio.sleep(max(0.0, next_at - time.monotonic()))

    async def cancel_one(self, client: Any) -> None:
        victim = self.rng.choice(list(self.posted))
        try:
            await client.cancel(victim)
            self.cancels += 1
        except ValueError:
            pass  # finished already
        except Exception as exc:  # noqa: BLE001 - the database may be restarting: skip this cancel
            log(f"cancel skipped ({type(exc).__name__})")

    # -- faults --------------------------------------------------------------------------------------

    async def faults_until(self, stop_at: float, faults_over: asyncio.Event) -> None:
        """Strike until `stop_at`, and on (the load with it) until `--min-faults` have struck: a
        fault takes as long as the services take to come back, so a slow machine fits fewer."""
        try:
            while time.monotonic() + self.args.fault_every < stop_at or len(self.faults) < self.args.min_faults:
                await asyncio.sleep(self.args.fault_every * self.rng.uniform(0.5, 1.5))
                kind = self.rng.choice(self.args.faults)
                started = time.time()
                detail = await getattr(self, kind)()
                self.faults.append({"fault": kind, "at": started, "detail": detail, "took_s": round(time.time() - started, 2)})
                log(f"fault {kind}: {detail}")
            await asyncio.sleep(max(0.0, stop_at - time.monotonic()))
        finally:
            faults_over.set()

    def _alive_worker(self) -> str:
        return self.rng.choice(sorted(n for n, s in self.workers.items() if s.process.poll() is None))

    async def sigkill_worker(self) -> str:
        name = self._alive_worker()
        self.workers[name].signal(signal.SIGKILL)
        await asyncio.to_thread(self.workers[name].wait, 30)
        await asyncio.sleep(1)
        await self.start_worker(name)
        return name

    async def sigterm_worker(self) -> str:
        name = self._alive_worker()
        self.workers[name].signal(signal.SIGTERM)
        await asyncio.to_thread(self.workers[name].wait, 60)
        await self.start_worker(name)
        return name

    async def sigstop_worker(self) -> str:
        name = self._alive_worker()
        self.workers[name].signal(signal.SIGSTOP)
        await asyncio.sleep(3)  # past the staleness threshold (3 x 0.5 s)
        self.workers[name].signal(signal.SIGCONT)
        return name

    async def kill_executor(self) -> str:
        name = self.rng.choice(sorted(self.executors))
        self.executors[name].signal(signal.SIGKILL)
        await asyncio.to_thread(self.executors[name].wait, 30)
        await asyncio.sleep(0.5)
        await self.start_executor(name)
        return name

    async def restart_rabbitmq(self) -> str:
        await asyncio.to_thread(self.rabbit.ctl, "stop_app")
        await asyncio.sleep(1)
        await asyncio.to_thread(self.rabbit.ctl, "start_app")
        return "stop_app, 1 s, start_app"

    async def restart_postgres(self) -> str:
        await asyncio.to_thread(self.pg.restart)
        return "pg_ctl restart -m fast"

    async def cut_worker_db(self) -> str:
        await self.proxy.cut()
        await asyncio.sleep(2.5)
        await self.proxy.heal()
        return "w3 cut off from PostgreSQL for 2.5 s"

    async def blackhole_worker_db(self) -> str:
        self.proxy.blackhole()
        await asyncio.sleep(3)  # past the staleness threshold: w3 stands down, its runs recovered elsewhere
        await self.proxy.heal()
        return "w3's packets to and from PostgreSQL held for 3 s"

    async def blackhole_worker_pools(self) -> str:
        if not await self.proxy.blackhole_pools(await self.world.pool()):
            return "w3 holds no lock connection now (restarting): nothing held"
        # Past the pools' failing window: w3 stops taking work, hands back what waits, and its
        # runs go on; its heartbeats get through all along.
        await asyncio.sleep(6)
        await self.proxy.heal()
        return "w3's pool connections held for 6 s, its lock connection spared"

    # -- the end -------------------------------------------------------------------------------------

    async def quiet(self, timeout_s: float) -> bool:
        """Wait until nothing posted is unfinished (a sleeping run past its wake-up time is not)."""
        pool = await self.world.pool()
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            left = await pool.fetchval(
                "SELECT count(*) FROM executions WHERE status NOT IN ('completed', 'failed', 'timeout', 'cancelled')"
            )
            if left == 0:
                return True
            await asyncio.sleep(1)
        return False

    async def retry_some(self) -> None:
        client = await self.world.client()
        pool = await self.world.pool()
        failed = await pool.fetch("SELECT id FROM executions WHERE status = 'failed' AND action_ref = 'tests.fail' LIMIT 3")
        for row in failed:
            new = await client.retry(row["id"])
            self.posted[new] = "tests.fail"
            self.retries += 1


def failed_by_policy(row: dict[str, Any], rows: dict[uuid.UUID, dict[str, Any]]) -> bool:
    """Whether an execution that did not complete was failed by policy: its own recoveries or
    dispatches spent, or its child's (a transient child lost with its worker fails, and its
    workflow fails with it, naming the child)."""
    error = row["error"] or {}
    if error.get("failed_by") in POLICY_FAILURES:
        return True
    child = rows.get(uuid.UUID(error["child"])) if error.get("child") else None
    return child is not None and child["status"] != "completed" and failed_by_policy(child, rows)


def errors_logged(log_dir: Path) -> list[str]:
    """The events at error level (or above) in the services' logs: "file: event" each."""
    return [
        f"{path.name}: {str(event.get('event'))[:200]}"
        for path in sorted(log_dir.glob("*.log"))
        for event in log_events(path)
        if isinstance(event, dict) and event.get("level") in ("error", "critical")
    ]


#: Service events worth counting in the report: each is the last line of defence doing its work
#: (a waiting run the timers' backstop had to wake; a dead letter taken for forged, which a drain
#: whose `draining` mark PostgreSQL missed can cause; a claim a drain abandoned), and none is
#: expected often.
WATCHED_EVENTS = ("execution_woken_late", "dead_letter_premature", "drain_claim_abandoned")


def events_counted(log_dir: Path, names: tuple[str, ...]) -> dict[str, int]:
    """How many times each of ``names`` appears in the services' logs."""
    counts = Counter(
        str(event.get("event")) for path in sorted(log_dir.glob("*.log")) for event in log_events(path)
        if isinstance(event, dict) and event.get("event") in names
    )
    return {name: counts[name] for name in names}


async def check(soak: Soak, quiet: bool) -> dict[str, Any]:
    pool = await soak.world.pool()
    rows = {r["id"]: dict(r) for r in await pool.fetch(
        "SELECT id, action_ref, status, recovery_attempts, parent_id, error FROM executions")}
    events = await pool.fetch("SELECT execution_id, seq, type, data, created_at FROM execution_events ORDER BY execution_id, seq")
    by_execution: dict[uuid.UUID, list[Any]] = {}
    for e in events:
        by_execution.setdefault(e["execution_id"], []).append(e)
    missing = [str(i) for i in soak.posted if i not in rows]
    unfinished = [str(i) for i, r in rows.items() if r["status"] not in TERMINAL]
    terminal_events = {i: sum(1 for e in evs if e["type"] in {f"execution.{s}" for s in TERMINAL}) for i, evs in by_execution.items()}
    twice = [str(i) for i, n in terminal_events.items() if n > 1]
    completed_twice = [str(i) for i, evs in by_execution.items() if sum(1 for e in evs if e["type"] == "execution.completed") > 1]
    ledger: Counter[tuple[str, str]] = Counter()
    if soak.ledger.exists():
        for line in soak.ledger.read_text().splitlines():
            run, what, *_ = line.split()
            ledger[(run, what)] += 1
    flows = {i: r for i, r in rows.items() if r["action_ref"] == "chaos.flow"}
    # A workflow here may fail only by policy, never by itself.
    flows_not_completed = [str(i) for i, r in flows.items()
                           if r["status"] not in ("completed", "cancelled") and not failed_by_policy(r, rows)]
    interrupted = {i: sum(1 for e in evs if e["type"] == "workflow.interrupted") for i, evs in by_execution.items()}
    steps_missing, steps_over = [], []
    for i, r in flows.items():
        for what in ("first", "left", "right", "last"):
            n = ledger[(str(i), what)]
            if r["status"] == "completed" and n == 0:
                steps_missing.append(f"{i}:{what}")
            if n > interrupted.get(i, 0) + 1:
                steps_over.append(f"{i}:{what} ran {n} times, {interrupted.get(i, 0)} interruptions")
    # From the fault that struck last before a run was interrupted to that run running again (or
    # ending): how long a fault kept work from going on.
    faults_in_order = sorted(soak.faults, key=lambda f: f["at"])
    ends = {"execution.started", *(f"execution.{s}" for s in TERMINAL)}
    worst_s = 0.0
    worst: dict[str, Any] = {}
    for execution_id, evs in by_execution.items():
        for k, e in enumerate(evs):
            if e["type"] != "workflow.interrupted":
                continue
            again = next((x for x in evs[k + 1:] if x["type"] in ends), None)
            struck = [f for f in faults_in_order if f["at"] <= e["created_at"].timestamp()]
            if again is not None and struck and again["created_at"].timestamp() - struck[-1]["at"] > worst_s:
                worst_s = again["created_at"].timestamp() - struck[-1]["at"]
                # What that run went through from the fault on, to see where the time went.
                worst = {
                    "execution_id": str(execution_id), "fault": struck[-1],
                    "events": [[round(x["created_at"].timestamp() - struck[-1]["at"], 3), x["type"]]
                               for x in evs if x["created_at"].timestamp() >= struck[-1]["at"]][:15],
                }
    kinds = Counter(e["type"] for e in events)
    failures = Counter(f"{r['action_ref']}: {((r['error'] or {}).get('error') or '')[:100]}"
                       for r in rows.values() if r["status"] == "failed")
    statuses = Counter(r["status"] for r in rows.values())
    errors = errors_logged(soak.world.tmp)
    checks = {
        "every posted invocation has one execution": not missing,
        "every execution is terminal": quiet and not unfinished,
        "no execution has two terminal events": not twice,
        "no execution completed twice": not completed_twice,
        "every durable workflow not failed by policy completed": not flows_not_completed,
        "every step of a completed workflow is in the ledger": not steps_missing,
        "no step ran more than its run's interruptions + 1": not steps_over,
        "no service logged an error": not errors,
    }
    return {
        "seed": soak.args.seed, "duration_s": round(soak.load_s, 1), "rate": soak.args.rate,
        "posted": len(soak.posted), "executions": len(rows), "statuses": dict(statuses),
        "durable_workflows": len(flows), "faults": soak.faults, "fault_counts": dict(Counter(f["fault"] for f in soak.faults)),
        "cancels": soak.cancels, "retries": soak.retries,
        "interrupted": kinds["workflow.interrupted"], "recovered": kinds["execution.recovering"],
        "rescheduled": kinds["execution.rescheduled"], "timed_out": statuses.get("timeout", 0),
        "cancelled": statuses.get("cancelled", 0), "worst_fault_to_recovery_s": round(worst_s, 2),
        "worst_recovery": worst,
        "failures": dict(failures.most_common(8)),
        "watched_events": events_counted(soak.world.tmp, WATCHED_EVENTS),
        "checks": checks, "ok": all(checks.values()),
        "problems": {"missing": missing[:20], "unfinished": unfinished[:20], "two_terminal_events": twice[:20],
                     "completed_twice": completed_twice[:20], "flows_not_completed": flows_not_completed[:20],
                     "steps_missing": steps_missing[:20], "steps_over": steps_over[:20],
                     "errors_logged": errors[:20]},
    }


async def run(args: argparse.Namespace) -> dict[str, Any]:
    tmp = Path(tempfile.mkdtemp(prefix="baton-chaos-"))
    pg, rabbit = PrivatePostgres(tmp), PrivateRabbit(tmp)
    log(f"seed {args.seed}; starting a PostgreSQL and a RabbitMQ of the soak's own (logs in {tmp})")
    await asyncio.gather(asyncio.to_thread(pg.start), asyncio.to_thread(rabbit.start))
    proxy = CuttableProxy(target_port=pg.port)
    await proxy.start()
    # Services start afresh, as a deployment starts them: a restart's cost is part of a recovery.
    world = Baton(template=await make_template(pg.url), tmp=tmp, pg_url=pg.url, amqp_url=rabbit.url, forked=False)
    world.env.update(CHAOS_ENV)
    await world.setup()
    soak = Soak(args, world, pg, rabbit, proxy, tmp / "ledger.txt", random.Random(args.seed))
    try:
        for name in ("e1", "e2"):
            await soak.start_executor(name)
        for name in ("w1", "w2", "w3"):
            await soak.start_worker(name)
        stop_at = time.monotonic() + args.duration
        log(f"load at {args.rate}/s for {args.duration} s, a fault about every {args.fault_every} s")
        faults_over = asyncio.Event()
        load_started = time.monotonic()
        await asyncio.gather(soak.load(faults_over), soak.faults_until(stop_at, faults_over))
        soak.load_s = time.monotonic() - load_started
        if proxy._server is None:  # a fault left it cut
            await proxy.heal()
        for name, service in list(soak.workers.items()):  # anything a fault left stopped comes back
            if service.process.poll() is not None:
                await soak.start_worker(name)
        await soak.retry_some()
        log("load over; waiting for the system to be quiet")
        quiet = await soak.quiet(args.quiet_timeout)
        return await check(soak, quiet)
    finally:
        await world.teardown()
        await proxy.cut()
        await asyncio.gather(asyncio.to_thread(rabbit.stop), asyncio.to_thread(pg.stop))


def print_report(report: dict[str, Any]) -> None:
    print(f"\nchaos soak, seed {report['seed']}: {report['posted']} posted over {report['duration_s']} s at "
          f"{report['rate']}/s; faults: {report['fault_counts']}")
    for name, passed in report["checks"].items():
        print(f"  {'ok  ' if passed else 'FAIL'}  {name}")
    print(f"  statuses {report['statuses']}; interrupted {report['interrupted']}, recovered {report['recovered']}, "
          f"rescheduled {report['rescheduled']}, timed out {report['timed_out']}, cancelled {report['cancelled']}; "
          f"worst fault -> recovery {report['worst_fault_to_recovery_s']} s")
    if report.get("worst_recovery"):
        worst = report["worst_recovery"]
        print(f"  the worst: {worst['execution_id']} after {worst['fault']['fault']} ({worst['fault']['detail']}): "
              + ", ".join(f"+{t:.2f} s {kind}" for t, kind in worst["events"]))
    print(f"  failures, most common first: {json.dumps(report['failures'])}")
    print(f"  backstops at work: {json.dumps(report['watched_events'])}")
    if not report["ok"]:
        print("  problems: " + json.dumps({k: v for k, v in report["problems"].items() if v}))
        print(f"  replay with: --seed {report['seed']}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--duration", type=float, default=600)
    parser.add_argument("--rate", type=float, default=20)
    parser.add_argument("--fault-every", type=float, default=8)
    parser.add_argument("--min-faults", type=int, default=0,
                        help="go on past --duration, load and faults, until this many faults have struck")
    parser.add_argument("--faults", type=lambda v: v.split(","), default=list(FAULTS))
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--quiet-timeout", type=float, default=180)
    parser.add_argument("--report", type=Path, default=Path("chaos-report.json"))
    args = parser.parse_args()
    # The soak's own connections ride out the restarts it causes: asyncpg's pool restores its
    # connection floor and aio-pika reconnects, each printing a warning (asyncpg's with a traceback)
    # (aiormq an error) per try. Expected here; what the services log of it goes to their log files.
    for name in ("asyncpg.pool", "aio_pika", "aiormq"):
        logging.getLogger(name).setLevel(logging.CRITICAL)
    if args.seed is None:
        args.seed = random.randrange(1_000_000)
    unknown = set(args.faults) - set(FAULTS)
    if unknown:
        parser.error(f"unknown faults {sorted(unknown)}: choose from {', '.join(FAULTS)}")
    report = asyncio.run(run(args))
    args.report.write_text(json.dumps(report, indent=2, default=str))
    print_report(report)
    print(f"report written to {args.report}")
    sys.exit(0 if report["ok"] else 1)


if __name__ == "__main__":
    main()

"""Durable workflows (DESIGN section 6) with real processes and real signals: every step
checkpointed, runs resumed from their last step after SIGKILL and SIGSTOP, suspension on timers,
children and signals, and the operator's cancel, pause/resume and retry.

Steps append lines to a side-effect file (see tests/workflows.py), from which each test counts how
often each step really ran."""

from __future__ import annotations

import asyncio
import datetime as dt
import os
import signal
import uuid
from pathlib import Path

import pytest

from tests.harness import Baton, Service, wait_until

pytestmark = pytest.mark.integration

INTERRUPTED_FIELDS = {"reason", "worker_id", "last_event_sequence", "error", "recoverable", "recovery_attempt"}


def _count(path: Path, what: str) -> int:
    return sum(1 for line in path.read_text().splitlines() if line.split(" ")[0] == what)


async def _lines(path: Path, what: str, n: int = 1) -> None:
    async def seen() -> bool:
        return path.exists() and _count(path, what) >= n

    await wait_until(seen, what=f"{n} {what!r} line(s) in {path.name}")


async def _events(baton: Baton, execution_id) -> list[dict]:
    rows = await (await baton.pool()).fetch(
        "SELECT seq, type, data, created_at FROM execution_events WHERE execution_id = $1 ORDER BY seq", execution_id
    )
    return [dict(r) for r in rows]


async def _steps(baton: Baton, execution_id) -> list[dict]:
    rows = await (await baton.pool()).fetch(
        "SELECT step_id, name, status, result, attempts FROM workflow_steps WHERE execution_id = $1 ORDER BY step_id",
        execution_id,
    )
    return [dict(r) for r in rows]


async def _two_workers(baton: Baton, **env: str) -> dict[str, Service]:
    await baton.start_executor()
    return {name: await baton.start_worker(name, concurrency=2, **env) for name in ("wf-a", "wf-b")}


async def _kill_runner(baton: Baton, workers: dict[str, Service], execution_id, sig: int = signal.SIGKILL) -> str:
    """Signal the worker running the execution; returns its name."""
    row = await baton.wait_status(execution_id, "running")
    workers[row["worker"]].signal(sig)
    return row["worker"]


def _interrupted(events: list[dict]) -> list[dict]:
    return [e["data"] for e in events if e["type"] == "workflow.interrupted"]


async def _path(baton: Baton, name: str = "side") -> Path:
    path = baton.tmp / f"{name}.txt"
    path.write_text("")
    return path


# -- recovery resumes ------------------------------------------------------------------------------


@pytest.mark.parametrize("where", ["after_step_1", "during_step_2", "during_sleep"])
async def test_sigkill_resumes_from_last_step_on_another_worker(baton, where):
    workers = await _two_workers(baton)
    path = await _path(baton)
    params = {"path": str(path), "gap_s": 0.0, "step2_s": 0.0, "sleep_s": 0.0}
    wait_for = {"after_step_1": "gap", "during_step_2": "two.start", "during_sleep": "two"}[where]
    params[{"after_step_1": "gap_s", "during_step_2": "step2_s", "during_sleep": "sleep_s"}[where]] = 4.0
    client = await baton.client()
    submission = await client.submit("tests.three_steps", params, watch=True)
    await _lines(path, wait_for)
    if where == "during_sleep":
        await wait_until(
            lambda: _has_event(baton, submission.execution_id, "sleep.started"), what="the sleep to start"
        )
    killed = await _kill_runner(baton, workers, submission.execution_id)
    done = await client.wait(submission.execution_id, 30)

    assert done["status"] == "completed", done["error"]
    assert done["worker"] != killed
    assert done["recovery_attempts"] == 1
    assert done["result"] == {"steps": ["one", "two", "three"], "recovery_attempts": 1}
    assert _count(path, "one") == 1  # step 1 ran once, whatever happened after it
    assert _count(path, "three") == 1
    if where == "during_sleep":
        assert _count(path, "two") == 1
    events = await _events(baton, submission.execution_id)
    [interrupted] = _interrupted(events)
    assert set(interrupted) >= INTERRUPTED_FIELDS
    assert interrupted["reason"] == "worker_lost" and interrupted["worker_id"] == killed
    assert interrupted["recoverable"] is True and interrupted["recovery_attempt"] == 1
    resumed = [e for e in events if e["type"] == "workflow.resumed"]
    assert len(resumed) == 1 and resumed[0]["data"]["worker"] == done["worker"]
    if where == "during_sleep":
        started = next(e for e in events if e["type"] == "sleep.started")
        completed = next(e for e in events if e["type"] == "sleep.completed")
        # The sleep kept its wake-up time: it did not end early, and did not start over.
        wake_at = dt.datetime.fromtimestamp(completed["data"]["wake_at_s"], dt.UTC)
        assert completed["created_at"] >= wake_at
        assert wake_at - started["created_at"] >= dt.timedelta(seconds=3.99)
        assert sum(1 for e in events if e["type"] == "sleep.started") == 1


async def _has_event(baton: Baton, execution_id, kind: str) -> bool:
    return any(e["type"] == kind for e in await _events(baton, execution_id))


async def test_sigstopped_worker_is_recovered_from_and_the_zombie_records_nothing(baton):
    workers = await _two_workers(baton)
    path = await _path(baton)
    client = await baton.client()
    submission = await client.submit("tests.steps_then_long", {"path": str(path), "steps": 2, "seconds": 2.0}, watch=True)
    await _lines(path, "long.start")
    zombie = await _kill_runner(baton, workers, submission.execution_id, signal.SIGSTOP)
    try:
        done = await client.wait(submission.execution_id, 40)
    finally:
        workers[zombie].signal(signal.SIGCONT)
    assert done["status"] == "completed" and done["worker"] != zombie
    events_after = await _events(baton, submission.execution_id)
    steps_after = await _steps(baton, submission.execution_id)

    # The zombie wakes, learns it was declared lost, and gives up what it ran: fenced, not recorded.
    await wait_until(
        lambda: _logged_any(workers[zombie], {"worker_standing_down", "workflow_fenced", "interrupt_fenced"}),
        what="the zombie to notice it lost the run",
    )
    await wait_until(lambda: _logged_any(workers[zombie], {"worker_reregistered"}), what="the zombie to re-register")
    assert await _events(baton, submission.execution_id) == events_after
    assert await _steps(baton, submission.execution_id) == steps_after
    assert _count(path, "s0") == 1 and _count(path, "s1") == 1
    assert (await baton.execution(submission.execution_id))["status"] == "completed"


async def _logged_any(service: Service, names: set[str]) -> bool:
    return any(line.get("event") in names for line in service.log_lines())


async def test_max_recovery_attempts_exceeded_fails_with_the_limit(baton):
    workers = await _two_workers(baton)
    workers["wf-c"] = await baton.start_worker("wf-c", concurrency=2)
    path = await _path(baton)
    client = await baton.client()
    submission = await client.submit("tests.limited", {"path": str(path)}, watch=True)
    await _lines(path, "long.start")
    first = await _kill_runner(baton, workers, submission.execution_id)
    await _lines(path, "long.start", 2)
    row = await baton.wait_status(submission.execution_id, "running")
    assert row["worker"] != first and row["recovery_attempts"] == 1
    await _kill_runner(baton, workers, submission.execution_id)
    done = await client.wait(submission.execution_id, 30)
    assert done["status"] == "failed"
    assert "max_recovery_attempts = 1" in done["error"]["error"]
    assert done["error"]["max_recovery_attempts"] == 1
    assert _interrupted(await _events(baton, submission.execution_id))[-1]["recoverable"] is False


async def test_transient_workflow_fails_on_worker_loss_or_restarts_when_asked(baton):
    workers = await _two_workers(baton)
    path = await _path(baton)
    other = await _path(baton, "other")
    client = await baton.client()
    plain = await client.submit("tests.transient", {"path": str(path)}, watch=True)
    restarting = await client.submit("tests.transient_restart", {"path": str(other), "seconds": 2.0}, watch=True)
    await _lines(path, "long.start")
    await _lines(other, "long.start")
    for execution_id in (plain.execution_id, restarting.execution_id):
        row = await baton.wait_status(execution_id, "running")
        if workers[row["worker"]].process.poll() is None:
            workers[row["worker"]].signal(signal.SIGKILL)
    failed = await client.wait(plain.execution_id, 30)
    assert failed["status"] == "failed"
    assert "recover_on_worker_loss is off" in failed["error"]["error"]
    if all(w.process.poll() is not None for w in workers.values()):
        await baton.start_worker("wf-d", concurrency=2)
    restarted = await client.wait(restarting.execution_id, 30)
    assert restarted["status"] == "completed"
    assert _count(other, "begin") == 2  # from scratch: nothing was recorded to resume from
    assert await _steps(baton, restarting.execution_id) == []


async def test_a_run_the_workers_own_machinery_fails_is_interrupted_and_recovered_not_left_running(baton):
    # Many recoveries allowed: the run fails on every try until the journal's table is back.
    many = {"BATON__RECOVERY__MAX_RECOVERY_ATTEMPTS": "50"}
    await baton.started(baton.spawn_executor(**many), baton.spawn_worker("wf-x", concurrency=2, **many))
    pool = await baton.pool()
    # The journal cannot be read: an error from the worker's machinery, not from the workflow.
    await pool.execute("ALTER TABLE workflow_steps RENAME TO workflow_steps_away")
    path = await _path(baton)
    client = await baton.client()
    submission = await client.submit("tests.steps_then_long", {"path": str(path), "steps": 1, "seconds": 0.1})

    async def interrupted():
        return _interrupted(await _events(baton, submission.execution_id))

    [first, *_] = await wait_until(interrupted, what="the failed run to be interrupted")
    await pool.execute("ALTER TABLE workflow_steps_away RENAME TO workflow_steps")
    assert first["reason"] == "worker_lost" and first["recoverable"] is True
    assert "the worker failed while running it" in first["error"] and first["worker_id"] == "wf-x"
    done = await client.wait(submission.execution_id, 30)
    assert done["status"] == "completed" and done["recovery_attempts"] >= 1
    assert _count(path, "s0") == 1


async def test_store_is_restored_after_a_crash(baton):
    workers = await _two_workers(baton)
    path = await _path(baton)
    client = await baton.client()
    submission = await client.submit("tests.stored", {"path": str(path), "seconds": 3.0}, watch=True)
    await _lines(path, "long.start")
    await _kill_runner(baton, workers, submission.execution_id)
    done = await client.wait(submission.execution_id, 30)
    assert done["status"] == "completed"
    # Restored as of each step: the increment before step 1 is not applied a second time.
    assert done["result"] == {"count": 1, "after_first": 1}
    assert done["store"] == {"count": 1, "after_first": 1}
    assert _count(path, "first") == 1


async def test_parallel_steps_keep_their_identities_across_a_crash_mid_gather(baton):
    workers = await _two_workers(baton)
    path = await _path(baton)
    client = await baton.client()
    submission = await client.submit("tests.parallel", {"path": str(path), "seconds": 3.0}, watch=True)
    await _lines(path, "fast")
    await _lines(path, "slow.start")
    await wait_until(lambda: _step_done(baton, submission.execution_id, 1), what="the fast branch's checkpoint")
    await _kill_runner(baton, workers, submission.execution_id)
    done = await client.wait(submission.execution_id, 30)
    assert done["status"] == "completed"
    assert done["result"] == ["fast", "slow", "tail"]
    assert _count(path, "fast") == 1 and _count(path, "slow.start") == 2
    steps = await _steps(baton, submission.execution_id)
    assert [(s["step_id"], s["result"]) for s in steps] == [(1, "fast"), (2, "slow"), (3, "tail")]


async def _step_done(baton: Baton, execution_id, step_id: int) -> bool:
    return any(s["step_id"] == step_id and s["status"] == "completed" for s in await _steps(baton, execution_id))


async def test_changed_code_fails_the_run_with_a_non_determinism_error(baton):
    workers = await _two_workers(baton)
    path = await _path(baton)
    Path(str(path) + ".order").write_text("alpha")
    client = await baton.client()
    submission = await client.submit("tests.changing", {"path": str(path)}, watch=True)
    await _lines(path, "long.start")
    Path(str(path) + ".order").write_text("beta")  # the "deployment": step 1 is now another step
    await _kill_runner(baton, workers, submission.execution_id)
    done = await client.wait(submission.execution_id, 30)
    assert done["status"] == "failed"
    message = done["error"]["error"]
    assert "non-deterministic" in message and "'alpha'" in message and "'beta'" in message
    assert done["error"]["kind"] == "non_determinism"
    assert _count(path, "beta") == 0  # never handed step 1's recorded result, never run either


# -- suspension -----------------------------------------------------------------------------------


async def test_long_sleep_frees_the_slot_and_wakes_on_time(baton):
    await baton.started(
        baton.spawn_executor(),
        baton.spawn_worker("solo", concurrency=1, BATON__WORKER__MAX_INLINE_SLEEP="0.2"),
    )
    path = await _path(baton)
    client = await baton.client()
    sleeper = await client.submit("tests.sleeper", {"path": str(path), "seconds": 3.0}, watch=True)
    await baton.wait_status(sleeper.execution_id, "sleeping")
    # The only slot is free meanwhile: other work runs while the workflow sleeps.
    echo = await client.run("core.echo", {"message": "meanwhile"}, wait_timeout_s=20)
    assert echo["status"] == "completed"
    assert (await baton.execution(sleeper.execution_id))["status"] == "sleeping"
    done = await client.wait(sleeper.execution_id, 30)
    assert done["status"] == "completed" and done["result"] == "woke"
    events = await _events(baton, sleeper.execution_id)
    started = next(e for e in events if e["type"] == "sleep.started")
    completed = next(e for e in events if e["type"] == "sleep.completed")
    assert completed["created_at"] - started["created_at"] >= dt.timedelta(seconds=3)
    assert [e["data"]["reason"] for e in events if e["type"] == "execution.woken"] == ["timer"]
    assert _count(path, "before") == 1 and _count(path, "after") == 1


async def test_child_shell_action_runs_on_a_shell_only_worker(baton):
    await baton.started(baton.spawn_executor(), baton.spawn_worker("py-only", runtimes="python"))
    await baton.start_worker("sh-only", runtimes="shell")
    path = await _path(baton)
    client = await baton.client()
    done = await client.run("tests.parent", {"path": str(path), "cmd": ["echo", "from the child"]}, wait_timeout_s=30)
    assert done["status"] == "completed", done["error"]
    assert done["result"]["stdout"].strip() == "from the child"
    assert done["worker"] == "py-only"
    children = await (await baton.pool()).fetch(
        "SELECT worker, status, action_ref FROM executions WHERE parent_id = $1", done["id"]
    )
    assert [(c["worker"], c["status"], c["action_ref"]) for c in children] == [("sh-only", "completed", "core.local")]
    assert _count(path, "before") == 1 and _count(path, "after") == 1


async def test_parent_whose_worker_dies_while_its_child_runs_gets_the_same_child(baton):
    await baton.start_executor()
    py = {name: await baton.start_worker(name, runtimes="python") for name in ("py-1", "py-2")}
    await baton.start_worker("sh", runtimes="shell")
    path = await _path(baton)
    marker = baton.tmp / "child-ran"
    client = await baton.client()
    cmd = ["bash", "-c", f"echo ran >> {marker}; sleep 2; echo child-done"]
    submission = await client.submit("tests.parent", {"path": str(path), "cmd": cmd}, watch=True)
    await wait_until(lambda: _exists(marker), what="the child to start")
    parent_worker = (await baton.execution(submission.execution_id))["worker"]
    py[parent_worker].signal(signal.SIGKILL)
    done = await client.wait(submission.execution_id, 30)
    assert done["status"] == "completed", done["error"]
    assert done["result"]["stdout"].strip() == "child-done"
    assert done["worker"] != parent_worker
    assert marker.read_text().count("ran") == 1
    assert await (await baton.pool()).fetchval(
        "SELECT count(*) FROM executions WHERE parent_id = $1", submission.execution_id
    ) == 1


async def _exists(path: Path) -> bool:
    return path.exists()


async def _line_written(path: Path) -> bool:
    return path.exists() and path.read_text().endswith("\n")


async def test_signal_wakes_a_waiting_run_and_its_timeout_returns_none(baton):
    await baton.started(baton.spawn_executor(), baton.spawn_worker("solo", concurrency=1))
    path = await _path(baton)
    client = await baton.client()
    waiting = await client.submit("tests.waits_for_signal", {"path": str(path)}, watch=True)
    row = await baton.wait_status(waiting.execution_id, "waiting")
    assert row["waiting_for"] == "approved"
    assert await client.signal(str(waiting.execution_id)[:13], "approved", {"by": "ann"}) is True
    done = await client.wait(waiting.execution_id, 20)
    assert done["status"] == "completed" and done["result"] == {"got": {"by": "ann"}}

    timing_out = await client.submit("tests.waits_for_signal", {"path": str(path), "timeout_s": 1.0}, watch=True)
    await baton.wait_status(timing_out.execution_id, "waiting")
    done = await client.wait(timing_out.execution_id, 20)
    assert done["status"] == "completed" and done["result"] == {"got": None}
    assert await _has_event(baton, timing_out.execution_id, "signal.timed_out")

    # A signal that arrives before the run waits for it is kept for it.
    early = await client.submit("tests.waits_for_signal", {"path": str(path)}, watch=True)
    await client.signal(early.execution_id, "approved", 7)
    done = await client.wait(early.execution_id, 20)
    assert done["result"] == {"got": 7}


async def test_step_retries_with_backoff_then_fail_without_recovery(baton):
    await baton.started(baton.spawn_executor(), baton.spawn_worker("solo"))
    ok_path = await _path(baton, "ok")
    bad_path = await _path(baton, "bad")
    client = await baton.client()
    ok = await client.run("tests.retrying", {"path": str(ok_path), "failures": 2}, wait_timeout_s=20)
    assert ok["status"] == "completed" and ok["result"] == 3
    retries = [e for e in ok["events"] if e["type"] == "step.retrying"]
    assert [e["data"]["attempt"] for e in retries] == [2, 3]
    assert ok["steps"][0]["attempts"] == 3

    bad = await client.run("tests.retrying", {"path": str(bad_path), "failures": 5}, wait_timeout_s=20)
    assert bad["status"] == "failed"
    assert "failed after 3 attempts" in bad["error"]["error"] and "flaky failure 3" in bad["error"]["error"]
    assert bad["recovery_attempts"] == 0 and _count(bad_path, "flaky") == 3


async def test_whole_run_deadline_spans_suspensions(baton):
    await baton.started(
        baton.spawn_executor(), baton.spawn_worker("solo", BATON__WORKER__MAX_INLINE_SLEEP="0.2")
    )
    path = await _path(baton)
    client = await baton.client()
    submission = await client.submit("tests.sleeper", {"path": str(path), "seconds": 30.0}, timeout_s=1.5, watch=True)
    done = await client.wait(submission.execution_id, 20)
    assert done["status"] == "timeout"
    assert "deadline" in done["error"]["error"]
    assert _count(path, "after") == 0


# -- operator controls ------------------------------------------------------------------------------


async def test_cancel_stops_running_shell_and_python_actions(baton):
    await baton.started(baton.spawn_executor(), baton.spawn_worker("solo", concurrency=2))
    pidfile = baton.tmp / "pid"
    client = await baton.client()
    shell = await client.submit("core.local", {"cmd": f"echo $$ > {pidfile}; exec sleep 60"}, watch=True)
    python = await client.submit("tests.sleep_then_echo", {"seconds": 60, "message": "never"}, watch=True)
    await baton.wait_status(shell.execution_id, "running")
    await baton.wait_status(python.execution_id, "running")
    # The shell creates the file before `echo` writes to it: wait for the whole line.
    await wait_until(lambda: _line_written(pidfile), what="the command to start")
    pid = int(pidfile.read_text())
    for submission in (shell, python):
        cancelled = await client.cancel(submission.execution_id)
        assert [c["status"] for c in cancelled] == ["cancelled"]
    for submission in (shell, python):
        done = await client.wait(submission.execution_id, 20)
        assert done["status"] == "cancelled" and done["error"]["failed_by"] == "operator"

    async def gone() -> bool:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        return False

    await wait_until(gone, what="the cancelled command's process to be killed")
    worker = baton.services[-1]
    await wait_until(lambda: _logged_count(worker, "execution_stopped", 2), what="both runs to stop")
    # The slots are free again, and nothing was recorded over the cancellation.
    assert (await client.run("core.echo", {"message": "next"}, wait_timeout_s=10))["status"] == "completed"
    assert (await baton.execution(shell.execution_id))["status"] == "cancelled"


async def _logged_count(service: Service, name: str, n: int) -> bool:
    return len(service.events(name)) >= n


async def test_cancel_requested_sleeping_and_a_parent_with_its_running_child(baton):
    await baton.started(
        baton.spawn_executor(), baton.spawn_worker("solo", BATON__WORKER__MAX_INLINE_SLEEP="0.2")
    )
    path = await _path(baton)
    client = await baton.client()
    nobody = await client.submit("nobody.serves", {}, watch=True)  # fails at intake: unknown action
    assert nobody.status == "failed"
    with pytest.raises(ValueError, match="it is failed"):
        await client.cancel(nobody.execution_id)

    sleeping = await client.submit("tests.sleeper", {"path": str(path), "seconds": 60.0}, watch=True)
    await baton.wait_status(sleeping.execution_id, "sleeping")
    await client.cancel(sleeping.execution_id)
    assert (await client.wait(sleeping.execution_id, 20))["status"] == "cancelled"

    parent = await client.submit("tests.parent", {"path": str(path), "cmd": ["sleep", "60"]}, watch=True)
    await baton.wait_status(parent.execution_id, "waiting")
    child_id = (await baton.execution(parent.execution_id))["waiting_on"]
    await baton.wait_status(child_id, "running")
    cancelled = await client.cancel(parent.execution_id)
    assert {c["id"] for c in cancelled} == {str(parent.execution_id), str(child_id)}
    assert (await baton.wait_status(child_id, "cancelled"))["status"] == "cancelled"
    assert (await client.wait(parent.execution_id, 20))["status"] == "cancelled"


async def test_pause_at_the_next_step_boundary_then_resume(baton):
    await baton.started(
        baton.spawn_executor(),
        baton.spawn_worker("solo", concurrency=1, BATON__WORKER__MAX_INLINE_SLEEP="0.2"),
    )
    path = await _path(baton)
    client = await baton.client()
    submission = await client.submit("tests.steps_then_long", {"path": str(path), "steps": 2, "seconds": 1.0}, watch=True)
    await _lines(path, "long.start")
    assert await client.pause(submission.execution_id) == "running"  # pausing at the boundary
    paused = await baton.wait_status(submission.execution_id, "paused")
    assert paused["pause_requested"] is False
    # A paused run holds no slot: the only slot takes other work.
    assert (await client.run("core.echo", {"message": "meanwhile"}, wait_timeout_s=10))["status"] == "completed"
    assert await client.resume(submission.execution_id) == "requested"
    done = await client.wait(submission.execution_id, 20)
    assert done["status"] == "completed"
    assert [_count(path, s) for s in ("s0", "s1", "long")] == [1, 1, 1]
    kinds = [e["type"] for e in done["events"]]
    assert "execution.pause_requested" in kinds and "execution.resumed" in kinds and "workflow.resumed" in kinds

    # Pausing one that holds no worker takes effect at once, and resuming it keeps its timer.
    sleeping = await client.submit("tests.sleeper", {"path": str(path), "seconds": 40.0}, watch=True)
    before = await baton.wait_status(sleeping.execution_id, "sleeping")
    assert await client.pause(sleeping.execution_id) == "paused"
    assert (await baton.execution(sleeping.execution_id))["status"] == "paused"
    assert await client.resume(sleeping.execution_id) == "requested"
    after = await baton.wait_status(sleeping.execution_id, "sleeping")
    assert after["wake_at"] == before["wake_at"]
    # A transient run cannot pause.
    plain = await client.submit("core.sleep", {"seconds": 5}, watch=True)
    with pytest.raises(ValueError, match="not a durable workflow"):
        await client.pause(plain.execution_id)


async def test_retry_failed_and_cancelled_durable_runs_from_their_checkpoint(baton):
    await baton.started(baton.spawn_executor(), baton.spawn_worker("solo", concurrency=2))
    path = await _path(baton)
    Path(str(path) + ".fail").write_text("")
    client = await baton.client()
    failed = await client.run("tests.fails_at_step", {"path": str(path)}, wait_timeout_s=20)
    assert failed["status"] == "failed" and "told to fail" in failed["error"]["error"]
    Path(str(path) + ".fail").unlink()
    assert str(await client.retry(str(failed["id"])[:8])) == failed["id"]  # an id prefix will do
    done = await client.wait(failed["id"], 20)
    assert done["status"] == "completed" and done["result"] == "done"
    assert _count(path, "ok") == 1 and _count(path, "after") == 1
    retried = next(e for e in done["events"] if e["type"] == "execution.retried")
    assert retried["data"]["steps_kept"] == 1

    other = await _path(baton, "other")
    running = await client.submit("tests.steps_then_long", {"path": str(other), "steps": 2, "seconds": 30.0}, watch=True)
    await _lines(other, "long.start")
    await client.cancel(running.execution_id)
    assert (await client.wait(running.execution_id, 20))["status"] == "cancelled"
    await client.retry(running.execution_id)
    # The cancelled step runs again; the completed ones do not. (It is long: cancel it once more.)
    await _lines(other, "long.start", 2)
    assert _count(other, "s0") == 1 and _count(other, "s1") == 1
    await client.cancel(running.execution_id)

    transient = await client.run("tests.fail", {"message": "once"}, wait_timeout_s=20)
    new_id = await client.retry(transient["id"])
    assert str(new_id) != transient["id"]
    rerun = await client.wait(new_id, 20)
    assert rerun["status"] == "failed" and rerun["retry_of"] == transient["id"]


# -- recovery from the other causes of interruption ------------------------------------------------


async def test_drain_deadline_and_same_name_restart_resume_from_the_last_step(baton):
    _, draining = await baton.started(
        baton.spawn_executor(),
        baton.spawn_worker("wf-drain", concurrency=2, BATON__WORKER__SHUTDOWN_TIMEOUT="0.3"),
    )
    path = await _path(baton)
    client = await baton.client()
    submission = await client.submit("tests.steps_then_long", {"path": str(path), "steps": 2, "seconds": 3.0}, watch=True)
    await _lines(path, "long.start")
    draining.signal(signal.SIGTERM)  # the long step outlasts the drain deadline: interrupted, "signal"
    assert draining.wait(20) == 0
    # Started after the drain, so that the long step cannot end on its own while this one boots.
    await baton.start_worker("wf-other", concurrency=2)
    done = await client.wait(submission.execution_id, 30)
    assert done["status"] == "completed" and done["worker"] == "wf-other"
    [interrupted] = _interrupted(await _events(baton, submission.execution_id))
    assert interrupted["reason"] == "signal" and interrupted["worker_id"] == "wf-drain"
    assert [_count(path, s) for s in ("s0", "s1", "long.start")] == [1, 1, 2]

    # A worker killed and started again at once under its own name finds its run left behind and
    # hands it to recovery before the sweeper has noticed anything; it resumes, on either worker.
    other = await _path(baton, "other")
    again = await client.submit("tests.steps_then_long", {"path": str(other), "steps": 2, "seconds": 3.0}, watch=True)
    await _lines(other, "long.start")
    row = await baton.wait_status(again.execution_id, "running")
    victim = next(s for s in reversed(baton.services) if s.name == row["worker"])
    victim.signal(signal.SIGKILL)
    victim.wait()
    await baton.start_worker(row["worker"], concurrency=2)
    done = await client.wait(again.execution_id, 30)
    assert done["status"] == "completed" and done["recovery_attempts"] == 1
    assert [_count(other, s) for s in ("s0", "s1")] == [1, 1]


async def test_a_retried_run_starts_a_new_child_where_the_old_one_failed(baton):
    await baton.started(baton.spawn_executor(), baton.spawn_worker("py", runtimes="python"))
    await baton.start_worker("sh", runtimes="shell")
    path = await _path(baton)
    marker = baton.tmp / "may-pass"
    client = await baton.client()
    cmd = ["bash", "-c", f"test -e {marker}"]
    failed = await client.run("tests.parent", {"path": str(path), "cmd": cmd}, wait_timeout_s=30)
    assert failed["status"] == "failed" and "ended failed" in failed["error"]["error"]
    marker.write_text("")
    await client.retry(failed["id"])
    done = await client.wait(failed["id"], 30)
    assert done["status"] == "completed", done["error"]
    children = await (await baton.pool()).fetch(
        "SELECT status FROM executions WHERE parent_id = $1 ORDER BY created_at", uuid.UUID(failed["id"])
    )
    assert [c["status"] for c in children] == ["failed", "completed"]
    assert _count(path, "before") == 1 and _count(path, "after") == 1


async def test_a_signal_take_tried_again_after_its_commit_finds_what_it_took(baton):
    """The take of a signal commits with its step's checkpoint; if the commit's reply is lost, the
    journal tries the take again. That try finds the signal this step already took: it neither
    reports none (the run would wait for a signal it had consumed) nor takes the next one."""
    from types import SimpleNamespace

    from common.schemas import Assignment
    from worker.durable import PgJournal
    from worker.journal import StepWrite

    pool = await baton.pool()
    execution_id, incarnation = uuid.uuid4(), uuid.uuid4()
    await pool.execute(
        "INSERT INTO executions (id, action_ref, status, attempt, worker, incarnation) "
        "VALUES ($1, 'tests.waits_for_signal', 'running', 1, 'w1', $2)",
        execution_id, incarnation,
    )
    for data in ({"n": 1}, {"n": 2}):
        await pool.execute(
            "INSERT INTO workflow_signals (execution_id, name, data) VALUES ($1, 'go', $2)", execution_id, data
        )
    journal = PgJournal(
        SimpleNamespace(pool=pool, name="w1", incarnation=incarnation),  # type: ignore[arg-type]
        Assignment(execution_id=execution_id, attempt=1, action_ref="tests.waits_for_signal", parameters={}),
    )
    write = StepWrite(1, "signal:go", "completed", "signal.received", {"step": 1, "signal": "go"})
    assert await journal.take_signal(write) == (True, {"n": 1})
    assert await journal.take_signal(write) == (True, {"n": 1})  # the same take, tried again
    rows = await pool.fetch("SELECT data, consumed_by FROM workflow_signals WHERE execution_id = $1 ORDER BY id", execution_id)
    assert [(r["data"], r["consumed_by"]) for r in rows] == [({"n": 1}, 1), ({"n": 2}, None)]
    step = await pool.fetchrow("SELECT status, result FROM workflow_steps WHERE execution_id = $1 AND step_id = 1", execution_id)
    assert step["status"] == "completed" and step["result"] == {"n": 1}


async def test_a_waiting_run_whose_wake_up_was_missed_is_caught_by_the_backstop(baton):
    """Runs left waiting for a child that has finished, or a signal that has arrived, which the
    trigger or the signal query did not wake (rows written so by hand; the suspension's locks keep
    Baton's own paths from it): the timers loop's backstop puts them back in line within a few
    fallback intervals, and says so."""
    pool = await baton.pool()
    child, on_child, on_signal = uuid.uuid4(), uuid.uuid4(), uuid.uuid4()
    await pool.execute("INSERT INTO executions (id, action_ref, status) VALUES ($1, 'core.noop', 'completed')", child)
    await pool.execute(
        "INSERT INTO executions (id, action_ref, status, waiting_on) VALUES ($1, 'nobody.serves', 'waiting', $2)",
        on_child, child,
    )
    await pool.execute(
        "INSERT INTO executions (id, action_ref, status, waiting_for) VALUES ($1, 'nobody.serves', 'waiting', 'go')",
        on_signal,
    )
    await pool.execute("INSERT INTO workflow_signals (execution_id, name, data) VALUES ($1, 'go', '{}')", on_signal)
    executor = await baton.start_executor(BATON__EXECUTOR__SWEEP_INTERVAL="0.2")

    async def woken() -> bool:
        rows = await pool.fetch(
            "SELECT execution_id, data FROM execution_events WHERE type = 'execution.woken' AND execution_id = ANY($1)",
            [on_child, on_signal],
        )
        return {(r["execution_id"], r["data"]["reason"]) for r in rows} == {(on_child, "ready"), (on_signal, "ready")}

    await wait_until(woken, what="both waiting runs woken by the backstop")

    async def said() -> bool:  # logged just after the wake-up commits
        return {e["execution_id"] for e in executor.events("execution_woken_late")} == {str(on_child), str(on_signal)}

    await wait_until(said, what="the late wake-ups to be logged")


@pytest.mark.parametrize("via", ["child", "signal"])
async def test_a_wake_up_under_way_while_the_run_suspends_is_not_missed(baton, via):
    """A child finishing, or a signal arriving, in a transaction not yet committed while the run
    records that it waits for it: the finish found the run still running and woke nothing, and the
    suspension's snapshot did not see the finish, so the run once stayed `waiting` until the
    timers' backstop. The suspension now waits for that transaction and goes straight back in line."""
    from common.queries import workflows as wq
    from worker.durable import suspend_run
    from worker.journal import Suspend

    pool = await baton.pool()
    incarnation, parent, child = uuid.uuid4(), uuid.uuid4(), uuid.uuid4()
    await pool.execute(
        "INSERT INTO workers (name, status, runtimes, actions, max_concurrent_tasks, heartbeat_interval_s, "
        "last_heartbeat, incarnation) VALUES ('w1', 'active', '{python}', '{pack.flow}', 2, 0.2, now(), $1)",
        incarnation,
    )
    await pool.execute(
        "INSERT INTO actions (ref, runtime, parameters_schema, durable) VALUES ('pack.flow', 'python', '{}', true)"
    )
    await pool.execute(
        "INSERT INTO executions (id, action_ref, status, attempt, worker, incarnation) "
        "VALUES ($1, 'pack.flow', 'running', 1, 'w1', $2)", parent, incarnation,
    )
    await pool.execute(
        "INSERT INTO executions (id, action_ref, status, attempt, worker, incarnation, parent_id) "
        "VALUES ($1, 'core.noop', 'running', 1, 'w1', $2, $3)", child, incarnation, parent,
    )
    other = await pool.acquire()
    try:
        under_way = other.transaction()
        await under_way.start()
        if via == "child":
            await other.execute("UPDATE executions SET status = 'completed' WHERE id = $1", child)
            suspension = Suspend("waiting", child_id=child)
        else:
            assert (await other.fetchrow(wq.SIGNAL, parent, "go", None))["wakes"] is False
            suspension = Suspend("waiting", signal="go")
        suspending = asyncio.create_task(suspend_run(pool, (parent, 1, "w1", incarnation), suspension))

        async def blocked_or_done() -> bool:
            # Not on `other`: in a transaction, pg_stat_activity is read once and kept.
            waiting = await pool.fetchval(
                "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() AND wait_event_type = 'Lock'"
            )
            return suspending.done() or waiting > 0

        await wait_until(blocked_or_done, what="the suspension to wait for the transaction under way")
        await under_way.commit()
    finally:
        await pool.release(other)
    assert await asyncio.wait_for(suspending, 10) == "requested"
    assert (await baton.execution(parent))["status"] == "requested"


async def test_a_cancel_aborted_by_a_deadlock_tries_again(baton):
    """A cancel locks the run, then updates its tree; a run suspending at that moment locks its row
    and then its child's. Their locks can cross, and PostgreSQL then aborts one of the two. Here the
    other side holds the child and then asks for the run, after the cancel began waiting for the
    child, so the cancel is the one aborted: it tries again, and the tree is cancelled."""
    import asyncpg

    pool = await baton.pool()
    client = await baton.client()

    async def cross() -> tuple[uuid.UUID, uuid.UUID, asyncio.Task] | None:
        """One try; None if the machine stalled past the cancel's deadlock check (the other side
        was then the one aborted, and nothing was shown)."""
        parent, child = uuid.uuid4(), uuid.uuid4()
        await pool.execute("INSERT INTO executions (id, action_ref, status) VALUES ($1, 'nobody.serves', 'waiting')", parent)
        await pool.execute(
            "INSERT INTO executions (id, action_ref, status, parent_id) VALUES ($1, 'nobody.serves', 'requested', $2)",
            child, parent,
        )
        crossing = await pool.acquire()
        try:
            held = crossing.transaction()
            await held.start()
            await crossing.execute("SET LOCAL deadlock_timeout = '20s'")  # the cancel (1 s) checks first
            await crossing.execute("SELECT id FROM executions WHERE id = $1 FOR UPDATE", child)
            cancelling = asyncio.create_task(client.cancel(parent))

            async def cancel_waits() -> bool:
                return bool(await pool.fetchval(
                    "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() AND wait_event_type = 'Lock'"
                ))

            await wait_until(cancel_waits, what="the cancel to wait for the child's row")
            try:  # closes the cycle, within the cancel's deadlock_timeout unless the machine stalls
                await crossing.execute("SELECT id FROM executions WHERE id = $1 FOR UPDATE", parent)
            except asyncpg.exceptions.DeadlockDetectedError:
                await cancelling
                return None
            finally:
                await held.rollback()
        finally:
            await pool.release(crossing)
        return parent, child, cancelling

    for _ in range(3):
        crossed = await cross()
        if crossed is not None:
            break
    assert crossed is not None, "the cancel's deadlock check never came first in three tries"
    parent, child, cancelling = crossed
    cancelled = await asyncio.wait_for(cancelling, 20)
    assert {c["id"] for c in cancelled} == {str(parent), str(child)}
    for execution_id in (parent, child):
        assert (await baton.execution(execution_id))["status"] == "cancelled"

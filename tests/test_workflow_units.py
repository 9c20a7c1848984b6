"""Replay, step identity, timers, the store and recovery policy of workflows, without services: the
workflow runs against a journal kept in memory, and is replayed from what that journal recorded."""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from common.recovery import resolve_policy
from common.settings import RecoverySettings
from common.timeline import describe, timeline
from worker.context import WorkflowContext, bind, unbind
from worker.journal import ChildState, Recorded, StepFailed, StepWrite, Suspend
from worker.registry import registered
from worker.replay import (
    NonDeterminismError,
    Replay,
    StepRecord,
    backoff_delay_s,
    remaining_attempts,
    timer_decision,
)
from worker.workflow import step, workflow


@dataclass
class MemoryJournal:
    """Records like PgJournal does, in memory: the last write per step is its checkpoint."""

    durable: bool = True
    rows: dict[int, StepRecord] = field(default_factory=dict)
    events: list[str] = field(default_factory=list)
    children: dict[uuid.UUID, ChildState] = field(default_factory=dict)
    signals: dict[str, list[Any]] = field(default_factory=dict)
    pause: bool = False

    async def record(self, w: StepWrite) -> Recorded:
        old = self.rows.get(w.step_id)
        wake = old.wake_at_s if old and old.wake_at_s is not None else (
            time.time() + w.wake_in_s if w.wake_in_s is not None else None
        )
        child = old.child_id if old and old.child_id else w.child_id
        self.rows[w.step_id] = StepRecord(
            w.step_id, w.name, w.status, w.result, w.error, w.store_delta, w.attempts, child, wake
        )
        self.events.append(w.event)
        return Recorded(self.pause, wake)

    async def start_child(self, w: StepWrite, action_ref: str, parameters: dict[str, Any], timeout_s: float | None) -> bool:
        if action_ref == "nobody.serves":
            return False
        await self.record(w)
        assert w.child_id is not None
        self.children.setdefault(w.child_id, ChildState("requested", None, None))
        return True

    async def child(self, child_id: uuid.UUID) -> ChildState | None:
        return self.children.get(child_id)

    async def take_signal(self, w: StepWrite) -> tuple[bool, Any]:
        queue = self.signals.get(w.data["signal"]) or []
        if not queue:
            return False, None
        data = queue.pop(0)
        await self.record(StepWrite(w.step_id, w.name, "completed", w.event, w.data, result=data, store_delta=w.store_delta))
        return True, data

    def replay(self) -> Replay:
        return Replay.of(list(self.rows.values()))


@contextlib.contextmanager
def bound() -> Iterator[WorkflowContext]:
    """A fresh run's context, bound as a workflow's steps see it, for a test that drives it itself."""
    ctx = WorkflowContext(execution_id=str(uuid.uuid4()), attempt=1, recovery_attempts=0, journal=MemoryJournal(),
                          replay=Replay(), max_inline_sleep_s=30)
    token = bind(ctx)
    try:
        yield ctx
    finally:
        unbind(token)


async def run(fn: Any, journal: MemoryJournal, *, max_inline_sleep_s: float = 30.0, **kwargs: Any) -> Any:
    ctx = WorkflowContext(
        execution_id=str(uuid.uuid4()), attempt=1, recovery_attempts=0, journal=journal, replay=journal.replay(),
        max_inline_sleep_s=max_inline_sleep_s,
    )
    token = bind(ctx)
    try:
        result = await fn(ctx, **kwargs)
        ctx._replay.check_finished(ctx.steps_called)
        return result
    finally:
        ctx.closed = True
        unbind(token)


calls: list[str] = []


@step
async def record_call(label: str, delay_s: float = 0.0) -> str:
    calls.append(label)
    await asyncio.sleep(delay_s)
    return label


@step(name="renamed")
def sync_step(x: int) -> int:
    calls.append(f"sync{x}")
    return x * 2


@pytest.fixture(autouse=True)
def _clear_calls():
    calls.clear()


async def test_completed_steps_replay_without_running():
    async def wf(ctx):
        a = await record_call("a")
        b = await sync_step(2)
        return [a, b]

    journal = MemoryJournal()
    assert await run(wf, journal) == ["a", 4]
    assert calls == ["a", "sync2"]
    assert [(r.step_id, r.name, r.status) for r in journal.rows.values()] == [
        (1, "record_call", "completed"), (2, "renamed", "completed")
    ]
    calls.clear()
    assert await run(wf, journal) == ["a", 4]
    assert calls == []  # recorded: returned without running


async def test_a_step_that_did_not_complete_runs_again():
    async def wf(ctx):
        await record_call("a")
        await record_call("b")
        return "done"

    journal = MemoryJournal()
    await run(wf, journal)
    del journal.rows[2]  # the crash struck while step 2 ran
    calls.clear()
    await run(wf, journal)
    assert calls == ["b"]


async def test_identical_calls_are_two_steps():
    async def wf(ctx):
        return [await record_call("same"), await record_call("same")]

    journal = MemoryJournal()
    await run(wf, journal)
    assert calls == ["same", "same"] and sorted(journal.rows) == [1, 2]


async def test_gathered_steps_number_in_call_order_not_completion_order():
    async def wf(ctx):
        return await asyncio.gather(record_call("slow", 0.05), record_call("fast"))

    journal = MemoryJournal()
    await run(wf, journal)
    assert calls == ["slow", "fast"] or calls == ["fast", "slow"]
    assert {i: r.result for i, r in journal.rows.items()} == {1: "slow", 2: "fast"}


@settings(max_examples=40, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(["p", "q", "r"]), st.floats(0, 0.003)), min_size=1, max_size=6))
def test_step_identity_does_not_depend_on_timing(branches):
    """Whatever order the gathered steps finish in, each position holds the step written there."""

    async def wf(ctx):
        return await asyncio.gather(*(record_call(label, delay) for label, delay in branches))

    journal = MemoryJournal()
    result = asyncio.run(run(wf, journal))
    assert result == [label for label, _ in branches]
    assert [journal.rows[i + 1].result for i in range(len(branches))] == [label for label, _ in branches]


async def test_a_different_step_at_a_recorded_position_is_non_determinism():
    async def before(ctx):
        await record_call("a")

    async def after(ctx):
        await sync_step(1)

    journal = MemoryJournal()
    await run(before, journal)
    with pytest.raises(NonDeterminismError, match=r"'record_call'.*'renamed'"):
        await run(after, journal)
    assert calls == ["a"]  # the new step was neither run nor handed the old result


async def test_code_that_stops_before_its_recorded_steps_is_non_determinism():
    async def long(ctx):
        await record_call("a")
        await record_call("b")

    async def short(ctx):
        await record_call("a")

    journal = MemoryJournal()
    await run(long, journal)
    with pytest.raises(NonDeterminismError, match="step 2"):
        await run(short, journal)


async def test_store_is_restored_as_of_each_step():
    async def wf(ctx):
        await ctx.store.set("n", (await ctx.store.get("n", 0)) + 1)
        await record_call("a")
        seen = await ctx.store.get("n")
        await ctx.store.set("n", seen + 10)
        await record_call("b")
        return await ctx.store.get("n")

    journal = MemoryJournal()
    assert await run(wf, journal) == 11
    assert journal.rows[1].store_delta == {"n": 1} and journal.rows[2].store_delta == {"n": 11}
    assert await run(wf, journal) == 11  # not 12, not 22


async def test_store_values_must_be_json():
    async def wf(ctx):
        await ctx.store.set("bad", object())

    with pytest.raises(TypeError, match="must be a JSON value"):
        await run(wf, MemoryJournal())


async def test_steps_outside_a_workflow_and_inside_a_step_are_plain_calls():
    assert sync_step(3) == 6  # no workflow: a plain call, not a coroutine

    @step
    async def outer() -> int:
        return sync_step(5)  # inside a step: plain too, and takes no step identity

    assert await outer() == 10

    async def wf(ctx):
        return await outer()

    journal = MemoryJournal()
    assert await run(wf, journal) == 10
    assert sorted(journal.rows) == [1]


flaky_failures = {"left": 0}


@step(retries=2, retry_delay_s=0.0)
async def flaky() -> str:
    if flaky_failures["left"] > 0:
        flaky_failures["left"] -= 1
        raise RuntimeError("not yet")
    return "ok"


async def test_step_retries_are_recorded_and_exhaustion_fails_for_good():
    async def wf(ctx):
        return await flaky()

    flaky_failures["left"] = 2
    journal = MemoryJournal()
    assert await run(wf, journal) == "ok"
    assert journal.events == ["step.retrying", "step.retrying", "step.completed"]
    assert journal.rows[1].attempts == 3

    flaky_failures["left"] = 3
    journal = MemoryJournal()
    with pytest.raises(StepFailed, match="failed after 3 attempts: RuntimeError: not yet"):
        await run(wf, journal)
    assert journal.rows[1].status == "failed"
    flaky_failures["left"] = 0
    with pytest.raises(StepFailed):  # a recorded failure is replayed as a failure, not retried
        await run(wf, journal)


def test_remaining_attempts_after_a_crash_mid_retries():
    assert remaining_attempts(2, 1) == 3
    assert remaining_attempts(2, 2) == 2  # attempt 1 failed; attempt 2 was under way: 2 and 3 remain
    assert remaining_attempts(2, 3) == 1
    assert remaining_attempts(0, 5) == 1


def test_retry_delays_grow_exponentially_with_jitter():
    assert backoff_delay_s(1.0, 2.0, 1, 0.0) == 1.0
    assert backoff_delay_s(1.0, 2.0, 3, 0.0) == 4.0
    assert 4.0 <= backoff_delay_s(1.0, 2.0, 3, 0.99) < 6.0
    assert backoff_delay_s(1.0, 10.0, 50, 0.0) == 3600.0


def test_timer_decisions():
    assert timer_decision(-1, 30) == "done"
    assert timer_decision(0, 30) == "done"
    assert timer_decision(5, 30) == "inline"
    assert timer_decision(31, 30) == "suspend"


async def test_long_sleep_suspends_with_its_recorded_wake_up_time_and_short_one_waits():
    async def wf(ctx, seconds):
        await ctx.sleep(seconds)
        return "woke"

    journal = MemoryJournal()
    with pytest.raises(Suspend) as caught:
        await run(wf, journal, max_inline_sleep_s=1.0, seconds=60)
    assert caught.value.status == "sleeping"
    wake = journal.rows[1].wake_at_s
    assert caught.value.wake_at_s == wake and wake > time.time() + 55
    with pytest.raises(Suspend) as again:  # replayed: the same wake-up time, not a new one
        await run(wf, journal, max_inline_sleep_s=1.0, seconds=60)
    assert again.value.wake_at_s == wake
    journal.rows[1] = StepRecord(1, "sleep", "pending", wake_at_s=time.time() - 1)  # now due
    assert await run(wf, journal, max_inline_sleep_s=1.0, seconds=60) == "woke"
    assert journal.rows[1].status == "completed"


async def test_children_and_signals_suspend_until_they_are_there():
    async def wf(ctx):
        child = await ctx.run("pack.action", {"x": 1})
        approval = await ctx.wait_for_signal("ok")
        return [child, approval]

    journal = MemoryJournal()
    with pytest.raises(Suspend) as caught:
        await run(wf, journal)
    assert caught.value.status == "waiting" and caught.value.child_id == journal.rows[1].child_id
    journal.children[caught.value.child_id] = ChildState("completed", {"r": 1}, None)
    with pytest.raises(Suspend) as waiting:
        await run(wf, journal)
    assert waiting.value.signal == "ok"
    journal.signals["ok"] = [{"by": "ann"}]
    assert await run(wf, journal) == [{"r": 1}, {"by": "ann"}]


async def test_a_failed_child_and_an_unknown_action_fail_the_step():
    async def wf(ctx, ref):
        return await ctx.run(ref)

    with pytest.raises(StepFailed, match="unknown action"):
        await run(wf, MemoryJournal(), ref="nobody.serves")
    journal = MemoryJournal()
    with pytest.raises(Suspend) as caught:
        await run(wf, journal, ref="pack.action")
    journal.children[caught.value.child_id] = ChildState("failed", None, {"error": "exit 3"})
    with pytest.raises(StepFailed, match="ended failed: exit 3"):
        await run(wf, journal, ref="pack.action")


async def test_pause_is_taken_at_the_next_step_boundary():
    async def wf(ctx):
        await record_call("a")
        await record_call("b")

    journal = MemoryJournal(pause=True)
    with pytest.raises(Suspend) as caught:
        await run(wf, journal)
    assert caught.value.status == "paused" and calls == ["a"]


async def test_transient_workflows_record_nothing_and_refuse_children():
    from worker.journal import TransientJournal

    async def wf(ctx):
        await record_call("a")
        await ctx.sleep(0.01)
        return await ctx.run("pack.action")

    ctx = WorkflowContext(execution_id=str(uuid.uuid4()), attempt=1, recovery_attempts=0, journal=TransientJournal(),
                          replay=Replay(), max_inline_sleep_s=30)
    token = bind(ctx)
    try:
        with pytest.raises(TypeError, match="needs a durable workflow"):
            await wf(ctx)
    finally:
        unbind(token)
    assert calls == ["a"]


def test_workflow_registration_and_recovery_policy_resolution():
    @workflow("units.flow", durable=True, max_recovery_attempts=7, timeout_s=60)
    async def flow(ctx, order_id: str, count: int = 1) -> None: ...

    entry = registered()["units.flow"]
    assert entry.workflow is not None and entry.spec.durable
    assert set(entry.spec.parameters_schema["properties"]) == {"order_id", "count"}
    assert entry.spec.parameters_schema["required"] == ["order_id"]
    policy = resolve_policy(entry.spec, RecoverySettings(max_recovery_attempts=2))
    assert policy.recover_on_worker_loss is True and policy.max_recovery_attempts == 7  # decorator wins
    transient = resolve_policy(entry.spec.model_copy(update={"durable": False, "max_recovery_attempts": None}),
                               RecoverySettings(max_recovery_attempts=2))
    assert transient.recover_on_worker_loss is False and transient.max_recovery_attempts == 2  # then YAML
    with pytest.raises(TypeError, match="async function"):
        workflow("units.sync")(lambda ctx: None)


def test_timeline_describes_events():
    assert describe("step.completed", {"step": 2, "name": "charge", "duration_ms": 1.5, "attempts": 1}) == (
        "step 2 charge in 1.5 ms"
    )
    text = describe("workflow.interrupted", {
        "reason": "worker_lost", "worker_id": "w1", "error": "gone", "recoverable": True, "recovery_attempt": 1,
        "last_event_sequence": 7,
    })
    assert "worker_lost on w1" in text and "recovery attempt 1" in text
    rows = timeline([
        {"seq": 1, "type": "execution.requested", "data": {}, "created_at": "2026-01-01T00:00:00+00:00"},
        {"seq": 2, "type": "execution.woken", "data": {"reason": "timer"}, "created_at": "2026-01-01T00:00:01.5+00:00"},
    ])
    assert rows[1] == ("2", "+1.500s", "execution.woken", "back in line (timer)")


async def test_a_failure_in_a_gather_stops_its_sibling_steps():
    @step
    async def boom() -> None:
        raise RuntimeError("kaput")

    @step
    async def slow() -> None:
        await asyncio.sleep(30)
        calls.append("slow finished")

    async def wf(ctx):
        await asyncio.gather(slow(), boom())

    with bound() as ctx:
        with pytest.raises(StepFailed, match="kaput"):
            await wf(ctx)
        assert ctx._in_flight  # the sibling still runs ...
        await asyncio.wait_for(ctx.stop_in_flight(), 5)  # ... until the driver stops it, at once
        assert not ctx._in_flight and calls == []


async def test_a_step_waiting_to_retry_in_a_gather_stops_when_the_run_ends_here():
    """A sibling between two attempts (in its retry delay) when the run fails or suspends: the
    driver stops it there, and no attempt starts once the run has left this worker."""

    @step(retries=3, retry_delay_s=0.2, backoff=1.0)
    async def flaky() -> None:
        calls.append("flaky")
        raise RuntimeError("again")

    @step
    async def ends_the_run() -> None:
        await asyncio.sleep(0.05)  # flaky is in its retry delay by now
        raise RuntimeError("kaput")

    async def wf(ctx):
        await asyncio.gather(flaky(), ends_the_run())

    with bound() as ctx:
        with pytest.raises(StepFailed, match="kaput"):
            await wf(ctx)
        ctx.closed = True  # as the driver does (worker.durable)
        assert ctx._in_flight  # flaky, waiting to try again ...
        await asyncio.wait_for(ctx.stop_in_flight(), 5)  # ... is stopped at once
        assert not ctx._in_flight
        await asyncio.sleep(0.4)  # past its retry delay
        assert calls == ["flaky"]


async def test_ctx_run_takes_an_object_of_parameters_only():
    async def wf(ctx, parameters):
        return await ctx.run("pack.action", parameters)

    for parameters in (["a"], "text", 3):
        journal = MemoryJournal()
        with pytest.raises(TypeError, match=r"must be an object \(a dict\)"):
            await run(wf, journal, parameters=parameters)
        assert journal.children == {}  # nothing was started

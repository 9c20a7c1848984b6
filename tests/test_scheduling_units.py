"""Pure parts of retries, delays, schedules and concurrency limits."""

from __future__ import annotations

import datetime as dt
import json
import uuid

import pytest

from common import schedules
from common.actions import ActionSpec
from common.schemas import Assignment
from executor.placement import Candidate, concurrency_room, limited_room, place
from executor.requests import NewExecution, parse_message
from worker.registry import RegisteredAction
from worker.runner import Outcome, with_retry

T0 = dt.datetime(2026, 11, 30, 12, 0, tzinfo=dt.UTC)


def test_next_due_time_in_the_schedules_zone():
    assert schedules.next_after("0 9 * * *", "UTC", T0) == dt.datetime(2026, 12, 1, 9, 0, tzinfo=dt.UTC)
    # 09:00 in Paris is 08:00 UTC in winter.
    assert schedules.next_after("0 9 * * *", "Europe/Paris", T0) == dt.datetime(2026, 12, 1, 8, 0, tzinfo=dt.UTC)
    assert schedules.next_after("* * * * * */10", "UTC", T0) == T0 + dt.timedelta(seconds=10)


@pytest.mark.parametrize(
    ("catch_up", "fired"),
    [("all", [T0 + dt.timedelta(minutes=i) for i in range(6)]), ("latest", [T0 + dt.timedelta(minutes=4), T0 + dt.timedelta(minutes=5)]),
     ("none", [T0 + dt.timedelta(minutes=5)])],
)
def test_catch_up_policies(catch_up, fired):
    # Due every minute since T0; now is 5 min 30 s later; the grace is 60 s: 12:05 is on time,
    # 12:00 to 12:04 were missed.
    now = T0 + dt.timedelta(minutes=5, seconds=30)
    times, nxt, skipped = schedules.due_times("* * * * *", "UTC", T0, now, catch_up, 60)
    assert times == fired
    assert nxt == T0 + dt.timedelta(minutes=6)
    assert skipped == 6 - len(fired)


def test_on_time_due_times_always_fire_and_catch_up_is_bounded():
    now = T0 + dt.timedelta(seconds=2.5)
    times, _, _ = schedules.due_times("* * * * * *", "UTC", T0, now, "none", 5)
    assert times == [T0, T0 + dt.timedelta(seconds=1), T0 + dt.timedelta(seconds=2)]
    long_ago = T0 - dt.timedelta(days=30)
    times, nxt, skipped = schedules.due_times("* * * * *", "UTC", long_ago, T0, "all", 60)
    # The latest MAX_CATCH_UP missed ones, then the two on time (12:59 and 12:00 are within 60 s).
    assert len(times) == schedules.MAX_CATCH_UP + 2 and times[-1] == T0 and skipped >= 1
    assert times[-3] == T0 - dt.timedelta(minutes=2)
    assert nxt == T0 + dt.timedelta(minutes=1)


def test_a_due_time_has_one_execution_id():
    same = schedules.execution_id("nightly", T0)
    assert same == schedules.execution_id("nightly", T0.astimezone(dt.timezone(dt.timedelta(hours=2))))
    assert same != schedules.execution_id("nightly", T0 + dt.timedelta(minutes=1))
    assert same != schedules.execution_id("other", T0)


def test_bad_schedules_are_refused_with_the_reason():
    with pytest.raises(ValueError, match="not a cron expression"):
        schedules.check("61 * * * *", "UTC")
    with pytest.raises(ValueError, match="not a time zone"):
        schedules.check("* * * * *", "Nowhere/Else")


def test_concurrency_caps_in_placement():
    workers = [Candidate("a", frozenset({"x", "y"}), 4, 0), Candidate("b", frozenset({"x", "y"}), 4, 0)]
    caps = concurrency_room({"x": 3}, {"x": 1})
    assert caps == {"x": 2}
    assert limited_room({"x": 8, "y": 8}, caps) == {"x": 2, "y": 8}
    assert limited_room({"x": 8}, {"x": 0}) == {}
    rows = [(i, "x", None) for i in range(5)] + [(10 + i, "y", None) for i in range(3)]
    plan = place(rows, workers, 0, caps)
    assert sum(1 for i in plan if i < 10) == 2 and sum(1 for i in plan if i >= 10) == 3


def _action(retries: int | None) -> RegisteredAction:
    spec = ActionSpec(ref="p.a", runtime="python", parameters_schema={}, retries=retries, retry_delay_s=1.0,
                      retry_backoff=2.0)

    async def invoke(*_: object) -> None: ...

    return RegisteredAction(spec=spec, params_model=object, invoke=invoke)  # type: ignore[arg-type]


def _dispatch(failed_tries: int, max_retries: int | None = None) -> Assignment:
    return Assignment(execution_id=uuid.uuid4(), attempt=1, action_ref="p.a", parameters={},
                      failed_tries=failed_tries, max_retries=max_retries)


def test_retry_decisions():
    failed = Outcome("failed", error={"error": "RuntimeError: boom"}, retryable=True)
    first = with_retry(failed, _action(2), _dispatch(0), jitter=0.0)
    assert first.retry_in_s == 1.0
    assert with_retry(failed, _action(2), _dispatch(1), jitter=0.0).retry_in_s == 2.0
    last = with_retry(failed, _action(2), _dispatch(2), jitter=0.0)
    assert last.retry_in_s is None and last.error == {"error": "failed after 3 tries: RuntimeError: boom", "tries": 3}
    assert with_retry(failed, _action(2), _dispatch(0, max_retries=0), jitter=0.0).retry_in_s is None
    assert with_retry(failed, _action(None), _dispatch(0, max_retries=1), jitter=0.0).retry_in_s == 1.0
    not_listed = Outcome("failed", error={"error": "ValueError"}, retryable=False)
    assert with_retry(not_listed, _action(2), _dispatch(0), jitter=0.0) is not_listed
    timed_out = Outcome("timeout", error={"error": "late"}, retryable=True)
    assert with_retry(timed_out, _action(2), _dispatch(0), jitter=0.0) is timed_out


def _parse(body: dict) -> NewExecution:
    [parsed] = parse_message(json.dumps(body).encode(), message_id=None, correlation_id=None, max_bytes=10_000)
    return parsed


def test_requests_carry_delays_and_retries():
    ok = _parse({"action_ref": "core.noop", "not_before": "2026-12-01T09:00:00Z", "max_retries": 2})
    assert ok.not_before == dt.datetime(2026, 12, 1, 9, tzinfo=dt.UTC) and ok.max_retries == 2 and ok.error is None
    naive = _parse({"action_ref": "core.noop", "not_before": "2026-12-01T09:00:00"})
    assert "not_before" in naive.error["error"] and "time zone" in naive.error["error"]
    garbage = _parse({"action_ref": "core.noop", "not_before": "tomorrow"})
    assert "RFC 3339" in garbage.error["error"]
    negative = _parse({"action_ref": "core.noop", "max_retries": -1})
    assert "max_retries" in negative.error["error"]

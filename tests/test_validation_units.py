"""One rule decides whether parameters fit an action: the executor (the request's envelope, then
the action's JSON Schema) and the worker (the action's pydantic model, strict JSON mode) must
reach the same decision on every JSON value, or a request is refused that would have run, or
accepted and then failed on the worker."""

# No `from __future__ import annotations` here: `worker.registry.params_model_for` reads the
# signature's annotations as they are, and a string annotation naming something its own module
# does not import (Optional, Point) cannot be resolved there.

import asyncio
import json
import uuid
from decimal import Decimal
from types import SimpleNamespace
from typing import Any, Optional

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from pydantic import BaseModel

from common.actions import ActionSpec
from common.schemas import MAX_PARAMETERS_DEPTH
from executor.requests import (
    NewExecution,
    ParameterValidator,
    Rejection,
    check_action,
    parse_message,
)
from worker.registry import Invocation, RegisteredAction, params_model_for
from worker.runner import execute


class Point(BaseModel):
    x: int
    y: float = 0.0


async def takes_int(n: int): ...
async def takes_float(x: float): ...
async def takes_str(s: str): ...
async def takes_bool(b: bool): ...
async def takes_optional_int(n: Optional[int]): ...  # noqa: UP045 - the spelling under test
async def takes_int_list(xs: list[int]): ...
async def takes_int_dict(d: dict[str, int]): ...
async def takes_defaults(n: int = 5, label: str = "x"): ...
async def takes_kwargs(n: int, **rest): ...
async def takes_model(p: Point): ...
async def takes_anything(v): ...
async def takes_typed(count: int, ratio: float = 0.5, tags: list[str] | None = None): ...


FUNCTIONS = [
    takes_int, takes_float, takes_str, takes_bool, takes_optional_int, takes_int_list, takes_int_dict,
    takes_defaults, takes_kwargs, takes_model, takes_anything, takes_typed,
]


def _registered(func) -> RegisteredAction:
    ref = f"units.{func.__name__}"
    model = params_model_for(ref, func)

    async def invoke(_params: BaseModel, _inv: Invocation) -> None:
        return None

    spec = ActionSpec(ref=ref, runtime="python", parameters_schema=model.model_json_schema())
    return RegisteredAction(spec=spec, params_model=model, invoke=invoke)


ACTIONS = [_registered(f) for f in FUNCTIONS]
NAMES = sorted({name for a in ACTIONS for name in a.params_model.model_fields} | {"extra", "rest"})
VALIDATOR = ParameterValidator()


def executor_accepts(action: RegisteredAction, parameters: dict[str, Any]) -> tuple[bool, Any]:
    """What intake decides for a request carrying these parameters."""
    body = json.dumps({"action_ref": action.spec.ref, "parameters": parameters}).encode()
    parsed = parse_message(body, message_id=None, correlation_id=None, max_bytes=1 << 30)
    assert isinstance(parsed, list), parsed
    [execution] = parsed
    check_action(execution, action.spec, VALIDATOR)
    return execution.error is None, execution.error


def worker_accepts(action: RegisteredAction, parameters: dict[str, Any]) -> tuple[bool, Any]:
    """What the worker decides when it runs the action with these parameters."""
    assignment = SimpleNamespace(
        execution_id=uuid.uuid4(), attempt=1, action_ref=action.spec.ref, parameters=parameters, timeout_s=None
    )
    outcome = asyncio.run(execute(action, assignment, default_timeout_s=10, max_output_bytes=1 << 20))
    refused = outcome.status == "failed" and outcome.error["error"].startswith("invalid parameters")
    assert refused or outcome.status == "completed", outcome
    return not refused, outcome.error


def stored(parameters: dict[str, Any]) -> dict[str, Any]:
    """Parameters as the worker reads them back from PostgreSQL's jsonb: a number keeps its
    digits but not its notation (1e2 comes back as 100, 1.50 as 1.50), as `numeric` prints it."""

    def number(text: str) -> Any:
        return json.loads(format(Decimal(text), "f"))

    return json.loads(json.dumps(parameters), parse_float=number)


scalars = (
    st.none()
    | st.booleans()
    | st.integers()
    | st.integers(min_value=-(10**40), max_value=10**40)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.sampled_from([0.0, -0.0, 3.0, 1e16, 1e300, 2.5, "3", "3.0", "true", "", 10**20])
    | st.text(max_size=20)
)
json_values = st.recursive(
    scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.sampled_from(["x", "y", "a"]) | st.text(max_size=5), inner, max_size=4),
    max_leaves=12,
)
parameters = st.dictionaries(st.sampled_from(NAMES) | st.text(max_size=8), json_values, max_size=5)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(action=st.sampled_from(ACTIONS), params=parameters)
@example(action=ACTIONS[0], params={"n": "3"})  # lax pydantic took it, JSON Schema did not
@example(action=ACTIONS[0], params={"n": 3.0})  # JSON Schema took it, strict pydantic did not
@example(action=ACTIONS[0], params={"n": True})
@example(action=ACTIONS[1], params={"x": 3})
@example(action=ACTIONS[1], params={"x": True})
@example(action=ACTIONS[9], params={"p": {"x": 1, "y": 2}})
@example(action=ACTIONS[9], params={"p": {"x": "1"}})
@example(action=ACTIONS[10], params={"v": json.loads("[" * 150 + "]" * 150)})  # deeper than pydantic parses
@example(action=ACTIONS[10], params={"v": json.loads("[" * (MAX_PARAMETERS_DEPTH - 1) + "]" * (MAX_PARAMETERS_DEPTH - 1))})
@example(action=ACTIONS[10], params={"v": json.loads("[" * MAX_PARAMETERS_DEPTH + "]" * MAX_PARAMETERS_DEPTH)})
def test_executor_and_worker_decide_alike(action, params):
    by_executor, why_executor = executor_accepts(action, params)
    by_worker, why_worker = worker_accepts(action, params)
    assert by_executor == by_worker, (why_executor, why_worker)
    if by_executor:
        # What the worker reads back from the database is still accepted.
        assert worker_accepts(action, stored(params))[0]


@pytest.mark.parametrize(
    ("func", "params", "accepted"),
    [
        (takes_int, {"n": 3}, True),
        (takes_int, {"n": 3.0}, False),
        (takes_int, {"n": "3"}, False),
        (takes_int, {"n": True}, False),
        (takes_float, {"x": 3}, True),
        (takes_float, {"x": "3.5"}, False),
        (takes_optional_int, {"n": None}, True),
        (takes_optional_int, {}, False),
        (takes_defaults, {}, True),
        (takes_kwargs, {"n": 1, "anything": {"at": ["all"]}}, True),
        (takes_int_dict, {"d": {"a": 1, "b": 2.0}}, False),
        (takes_model, {"p": {"x": 1, "y": 2}}, True),
    ],
)
def test_the_rule(func, params, accepted):
    action = ACTIONS[FUNCTIONS.index(func)]
    assert executor_accepts(action, params)[0] is accepted
    assert worker_accepts(action, params)[0] is accepted


# -- the envelope: what fails its checks is never stored ---------------------------------------


def _parse(body: Any) -> Any:
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    parsed = parse_message(raw, message_id="m", correlation_id=None, max_bytes=1 << 20)
    return parsed if isinstance(parsed, Rejection) else parsed[0]


def test_a_field_that_fails_its_checks_is_not_kept():
    key = "k" * 3000  # the unique index on idempotency_key cannot hold it
    failed = _parse({"action_ref": "core.noop", "idempotency_key": key})
    assert failed.status == "failed" and "idempotency_key" in failed.error["error"]
    assert failed.idempotency_key is None and failed.action_ref == "core.noop"
    failed = _parse({"action_ref": "not a ref", "parameters": [1], "idempotency_key": "k1", "timeout_seconds": 2})
    assert (failed.action_ref, failed.parameters, failed.idempotency_key, failed.timeout_s) == (None, {}, "k1", 2.0)
    failed = _parse({"action_ref": "core.echo", "parameters": {"message": "hi"}, "timeout_seconds": "soon"})
    assert failed.parameters == {"message": "hi"} and failed.timeout_s is None
    assert "timeout_seconds" in failed.error["error"]


def test_values_json_has_no_room_for_are_not_json():
    for body in (b'{"action_ref": "core.sleep", "parameters": {"seconds": NaN}}', b'{"timeout_seconds": Infinity}',
                 b'{"action_ref": "core.sleep", "parameters": {"seconds": 1e400}}'):
        rejected = _parse(body)
        assert not isinstance(rejected, NewExecution) and "not JSON" in rejected.reason


def test_parameters_too_deep_for_the_worker_fail_at_intake():
    deep = json.loads("[" * MAX_PARAMETERS_DEPTH + "]" * MAX_PARAMETERS_DEPTH)
    failed = _parse({"action_ref": "core.echo", "parameters": {"message": deep}})
    assert failed.status == "failed" and "nested deeper than" in failed.error["error"] and failed.parameters == {}


def test_the_warnings_of_a_request_stay_small():
    ignored = _parse({"action_ref": "core.noop", **{f"{i:05d}" + "x" * 10_000: i for i in range(100)}})
    assert ignored.status == "requested" and len(json.dumps(ignored.warnings)) < 10_000
    assert ignored.warnings[-1] == "... and 80 more unknown fields ignored"


def test_the_error_of_a_failed_request_stays_small():
    failed = _parse({"action_ref": "core.noop", "parameters": {f"{i:05d}" + "x" * 10_000: i for i in range(100)},
                     "timeout_seconds": [1] * 10_000})
    assert failed.status == "failed" and len(json.dumps(failed.error)) < 10_000

"""Pure logic, no services: settings, request parsing, placement, parameters, timeouts."""

from __future__ import annotations

import json
import uuid

import pytest
from pydantic import ValidationError

from common.actions import CORE_ACTIONS
from common.client import coerce_key_values, request_batches
from common.ids import MAX_BATCH_REQUESTS, batch_execution_id
from common.settings import load_settings
from common.values import parse_duration
from executor.requests import (
    NewExecution,
    ParameterValidator,
    Rejection,
    check_action,
    execution_id_for,
    parse_message,
)
from executor.rescheduling import next_step
from executor.timeout_monitor import scheduled_timeout_error
from worker.registry import params_model_for
from worker.runner import resolve_timeout_s

# -- settings --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "seconds"),
    [(300, 300.0), (0.25, 0.25), ("300", 300.0), ("5m", 300.0), ("250ms", 0.25), ("2h", 7200.0), (" 30s ", 30.0)],
)
def test_durations(raw, seconds):
    assert parse_duration(raw) == seconds


@pytest.mark.parametrize("raw", ["5 minutes", "-1", -1, "1d", True, None, "ms"])
def test_bad_durations(raw):
    with pytest.raises(ValueError):
        parse_duration(raw)


def test_yaml_then_environment(tmp_path, monkeypatch):
    config = tmp_path / "c.yaml"
    config.write_text("executor:\n  scheduled_timeout: 5m\nworker:\n  heartbeat_interval: 250ms\n  queue_ttl: 10\n")
    monkeypatch.setenv("BATON_CONFIG", str(config))
    monkeypatch.setenv("BATON__WORKER__QUEUE_TTL", "7s")
    monkeypatch.setenv("BATON__MESSAGE_QUEUE__PREFIX", "other")
    settings = load_settings()
    assert settings.executor.scheduled_timeout_s == 300
    assert settings.worker.heartbeat_interval_s == 0.25
    assert settings.worker.queue_ttl_ms == 7000
    assert settings.message_queue.prefix == "other"
    assert settings.executor.timeout_check_interval_s == 60  # untouched default


def test_unknown_keys_are_errors(tmp_path, monkeypatch):
    config = tmp_path / "c.yaml"
    config.write_text("worker:\n  heartbeat_intervall: 3\n")
    monkeypatch.setenv("BATON_CONFIG", str(config))
    with pytest.raises(ValidationError, match="heartbeat_intervall"):
        load_settings()
    config.write_text("workers:\n  name: x\n")
    with pytest.raises(ValidationError, match="workers"):
        load_settings()


def test_missing_config_file_named_explicitly_is_an_error(tmp_path, monkeypatch):
    monkeypatch.setenv("BATON_CONFIG", str(tmp_path / "absent.yaml"))
    with pytest.raises(FileNotFoundError):
        load_settings()


def test_shipped_configs_load(monkeypatch):
    import yaml

    from common.settings import Settings
    from tests.harness import REPO

    for name in ("config.yaml", "config.development.yaml", "config.docker.yaml"):
        path = REPO / "config" / name
        monkeypatch.setenv("BATON_CONFIG", str(path))
        # The file named by BATON_CONFIG is the one read (the development and docker files differ
        # from the defaults), and all of it is taken.
        assert load_settings() == Settings(**yaml.safe_load(path.read_text())), name


def test_shipped_default_config_spells_out_every_key():
    """config.yaml is the operator's reference: every settings field appears in it."""
    import yaml

    from common.settings import Settings
    from tests.harness import REPO

    shipped = yaml.safe_load((REPO / "config" / "config.yaml").read_text())
    assert shipped["schedules"] == {}  # a section of named entries, none by default
    for section, field in Settings.model_fields.items():
        if section == "schedules":
            continue
        keys = {f.alias or name for name, f in field.annotation.model_fields.items()}
        assert set(shipped[section]) == keys, section


def test_readme_documents_every_key():
    from common.settings import Settings
    from tests.harness import REPO

    readme = (REPO / "README.md").read_text()
    for key in ("cron", "action_ref", "parameters", "catch_up", "timezone"):
        assert f"`schedules.<name>.{key}`" in readme, key
    documented = _documented_fields(REPO / "common" / "settings.py")
    for section, field in Settings.model_fields.items():
        assert section in documented["Settings"], f"{section} has no docstring"
        if section == "schedules":
            continue
        for name, f in field.annotation.model_fields.items():
            assert f"`{section}.{f.alias or name}`" in readme, f"{section}.{f.alias or name} is not in the README"
            assert name in documented[field.annotation.__name__], f"{section}.{name} has no docstring"


def _documented_fields(path):
    """Class name -> the fields declared in it with a docstring (a string right after the field)."""
    import ast
    import itertools

    documented = {}
    for cls in ast.parse(path.read_text()).body:
        if isinstance(cls, ast.ClassDef):
            body = cls.body
            documented[cls.name] = {
                node.target.id
                for node, after in itertools.pairwise(body)
                if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)
                and isinstance(after, ast.Expr) and isinstance(after.value, ast.Constant) and isinstance(after.value.value, str)
            }
    return documented


# -- requests --------------------------------------------------------------------------------


def _parse(body, message_id=None, max_bytes=10_000):
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    parsed = parse_message(raw, message_id=message_id, correlation_id=None, max_bytes=max_bytes)
    return parsed if isinstance(parsed, Rejection) else parsed[0]


def test_execution_ids():
    known = uuid.uuid4()
    assert execution_id_for(str(known)) == known
    assert execution_id_for("order-1") == execution_id_for("order-1") != execution_id_for("order-2")
    assert execution_id_for(None) != execution_id_for(None)


def test_envelope_rejections():
    assert isinstance(_parse(b"{nope"), Rejection)
    assert isinstance(_parse(b"\xff\xfe"), Rejection)
    assert "not an object" in _parse(b'"text"').reason
    assert "larger than the limit" in _parse({"action_ref": "core.noop", "p": "x" * 100}, max_bytes=50).reason


def test_a_valid_request():
    e = _parse({"action_ref": "core.echo", "parameters": {"message": "hi"}, "idempotency_key": "k", "timeout_seconds": 3}, "m1")
    assert isinstance(e, NewExecution) and e.status == "requested" and e.error is None
    assert (e.action_ref, e.parameters, e.idempotency_key, e.timeout_s, e.message_id) == (
        "core.echo", {"message": "hi"}, "k", 3, "m1"
    )


def _parse_message(body, message_id="batch-1", max_bytes=100_000):
    return parse_message(json.dumps(body).encode(), message_id=message_id, correlation_id="c", max_bytes=max_bytes)


def test_a_batch_is_one_execution_per_request_with_ids_from_the_message_id():
    parsed = _parse_message([{"action_ref": "core.noop"}, [1], {"action_ref": "a.b", "timeout_seconds": -1}])
    assert [e.id for e in parsed] == [batch_execution_id("batch-1", i) for i in range(3)]
    assert len({e.id for e in parsed}) == 3 and batch_execution_id("batch-2", 0) != parsed[0].id
    assert [e.status for e in parsed] == ["requested", "failed", "failed"]
    assert parsed[1].error["error"] == "request 1 of the batch is JSON list, not an object"
    assert all(e.message_id == "batch-1" and e.correlation_id == "c" for e in parsed)
    # A single request is a batch of one, under the id it always had.
    [single] = _parse_message({"action_ref": "core.noop"}, message_id="order-1")
    assert single.id == execution_id_for("order-1")


def test_what_rejects_a_whole_batch():
    assert "needs a message_id" in _parse_message([{"action_ref": "core.noop"}], message_id=None).reason
    assert "from 1 to" in _parse_message([]).reason
    assert "from 1 to" in _parse_message([{}] * (MAX_BATCH_REQUESTS + 1)).reason
    assert "larger than the limit" in _parse_message([{"action_ref": "core.noop"}] * 10, max_bytes=100).reason
    assert "not an object or an array of them" in _parse_message(3).reason


def test_client_batches_respect_count_and_bytes():
    requests = [b"x" * 10] * 25
    assert [len(b) for b in request_batches(requests, 10, 10_000)] == [10, 10, 5]
    by_bytes = request_batches(requests, 100, 50)  # "[" + entries joined by "," + "]" stays within 50 bytes
    assert all(len(b"[" + b",".join(b) + b"]") <= 50 for b in by_bytes) and sum(map(len, by_bytes)) == 25
    with pytest.raises(ValueError, match=r"larger than message_queue\.max_request_bytes"):
        request_batches([b"x" * 60], 10, 50)


@pytest.mark.parametrize(
    ("body", "fragment"),
    [
        ({}, "action_ref: Field required"),
        ({"action_ref": "noperiod"}, "action_ref: String should match pattern"),
        ({"action_ref": "a.b", "parameters": [1]}, "parameters: Input should be a valid dictionary"),
        ({"action_ref": "a.b", "timeout_seconds": 0}, "timeout_seconds"),
    ],
)
def test_envelope_failures_are_tied_to_an_execution(body, fragment):
    e = _parse(body)
    assert isinstance(e, NewExecution) and e.status == "failed"
    assert fragment in e.error["error"] and e.error["failed_by"] == "executor_intake"


def test_action_checks():
    validator = ParameterValidator()
    unknown = _parse({"action_ref": "x.y"})
    check_action(unknown, None, validator)
    assert "unknown action 'x.y'" in unknown.error["error"]
    bad = _parse({"action_ref": "core.sleep", "parameters": {"seconds": -1}})
    check_action(bad, CORE_ACTIONS["core.sleep"], validator)
    assert bad.error["problems"] == ["seconds: fails minimum 0"]  # the rule, never the value
    good = _parse({"action_ref": "core.local", "parameters": {"cmd": ["ls"], "env": {"A": "1"}}})
    check_action(good, CORE_ACTIONS["core.local"], validator)
    assert good.error is None


# -- rescheduling (placement is in test_placement_units.py) ---------------------------------


def test_next_step():
    assert next_step(1, 3) == "reschedule" and next_step(2, 3) == "reschedule" and next_step(3, 3) == "fail"


# -- liveness and recovery --------------------------------------------------------------------


def test_scheduled_timeout_error_is_the_design_object():
    assert scheduled_timeout_error(300, 320.7) == {
        "error": "Execution timeout: worker did not pick up task within 300 seconds (scheduled for 320 seconds)",
        "failed_by": "execution_timeout_monitor",
        "timeout_seconds": 300,
        "age_seconds": 320,
        "original_status": "scheduled",
    }
    assert scheduled_timeout_error(0.5, 1.2)["error"].startswith("Execution timeout: worker did not pick up task within 0.5 seconds")


def test_recovery_settings_resolve_decorator_then_yaml_then_default():
    from common.actions import ActionSpec
    from common.recovery import RecoveryPolicy, resolve_policy
    from common.settings import RecoverySettings

    def spec(**kw):
        return ActionSpec(ref="p.a", runtime="python", parameters_schema={}, **kw)

    unset = RecoverySettings()
    assert resolve_policy(spec(), unset).recover_on_worker_loss is False  # transient default
    assert resolve_policy(spec(durable=True), unset).recover_on_worker_loss is True  # durable default
    assert resolve_policy(None, unset).max_recovery_attempts == 3
    yaml_on = RecoverySettings(recover_on_worker_loss=True, max_recovery_attempts=5)
    # A transient action that does not say: the YAML decides both settings, durability stays its own.
    assert resolve_policy(spec(), yaml_on) == RecoveryPolicy(
        durable=False, recover_on_worker_loss=True, max_recovery_attempts=5
    )
    assert resolve_policy(spec(), yaml_on).recover_on_worker_loss is True
    assert resolve_policy(spec(), yaml_on).max_recovery_attempts == 5
    decorated = spec(recover_on_worker_loss=False, max_recovery_attempts=1)
    assert resolve_policy(decorated, yaml_on).recover_on_worker_loss is False
    assert resolve_policy(decorated, yaml_on).max_recovery_attempts == 1


def test_recovery_decisions_and_interrupted_event():
    from common.recovery import RecoveryPolicy, decide, interrupted_event

    transient = RecoveryPolicy(durable=False, recover_on_worker_loss=False, max_recovery_attempts=3)
    restartable = RecoveryPolicy(durable=False, recover_on_worker_loss=True, max_recovery_attempts=2)
    assert not decide(transient, 0).recover and "recover_on_worker_loss is off" in decide(transient, 0).reason
    assert decide(restartable, 0).recover and decide(restartable, 1).recover
    assert not decide(restartable, 2).recover and "all 2 recovery attempts" in decide(restartable, 2).reason
    event = interrupted_event(reason="worker_lost", worker="w", error="gone", policy=restartable, recovery_attempts=1)
    assert event == {"reason": "worker_lost", "worker_id": "w", "error": "gone", "recoverable": True, "recovery_attempt": 2}
    final = interrupted_event(reason="signal", worker="w", error="late", policy=restartable, recovery_attempts=2)
    assert final["recoverable"] is False and final["recovery_attempt"] == 2


def test_the_sweeper_wakes_when_the_next_worker_turns_stale():
    from executor.resilience import next_pause_s

    assert next_pause_s(1.0, None) == 1.0
    assert next_pause_s(1.0, 5.0) == 1.0
    assert next_pause_s(1.0, 0.3) == pytest.approx(0.31)
    assert next_pause_s(1.0, -2.0) == pytest.approx(0.01)  # already stale: sweep at once


def test_death_reason():
    from executor.dead_letters import death_reason

    assert death_reason({"x-first-death-reason": "expired"}) == "expired"
    assert death_reason({"x-death": [{"reason": b"rejected", "queue": "q"}]}) == "rejected"
    assert death_reason(None) == "unknown"
    # Anyone may publish to the fanout, with any headers: none of them may raise.
    for forged in ({"x-death": "boom"}, {"x-death": [1]}, {"x-death": 7}, {"x-first-death-reason": 123},
                   {"x-first-death-reason": ["expired"]}, {"x-first-death-reason": "x" * 10_000},
                   {"x-death": [{"reason": {"nested": 1}}]}, {"x-first-death-reason": b"\xff"}):
        assert death_reason(forged) == "unknown", forged


# -- parameters and timeouts -------------------------------------------------------------------


def test_key_values_follow_the_schema():
    schema = CORE_ACTIONS["core.echo"].parameters_schema
    assert coerce_key_values(["message=123"], schema) == {"message": "123"}
    assert coerce_key_values(["seconds=1.5"], CORE_ACTIONS["core.sleep"].parameters_schema) == {"seconds": 1.5}
    assert coerce_key_values(['cmd=["ls","-l"]', "x=plain text"], None) == {"cmd": ["ls", "-l"], "x": "plain text"}
    with pytest.raises(ValueError):
        coerce_key_values(["novalue"], None)


def test_signature_becomes_a_schema():
    async def act(count: int, ratio: float = 0.5, *, label: str | None = None):
        return None

    model = params_model_for("p.act", act)
    schema = model.model_json_schema()
    assert schema["required"] == ["count"] and schema["additionalProperties"] is False
    assert model.model_validate({"count": "3"}).count == 3
    with pytest.raises(ValidationError):
        model.model_validate({"count": 1, "unknown": 2})

    def loose(a, **rest):
        return None

    assert params_model_for("p.loose", loose).model_validate({"a": 1, "b": 2}).model_extra == {"b": 2}


def test_timeout_precedence():
    assert resolve_timeout_s(2, 5, 60) == 2
    assert resolve_timeout_s(None, 5, 60) == 5
    assert resolve_timeout_s(None, None, 60) == 60


def test_unknown_request_fields_are_ignored_with_a_warning_and_timeouts_take_durations():
    ok = _parse({"action_ref": "a.b", "later_field": 1, "timeout_seconds": "2m"})
    assert ok.error is None and ok.timeout_s == 120
    assert ok.warnings == ["unknown field 'later_field' ignored"]
    bad = _parse({"action_ref": "a.b", "timeout_seconds": "soon"})
    assert "timeout_seconds" in bad.error["error"]


# -- the command line -------------------------------------------------------------------------


def test_a_service_command_loads_only_the_services_commands():
    import subprocess
    import sys

    from cli import SERVICE_COMMANDS, app, command_of, load_commands
    from tests.harness import REPO

    assert command_of(["--config", "worker", "executor", "--name", "x"]) == "executor"
    assert command_of(["--debug", "--config=a.yaml", "executions", "list"]) == "executions"
    assert command_of(["--help"]) is None and command_of([]) is None
    # The service commands named are those `cli.services` registers: its commands, and `db` (all its).
    load_commands()
    registered = {c.name or c.callback.__name__ for c in app.registered_commands if c.callback.__module__ == "cli.services"}
    [db] = [g.typer_instance for g in app.registered_groups if g.name == "db"]
    assert db.registered_commands and all(c.callback.__module__ == "cli.services" for c in db.registered_commands)
    assert registered | {"db"} == SERVICE_COMMANDS
    probe = (
        "import sys, cli; cli.load_commands(sys.argv[1:]); "
        "print(sorted(m for m in ('cli.services', 'cli.catalogue', 'cli.executions', 'cli.controls') if m in sys.modules))"
    )
    loaded = {
        args[0] if args else "": subprocess.run(
            [sys.executable, "-c", probe, *args], cwd=REPO, capture_output=True, text=True, check=True
        ).stdout.strip()
        for args in (["--debug", "worker"], ["executions", "list"])
    }
    assert loaded["--debug"] == "['cli.services']"
    assert loaded["executions"] == "['cli.catalogue', 'cli.controls', 'cli.executions', 'cli.services']"


def test_a_workflow_failed_by_its_lost_transient_child_counts_as_failed_by_policy_in_the_soak():
    from bench.chaos import failed_by_policy

    lost_child, failing_child = uuid.uuid4(), uuid.uuid4()
    rows = {
        lost_child: {"status": "failed", "error": {"error": "interrupted", "failed_by": "recovery"}},
        failing_child: {"status": "failed", "error": {"error": "boom", "failed_by": "worker"}},
    }
    child_failed = {"status": "failed", "error": {"error": "child ... ended failed", "child": str(lost_child),
                                                  "failed_by": "workflow"}}
    assert failed_by_policy(child_failed, rows)
    assert not failed_by_policy({**child_failed, "error": {**child_failed["error"], "child": str(failing_child)}}, rows)
    assert not failed_by_policy({"status": "failed", "error": {"error": "its own bug", "failed_by": "workflow"}}, rows)
    assert failed_by_policy({"status": "failed", "error": {"error": "spent", "failed_by": "scheduler"}}, rows)
    assert not failed_by_policy({"status": "timeout", "error": None}, rows)


def test_a_gauge_family_is_replaced_whole_and_series_that_are_gone_are_removed():
    from prometheus_client import CollectorRegistry, Gauge

    from common.metrics import replace_all

    registry = CollectorRegistry()
    gauge = Gauge("ages", "test", ["worker"], registry=registry)

    def series():
        return {s.labels["worker"]: s.value for m in registry.collect() for s in m.samples}

    replace_all(gauge, {"a": 1.0, "b": 2.0})
    assert series() == {"a": 1.0, "b": 2.0}
    gauge.labels("a").set(5.0)
    replace_all(gauge, {"a": 3.0, "c": 4.0})
    assert series() == {"a": 3.0, "c": 4.0}
    replace_all(gauge, {})
    assert series() == {}


def test_requests_time_out_only_for_actions_unserved_for_the_whole_timeout():
    from executor.requested_timeout import expirable

    # Never served, and unserved for longer than the timeout: their requests may time out. Served
    # a moment ago (its only worker restarting): its requests are waiting their turn.
    ages = {"never": None, "long_gone": 3600.0, "just_now": 2.5, "exactly": 60.0}
    assert expirable(ages, 60.0) == ["exactly", "long_gone", "never"]
    assert expirable({}, 60.0) == []


def test_requests_submitted_together_are_grouped_into_messages_and_answered_one_by_one():
    import asyncio

    from common.client.base import RequestRejected
    from common.client.posting import _answers, _messages, _Outgoing
    from common.schemas import Acceptance

    loop = asyncio.new_event_loop()
    try:
        def outgoing(size: int) -> _Outgoing:
            return _Outgoing(b"x" * size, False, loop.create_future(), loop.create_future())

        small, big, other = outgoing(10), outgoing(200), outgoing(10)
        # A request too large for a message goes alone (refused by the executor with its reason).
        assert _messages([small, big, other], max_bytes=100) == [[small, other], [big]]
        many = [outgoing(10) for _ in range(12)]
        assert [len(g) for g in _messages(many, max_bytes=60)] == [5, 5, 2]
    finally:
        loop.close()
    one = Acceptance(execution_id="00000000-0000-0000-0000-000000000001", status="requested")
    assert _answers(f"[{one.model_dump_json()}, null]".encode(), 2, listed=True) == [one, None]
    refused = Acceptance(error="a batch of requests needs a message_id")
    # The batch refused as a whole: each request gets the answer, as an object of its own.
    answers = _answers(refused.model_dump_json().encode(), 3, listed=True)
    assert answers == [refused] * 3 and len({id(a) for a in answers}) == 3
    # An executor from before the list answers a batch's requests one by one, without the header:
    # the first reply is one request's (here, one that could not be stored), not every request's.
    assert _answers(refused.model_dump_json().encode(), 2, listed=False) == [None, None]
    assert _answers(one.model_dump_json().encode(), 1, listed=False) == [one]
    for unreadable in (b"[null]", b"not json", b'[{"status": 5}, null]'):
        answers = _answers(unreadable, 2, listed=True)
        assert all(isinstance(a, RequestRejected) and "reply cannot be read" in str(a) for a in answers), unreadable


async def test_a_post_that_fails_unexpectedly_fails_its_submitters_rather_than_leaving_them_waiting(monkeypatch):
    import asyncio

    from common.client import BatonClient, posting

    def broken(outgoing, max_bytes):
        raise ValueError("grouping broke")

    async def connected():
        return None, None

    monkeypatch.setattr(posting, "_messages", broken)
    client = BatonClient(load_settings())
    monkeypatch.setattr(client, "_amqp", connected)
    results = await asyncio.wait_for(
        asyncio.gather(client.submit("core.noop"), client.submit("core.noop"), return_exceptions=True), 5
    )
    assert [str(r) for r in results] == ["posting the request failed: ValueError: grouping broke"] * 2


def test_an_error_that_cannot_be_copied_is_shared_with_each_submitter():
    from common.client.posting import _own

    class Picky(Exception):
        def __init__(self, message: object, frame: object) -> None:
            self.frame = frame.delivery  # type: ignore[attr-defined]  # rebuilt from args alone, this fails
            super().__init__(message)

    class Frame:
        delivery = "returned"

    error = Picky("NO_ROUTE", Frame())
    assert _own(error) is error
    plain = RuntimeError("broker away")
    assert _own(plain) is not plain and str(_own(plain)) == "broker away"


async def test_a_message_whose_post_fails_unexpectedly_fails_its_own_submitters_only(monkeypatch):
    import asyncio

    from common.client import BatonClient
    from common.schemas import Acceptance

    client = BatonClient(load_settings())
    execution_id = uuid.uuid4()

    async def connected():
        return None, None

    async def post_message(group) -> None:
        if len(group[0].body) > 1000:
            raise RuntimeError("this one broke")
        await asyncio.sleep(0.05)  # still being posted when the other has failed
        group[0].posted.set_result(execution_id)
        group[0].answered.set_result(Acceptance(execution_id=execution_id, status="requested"))

    monkeypatch.setattr(client, "_amqp", connected)
    monkeypatch.setattr(client, "_post_message", post_message)
    large = "x" * (client.settings.message_queue.max_request_bytes + 1)  # a message of its own
    broken, posted = await asyncio.wait_for(
        asyncio.gather(client.submit("core.echo", {"message": large}), client.submit("core.noop"), return_exceptions=True),
        5,
    )
    assert str(broken) == "posting the request failed: RuntimeError: this one broke"
    assert posted.accepted and posted.execution_id == execution_id


def test_a_reply_refuses_a_batch_whole_only_as_one_answer_without_an_execution() -> None:
    """A batch refused as a whole has its requests posted again alone (`_post_alone`); a reply
    that answers each request, or accepts, or cannot be read, is not such a refusal."""
    from common.client.posting import _refused_whole

    refusal = b'{"execution_id": null, "error": "request body is 8000 bytes, larger than the limit of 4096"}'
    assert _refused_whole(refusal, listed=True)
    assert not _refused_whole(refusal, listed=False)  # an older executor's answer to one entry
    assert not _refused_whole(b'[{"execution_id": null, "error": "bad"}, null]', listed=True)
    assert not _refused_whole(b'{"execution_id": "8a4f7bb3-3c39-4f4e-9d8c-1c6e0d6b2a11", "status": "scheduled"}', listed=True)
    assert not _refused_whole(b"not json", listed=True)


async def test_a_request_posted_again_alone_is_answered_or_its_failure_kept_for_its_submitter(monkeypatch):
    """A request of a batch refused whole is posted again alone: its submitter gets that post's
    answer; one that stopped waiting (its accept timeout) finds out from `reposted` whether the
    post went out, rather than being told a request was posted that never was."""
    import asyncio

    from common.client import BatonClient
    from common.client.posting import _Outgoing
    from common.schemas import Acceptance

    client = BatonClient(load_settings())
    loop = asyncio.get_running_loop()
    execution_id = uuid.uuid4()
    broker_down = asyncio.Event()
    go = asyncio.Event()

    async def post_message(group, given_id=None) -> None:
        assert given_id == execution_id and len(group) == 1  # alone, under the id it had
        await go.wait()
        if broker_down.is_set():
            group[0].posted.set_exception(RuntimeError("the broker went away"))
            return
        group[0].posted.set_result(given_id)
        if not group[0].answered.done():
            group[0].answered.set_result(Acceptance(execution_id=given_id, status="scheduled"))

    monkeypatch.setattr(client, "_post_message", post_message)

    def request() -> _Outgoing:
        return _Outgoing(b"{}", False, loop.create_future(), loop.create_future())

    waiting = request()
    go.set()
    await client._post_alone(waiting, execution_id)
    assert waiting.answered.result() == Acceptance(execution_id=execution_id, status="scheduled")
    assert waiting.reposted is not None and waiting.reposted.result() == execution_id

    go.clear()
    broker_down.set()
    gone = request()
    repost = asyncio.create_task(client._post_alone(gone, execution_id))
    await asyncio.sleep(0)
    gone.answered.cancel()  # its submitter stopped waiting before the post went out
    go.set()
    await asyncio.wait_for(repost, 5)
    assert gone.reposted is not None
    with pytest.raises(RuntimeError, match="the broker went away"):
        await gone.reposted

"""Trust rules without services: catalogue registrations, the timeout ceiling."""

from __future__ import annotations

import pytest

from common.actions import ActionSpec, registration_conflict

SCHEMA = {"type": "object", "properties": {"n": {"type": "integer"}}}


def _spec(version: int = 1, runtime: str = "python", schema: dict | None = None, ref: str = "pack.act") -> ActionSpec:
    return ActionSpec(ref=ref, runtime=runtime, parameters_schema=schema or SCHEMA, version=version)


def test_new_and_identical_registrations_are_accepted():
    assert registration_conflict(None, _spec()) is None
    assert registration_conflict(_spec(), _spec()) is None


def test_a_higher_version_replaces_whatever_changed():
    assert registration_conflict(_spec(1), _spec(2, runtime="shell", schema={"type": "object"})) is None


@pytest.mark.parametrize(
    ("new", "fragment"),
    [
        (_spec(1, runtime="shell"), "version 1 is already registered with another runtime: give the changed action a higher version"),
        (_spec(1, schema={"type": "object"}), "another parameter schema"),
        (_spec(1, runtime="shell", schema={"type": "array"}), "another runtime and parameter schema"),
    ],
)
def test_a_change_under_the_same_version_is_refused(new, fragment):
    assert fragment in registration_conflict(_spec(1), new)


def test_an_older_deployment_is_refused():
    assert "this worker has version 1, the catalogue has version 3" in registration_conflict(_spec(3), _spec(1))


def test_core_is_never_registered():
    assert "Baton's own" in registration_conflict(None, _spec(ref="core.echo"))


def test_the_decorator_refuses_core_refs_and_bad_versions():
    from worker import action

    with pytest.raises(ValueError, match="reserved"):
        action("core.mine")(lambda: None)
    with pytest.raises(ValueError, match="version must be 1 or more"):
        action("pack.zero", version=0)(lambda: None)


def test_no_timeout_exceeds_the_ceiling():
    from worker.runner import resolve_timeout_s

    assert resolve_timeout_s(10**9, None, 60, ceiling_s=3600) == 3600
    assert resolve_timeout_s(None, 7200, 60, ceiling_s=3600) == 3600
    assert resolve_timeout_s(None, None, 7200, ceiling_s=3600) == 3600
    assert resolve_timeout_s(5, None, 60, ceiling_s=3600) == 5


@pytest.mark.parametrize(
    ("reason", "waited_s", "ttl_s", "alive", "restarted", "busy", "expected"),
    [
        # Sooner than the queue's TTL allows, naming a worker alive all along: forged, dropped.
        ("expired", 0.2, 300.0, True, False, False, None),
        ("expired", 0.2, 300.0, True, False, True, None),
        ("rejected", 0.2, 300.0, True, False, False, None),
        ("unknown", 0.2, 300.0, True, False, False, None),
        # Early from a worker that no longer takes work (draining, standing down): moved, never charged.
        ("rejected", 0.2, 300.0, False, False, False, False),
        ("expired", 0.2, 300.0, False, False, False, False),
        # ... or from one that has registered again since (a restart, a return from a stand-down).
        ("rejected", 0.2, 300.0, True, True, False, False),
        # Past the TTL: an expiry behind an idle worker spends a dispatch, not behind a busy one.
        ("expired", 300.5, 300.0, True, False, False, True),
        ("expired", 300.5, 300.0, True, False, True, False),
        ("unknown", 301.0, 300.0, False, False, False, True),
        ("rejected", 900.0, 300.0, True, False, False, False),  # handed back: never the execution's fault
        # Nothing to weigh it against (a worker registered before the TTL was recorded): as the reason says.
        ("expired", 0.2, None, True, False, False, True),
        ("expired", None, 300.0, True, False, False, True),
        ("rejected", 0.2, None, True, False, False, False),
    ],
)
def test_a_dead_letter_is_charged_only_when_rabbitmq_could_have_sent_it(
    reason, waited_s, ttl_s, alive, restarted, busy, expected
):
    from executor.dead_letters import charge

    got = charge(reason, waited_s=waited_s, queue_ttl_s=ttl_s, worker_alive=alive, worker_busy=busy,
                 worker_restarted=restarted)
    assert got is expected

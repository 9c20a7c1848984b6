"""Placement (pure): free slots first, a bounded pipeline only when no free slot exists."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from executor.placement import Candidate, concurrency_limits, place, room_by_action, served_actions


def _c(name: str, actions: set[str], conc: int = 2, outstanding: int = 0) -> Candidate:
    return Candidate(name, frozenset(actions), conc, outstanding)


def test_free_slots_only_without_a_pipeline():
    a, b = _c("a", {"x"}, conc=1, outstanding=0), _c("b", {"x"}, conc=2, outstanding=1)
    plan = place([(i, "x", None) for i in range(4)], [a, b], pipeline=0)
    assert sorted(plan.values()) == ["a", "b"]  # one free slot each; the rest wait as requested
    assert set(plan) == {0, 1}


def test_most_free_slots_first():
    plan = place([(1, "x", None)], [_c("a", {"x"}, conc=4, outstanding=3), _c("b", {"x"}, conc=2, outstanding=0)], 0)
    assert plan == {1: "b"}


def test_pipeline_is_used_only_when_no_free_slot_exists():
    full = _c("full", {"x"}, conc=2, outstanding=2)
    free = _c("free", {"x"}, conc=2, outstanding=1)
    plan = place([(1, "x", None), (2, "x", None), (3, "x", None), (4, "x", None)], [full, free], pipeline=1)
    # The free slot first; then each worker's pipeline of one.
    assert plan[1] == "free"
    assert sorted(plan[i] for i in (2, 3)) == ["free", "full"]
    assert 4 not in plan


def test_matches_actions_and_is_deterministic():
    shell, py = _c("shell", {"core.local"}), _c("py", {"core.echo"})
    plan = place([(1, "core.local", None), (2, "core.echo", None), (3, "other.thing", None)], [py, shell], 0)
    assert plan == {1: "shell", 2: "py"}
    assert place([(1, "x", None)], [_c("b", {"x"}), _c("a", {"x"})], 0) == {1: "a"}


def test_a_rescheduled_execution_prefers_another_worker_with_a_free_slot():
    other = _c("b", {"x"}, conc=4, outstanding=3)
    previous = _c("a", {"x"}, conc=4, outstanding=0)
    assert place([(1, "x", "a")], [previous, other], 0) == {1: "b"}
    # ... but goes back rather than into another worker's pipeline, or when it is the only one.
    assert place([(1, "x", "a")], [previous, _c("b", {"x"}, conc=1, outstanding=1)], 2) == {1: "a"}
    assert place([(1, "x", "a")], [previous], 0) == {1: "a"}


def test_room_by_action():
    workers = [_c("a", {"x"}, conc=1, outstanding=4), _c("b", {"y", "z"}, conc=3, outstanding=1), _c("c", {"y"}, conc=1)]
    assert room_by_action(workers, 0) == {"y": 3, "z": 2}
    assert room_by_action(workers, 1) == {"y": 5, "z": 3}


@given(
    st.lists(st.tuples(st.integers(1, 5), st.integers(0, 7), st.sets(st.sampled_from("xyz"), min_size=1)), min_size=1, max_size=5),
    st.lists(st.sampled_from("xyzw"), max_size=40),
    st.integers(0, 3),
)
def test_never_over_capacity_and_never_a_pipeline_while_a_slot_is_free(workers, actions, pipeline):
    candidates = [_c(f"w{i}", acts, conc, out) for i, (conc, out, acts) in enumerate(workers)]
    plan = place([(i, a, None) for i, a in enumerate(actions)], candidates, pipeline)
    load = {c.name: c.outstanding for c in candidates}
    by_name = {c.name: c for c in candidates}
    for i, action in enumerate(actions):
        serving = [c for c in candidates if action in c.actions]
        if i not in plan:
            # Left out only when every worker serving it is full, pipeline included.
            assert all(load[c.name] >= c.max_concurrent_tasks + pipeline for c in serving)
            continue
        chosen = by_name[plan[i]]
        assert action in chosen.actions
        if load[chosen.name] >= chosen.max_concurrent_tasks:
            # Into a pipeline only when no worker serving the action had a free slot.
            assert all(load[c.name] >= c.max_concurrent_tasks for c in serving)
        load[chosen.name] += 1
        assert load[chosen.name] <= chosen.max_concurrent_tasks + pipeline


def test_served_actions_counts_busy_workers_too():
    full = Candidate("full", frozenset({"a", "b"}), 1, 1)
    idle = Candidate("idle", frozenset({"c"}), 2, 0)
    assert served_actions([full, idle]) == {"a", "b", "c"}
    assert room_by_action([full, idle], 0) == {"c": 2}  # what a pass fetches; "a" and "b" wait for room
    assert served_actions([]) == set()


def test_concurrency_limits_take_the_operators_setting_over_the_actions_own():
    limits = concurrency_limits(
        ["own", "overridden", "configured", "free", "unknown"],
        configured={"overridden": 5, "configured": 2, "elsewhere": 9},
        own={"own": 3, "overridden": 1, "configured": None, "free": None},
    )
    assert limits == {"own": 3, "overridden": 5, "configured": 2}

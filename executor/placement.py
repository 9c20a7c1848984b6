"""Which worker gets which execution. Pure: the scheduler feeds it rows and candidates.

Work goes to free slots: a worker holds at most `max_concurrent_tasks` scheduled-or-running
executions, plus `executor.dispatch_pipeline` more when no worker serving the action has a free
slot. What finds no room waits as `requested` in PostgreSQL, where the next worker to free a slot
takes it, instead of waiting behind a busy worker while another one is idle.
"""

from __future__ import annotations

from collections.abc import Hashable, Iterable, Mapping, Sequence
from dataclasses import dataclass


@dataclass
class Candidate:
    """A live worker as the scheduler sees it at the start of a pass."""

    name: str
    actions: frozenset[str]
    max_concurrent_tasks: int
    outstanding: int  # scheduled or running on it

    def room(self, pipeline: int) -> int:
        """How many more executions it may be given now."""
        return max(self.max_concurrent_tasks + pipeline - self.outstanding, 0)


def room_by_action(candidates: Iterable[Candidate], pipeline: int) -> dict[str, int]:
    """For each action some candidate with room serves: how many executions of it could be placed
    now (an upper bound when workers share actions; placement decides the rest)."""
    room: dict[str, int] = {}
    for c in candidates:
        free = c.room(pipeline)
        if free:
            for action in c.actions:
                room[action] = room.get(action, 0) + free
    return room


def served_actions(candidates: Iterable[Candidate]) -> set[str]:
    """Every action some candidate serves, busy or not."""
    return {action for c in candidates for action in c.actions}


def concurrency_limits(
    actions: Iterable[str], configured: Mapping[str, int], own: Mapping[str, int | None]
) -> dict[str, int]:
    """The concurrency limit of each of these actions that has one: YAML's
    `executor.max_concurrency`, else the action's own (``own``, by action; absent: unknown)."""
    limits: dict[str, int] = {}
    for action in actions:
        limit = configured.get(action, own.get(action))
        if limit is not None:
            limits[action] = limit
    return limits


def concurrency_room(limits: Mapping[str, int], active: Mapping[str, int]) -> dict[str, int]:
    """For each action with a concurrency limit: how many more may be dispatched now."""
    return {action: max(limit - active.get(action, 0), 0) for action, limit in limits.items()}


def limited_room(room: Mapping[str, int], caps: Mapping[str, int]) -> dict[str, int]:
    """``room`` with each limited action's room cut to what its limit leaves; none left, left out."""
    out = {a: min(free, caps.get(a, free)) for a, free in room.items()}
    return {a: free for a, free in out.items() if free > 0}


def place(
    executions: Sequence[tuple[Hashable, str, str | None]], candidates: Sequence[Candidate], pipeline: int,
    caps: Mapping[str, int] | None = None,
) -> dict[Hashable, str]:
    """Assign each ``(execution_id, action_ref, previous_worker)``, in order, to a worker that
    serves its action and has room: first any with a free slot, most free slots first; only then
    one whose pipeline has room. The worker a rescheduled execution last went to is avoided unless
    no other can take it on the same terms. An action in ``caps`` gets at most that many more
    (its concurrency limit, less what already runs). Executions no worker can take now are left
    out (they stay `requested`). Ties go by name: results are deterministic."""
    load = {c.name: c.outstanding for c in candidates}
    left = dict(caps or {})
    by_action: dict[str, list[Candidate]] = {}
    plan: dict[Hashable, str] = {}
    for execution_id, action_ref, previous_worker in executions:
        if left.get(action_ref, 1) <= 0:
            continue
        if action_ref not in by_action:
            by_action[action_ref] = [c for c in candidates if action_ref in c.actions]
        best: Candidate | None = None
        best_rank: tuple[bool, bool, int, str] | None = None
        for c in by_action[action_ref]:
            if load[c.name] >= c.max_concurrent_tasks + pipeline:
                continue
            free_slots = c.max_concurrent_tasks - load[c.name]
            rank = (free_slots <= 0, c.name == previous_worker, -free_slots, c.name)
            if best_rank is None or rank < best_rank:
                best, best_rank = c, rank
        if best is not None:
            plan[execution_id] = best.name
            load[best.name] += 1
            if action_ref in left:
                left[action_ref] -= 1
    return plan

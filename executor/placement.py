"""Which worker gets which execution. Pure: the scheduler feeds it rows and candidates."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Hashable


@dataclass
class Candidate:
    """A live worker as the scheduler sees it at the start of a pass."""

    name: str
    actions: frozenset[str]
    max_concurrent_tasks: int
    outstanding: int  # scheduled or running on it

    def capacity(self, backlog_factor: int) -> int:
        return self.max_concurrent_tasks * backlog_factor


def servable_actions(candidates: Iterable[Candidate], backlog_factor: int) -> set[str]:
    """Actions that some candidate with room left can take now."""
    served: set[str] = set()
    for c in candidates:
        if c.outstanding < c.capacity(backlog_factor):
            served |= c.actions
    return served


def place(
    executions: Sequence[tuple[Hashable, str, str | None]], candidates: Sequence[Candidate], backlog_factor: int
) -> dict[Hashable, str]:
    """Assign each ``(execution_id, action_ref, previous_worker)`` to the worker serving its action
    that holds the fewest executions and still has room, other than the worker a rescheduled
    execution last went to unless no other can take it. Executions no worker can take now are left
    out (they stay `requested`). Ties go to the larger worker, then by name: results are deterministic."""
    load = {c.name: c.outstanding for c in candidates}
    by_action: dict[str, list[Candidate]] = {}
    plan: dict[Hashable, str] = {}
    for execution_id, action_ref, previous_worker in executions:
        if action_ref not in by_action:
            by_action[action_ref] = [c for c in candidates if action_ref in c.actions]
        best: Candidate | None = None
        best_rank: tuple = ()
        for c in by_action[action_ref]:
            if load[c.name] >= c.capacity(backlog_factor):
                continue
            rank = (c.name == previous_worker, load[c.name], -c.max_concurrent_tasks, c.name)
            if best is None or rank < best_rank:
                best, best_rank = c, rank
        if best is not None:
            plan[execution_id] = best.name
            load[best.name] += 1
    return plan

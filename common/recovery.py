"""What happens to a run whose worker was lost, hung, or stopped past its drain deadline. Pure.

Settings resolve in this order: the action's decorator, then the YAML `recovery:` section, then the
built-in defaults (`recover_on_worker_loss` True for durable runs, False for transient ones;
`max_recovery_attempts` 3). DESIGN section 6.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from common.actions import ActionSpec
from common.settings import RecoverySettings

DEFAULT_MAX_RECOVERY_ATTEMPTS = 3

InterruptReason = Literal["worker_lost", "timeout", "signal"]


@dataclass(frozen=True)
class RecoveryPolicy:
    durable: bool
    recover_on_worker_loss: bool
    max_recovery_attempts: int


def resolve_policy(spec: ActionSpec | None, settings: RecoverySettings) -> RecoveryPolicy:
    durable = bool(spec and spec.durable)
    recover = next(
        (v for v in (spec.recover_on_worker_loss if spec else None, settings.recover_on_worker_loss) if v is not None),
        durable,
    )
    max_attempts = next(
        (v for v in (spec.max_recovery_attempts if spec else None, settings.max_recovery_attempts) if v is not None),
        DEFAULT_MAX_RECOVERY_ATTEMPTS,
    )
    return RecoveryPolicy(durable=durable, recover_on_worker_loss=bool(recover), max_recovery_attempts=max_attempts)


@dataclass(frozen=True)
class Decision:
    recover: bool
    reason: str  # why it fails, or how it recovers


def decide(policy: RecoveryPolicy, recovery_attempts: int) -> Decision:
    """``recovery_attempts`` is how many recoveries the run has had already."""
    if not policy.recover_on_worker_loss:
        return Decision(
            False,
            "the worker running it was lost and this transient run is not recovered "
            "(recover_on_worker_loss is off)",
        )
    if recovery_attempts >= policy.max_recovery_attempts:
        return Decision(
            False,
            f"the worker running it was lost and the run has used all {policy.max_recovery_attempts} "
            f"recovery attempts (max_recovery_attempts = {policy.max_recovery_attempts})",
        )
    how = "resumes from its last checkpoint" if policy.durable else "restarts from the beginning"
    return Decision(True, f"recovery attempt {recovery_attempts + 1} of {policy.max_recovery_attempts}: {how}")


def interrupted_event(
    *, reason: InterruptReason, worker: str | None, error: str, policy: RecoveryPolicy, recovery_attempts: int
) -> dict[str, Any]:
    """`workflow.interrupted` data (DESIGN section 6); `last_event_sequence` is added by the query."""
    decision = decide(policy, recovery_attempts)
    return {
        "reason": reason,
        "worker_id": worker,
        "error": error,
        "recoverable": decision.recover,
        "recovery_attempt": recovery_attempts + 1 if decision.recover else recovery_attempts,
    }

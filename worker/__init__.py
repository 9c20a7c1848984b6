"""Baton's worker, and the SDK actions and workflows are written with:
``from worker import action, workflow, step``."""

from worker.registry import Invocation, action
from worker.workflow import ChildFailed, NonDeterminismError, StepFailed, WorkflowContext, step, workflow

__all__ = ["ChildFailed", "Invocation", "NonDeterminismError", "StepFailed", "WorkflowContext", "action", "step", "workflow"]

"""Baton's worker, and the SDK actions are written with: ``from worker import action``."""

from worker.registry import Invocation, action

__all__ = ["Invocation", "action"]

"""How an action reports an outcome other than success, with what it produced so far."""

from __future__ import annotations

from typing import Any


class ActionFailed(Exception):
    """The action ran and failed; ``result`` (e.g. a command's output) is kept on the execution."""

    def __init__(self, message: str, result: Any = None) -> None:
        super().__init__(message)
        self.result = result


class ActionTimedOut(Exception):
    """The action ran past its timeout and was stopped."""

    def __init__(self, message: str, result: Any = None) -> None:
        super().__init__(message)
        self.result = result

"""An error as an operator reads it: one line."""

from __future__ import annotations


def describe(exc: BaseException, *, max_chars: int = 300) -> str:
    """``exc`` as one short line: its type, and its message with line breaks joined (PostgreSQL's
    errors carry a `DETAIL:` line, for one)."""
    message = "; ".join(line.strip() for line in str(exc).splitlines() if line.strip())
    return f"{type(exc).__name__}: {message[:max_chars]}" if message else type(exc).__name__

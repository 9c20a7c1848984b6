"""An error as an operator reads it: one line."""

from __future__ import annotations


def describe(exc: BaseException, *, max_chars: int = 300) -> str:
    """``exc`` as one short line: its type, and its message with line breaks joined (PostgreSQL's
    errors carry a `DETAIL:` line, for one)."""
    message = "; ".join(line.strip() for line in str(exc).splitlines() if line.strip())
    return f"{type(exc).__name__}: {message[:max_chars]}" if message else type(exc).__name__


def loop_stopped(service: str, loop: str, exc: BaseException | None, *, aftermath: str) -> str:
    """The one line a service stops with when one of its loops ended on its own: which loop, why,
    what became of the service (``aftermath``), and what to do."""
    why = describe(exc, max_chars=200) if exc else "it returned"
    return (
        f"{service} loop {loop!r} stopped unexpectedly ({why}); {aftermath}: "
        "start it again (a supervisor does), and see the log's loop_died event for the cause"
    )

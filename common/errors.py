"""An error as an operator reads it: one line."""

from __future__ import annotations

from pydantic import ValidationError

#: At most this many problems, each naming its field in at most this many characters: an input
#: may have many or huge unknown keys.
MAX_PROBLEMS = 20
MAX_LOC_CHARS = 100


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


def validation_problems(exc: ValidationError, *, root: str) -> list[str]:
    """What pydantic found wrong, one ``field: reason`` per problem, without the values: an input
    may hold secrets, and these are stored, logged and shown. ``root`` names a problem of the whole
    input (its location is empty)."""
    problems = []
    for err in exc.errors(include_url=False, include_input=False, include_context=False)[:MAX_PROBLEMS]:
        loc = ".".join(str(p) for p in err["loc"]) or root
        if len(loc) > MAX_LOC_CHARS:
            loc = loc[:MAX_LOC_CHARS] + "..."
        problems.append(f"{loc}: {err['msg']}")
    if exc.error_count() > MAX_PROBLEMS:
        problems.append(f"... and {exc.error_count() - MAX_PROBLEMS} more")
    return problems


def describe_invalid(exc: ValidationError, *, root: str) -> str:
    """`validation_problems` as one line."""
    return "; ".join(validation_problems(exc, root=root))

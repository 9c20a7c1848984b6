"""`baton executions cancel | pause | resume | signal | retry | prune`: acting on executions
already recorded (posting and reading them is `cli.executions`)."""

from __future__ import annotations

import asyncio
import json
from typing import TYPE_CHECKING

import typer

from cli.app import _client_settings, _control, _one_line, age_option_s, executions_app

if TYPE_CHECKING:
    from common.client import BatonClient


@executions_app.command("cancel")
def executions_cancel(execution_id: str = typer.Argument(..., help="An id, or a unique prefix of one.")) -> None:
    """Cancel an execution that has not finished (and the children it started); a running one is
    stopped on its worker within a moment."""

    async def go(c: BatonClient) -> str:
        rows = await c.cancel(execution_id)
        others = f" and {len(rows) - 1} child execution(s)" if len(rows) > 1 else ""
        return f"execution {rows[0]['id'] if len(rows) == 1 else await c.resolve_id(execution_id)}: cancelled{others}"

    _control(go)


@executions_app.command("pause")
def executions_pause(execution_id: str = typer.Argument(..., help="An id, or a unique prefix of one.")) -> None:
    """Pause a durable run (at its next step boundary if it is running); it holds no worker slot."""

    async def go(c: BatonClient) -> str:
        status = await c.pause(execution_id)
        then = "paused" if status == "paused" else "pausing at its next step boundary"
        return f"execution {await c.resolve_id(execution_id)}: {then}"

    _control(go)


@executions_app.command("resume")
def executions_resume(execution_id: str = typer.Argument(..., help="An id, or a unique prefix of one.")) -> None:
    """Resume a paused durable run (or call off a pause it has not reached yet)."""

    async def go(c: BatonClient) -> str:
        status = await c.resume(execution_id)
        then = "back in line" if status == "requested" else "pause called off"
        return f"execution {await c.resolve_id(execution_id)}: {then}"

    _control(go)


@executions_app.command("signal")
def executions_signal(
    execution_id: str = typer.Argument(..., help="An id, or a unique prefix of one."),
    name: str = typer.Argument(..., help="The signal's name, as the workflow waits for it."),
    data: str | None = typer.Option(None, "--data", help="The signal's data, as JSON."),
) -> None:
    """Send a signal to a durable run (its `ctx.wait_for_signal(NAME)` returns the data)."""
    try:
        payload = json.loads(data) if data is not None else None
    except json.JSONDecodeError as exc:
        typer.echo(f"--data is not JSON: {exc}", err=True)
        raise typer.Exit(2) from None

    async def go(c: BatonClient) -> str:
        woke = await c.signal(execution_id, name, payload)
        then = "the waiting run is back in line" if woke else "kept until the run waits for it"
        return f"signal {name!r} sent to {await c.resolve_id(execution_id)}: {then}"

    _control(go)


@executions_app.command("retry")
def executions_retry(execution_id: str = typer.Argument(..., help="An id, or a unique prefix of one.")) -> None:
    """Rerun a finished execution: a durable run from its checkpoint (completed steps are kept),
    any other from scratch as a new execution linked to it."""

    async def go(c: BatonClient) -> str:
        old = await c.resolve_id(execution_id)
        new = await c.retry(old)
        return f"execution {old}: retried from its checkpoint" if new == old else f"execution {old}: rerun as {new}"

    _control(go)


@executions_app.command("prune")
def executions_prune(
    older_than: str = typer.Option(..., "--older-than", help="Age of finished executions to delete: 30d, 12h, 90m."),
) -> None:
    """Delete finished executions (and their events) older than the given age, in batches."""
    from common import db
    from common.retention import prune_executions

    older_than_s = age_option_s("--older-than", older_than)
    settings = _client_settings()  # its waits for PostgreSQL go to stderr, not among its output

    async def main() -> int:
        pool = await db.connect(settings.database.url, max_size=1, max_wait_s=settings.database.startup_wait_s)
        try:
            return await prune_executions(pool, older_than_s=older_than_s, batch_size=settings.retention.batch_size)
        finally:
            await pool.close()

    with _one_line(settings, "baton executions prune"):
        deleted = asyncio.run(main())
    typer.echo(f"deleted {deleted} finished execution(s) older than {older_than}")

"""`baton submit` and `baton executions list | tail | watch | show`: posting, waiting for and
reading executions (acting on them is `cli.controls`)."""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import json
import signal
import sys
import time
import uuid
from typing import TYPE_CHECKING, Any

import typer

from cli.app import (
    STATUS_STYLE,
    _cell,
    _client_settings,
    _one_line,
    _print_json,
    _run_client,
    _styled,
    _table,
    app,
    console,
    executions_app,
    parse_age,
)
from common.retry import TRANSIENT_ERRORS
from common.schemas import TERMINAL_STATUSES, ExecutionSummary, jsonable_row
from common.timeline import timeline
from common.values import parse_duration, parse_moment

if TYPE_CHECKING:
    from rich.table import Table

    from common.client import BatonClient

# -- posting ------------------------------------------------------------------------------------


@app.command()
def submit(
    action_ref: str = typer.Argument(..., help="Action to run, e.g. core.echo."),
    params: list[str] = typer.Argument(None, help="Parameters as key=value."),
    params_json: str | None = typer.Option(None, "--params-json", help="Parameters as a JSON object."),
    idempotency_key: str | None = typer.Option(None, "--idempotency-key"),
    timeout_s: float | None = typer.Option(None, "--timeout", help="Action timeout in seconds."),
    delay: str | None = typer.Option(None, "--delay", help="Run no sooner than this from now (e.g. 10m, 90s)."),
    at: str | None = typer.Option(None, "--at", help="Run no sooner than this time (RFC 3339, e.g. 2026-12-01T09:00Z)."),
    max_retries: int | None = typer.Option(None, "--max-retries", min=0, help="Retries of a failure (overrides the action's)."),
    wait: bool = typer.Option(False, "--wait", help="Wait for the outcome; exit 0 only if completed."),
    wait_timeout_s: float | None = typer.Option(None, "--wait-timeout", help="Give up waiting after this many seconds."),
    progress: bool | None = typer.Option(None, "--progress/--no-progress", help="With --wait, show status changes as they happen (default: on a terminal)."),
    accept_wait_s: float = typer.Option(5.0, "--accept-wait", min=0.1, help="Say so if no executor has recorded the request by then."),
    as_json: bool = typer.Option(False, "--json"),
) -> None:
    """Post an invocation to the queue."""
    from common.client import BatonClient, RequestNotPosted, RequestRejected, coerce_key_values

    settings = _client_settings()

    async def main() -> int:
        async with BatonClient(settings) as client:
            parameters: dict[str, Any] = {}
            if params_json:
                try:
                    parameters = json.loads(params_json)
                except json.JSONDecodeError as exc:
                    typer.echo(f"--params-json is not JSON: {exc}", err=True)
                    return 2
                if not isinstance(parameters, dict):
                    typer.echo("--params-json must be a JSON object", err=True)
                    return 2
            if params:
                try:
                    parameters.update(coerce_key_values(params, await client.action_schema(action_ref)))
                except ValueError as exc:
                    typer.echo(str(exc), err=True)
                    return 2
            try:
                delay_s, not_before = _when(delay, at)
            except ValueError as exc:
                typer.echo(str(exc), err=True)
                return 2
            try:
                submission = await client.submit(
                    action_ref, parameters, idempotency_key=idempotency_key, timeout_s=timeout_s, watch=wait,
                    max_retries=max_retries, delay_s=delay_s, not_before=not_before, accept_timeout_s=accept_wait_s,
                )
            except RequestRejected as exc:
                typer.echo(f"request rejected: {exc}", err=True)
                return 1
            except RequestNotPosted as exc:
                typer.echo(f"request not posted: {exc}", err=True)
                return 1
            if not wait:
                if as_json:
                    _print_json(
                        {
                            "id": str(submission.execution_id),
                            "accepted": submission.accepted,
                            "status": submission.status,
                            "duplicate": submission.duplicate,
                            "error": submission.error,
                        }
                    )
                else:
                    state = submission.status if submission.accepted else "posted (no executor has answered yet)"
                    dup = " (duplicate: the existing execution)" if submission.duplicate else ""
                    console.print(f"execution {submission.execution_id}: {_styled(state)}{dup}")
                    if submission.error:
                        console.print(f"[red]error:[/red] {_cell(submission.error)}")
                return 1 if submission.status == "failed" else 0
            for warning in submission.warnings:
                typer.echo(f"warning: {warning}", err=True)
            if not submission.accepted:
                typer.echo(
                    f"no executor has answered within {accept_wait_s:g} s: execution {submission.execution_id} is posted "
                    f"and waits in {client.names.requests_queue}; is an executor running? (still waiting)", err=True,
                )
            elif submission.duplicate:
                typer.echo(f"an execution with this idempotency key exists already: {submission.execution_id} "
                           f"({submission.status}); waiting for it, not for a new one", err=True)
            started = time.monotonic()
            seen: list[str] = []
            watcher = (
                asyncio.create_task(_progress(client, submission.execution_id, seen)) if _show_progress(progress) else None
            )
            try:
                execution = await client.wait(submission.execution_id, wait_timeout_s)
            except TimeoutError as exc:
                typer.echo(str(exc), err=True)
                return 1
            finally:
                if watcher is not None:
                    watcher.cancel()
            if watcher is not None and seen[-1:] != [execution["status"]]:
                typer.echo(f"  {time.monotonic() - started:6.1f}s  {execution['status']}", err=True)
            if as_json:
                _print_json(execution)
            else:
                _show(execution)
            return 0 if execution["status"] == "completed" else 1

    with _one_line(settings, "baton submit"):
        code = asyncio.run(main())
    raise typer.Exit(code)


def _show_progress(option: bool | None) -> bool:
    return sys.stderr.isatty() if option is None else option


async def _progress(client: BatonClient, execution_id: uuid.UUID, seen: list[str]) -> None:
    """Status changes of a waited-for execution, with the time since the wait began, on stderr
    (each appended to ``seen``)."""
    started = time.monotonic()
    last = None
    while True:
        try:
            row = await client.get(execution_id)
        except TRANSIENT_ERRORS:
            row = None
        if row is not None and row["status"] != last:
            last = row["status"]
            seen.append(last)
            where = f" on {row['worker']}" if row.get("worker") and last in ("scheduled", "running") else ""
            typer.echo(f"  {time.monotonic() - started:6.1f}s  {last}{where}", err=True)
        await asyncio.sleep(0.25)


def _when(delay: str | None, at: str | None) -> tuple[float | None, dt.datetime | None]:
    """`--delay` as seconds, `--at` as an aware time; one or the other."""
    if delay is not None and at is not None:
        raise ValueError("give --delay or --at, not both")
    if delay is not None:
        try:
            return parse_duration(delay), None
        except ValueError as exc:
            raise ValueError(f"--delay: {exc}") from None
    if at is not None:
        try:
            return None, parse_moment(at, naive_is_utc=False)
        except ValueError as exc:
            raise ValueError(f"--at: {exc}") from None
    return None, None


# -- reading ------------------------------------------------------------------------------------


def _show(execution: dict[str, Any]) -> None:
    table = _table(show_header=False, box=None)
    for key in ("id", "action_ref", "status", "attempt", "worker", "created_at", "started_at", "finished_at"):
        value = execution.get(key)
        table.add_row(f"[bold]{key}[/bold]", _styled(value) if key == "status" else _cell(value))
    for key in ("parameters", "result", "warnings"):
        if execution.get(key) is not None:
            table.add_row(f"[bold]{key}[/bold]", _cell(json.dumps(execution[key], indent=2)))
    error = dict(execution.get("error") or {})
    trace = error.pop("traceback", None)
    if error:
        table.add_row("[bold]error[/bold]", f"[red]{_cell(error.pop('error', ''))}[/red]")
        if error:
            table.add_row("", _cell(json.dumps(error)))
    console.print(table)
    if trace:  # once, as the lines it is, not as an escaped JSON string
        console.print("[bold]traceback[/bold]")
        console.print(trace.rstrip(), markup=False, highlight=False)
    steps = execution.get("steps") or []
    if steps:
        step_table = _table(title="steps")
        for column in ("step", "name", "status", "attempts", "duration", "detail"):
            step_table.add_column(column)
        for st in steps:
            duration = f"{st['duration_s'] * 1000:.1f} ms" if st.get("duration_s") is not None else ""
            detail = (st.get("child_id") and f"child {st['child_id']}") or (st.get("wake_at") and f"wakes {st['wake_at']}")
            step_table.add_row(
                _cell(st["step_id"]), _cell(st["name"]), _styled(st["status"]), _cell(st["attempts"]),
                _cell(duration), _cell(detail or ""),
            )
        console.print(step_table)
    events = execution.get("events") or []
    if events:
        ev_table = _table(title="timeline")
        for column in ("seq", "at", "event", "what happened"):
            ev_table.add_column(column)
        for seq, offset, kind, what in timeline(events):
            ev_table.add_row(_cell(seq), _cell(offset), _styled(kind) if kind in STATUS_STYLE else _cell(kind), _cell(what))
        console.print(ev_table)



@executions_app.command("list")
def executions_list(
    status: str | None = typer.Option(None, "--status", help="Only this status."),
    action: str | None = typer.Option(None, "--action", help="Only this action."),
    worker: str | None = typer.Option(None, "--worker", help="Only those on this worker."),
    since: str | None = typer.Option(None, "--since", help="Created at or after (e.g. 2026-11-30T12:00Z, or 2h ago: 2h)."),
    until: str | None = typer.Option(None, "--until", help="Created before (a time, or an age such as 30m)."),
    after: str | None = typer.Option(None, "--after", help="Page on: the id of the last execution of the previous page."),
    limit: int = typer.Option(50, "--limit", min=1, max=1000),
    as_json: bool = typer.Option(False, "--json"),
) -> None:
    """Executions, newest first; page back with --after LAST_ID (as printed at the end)."""

    async def go(c: BatonClient) -> list[ExecutionSummary]:
        last = None
        if after:
            row = await c.get(after)
            if row is None:
                raise ValueError(f"--after {after!r}: no such execution")
            last = (dt.datetime.fromisoformat(row["created_at"]), uuid.UUID(row["id"]))
        return await c.list_page(status=status, action_ref=action, worker=worker, since=_moment(since, "--since"),
                                 until=_moment(until, "--until"), after=last, limit=limit)

    rows = _run_client(go)
    if as_json:
        _print_json([jsonable_row(r) for r in rows])
        return
    table = _table()
    for column in ("id", "action", "status", "attempt", "worker", "created", "error"):
        table.add_column(column)
    for r in rows:
        table.add_row(
            _cell(r["id"]),
            _cell(r["action_ref"]),
            _styled(r["status"]),
            _cell(r["attempt"]),
            _cell(r["worker"]),
            _cell(str(r["created_at"])[:23]),
            _cell(((r["error"] or {}).get("error") or "")[:80]),
        )
    console.print(table)
    if len(rows) == limit:
        typer.echo(f"more: --after {rows[-1]['id']}")


def _moment(value: str | None, option: str) -> dt.datetime | None:
    """An RFC 3339 time (UTC if it names no zone), or an age (`2h`: two hours ago)."""
    if value is None:
        return None
    try:
        return dt.datetime.now(dt.UTC) - dt.timedelta(seconds=parse_age(value))
    except ValueError:
        pass
    try:
        return parse_moment(value, naive_is_utc=True)
    except ValueError:
        raise ValueError(f"{option} {value!r} is neither a time (2026-11-30T12:00Z) nor an age (30m, 2h, 7d)") from None


@executions_app.command("tail")
def executions_tail(
    execution_id: str = typer.Argument(..., help="An id, or a unique prefix of one."),
    poll_s: float = typer.Option(0.5, "--poll", min=0.05, help="Seconds between looks."),
) -> None:
    """Print an execution's events as they happen, until it finishes; exit 0 only if it completed."""

    async def go(c: BatonClient) -> int:
        full = await c.resolve_id(execution_id)
        shown = 0
        first: str | None = None
        while True:
            execution = await c.get(full)
            assert execution is not None
            events = execution.get("events") or []
            first = first or (events[0]["created_at"] if events else None)
            for seq, offset, kind, what in timeline(events)[shown:]:
                typer.echo(f"{seq:>4} {offset:>10}  {kind:<22} {what}")
            shown = len(events)
            if execution["status"] in TERMINAL_STATUSES:
                return 0 if execution["status"] == "completed" else 1
            await asyncio.sleep(poll_s)

    raise typer.Exit(_run_client(go))


@executions_app.command("watch")
def executions_watch(
    status: str | None = typer.Option(None, "--status"),
    action: str | None = typer.Option(None, "--action"),
    worker: str | None = typer.Option(None, "--worker"),
    limit: int = typer.Option(20, "--limit", min=1, max=200),
    interval_s: float = typer.Option(1.0, "--interval", min=0.1, help="Seconds between refreshes."),
) -> None:
    """A live table of the newest executions (Ctrl-C to stop)."""
    from rich.live import Live

    def render(rows: list[ExecutionSummary]) -> Table:
        table = _table(title=f"newest executions, every {interval_s:g} s (Ctrl-C to stop)")
        for column in ("id", "action", "status", "attempt", "worker", "created", "error"):
            table.add_column(column)
        for r in rows:
            table.add_row(_cell(str(r["id"])[:8]), _cell(r["action_ref"]), _styled(r["status"]), _cell(r["attempt"]),
                          _cell(r["worker"]), _cell(str(r["created_at"])[11:19]),
                          _cell(((r["error"] or {}).get("error") or "")[:50]))
        return table

    async def go(c: BatonClient) -> int:
        # Ctrl-C sets an event the loop checks, rather than cancelling it: a cancellation that
        # lands as a read completes can be lost (asyncio.wait_for on Python 3.11), and the table
        # would then go on for ever.
        interrupted = asyncio.Event()
        loop = asyncio.get_running_loop()
        loop.add_signal_handler(signal.SIGINT, interrupted.set)
        try:
            with Live(render([]), console=console, refresh_per_second=4) as live:
                while not interrupted.is_set():
                    rows = await c.list_page(status=status, action_ref=action, worker=worker, limit=limit)
                    live.update(render(rows))
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(interrupted.wait(), interval_s)
        finally:
            loop.remove_signal_handler(signal.SIGINT)
        return 0

    try:
        _run_client(go)
    except KeyboardInterrupt:  # before the table started
        raise typer.Exit(0) from None


@executions_app.command("show")
def executions_show(execution_id: str, as_json: bool = typer.Option(False, "--json")) -> None:
    """One execution with its events."""
    execution = _run_client(lambda c: c.get(execution_id))
    if execution is None:
        typer.echo(f"no execution {execution_id}: see `baton executions list` for the ids there are", err=True)
        raise typer.Exit(1)
    if as_json:
        _print_json(execution)
    else:
        _show(execution)

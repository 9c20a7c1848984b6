"""`baton`: run the services, post invocations, and look at executions and workers."""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import json
import os
import signal
import sys
import time
import uuid
from collections.abc import Awaitable, Callable, Iterator
from typing import TYPE_CHECKING, Any, TypeVar
from urllib.parse import urlsplit

import aiormq.exceptions
import asyncpg
import typer
import yaml
from pydantic import ValidationError
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from common.logging import configure_logging
from common.retry import TRANSIENT_ERRORS
from common.schemas import jsonable_row
from common.settings import Settings, load_settings, parse_duration, where
from common.timeline import timeline

if TYPE_CHECKING:
    from common.client import BatonClient

_T = TypeVar("_T")

app = typer.Typer(help="Baton: run actions on workers; nothing stuck, nothing silently lost.", no_args_is_help=True)
executions_app = typer.Typer(help="Look at executions.", no_args_is_help=True)
workers_app = typer.Typer(help="Look at workers.", no_args_is_help=True)
db_app = typer.Typer(help="Database administration.", no_args_is_help=True)
app.add_typer(executions_app, name="executions")
app.add_typer(workers_app, name="workers")
app.add_typer(db_app, name="db")
schedules_app = typer.Typer(help="Cron schedules: each due time fires once.", no_args_is_help=True)
app.add_typer(schedules_app, name="schedules")
actions_app = typer.Typer(help="The action catalogue: what can be invoked.", no_args_is_help=True)
app.add_typer(actions_app, name="actions")
rejected_app = typer.Typer(help="Parked requests: those that could not be tied to an execution.", no_args_is_help=True)
app.add_typer(rejected_app, name="rejected")

console = Console()
STATUS_STYLE = {
    "completed": "green",
    "failed": "red",
    "timeout": "red",
    "cancelled": "yellow",
    "interrupted": "yellow",
    "running": "cyan",
    "scheduled": "blue",
    "requested": "white",
    "active": "green",
    "draining": "yellow",
    "lost": "red",
    "inactive": "dim",
    "paused": "yellow",
    "sleeping": "blue",
    "waiting": "blue",
    "pending": "blue",
}


def _serve(main: Any) -> None:
    """Run a service's main coroutine, on uvloop where it is available (a faster event loop)."""
    try:
        import uvloop
    except ImportError:
        asyncio.run(main)
    else:
        uvloop.run(main)


#: Set by `--debug` (anywhere on the command line): tracebacks instead of one-line errors.
DEBUG = {"on": False}


def _settings(**overrides: Any) -> Settings:
    path = os.environ.get("BATON_CONFIG", "config/config.yaml")
    try:
        return load_settings(**overrides)
    except ValidationError as exc:
        first = exc.errors(include_url=False, include_input=False)[0]
        where = ".".join(str(p) for p in first["loc"])
        more = f" (and {exc.error_count() - 1} more)" if exc.error_count() > 1 else ""
        typer.echo(f"configuration error in {path}: {where}: {first['msg']}{more}", err=True)
    except FileNotFoundError as exc:
        typer.echo(f"configuration error: {exc}: give an existing file with --config or BATON_CONFIG", err=True)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        at = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        typer.echo(f"configuration error: {path} is not valid YAML{at}: {problem}", err=True)
    if DEBUG["on"]:
        raise
    raise typer.Exit(2)


def startup_failure(exc: BaseException, settings: Settings) -> str | None:
    """One line for a failure to reach or use PostgreSQL or RabbitMQ: what was tried (host:port,
    never a password), why, and what to do. None for anything else."""
    pg, mq = settings.database.url, settings.message_queue.url
    db_name = urlsplit(pg).path.lstrip("/") or "(none)"
    reason = str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__
    if isinstance(exc, aiormq.exceptions.ProbableAuthenticationError):
        return (f"RabbitMQ at {where(mq)} refused the login of user {urlsplit(mq).username!r}: "
                "fix the user or password in message_queue.url")
    if isinstance(exc, aiormq.exceptions.AMQPConnectionError):
        return (f"cannot reach RabbitMQ at {where(mq)} ({reason}); gave up after message_queue.startup_wait "
                f"({settings.message_queue.startup_wait_s:g} s): start it, or fix message_queue.url")
    if isinstance(exc, (asyncpg.exceptions.InvalidPasswordError, asyncpg.exceptions.InvalidAuthorizationSpecificationError)):
        return f"PostgreSQL at {where(pg)} refused the login ({reason}): fix the user or password in database.url"
    if isinstance(exc, asyncpg.exceptions.InvalidCatalogNameError):
        return (f"database {db_name!r} does not exist at {where(pg)}: start an executor or a worker (they create "
                "it), or run `baton db migrate`")
    if isinstance(exc, asyncpg.exceptions.UndefinedTableError):
        return f"database {db_name!r} at {where(pg)} has no Baton tables yet: run `baton db migrate`"
    if isinstance(exc, TRANSIENT_ERRORS):
        return (f"cannot reach PostgreSQL at {where(pg)} ({reason}); gave up after database.startup_wait "
                f"({settings.database.startup_wait_s:g} s): start it, or fix database.url")
    return None


@contextlib.contextmanager
def _one_line(settings: Settings, who: str) -> Iterator[None]:
    """A failure to reach PostgreSQL or RabbitMQ ends the command with one line (a traceback
    with --debug), exit status 1."""
    try:
        yield
    except Exception as exc:
        line = startup_failure(exc, settings)
        if line is None or DEBUG["on"]:
            raise
        typer.echo(f"{who}: {line}", err=True)
        raise typer.Exit(1) from None


def _styled(status: str | None) -> str:
    style = STATUS_STYLE.get(status or "", "")
    return f"[{style}]{escape(str(status))}[/{style}]" if style else escape(str(status))


def _cell(value: Any) -> str:
    """A stored value as table text: never read as rich markup (`[/oops]` in a message is text)."""
    return escape("" if value is None else str(value))


def _print_json(data: Any) -> None:
    typer.echo(json.dumps(data, indent=2, default=str))


# -- services -----------------------------------------------------------------------------------


@app.command()
def executor() -> None:
    """Run the executor: intake, scheduling and the liveness machinery."""
    from executor.service import main

    settings = _settings()
    configure_logging(settings.logging, service="executor")
    with _one_line(settings, "executor"):
        try:
            _serve(main(settings))
        except RuntimeError as exc:  # a refusal to start, or a loop that died (logged with its cause)
            typer.echo(f"executor: {exc}", err=True)
            raise typer.Exit(1) from None


@app.command()
def dashboard(
    host: str | None = typer.Option(None, "--host", help="Address to listen on (default: dashboard.host, 127.0.0.1)."),
    port: int | None = typer.Option(None, "--port", min=1, max=65535, help="Port (default: dashboard.port, 8080)."),
) -> None:
    """Run the web dashboard: workers, executions and their timelines, live; actions with dashboard.token."""
    from dashboard.app import serve

    settings = _settings()
    if host is not None or port is not None:
        settings = settings.model_copy(update={"dashboard": settings.dashboard.model_copy(
            update={k: v for k, v in (("host", host), ("port", port)) if v is not None})})
    configure_logging(settings.logging, service="dashboard")
    with _one_line(settings, "dashboard"):
        if not asyncio.run(serve(settings)):
            typer.echo(f"dashboard: cannot listen on {settings.dashboard.host}:{settings.dashboard.port} "
                       "(see the line above): choose another --host or --port", err=True)
            raise typer.Exit(1)


@app.command()
def worker(
    name: str | None = typer.Option(None, "--name", help="Worker name (default: worker.name in config)."),
    concurrency: int | None = typer.Option(None, "--concurrency", min=1, help="Executions run at once."),
    runtimes: str | None = typer.Option(None, "--runtimes", help="Comma-separated: python,shell."),
) -> None:
    """Run a worker that takes dispatches from its own queue."""
    overrides: dict[str, Any] = {}
    if name:
        overrides["name"] = name
    if concurrency:
        overrides["max_concurrent_tasks"] = concurrency
    if runtimes:
        overrides["runtimes"] = [r.strip() for r in runtimes.split(",") if r.strip()]
    base = _settings()
    try:
        settings = Settings.model_validate(
            {**base.model_dump(by_alias=True), "worker": {**base.worker.model_dump(by_alias=True), **overrides}}
        )
    except ValidationError as exc:
        typer.echo(f"invalid worker options: {exc}", err=True)
        raise typer.Exit(2) from None
    from worker.service import WorkerService, default_name

    if not settings.worker.name:
        settings.worker.name = default_name()
    worker_name = settings.worker.name

    configure_logging(settings.logging, service="worker", worker=settings.worker.name)

    async def main() -> None:
        stop_event = asyncio.Event()
        loop = asyncio.get_running_loop()
        signals = {"count": 0}

        def on_signal() -> None:
            signals["count"] += 1
            if signals["count"] > 1:
                os._exit(1)  # a second signal: stop at once, recovery takes it from here
            stop_event.set()

        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, on_signal)
        await WorkerService(settings, worker_name).run(stop_event)

    with _one_line(settings, f"worker {settings.worker.name}"):
        try:
            _serve(main())
        except RuntimeError as exc:
            typer.echo(f"worker {settings.worker.name}: {exc}", err=True)
            raise typer.Exit(1) from None


# -- posting ------------------------------------------------------------------------------------


@app.command()
def submit(
    action_ref: str = typer.Argument(..., help="Action to run, e.g. core.echo."),
    params: list[str] = typer.Argument(None, help="Parameters as key=value."),
    params_json: str | None = typer.Option(None, "--params-json", help="Parameters as a JSON object."),
    idempotency_key: str | None = typer.Option(None, "--idempotency-key"),
    timeout: float | None = typer.Option(None, "--timeout", help="Action timeout in seconds."),
    delay: str | None = typer.Option(None, "--delay", help="Run no sooner than this from now (e.g. 10m, 90s)."),
    at: str | None = typer.Option(None, "--at", help="Run no sooner than this time (RFC 3339, e.g. 2026-12-01T09:00Z)."),
    max_retries: int | None = typer.Option(None, "--max-retries", min=0, help="Retries of a failure (overrides the action's)."),
    wait: bool = typer.Option(False, "--wait", help="Wait for the outcome; exit 0 only if completed."),
    wait_timeout: float | None = typer.Option(None, "--wait-timeout", help="Give up waiting after this many seconds."),
    progress: bool | None = typer.Option(None, "--progress/--no-progress", help="With --wait, show status changes as they happen (default: on a terminal)."),
    accept_wait: float = typer.Option(5.0, "--accept-wait", min=0.1, help="Say so if no executor has recorded the request by then."),
    as_json: bool = typer.Option(False, "--json"),
) -> None:
    """Post an invocation to the queue."""
    from common.client import BatonClient, RequestRejected, coerce_key_values

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
                    action_ref, parameters, idempotency_key=idempotency_key, timeout_s=timeout, watch=wait,
                    max_retries=max_retries, delay_s=delay_s, not_before=not_before, accept_timeout_s=accept_wait,
                )
            except RequestRejected as exc:
                typer.echo(f"request rejected: {exc}", err=True)
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
                    f"no executor has answered within {accept_wait:g} s: execution {submission.execution_id} is posted "
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
                execution = await client.wait(submission.execution_id, wait_timeout)
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
            when = dt.datetime.fromisoformat(at.replace("Z", "+00:00").replace("z", "+00:00"))
        except ValueError:
            raise ValueError(f"--at {at!r} is not an RFC 3339 time (e.g. 2026-12-01T09:00Z)") from None
        if when.tzinfo is None:
            raise ValueError(f"--at {at!r} names no time zone: add Z or an offset such as +01:00")
        return None, when
    return None, None


# -- reading ------------------------------------------------------------------------------------


def _show(execution: dict[str, Any]) -> None:
    table = Table(show_header=False, box=None)
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
        step_table = Table(title="steps")
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
        ev_table = Table(title="timeline")
        for column in ("seq", "at", "event", "what happened"):
            ev_table.add_column(column)
        for seq, offset, kind, what in timeline(events):
            ev_table.add_row(_cell(seq), _cell(offset), _styled(kind) if kind in STATUS_STYLE else _cell(kind), _cell(what))
        console.print(ev_table)


def _run_client(fn: Callable[[BatonClient], Awaitable[_T]]) -> _T:
    from common.client import BatonClient

    settings = _client_settings()

    async def main() -> _T:
        async with BatonClient(settings) as client:
            return await fn(client)

    try:
        with _one_line(settings, "baton"):
            return asyncio.run(main())
    except ValueError as exc:
        typer.echo(str(exc), err=True)
        raise typer.Exit(2) from None


def _client_settings() -> Settings:
    """Settings for a command that talks to PostgreSQL and RabbitMQ as a client: its waits for
    them are logged to stderr as they happen, in the configured format, warnings and up."""
    settings = _settings()
    configure_logging(settings.logging.model_copy(update={"level": "warning"}), service="cli")
    return settings


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

    async def go(c: BatonClient) -> list[dict[str, Any]]:
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
    table = Table()
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
        when = dt.datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        raise ValueError(f"{option} {value!r} is neither a time (2026-11-30T12:00Z) nor an age (30m, 2h, 7d)") from None
    return when if when.tzinfo else when.replace(tzinfo=dt.UTC)


@executions_app.command("tail")
def executions_tail(
    execution_id: str = typer.Argument(..., help="An id, or a unique prefix of one."),
    poll: float = typer.Option(0.5, "--poll", min=0.05, help="Seconds between looks."),
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
            if execution["status"] in ("completed", "failed", "timeout", "cancelled"):
                return 0 if execution["status"] == "completed" else 1
            await asyncio.sleep(poll)

    raise typer.Exit(_run_client(go))


@executions_app.command("watch")
def executions_watch(
    status: str | None = typer.Option(None, "--status"),
    action: str | None = typer.Option(None, "--action"),
    worker: str | None = typer.Option(None, "--worker"),
    limit: int = typer.Option(20, "--limit", min=1, max=200),
    interval: float = typer.Option(1.0, "--interval", min=0.1, help="Seconds between refreshes."),
) -> None:
    """A live table of the newest executions (Ctrl-C to stop)."""
    from rich.live import Live

    def render(rows: list[dict[str, Any]]) -> Table:
        table = Table(title=f"newest executions, every {interval:g} s (Ctrl-C to stop)")
        for column in ("id", "action", "status", "attempt", "worker", "created", "error"):
            table.add_column(column)
        for r in rows:
            table.add_row(_cell(str(r["id"])[:8]), _cell(r["action_ref"]), _styled(r["status"]), _cell(r["attempt"]),
                          _cell(r["worker"]), _cell(str(r["created_at"])[11:19]),
                          _cell(((r["error"] or {}).get("error") or "")[:50]))
        return table

    async def go(c: BatonClient) -> int:
        with Live(render([]), console=console, refresh_per_second=4) as live:
            while True:
                live.update(render(await c.list_page(status=status, action_ref=action, worker=worker, limit=limit)))
                await asyncio.sleep(interval)

    try:
        _run_client(go)
    except KeyboardInterrupt:
        raise typer.Exit(0) from None


@executions_app.command("show")
def executions_show(execution_id: str, as_json: bool = typer.Option(False, "--json")) -> None:
    """One execution with its events."""
    execution = _run_client(lambda c: c.get(execution_id))
    if execution is None:
        typer.echo(f"no execution {execution_id}", err=True)
        raise typer.Exit(1)
    if as_json:
        _print_json(execution)
    else:
        _show(execution)


def _control(fn: Callable[[BatonClient], Awaitable[str]]) -> None:
    typer.echo(_run_client(fn))  # one plain line: never wrapped, never read as markup


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


@schedules_app.command("add")
def schedules_add(
    name: str = typer.Argument(..., help="The schedule's name."),
    action_ref: str = typer.Argument(..., help="The action each due time runs."),
    params: list[str] = typer.Argument(None, help="Parameters as key=value."),
    cron_expr: str = typer.Option(..., "--cron", help='Five fields, or six with seconds last, e.g. "*/5 * * * *".'),
    params_json: str | None = typer.Option(None, "--params-json", help="Parameters as a JSON object."),
    catch_up: str = typer.Option("latest", "--catch-up", help="Missed due times: latest, all or none."),
    timezone: str = typer.Option("UTC", "--timezone", help="The zone the expression is read in."),
) -> None:
    """Add or change a schedule (YAML schedules are changed in the YAML)."""
    from common.client import coerce_key_values

    async def go(c: BatonClient) -> str:
        try:
            parameters = json.loads(params_json) if params_json else {}
        except json.JSONDecodeError as exc:
            raise ValueError(f"--params-json is not JSON: {exc}") from None
        if not isinstance(parameters, dict):
            raise ValueError("--params-json must be a JSON object")
        parameters.update(coerce_key_values(params or [], await c.action_schema(action_ref)))
        row = await c.add_schedule(name, cron_expr, action_ref, parameters, catch_up=catch_up, timezone=timezone)
        return f"schedule {name}: {cron_expr} ({timezone}) runs {action_ref}; next at {row['next_fire_at']}"

    _control(go)


@schedules_app.command("list")
def schedules_list(as_json: bool = typer.Option(False, "--json")) -> None:
    """Every schedule, from the YAML and added by hand."""
    rows = _run_client(lambda c: c.list_schedules())
    if as_json:
        _print_json(rows)
        return
    table = Table()
    for column in ("name", "cron", "zone", "action", "catch-up", "source", "next", "last fired"):
        table.add_column(column)
    for r in rows:
        table.add_row(*(_cell(r[k]) for k in ("name", "cron", "timezone", "action_ref", "catch_up", "source",
                                               "next_fire_at", "last_fired_at")))
    console.print(table)


@schedules_app.command("remove")
def schedules_remove(name: str = typer.Argument(..., help="The schedule's name.")) -> None:
    """Remove a schedule (one from the YAML comes back at the next executor start: remove it there)."""

    async def go(c: BatonClient) -> str:
        await c.remove_schedule(name)
        return f"schedule {name}: removed"

    _control(go)


@actions_app.command("list")
def actions_list(as_json: bool = typer.Option(False, "--json")) -> None:
    """Every action: Baton's built-ins and those workers registered."""
    specs = _run_client(lambda c: c.list_actions())
    if as_json:
        _print_json([s.model_dump() for s in specs])
        return
    table = Table()
    for column in ("action", "runtime", "version", "kind", "timeout", "retries", "limit", "description"):
        table.add_column(column)
    for a in specs:
        kind = "durable workflow" if a.durable else "action"
        table.add_row(_cell(a.ref), _cell(a.runtime), _cell(a.version), _cell(kind),
                      _cell(f"{a.timeout_s:g} s" if a.timeout_s else "-"), _cell(a.retries or 0),
                      _cell(a.max_concurrency or "-"), _cell((a.description or "").splitlines()[0][:60] if a.description else ""))
    console.print(table)


@actions_app.command("show")
def actions_show(action_ref: str, as_json: bool = typer.Option(False, "--json")) -> None:
    """One action: runtime, parameters, timeout, retries, concurrency and recovery policy."""
    from common.recovery import resolve_policy

    settings = _settings()
    spec = _run_client(lambda c: c.action(action_ref))
    if spec is None:
        typer.echo(f"no action {action_ref!r}: see `baton actions list`", err=True)
        raise typer.Exit(1)
    policy = resolve_policy(spec, settings.recovery)
    limit = settings.executor.max_concurrency.get(spec.ref, spec.max_concurrency)
    details = {
        **spec.model_dump(exclude={"parameters_schema"}),
        "recovery": {"recover_on_worker_loss": policy.recover_on_worker_loss,
                     "max_recovery_attempts": policy.max_recovery_attempts},
        "max_concurrency_in_force": limit,
        "parameters_schema": spec.parameters_schema,
    }
    if as_json:
        _print_json(details)
        return
    table = Table(show_header=False, box=None)
    for key, value in details.items():
        table.add_row(f"[bold]{key}[/bold]", _cell(json.dumps(value, indent=2) if isinstance(value, dict) else value))
    console.print(table)


@rejected_app.command("list")
def rejected_list(
    limit: int = typer.Option(100, "--limit", min=1), as_json: bool = typer.Option(False, "--json"),
) -> None:
    """Parked requests with their reasons, oldest first; they stay parked."""
    parked = _run_client(lambda c: c.list_rejected(limit=limit))
    if as_json:
        _print_json([{"key": p.key, "reason": p.reason, "message_id": p.message_id, "truncated": p.truncated,
                      "body": p.preview(4096)} for p in parked])
        return
    table = Table()
    for column in ("key", "reason", "message id", "body"):
        table.add_column(column)
    for p in parked:
        table.add_row(_cell(p.key), _cell(p.reason), _cell(p.message_id), _cell(p.preview(80)))
    console.print(table)


@rejected_app.command("replay")
def rejected_replay(key: str = typer.Argument(..., help="The key `baton rejected list` shows.")) -> None:
    """Post a parked request again, as it came, and take it off the parking queue."""

    async def go(c: BatonClient) -> str:
        parked = await c.replay_rejected(key)
        return f"parked request {parked.key} posted again (message id {parked.message_id})"

    _control(go)


@workers_app.command("list")
def workers_list(as_json: bool = typer.Option(False, "--json")) -> None:
    """Workers with their state, heartbeat age and in-flight count (0 for a stopped one)."""
    rows = _run_client(lambda c: c.list_workers())
    if as_json:
        _print_json(rows)
        return
    table = Table()
    for column in ("name", "status", "runtimes", "in flight", "concurrency", "heartbeat age", "host", "pid"):
        table.add_column(column)
    for r in rows:
        age = r["heartbeat_age_s"]
        table.add_row(
            _cell(r["name"]),
            _styled(r["status"]),
            _cell(",".join(r["runtimes"])),
            _cell(r["in_flight"]),
            _cell(r["max_concurrent_tasks"]),
            "-" if age is None else f"{float(age):.1f}s",
            _cell(r["hostname"]),
            _cell(r["pid"]),
        )
    console.print(table)


@workers_app.command("prune")
def workers_prune(
    older_than: str = typer.Option("1d", "--older-than", help="Stopped or lost for longer than this (e.g. 1h, 7d)."),
) -> None:
    """Remove `inactive` and `lost` workers not seen for a while, with their queues if empty."""
    try:
        age_s = parse_age(older_than)
    except ValueError as exc:
        typer.echo(f"--older-than: {exc}", err=True)
        raise typer.Exit(2) from None

    async def go(c: BatonClient) -> str:
        removed, kept = await c.prune_workers(age_s)
        note = f"; queues kept (still holding dispatches): {', '.join(kept)}" if kept else ""
        return f"removed {len(removed)} worker(s) stopped or lost for over {older_than}" + (
            f": {', '.join(removed)}" if removed else "") + note

    _control(go)


@executions_app.command("prune")
def executions_prune(
    older_than: str = typer.Option(..., "--older-than", help="Age of finished executions to delete: 30d, 12h, 90m."),
) -> None:
    """Delete finished executions (and their events) older than the given age, in batches."""
    from common import db
    from common.retention import prune_executions

    try:
        older_than_s = parse_age(older_than)
    except ValueError as exc:
        typer.echo(f"--older-than: {exc}", err=True)
        raise typer.Exit(2) from None
    settings = _settings()

    async def main() -> int:
        pool = await db.connect(settings.database.url, max_size=1, max_wait_s=settings.database.startup_wait_s)
        try:
            return await prune_executions(pool, older_than_s=older_than_s, batch_size=settings.retention.batch_size)
        finally:
            await pool.close()

    typer.echo(f"deleted {asyncio.run(main())} finished execution(s) older than {older_than}")


def parse_age(value: str) -> float:
    """Seconds from a duration that may also be given in days (``30d``)."""
    text = value.strip()
    if text.endswith("d") and text[:-1].replace(".", "", 1).isdigit():
        return float(text[:-1]) * 86400
    return parse_duration(text)


@app.command()
def health(
    service: str | None = typer.Option(
        None, "--service", help="executor, worker or dashboard: also require that local service to be alive and connected."
    ),
) -> None:
    """Check that PostgreSQL and RabbitMQ are reachable and, with --service, that the local
    executor or worker is alive and connected (read from its health file). Exit 0 when healthy."""
    from common import health as health_files

    settings = _settings()
    ok = True
    if service == "dashboard":
        healthy, line = _dashboard_answers(settings)
        ok &= healthy
        typer.echo(f"dashboard: {line}")
    elif service is not None:
        if service not in ("executor", "worker"):
            typer.echo("--service must be executor, worker or dashboard", err=True)
            raise typer.Exit(2)
        path = settings.executor.health_file if service == "executor" else settings.worker.health_file
        if path is None:
            typer.echo(f"{service}.health_file is not set, so the {service} writes no health file: set it in the config", err=True)
            raise typer.Exit(2)
        # A few missed beats are tolerated: the executor writes every 2 s, a worker every heartbeat.
        max_age_s = 10.0 if service == "executor" else max(3 * settings.worker.heartbeat_interval_s, 10.0)
        healthy, line = health_files.check(path, max_age_s)
        ok &= healthy
        typer.echo(f"{service}: {line}")
    for name, reachable, line in asyncio.run(_probe(settings)):
        ok &= reachable
        typer.echo(f"{name}: {line}")
    raise typer.Exit(0 if ok else 1)


def _dashboard_answers(settings: Settings) -> tuple[bool, str]:
    """Whether the local dashboard answers its health page (which reads the database)."""
    import urllib.error
    import urllib.request

    host = "127.0.0.1" if settings.dashboard.host in ("0.0.0.0", "::") else settings.dashboard.host
    url = f"http://{host}:{settings.dashboard.port}/healthz"
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            return response.status == 200, f"answers at {host}:{settings.dashboard.port}"
    except (urllib.error.URLError, OSError) as exc:
        return False, f"does not answer at {host}:{settings.dashboard.port}: {getattr(exc, 'reason', exc)}"


async def _probe(settings: Settings) -> list[tuple[str, bool, str]]:
    import aio_pika
    import asyncpg

    from common.retry import TRANSIENT_ERRORS

    postgresql_errors: tuple[type[BaseException], ...] = (*TRANSIENT_ERRORS, asyncpg.PostgresError)
    rabbitmq_errors: tuple[type[BaseException], ...] = (*TRANSIENT_ERRORS, aio_pika.exceptions.AMQPError)
    results = []
    try:
        conn = await asyncpg.connect(settings.database.url, timeout=5)
        await conn.close()
        results.append(("postgresql", True, f"reachable at {_where(settings.database.url)}"))
    except postgresql_errors as exc:
        results.append(("postgresql", False, f"cannot connect to {_where(settings.database.url)}: {type(exc).__name__}: {exc}"))
    try:
        connection = await asyncio.wait_for(aio_pika.connect(settings.message_queue.url), 5)
        await connection.close()
        results.append(("rabbitmq", True, f"reachable at {_where(settings.message_queue.url)}"))
    except rabbitmq_errors as exc:
        results.append(("rabbitmq", False, f"cannot connect to {_where(settings.message_queue.url)}: {type(exc).__name__}: {exc}"))
    return results


def _where(url: str) -> str:
    """host:port of a URL, never its credentials."""
    from urllib.parse import urlsplit

    parts = urlsplit(url)
    return f"{parts.hostname}:{parts.port}" if parts.port else str(parts.hostname)


@db_app.command("migrate")
def db_migrate() -> None:
    """Apply pending schema migrations (the executor also does this at start)."""
    from common import db

    settings = _settings()
    configure_logging(settings.logging, service="migrate")

    async def main() -> list[str]:
        await db.ensure_database(settings.database.url)
        pool = await db.connect(settings.database.url, max_size=1, max_wait_s=settings.database.startup_wait_s)
        try:
            return await db.migrate(pool)
        finally:
            await pool.close()

    applied = asyncio.run(main())
    typer.echo(f"applied {len(applied)} migration(s)" + (": " + ", ".join(applied) if applied else ""))


def _global_options(argv: list[str]) -> list[str]:
    """`--config PATH` and `--debug` are taken wherever they stand (before or after the command)."""
    out: list[str] = []
    rest = iter(argv)
    for arg in rest:
        if arg == "--debug":
            DEBUG["on"] = True
        elif arg == "--config" or arg.startswith("--config="):
            path = arg.partition("=")[2] if "=" in arg else next(rest, "")
            if not path:
                typer.echo("--config needs a path", err=True)
                sys.exit(2)
            if not os.path.exists(path):
                typer.echo(f"configuration error: --config {path}: no such file", err=True)
                sys.exit(2)
            os.environ["BATON_CONFIG"] = path
        else:
            out.append(arg)
    return out


@app.callback()
def _help_for_global_options(
    config: str | None = typer.Option(None, "--config", help="The YAML settings file (else BATON_CONFIG, else config/config.yaml); on any command."),
    debug: bool = typer.Option(False, "--debug", help="Show tracebacks instead of one-line errors; on any command."),
) -> None:
    """Shown in `baton --help`; both are taken out of the command line before it is parsed."""


def main() -> None:  # console script entry
    sys.exit(app(args=_global_options(sys.argv[1:]), prog_name="baton"))


if __name__ == "__main__":  # `python -m common.cli`, for tests and scripts that lack the console script
    main()

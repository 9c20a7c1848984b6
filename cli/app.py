"""The `baton` command line: the typer app and its sub-commands, and what every command shares
(settings, one-line failures, tables, the client)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import sys
import threading
from collections.abc import Awaitable, Callable, Coroutine, Iterator
from typing import TYPE_CHECKING, Any, TypeVar
from urllib.parse import urlsplit

import aiormq.exceptions
import asyncpg
import typer
import yaml
from pydantic import ValidationError
from rich.console import Console
from rich.markup import escape

from common.deadline import wait_unwound
from common.logging import configure_logging, get_logger
from common.retry import TRANSIENT_ERRORS
from common.settings import Settings, load_settings
from common.values import parse_duration, where

if TYPE_CHECKING:
    from rich.table import Table

    from common.client import BatonClient

_T = TypeVar("_T")

log = get_logger("baton.cli")

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


def run_on_uvloop(main: Coroutine[Any, Any, _T]) -> _T:
    """Run a main coroutine (a service's, or a benchmark's) to its result, on uvloop where it is
    available (a faster event loop), as `asyncio.run` does (a first Ctrl+C cancels it and lets its
    clean-up run, then raises KeyboardInterrupt) but for one thing: what is still running once it
    returns is given `STOP_STEP_TIMEOUT_S` to unwind after its cancel, not forever. A service
    stops in bounded time, leaving behind only what cannot end in time (a query the network
    swallowed, which asyncpg unwinds only once its cancel request gets through)."""
    try:
        import uvloop
    except ImportError:
        loop = asyncio.new_event_loop()
    else:
        loop = uvloop.new_event_loop()
    asyncio.set_event_loop(loop)
    try:
        task = loop.create_task(main)
        with _sigint_cancels(loop, task) as interrupted:
            try:
                return loop.run_until_complete(task)
            except asyncio.CancelledError:
                if interrupted():
                    raise KeyboardInterrupt from None
                raise
    finally:
        try:
            _cancel_left_behind(loop)
            loop.run_until_complete(loop.shutdown_asyncgens())
            loop.run_until_complete(loop.shutdown_default_executor())
        finally:
            asyncio.set_event_loop(None)
            loop.close()


@contextlib.contextmanager
def _sigint_cancels(loop: asyncio.AbstractEventLoop, task: asyncio.Task[Any]) -> Iterator[Callable[[], bool]]:
    """While the main task runs, a first SIGINT cancels it (its clean-up runs) and a second raises
    KeyboardInterrupt, as `asyncio.Runner` does; unless someone else handles SIGINT (a service's
    own signal handlers, installed on the loop, take precedence)."""
    count = 0
    if threading.current_thread() is not threading.main_thread() or (
        signal.getsignal(signal.SIGINT) is not signal.default_int_handler
    ):
        yield lambda: False
        return

    def on_sigint(_signum: int, _frame: object) -> None:
        nonlocal count
        count += 1
        if count == 1 and not task.done():
            task.cancel()
            loop.call_soon_threadsafe(lambda: None)  # wake the loop
            return
        raise KeyboardInterrupt

    signal.signal(signal.SIGINT, on_sigint)
    try:
        yield lambda: count > 0
    finally:
        if signal.getsignal(signal.SIGINT) is on_sigint:
            signal.signal(signal.SIGINT, signal.default_int_handler)


def _cancel_left_behind(loop: asyncio.AbstractEventLoop) -> None:
    tasks = asyncio.all_tasks(loop)
    for task in tasks:
        task.cancel()
    pending = loop.run_until_complete(wait_unwound(tasks, log, "tasks"))
    if not pending:
        return

    def report(loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        # Each left-behind task is said once (`wait_unwound`): not again as the closed loop lets it go.
        if context.get("task") not in pending:
            loop.default_exception_handler(context)

    loop.set_exception_handler(report)


#: Set by `--debug` (anywhere on the command line): tracebacks instead of one-line errors.
DEBUG = {"on": False}


def first_error(exc: ValidationError) -> str:
    """A validation error as one line: where the first problem is, what it is, and how many more."""
    first = exc.errors(include_url=False, include_input=False)[0]
    where = ".".join(str(p) for p in first["loc"])
    more = f" (and {exc.error_count() - 1} more)" if exc.error_count() > 1 else ""
    return f"{where}: {first['msg']}{more}"


def _settings(**overrides: Any) -> Settings:
    path = os.environ.get("BATON_CONFIG", "config/config.yaml")
    try:
        return load_settings(**overrides)
    except ValidationError as exc:
        typer.echo(f"configuration error in {path}: {first_error(exc)}", err=True)
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


def _table(**options: Any) -> Table:
    """A rich table; rich's tables load with the first one (most commands, and every service, print none)."""
    from rich.table import Table

    return Table(**options)


def _cell(value: Any) -> str:
    """A stored value as table text: never read as rich markup (`[/oops]` in a message is text)."""
    return escape("" if value is None else str(value))


def _print_json(data: Any) -> None:
    typer.echo(json.dumps(data, indent=2, default=str))



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



def _control(fn: Callable[[BatonClient], Awaitable[str]]) -> None:
    typer.echo(_run_client(fn))  # one plain line: never wrapped, never read as markup



def parse_age(value: str) -> float:
    """Seconds from a duration that may also be given in days (``30d``)."""
    text = value.strip()
    if text.endswith("d") and text[:-1].replace(".", "", 1).isdigit():
        return float(text[:-1]) * 86400
    return parse_duration(text)


def age_option_s(option: str, value: str) -> float:
    """``value`` of an age option (``--older-than``) in seconds; one line naming the option and
    exit status 2 if it is not a duration."""
    try:
        return parse_age(value)
    except ValueError as exc:
        typer.echo(f"{option}: {exc}", err=True)
        raise typer.Exit(2) from None



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



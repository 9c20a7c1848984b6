"""`baton executor`, `worker`, `dashboard`, `health` and `db migrate`: the services and their checks."""

from __future__ import annotations

import asyncio
import os
import signal
from typing import Any

import asyncpg
import typer
from pydantic import ValidationError

from cli.app import (
    _one_line,
    _settings,
    app,
    db_app,
    first_error,
    run_on_uvloop,
    startup_failure,
)
from common.errors import describe
from common.logging import configure_logging
from common.retry import AUTH_ERRORS, TRANSIENT_ERRORS
from common.settings import Settings
from common.values import where

# -- services -----------------------------------------------------------------------------------


@app.command()
def executor() -> None:
    """Run the executor: intake, scheduling and the liveness machinery."""
    from executor.service import main

    settings = _settings()
    configure_logging(settings.logging, service="executor")
    with _one_line(settings, "executor"):
        try:
            run_on_uvloop(main(settings))
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
        typer.echo(f"invalid worker option {first_error(exc)}: fix --name, --concurrency or --runtimes", err=True)
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
            run_on_uvloop(main())
        except RuntimeError as exc:
            typer.echo(f"worker {settings.worker.name}: {exc}", err=True)
            raise typer.Exit(1) from None



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
        return False, (f"does not answer at {host}:{settings.dashboard.port} ({getattr(exc, 'reason', exc)}): "
                       "start `baton dashboard`, or fix dashboard.host and dashboard.port")


async def _probe(settings: Settings) -> list[tuple[str, bool, str]]:
    import aio_pika


    postgresql_errors: tuple[type[BaseException], ...] = (*TRANSIENT_ERRORS, asyncpg.PostgresError)
    rabbitmq_errors: tuple[type[BaseException], ...] = (*TRANSIENT_ERRORS, aio_pika.exceptions.AMQPError)
    results = []
    try:
        conn = await asyncpg.connect(settings.database.url, timeout=5)
        await conn.close()
        results.append(("postgresql", True, f"reachable at {where(settings.database.url)}"))
    except postgresql_errors as exc:
        line = _unreachable(settings, "PostgreSQL", settings.database.url, "database.url", exc)
        results.append(("postgresql", False, line))
    try:
        connection = await asyncio.wait_for(aio_pika.connect(settings.message_queue.url), 5)
        await connection.close()
        results.append(("rabbitmq", True, f"reachable at {where(settings.message_queue.url)}"))
    except rabbitmq_errors as exc:
        line = _unreachable(settings, "RabbitMQ", settings.message_queue.url, "message_queue.url", exc)
        results.append(("rabbitmq", False, line))
    return results


def _unreachable(settings: Settings, service: str, url: str, setting: str, exc: BaseException) -> str:
    """One line for a dependency the health check could not connect to, and what to do: the
    startup's own line where it names the fix (a login refused, no such database)."""
    if (isinstance(exc, AUTH_ERRORS) or not isinstance(exc, TRANSIENT_ERRORS)) and (
        line := startup_failure(exc, settings)
    ) is not None:
        return line
    return (f"cannot connect to {service} at {where(url)} ({describe(exc, max_chars=200)}): "
            f"start {service} there, or fix {setting} (user, password, host, port)")


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



"""`baton actions`, `schedules`, `rejected` and `workers`: the catalogue, cron schedules, parked
requests and workers."""

from __future__ import annotations

import json
from typing import TYPE_CHECKING

import typer

from cli.app import (
    _cell,
    _control,
    _print_json,
    _run_client,
    _settings,
    _styled,
    _table,
    actions_app,
    age_option_s,
    console,
    rejected_app,
    schedules_app,
    workers_app,
)

if TYPE_CHECKING:
    from common.client import BatonClient

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
    table = _table()
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
    table = _table()
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
    table = _table(show_header=False, box=None)
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
    table = _table()
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
    table = _table()
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
    age_s = age_option_s("--older-than", older_than)

    async def go(c: BatonClient) -> str:
        removed, kept = await c.prune_workers(age_s)
        note = f"; queues kept (still holding dispatches): {', '.join(kept)}" if kept else ""
        return f"removed {len(removed)} worker(s) stopped or lost for over {older_than}" + (
            f": {', '.join(removed)}" if removed else "") + note

    _control(go)



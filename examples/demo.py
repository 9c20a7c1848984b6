"""`make demo`: an executor and two workers, a handful of invocations, a table of results.

Runs against the local PostgreSQL and RabbitMQ with its own database (`baton_demo`) and name
prefix (`baton_demo`), so it never touches a real deployment's state. Every service is a real
process, stopped at the end with SIGTERM, as a deployment would stop it.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from common.client import BatonClient
from common.settings import load_settings
from common.timeline import timeline

REPO = Path(__file__).resolve().parents[1]
DATABASE = os.environ.get("BATON_DEMO_DATABASE", "postgresql://postgres@127.0.0.1:5432/baton_demo")
PREFIX = os.environ.get("BATON_DEMO_PREFIX", "baton_demo")
#: How much of a dead service's log the demo shows.
LOG_TAIL_LINES = 40
#: How often the demo looks at its services while it waits.
POLL_S = 0.1

INVOCATIONS: list[tuple[str, dict[str, Any], float | None]] = [
    ("core.echo", {"message": "hello from Baton"}, None),
    ("core.local", {"cmd": ["uname", "-sr"]}, None),
    ("core.local", {"cmd": 'echo "sum: $((A + B))"', "env": {"A": "2", "B": "3"}}, None),
    ("examples.add", {"a": 1.5, "b": 2.25}, None),
    ("core.local", {"cmd": "echo about to fail >&2; exit 3"}, None),
    ("examples.divide", {"a": 1, "b": 0}, None),
    ("core.sleep", {"seconds": 5}, 0.5),
    ("core.noop", {}, None),
]

console = Console()


def _spawn(args: list[str], log_dir: Path, label: str) -> subprocess.Popen:
    env = dict(os.environ)
    env.update(
        BATON_CONFIG=str(REPO / "config" / "config.yaml"),
        BATON__DATABASE__URL=DATABASE,
        BATON__MESSAGE_QUEUE__PREFIX=PREFIX,
        BATON__WORKER__ACTION_MODULES='["examples.actions", "examples.workflows"]',
        BATON__WORKER__HEARTBEAT_INTERVAL="1",
        BATON__EXECUTOR__SWEEP_INTERVAL="1",
        BATON_EXAMPLE_LEDGER=str(log_dir / "ledger.txt"),
    )
    log = open(log_dir / f"{label}.log", "wb")  # noqa: SIM115 - closed with the process
    return subprocess.Popen([sys.executable, "-m", "cli", *args], cwd=REPO, env=env, stdout=log, stderr=log)


class ServiceDied(Exception):
    def __init__(self, name: str, code: int) -> None:
        super().__init__(f"{name} exited with code {code}")
        self.name = name
        self.code = code


class DemoFailed(Exception):
    pass


async def _watch(services: dict[str, subprocess.Popen]) -> None:
    """Return never; raise ServiceDied the moment one of the services exits."""
    while True:
        for name, process in services.items():
            code = process.poll()
            if code is not None:
                raise ServiceDied(name, code)
        await asyncio.sleep(POLL_S)


async def _watching(services: dict[str, subprocess.Popen], work: Any) -> Any:
    """Await ``work`` while watching the services: if one dies first, ``work`` is cancelled and
    ServiceDied raised at once, rather than after the timeout of whatever ``work`` waits for."""
    task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(_watch(services))
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
        if not task.done():
            watcher.result()  # raises ServiceDied
        return task.result()
    finally:
        for pending in (task, watcher):
            if not pending.done():
                pending.cancel()
        await asyncio.gather(task, watcher, return_exceptions=True)


def _log_tail(log_dir: Path, label: str, lines: int = LOG_TAIL_LINES) -> list[str]:
    try:
        text = (log_dir / f"{label}.log").read_text(errors="replace")
    except OSError as exc:
        return [f"(no log: {exc})"]
    return text.splitlines()[-lines:]


def _print_tail(log_dir: Path, label: str) -> None:
    for line in _log_tail(log_dir, label) or ["(empty)"]:
        console.print("  " + line, markup=False, highlight=False, soft_wrap=True)


def _report_death(died: ServiceDied, log_dir: Path) -> None:
    how = f"exit code {died.code}"
    if died.code < 0:
        with contextlib.suppress(ValueError):
            how += f" (killed by {signal.Signals(-died.code).name})"
    console.print(f"[red bold]{died.name} died with {how}[/]; the last lines of its log:")
    _print_tail(log_dir, died.name)


def _stop(services: dict[str, subprocess.Popen], timeout_s: float = 60) -> dict[str, int]:
    """SIGTERM every service still running, then wait for each; their exit codes."""
    for process in services.values():
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
    codes = {}
    deadline = time.monotonic() + timeout_s
    for name, process in services.items():
        try:
            codes[name] = process.wait(timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            console.print(f"[red]{name} did not stop within {timeout_s} s of SIGTERM; killing it[/]")
            process.kill()
            codes[name] = process.wait()
    return codes


async def _wait_workers(client: BatonClient, names: set[str], timeout_s: float = 60) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            active = {w["name"] for w in await client.list_workers() if w["status"] == "active"}
        except Exception:  # noqa: BLE001 - the schema may not exist yet
            active = set()
        if names <= active:
            return
        await asyncio.sleep(0.2)
    raise DemoFailed(f"workers {sorted(names)} did not register within {timeout_s} s")


async def _run_invocations(client: BatonClient) -> list[dict[str, Any]]:
    submissions = []
    for action_ref, params, timeout_s in INVOCATIONS:
        submissions.append(await client.submit(action_ref, params, timeout_s=timeout_s, watch=True, accept_timeout_s=30))
    return [await client.wait(s.execution_id, timeout_s=60) for s in submissions]


async def _run_order(client: BatonClient, services: dict[str, subprocess.Popen], log_dir: Path) -> dict[str, Any]:
    """The order workflow, with the worker running it SIGKILLed while its `pack` step runs: the run
    resumes on the other worker from its last checkpoint."""
    ledger = log_dir / "ledger.txt"
    submission = await client.submit(
        "examples.order", {"order_id": "A-1001", "amount": 42.0, "pack_seconds": 3.0}, watch=True, accept_timeout_s=30
    )
    deadline = time.monotonic() + 60

    async def packing() -> dict[str, Any] | None:
        """The run, once `pack` is under way and the steps before it (and `print_label`, gathered
        with it) are recorded: the moment to kill its worker."""
        if not (ledger.exists() and " pack " in ledger.read_text()):
            return None
        run = await client.get(submission.execution_id)
        done = {e["data"].get("name") for e in (run or {}).get("events", []) if e["type"] == "step.completed"}
        return run if {"reserve_stock", "charge_card", "print_label"} <= done else None

    while (running := await packing()) is None:
        if time.monotonic() > deadline:
            raise DemoFailed("the order's pack step did not start within 60 s")
        await asyncio.sleep(POLL_S)
    victim = running["worker"]
    console.print(f"order {str(submission.execution_id)[:8]} is packing on {victim}: [red]SIGKILL {victim}[/]")
    process = services.pop(victim)
    process.kill()
    process.wait()
    return await client.wait(submission.execution_id, timeout_s=60)


def _print_order(order: dict[str, Any], log_dir: Path) -> bool:
    console.print(f"order workflow: [bold]{order['status']}[/] on {order['worker']} after "
                  f"{order['recovery_attempts']} recovery; result stage {order['result'] and order['result'].get('stage')}")
    table = Table(title="the order's timeline", width=80)
    for column, width in (("at", 8), ("event", 20), ("what happened", 46)):
        table.add_column(column, max_width=width, overflow="fold")
    for _, offset, kind, what in timeline(order["events"]):
        table.add_row(offset, kind, what)
    console.print(table)
    counts: dict[str, int] = {}
    for line in (log_dir / "ledger.txt").read_text().splitlines():
        counts[line.split()[1]] = counts.get(line.split()[1], 0) + 1
    steps = Table(title="how often each step ran", width=80)
    for column in ("step", "ran", "why"):
        steps.add_column(column)
    events = order["events"]
    killed_at = next((e["seq"] for e in events if e["type"] == "workflow.interrupted"), None)
    done_at = {e["data"].get("name"): e["seq"] for e in events if e["type"] == "step.completed"}
    for name in ("reserve_stock", "charge_card", "pack", "print_label", "send_email"):
        n = counts.get(name, 0)
        if n > 1:
            why = "running when the worker was killed: ran again (steps are at-least-once)"
        elif killed_at is not None and done_at.get(name, 0) < killed_at:
            why = "recorded before the kill: replayed, not run again"
        else:
            why = "ran after the resumption"
        steps.add_row(name, str(n), why)
    console.print(steps)
    once = all(counts.get(n) == 1 for n in ("reserve_stock", "charge_card", "print_label", "send_email"))
    return order["status"] == "completed" and order["recovery_attempts"] == 1 and once and counts.get("pack") == 2


async def run_demo(log_dir: Path) -> int:
    settings = load_settings(database={"url": DATABASE}, message_queue={"prefix": PREFIX})
    services = {
        "executor": _spawn(["executor"], log_dir, "executor"),
        "demo-python": _spawn(["worker", "--name", "demo-python", "--runtimes", "python"], log_dir, "demo-python"),
        "demo-python-2": _spawn(["worker", "--name", "demo-python-2", "--runtimes", "python"], log_dir, "demo-python-2"),
        "demo-shell": _spawn(["worker", "--name", "demo-shell", "--runtimes", "shell"], log_dir, "demo-shell"),
    }
    console.print(f"started executor and workers demo-python, demo-python-2, demo-shell (logs in {log_dir})")
    try:
        async with BatonClient(settings) as client:
            await _watching(services, _wait_workers(client, {"demo-python", "demo-python-2", "demo-shell"}))
            results = await _watching(services, _run_invocations(client))
            order = await _watching(services, _run_order(client, services, log_dir))
    except ServiceDied as died:
        _report_death(died, log_dir)
        codes = _stop(services)
        console.print("the other services stopped with SIGTERM; exit codes: " + _codes(codes, skip=died.name))
        return 1
    except DemoFailed as failed:
        codes = _stop(services)
        console.print(f"[red]{failed}[/]; services stopped with SIGTERM; exit codes: {_codes(codes)}")
        for name in services:
            console.print(f"[bold]{name}[/], the last lines of its log:")
            _print_tail(log_dir, name)
        return 1
    except BaseException:
        _stop(services)
        raise
    codes = _stop(services)

    table = Table(title="Baton demo: executions", width=80)
    for column in ("action", "status", "worker", "attempt", "result / error"):
        table.add_column(column)
    styles = {"completed": "green", "failed": "red", "timeout": "red"}
    for execution in results:
        status = execution["status"]
        if execution["error"]:
            detail = execution["error"]["error"]
        elif isinstance(execution["result"], dict) and "stdout" in execution["result"]:
            detail = execution["result"]["stdout"].strip()
        else:
            detail = json.dumps(execution["result"])
        table.add_row(
            execution["action_ref"],
            f"[{styles.get(status, 'white')}]{status}[/]",
            execution["worker"] or "",
            str(execution["attempt"]),
            detail[:70],
        )
    console.print(table)
    order_ok = _print_order(order, log_dir)
    console.print("services stopped with SIGTERM; exit codes: " + _codes(codes))
    expected = ["completed", "completed", "completed", "completed", "failed", "failed", "timeout", "completed"]
    ok = [r["status"] for r in results] == expected and all(c == 0 for c in codes.values()) and order_ok
    if not ok:
        console.print("[red]the demo did not go as expected; see the logs above[/red]")
    return 0 if ok else 1


def _codes(codes: dict[str, int], skip: str | None = None) -> str:
    return ", ".join(f"{n}={c}" for n, c in codes.items() if n != skip) or "none"


def main() -> None:
    log_dir = Path(tempfile.mkdtemp(prefix="baton-demo-"))
    sys.exit(asyncio.run(run_demo(log_dir)))


if __name__ == "__main__":
    main()

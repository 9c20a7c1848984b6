"""`make demo`: an executor and two workers, a handful of invocations, a table of results.

Runs against the local PostgreSQL and RabbitMQ with its own database (`baton_demo`) and name
prefix (`baton_demo`), so it never touches a real deployment's state. Every service is a real
process, stopped at the end with SIGTERM, as a deployment would stop it.
"""

from __future__ import annotations

import asyncio
import contextlib
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
        BATON__WORKER__ACTION_MODULES='["examples.actions"]',
        BATON__WORKER__HEARTBEAT_INTERVAL="1",
    )
    log = open(log_dir / f"{label}.log", "wb")  # noqa: SIM115 - closed with the process
    return subprocess.Popen([sys.executable, "-m", "common.cli", *args], cwd=REPO, env=env, stdout=log, stderr=log)


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


async def run_demo(log_dir: Path) -> int:
    settings = load_settings(database={"url": DATABASE}, message_queue={"prefix": PREFIX})
    services = {
        "executor": _spawn(["executor"], log_dir, "executor"),
        "demo-python": _spawn(["worker", "--name", "demo-python", "--runtimes", "python"], log_dir, "demo-python"),
        "demo-shell": _spawn(["worker", "--name", "demo-shell", "--runtimes", "shell"], log_dir, "demo-shell"),
    }
    console.print(f"started executor and workers demo-python, demo-shell (logs in {log_dir})")
    try:
        async with BatonClient(settings) as client:
            await _watching(services, _wait_workers(client, {"demo-python", "demo-shell"}))
            results = await _watching(services, _run_invocations(client))
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

    table = Table(title="Baton demo: executions")
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
            detail = str(execution["result"])
        table.add_row(
            execution["action_ref"],
            f"[{styles.get(status, 'white')}]{status}[/]",
            execution["worker"] or "",
            str(execution["attempt"]),
            detail[:70],
        )
    console.print(table)
    console.print("services stopped with SIGTERM; exit codes: " + _codes(codes))
    expected = ["completed", "completed", "completed", "completed", "failed", "failed", "timeout", "completed"]
    ok = [r["status"] for r in results] == expected and all(c == 0 for c in codes.values())
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

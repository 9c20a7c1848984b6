"""Action timeouts with real processes: shell actions get SIGTERM then SIGKILL, Python is cancelled."""

from __future__ import annotations

import os
import signal

import pytest

from tests.harness import wait_until

pytestmark = pytest.mark.integration


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie is dead for our purposes.
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split()[2] != "Z"
    except FileNotFoundError:
        return False


async def test_shell_timeout_terminates_the_command_and_its_children(baton, tmp_path):
    await baton.started(baton.spawn_executor(), baton.spawn_worker("w1"))
    client = await baton.client()
    pidfile = tmp_path / "child.pid"
    script = f"sleep 60 & echo $! > {pidfile}; echo started; wait"
    # Long enough for a busy machine to start the shell and reach `wait`.
    done = await client.run("core.local", {"cmd": script}, timeout_s=2, wait_timeout_s=20)
    assert done["status"] == "timeout"
    assert done["error"]["timeout_seconds"] == 2
    assert "timeout" in done["error"]["error"]
    assert done["result"]["stdout"] == "started\n"
    child = int(pidfile.read_text())
    # It would sleep for 60 s by itself.
    await wait_until(lambda: _as_coro(not _alive(child)), what="the backgrounded child to be gone")


async def test_shell_command_ignoring_sigterm_is_killed_after_the_grace(baton, tmp_path):
    await baton.started(baton.spawn_executor(), baton.spawn_worker("w1", BATON__WORKER__KILL_GRACE="0.3"))
    client = await baton.client()
    pidfile = tmp_path / "stubborn.pid"
    script = f"trap '' TERM; echo $$ > {pidfile}; while true; do sleep 0.05; done"
    # A timeout long enough for a busy machine to reach the trap: a SIGTERM before it would end the shell.
    done = await client.run("core.local", {"cmd": script}, timeout_s=2, wait_timeout_s=20)
    assert done["status"] == "timeout"
    # It ignored SIGTERM and loops forever: only the SIGKILL after the grace ended it.
    assert done["result"]["exit_code"] == -signal.SIGKILL
    assert not _alive(int(pidfile.read_text()))


async def test_python_timeout_per_invocation_and_per_action(baton):
    await baton.started(baton.spawn_executor(), baton.spawn_worker("w1"))
    client = await baton.client()
    per_invocation = await client.run("core.sleep", {"seconds": 30}, timeout_s=0.3, wait_timeout_s=20)
    assert per_invocation["status"] == "timeout"
    assert per_invocation["error"]["timeout_seconds"] == 0.3
    # examples.slow declares timeout_s=2 on its decorator.
    per_action = await client.run("examples.slow", {"seconds": 30}, wait_timeout_s=20)
    assert per_action["status"] == "timeout" and per_action["error"]["timeout_seconds"] == 2
    # The invocation's own timeout wins over the action's.
    overridden = await client.run("examples.slow", {"seconds": 0.1}, timeout_s=5, wait_timeout_s=20)
    assert overridden["status"] == "completed"


async def test_worker_default_task_timeout(baton):
    await baton.started(baton.spawn_executor(), baton.spawn_worker("w1", BATON__WORKER__TASK_TIMEOUT="0.3"))
    done = await (await baton.client()).run("core.sleep", {"seconds": 30}, wait_timeout_s=20)
    assert done["status"] == "timeout" and done["error"]["timeout_seconds"] == 0.3


async def _as_coro(value):
    return value

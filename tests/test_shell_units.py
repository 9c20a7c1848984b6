"""`core.local` without services: real commands, cancelled or left behind the way a worker meets
them, each on an event loop of its own of the kind the worker runs (uvloop)."""

from __future__ import annotations

import asyncio
import gc
import os
import signal
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any

import pytest
import uvloop

from common.actions import LocalParams
from worker.errors import ActionFailed
from worker.registry import Invocation
from worker.shell import ShellLimits, run_local

INVOCATION = Invocation(execution_id="e", attempt=1, action_ref="core.local", timeout_s=60)


def reported_by_asyncio(scenario: Callable[[], Coroutine[Any, Any, None]]) -> list[str]:
    """Run ``scenario`` on a loop of its own; what asyncio reported at error level meanwhile (an
    exception never retrieved, a task destroyed while pending), garbage collected included."""
    reported: list[str] = []

    async def main() -> None:
        # The message, and what it is about: a failure then names the exception and the task.
        asyncio.get_running_loop().set_exception_handler(
            lambda _loop, context: reported.append(
                " ".join(str(v)[:300] for v in (context.get("message"), context.get("exception"),
                                                context.get("task") or context.get("future")) if v is not None)
            )
        )
        await scenario()
        gc.collect()
        await asyncio.sleep(0)  # what a destructor reported is in by now

    uvloop.run(main())
    return reported


async def _until(predicate: Callable[[], bool], timeout_s: float = 10.0) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while not predicate():
        assert loop.time() < deadline, "timed out waiting for the command"
        await asyncio.sleep(0.01)


def _gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


@pytest.mark.parametrize("stdin", [None, "some input"])
def test_a_cancelled_command_is_killed_and_asyncio_reports_nothing(tmp_path: Path, stdin: str | None) -> None:
    """An operator's cancel (or a drain's deadline) cancels the run's task: the command is killed,
    the cancellation propagates, and nothing is left for asyncio to report at error level (the
    output readers, cancelled and never awaited, were: "_GatheringFuture exception was never
    retrieved", which a chaos soak found in a worker's log)."""
    marker = tmp_path / "pid"

    async def scenario() -> None:
        task = asyncio.create_task(
            run_local(LocalParams(cmd=f"echo $$ > {marker}; exec sleep 30", stdin=stdin), INVOCATION, ShellLimits())
        )
        await _until(lambda: marker.exists() and marker.read_text().strip() != "")
        pid = int(marker.read_text())
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        await _until(lambda: _gone(pid))

    assert reported_by_asyncio(scenario) == []


def test_output_held_open_by_an_escaped_descendant_fails_the_run_and_asyncio_reports_nothing(tmp_path: Path) -> None:
    """A descendant that left the command's process group (`setsid`) holds its output pipes open
    after the command ends: the run fails once the grace is over, saying why, and the readers it
    abandons leave nothing for asyncio to report."""
    marker = tmp_path / "pid"

    async def scenario() -> None:
        with pytest.raises(ActionFailed, match="output pipes stayed open"):
            await run_local(
                # The command ends only once its descendant has left the group (it writes its pid
                # after `setsid`): ended sooner, the group's kill would take the descendant too.
                LocalParams(cmd=f"setsid sh -c 'echo $$ > {marker}; exec sleep 30' & "
                                f"while [ ! -s {marker} ]; do sleep 0.01; done"),
                INVOCATION,
                ShellLimits(kill_grace_s=0.5),
            )

    try:
        assert reported_by_asyncio(scenario) == []
    finally:
        if marker.exists() and not _gone(pid := int(marker.read_text())):
            os.kill(pid, signal.SIGKILL)


def test_a_secret_cut_off_by_the_output_cap_is_masked_as_far_as_it_goes() -> None:
    """Output is cut at the cap before it is masked: a secret the cut falls inside is not whole in
    what is kept, and its start must not be stored either."""
    secret = "hunter2-sëcret"
    env = {**os.environ, "BATON_SECRET_TOKEN": secret}
    params = LocalParams(cmd='echo "token=$T"', env={"T": {"secret": "token"}})
    kept: dict[int, tuple[str, bool]] = {}

    async def run(cap_bytes: int) -> None:
        result = await run_local(params, INVOCATION, ShellLimits(max_output_bytes=cap_bytes, environ=env))
        kept[cap_bytes] = (result["stdout"], result["stdout_truncated"])

    whole = len(f"token={secret}\n".encode())
    for cap_bytes in range(len("token="), whole + 1):
        uvloop.run(run(cap_bytes))
    assert kept[len("token=")] == ("token=", True)  # cut just before it
    for cap_bytes in range(len("token=") + 1, whole - 1):  # cut inside it (ë is two bytes)
        assert kept[cap_bytes] == ("token=***", True), cap_bytes
    assert kept[whole - 1] == ("token=***", True)  # the newline cut off
    assert kept[whole] == ("token=***\n", False)

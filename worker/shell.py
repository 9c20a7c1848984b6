"""`core.local`: run a local command without ever building a shell string from parameters.

A list ``cmd`` is executed directly; a string ``cmd`` is the script given to ``bash -c``, written by
the caller, with parameters reaching it only through environment variables or stdin. Output is
read concurrently and capped; on timeout the process group gets SIGTERM, then SIGKILL after a grace.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
from dataclasses import dataclass
from typing import Any

from common.actions import LocalParams
from worker.errors import ActionFailed, ActionTimedOut
from worker.registry import Invocation


@dataclass
class ShellLimits:
    max_output_bytes: int = 1_048_576
    kill_grace_s: float = 5.0


async def _read_capped(stream: asyncio.StreamReader, cap: int) -> tuple[bytes, int]:
    """Everything is read (so the child never blocks on a full pipe); only the first ``cap`` bytes kept."""
    kept = bytearray()
    total = 0
    while chunk := await stream.read(65536):
        total += len(chunk)
        if len(kept) < cap:
            kept += chunk[: cap - len(kept)]
    return bytes(kept), total


def _text(raw: bytes) -> str:
    """Output as text PostgreSQL can store: undecodable bytes and NULs become U+FFFD."""
    return raw.decode(errors="replace").replace("\x00", "\ufffd")


def _signal_group(proc: asyncio.subprocess.Process, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, sig)


async def run_local(params: LocalParams, inv: Invocation, limits: ShellLimits) -> dict[str, Any]:
    argv = list(params.cmd) if isinstance(params.cmd, list) else ["bash", "-c", params.cmd]
    if not argv:
        raise ActionFailed("cmd is empty")
    env = dict(os.environ)
    env.update(params.env or {})
    env.update(
        BATON_EXECUTION_ID=inv.execution_id, BATON_ACTION_REF=inv.action_ref, BATON_ATTEMPT=str(inv.attempt)
    )
    try:
        proc = await asyncio.create_subprocess_exec(
            *argv,
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            env=env,
            cwd=params.cwd,
            start_new_session=True,  # its own process group, so that a timeout stops its children too
        )
    except (FileNotFoundError, PermissionError, NotADirectoryError) as exc:
        raise ActionFailed(f"cannot start {argv[0]!r}: {exc}") from exc

    async def feed() -> None:
        assert proc.stdin is not None
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            if params.stdin:
                proc.stdin.write(params.stdin.encode())
                await proc.stdin.drain()
            proc.stdin.close()

    cap = limits.max_output_bytes
    assert proc.stdout is not None and proc.stderr is not None
    io = asyncio.gather(feed(), _read_capped(proc.stdout, cap), _read_capped(proc.stderr, cap), proc.wait())
    timed_out = False
    try:
        try:
            _, (out, out_total), (err, err_total), _ = await asyncio.wait_for(asyncio.shield(io), inv.timeout_s)
        except asyncio.TimeoutError:
            timed_out = True
            _signal_group(proc, signal.SIGTERM)
            try:
                _, (out, out_total), (err, err_total), _ = await asyncio.wait_for(
                    asyncio.shield(io), limits.kill_grace_s
                )
            except asyncio.TimeoutError:
                _signal_group(proc, signal.SIGKILL)
                _, (out, out_total), (err, err_total), _ = await io
    except BaseException:
        # Cancelled (the worker is stopping past its drain deadline): leave no process behind.
        _signal_group(proc, signal.SIGKILL)
        raise
    result = {
        "exit_code": proc.returncode,
        "stdout": _text(out),
        "stderr": _text(err),
        "stdout_truncated": out_total > len(out),
        "stderr_truncated": err_total > len(err),
    }
    if timed_out:
        raise ActionTimedOut(f"command ran longer than its timeout of {inv.timeout_s:g} s and was stopped", result)
    if proc.returncode != 0:
        raise ActionFailed(f"command exited with code {proc.returncode}", result)
    return result

"""`core.local`: run a local command without ever building a shell string from parameters.

A list ``cmd`` is executed directly; a string ``cmd`` is the script given to ``bash -c``, written by
the caller, with parameters reaching it only through environment variables or stdin. The command
gets a minimal environment, never the worker's own (which holds its credentials): a small allowlist,
what `worker.shell_env_passthrough` names, and the invocation's `env`, whose `{"secret": "name"}`
values are read on the worker. Output is read concurrently and capped, with secret values masked.
When the command ends, whatever it left running in its process group is killed; on timeout the
group gets SIGTERM, then SIGKILL after a grace.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import signal
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from common.actions import LocalParams, SecretRef
from worker.errors import ActionFailed, ActionTimedOut
from worker.registry import Invocation

#: Of the worker's environment, only these reach a command (plus `worker.shell_env_passthrough`).
BASE_ENV = ("PATH", "LANG", "LC_ALL", "LC_CTYPE", "HOME", "TZ", "TMPDIR", "USER", "LOGNAME")
MASK = "***"


@dataclass
class ShellLimits:
    max_output_bytes: int = 1_048_576
    kill_grace_s: float = 5.0
    env_passthrough: tuple[str, ...] = ()
    secrets_dir: str | None = None
    environ: dict[str, str] = field(default_factory=lambda: dict(os.environ))


def read_secret(ref: SecretRef, limits: ShellLimits) -> str:
    """A secret's value from `worker.secrets_dir/<name>`, else `BATON_SECRET_<NAME>`."""
    if limits.secrets_dir is not None:
        path = Path(limits.secrets_dir) / ref.secret
        if path.is_file():
            return path.read_text().rstrip("\n")
    var = "BATON_SECRET_" + re.sub(r"[^A-Za-z0-9]", "_", ref.secret).upper()
    if var in limits.environ:
        return limits.environ[var]
    raise ActionFailed(
        f"secret {ref.secret!r} is not available on this worker: put it in worker.secrets_dir "
        f"as a file named {ref.secret!r}, or in the worker's environment as {var}"
    )


def command_env(params: LocalParams, inv: Invocation, limits: ShellLimits) -> tuple[dict[str, str], list[str]]:
    """The command's whole environment, and the secret values in it (to mask in its output)."""
    env = {k: limits.environ[k] for k in (*BASE_ENV, *limits.env_passthrough) if k in limits.environ}
    secrets: list[str] = []
    for name, value in (params.env or {}).items():
        if isinstance(value, SecretRef):
            value = read_secret(value, limits)
            secrets.append(value)
        env[name] = value
    env.update(BATON_EXECUTION_ID=inv.execution_id, BATON_ACTION_REF=inv.action_ref, BATON_ATTEMPT=str(inv.attempt))
    return env, [s for s in secrets if s]


async def _read_capped(stream: asyncio.StreamReader, cap_bytes: int) -> tuple[bytes, int]:
    """Everything is read (so the child never blocks on a full pipe); only the first ``cap_bytes`` kept."""
    kept = bytearray()
    total = 0
    while chunk := await stream.read(65536):
        total += len(chunk)
        if len(kept) < cap_bytes:
            kept += chunk[: cap_bytes - len(kept)]
    return bytes(kept), total


def _text(raw: bytes, secrets: list[str], *, cut: bool = False) -> str:
    """Output as text PostgreSQL can store (undecodable bytes and NULs become U+FFFD), secrets masked;
    ``cut``: the output was cut off at the cap, maybe inside a secret, whose start is masked too."""
    text = raw.decode(errors="replace").replace("\x00", "\ufffd")
    for secret in sorted(secrets, key=len, reverse=True):
        text = text.replace(secret, MASK)
    if cut:
        body = text.rstrip("\ufffd")  # the cut may also split a character in two
        kept = max((n for secret in secrets for n in range(1, len(secret)) if body.endswith(secret[:n])), default=0)
        if kept:
            text = body[:-kept] + MASK
    return text


def _abandon(readers: asyncio.Future[Any]) -> None:
    """Stop reading the command's output. A gather that is cancelled ends with the cancellation as
    its exception, which asyncio reports at error level ("exception was never retrieved") unless
    someone takes it: the callback does, whenever the readers end."""
    readers.cancel()
    readers.add_done_callback(_take_outcome)


def _take_outcome(future: asyncio.Future[Any]) -> None:
    if not future.cancelled():
        future.exception()


def _signal_group(proc: asyncio.subprocess.Process, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, sig)


async def run_local(params: LocalParams, inv: Invocation, limits: ShellLimits) -> dict[str, Any]:
    argv = list(params.cmd) if isinstance(params.cmd, list) else ["bash", "-c", params.cmd]
    if not argv:
        raise ActionFailed("cmd is empty")
    env, secrets = command_env(params, inv, limits)
    try:
        proc = await asyncio.create_subprocess_exec(
            *argv,
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            env=env,
            cwd=params.cwd,
            start_new_session=True,  # its own process group, so that what it starts can be stopped too
            close_fds=True,  # none of the worker's sockets (database, broker) leak into the command
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

    cap_bytes = limits.max_output_bytes
    assert proc.stdout is not None and proc.stderr is not None
    readers = asyncio.gather(_read_capped(proc.stdout, cap_bytes), _read_capped(proc.stderr, cap_bytes))
    exited = asyncio.gather(feed(), proc.wait())
    timed_out = False
    try:
        try:
            await asyncio.wait_for(asyncio.shield(exited), inv.timeout_s)
        except TimeoutError:
            timed_out = True
            _signal_group(proc, signal.SIGTERM)
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(asyncio.shield(exited), limits.kill_grace_s)
        # The command has ended (or is past its grace): nothing it started outlives it. Once the
        # group is gone the pipes reach end-of-file; a descendant that left the group and still
        # holds them is not waited for past the grace.
        _signal_group(proc, signal.SIGKILL)
        await exited
        (out, out_total), (err, err_total) = await asyncio.wait_for(readers, limits.kill_grace_s)
    except TimeoutError:
        _abandon(readers)
        raise ActionFailed("the command's output pipes stayed open after it ended (a descendant left its process group)") from None
    except BaseException:
        # Cancelled (the worker is stopping past its drain deadline): leave no process behind.
        _signal_group(proc, signal.SIGKILL)
        _abandon(readers)
        raise
    result = {
        "exit_code": proc.returncode,
        "stdout": _text(out, secrets, cut=out_total > len(out)),
        "stderr": _text(err, secrets, cut=err_total > len(err)),
        "stdout_truncated": out_total > len(out),
        "stderr_truncated": err_total > len(err),
    }
    if timed_out:
        raise ActionTimedOut(f"command ran longer than its timeout of {inv.timeout_s:g} s and was stopped", result)
    if proc.returncode != 0:
        raise ActionFailed(f"command exited with code {proc.returncode}", result)
    return result

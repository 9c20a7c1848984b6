"""The `core` pack: noop, echo, sleep (Python runtime) and local (shell runtime)."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

from common.actions import CORE_PARAMS, EchoParams, LocalParams, NoopParams, SleepParams
from worker.registry import Invocation, core_action
from worker.shell import ShellLimits, run_local

#: Limits shell actions get from the worker's settings (see :func:`configure_shell`).
_shell_limits = ShellLimits()

_Invoker = TypeVar("_Invoker", bound=Callable[..., Awaitable[Any]])


def configure_shell(limits: ShellLimits) -> None:
    global _shell_limits
    _shell_limits = limits


def _core(ref: str) -> Callable[[_Invoker], _Invoker]:
    runtime, model, doc = CORE_PARAMS[ref]
    return core_action(ref, runtime, model, doc)


@_core("core.noop")
async def noop(_params: NoopParams, _inv: Invocation) -> None:
    return None


@_core("core.echo")
async def echo(params: EchoParams, _inv: Invocation) -> dict[str, Any]:
    return {"message": params.message}


@_core("core.sleep")
async def sleep(params: SleepParams, _inv: Invocation) -> dict[str, Any]:
    await asyncio.sleep(params.seconds)
    return {"slept_s": params.seconds}


@_core("core.local")
async def local(params: LocalParams, inv: Invocation) -> Any:
    return await run_local(params, inv, _shell_limits)

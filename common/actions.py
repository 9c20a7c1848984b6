"""The action catalogue's shape, and the built-in `core` pack's contract.

The executor never imports worker code, yet it validates requests: it reads the catalogue that
workers register in PostgreSQL, plus the core pack below, which is part of Baton itself so that a
`core.*` request is valid even before the first worker has registered.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

Runtime = Literal["python", "shell"]


class ActionSpec(BaseModel):
    """One catalogue entry: what the executor needs to validate and place a request."""

    ref: str
    runtime: Runtime
    parameters_schema: dict[str, Any]
    timeout_s: float | None = None
    description: str | None = None
    durable: bool = False
    recover_on_worker_loss: bool | None = None  # None: the YAML `recovery:` section or the default decides
    max_recovery_attempts: int | None = None


class _Params(BaseModel):
    model_config = ConfigDict(extra="forbid")


class NoopParams(_Params):
    pass


class EchoParams(_Params):
    message: str


class SleepParams(_Params):
    seconds: float = Field(ge=0)


class LocalParams(_Params):
    cmd: list[str] | str = Field(description="argv list, run directly; or a string, run by bash -c")
    env: dict[str, str] | None = Field(None, description="extra environment variables for the process")
    cwd: str | None = Field(None, description="working directory")
    stdin: str | None = Field(None, description="text written to the process's standard input")


CORE_PARAMS: dict[str, tuple[Runtime, type[BaseModel], str]] = {
    "core.noop": ("python", NoopParams, "Does nothing and succeeds."),
    "core.echo": ("python", EchoParams, "Returns its message."),
    "core.sleep": ("python", SleepParams, "Sleeps for `seconds`."),
    "core.local": ("shell", LocalParams, "Runs a local command; parameters reach it by env or stdin."),
}

CORE_ACTIONS: dict[str, ActionSpec] = {
    ref: ActionSpec(ref=ref, runtime=runtime, parameters_schema=model.model_json_schema(), description=doc)
    for ref, (runtime, model, doc) in CORE_PARAMS.items()
}

"""The action catalogue's shape, and the built-in `core` pack's contract.

The executor never imports worker code, yet it validates requests: it reads the catalogue that
workers register in PostgreSQL, plus the core pack below, which is part of Baton itself so that a
`core.*` request is valid even before the first worker has registered.
"""

from __future__ import annotations

import re
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, WithJsonSchema

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
    version: int = 1  # a changed schema or runtime is deployed as a higher version
    retries: int | None = None  # application failures retried (an invocation's max_retries overrides)
    retry_delay_s: float | None = None
    retry_backoff: float | None = None
    max_concurrency: int | None = None  # at most this many dispatched or running at once, across workers


#: Refs under this prefix are Baton's built-ins: defined by its code, never by a registration.
CORE_PREFIX = "core."


def registration_conflict(existing: ActionSpec | None, new: ActionSpec) -> str | None:
    """Why a worker may not register ``new`` over the catalogue's ``existing`` entry (None: it may).

    The rule: the same version must mean the same action (runtime and parameter schema), so that
    the executor never validates against a schema the workers do not run. A change is deployed as a
    higher version, which replaces the entry; a worker with a lower version than the catalogue's is
    an old deployment and is refused, rather than overwrite the newer one."""
    if new.ref.startswith(CORE_PREFIX):
        return f"{new.ref}: actions under {CORE_PREFIX}* are Baton's own and cannot be registered"
    if existing is None or new.version > existing.version:
        return None
    if new.version < existing.version:
        return (
            f"{new.ref}: this worker has version {new.version}, the catalogue has version {existing.version} "
            f"(a newer deployment registered it): deploy the newer code"
        )
    changed = [
        what for what, differs in (
            ("runtime", new.runtime != existing.runtime),
            ("parameter schema", new.parameters_schema != existing.parameters_schema),
        ) if differs
    ]
    if changed:
        return (
            f"{new.ref}: version {new.version} is already registered with another {' and '.join(changed)}: "
            f"give the changed action a higher version (@action(..., version={new.version + 1}))"
        )
    return None


class _Params(BaseModel):
    model_config = ConfigDict(extra="forbid")


class NoopParams(_Params):
    pass


class EchoParams(_Params):
    message: str


class SleepParams(_Params):
    seconds: float = Field(ge=0)


#: Environment variables an invocation may not set: each makes a shell, the dynamic linker or an
#: interpreter run code of the caller's choosing even when the command itself is fixed.
REFUSED_ENV_NAMES = frozenset({
    "BASH_ENV", "ENV", "SHELLOPTS", "BASHOPTS", "PS4", "PROMPT_COMMAND", "IFS", "CDPATH", "GLOBIGNORE",
    "BASH_XTRACEFD", "PYTHONSTARTUP", "PYTHONPATH", "PYTHONHOME", "PYTHONINSPECT", "PERL5OPT", "PERL5LIB",
    "PERLLIB", "RUBYOPT", "RUBYLIB", "NODE_OPTIONS", "GCONV_PATH", "HOSTALIASES", "LOCALDOMAIN", "RES_OPTIONS",
})
#: ... and names starting with these (bash exported functions, loaders; BATON_ is Baton's own).
REFUSED_ENV_PREFIXES = ("BASH_FUNC_", "LD_", "DYLD_", "BATON_")
_ENV_NAME = r"^[A-Za-z_][A-Za-z0-9_]*$"
_SECRET_NAME = r"^[A-Za-z0-9_.\-]{1,200}$"


def check_env_name(name: str) -> str:
    if not re.fullmatch(_ENV_NAME, name):
        raise ValueError(f"{name[:80]!r} is not an environment variable name")
    if name in REFUSED_ENV_NAMES or name.startswith(REFUSED_ENV_PREFIXES):
        raise ValueError(f"environment variable {name} may not be set by an invocation")
    return name


class SecretRef(_Params):
    """``{"secret": "name"}``: resolved on the worker (worker.secrets_dir, or BATON_SECRET_<NAME>),
    so that the value never enters PostgreSQL or RabbitMQ."""

    secret: str = Field(pattern=_SECRET_NAME)


# The executor validates with this JSON Schema and the worker with the model: both say the same.
_ENV_SCHEMA: dict[str, Any] = {
    "anyOf": [
        {
            "type": "object",
            "propertyNames": {
                "pattern": _ENV_NAME,
                "not": {"anyOf": [
                    {"enum": sorted(REFUSED_ENV_NAMES)},
                    {"pattern": "^(" + "|".join(REFUSED_ENV_PREFIXES) + ")"},
                ]},
            },
            "additionalProperties": {"anyOf": [
                {"type": "string"},
                {"type": "object", "properties": {"secret": {"type": "string", "pattern": _SECRET_NAME}},
                 "required": ["secret"], "additionalProperties": False},
            ]},
        },
        {"type": "null"},
    ],
    "default": None,
    "description": "extra environment variables for the process; a value may be {\"secret\": \"name\"}",
}

EnvName = Annotated[str, AfterValidator(check_env_name)]


class LocalParams(_Params):
    cmd: list[str] | str = Field(description="argv list, run directly; or a string, run by bash -c")
    env: Annotated[dict[EnvName, str | SecretRef] | None, WithJsonSchema(_ENV_SCHEMA)] = None
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

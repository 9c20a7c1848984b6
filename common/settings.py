"""Baton's settings: one pydantic model tree, read from YAML, overridden by environment.

The YAML file is ``$BATON_CONFIG`` (default ``config/config.yaml``); any key can then be overridden
with ``BATON__SECTION__KEY``. Unknown keys are errors so that a typo never silently falls back to a
default. Durations accept seconds (``300``, ``0.25``) or strings (``"5m"``, ``"250ms"``).

YAML keys follow DESIGN section 7 (``heartbeat_interval``); the Python attributes carry their unit
(``heartbeat_interval_s``) so that code reading them cannot confuse seconds with milliseconds.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, field_validator, model_validator
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    YamlConfigSettingsSource,
)

from common.schedules import check as check_schedule
from common.values import parse_duration

DEFAULT_CONFIG_PATH = "config/config.yaml"

Seconds = Annotated[float, BeforeValidator(parse_duration)]


class _Section(BaseModel):
    # Field docstrings are for readers (a test checks every field has one); pydantic's
    # `use_attribute_docstrings` would read this file's source at every start of every process.
    model_config = ConfigDict(extra="forbid", populate_by_name=False)


class DatabaseSettings(_Section):
    url: str = "postgresql://postgres@127.0.0.1:5432/baton"
    """PostgreSQL DSN. PostgreSQL is the source of truth for executions, events and workers."""

    pool_max_size: int = Field(10, ge=1)
    """Connections per process in the asyncpg pool."""

    startup_wait_s: Seconds = Field(60.0, alias="startup_wait", ge=0)
    """How long a service or command starting up waits for PostgreSQL (retrying with backoff,
    saying so each time) before it gives up with one line; a refused login fails at once."""


class MessageQueueSettings(_Section):
    url: str = "amqp://guest:guest@127.0.0.1:5672/"
    """RabbitMQ URL."""

    prefix: str = Field("baton", pattern=r"^[A-Za-z0-9_\-]+$")
    """First word of every exchange and queue name, so that deployments and tests can share a broker."""

    startup_wait_s: Seconds = Field(60.0, alias="startup_wait", ge=0)
    """How long a service or command starting up waits for RabbitMQ (retrying with backoff, saying
    so each time) before it gives up with one line; a refused login fails at once."""

    reconnect_interval_s: Seconds = Field(1.0, alias="reconnect_interval", gt=0)
    """How long a service waits between attempts to reconnect to RabbitMQ once its connection is
    lost (a broker restart): work held up meanwhile goes on this soon after the broker is back."""

    max_request_bytes: int = Field(1_048_576, ge=1024)
    """Largest accepted request body; a larger one is rejected with a clear reason, never retried."""

    rejected_requests_max_length: int = Field(100_000, ge=1)
    """How many rejected (unparseable or oversized) requests the parking queue keeps for operators."""

    rejected_requests_max_bytes: int = Field(67_108_864, ge=1_048_576)
    """How many bytes of rejected requests the parking queue keeps (the oldest go first); each is
    parked with at most its first 4 KiB when it is over `max_request_bytes`."""

    queue_type: Literal["classic", "quorum"] = "classic"
    """`quorum` declares the request, dead-letter and worker queues as quorum queues (RabbitMQ 3.10+
    clusters: replicated, with at-least-once dead-lettering); `classic` suits a single node."""


class ExecutorSettings(_Section):
    scheduled_timeout_s: Seconds = Field(300.0, alias="scheduled_timeout")
    """An execution dispatched but not started within this long is rescheduled, or failed."""

    timeout_check_interval_s: Seconds = Field(60.0, alias="timeout_check_interval")
    """How often the scheduled-timeout monitor looks for executions past `scheduled_timeout`."""

    enable_timeout_monitor: bool = True
    """Turns the scheduled-timeout monitor on or off."""

    sweep_interval_s: Seconds = Field(5.0, alias="sweep_interval")
    """How often the liveness sweeper looks for lost workers."""

    heartbeat_staleness_multiplier: float = Field(3.0, gt=1.0)
    """A worker is stale when its last heartbeat is older than this many of its heartbeat intervals."""

    max_schedule_attempts: int = Field(3, ge=1)
    """Dispatches of one execution before it fails for want of a worker that starts it."""

    scheduler_fallback_interval_s: Seconds = Field(5.0, alias="scheduler_fallback_interval")
    """The scheduler is woken by notifications; this is its safety net should one be missed."""

    dispatch_pipeline: int = Field(0, ge=0)
    """Dispatches a worker may hold beyond its free slots. Work goes to free slots first; what waits
    for a slot waits as `requested` in PostgreSQL, not in a busy worker's inbox."""

    requested_timeout_s: Seconds = Field(3600.0, alias="requested_timeout")
    """A request that has waited this long as `requested`, for an action no worker has served for
    this long (a restarting worker's heartbeat counts), fails with a reason naming the action; 0
    turns this off."""

    intake_batch_size: int = Field(500, ge=1)
    """Requests taken from the queue and recorded in one database round trip."""

    schedule_batch_size: int = Field(500, ge=1)
    """Requested executions placed and dispatched in one scheduler pass."""

    intake_batch_bytes: int = Field(4_194_304, ge=1024)
    """Request bytes recorded in one batch at most (a request larger than this is a batch alone):
    parsed JSON can take tens of times its size in memory."""

    intake_buffer_bytes: int = Field(268_435_456, ge=1_048_576)
    """Upper bound on request bytes intake holds in memory at once: its prefetch is this divided by
    `message_queue.max_request_bytes` (at most twice `intake_batch_size`)."""

    shutdown_timeout_s: Seconds = Field(10.0, alias="shutdown_timeout")
    """How long a stopping executor lets its loops finish their current pass before cancelling them."""

    health_file: str | None = None
    """A file the executor rewrites while it is connected to PostgreSQL and RabbitMQ; `baton health`
    reads it. Unset means none is written."""

    max_concurrency: dict[str, Annotated[int, Field(ge=1)]] = Field(default_factory=dict)
    """Per action, at most this many dispatched or running at once across all workers; overrides
    the action's own `@action(max_concurrency=N)`."""

    schedule_misfire_grace_s: Seconds = Field(60.0, alias="schedule_misfire_grace", gt=0)
    """A schedule's due time that passed longer ago than this (the executors were down) is a
    missed run, handled by the schedule's `catch_up` policy; a later one is simply fired."""

    metrics_port: int | None = None
    """Port of the Prometheus `/metrics` endpoint; unset means off."""

    metrics_host: str = "127.0.0.1"
    """Address the `/metrics` endpoint listens on; loopback unless exposed on purpose (compose: 0.0.0.0)."""


def _python_only() -> list[Literal["python", "shell"]]:
    return ["python"]


class WorkerSettings(_Section):
    name: str | None = Field(None, pattern=r"^[A-Za-z0-9_.\-]+$", max_length=200)
    """The worker's name; its queue is `<prefix>.worker.<name>`. `baton worker --name` overrides it;
    unset means `<hostname>-<pid>`, unique per host and container. One live process per name."""

    max_concurrent_tasks: int = Field(10, ge=1)
    """Executions one worker runs at once; also its queue prefetch."""

    runtimes: list[Literal["python", "shell"]] = Field(default_factory=_python_only)
    """Runtimes this worker serves; it is offered only actions of these runtimes. `shell` is opt-in:
    it runs `core.local`, arbitrary commands as the worker's user, for whoever can post."""

    action_modules: list[str] = Field(default_factory=list)
    """Python modules imported at start so that their `@action` functions are registered."""

    heartbeat_interval_s: Seconds = Field(10.0, alias="heartbeat_interval")
    """How often the worker records its heartbeat and in-flight count."""

    shutdown_timeout_s: Seconds = Field(30.0, alias="shutdown_timeout")
    """How long a draining worker lets in-flight work finish before interrupting it."""

    queue_ttl_s: Seconds = Field(300.0, alias="queue_ttl")
    """A dispatch left this long in a worker's queue is dead-lettered (`x-message-ttl`)."""

    task_timeout_s: Seconds = Field(3600.0, alias="task_timeout")
    """Action timeout when neither the action nor the invocation sets one."""

    max_task_timeout_s: Seconds = Field(86400.0, alias="max_task_timeout", gt=0)
    """Ceiling on any action timeout, the invocation's `timeout_seconds` included."""

    kill_grace_s: Seconds = Field(5.0, alias="kill_grace")
    """Between SIGTERM and SIGKILL of a shell action that ran past its timeout."""

    shell_env_passthrough: list[str] = Field(default_factory=list)
    """Names of the worker's own environment variables that shell actions also get, beyond the
    minimal set (PATH, LANG, LC_ALL, LC_CTYPE, HOME, TZ, TMPDIR, USER, LOGNAME). Nothing else of the worker's
    environment (its database URL, say) reaches a command."""

    secrets_dir: str | None = None
    """Where `{"secret": "name"}` references in a shell action's `env` are read from (one file per
    secret, as Docker and Kubernetes mount them); `BATON_SECRET_<NAME>` in the worker's environment
    is the fallback. Secrets never enter PostgreSQL or RabbitMQ, and are masked in captured output."""

    max_output_bytes: int = Field(1_048_576, ge=64)
    """Cap on each of stdout and stderr of a shell action, and on a Python action's result."""

    max_inline_sleep_s: Seconds = Field(30.0, alias="max_inline_sleep", ge=0)
    """A durable workflow's `ctx.sleep` of up to this long waits on its worker; a longer one
    suspends the run (`sleeping`, holding no slot) and the executor dispatches it again when due."""

    metrics_port: int | None = None
    """Port of the Prometheus `/metrics` endpoint; unset means off."""

    metrics_host: str = "127.0.0.1"
    """Address the `/metrics` endpoint listens on; loopback unless exposed on purpose (compose: 0.0.0.0)."""

    health_file: str | None = None
    """A file the worker rewrites while it is registered and connected; `baton health` reads it.
    Unset means none is written."""

    @property
    def queue_ttl_ms(self) -> int:
        return int(self.queue_ttl_s * 1000)


class RecoverySettings(_Section):
    recover_on_worker_loss: bool | None = None
    """Default for runs that do not say; unset means True for durable runs, False for transient ones."""

    max_recovery_attempts: int = Field(3, ge=0)
    """Recoveries of one run after worker loss before it fails."""


class RetentionSettings(_Section):
    executions_days: float = Field(30.0, ge=0)
    """Finished executions (and their events) older than this many days are deleted; 0 keeps them."""

    workers_days: float = Field(7.0, ge=0)
    """Stopped or lost workers not seen for this many days are deleted with their empty queues; 0 keeps them."""

    prune_interval_s: Seconds = Field(3600.0, alias="prune_interval")
    """How often the executor prunes."""

    batch_size: int = Field(1000, ge=1)
    """Rows deleted per statement, so that pruning never holds long locks."""

    vacuum_interval_s: Seconds = Field(30.0, alias="vacuum_interval")
    """How often the executor looks for dead rows in Baton's hot tables and vacuums the tables
    that have at least `vacuum_dead_rows` (whether or not the server's autovacuum runs); 0: never."""

    vacuum_dead_rows: int = Field(20_000, ge=1)
    """Dead row versions a hot table may gather before the executor vacuums it."""


class LoggingSettings(_Section):
    level: Literal["debug", "info", "warning", "error"] = "info"
    """Lowest level logged."""

    format: Literal["json", "console"] = "json"
    """`json` for machines (one event per line), `console` for people."""

    @field_validator("level", mode="before")
    @classmethod
    def _lower(cls, value: Any) -> Any:
        return value.lower() if isinstance(value, str) else value


class DashboardSettings(_Section):
    host: str = "127.0.0.1"
    """Address the web dashboard listens on; loopback unless you put it behind your own proxy."""

    port: int = Field(8080, ge=1, le=65535)
    """Its port."""

    token: str | None = Field(None, repr=False)
    """Needed (as a bearer token or a form field) to cancel, retry or resubmit from the dashboard;
    unset, the dashboard is read-only."""

    refresh_interval_s: Seconds = Field(1.0, alias="refresh_interval", gt=0)
    """How often a live page is re-rendered and pushed to the browser (server-sent events)."""

    @field_validator("token", mode="before")
    @classmethod
    def _empty_is_none(cls, value: Any) -> Any:
        return None if value == "" else value  # `BATON__DASHBOARD__TOKEN=` (compose, unset): read-only

    page_size: int = Field(50, ge=1, le=500)
    """Executions per page."""


class ScheduleEntry(BaseModel):
    """One cron schedule in the YAML `schedules:` section, keyed by its name."""

    model_config = ConfigDict(extra="forbid")

    cron: str
    """Five fields (minute hour day month weekday), or six with seconds last."""

    action_ref: str = Field(pattern=r"^[A-Za-z0-9_\-]+(\.[A-Za-z0-9_\-]+)+$")
    """The action each due time runs."""

    parameters: dict[str, Any] = Field(default_factory=dict)
    """Its parameters, checked against the action's schema when it fires."""

    catch_up: Literal["latest", "all", "none"] = "latest"
    """Due times missed while every executor was away: fire the latest once, all, or none."""

    timezone: str = "UTC"
    """The zone the cron expression is read in."""

    @model_validator(mode="after")
    def _usable(self) -> ScheduleEntry:
        check_schedule(self.cron, self.timezone)
        return self


class Settings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix="BATON__",
        env_nested_delimiter="__",
        extra="forbid",
    )

    database: DatabaseSettings = Field(default_factory=DatabaseSettings)
    """Where state lives."""

    message_queue: MessageQueueSettings = Field(default_factory=MessageQueueSettings)
    """The broker and the names on it."""

    executor: ExecutorSettings = Field(default_factory=ExecutorSettings)
    """Scheduling, timeouts and liveness checks."""

    worker: WorkerSettings = Field(default_factory=WorkerSettings)
    """Running actions."""

    recovery: RecoverySettings = Field(default_factory=RecoverySettings)
    """What happens to runs whose worker was lost."""

    retention: RetentionSettings = Field(default_factory=RetentionSettings)
    """How long history is kept."""

    logging: LoggingSettings = Field(default_factory=LoggingSettings)
    """Log output."""

    dashboard: DashboardSettings = Field(default_factory=DashboardSettings)
    """The web dashboard (`baton dashboard`)."""

    schedules: dict[str, ScheduleEntry] = Field(default_factory=dict)
    """Cron schedules by name; the executors keep the `schedules` table in step with them."""

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        path = Path(os.environ.get("BATON_CONFIG", DEFAULT_CONFIG_PATH))
        sources: list[PydanticBaseSettingsSource] = [init_settings, env_settings]
        if path.exists():
            sources.append(YamlConfigSettingsSource(settings_cls, yaml_file=path))
        elif "BATON_CONFIG" in os.environ:
            raise FileNotFoundError(f"BATON_CONFIG names {path}, which does not exist")
        return tuple(sources)


def load_settings(**overrides: Any) -> Settings:
    """Settings from YAML + environment; ``overrides`` (nested dicts by section) win over both."""
    return Settings(**overrides)

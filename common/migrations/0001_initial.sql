-- Baton's initial schema: workers, the action catalogue, executions and their events.

CREATE TABLE workers (
    name                  text PRIMARY KEY,
    status                text NOT NULL CHECK (status IN ('active', 'draining', 'inactive', 'lost')),
    runtimes              text[] NOT NULL,
    actions               text[] NOT NULL,
    max_concurrent_tasks  integer NOT NULL CHECK (max_concurrent_tasks > 0),
    heartbeat_interval_s  double precision NOT NULL CHECK (heartbeat_interval_s > 0),
    last_heartbeat        timestamptz,
    in_flight             integer NOT NULL DEFAULT 0,
    hostname              text,
    pid                   integer,
    incarnation           uuid NOT NULL,
    started_at            timestamptz NOT NULL DEFAULT now(),
    updated_at            timestamptz NOT NULL DEFAULT now()
);

-- Actions that workers have registered; the executor validates requests against it.
CREATE TABLE actions (
    ref                text PRIMARY KEY,
    runtime            text NOT NULL CHECK (runtime IN ('python', 'shell')),
    parameters_schema  jsonb NOT NULL,
    timeout_s          double precision,
    description        text,
    updated_at         timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE executions (
    id                 uuid PRIMARY KEY,
    action_ref         text,
    parameters         jsonb NOT NULL DEFAULT '{}'::jsonb,
    status             text NOT NULL CHECK (status IN (
                           'requested', 'scheduled', 'running', 'completed', 'failed', 'timeout',
                           'cancelled', 'interrupted', 'paused', 'sleeping')),
    attempt            integer NOT NULL DEFAULT 0,
    worker             text,
    timeout_s          double precision,
    idempotency_key    text,
    message_id         text,
    correlation_id     text,
    result             jsonb,
    error              jsonb,
    recovery_attempts  integer NOT NULL DEFAULT 0,
    last_event_seq     integer NOT NULL DEFAULT 0,
    created_at         timestamptz NOT NULL DEFAULT now(),
    scheduled_at       timestamptz,
    started_at         timestamptz,
    finished_at        timestamptz,
    updated_at         timestamptz NOT NULL DEFAULT now()
);

CREATE UNIQUE INDEX executions_idempotency_key ON executions (idempotency_key) WHERE idempotency_key IS NOT NULL;
-- Sweeps, monitors and the scheduler look at candidate rows only: by status and age ...
CREATE INDEX executions_status_updated ON executions (status, updated_at);
-- ... or by worker, among executions that still occupy one.
CREATE INDEX executions_worker_active ON executions (worker) WHERE status IN ('scheduled', 'running');
CREATE INDEX executions_created ON executions (created_at DESC);

CREATE TABLE execution_events (
    execution_id  uuid NOT NULL REFERENCES executions (id) ON DELETE CASCADE,
    seq           integer NOT NULL,
    type          text NOT NULL,
    data          jsonb NOT NULL DEFAULT '{}'::jsonb,
    created_at    timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (execution_id, seq)
);

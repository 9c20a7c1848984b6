-- Retries, delays, schedules and concurrency limits.

-- An invocation may wait until `not_before` (a delay, or a retry's backoff) as `requested`: the
-- scheduler's index leaves such rows out, and the timer loop lets them in when they are due.
ALTER TABLE executions ADD COLUMN not_before timestamptz;
-- Application failures so far, each retried; `max_retries` is the invocation's own limit (NULL:
-- the action's).
ALTER TABLE executions ADD COLUMN failed_tries integer NOT NULL DEFAULT 0;
ALTER TABLE executions ADD COLUMN max_retries integer;
-- The schedule that fired it, and for which due time.
ALTER TABLE executions ADD COLUMN schedule_name text;
ALTER TABLE executions ADD COLUMN scheduled_for timestamptz;

DROP INDEX executions_requested_by_action;
CREATE INDEX executions_requested_by_action ON executions (action_ref, updated_at)
    WHERE status = 'requested' AND not_before IS NULL;
CREATE INDEX executions_delayed ON executions (not_before) WHERE status = 'requested' AND not_before IS NOT NULL;
-- How many of an action are dispatched or running, for its concurrency limit.
CREATE INDEX executions_action_active ON executions (action_ref) WHERE status IN ('scheduled', 'running');

-- What an action declares about retries and concurrency (NULL: not declared).
ALTER TABLE actions ADD COLUMN retries integer;
ALTER TABLE actions ADD COLUMN retry_delay_s double precision;
ALTER TABLE actions ADD COLUMN retry_backoff double precision;
ALTER TABLE actions ADD COLUMN max_concurrency integer;

CREATE TABLE schedules (
    name           text PRIMARY KEY,
    cron           text NOT NULL,
    action_ref     text NOT NULL,
    parameters     jsonb NOT NULL DEFAULT '{}'::jsonb,
    catch_up       text NOT NULL CHECK (catch_up IN ('latest', 'all', 'none')),
    timezone       text NOT NULL DEFAULT 'UTC',
    source         text NOT NULL CHECK (source IN ('yaml', 'cli')),
    next_fire_at   timestamptz NOT NULL,
    last_fired_at  timestamptz,
    created_at     timestamptz NOT NULL DEFAULT now(),
    updated_at     timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX schedules_next_fire ON schedules (next_fire_at);

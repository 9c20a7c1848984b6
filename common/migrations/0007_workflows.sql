-- Durable workflows: step checkpoints, suspension (timers, children, signals), operator controls.

ALTER TABLE executions DROP CONSTRAINT executions_status_check;
ALTER TABLE executions ADD CONSTRAINT executions_status_check CHECK (status IN (
    'requested', 'scheduled', 'running', 'completed', 'failed', 'timeout', 'cancelled', 'interrupted',
    'paused', 'sleeping', 'waiting'));

-- When a suspended run (`sleeping` on a timer, `waiting` on a child or a signal) is due again: the
-- timer's wake-up time, or the run's deadline, whichever comes first (NULL: neither).
ALTER TABLE executions ADD COLUMN wake_at timestamptz;
-- The child execution a `waiting` run waits for, or the signal name it waits for.
ALTER TABLE executions ADD COLUMN waiting_on uuid;
ALTER TABLE executions ADD COLUMN waiting_for text;
-- A child started by a workflow's `ctx.run` names its parent: cancelling the parent cancels it.
ALTER TABLE executions ADD COLUMN parent_id uuid;
-- The whole run's deadline, across suspensions and recoveries: set when it first starts.
ALTER TABLE executions ADD COLUMN deadline timestamptz;
-- An operator asked a running workflow to pause at its next step boundary.
ALTER TABLE executions ADD COLUMN pause_requested boolean NOT NULL DEFAULT false;
-- A workflow's `ctx.store` as of its last checkpoint (each step's changes are on its step row).
ALTER TABLE executions ADD COLUMN store jsonb NOT NULL DEFAULT '{}'::jsonb;
-- A transient run retried by an operator is rerun as a new execution linked to the old one.
ALTER TABLE executions ADD COLUMN retry_of uuid;

-- Due timers are found through this index alone; its size is the number of suspended runs.
CREATE INDEX executions_suspended_wake ON executions (wake_at) WHERE status IN ('sleeping', 'waiting');
CREATE INDEX executions_waiting_on ON executions (waiting_on) WHERE status = 'waiting';
CREATE INDEX executions_parent ON executions (parent_id) WHERE parent_id IS NOT NULL;

-- One row per step of a durable run: its checkpoint. `step_id` is the step's position in the run
-- (its call order), `name` what was called there (compared on replay). Timers, children and
-- signals are steps too: a pending row holds what must survive a crash (the wake-up time, the
-- child's id). Written in the transaction that appends the step's event, fenced on the run.
CREATE TABLE workflow_steps (
    execution_id  uuid NOT NULL REFERENCES executions (id) ON DELETE CASCADE,
    step_id       integer NOT NULL,
    name          text NOT NULL,
    status        text NOT NULL CHECK (status IN ('pending', 'completed', 'failed')),
    result        jsonb,
    error         jsonb,
    store_delta   jsonb,
    attempts      integer NOT NULL DEFAULT 1,
    wake_at       timestamptz,
    child_id      uuid,
    started_at    timestamptz,
    finished_at   timestamptz,
    PRIMARY KEY (execution_id, step_id)
);
ALTER TABLE workflow_steps SET (autovacuum_analyze_scale_factor = 0.02, autovacuum_vacuum_scale_factor = 0.05);

-- Signals delivered to a run: a mailbox, consumed by `ctx.wait_for_signal` in the transaction that
-- records the step.
CREATE TABLE workflow_signals (
    id            bigserial PRIMARY KEY,
    execution_id  uuid NOT NULL REFERENCES executions (id) ON DELETE CASCADE,
    name          text NOT NULL,
    data          jsonb,
    consumed_by   integer,
    created_at    timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX workflow_signals_unconsumed ON workflow_signals (execution_id, name, id) WHERE consumed_by IS NULL;

-- The one place a finished child wakes its waiting parent, whichever path finished it (its worker,
-- the executor's monitors and recovery, an operator's cancel).
CREATE FUNCTION baton_wake_parent() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    UPDATE executions p
    SET status = 'requested', waiting_on = NULL, wake_at = NULL, updated_at = now(),
        last_event_seq = p.last_event_seq + 1
    WHERE p.id = NEW.parent_id AND p.waiting_on = NEW.id AND p.status = 'waiting';
    IF FOUND THEN
        INSERT INTO execution_events (execution_id, seq, type, data)
        SELECT p.id, p.last_event_seq, 'execution.woken', jsonb_build_object('reason', 'child_finished', 'child', NEW.id)
        FROM executions p WHERE p.id = NEW.parent_id;
        PERFORM pg_notify('baton_wake', 'woken');
    END IF;
    RETURN NULL;
END $$;

CREATE TRIGGER executions_child_finished
    AFTER UPDATE OF status ON executions
    FOR EACH ROW
    WHEN (NEW.parent_id IS NOT NULL AND NEW.status IN ('completed', 'failed', 'timeout', 'cancelled')
          AND OLD.status IS DISTINCT FROM NEW.status)
    EXECUTE FUNCTION baton_wake_parent();

-- Hardening: fencing by incarnation, per-action lookups of requested work, retention.

-- The worker process (its incarnation) that claimed the run: finishing and interrupting are fenced
-- on it, so a second process under the same name can never record another's outcome.
ALTER TABLE executions ADD COLUMN incarnation uuid;

-- The scheduler reads requested rows per action it can place now, oldest first: a backlog for an
-- action no live worker serves is never walked.
CREATE INDEX executions_requested_by_action ON executions (action_ref, updated_at) WHERE status = 'requested';

-- Retention deletes finished executions oldest first, through this index alone.
CREATE INDEX executions_finished ON executions (finished_at)
    WHERE status IN ('completed', 'failed', 'timeout', 'cancelled');

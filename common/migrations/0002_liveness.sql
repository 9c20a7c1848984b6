-- Liveness and recovery.

-- Each worker process holds a session advisory lock on this key on its own connection;
-- PostgreSQL releases it the moment the process dies, which the sweeper notices.
ALTER TABLE workers ADD COLUMN lock_key bigint;

-- `attempt` is the fencing token and only grows; `schedule_attempts` counts dispatches since the
-- run last started, which is what `executor.max_schedule_attempts` limits.
ALTER TABLE executions ADD COLUMN schedule_attempts integer NOT NULL DEFAULT 0;
-- The worker a rescheduled execution last went to: placement prefers another one.
ALTER TABLE executions ADD COLUMN previous_worker text;

-- Recovery policy as the action declares it (NULL: not declared, the YAML or default decides).
ALTER TABLE actions ADD COLUMN durable boolean NOT NULL DEFAULT false;
ALTER TABLE actions ADD COLUMN recover_on_worker_loss boolean;
ALTER TABLE actions ADD COLUMN max_recovery_attempts integer;

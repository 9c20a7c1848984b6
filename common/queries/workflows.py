"""Named queries of durable workflows: step checkpoints (`workflow_steps`), the signal mailbox
(`workflow_signals`), suspension and waking, and the operator's controls on `executions`.

Everything a worker writes for a run is fenced like its finish: only while the row is `running` on
this worker, at this attempt, under this incarnation (DESIGN section 3). A fenced write that
matches no row returns nothing, and the worker stops the run without recording anything more.
"""

from common.queries import CONTROL_CHANNEL, TIMER_CHANNEL, WAKE_CHANNEL

_TERMINAL = "('completed', 'failed', 'timeout', 'cancelled')"

#: The fence every worker write of a run goes through ($1 id, $2 attempt, $3 worker, $4 incarnation).
_MINE = "e.id = $1 AND e.attempt = $2 AND e.worker = $3 AND e.incarnation = $4 AND e.status = 'running'"

# A run starts (or resumes) on this worker: its deadline is set the first time it starts, and it
# records `workflow.started` the first time, `workflow.resumed` after that. Returns the time left
# before its deadline and the database's clock, against which recorded wake-up times are read.
# $5 the whole run's timeout in seconds (NULL: none), $6 event data
START = f"""
WITH me AS (
    UPDATE executions e
    SET deadline = COALESCE(e.deadline, now() + make_interval(secs => $5::float8)),
        wake_at = NULL, waiting_on = NULL, waiting_for = NULL, last_event_seq = e.last_event_seq + 1
    WHERE {_MINE}
    RETURNING e.id, e.last_event_seq, e.deadline, e.recovery_attempts
), ev AS (
    INSERT INTO execution_events (execution_id, seq, type, data)
    SELECT id, last_event_seq,
           CASE WHEN EXISTS (SELECT 1 FROM execution_events x WHERE x.execution_id = $1 AND x.type = 'workflow.started')
                THEN 'workflow.resumed' ELSE 'workflow.started' END,
           $6::jsonb
    FROM me
)
SELECT extract(epoch FROM deadline - now())::float8 AS remaining_s, recovery_attempts,
       extract(epoch FROM now())::float8 AS db_now
FROM me
"""

# The run's checkpoints, in step order. $1 id
STEPS = """
SELECT step_id, name, status, result, error, store_delta, attempts, child_id,
       extract(epoch FROM wake_at)::float8 AS wake_at_s
FROM workflow_steps WHERE execution_id = $1
ORDER BY step_id
"""

# Record a step (completed, failed, or pending: a timer, a child, a retry under way) with its
# event, in one fenced statement. Returns whether an operator asked the run to pause, and the
# step's wake-up time (kept from its first recording: a timer never moves).
# $5 step_id, $6 name, $7 status, $8 result, $9 error, $10 store changes, $11 attempts,
# $12 started at (epoch s), $13 event type, $14 event data, $15 wake in seconds, $16 child id
CHECKPOINT = f"""
WITH me AS (
    UPDATE executions e
    SET last_event_seq = e.last_event_seq + 1, updated_at = now(),
        store = CASE WHEN $10::jsonb IS NULL THEN e.store ELSE e.store || $10::jsonb END
    WHERE {_MINE}
    RETURNING e.id, e.last_event_seq, e.pause_requested
), st AS (
    INSERT INTO workflow_steps AS s (execution_id, step_id, name, status, result, error, store_delta, attempts,
                                     wake_at, child_id, started_at, finished_at)
    SELECT id, $5, $6, $7::text, $8::jsonb, $9::jsonb, $10::jsonb, $11,
           now() + make_interval(secs => $15::float8), $16::uuid, to_timestamp($12::float8),
           CASE WHEN $7::text <> 'pending' THEN now() END
    FROM me
    ON CONFLICT (execution_id, step_id) DO UPDATE SET
        status = EXCLUDED.status, result = EXCLUDED.result, error = EXCLUDED.error,
        store_delta = EXCLUDED.store_delta, attempts = EXCLUDED.attempts, finished_at = EXCLUDED.finished_at,
        wake_at = COALESCE(s.wake_at, EXCLUDED.wake_at), child_id = COALESCE(s.child_id, EXCLUDED.child_id)
    RETURNING s.wake_at
), ev AS (
    INSERT INTO execution_events (execution_id, seq, type, data)
    SELECT id, last_event_seq, $13::text, $14::jsonb FROM me
)
SELECT me.pause_requested, extract(epoch FROM st.wake_at)::float8 AS wake_at_s,
       extract(epoch FROM now())::float8 AS db_now
FROM me, st
"""

# A child execution started by `ctx.run`, in the transaction that records its pending step: one
# child per step, whatever happens to the parent. An action unknown to the catalogue is not
# inserted (the step then fails with a clear error). $1 child id, $2 action, $3 parameters,
# $4 timeout_s, $5 parent id, $6 whether the action is one of Baton's built-ins
INSERT_CHILD = f"""
WITH ins AS (
    INSERT INTO executions (id, action_ref, parameters, status, timeout_s, parent_id, last_event_seq)
    SELECT $1, $2, $3::jsonb, 'requested', $4, $5, 1
    WHERE $6::bool OR EXISTS (SELECT 1 FROM actions a WHERE a.ref = $2)
    ON CONFLICT (id) DO NOTHING
    RETURNING id
), ev AS (
    INSERT INTO execution_events (execution_id, seq, type, data)
    SELECT id, 1, 'execution.requested', jsonb_build_object('parent', $5::uuid) FROM ins
)
SELECT EXISTS (SELECT 1 FROM ins) OR EXISTS (SELECT 1 FROM executions WHERE id = $1) AS exists,
       pg_notify('{WAKE_CHANNEL}', 'requested')
"""

# A child's state, for its parent. $1 child id
CHILD = "SELECT status, result, error FROM executions WHERE id = $1"

# Take the oldest signal of that name waiting for the run. $1 id, $2 name, $3 the step consuming it
TAKE_SIGNAL = """
UPDATE workflow_signals SET consumed_by = $3
WHERE id = (
    SELECT id FROM workflow_signals
    WHERE execution_id = $1 AND name = $2 AND consumed_by IS NULL
    ORDER BY id LIMIT 1
    FOR UPDATE SKIP LOCKED
)
RETURNING id, data
"""

# The signal this step has already taken, if any: a take whose commit went through but whose reply
# was lost is tried again, and must find what it took. $1 id, $2 name, $3 the step
TAKEN_SIGNAL = """
SELECT id, data FROM workflow_signals WHERE execution_id = $1 AND name = $2 AND consumed_by = $3
ORDER BY id LIMIT 1
"""

# Taken before SUSPEND, in a statement of its own, in the order a cancel takes them (the run, then
# the child it waits for). A child finishing or a signal arriving under way (each holds one of
# these rows) has then committed, and SUSPEND's snapshot, taken after, sees it; one that comes
# later waits for SUSPEND to commit and finds the run waiting, which it wakes. A finishing child
# locks its parent only when the parent is waiting, so it never waits for this run. $1 run id,
# $2 the child's id (or NULL)
LOCK_FOR_SUSPEND = "SELECT id FROM executions WHERE id = $1 OR id = $2 ORDER BY id <> $1 FOR SHARE"

# The run leaves its worker: `sleeping` until its timer, `waiting` for a child or a signal, or
# `paused`. It goes straight back in line instead if what it waits for has already happened (a
# child that finished, a signal that arrived, while it was deciding to wait), and to `paused` if an
# operator asked for that. It wakes at its timer or at its deadline, whichever is first. Run after
# LOCK_FOR_SUSPEND, in its transaction. $5 status, $6 wake at (epoch s, or NULL), $7 child id,
# $8 signal name
SUSPEND = f"""
WITH ready AS (
    SELECT ($7::uuid IS NOT NULL AND EXISTS (SELECT 1 FROM executions c WHERE c.id = $7 AND c.status IN {_TERMINAL}))
        OR ($8::text IS NOT NULL AND EXISTS (
                SELECT 1 FROM workflow_signals s WHERE s.execution_id = $1 AND s.name = $8 AND s.consumed_by IS NULL))
        AS now
), upd AS (
    UPDATE executions e
    SET status = CASE WHEN e.pause_requested OR $5::text = 'paused' THEN 'paused'
                      WHEN ready.now THEN 'requested' ELSE $5::text END,
        wake_at = LEAST(to_timestamp($6::float8), e.deadline),
        waiting_on = $7::uuid, waiting_for = $8::text, pause_requested = false,
        updated_at = now(), last_event_seq = e.last_event_seq + 1
    FROM ready
    WHERE {_MINE}
    RETURNING e.id, e.status, e.wake_at, e.last_event_seq
), ev AS (
    INSERT INTO execution_events (execution_id, seq, type, data)
    SELECT id, last_event_seq, 'workflow.suspended',
           jsonb_build_object('status', status, 'wake_at', wake_at, 'child', $7::uuid, 'signal', $8::text)
    FROM upd
)
SELECT status, pg_notify('{WAKE_CHANNEL}', 'capacity'), pg_notify('{TIMER_CHANNEL}', 'suspended') FROM upd
"""

# What `ctx.store` changed after the last step, saved with the run's outcome. Fenced like the rest.
SAVE_STORE = f"""
UPDATE executions e SET store = e.store || $5::jsonb WHERE {_MINE} RETURNING e.id
"""

# Seconds until the next suspended run or delayed execution is due (negative: one is overdue);
# NULL if none waits on a timer. Read from the first entry of each partial index.
NEXT_WAKE_IN = """
SELECT extract(epoch FROM LEAST(
    (SELECT min(wake_at) FROM executions WHERE status IN ('sleeping', 'waiting') AND wake_at IS NOT NULL),
    (SELECT min(not_before) FROM executions WHERE status = 'requested' AND not_before IS NOT NULL)
) - now())::float8
"""

# Delayed executions (`--delay`, `--at`, an action's retry backoff) whose time has come join the
# scheduler's line, in the order they were due. $1 limit
RELEASE_DELAYED = """
WITH due AS (
    SELECT id, not_before FROM executions
    WHERE status = 'requested' AND not_before <= now()
    ORDER BY not_before LIMIT $1
    FOR UPDATE SKIP LOCKED
), upd AS (
    UPDATE executions e SET not_before = NULL, updated_at = due.not_before, last_event_seq = e.last_event_seq + 1
    FROM due WHERE e.id = due.id
    RETURNING e.id, e.last_event_seq
), ev AS (
    INSERT INTO execution_events (execution_id, seq, type, data)
    SELECT id, last_event_seq, 'execution.due', '{}'::jsonb FROM upd
)
SELECT id FROM upd
"""

# What puts the runs in `due` back in line, each with an `execution.woken` event giving its reason.
_WAKE = """
upd AS (
    UPDATE executions e
    SET status = 'requested', wake_at = NULL, waiting_on = NULL, waiting_for = NULL, updated_at = now(),
        last_event_seq = e.last_event_seq + 1
    FROM due WHERE e.id = due.id
    RETURNING e.id, e.last_event_seq, due.reason
), ev AS (
    INSERT INTO execution_events (execution_id, seq, type, data)
    SELECT id, last_event_seq, 'execution.woken', jsonb_build_object('reason', reason) FROM upd
)
SELECT id, reason FROM upd
"""

# Back in line: suspended runs whose timer or deadline is due. $1 limit
WAKE_DUE = f"""
WITH due AS (
    SELECT id, 'timer' AS reason FROM executions
    WHERE status IN ('sleeping', 'waiting') AND wake_at <= now()
    ORDER BY wake_at LIMIT $1 FOR UPDATE SKIP LOCKED
), {_WAKE}"""

# Back in line: waiting runs whose child has finished or whose signal has arrived, which the
# trigger or the signal query should have woken at once (LOCK_FOR_SUSPEND closes the race between
# them and the run's suspension): a backstop that should find none, for a row put in this state
# some other way. It reads every waiting run, so the timers loop runs it once a fallback interval,
# not on every notification. $1 limit
WAKE_READY = f"""
WITH due AS (
    SELECT p.id, 'ready' AS reason FROM executions p
    WHERE p.status = 'waiting' AND (p.wake_at IS NULL OR p.wake_at > now())
      AND (EXISTS (SELECT 1 FROM executions c WHERE c.id = p.waiting_on AND c.status IN {_TERMINAL})
           OR EXISTS (SELECT 1 FROM workflow_signals s
                      WHERE s.execution_id = p.id AND s.name = p.waiting_for AND s.consumed_by IS NULL))
    LIMIT $1 FOR UPDATE SKIP LOCKED
), {_WAKE}"""

# -- operator controls ----------------------------------------------------------------------------

# Taken first, in its own statement: a child being started meanwhile (in the transaction that
# records its parent's step, which locks the parent) has then committed, and the tree cancelled
# next includes it. $1 id
LOCK_EXECUTION = "SELECT id FROM executions WHERE id = $1 FOR UPDATE"

# Cancel an execution that has not finished, with every unfinished child it started (and theirs).
# A running one is stopped by its worker, told through CONTROL_CHANNEL; its late outcome is fenced.
# $1 id, $2 error object
CANCEL = f"""
WITH RECURSIVE tree AS (
    SELECT id FROM executions WHERE id = $1
    UNION
    SELECT c.id FROM executions c JOIN tree t ON c.parent_id = t.id
), upd AS (
    UPDATE executions e
    SET status = 'cancelled', error = $2::jsonb, finished_at = now(), updated_at = now(), wake_at = NULL,
        pause_requested = false, last_event_seq = e.last_event_seq + 1
    FROM tree
    WHERE e.id = tree.id AND e.status NOT IN {_TERMINAL}
    RETURNING e.*
), ev AS (
    INSERT INTO execution_events (execution_id, seq, type, data)
    SELECT id, last_event_seq, 'execution.cancelled', error FROM upd
)
SELECT upd.*, pg_notify('{CONTROL_CHANNEL}', upd.id::text) AS control, pg_notify('{WAKE_CHANNEL}', 'capacity') AS wake
FROM upd
"""

#: A durable workflow: only those can pause, take signals, or be retried from a checkpoint.
_DURABLE = "EXISTS (SELECT 1 FROM actions a WHERE a.ref = e.action_ref AND a.durable)"

# Pause a durable run: at once if it holds no worker, at its next step boundary if it runs.
# $1 id. Returns the status it now has ('paused', or 'running' while it gets to its boundary).
PAUSE = f"""
WITH upd AS (
    UPDATE executions e
    SET status = CASE WHEN e.status = 'running' THEN 'running' ELSE 'paused' END,
        pause_requested = (e.status = 'running'), updated_at = now(), last_event_seq = e.last_event_seq + 1
    WHERE e.id = $1 AND e.status IN ('requested', 'scheduled', 'running', 'sleeping', 'waiting') AND {_DURABLE}
    RETURNING e.id, e.status, e.last_event_seq
), ev AS (
    INSERT INTO execution_events (execution_id, seq, type, data)
    SELECT id, last_event_seq, CASE WHEN status = 'paused' THEN 'execution.paused' ELSE 'execution.pause_requested' END,
           '{{}}'::jsonb
    FROM upd
)
SELECT status FROM upd
"""

# Resume a paused run (back in line: it replays to where it stopped), or call off a pause that a
# running one has not reached yet. $1 id
RESUME = f"""
WITH upd AS (
    UPDATE executions e
    SET status = CASE WHEN e.status = 'paused' THEN 'requested' ELSE e.status END,
        pause_requested = false, wake_at = CASE WHEN e.status = 'paused' THEN NULL ELSE e.wake_at END,
        waiting_on = CASE WHEN e.status = 'paused' THEN NULL ELSE e.waiting_on END,
        waiting_for = CASE WHEN e.status = 'paused' THEN NULL ELSE e.waiting_for END,
        schedule_attempts = 0, updated_at = now(), last_event_seq = e.last_event_seq + 1
    WHERE e.id = $1 AND (e.status = 'paused' OR (e.status = 'running' AND e.pause_requested))
    RETURNING e.id, e.status, e.last_event_seq
), ev AS (
    INSERT INTO execution_events (execution_id, seq, type, data)
    SELECT id, last_event_seq, 'execution.resumed', '{{}}'::jsonb FROM upd
)
SELECT status, pg_notify('{WAKE_CHANNEL}', 'resumed') FROM upd
"""

# Deliver a signal to a durable run that has not finished; a run waiting for it goes back in line.
# $1 id, $2 name, $3 data
SIGNAL = f"""
WITH target AS (
    SELECT e.id, (e.status = 'waiting' AND e.waiting_for = $2) AS wakes
    FROM executions e WHERE e.id = $1 AND e.status NOT IN {_TERMINAL} AND {_DURABLE}
    FOR UPDATE
), ins AS (
    INSERT INTO workflow_signals (execution_id, name, data) SELECT id, $2, $3::jsonb FROM target RETURNING id
), upd AS (
    UPDATE executions e
    SET status = CASE WHEN t.wakes THEN 'requested' ELSE e.status END,
        wake_at = CASE WHEN t.wakes THEN NULL ELSE e.wake_at END,
        waiting_for = CASE WHEN t.wakes THEN NULL ELSE e.waiting_for END,
        updated_at = CASE WHEN t.wakes THEN now() ELSE e.updated_at END,
        last_event_seq = e.last_event_seq + 1
    FROM target t WHERE e.id = t.id
    RETURNING e.id, e.last_event_seq, t.wakes
), ev AS (
    INSERT INTO execution_events (execution_id, seq, type, data)
    SELECT id, last_event_seq, 'signal.sent', jsonb_build_object('name', $2::text, 'woke', wakes) FROM upd
)
SELECT (SELECT id FROM ins) AS signal_id, wakes, pg_notify('{WAKE_CHANNEL}', 'signal') FROM upd
"""

# Retry a durable run that failed, was cancelled or timed out, from its checkpoint: completed
# steps are kept; failed and unfinished ones (and the run's deadline and recovery budget) start
# over. The run's history is kept; the event lists the steps that will run again. $1 id
RETRY_DURABLE = f"""
WITH upd AS (
    UPDATE executions e
    SET status = 'requested', result = NULL, error = NULL, finished_at = NULL, deadline = NULL, wake_at = NULL,
        waiting_on = NULL, waiting_for = NULL, pause_requested = false, schedule_attempts = 0,
        recovery_attempts = 0, updated_at = now(), last_event_seq = e.last_event_seq + 1
    WHERE e.id = $1 AND e.status IN ('failed', 'cancelled', 'timeout') AND {_DURABLE}
    RETURNING e.id, e.last_event_seq
), reset AS (
    DELETE FROM workflow_steps s USING upd
    WHERE s.execution_id = upd.id AND s.status <> 'completed'
    RETURNING s.step_id, s.name, s.status
), ev AS (
    INSERT INTO execution_events (execution_id, seq, type, data)
    SELECT id, last_event_seq, 'execution.retried',
           jsonb_build_object('steps_kept', (SELECT count(*) FROM workflow_steps k WHERE k.execution_id = upd.id
                                                                                   AND k.status = 'completed'),
                              'steps_reset', (SELECT COALESCE(jsonb_agg(jsonb_build_object(
                                  'step', step_id, 'name', name, 'status', status) ORDER BY step_id), '[]'::jsonb)
                                  FROM reset))
    FROM upd
)
SELECT id, pg_notify('{WAKE_CHANNEL}', 'retried') FROM upd
"""

# Retry any other finished run from scratch, as a new execution linked to the old one. $1 old id,
# $2 new id
RETRY_FRESH = f"""
WITH ins AS (
    INSERT INTO executions (id, action_ref, parameters, status, timeout_s, retry_of, last_event_seq)
    SELECT $2, e.action_ref, e.parameters, 'requested', e.timeout_s, e.id, 1
    FROM executions e WHERE e.id = $1 AND e.status IN {_TERMINAL} AND e.action_ref IS NOT NULL
    RETURNING id
), ev AS (
    INSERT INTO execution_events (execution_id, seq, type, data)
    SELECT id, 1, 'execution.requested', jsonb_build_object('retry_of', $1::uuid) FROM ins
)
SELECT id, pg_notify('{WAKE_CHANNEL}', 'requested') FROM ins
"""

# Is it a durable workflow? $1 action ref
IS_DURABLE = "SELECT durable FROM actions WHERE ref = $1"

# A worker's check on what it runs: which of these runs no longer run here (cancelled, or moved
# on: to another worker, or to a later attempt, here or elsewhere). $1 ids, $2 the attempt each
# runs here, $3 worker, $4 incarnation
NO_LONGER_MINE = """
SELECT e.id, e.status FROM unnest($1::uuid[], $2::int[]) AS r(id, attempt)
CROSS JOIN LATERAL (
    SELECT id, status, attempt, worker, incarnation FROM executions WHERE id = r.id LIMIT 1  -- one primary-key lookup each
) AS e
WHERE NOT (e.status = 'running' AND e.attempt = r.attempt AND e.worker = $3 AND e.incarnation = $4)
"""

# A run's steps, for the timeline. $1 id
STEP_TIMELINE = """
SELECT step_id, name, status, attempts, child_id, started_at, finished_at,
       extract(epoch FROM finished_at - started_at)::float8 AS duration_s, wake_at, error
FROM workflow_steps WHERE execution_id = $1 ORDER BY step_id
"""

"""Named queries on `executions` (and the `execution_events` rows each transition appends).

Every transition is a compare-and-set on (status, attempt) and, for worker writes, on the worker:
a statement that matches no row lost a race, and its caller does nothing more (DESIGN section 3).
Each transition appends its event in the same statement, numbered from `last_event_seq`.
"""

from common.queries import TIMER_CHANNEL, WAKE_CHANNEL
from common.queries.workers import ELIGIBLE, alive, busy

# $1 id, $2 action_ref, $3 parameters, $4 status, $5 idempotency_key, $6 message_id,
# $7 correlation_id, $8 timeout_s, $9 error, $10 max_retries, $11 not_before, $12 schedule_name,
# $13 scheduled_for, $14 warnings, $15 worker (all arrays, one element per request;
# `executor.requests.insert_arguments`). A delayed request whose time has already come is not
# delayed. A request given a worker (intake placed it: `executor.dispatching.place_new`) is
# recorded `scheduled` there at attempt 1, as the scheduler's mark would, with both events.
INSERT_REQUESTS = f"""
WITH ins AS (
    INSERT INTO executions (id, action_ref, parameters, status, idempotency_key, message_id,
                            correlation_id, timeout_s, error, finished_at, last_event_seq, max_retries, not_before,
                            schedule_name, scheduled_for, warnings, worker, attempt, schedule_attempts, scheduled_at)
    SELECT r.id, r.action_ref, r.parameters::jsonb, CASE WHEN r.worker IS NULL THEN r.status ELSE 'scheduled' END,
           r.idempotency_key, r.message_id, r.correlation_id, r.timeout_s, r.error::jsonb,
           CASE WHEN r.status = 'failed' THEN now() END, CASE WHEN r.worker IS NULL THEN 1 ELSE 2 END, r.max_retries,
           CASE WHEN r.status = 'requested' AND r.not_before > now() THEN r.not_before END,
           r.schedule_name, r.scheduled_for, r.warnings::jsonb, r.worker,
           CASE WHEN r.worker IS NULL THEN 0 ELSE 1 END, CASE WHEN r.worker IS NULL THEN 0 ELSE 1 END,
           CASE WHEN r.worker IS NOT NULL THEN now() END
    FROM unnest($1::uuid[], $2::text[], $3::text[], $4::text[], $5::text[], $6::text[], $7::text[],
                $8::float8[], $9::text[], $10::int[], $11::timestamptz[], $12::text[], $13::timestamptz[],
                $14::text[], $15::text[])
         AS r(id, action_ref, parameters, status, idempotency_key, message_id, correlation_id, timeout_s, error,
              max_retries, not_before, schedule_name, scheduled_for, warnings, worker)
    ON CONFLICT DO NOTHING
    RETURNING id, action_ref, status, attempt, worker, finished_at, error, warnings, not_before, schedule_attempts
), ev AS (
    INSERT INTO execution_events (execution_id, seq, type, data)
    SELECT id, 1, 'execution.' || CASE WHEN status = 'scheduled' THEN 'requested' ELSE status END,
           COALESCE(error, '{{}}'::jsonb)
           || CASE WHEN not_before IS NULL THEN '{{}}'::jsonb ELSE jsonb_build_object('not_before', not_before) END
           || CASE WHEN warnings IS NULL THEN '{{}}'::jsonb ELSE jsonb_build_object('warnings', warnings) END
    FROM ins
    UNION ALL
    SELECT id, 2, 'execution.scheduled', jsonb_build_object('worker', worker, 'attempt', attempt)
    FROM ins WHERE status = 'scheduled'
)
SELECT ins.*, CASE WHEN EXISTS (SELECT 1 FROM ins WHERE not_before IS NOT NULL)
                   THEN pg_notify('{TIMER_CHANNEL}', 'delayed') END AS pg_notify
FROM ins
"""

# Requests that were not inserted: the same request seen again (same id: enough of the row that a
# failed one's notification can be published again) or a repeated idempotency key (with what the
# key's holder was given, to tell the same request from a conflicting one).
FIND_EXISTING = """
SELECT id, action_ref, status, attempt, worker, finished_at, error, warnings, not_before, parameters, timeout_s,
       idempotency_key
FROM executions WHERE id = ANY($1::uuid[])
UNION ALL
SELECT e.id, e.action_ref, e.status, e.attempt, e.worker, e.finished_at, e.error, e.warnings, e.not_before,
       e.parameters, e.timeout_s, e.idempotency_key
FROM unnest($2::text[], $3::text[]) AS k(action_ref, idempotency_key)
JOIN executions e ON e.action_ref = k.action_ref AND e.idempotency_key = k.idempotency_key
"""

# The oldest requested rows of each action some live worker has room for now, each action read
# through its own index range, so that a backlog of actions nobody can take is never walked. Delayed
# rows (`not_before` set) are not in that index: they cost a pass nothing until they are due.
# $1 limit, $2 actions, $3 room per action
SELECT_REQUESTED_FOR_UPDATE = """
SELECT r.id, r.action_ref, r.attempt, r.previous_worker
FROM unnest($2::text[], $3::int[]) AS a(ref, room)
CROSS JOIN LATERAL (
    SELECT id, action_ref, attempt, previous_worker, updated_at FROM executions
    WHERE status = 'requested' AND not_before IS NULL AND action_ref = a.ref
    ORDER BY updated_at
    LIMIT LEAST(a.room, $1)
    FOR UPDATE SKIP LOCKED
) AS r
ORDER BY r.updated_at
LIMIT $1
"""


def waiting(action: str) -> str:
    """The one definition of "executions of this action wait to be placed": looked up in the
    action's own range of `executions_requested_by_action` (delayed rows are not in it)."""
    return f"EXISTS (SELECT 1 FROM executions WHERE status = 'requested' AND not_before IS NULL AND action_ref = {action})"


# Which of these actions ($1) have executions waiting to be placed.
ACTIONS_WAITING = f"""
SELECT a.ref FROM unnest($1::text[]) AS a(ref)
WHERE {waiting("a.ref")}
"""

# The live workers to place new requests of these actions ($2) on, as `workers.ELIGIBLE` ($1
# staleness multiplier), each row with those of the actions that have executions waiting to be
# placed (`waiting`, the same on every row): intake records new requests of those behind them
# rather than placing them ahead (whichever executor recorded the ones waiting), and places the
# others.
ELIGIBLE_WITH_WAITING = f"""
SELECT e.*, ARRAY(SELECT a.ref FROM unnest($2::text[]) AS a(ref) WHERE {waiting("a.ref")}) AS waiting
FROM ({ELIGIBLE.strip()}) AS e
"""

# Serialises the passes that place actions with a concurrency limit, across executors: each pass
# takes these transaction locks (in one order) before it counts what runs. $1 actions (sorted)
LOCK_CONCURRENCY = "SELECT pg_advisory_xact_lock(hashtext('baton.concurrency:' || a)) FROM unnest($1::text[]) AS a"

# How many of each of these actions are dispatched or running now, through a partial index.
# $1 actions
ACTIVE_BY_ACTION = """
SELECT action_ref, count(*) AS n FROM executions
WHERE status IN ('scheduled', 'running') AND action_ref = ANY($1::text[])
GROUP BY action_ref
"""

# Requested for longer than $1 seconds for actions that no live worker serves ($2), oldest
# first per action through the same index. $3 limit
SELECT_REQUESTED_EXPIRED = """
SELECT r.id, r.attempt, r.action_ref, r.age_s
FROM unnest($2::text[]) AS a(ref)
CROSS JOIN LATERAL (
    SELECT id, attempt, action_ref, extract(epoch FROM now() - updated_at)::float8 AS age_s FROM executions
    WHERE status = 'requested' AND not_before IS NULL AND action_ref = a.ref
      AND updated_at < now() - make_interval(secs => $1)
    ORDER BY updated_at
    LIMIT $3
    FOR UPDATE SKIP LOCKED
) AS r
LIMIT $3
"""

# Each row is found by its id. The fence on status is written `IS NOT DISTINCT FROM` so that it
# cannot match the partial index of requested rows: a burst grows that backlog faster than the
# planner's statistics follow, and with `=` it chose to read the whole backlog on every pass. The
# ids are also given as `id = ANY($1)`: joined with `unnest` alone, a table analyzed with 1,000
# finished rows was read whole for them (a hash join) until a burst had added 12,000 to 24,000
# more, at tens to hundreds of milliseconds a statement; with it, the primary key is used from
# 6,000 to 8,000 on (tests: test_fenced_updates_find_their_rows_by_id_when_statistics_are_stale).
# $1 ids, $2 workers, $3 current attempts
MARK_SCHEDULED = """
WITH upd AS (
    UPDATE executions e
    SET status = 'scheduled', worker = p.worker, attempt = e.attempt + 1,
        schedule_attempts = e.schedule_attempts + 1, scheduled_at = now(),
        updated_at = now(), last_event_seq = e.last_event_seq + 1
    FROM unnest($1::uuid[], $2::text[], $3::int[]) AS p(id, worker, attempt)
    WHERE e.id = ANY($1::uuid[]) AND e.id = p.id AND e.status IS NOT DISTINCT FROM 'requested'
      AND e.attempt = p.attempt
    RETURNING e.id, e.attempt, e.worker, e.schedule_attempts, e.last_event_seq
), ev AS (
    INSERT INTO execution_events (execution_id, seq, type, data)
    SELECT id, last_event_seq, 'execution.scheduled', jsonb_build_object('worker', worker, 'attempt', attempt)
    FROM upd
)
SELECT id, attempt, worker, schedule_attempts FROM upd
"""

def _back_in_line(where: str, *, schedule_attempts: str, data: str) -> str:
    """The one definition of "a dispatch that did not start goes back to `requested`": the rows
    ``where`` picks (`e`) leave their worker, which the next pass avoids on equal terms, with their
    `schedule_attempts` set to ``schedule_attempts`` and an `execution.rescheduled` event holding
    ``data``. The statement's CTE `upd` returns id, attempt and last_event_seq."""
    return f"""
WITH upd AS (
    UPDATE executions e
    SET status = 'requested', previous_worker = e.worker, worker = NULL, updated_at = now(),
        schedule_attempts = {schedule_attempts}, last_event_seq = e.last_event_seq + 1
    WHERE {where}
    RETURNING e.id, e.attempt, e.last_event_seq
), ev AS (
    INSERT INTO execution_events (execution_id, seq, type, data)
    SELECT id, last_event_seq, 'execution.rescheduled', {data} FROM upd
)"""


# A dispatch that did not start goes back to `requested`; the next pass places it again, preferring
# another worker. $1 id, $2 attempt, $3 event data, $4 whether this dispatch counts against
# `max_schedule_attempts` (a broker outage is not the execution's fault).
RESCHEDULE = _back_in_line(
    "e.id = $1 AND e.status = 'scheduled' AND e.attempt = $2",
    schedule_attempts="CASE WHEN $4::bool THEN e.schedule_attempts ELSE e.schedule_attempts - 1 END",
    data="$3::jsonb",
) + """
SELECT id FROM upd
"""

# What is `scheduled` on a worker and not yet claimed goes back to `requested`, not counted against
# `max_schedule_attempts` (as `RESCHEDULE` with $4 false), and wakes the scheduler: run by the
# worker when it starts and when its broker connection comes back, since a broker restart may have
# dropped the (transient) dispatch messages. $1 worker, $2 event data
HAND_BACK_UNCLAIMED = _back_in_line(
    "e.worker = $1 AND e.status = 'scheduled'",
    schedule_attempts="e.schedule_attempts - 1",
    data="$2::jsonb || jsonb_build_object('attempt', attempt)",
) + f"""
SELECT id, attempt, pg_notify('{WAKE_CHANNEL}', 'requested') AS pg_notify FROM upd
"""

# Claimed by this process and never started: a drain abandoned a claim the database held up, and
# may have missed its commit. Back in line: nothing ran, and its dispatch budget starts afresh (the
# claim had already reset it, as a start does). $1 ids, $2 attempts, $3 worker, $4 incarnation,
# $5 event data
UNCLAIM = _back_in_line(
    "e.id = ANY($1::uuid[]) AND (e.id, e.attempt) IN (SELECT * FROM unnest($1::uuid[], $2::int[])) "
    "AND e.worker = $3 AND e.incarnation = $4 AND e.status = 'running'",
    schedule_attempts="e.schedule_attempts",
    data="$5::jsonb || jsonb_build_object('attempt', attempt)",
) + f"""
SELECT id, attempt, pg_notify('{WAKE_CHANNEL}', 'requested') AS pg_notify FROM upd
"""

# The fenced claim: scheduled -> running, only for this worker at this attempt, and only while
# this process is the name's live incarnation (it is recorded on the run, and fences what follows).
# It returns what to run from the row: a dispatch message carries identity and fencing only.
# A retry after a claim whose commit was not acknowledged (connection lost) matches nothing here:
# `CLAIMED` then gets the row back (`worker.claiming.claim_rows` runs both). $1 ids, $2 attempts,
# $3 worker, $4 incarnation
CLAIM = """
WITH me AS (
    SELECT name FROM workers WHERE name = $3 AND incarnation = $4 AND status IN ('active', 'draining')
), upd AS (
    UPDATE executions e
    SET status = 'running', started_at = now(), updated_at = now(), schedule_attempts = 0,
        incarnation = $4, last_event_seq = e.last_event_seq + 1
    FROM unnest($1::uuid[], $2::int[]) AS c(id, attempt), me
    WHERE e.id = c.id AND e.attempt = c.attempt AND e.worker = me.name AND e.status = 'scheduled'
    RETURNING e.id, e.attempt, e.action_ref, e.parameters, e.timeout_s, e.last_event_seq, e.failed_tries,
              e.max_retries
), ev AS (
    INSERT INTO execution_events (execution_id, seq, type, data)
    SELECT id, last_event_seq, 'execution.started', jsonb_build_object('worker', $3::text, 'attempt', attempt)
    FROM upd
)
SELECT id, attempt, action_ref, parameters, timeout_s, failed_tries, max_retries FROM upd
"""

# Of these dispatches, the ones this process has already claimed: what makes a retried claim
# idempotent (it gets the row back rather than leaving it `running` with nobody running it; the
# worker skips what it already runs). A statement of its own, run only for what `CLAIM` did not
# match: joined to `CLAIM` by UNION ALL it cost every claim's planning more than the update did.
# $1 ids, $2 attempts, $3 worker, $4 incarnation
CLAIMED = """
SELECT e.id, e.attempt, e.action_ref, e.parameters, e.timeout_s, e.failed_tries, e.max_retries
FROM executions e, unnest($1::uuid[], $2::int[]) AS c(id, attempt)
WHERE e.id = ANY($1::uuid[]) AND e.id = c.id AND e.attempt = c.attempt AND e.worker = $3 AND e.incarnation = $4
  AND e.status = 'running'
"""

# The fenced finish: running -> terminal, only for this worker process at this attempt; or, for an
# application failure that is to be retried (status `retry`), back to `requested` until its
# backoff has passed (`not_before`), its failure counted in `failed_tries`.
# A retry after a finish whose commit was not acknowledged matches nothing here: `FINISHED` then
# finds its committed outcome (`worker.recording.finish_rows` runs both). Returns what a
# notification says of each (`common.notifications.NOTIFIED_FIELDS`).
# $1 ids, $2 attempts, $3 statuses, $4 results, $5 errors, $6 worker, $7 incarnation, $8 retry delays
FINISH = f"""
WITH upd AS (
    UPDATE executions e
    SET status = CASE WHEN f.status = 'retry' THEN 'requested' ELSE f.status END,
        result = f.result::jsonb, error = f.error::jsonb,
        finished_at = CASE WHEN f.status = 'retry' THEN NULL ELSE now() END,
        not_before = CASE WHEN f.status = 'retry' THEN now() + make_interval(secs => f.retry_in_s) END,
        failed_tries = e.failed_tries + CASE WHEN f.status = 'retry' THEN 1 ELSE 0 END,
        previous_worker = CASE WHEN f.status = 'retry' THEN e.worker ELSE e.previous_worker END,
        updated_at = now(), last_event_seq = e.last_event_seq + 1
    FROM unnest($1::uuid[], $2::int[], $3::text[], $4::text[], $5::text[], $8::float8[])
         AS f(id, attempt, status, result, error, retry_in_s)
    WHERE e.id = f.id AND e.attempt = f.attempt AND e.worker = $6 AND e.incarnation = $7 AND e.status = 'running'
    RETURNING e.id, e.action_ref, e.status, e.attempt, e.worker, e.finished_at, e.error, e.last_event_seq,
              e.failed_tries, e.not_before, f.retry_in_s
), ev AS (
    INSERT INTO execution_events (execution_id, seq, type, data)
    SELECT id, last_event_seq, CASE WHEN retry_in_s IS NULL THEN 'execution.' || status ELSE 'execution.retrying' END,
           COALESCE(error, '{{}}'::jsonb) || jsonb_build_object('worker', worker, 'attempt', attempt)
           || CASE WHEN retry_in_s IS NULL THEN '{{}}'::jsonb
                   ELSE jsonb_build_object('try', failed_tries, 'retry_in_s', round(retry_in_s::numeric, 3),
                                           'not_before', not_before) END
    FROM upd
)
SELECT id, action_ref, status, attempt, worker, finished_at, pg_notify('{WAKE_CHANNEL}', 'capacity') AS pg_notify,
       CASE WHEN retry_in_s IS NOT NULL THEN pg_notify('{TIMER_CHANNEL}', 'retry') END AS timer_notify
FROM upd
"""

# Of these outcomes, the ones already recorded by this process: what makes a retried finish
# idempotent (it returns its committed outcome, so that its one notification is still published).
# It finds its rows by `id = ANY($1)`, as the scheduler's mark does, and for the same reason. A
# statement of its own, run only for what `FINISH` did not match: joined to `FINISH` by UNION ALL,
# its planning cost every finish four times what the update's own did (0.55 ms against 0.14).
# $1 ids, $2 attempts, $3 statuses (`retry` for a retry), $4 worker, $5 incarnation
FINISHED = """
SELECT e.id, e.action_ref, e.status, e.attempt, e.worker, e.finished_at
FROM executions e, unnest($1::uuid[], $2::int[], $3::text[]) AS f(id, attempt, status)
WHERE e.id = ANY($1::uuid[]) AND e.id = f.id AND e.attempt = f.attempt AND e.worker = $4 AND e.incarnation = $5
  AND (e.status = f.status OR (f.status = 'retry' AND e.status = 'requested'))
"""

# $1 id, $2 from-status, $3 attempt, $4 error object. For failures the executor decides.
FAIL = """
WITH upd AS (
    UPDATE executions e
    SET status = 'failed', error = $4::jsonb, finished_at = now(), updated_at = now(),
        last_event_seq = e.last_event_seq + 1
    WHERE e.id = $1 AND e.status = $2 AND e.attempt = $3
    RETURNING e.*
), ev AS (
    INSERT INTO execution_events (execution_id, seq, type, data)
    SELECT id, last_event_seq, 'execution.failed', error FROM upd
)
SELECT * FROM upd
"""

GET = "SELECT * FROM executions WHERE id = $1"

#: The database's clock, which due times are read against.
NOW = "SELECT now()"

# Ids in a range of the primary key: what an id prefix can name. $1 lowest, $2 highest
BY_ID_RANGE = "SELECT id FROM executions WHERE id BETWEEN $1 AND $2 ORDER BY id LIMIT 2"

RECOVERY_ATTEMPTS = "SELECT recovery_attempts FROM executions WHERE id = $1"

# One index lookup per execution (a plain `= ANY(...)` can turn into a scan of the whole table).
EVENTS = """
SELECT v.execution_id, v.seq, v.type, v.data, v.created_at
FROM unnest($1::uuid[]) AS i(id)
CROSS JOIN LATERAL (
    SELECT * FROM execution_events e WHERE e.execution_id = i.id ORDER BY e.seq
) AS v
"""

# A page of executions, newest first, by keyset (created_at, id) through `executions_created`:
# $1 status, $2 action, $3 worker, $4 created since, $5 created before, $6/$7 the last row of the
# previous page (created_at, id), $8/$9 an id range (an id prefix), $10 limit; NULL: no filter.
LIST_PAGE = """
SELECT id, action_ref, status, attempt, worker, created_at, started_at, finished_at, error
FROM executions
WHERE ($1::text IS NULL OR status = $1) AND ($2::text IS NULL OR action_ref = $2)
  AND ($3::text IS NULL OR worker = $3)
  AND ($4::timestamptz IS NULL OR created_at >= $4) AND ($5::timestamptz IS NULL OR created_at < $5)
  AND ($6::timestamptz IS NULL OR (created_at, id) < ($6, $7::uuid))
  AND ($8::uuid IS NULL OR id BETWEEN $8 AND $9::uuid)
ORDER BY created_at DESC, id DESC
LIMIT $10
"""

# Finished executions per minute over the last hour, completed and not, through `executions_finished`.
FINISHED_PER_MINUTE = """
SELECT date_trunc('minute', finished_at) AS minute,
       count(*) FILTER (WHERE status = 'completed') AS completed,
       count(*) FILTER (WHERE status <> 'completed') AS failed
FROM executions
WHERE status IN ('completed', 'failed', 'timeout', 'cancelled') AND finished_at > now() - interval '1 hour'
GROUP BY 1 ORDER BY 1
"""

# Only states that still need something to happen: bounded by the work in flight, not by history.
COUNT_ACTIVE_BY_STATUS = """
SELECT status, count(*) AS n FROM executions
WHERE status IN ('requested', 'scheduled', 'running', 'interrupted', 'paused', 'sleeping', 'waiting')
GROUP BY status
"""

# A worker's audit: what the database says it runs, started longer ago than a claim takes to
# become a task here. $1 worker, $2 grace in seconds
SELECT_RUNNING_SINCE = """
SELECT id, attempt, action_ref, recovery_attempts FROM executions
WHERE worker = $1 AND status = 'running' AND started_at < now() - make_interval(secs => $2)
"""

# What a worker holds as `running` (to find what it no longer runs). $1 worker
SELECT_RUNNING_ON = """
SELECT id, attempt, action_ref, recovery_attempts FROM executions
WHERE worker = $1 AND status = 'running'
ORDER BY id
FOR UPDATE
"""

# running -> interrupted, fenced on attempt and worker (and on the incarnation when one is given),
# with the `workflow.interrupted` event that recovery reads. Written by the sweeper for a lost
# worker's runs, by a worker for what it gives up (drain deadline, standing down) or finds left
# behind by its predecessor. $1 id, $2 attempt, $3 worker, $4 event data, $5 incarnation or NULL
INTERRUPT = """
WITH upd AS (
    UPDATE executions e
    SET status = 'interrupted', updated_at = now(), last_event_seq = e.last_event_seq + 1
    WHERE e.id = $1 AND e.attempt = $2 AND e.worker = $3 AND e.status = 'running'
      AND ($5::uuid IS NULL OR e.incarnation = $5)
    RETURNING e.id, e.last_event_seq
), ev AS (
    INSERT INTO execution_events (execution_id, seq, type, data)
    SELECT id, last_event_seq, 'workflow.interrupted',
           $4::jsonb || jsonb_build_object('last_event_sequence', last_event_seq - 1)
    FROM upd
)
SELECT id FROM upd
"""

# Candidates of the scheduled-timeout monitor, and whether their worker is merely busy.
# $1 scheduled_timeout_s, $2 limit, $3 staleness multiplier
SELECT_SCHEDULED_TIMED_OUT = f"""
SELECT e.id, e.attempt, e.schedule_attempts, e.worker,
       extract(epoch FROM now() - e.updated_at)::float8 AS age_s,
       COALESCE({busy("$3")}, false) AS worker_busy
FROM executions e LEFT JOIN workers w ON w.name = e.worker
WHERE e.status = 'scheduled' AND e.updated_at < now() - make_interval(secs => $1)
ORDER BY e.updated_at
LIMIT $2
FOR UPDATE OF e SKIP LOCKED
"""

# What a lost worker held. $1 worker
SELECT_HELD_BY_WORKER = """
SELECT id, attempt, schedule_attempts, status, action_ref, recovery_attempts FROM executions
WHERE worker = $1 AND status IN ('scheduled', 'running')
ORDER BY id
FOR UPDATE
"""

# The execution a dead-lettered dispatch was for, whether its worker is alive (and merely busy),
# and has registered since the dispatch (a restart, or a return from a stand-down, both of which
# hand back what the worker held), how long ago it was scheduled and the message TTL of its
# worker's queue. $1 id, $2 staleness multiplier
SELECT_FOR_UPDATE = f"""
SELECT e.id, e.status, e.attempt, e.schedule_attempts, e.worker, COALESCE({alive("$2")}, false) AS worker_alive,
       COALESCE({busy("$2")}, false) AS worker_busy, COALESCE(w.started_at > e.scheduled_at, false) AS worker_restarted,
       EXTRACT(EPOCH FROM clock_timestamp() - e.scheduled_at)::float8 AS waited_s, w.queue_ttl_s
FROM executions e LEFT JOIN workers w ON w.name = e.worker
WHERE e.id = $1
FOR UPDATE OF e
"""

# Runs that an infrastructure failure stopped, for recovery. $1 limit
SELECT_INTERRUPTED = """
SELECT id, attempt, action_ref, recovery_attempts, worker FROM executions
WHERE status = 'interrupted'
ORDER BY updated_at
LIMIT $1
FOR UPDATE SKIP LOCKED
"""

# Recovery: an interrupted run goes back in line, to start again (or, durable, to resume).
# $1 id, $2 attempt
RECOVER = """
WITH upd AS (
    UPDATE executions e
    SET status = 'requested', previous_worker = e.worker, worker = NULL, schedule_attempts = 0,
        recovery_attempts = e.recovery_attempts + 1, updated_at = now(),
        last_event_seq = e.last_event_seq + 1
    WHERE e.id = $1 AND e.status = 'interrupted' AND e.attempt = $2
    RETURNING e.id, e.recovery_attempts, e.last_event_seq
), ev AS (
    INSERT INTO execution_events (execution_id, seq, type, data)
    SELECT id, last_event_seq, 'execution.recovering', jsonb_build_object('recovery_attempt', recovery_attempts)
    FROM upd
)
SELECT id, recovery_attempts FROM upd
"""

# Still `running` on a worker that has stopped (or was declared lost after it started them): no
# process is running them any more. A backstop for any path that would leave one behind.
# Driven from executions still in flight (a partial index), not from every worker ever seen.
SELECT_RUNNING_ON_STOPPED = """
SELECT e.id, e.attempt, e.action_ref, e.recovery_attempts, e.worker
FROM executions e
JOIN workers w ON w.name = e.worker
WHERE e.status = 'running' AND w.status IN ('inactive', 'lost')
LIMIT 500
FOR UPDATE OF e SKIP LOCKED
"""

# Dispatched to workers that no longer take work (draining, stopped, lost): back in line at once
# rather than after the queue TTL. The dispatch left in the queue is stale from then on (fenced).
SELECT_SCHEDULED_ON_UNAVAILABLE = """
SELECT e.id, e.attempt, e.schedule_attempts, e.worker, w.status AS worker_status
FROM executions e
JOIN workers w ON w.name = e.worker
WHERE e.status = 'scheduled' AND w.status IN ('draining', 'inactive', 'lost')
LIMIT 500
FOR UPDATE OF e SKIP LOCKED
"""

# Retention: finished executions older than $1 seconds, oldest first, in batches of $2, with their
# events (workflow steps and signals go with them, ON DELETE CASCADE). Returns how many.
PRUNE_FINISHED = """
WITH gone AS (
    DELETE FROM executions WHERE id IN (
        SELECT id FROM executions
        WHERE status IN ('completed', 'failed', 'timeout', 'cancelled')
          AND finished_at < now() - make_interval(secs => $1)
        ORDER BY finished_at
        LIMIT $2
        FOR UPDATE SKIP LOCKED
    )
    RETURNING id
), events AS (
    DELETE FROM execution_events ev USING gone WHERE ev.execution_id = gone.id
)
SELECT count(*) FROM gone
"""

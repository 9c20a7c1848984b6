"""Named queries on `workers`."""

from common.queries import WAKE_CHANNEL

# The row as it was before this process registers (to find what a previous process left behind).
PREVIOUS = "SELECT status, incarnation FROM workers WHERE name = $1 FOR UPDATE"

# $1 name, $2 runtimes, $3 actions, $4 max_concurrent_tasks, $5 heartbeat_interval_s,
# $6 hostname, $7 pid, $8 incarnation, $9 lock_key. Restarting with the same name reuses the row.
REGISTER = f"""
WITH up AS (
    INSERT INTO workers (name, status, runtimes, actions, max_concurrent_tasks, heartbeat_interval_s,
                         last_heartbeat, in_flight, hostname, pid, incarnation, lock_key, started_at, updated_at)
    VALUES ($1, 'active', $2, $3, $4, $5, now(), 0, $6, $7, $8, $9, now(), now())
    ON CONFLICT (name) DO UPDATE SET
        status = 'active', runtimes = EXCLUDED.runtimes, actions = EXCLUDED.actions,
        max_concurrent_tasks = EXCLUDED.max_concurrent_tasks,
        heartbeat_interval_s = EXCLUDED.heartbeat_interval_s, last_heartbeat = now(), in_flight = 0,
        hostname = EXCLUDED.hostname, pid = EXCLUDED.pid, incarnation = EXCLUDED.incarnation,
        lock_key = EXCLUDED.lock_key, started_at = now(), updated_at = now()
    RETURNING name
)
SELECT name, pg_notify('{WAKE_CHANNEL}', 'worker') FROM up
"""

# Workers to declare lost: heartbeat older than multiplier x interval ($1), or never written, or
# the process's advisory lock is free (it died) and it has not checked in for half an interval (a
# live worker whose lock connection merely dropped takes its lock again at once). Staleness counts from PostgreSQL's own start when
# that is later, and the lock is trusted only once PostgreSQL has been up for the staleness
# window: after a database restart every worker gets a full window to reconnect and check in.
# A lock taken here is a transaction lock, gone at commit.
FIND_LOST = """
WITH w AS (
    SELECT name, incarnation, last_heartbeat, lock_key, status, heartbeat_interval_s,
           make_interval(secs => heartbeat_interval_s * $1) AS stale_after,
           GREATEST(last_heartbeat, pg_postmaster_start_time()) AS seen
    FROM workers
    WHERE status IN ('active', 'draining')
)
SELECT name, incarnation, last_heartbeat, (last_heartbeat IS NULL OR seen < now() - stale_after) AS heartbeat_stale
FROM w
WHERE last_heartbeat IS NULL
   OR seen < now() - stale_after
   OR (lock_key IS NOT NULL
       AND pg_postmaster_start_time() < now() - stale_after
       AND last_heartbeat < now() - make_interval(secs => heartbeat_interval_s / 2)
       AND pg_try_advisory_xact_lock(lock_key))
"""

# Seconds until the first live worker turns stale (None: no live worker); the sweeper wakes then
# rather than up to a whole sweep interval later. $1 staleness multiplier
NEXT_STALE_IN = """
SELECT extract(epoch FROM min(GREATEST(last_heartbeat, pg_postmaster_start_time())
                              + make_interval(secs => heartbeat_interval_s * $1)) - now())::float8
FROM workers
WHERE status IN ('active', 'draining') AND last_heartbeat IS NOT NULL
"""

# Locks the row, so that replicas never handle the same loss twice. $1 name, $2 incarnation
MARK_LOST = """
WITH target AS (
    SELECT name FROM workers
    WHERE name = $1 AND incarnation = $2 AND status IN ('active', 'draining')
    FOR UPDATE SKIP LOCKED
)
UPDATE workers w SET status = 'lost', updated_at = now()
FROM target WHERE w.name = target.name
RETURNING w.name
"""

COUNT_BY_STATUS = "SELECT status, count(*) AS n FROM workers GROUP BY status"

HEARTBEAT_AGES = """
SELECT name, extract(epoch FROM now() - last_heartbeat)::float8 AS age_s
FROM workers WHERE status IN ('active', 'draining')
"""

# $1 name, $2 incarnation, $3 in_flight. Returns the row's status (None: the row is another incarnation's).
HEARTBEAT = """
UPDATE workers SET last_heartbeat = now(), in_flight = $3, updated_at = now()
WHERE name = $1 AND incarnation = $2
RETURNING status
"""

# $1 name, $2 incarnation, $3 status
SET_STATUS = """
UPDATE workers SET status = $3, updated_at = now()
WHERE name = $1 AND incarnation = $2
RETURNING status
"""

# Candidates for placement: active and with a fresh heartbeat ($1 = staleness multiplier), with
# what each already holds (scheduled or running on it).
ELIGIBLE = """
SELECT w.name, w.actions, w.max_concurrent_tasks, w.incarnation,
       (SELECT count(*) FROM executions e
        WHERE e.worker = w.name AND e.status IN ('scheduled', 'running')) AS outstanding
FROM workers w
WHERE w.status = 'active'
  AND w.last_heartbeat > now() - make_interval(secs => w.heartbeat_interval_s * $1)
"""

LIST = """
SELECT name, status, runtimes, max_concurrent_tasks, in_flight, last_heartbeat,
       extract(epoch FROM now() - last_heartbeat)::float8 AS heartbeat_age_s, heartbeat_interval_s,
       hostname, pid, started_at
FROM workers
ORDER BY name
"""

"""Named queries on `workers`."""

# $1 name, $2 runtimes, $3 actions, $4 max_concurrent_tasks, $5 heartbeat_interval_s,
# $6 hostname, $7 pid, $8 incarnation. Restarting with the same name reuses (and revives) the row.
REGISTER = """
WITH up AS (
    INSERT INTO workers (name, status, runtimes, actions, max_concurrent_tasks, heartbeat_interval_s,
                         last_heartbeat, in_flight, hostname, pid, incarnation, started_at, updated_at)
    VALUES ($1, 'active', $2, $3, $4, $5, now(), 0, $6, $7, $8, now(), now())
    ON CONFLICT (name) DO UPDATE SET
        status = 'active', runtimes = EXCLUDED.runtimes, actions = EXCLUDED.actions,
        max_concurrent_tasks = EXCLUDED.max_concurrent_tasks,
        heartbeat_interval_s = EXCLUDED.heartbeat_interval_s, last_heartbeat = now(), in_flight = 0,
        hostname = EXCLUDED.hostname, pid = EXCLUDED.pid, incarnation = EXCLUDED.incarnation,
        started_at = now(), updated_at = now()
    RETURNING name
)
SELECT name, pg_notify('baton_wake', 'worker') FROM up
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
SELECT w.name, w.actions, w.max_concurrent_tasks,
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

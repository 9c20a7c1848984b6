"""Named queries on `workers`."""

from common.queries import WAKE_CHANNEL


def staleness_window(multiplier: str, w: str = "w") -> str:
    """The one definition of a worker's staleness window: ``multiplier`` x its own heartbeat
    interval. ``multiplier`` is the query's parameter, ``w`` the alias."""
    return f"make_interval(secs => {w}.heartbeat_interval_s * {multiplier})"


def alive(multiplier: str, w: str = "w") -> str:
    """The one definition of "this worker is alive": active, with a heartbeat fresher than its
    staleness window."""
    return f"({w}.status = 'active' AND {w}.last_heartbeat > now() - {staleness_window(multiplier, w)})"


def heartbeat_age_s() -> str:
    """The one definition of a worker's heartbeat age in seconds: never below zero (now() is when
    the reading transaction began, and a heartbeat stamped a moment later can commit before the
    statement takes its snapshot), and none without a heartbeat."""
    return "CASE WHEN last_heartbeat IS NOT NULL THEN GREATEST(0, extract(epoch FROM now() - last_heartbeat))::float8 END"


def busy(multiplier: str, w: str = "w") -> str:
    """Alive and with every slot taken, now or at a heartbeat within its staleness window: healthy,
    merely busy. Work waiting on such a worker is not its fault, so the scheduled-timeout monitor
    and the TTL count nothing against the execution. (A heartbeat can fall between a run's end and
    the claim of the dispatch waiting for that slot; only room left unused for a whole window is
    the worker's fault.)"""
    window = staleness_window(multiplier, w)
    return (
        f"({alive(multiplier, w)} AND ({w}.in_flight >= {w}.max_concurrent_tasks OR {w}.full_at > now() - {window}))"
    )


# The process's session lock (on a connection of its own): PostgreSQL releases it the moment the
# process dies, which is how the sweeper tells a dead worker from a slow one. $1 lock key
LOCK = "SELECT pg_advisory_lock($1)"

# The row as it was before this process registers (to find what a previous process left behind),
# and whether a live process still holds the name: its session lock is held (PostgreSQL releases
# it the moment the process dies). A transaction lock taken here is gone at commit.
PREVIOUS = """
SELECT status, incarnation, hostname, pid,
       (status IN ('active', 'draining') AND lock_key IS NOT NULL AND incarnation <> $2
        AND NOT pg_try_advisory_xact_lock(lock_key)) AS held
FROM workers WHERE name = $1 FOR UPDATE
"""

# $1 name, $2 runtimes, $3 actions, $4 max_concurrent_tasks, $5 heartbeat_interval_s,
# $6 hostname, $7 pid, $8 incarnation, $9 lock_key. Restarting with the same name reuses the row.
REGISTER = f"""
WITH up AS (
    INSERT INTO workers (name, status, runtimes, actions, max_concurrent_tasks, heartbeat_interval_s,
                         last_heartbeat, in_flight, hostname, pid, incarnation, lock_key, queue_ttl_s, started_at,
                         updated_at)
    VALUES ($1, 'active', $2, $3, $4, $5, now(), 0, $6, $7, $8, $9, $10, now(), now())
    ON CONFLICT (name) DO UPDATE SET
        status = 'active', runtimes = EXCLUDED.runtimes, actions = EXCLUDED.actions,
        max_concurrent_tasks = EXCLUDED.max_concurrent_tasks,
        heartbeat_interval_s = EXCLUDED.heartbeat_interval_s, last_heartbeat = now(), in_flight = 0, full_at = NULL,
        hostname = EXCLUDED.hostname, pid = EXCLUDED.pid, incarnation = EXCLUDED.incarnation,
        lock_key = EXCLUDED.lock_key, queue_ttl_s = EXCLUDED.queue_ttl_s, started_at = now(), updated_at = now()
    RETURNING name
)
SELECT name, pg_notify('{WAKE_CHANNEL}', 'worker') FROM up
"""

# When a worker is lost ($1 = staleness multiplier): heartbeat older than multiplier x interval,
# or never written, or the process's advisory lock is free (it died) and it has not checked in for
# half an interval (a live worker whose lock connection merely dropped takes its lock again at
# once). Staleness counts from PostgreSQL's own start when that is later, and the lock is trusted
# only once PostgreSQL has been up for the staleness window: after a database restart every worker
# gets a full window to reconnect and check in. A lock taken here is a transaction lock, gone at
# commit. One definition, used to find candidates and again in the compare-and-set that marks them.
_STALE = (
    "(w.last_heartbeat IS NULL OR GREATEST(w.last_heartbeat, pg_postmaster_start_time())"
    f" < now() - {staleness_window('$1')})"
)
_LOST = f"""({_STALE}
    OR (w.lock_key IS NOT NULL
        AND pg_postmaster_start_time() < now() - {staleness_window('$1')}
        AND w.last_heartbeat < now() - make_interval(secs => w.heartbeat_interval_s / 2)
        AND pg_try_advisory_xact_lock(w.lock_key)))"""

FIND_LOST = f"""
SELECT w.name, w.incarnation, w.last_heartbeat, {_STALE} AS heartbeat_stale
FROM workers w
WHERE w.status IN ('active', 'draining') AND {_LOST}
"""

# Seconds until the first live worker turns stale (None: no live worker); the sweeper wakes then
# rather than up to a whole sweep interval later. $1 staleness multiplier
NEXT_STALE_IN = f"""
SELECT extract(epoch FROM min(GREATEST(last_heartbeat, pg_postmaster_start_time())
                              + {staleness_window("$1", "workers")}) - now())::float8
FROM workers
WHERE status IN ('active', 'draining') AND last_heartbeat IS NOT NULL
"""

# The compare-and-set: the loss is checked again on the row as it is now (a heartbeat that
# committed since FIND_LOST keeps the worker alive), and a replica that handled it first leaves
# nothing to match. $1 staleness multiplier, $2 name, $3 incarnation
MARK_LOST = f"""
UPDATE workers w SET status = 'lost', updated_at = now()
WHERE w.name = $2 AND w.incarnation = $3 AND w.status IN ('active', 'draining') AND {_LOST}
RETURNING w.name
"""

COUNT_BY_STATUS = "SELECT status, count(*) AS n FROM workers GROUP BY status"

HEARTBEAT_AGES = f"""
SELECT name, {heartbeat_age_s()} AS age_s
FROM workers WHERE status IN ('active', 'draining')
"""

# $1 name, $2 incarnation, $3 in_flight. Returns the row's status (None: the row is another incarnation's).
HEARTBEAT = """
UPDATE workers SET last_heartbeat = now(), in_flight = $3, updated_at = now(),
    full_at = CASE WHEN $3 >= max_concurrent_tasks THEN now() ELSE full_at END
WHERE name = $1 AND incarnation = $2
RETURNING status
"""

# $1 name, $2 incarnation, $3 status
SET_STATUS = """
UPDATE workers SET status = $3, updated_at = now()
WHERE name = $1 AND incarnation = $2
RETURNING status
"""

# A worker whose pool has not answered for a staleness window while its lock connection does
# stops taking work (`worker.pool_watch`): `draining`, so that nothing more is placed on it and
# what waits for it goes back in line at once (also a draining worker whose own mark, through its
# pool, failed); `active` again once its pool answers. Each only from the status the other set:
# a drain's end, or the executor declaring the worker lost, wins.
# $1 name, $2 incarnation
STOP_TAKING_WORK = """
UPDATE workers SET status = 'draining', updated_at = now()
WHERE name = $1 AND incarnation = $2 AND status = 'active'
RETURNING status
"""

TAKE_WORK_AGAIN = f"""
WITH up AS (
    UPDATE workers SET status = 'active', updated_at = now()
    WHERE name = $1 AND incarnation = $2 AND status = 'draining'
    RETURNING name
)
SELECT name, pg_notify('{WAKE_CHANNEL}', 'worker') FROM up
"""

# Candidates for placement: alive ($1 = staleness multiplier), with what each already holds
# (scheduled or running on it).
ELIGIBLE = f"""
SELECT w.name, w.actions, w.max_concurrent_tasks, w.incarnation,
       (SELECT count(*) FROM executions e
        WHERE e.worker = w.name AND e.status IN ('scheduled', 'running')) AS outstanding
FROM workers w
WHERE {alive("$1")}
"""

# How long ago each of these actions ($1) was last served: seconds since the last heartbeat of any
# active worker that serves it, or since any other (draining, stopped, lost) stopped taking work or
# last heartbeat, whichever came first: its heartbeats may go on while it takes no work (None: no
# worker on record serves it).
LAST_SERVED = """
SELECT a.ref, extract(epoch FROM now() - max(
    CASE WHEN w.status = 'active' THEN w.last_heartbeat ELSE LEAST(w.status_since, w.last_heartbeat) END
))::float8 AS age_s
FROM unnest($1::text[]) AS a(ref)
LEFT JOIN workers w ON a.ref = ANY(w.actions)
GROUP BY a.ref
"""

# Every action some live worker serves, busy or not. $1 staleness multiplier
SERVED_ACTIONS = f"SELECT DISTINCT unnest(w.actions) AS ref FROM workers w WHERE {alive('$1')}"

# Stopped or lost workers not seen for a while, for retention. $1 age in seconds, $2 limit
SELECT_GONE = """
SELECT name FROM workers
WHERE status IN ('inactive', 'lost') AND updated_at < now() - make_interval(secs => $1)
ORDER BY updated_at
LIMIT $2
"""

# Deletes them unless one came back meanwhile (a registration makes it active). $1 names
DELETE_GONE = "DELETE FROM workers WHERE name = ANY($1::text[]) AND status IN ('inactive', 'lost') RETURNING name"

# A stopped or lost worker runs nothing, whatever its last heartbeat said.
LIST = f"""
SELECT name, status, runtimes, max_concurrent_tasks,
       CASE WHEN status IN ('active', 'draining') THEN in_flight ELSE 0 END AS in_flight, last_heartbeat,
       {heartbeat_age_s()} AS heartbeat_age_s, heartbeat_interval_s,
       hostname, pid, started_at, actions
FROM workers
ORDER BY name
"""

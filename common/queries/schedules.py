"""Named queries on `schedules`: cron schedules, fired by the executors exactly once per due time."""

from common.queries import TIMER_CHANNEL

_COLUMNS = "name, cron, action_ref, parameters, catch_up, timezone, source, next_fire_at, last_fired_at"

# Add or change a schedule. A changed cron expression or zone takes the new next due time; an
# unchanged one keeps its own (a restart never skips or repeats a due time). A YAML schedule never
# replaces one added by hand, nor the other way round: the name is taken. Returns the row, or
# nothing if the name is taken by the other source.
# $1 name, $2 cron, $3 action, $4 parameters, $5 catch_up, $6 timezone, $7 source, $8 next due time
UPSERT = f"""
WITH up AS (
    INSERT INTO schedules AS s (name, cron, action_ref, parameters, catch_up, timezone, source, next_fire_at)
    VALUES ($1, $2, $3, $4::jsonb, $5, $6, $7, $8)
    ON CONFLICT (name) DO UPDATE SET
        action_ref = EXCLUDED.action_ref, parameters = EXCLUDED.parameters, catch_up = EXCLUDED.catch_up,
        next_fire_at = CASE WHEN s.cron = EXCLUDED.cron AND s.timezone = EXCLUDED.timezone
                            THEN s.next_fire_at ELSE EXCLUDED.next_fire_at END,
        cron = EXCLUDED.cron, timezone = EXCLUDED.timezone, updated_at = now()
    WHERE s.source = EXCLUDED.source
    RETURNING {_COLUMNS}
)
SELECT up.*, pg_notify('{TIMER_CHANNEL}', 'schedule') AS pg_notify FROM up
"""

# YAML schedules the configuration no longer has. $1 names still configured
DELETE_STALE_YAML = "DELETE FROM schedules WHERE source = 'yaml' AND NOT (name = ANY($1::text[])) RETURNING name"

DELETE = "DELETE FROM schedules WHERE name = $1 RETURNING name"

LIST = f"SELECT {_COLUMNS} FROM schedules ORDER BY name"

# Due schedules, each taken by one executor (the others skip it) until its transaction ends.
# $1 limit
DUE = f"""
SELECT {_COLUMNS}, now() AS now FROM schedules
WHERE next_fire_at <= now()
ORDER BY next_fire_at
LIMIT $1
FOR UPDATE SKIP LOCKED
"""

# $1 name, $2 next due time, $3 last fired due time (NULL: none fired this time)
ADVANCE = """
UPDATE schedules SET next_fire_at = $2, last_fired_at = COALESCE($3, last_fired_at), updated_at = now()
WHERE name = $1
"""

# Seconds until the next schedule is due (negative: overdue); NULL if there are none.
NEXT_DUE_IN = "SELECT extract(epoch FROM min(next_fire_at) - now())::float8 FROM schedules"

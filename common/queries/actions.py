"""Named queries on `actions`, the catalogue workers register."""

_COLUMNS = "ref, runtime, parameters_schema, timeout_s, description, durable, recover_on_worker_loss, max_recovery_attempts"

# $1 refs, $2 runtimes, $3 schemas (json text), $4 timeouts, $5 descriptions, $6 durable,
# $7 recover_on_worker_loss, $8 max_recovery_attempts
UPSERT = """
INSERT INTO actions (ref, runtime, parameters_schema, timeout_s, description, durable,
                     recover_on_worker_loss, max_recovery_attempts, updated_at)
SELECT a.ref, a.runtime, a.schema::jsonb, a.timeout_s, a.description, a.durable, a.recover, a.max_recovery, now()
FROM unnest($1::text[], $2::text[], $3::text[], $4::float8[], $5::text[], $6::bool[], $7::bool[], $8::int[])
     AS a(ref, runtime, schema, timeout_s, description, durable, recover, max_recovery)
ON CONFLICT (ref) DO UPDATE SET
    runtime = EXCLUDED.runtime, parameters_schema = EXCLUDED.parameters_schema,
    timeout_s = EXCLUDED.timeout_s, description = EXCLUDED.description, durable = EXCLUDED.durable,
    recover_on_worker_loss = EXCLUDED.recover_on_worker_loss,
    max_recovery_attempts = EXCLUDED.max_recovery_attempts, updated_at = now()
"""

GET_MANY = f"SELECT {_COLUMNS} FROM actions WHERE ref = ANY($1::text[])"

# Every registered action (the catalogue is small: one row per action, not per execution).
REFS = "SELECT ref FROM actions"

GET = f"SELECT {_COLUMNS} FROM actions WHERE ref = $1"

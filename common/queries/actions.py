"""Named queries on `actions`, the catalogue workers register."""

_COLUMNS = (
    "ref, runtime, parameters_schema, timeout_s, description, durable, recover_on_worker_loss, max_recovery_attempts, "
    "version, retries, retry_delay_s, retry_backoff, max_concurrency"
)

# $1 refs, $2 runtimes, $3 schemas (json text), $4 timeouts, $5 descriptions, $6 durable,
# $7 recover_on_worker_loss, $8 max_recovery_attempts, $9 versions, $10 retries, $11 retry delays,
# $12 retry backoffs, $13 max_concurrency. A registration replaces an
# entry only with a higher version (or refreshes the same version's details): a worker that checked
# the catalogue a moment ago never downgrades an entry a newer deployment wrote since.
UPSERT = """
INSERT INTO actions (ref, runtime, parameters_schema, timeout_s, description, durable,
                     recover_on_worker_loss, max_recovery_attempts, version, retries, retry_delay_s,
                     retry_backoff, max_concurrency, updated_at)
SELECT a.ref, a.runtime, a.schema::jsonb, a.timeout_s, a.description, a.durable, a.recover, a.max_recovery,
       a.version, a.retries, a.retry_delay_s, a.retry_backoff, a.max_concurrency, now()
FROM unnest($1::text[], $2::text[], $3::text[], $4::float8[], $5::text[], $6::bool[], $7::bool[], $8::int[],
            $9::int[], $10::int[], $11::float8[], $12::float8[], $13::int[])
     AS a(ref, runtime, schema, timeout_s, description, durable, recover, max_recovery, version, retries,
          retry_delay_s, retry_backoff, max_concurrency)
ON CONFLICT (ref) DO UPDATE SET
    runtime = EXCLUDED.runtime, parameters_schema = EXCLUDED.parameters_schema,
    timeout_s = EXCLUDED.timeout_s, description = EXCLUDED.description, durable = EXCLUDED.durable,
    recover_on_worker_loss = EXCLUDED.recover_on_worker_loss,
    max_recovery_attempts = EXCLUDED.max_recovery_attempts, version = EXCLUDED.version,
    retries = EXCLUDED.retries, retry_delay_s = EXCLUDED.retry_delay_s, retry_backoff = EXCLUDED.retry_backoff,
    max_concurrency = EXCLUDED.max_concurrency, updated_at = now()
WHERE actions.version < EXCLUDED.version
   OR (actions.version = EXCLUDED.version AND actions.runtime = EXCLUDED.runtime
       AND actions.parameters_schema = EXCLUDED.parameters_schema)
"""

GET_MANY = f"SELECT {_COLUMNS} FROM actions WHERE ref = ANY($1::text[])"

# Every registered action (the catalogue is small: one row per action, not per execution).
REFS = "SELECT ref FROM actions"

GET = f"SELECT {_COLUMNS} FROM actions WHERE ref = $1"

# The whole catalogue, by ref.
LIST = f"SELECT {_COLUMNS} FROM actions ORDER BY ref"

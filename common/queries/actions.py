"""Named queries on `actions`, the catalogue workers register."""

# $1 refs, $2 runtimes, $3 schemas (json text), $4 timeouts, $5 descriptions
UPSERT = """
INSERT INTO actions (ref, runtime, parameters_schema, timeout_s, description, updated_at)
SELECT a.ref, a.runtime, a.schema::jsonb, a.timeout_s, a.description, now()
FROM unnest($1::text[], $2::text[], $3::text[], $4::float8[], $5::text[])
     AS a(ref, runtime, schema, timeout_s, description)
ON CONFLICT (ref) DO UPDATE SET
    runtime = EXCLUDED.runtime, parameters_schema = EXCLUDED.parameters_schema,
    timeout_s = EXCLUDED.timeout_s, description = EXCLUDED.description, updated_at = now()
"""

GET_MANY = "SELECT ref, runtime, parameters_schema, timeout_s, description FROM actions WHERE ref = ANY($1::text[])"

GET = "SELECT ref, runtime, parameters_schema, timeout_s, description FROM actions WHERE ref = $1"

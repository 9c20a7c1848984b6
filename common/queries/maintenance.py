"""Named queries that keep Baton's own tables healthy (`executor/maintenance.py`)."""

#: The tables whose rows are updated or deleted all the time, so that their dead versions pile up,
#: and in their indexes: above all the partial ones the hot queries read (a worker's active
#: executions, the requested backlog), whose few live entries can hide behind a great many dead.
HOT_TABLES = ("executions", "execution_events", "workers", "workflow_steps", "workflow_signals", "schedules")

# Those of them with at least $2 dead row versions now. $1 table names
DEAD_ROWS = """
SELECT relname AS table_name, n_live_tup AS live_rows, n_dead_tup AS dead_rows
FROM pg_stat_user_tables
WHERE schemaname = current_schema() AND relname = ANY($1::text[]) AND n_dead_tup >= $2
ORDER BY n_dead_tup DESC
"""


def vacuum(table: str) -> str:
    """VACUUM (with ANALYZE) one of `HOT_TABLES`; skipped at once if another session (another
    executor, autovacuum) is already at it."""
    if table not in HOT_TABLES:
        raise ValueError(f"{table!r} is not one of Baton's tables")
    return f'VACUUM (ANALYZE, SKIP_LOCKED) "{table}"'

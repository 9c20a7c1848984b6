"""Named queries of `schema_migrations` and of creating the database (`common/db.py`)."""

# Taken for the migrating transaction: replicas starting together migrate one at a time. $1 key
LOCK = "SELECT pg_advisory_xact_lock($1)"

CREATE_TABLE = """
CREATE TABLE IF NOT EXISTS schema_migrations (
    version integer PRIMARY KEY, name text NOT NULL, applied_at timestamptz NOT NULL DEFAULT now()
)
"""

APPLIED = "SELECT version FROM schema_migrations"

# $1 version, $2 file name
RECORD = "INSERT INTO schema_migrations (version, name) VALUES ($1, $2)"


def create_database(name: str) -> str:
    """CREATE DATABASE takes no parameters: the name is quoted here, and a name holding a quote
    is refused rather than escaped."""
    if not name or '"' in name:
        raise ValueError(f"{name!r} cannot be quoted as a database name")
    return f'CREATE DATABASE "{name}"'

#!/usr/bin/env bash
# Runs once, inside the postgres container, on an empty data directory (docker-entrypoint-initdb.d):
# creates Baton's least-privilege roles and database with scripts/roles.sql. The passwords come
# from the container's environment, which compose fills from .env.
set -euo pipefail
psql -v ON_ERROR_STOP=1 -q --username "$POSTGRES_USER" -d postgres \
    -v db=baton \
    -v service_password="$BATON_DB_PASSWORD" \
    -v operator_password="$BATON_OPERATOR_PASSWORD" \
    -f /baton/roles.sql

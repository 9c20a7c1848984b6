-- Baton's PostgreSQL roles (psql variables: db, service_password, operator_password).
--   psql -v db=baton -v service_password=... -v operator_password=... -f scripts/roles.sql
-- Run as a superuser once, before Baton first starts. Idempotent.
--
--   baton           the services (executor, workers): owns its database and the schema the
--                   migrations create; no superuser, no CREATEDB, no server-file or program access
--   baton_operator  the CLI's reads (`executions list/show`, `workers list`, `submit --wait`):
--                   SELECT only
-- Submitters need no database role at all: they post to RabbitMQ.

SELECT format('CREATE ROLE baton LOGIN PASSWORD %L', :'service_password')
WHERE NOT EXISTS (SELECT FROM pg_roles WHERE rolname = 'baton') \gexec
SELECT format('ALTER ROLE baton LOGIN NOSUPERUSER NOCREATEDB NOCREATEROLE PASSWORD %L', :'service_password') \gexec
SELECT format('CREATE ROLE baton_operator LOGIN PASSWORD %L', :'operator_password')
WHERE NOT EXISTS (SELECT FROM pg_roles WHERE rolname = 'baton_operator') \gexec
SELECT format('ALTER ROLE baton_operator LOGIN NOSUPERUSER NOCREATEDB NOCREATEROLE PASSWORD %L', :'operator_password') \gexec

SELECT format('CREATE DATABASE %I OWNER baton', :'db')
WHERE NOT EXISTS (SELECT FROM pg_database WHERE datname = :'db') \gexec
SELECT format('ALTER DATABASE %I OWNER TO baton', :'db') \gexec
SELECT format('REVOKE ALL ON DATABASE %I FROM PUBLIC', :'db') \gexec
SELECT format('GRANT CONNECT ON DATABASE %I TO baton_operator', :'db') \gexec

\connect :db
-- PostgreSQL 15+ gives the public schema to the database owner; say so for older versions too.
ALTER SCHEMA public OWNER TO baton;
REVOKE CREATE ON SCHEMA public FROM PUBLIC;
GRANT USAGE ON SCHEMA public TO baton_operator;
GRANT SELECT ON ALL TABLES IN SCHEMA public TO baton_operator;
-- Tables the migrations create later (as baton) are readable by the operator too.
ALTER DEFAULT PRIVILEGES FOR ROLE baton IN SCHEMA public GRANT SELECT ON TABLES TO baton_operator;

-- Baton's PostgreSQL roles (psql variables: db, service_password, operator_password; optional
-- service_role and operator_role, the roles' names, default baton and baton_operator).
--   psql -v db=baton -v service_password=... -v operator_password=... -f scripts/roles.sql
-- Run as a superuser once, before Baton first starts. Idempotent.
--
--   baton           the services (executor, workers): owns its database and the schema the
--                   migrations create; no superuser, no CREATEDB, no server-file or program access
--   baton_operator  the CLI's reads (`executions list/show`, `workers list`, `submit --wait`):
--                   SELECT only
-- Submitters need no database role at all: they post to RabbitMQ.

\if :{?service_role}
\else
\set service_role baton
\endif
\if :{?operator_role}
\else
\set operator_role baton_operator
\endif

SELECT format('CREATE ROLE %I LOGIN PASSWORD %L', :'service_role', :'service_password')
WHERE NOT EXISTS (SELECT FROM pg_roles WHERE rolname = :'service_role') \gexec
SELECT format('ALTER ROLE %I LOGIN NOSUPERUSER NOCREATEDB NOCREATEROLE PASSWORD %L', :'service_role', :'service_password') \gexec
SELECT format('CREATE ROLE %I LOGIN PASSWORD %L', :'operator_role', :'operator_password')
WHERE NOT EXISTS (SELECT FROM pg_roles WHERE rolname = :'operator_role') \gexec
SELECT format('ALTER ROLE %I LOGIN NOSUPERUSER NOCREATEDB NOCREATEROLE PASSWORD %L', :'operator_role', :'operator_password') \gexec

SELECT format('CREATE DATABASE %I OWNER %I', :'db', :'service_role')
WHERE NOT EXISTS (SELECT FROM pg_database WHERE datname = :'db') \gexec
SELECT format('ALTER DATABASE %I OWNER TO %I', :'db', :'service_role') \gexec
SELECT format('REVOKE ALL ON DATABASE %I FROM PUBLIC', :'db') \gexec
SELECT format('GRANT CONNECT ON DATABASE %I TO %I', :'db', :'operator_role') \gexec

\connect :db
-- PostgreSQL 15+ gives the public schema to the database owner; say so for older versions too.
ALTER SCHEMA public OWNER TO :"service_role";
REVOKE CREATE ON SCHEMA public FROM PUBLIC;
GRANT USAGE ON SCHEMA public TO :"operator_role";
GRANT SELECT ON ALL TABLES IN SCHEMA public TO :"operator_role";
-- Tables the migrations create later (as the service role) are readable by the operator too.
ALTER DEFAULT PRIVILEGES FOR ROLE :"service_role" IN SCHEMA public GRANT SELECT ON TABLES TO :"operator_role";

-- What intake ignored in a request (unknown top-level fields), recorded with the execution so that
-- whoever posted it can see it.
ALTER TABLE executions ADD COLUMN warnings jsonb;

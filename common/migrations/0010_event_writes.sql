-- Events are appended only by the statement that changes their execution, in the same statement,
-- so the parent row always exists when one is written. The foreign key's check on every insert
-- (four or more per execution) cost a large share of the database's time on the hot path; retention
-- now deletes an execution's events in the statement that deletes the execution
-- (`PRUNE_FINISHED`).
ALTER TABLE execution_events DROP CONSTRAINT execution_events_execution_id_fkey;

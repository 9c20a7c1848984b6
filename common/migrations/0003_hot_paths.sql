-- The scheduler takes the oldest `requested` rows: a partial index lets it stop after a batch
-- instead of sorting the whole backlog.
CREATE INDEX executions_requested ON executions (updated_at) WHERE status = 'requested';

-- These tables grow from nothing to many rows within seconds under load; keep the planner's
-- statistics current so that lookups by execution stay index scans.
ALTER TABLE executions SET (autovacuum_analyze_scale_factor = 0.02, autovacuum_vacuum_scale_factor = 0.05);
ALTER TABLE execution_events SET (autovacuum_analyze_scale_factor = 0.02, autovacuum_vacuum_scale_factor = 0.05);

-- An execution's parameters are a JSON object: a worker reads them as one when it claims the run,
-- and a row holding anything else (a child started by `ctx.run` with a list, say) once stopped the
-- worker that claimed it. Rows written before are not checked (`NOT VALID`): none can hold other.
ALTER TABLE executions ADD CONSTRAINT executions_parameters_object
    CHECK (jsonb_typeof(parameters) = 'object') NOT VALID;

-- Retention deletes executions, and the foreign key cascades to their signals: without an index on
-- `execution_id` (the only one was partial, over unconsumed signals) each deleted execution read
-- the whole `workflow_signals` table.
CREATE INDEX workflow_signals_execution ON workflow_signals (execution_id);

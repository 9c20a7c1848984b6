-- Idempotency keys are scoped by action: the same key under two actions names two executions.
DROP INDEX executions_idempotency_key;
CREATE UNIQUE INDEX executions_idempotency_key ON executions (action_ref, idempotency_key)
    WHERE idempotency_key IS NOT NULL;

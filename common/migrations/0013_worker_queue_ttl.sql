-- The message TTL a worker declared its queue with. A dispatch that "expired" in that queue sooner
-- than this after it was scheduled cannot have: anyone may publish to the dead-letter exchange,
-- and the executor charges an expiry against the execution only when it is plausible.
ALTER TABLE workers ADD COLUMN queue_ttl_s double precision CHECK (queue_ttl_s >= 0);

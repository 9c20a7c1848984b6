-- When a worker last began or stopped taking work (entered or left `active`). A worker that takes
-- no work has served its actions until then, not until its last heartbeat: its heartbeats go on
-- while it drains, while its pools are cut off (`worker.pool_watch`) for as long as the cut lasts,
-- and while, declared lost, it waits to register again; counted to its last heartbeat, it kept the
-- requested-timeout monitor (`LAST_SERVED`) from failing requests only it served. A change between
-- two statuses that take no work (`draining` to `inactive` at the end of a drain, say) keeps it.
-- Kept by a trigger, so that every status change, whoever makes it, is counted.
ALTER TABLE workers ADD COLUMN status_since timestamptz NOT NULL DEFAULT now();

CREATE FUNCTION workers_status_since() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    NEW.status_since := now();
    RETURN NEW;
END
$$;

CREATE TRIGGER workers_status_since BEFORE UPDATE OF status ON workers
    FOR EACH ROW WHEN ((OLD.status = 'active') IS DISTINCT FROM (NEW.status = 'active'))
    EXECUTE FUNCTION workers_status_since();

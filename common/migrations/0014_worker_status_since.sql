-- When a worker's status last changed. A worker that stops taking work (`draining`) has served its
-- actions until then, not until its last heartbeat: its heartbeats go on while it drains, and, its
-- pools cut off (`worker.pool_watch`), for as long as the cut lasts, which kept the
-- requested-timeout monitor (`LAST_SERVED`) from ever failing requests only it served. Kept by a
-- trigger, so that every status change, whoever makes it, moves it.
ALTER TABLE workers ADD COLUMN status_since timestamptz NOT NULL DEFAULT now();

CREATE FUNCTION workers_status_since() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    NEW.status_since := now();
    RETURN NEW;
END
$$;

CREATE TRIGGER workers_status_since BEFORE UPDATE OF status ON workers
    FOR EACH ROW WHEN (OLD.status IS DISTINCT FROM NEW.status) EXECUTE FUNCTION workers_status_since();

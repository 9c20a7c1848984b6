-- When a worker's heartbeat last found every slot taken. A heartbeat can fall between a run's end
-- and the claim of the dispatch waiting in the worker's inbox, and say it has room: a worker seen
-- full within its staleness window still counts as busy (`workers.busy()`), so the work waiting
-- on it is not charged a dispatch for that moment.
ALTER TABLE workers ADD COLUMN full_at timestamptz;

-- The catalogue: versioned registrations; `core.*` is Baton's own and never stored.

-- A registration whose schema or runtime differs from the catalogue's is accepted only as a newer
-- version of the action (@action(version=N)); an older or conflicting one is refused.
ALTER TABLE actions ADD COLUMN version integer NOT NULL DEFAULT 1 CHECK (version >= 1);

-- The executor reads `core.*` from Baton's code; a row could only shadow it.
DELETE FROM actions WHERE ref LIKE 'core.%';

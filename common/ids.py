"""Execution ids a request gets, derived so that a redelivered request maps to the same execution and
is recorded once. The client derives them too: it knows a batch's ids before it posts it."""

from __future__ import annotations

import uuid

# Ids derived from a non-UUID message_id, and from a batch's message_id, live in this namespace.
_MESSAGE_ID_NAMESPACE = uuid.UUID("6f1c2b7e-3d4a-4c8e-9a51-0b7d2e9f4c13")

#: The most requests one batch message may hold.
MAX_BATCH_REQUESTS = 1000


def execution_id_for(message_id: str | None) -> uuid.UUID:
    """The execution id a request gets: its message_id if that is a UUID (so a client knows the id
    before posting), a stable UUID derived from any other message_id, else a fresh one."""
    if not message_id:
        return uuid.uuid4()
    try:
        return uuid.UUID(message_id)
    except ValueError:
        return uuid.uuid5(_MESSAGE_ID_NAMESPACE, message_id)


def batch_execution_id(message_id: str, index: int) -> uuid.UUID:
    """The execution id of the request at ``index`` (from 0) of a batch posted as ``message_id``."""
    return uuid.uuid5(_MESSAGE_ID_NAMESPACE, f"{message_id}#{index}")

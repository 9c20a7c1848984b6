"""Steps whose failure changes nothing: closing what may already be gone, settling a delivery on a
channel that may have died, marking a worker's status on the way out.

Each caller would otherwise wrap such a step in a catch-all. Here what the step is expected to meet
(the connection, the channel or the database is gone or going) is named once and logged at debug,
and anything else is logged as a warning with its traceback, so that a bug is seen rather than
swallowed. Neither is raised: the caller is on its way out, or the state it would have changed is
recovered another way (a delivery not acked is redelivered; PostgreSQL's row is the truth)."""

from __future__ import annotations

from collections.abc import Awaitable
from typing import Any

import aiormq.exceptions

from common.deadline import within
from common.errors import describe
from common.logging import get_logger
from common.retry import TRANSIENT_ERRORS

log = get_logger("baton.best_effort")

#: What a step on a connection that may be gone is expected to meet: the service is away or the
#: connection closed (`TRANSIENT_ERRORS`), or the broker closed the channel or refused the
#: operation (any AMQP error, including settling a delivery that is already settled). A statement
#: PostgreSQL refuses for any other reason (an undefined column, say) is a bug, and is shown.
EXPECTED_ERRORS: tuple[type[BaseException], ...] = (*TRANSIENT_ERRORS, aiormq.exceptions.AMQPError)


async def best_effort(what: str, operation: Awaitable[Any], *, timeout_s: float | None = None, **context: Any) -> bool:
    """Await ``operation`` (``what`` names it in the log, with ``context``), for at most
    ``timeout_s`` if given (`within`: past it, abandoned); True if it succeeded. An expected
    failure (running out of time among them) is logged at debug, any other as a warning; neither
    is raised. Cancellation is not caught."""
    try:
        await (operation if timeout_s is None else within(operation, timeout_s, what=what))
    except EXPECTED_ERRORS as exc:
        log.debug("best_effort_step_failed", step=what, error=describe(exc), **context)
        return False
    except Exception as exc:
        log.warning(
            "best_effort_step_failed_unexpectedly",
            step=what,
            error=describe(exc),
            exc_info=True,
            **context,
        )
        return False
    return True

"""The Python client: post invocations, wait for their outcome, read executions and workers.

Posting goes through RabbitMQ like any other client's; reading goes to PostgreSQL, the source of
truth. Waiting listens for the `execution.<id>.<status>` notification and re-reads the row now and
then, so that a notification missed during a broker restart cannot leave a caller waiting forever.
"""

from __future__ import annotations

from common.client.base import RequestNotPosted, RequestRejected
from common.client.controls import Controls
from common.client.parking import ParkedRequest, Parking
from common.client.posting import Posting, Submission, coerce_key_values, request_batches
from common.client.reading import Reading

__all__ = ["BatonClient", "ParkedRequest", "RequestNotPosted", "RequestRejected", "Submission", "coerce_key_values", "request_batches"]


class BatonClient(Posting, Reading, Controls, Parking):
    """Baton's Python client; its parts, one module each: `posting` (submit, submit_many, wait,
    run), `reading` (executions, workers, actions), `controls` (cancel, pause, resume, signal,
    retry, schedules, gone workers), `parking` (parked requests), over `base` (connections and
    reading one execution)."""

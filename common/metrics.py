"""Prometheus metrics, all defined here; each service serves them on its `metrics_port`."""

from __future__ import annotations

from collections.abc import Mapping

from prometheus_client import Counter, Gauge, start_http_server

from common.logging import get_logger

log = get_logger("baton.metrics")

# executor
EXECUTIONS = Gauge("baton_executions", "Executions not yet finished, by status (as of the last sweep).", ["status"])
REQUESTS = Counter("baton_requests_total", "Requests taken in by intake, by outcome.", ["outcome"])
RESCHEDULES = Counter("baton_reschedules_total", "Executions put back in line, by reason.", ["reason"])
TIMEOUTS = Counter("baton_timeouts_total", "Timeouts detected, by kind.", ["kind"])
DEAD_LETTERS = Counter("baton_dead_letters_total", "Dead-lettered dispatches handled, by outcome.", ["outcome"])
RECOVERIES = Counter("baton_recovery_attempts_total", "Interrupted runs, by what recovery did.", ["outcome"])
WORKERS = Gauge("baton_workers", "Workers by status (as of the last sweep).", ["status"])
WORKERS_LOST = Counter("baton_workers_lost_total", "Workers declared lost, by signal.", ["signal"])
HEARTBEAT_AGE = Gauge("baton_worker_heartbeat_age_seconds", "Age of each live worker's heartbeat.", ["worker"])

# worker
IN_FLIGHT = Gauge("baton_worker_in_flight", "Executions this worker is running.")
FINISHED = Counter("baton_worker_executions_total", "Executions this worker finished, by status.", ["status"])
OWN_HEARTBEAT_AGE = Gauge("baton_worker_own_heartbeat_age_seconds", "Seconds since this worker's last recorded heartbeat.")


def replace_all(gauge: Gauge, values: Mapping[str, float]) -> None:
    """Make ``gauge``'s series exactly ``values`` (one label each).

    Scrapes run on the metrics server's own thread, so clear-then-set would let one see a family
    with a live worker's series missing; setting first and then removing the series that are gone
    never does. A label whose count fell to nothing is removed, not left at its last value.
    """
    for label, value in values.items():
        gauge.labels(label).set(value)
    present = {label for metric in gauge.collect() for sample in metric.samples for label in sample.labels.values()}
    for gone in present - values.keys():
        gauge.remove(gone)


def serve(port: int | None, host: str = "127.0.0.1") -> None:
    """Serve `/metrics` on ``host:port`` (port None: metrics are off)."""
    if port is None:
        return
    start_http_server(port, addr=host)
    log.info("metrics_serving", host=host, port=port)

"""Logging: every line a service prints is one JSON object, whoever logged it (Baton through
structlog, or asyncpg, aio-pika, tenacity and anything else through the stdlib). No services
needed: a small subprocess configures logging the way a service does and logs every way."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest

from tests.harness import REPO

SCRIPT = textwrap.dedent(
    """
    import asyncio, logging, sys, warnings

    from tenacity import wait_none

    from common.logging import configure_logging, get_logger
    from common.retry import connect_retrying
    from common.settings import LoggingSettings

    configure_logging(LoggingSettings(level=sys.argv[1], format=sys.argv[2]), service="worker", worker="w-log")

    log = get_logger("baton.test")
    log.info("structlog_info", answer=42)
    log.debug("structlog_debug")
    logging.getLogger("asyncpg").warning("asyncpg warns about %s", "something")
    logging.getLogger("asyncpg").info("asyncpg chatter")
    try:
        1 / 0
    except ZeroDivisionError:
        logging.getLogger("aio_pika").error("aio_pika failed", exc_info=True)
        log.exception("structlog_exception")
    logging.getLogger("aiormq.connection").warning("aiormq multi\\nline")
    # A broker restart, as the libraries report it: routine, so not shown as errors.
    logging.getLogger("aiormq.connection").error("Unexpected connection close from remote \\"amqp://guest:******@h/\\"")
    logging.getLogger("aiormq.connection").error("error when creating transport: <AMQPConnectionError: (111, 'x')>")
    logging.getLogger("aio_pika.tools").error(
        "Callback <OneShotCallback: cb=<bound method RobustChannel._on_close>> error: ChannelInvalidStateError: x")
    logging.getLogger("aio_pika.tools").error(
        "Callback <OneShotCallback: cb=<bound method RobustChannel._on_close>> error: ChannelNotFoundEntity: gone")
    logging.getLogger("aio_pika.tools").error("a real aio_pika error")
    logging.getLogger("baton.retry").info("baton stdlib info")
    warnings.warn("a python warning")

    async def flaky(calls=[]):
        calls.append(1)
        if len(calls) == 1:
            raise ConnectionRefusedError("not yet")
        return "ok"

    async def main():
        async for attempt in connect_retrying(10, what="PostgreSQL", operation="record_outcomes").copy(wait=wait_none()):
            with attempt:
                return await flaky()

    assert asyncio.run(main()) == "ok"
    print("stdout is not for logs")
    """
)


def _run(level: str, fmt: str = "json") -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", SCRIPT, level, fmt],
        cwd=REPO, capture_output=True, text=True, timeout=60, check=False,
    )


def _lines(stderr: str) -> list[dict]:
    lines = []
    for line in stderr.splitlines():
        try:
            parsed = json.loads(line)
        except json.JSONDecodeError:
            pytest.fail(f"a line on stderr is not JSON: {line!r}\n--- stderr ---\n{stderr}")
        assert isinstance(parsed, dict), line
        lines.append(parsed)
    return lines


def test_every_line_is_one_json_object_with_level_logger_and_context():
    result = _run("info")
    assert result.returncode == 0, result.stderr
    assert result.stdout == "stdout is not for logs\n"
    lines = _lines(result.stderr)
    for line in lines:
        assert {"event", "level", "timestamp", "logger"} <= line.keys(), line
        assert line["service"] == "worker" and line["worker"] == "w-log", line
    by_event = {line["event"]: line for line in lines}

    ours = by_event["structlog_info"]
    assert ours["level"] == "info" and ours["logger"] == "baton.test" and ours["answer"] == 42

    asyncpg_line = by_event["asyncpg warns about something"]
    assert asyncpg_line["level"] == "warning" and asyncpg_line["logger"] == "asyncpg"

    aio_pika_line = by_event["aio_pika failed"]
    assert aio_pika_line["level"] == "error" and aio_pika_line["logger"] == "aio_pika"
    assert "ZeroDivisionError" in aio_pika_line["exception"]
    assert "ZeroDivisionError" in by_event["structlog_exception"]["exception"]

    assert by_event["aiormq multi\nline"]["logger"] == "aiormq.connection"

    # Routine broker-restart lines are not errors: the close is a warning, the noise after it is
    # not shown (aio-pika's own warning says it reconnects); any other library error stays one.
    closed = [line for line in lines if line["event"].startswith("Unexpected connection close")]
    assert [line["level"] for line in closed] == ["warning"]
    assert not [line for line in lines if "creating transport" in line["event"] or "InvalidState" in line["event"]]
    # A channel that fails to reopen on a live connection is a real error.
    [reopen] = [line for line in lines if "ChannelNotFoundEntity" in line["event"]]
    assert reopen["level"] == "error" and by_event["a real aio_pika error"]["level"] == "error"

    [retry] = [line for line in lines if line["logger"] == "baton.retry" and line["level"] == "warning"]
    assert retry["event"] == "waiting_for_service" and retry["error"] == "ConnectionRefusedError: not yet"
    assert (retry["dependency"], retry["operation"]) == ("PostgreSQL", "record_outcomes")

    [warning] = [line for line in lines if line["logger"] == "py.warnings"]
    assert "a python warning" in warning["event"]

    # Baton's own loggers follow the configured level; the libraries stay at WARNING.
    assert "baton stdlib info" in by_event
    assert "structlog_debug" not in by_event
    assert "asyncpg chatter" not in by_event


def test_configured_level_applies_to_baton_loggers_only():
    debug = _lines(_run("debug").stderr)
    events = {line["event"] for line in debug}
    assert "structlog_debug" in events and "baton stdlib info" in events
    assert "asyncpg chatter" not in events  # libraries stay at WARNING

    warning = _lines(_run("warning").stderr)
    events = {line["event"] for line in warning}
    assert "structlog_info" not in events and "baton stdlib info" not in events
    assert {"asyncpg warns about something", "aio_pika failed", "structlog_exception"} <= events


def test_console_format_renders_library_lines_too():
    result = _run("info", "console")
    assert result.returncode == 0, result.stderr
    assert "structlog_info" in result.stderr
    assert "asyncpg warns about something" in result.stderr and "[asyncpg]" in result.stderr
    assert "ZeroDivisionError" in result.stderr


def test_a_crash_is_one_json_line_too():
    script = textwrap.dedent(
        """
        import threading
        from common.logging import configure_logging
        from common.settings import LoggingSettings

        configure_logging(LoggingSettings(level="info", format="json"), service="executor")
        thread = threading.Thread(target=lambda: 1 / 0, name="doomed")
        thread.start()
        thread.join()
        raise RuntimeError("the service crashed")
        """
    )
    result = subprocess.run(
        [sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=60, check=False
    )
    assert result.returncode == 1
    in_thread, crash = _lines(result.stderr)
    assert in_thread["event"] == "uncaught_exception_in_thread" and in_thread["thread_name"] == "doomed"
    assert "ZeroDivisionError" in in_thread["exception"]
    assert crash["event"] == "uncaught_exception" and crash["level"] == "critical"
    assert crash["service"] == "executor" and "RuntimeError: the service crashed" in crash["exception"]


def test_lines_stay_json_whatever_stderr_takes_and_a_failed_write_raises_nothing():
    script = textwrap.dedent(
        """
        import os, sys
        from common.logging import configure_logging, get_logger
        from common.settings import LoggingSettings

        configure_logging(LoggingSettings(level="info", format="json"), service="worker")
        log = get_logger("baton.test")
        log.info("non_ascii", text="café ✓")
        os.close(2)  # stderr gone: logging must not fail the caller
        log.warning("unwritable")
        print("still running")
        """
    )
    for encoding in ("utf-8", "ascii"):
        result = subprocess.run(
            [sys.executable, "-c", script], cwd=REPO, capture_output=True, timeout=60, check=False,
            env={**os.environ, "PYTHONIOENCODING": encoding},
        )
        assert result.returncode == 0, result.stderr
        assert result.stdout.strip() == b"still running"
        [line] = _lines(result.stderr.decode("utf-8"))
        assert line["event"] == "non_ascii" and line["text"] == "café ✓"


def test_a_program_using_the_client_without_configuring_logging_sees_only_warnings_on_stderr():
    script = textwrap.dedent(
        """
        from common.logging import get_logger

        log = get_logger("baton.best_effort")
        log.debug("best_effort_step_failed", step="close_broker_connection")
        log.info("migration_applied")
        log.warning("waiting_for_service", dependency="PostgreSQL")
        print("the program's own output")
        """
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("BATON")}
    done = subprocess.run([sys.executable, "-c", script], cwd=REPO, env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout == "the program's own output\n"
    assert "waiting_for_service" in done.stderr
    assert "best_effort_step_failed" not in done.stderr and "migration_applied" not in done.stderr

"""structlog set-up: one JSON object per line, with stable snake_case event names.

Everything a service prints goes to stderr through the same processors and renderer: Baton's own
structlog events directly, and whatever libraries (asyncpg, aio-pika, aiormq, tenacity) or any
other code log through the stdlib ``logging`` module through one stdlib handler whose formatter is
structlog's ``ProcessorFormatter``. Each line carries
``event``, ``level``, ``timestamp``, ``logger`` and the process's context (``service``, ``worker``).
"""

from __future__ import annotations

import json
import logging
import sys
import threading
from collections.abc import MutableMapping
from types import TracebackType
from typing import Any, TextIO

import orjson
import structlog

from common.settings import LoggingSettings

_LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING, "error": logging.ERROR}

#: Baton's own loggers live under this name.
BATON_LOGGER = "baton"
#: Libraries that are chatty below WARNING; they keep WARNING whatever the configured level, while
#: everything else (Baton's own loggers, users' action modules) follows it.
LIBRARY_LOGGERS = ("asyncpg", "aio_pika", "aiormq", "pamqp", "tenacity", "urllib3", "asyncio")
LIBRARY_LEVEL = logging.WARNING


#: Library lines logged as errors that are routine for Baton, with the level they are shown at. A
#: RabbitMQ restart is routine: aio-pika reconnects and says so at WARNING ("Connection attempt
#: ... failed ... Reconnecting after 1 seconds"), while aiormq logs each refused attempt again as
#: an error, and aio-pika a callback of the closed channel that fails (its issue #668).
#: (logger, what the message contains, level, one of which it must also contain if any)
LIBRARY_LEVELS: tuple[tuple[str, str, int, tuple[str, ...]], ...] = (
    ("aiormq.connection", "Unexpected connection close from remote", logging.WARNING, ()),
    ("aiormq.connection", "error when creating transport", logging.DEBUG, ()),
    # Only the errors of a connection that is closing: a channel that fails to reopen on a live
    # connection (the callback's other errors) stays an error.
    ("aio_pika.tools", "RobustChannel._on_close", logging.DEBUG, ("ChannelInvalidStateError", "> closed")),
)


class _LibraryLevels(logging.Filter):
    """Shows the lines of `LIBRARY_LEVELS` at their level (or not at all, below the configured one)."""

    def __init__(self, level: int) -> None:
        super().__init__()
        self.level = level

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno < logging.ERROR:
            return True
        for logger, contains, level, any_of in LIBRARY_LEVELS:
            message = record.getMessage() if record.name == logger else ""
            if contains in message and (not any_of or any(part in message for part in any_of)):
                if level < self.level:
                    return False
                record.levelno, record.levelname = level, logging.getLevelName(level)
                return True
        return True


class _StaticContext:
    """Adds the process's context to every event, including those logged by threads that did not
    inherit the context variables (``loop.run_in_executor`` does not copy them)."""

    def __init__(self, context: dict[str, Any]) -> None:
        self.context = context

    def __call__(self, _logger: Any, _method: str, event_dict: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
        for key, value in self.context.items():
            event_dict.setdefault(key, value)
        return event_dict


class _NamedWriter(structlog.WriteLogger):
    """structlog's direct writer, named (for ``add_logger_name``) like the stdlib logger it replaces."""

    def __init__(self, name: str, file: TextIO) -> None:
        super().__init__(file)
        self.name = name

    def msg(self, message: str) -> None:
        # As the stdlib's handlers do: a log line that cannot be written (stderr closed, a full
        # disk, a broken pipe) must not fail the code that logged it.
        try:
            super().msg(message)
        except (OSError, ValueError):
            return

    log = debug = info = warn = warning = err = error = critical = exception = fatal = failure = msg


def _dumps(event_dict: Any, **kw: Any) -> str:
    """JSON with orjson, which is several times faster than the stdlib's on an event; a value it
    refuses (an integer beyond 64 bits) falls back to the stdlib's encoder."""
    try:
        return orjson.dumps(event_dict, default=kw.get("default"), option=orjson.OPT_NON_STR_KEYS).decode()
    except TypeError:
        return json.dumps(event_dict, **kw)


def configure_logging(settings: LoggingSettings, **context: object) -> None:
    """Configure logging for this process; ``context`` (service, worker) is bound to every event."""
    level = _LEVELS[settings.level]
    stream = sys.stderr
    renderer: structlog.typing.Processor
    if settings.format == "json":
        # orjson writes non-ASCII as it is: only where stderr takes UTF-8 (else the stdlib's ASCII escapes).
        utf8 = (getattr(stream, "encoding", None) or "").lower().replace("-", "") == "utf8"
        renderer = structlog.processors.JSONRenderer(serializer=_dumps if utf8 else json.dumps)
    else:
        renderer = structlog.dev.ConsoleRenderer(colors=stream.isatty())
    # Run for every event, whether it came from structlog or from a stdlib logger.
    shared: list[structlog.typing.Processor] = [
        structlog.contextvars.merge_contextvars,
        _StaticContext(dict(context)),
        structlog.stdlib.add_logger_name,
        structlog.stdlib.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]
    rendering: list[structlog.typing.Processor] = [
        structlog.processors.StackInfoRenderer(),
        # The console renderer prints exceptions itself (and warns if they come pre-formatted).
        *([structlog.processors.format_exc_info] if settings.format == "json" else []),
        renderer,
    ]
    # Baton's own events are rendered by structlog and written straight to stderr: through the
    # stdlib's loggers and handler, an event cost several times as much, and the services log a
    # few per execution. Loggers are not cached on first use, so that configuring again (and
    # structlog's capture_logs in tests) applies to loggers already used.
    structlog.configure(
        processors=[*shared, *rendering],
        wrapper_class=structlog.make_filtering_bound_logger(level),
        logger_factory=lambda name=BATON_LOGGER, *_args: _NamedWriter(name, stream),
        cache_logger_on_first_use=False,
    )
    structlog.contextvars.clear_contextvars()
    if context:
        structlog.contextvars.bind_contextvars(**context)

    # Libraries and other code that log through the stdlib get the same processors and renderer.
    formatter = structlog.stdlib.ProcessorFormatter(
        # A stdlib record arrives with its message already formatted (``record.getMessage()``).
        foreign_pre_chain=[*shared, structlog.stdlib.ExtraAdder()],
        processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta, *rendering],
    )
    handler = logging.StreamHandler(stream)
    handler.setFormatter(formatter)
    handler.addFilter(_LibraryLevels(level))
    handler._baton = True  # type: ignore[attr-defined]  # so that configuring again replaces it

    root = logging.getLogger()
    for old in [h for h in root.handlers if getattr(h, "_baton", False) or _is_plain_stderr(h)]:
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level)
    for name in LIBRARY_LOGGERS:
        logging.getLogger(name).setLevel(max(LIBRARY_LEVEL, level))
    logging.captureWarnings(True)
    if settings.format == "json":
        # A crash's traceback, too, is one JSON line rather than many lines of text.
        sys.excepthook = _log_uncaught
        threading.excepthook = _log_uncaught_in_thread


def _log_uncaught(exc_type: type[BaseException], exc: BaseException, tb: TracebackType | None) -> None:
    logging.getLogger(BATON_LOGGER).critical("uncaught_exception", exc_info=(exc_type, exc, tb))


def _log_uncaught_in_thread(args: threading.ExceptHookArgs) -> None:
    if args.exc_value is None or isinstance(args.exc_value, SystemExit):
        return  # as the default hook: a thread that exits is not an error
    logging.getLogger(BATON_LOGGER).error(
        "uncaught_exception_in_thread",
        exc_info=args.exc_value,
        extra={"thread_name": args.thread.name if args.thread else None},
    )


def _is_plain_stderr(handler: logging.Handler) -> bool:
    """A handler that ``logging.basicConfig`` (or a library) put on the root to print plain text."""
    return (
        type(handler) is logging.StreamHandler
        and getattr(handler, "stream", None) in (sys.stderr, sys.__stderr__)
    )


def get_logger(name: str | None = None) -> structlog.typing.FilteringBoundLogger:
    """A structlog logger (by default named ``baton``)."""
    logger: structlog.typing.FilteringBoundLogger = structlog.get_logger(name or BATON_LOGGER)
    return logger


def _library_default() -> None:
    """Until a process configures logging (every service and CLI command that talks to a server does
    it at start), Baton's events in a program that uses `common` as a library (the client) go where
    the stdlib's would: warnings and up, to stderr. structlog's own default prints every level, the
    debug lines of best-effort steps included, to stdout, among the program's output. A program
    that configures structlog itself, before or after, keeps its own configuration."""
    if not structlog.is_configured():
        structlog.configure(
            wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING),
            logger_factory=structlog.PrintLoggerFactory(sys.stderr),
            cache_logger_on_first_use=False,
        )


_library_default()

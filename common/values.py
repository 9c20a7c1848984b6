"""Values as an operator writes them and as a message may show them: durations (``"5m"``),
moments (RFC 3339), and URLs without their secrets. Pure; no dependencies on the rest of Baton."""

from __future__ import annotations

import datetime as dt
import re
from typing import Any
from urllib.parse import urlsplit, urlunsplit

_DURATION_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h)?\s*$")
_UNIT_SECONDS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, None: 1.0}


def parse_duration(value: Any) -> float:
    """Seconds from ``300``, ``0.5``, ``"300"``, ``"5m"``, ``"250ms"``, ``"2h"``."""
    if isinstance(value, bool):
        raise ValueError("a duration is a number of seconds or a string such as '5m' or '250ms'")
    if isinstance(value, (int, float)):
        seconds = float(value)
    elif isinstance(value, str):
        match = _DURATION_RE.match(value)
        if not match:
            raise ValueError(
                f"invalid duration {value!r}: use seconds (300) or a string such as '5m', '30s', '250ms'"
            )
        seconds = float(match.group(1)) * _UNIT_SECONDS[match.group(2)]
    else:
        raise ValueError("a duration is a number of seconds or a string such as '5m' or '250ms'")
    if seconds < 0:
        raise ValueError("a duration cannot be negative")
    return seconds


def masked_url(url: str) -> str:
    """``url`` with its password replaced by ``***``: what an error message or a log may show."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.rsplit("@", 1)[1]
    return urlunsplit(parts._replace(netloc=f"{parts.username or ''}:***@{netloc}"))


def parse_moment(text: str, *, naive_is_utc: bool) -> dt.datetime:
    """An RFC 3339 time (`2026-12-01T09:00Z`, `...+01:00`). One without a zone is UTC when
    ``naive_is_utc``, else a ValueError: a request or a delay must say which 09:00 it means."""
    try:
        when = dt.datetime.fromisoformat(text.strip().replace("z", "Z"))
    except ValueError:
        raise ValueError(f"{text[:40]!r} is not an RFC 3339 time (e.g. 2026-12-01T09:00Z)") from None
    if when.tzinfo is None:
        if not naive_is_utc:
            raise ValueError(f"{text[:40]!r} names no time zone: add Z or an offset such as +01:00")
        when = when.replace(tzinfo=dt.UTC)
    return when


def where(url: str) -> str:
    """host:port of a URL, never its credentials: what a line about reaching it may name."""
    parts = urlsplit(url)
    return f"{parts.hostname}:{parts.port}" if parts.port else str(parts.hostname)

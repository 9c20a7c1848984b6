"""Lenient decoding of AMQP frames, for every Baton process that reads from RabbitMQ.

pamqp (under aio-pika) raises while decoding a frame whose properties hold invalid UTF-8 in a
short string (message_id, correlation_id, reply_to, a header name) or a timestamp past year 9999,
and recurses without bound into nested header tables. RabbitMQ relays all of these, and the AMQP
client then closes the whole connection, gets the message redelivered, and closes it again, for
ever: anyone who can publish to a queue could cut its consumer off. Decoded leniently instead, such
a property becomes replacement characters, a timestamp None, and a table too deep a marker under
`x-baton-undecodable`. Installed by `common.amqp.connect`, once per process.
"""

from __future__ import annotations

import datetime as dt
import struct
from collections.abc import Callable
from typing import Any

from pamqp import decode as amqp_decode

_DEEPEST_TABLE = 32
_UNDECODABLE = "x-baton-undecodable"


def _lenient_short_str(value: bytes) -> tuple[int, str]:
    try:
        length = value[0]
    except IndexError as exc:
        raise ValueError("Could not unpack short string value") from exc
    return length + 1, bytes(value[1 : length + 1]).decode("utf-8", "replace")


def _lenient_timestamp(value: bytes) -> tuple[int, dt.datetime | None]:
    original: Callable[[bytes], tuple[int, dt.datetime]] = amqp_decode._baton_original_timestamp  # type: ignore[attr-defined]
    try:
        return original(value)
    except (ValueError, OverflowError, OSError):
        if len(value) < 8:
            raise ValueError("Could not unpack timestamp value") from None
        return 8, None  # a time no datetime holds


def _lenient_value(value: bytes, depth: int) -> tuple[int, Any]:
    kind = value[0:1]
    item: Any
    if kind == b"F":
        consumed, item = _lenient_table(value[1:], depth)
    elif kind == b"A":
        consumed, item = _lenient_array(value[1:], depth)
    elif kind == b"T":
        consumed, item = _lenient_timestamp(value[1:])
    else:
        decoder = amqp_decode._baton_original_table_mapping.get(kind)  # type: ignore[attr-defined]
        if decoder is None:
            raise ValueError(f"Unknown type: {kind!r}")
        consumed, item = decoder(value[1:])
    return consumed + 1, item


def _container(value: bytes) -> tuple[int, bytes]:
    try:
        length = struct.unpack_from(">I", value, 0)[0]
    except struct.error as exc:
        raise ValueError("Could not unpack table length") from exc
    if 4 + length > len(value):
        raise ValueError("Field table length exceeds available data")
    return 4 + length, bytes(value[4 : 4 + length])


def _lenient_table(value: bytes, depth: int = 0) -> tuple[int, dict[str, Any]]:
    end, body = _container(value)
    if depth >= _DEEPEST_TABLE:
        return end, {_UNDECODABLE: f"nested deeper than {_DEEPEST_TABLE} levels"}
    data: dict[str, Any] = {}
    offset = 0
    try:
        while offset < len(body):
            key_length = body[offset]
            key = body[offset + 1 : offset + 1 + key_length].decode("utf-8", "replace")
            offset += 1 + key_length
            consumed, data[key] = _lenient_value(body[offset:], depth + 1)
            offset += consumed
    except Exception as exc:  # noqa: BLE001 - the rest of this table is skipped, not the frame
        data[_UNDECODABLE] = f"{type(exc).__name__}: {exc}"[:200]
    return end, data


def _lenient_array(value: bytes, depth: int = 0) -> tuple[int, list[Any]]:
    end, body = _container(value)
    if depth >= _DEEPEST_TABLE:
        return end, [f"{_UNDECODABLE}: nested deeper than {_DEEPEST_TABLE} levels"]
    data: list[Any] = []
    offset = 0
    try:
        while offset < len(body):
            consumed, item = _lenient_value(body[offset:], depth + 1)
            data.append(item)
            offset += consumed
    except Exception as exc:  # noqa: BLE001 - the rest of this array is skipped, not the frame
        data.append(f"{_UNDECODABLE}: {type(exc).__name__}: {exc}"[:200])
    return end, data


def install() -> None:
    """Make pamqp decode what it would otherwise raise on (see above); idempotent, process-wide."""
    if getattr(amqp_decode, "_baton_lenient", False):
        return
    amqp_decode._baton_original_timestamp = amqp_decode.timestamp  # type: ignore[attr-defined]
    amqp_decode._baton_original_table_mapping = dict(amqp_decode.TABLE_MAPPING)  # type: ignore[attr-defined]

    def table(value: bytes) -> tuple[int, dict[str, Any]]:
        return _lenient_table(value)

    def array(value: bytes) -> tuple[int, list[Any]]:
        return _lenient_array(value)

    amqp_decode.short_str = _lenient_short_str
    # pamqp declares that a timestamp decodes to a datetime; the lenient one may give None.
    amqp_decode.timestamp = _lenient_timestamp  # type: ignore[assignment]
    amqp_decode.field_table = table
    amqp_decode.field_array = array
    amqp_decode.METHODS.update(shortstr=_lenient_short_str, timestamp=_lenient_timestamp, table=table, array=array)
    amqp_decode.TABLE_MAPPING.update({b"T": _lenient_timestamp, b"F": table, b"A": array})
    amqp_decode._baton_lenient = True  # type: ignore[attr-defined]

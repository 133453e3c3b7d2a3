"""The Session stream's codec: :mod:`kupapi.wire`, re-exported.

It lives in ``kupapi`` (the ``kupclient`` distribution, which kupd depends
on) because the client's codec (``kupclient._wire``) shares its readers;
this module defines nothing of its own.
"""

from __future__ import annotations

from kupapi.wire import (
    LEN,
    VARINT,
    WIRE_MIN_BYTES,
    MalformedRequest,
    ReceivedMessage,
    Unexpected,
    WireRequest,
    add_kup_servicer,
    deserialize_request,
    encode_reply,
    fields,
    fill_receive,
    read_request,
    read_varint,
    scalar,
    serialize_response,
    span,
    varint,
    write_reply,
)

__all__ = [
    "LEN",
    "VARINT",
    "WIRE_MIN_BYTES",
    "MalformedRequest",
    "ReceivedMessage",
    "Unexpected",
    "WireRequest",
    "add_kup_servicer",
    "deserialize_request",
    "encode_reply",
    "fields",
    "fill_receive",
    "read_request",
    "read_varint",
    "scalar",
    "serialize_response",
    "span",
    "varint",
    "write_reply",
]

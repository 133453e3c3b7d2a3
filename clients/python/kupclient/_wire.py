"""The Session stream's data path in protobuf's wire format, by hand.

Why: a Session carries payloads up to a channel's size (MiBs).  Through the
generated classes a payload is copied four or five times on the way out
(the ``SessionExchange``, the oneof assignment, ``SerializeToString``) and
again on the way in (parse, ``.data``); for 1 MiB messages that made the
Python client cost more CPU than kupd itself (bench/results/FINDINGS.md,
session 4).  Here a ``send`` / ``exchange`` request is its few header bytes
joined with the payload (one copy), and a ``received`` / ``exchanged``
response is read by walking its fields and slicing the payload out (one
copy).  Everything else -- attach, pass, errors, any response this reader
does not expect field for field -- goes through the generated classes, so
the wire format stays kup.v1's and the two paths cannot disagree on it.

The stream is opened with these functions as its (de)serializers:
:func:`serialize` takes a generated ``SessionRequest`` or a :class:`WireOp`;
:func:`deserialize` returns a ``SessionResponse`` or a :class:`WireReply`.
"""

from __future__ import annotations

from typing import Any

from kupapi import kup_pb2
from kupapi.wire import LEN, Unexpected, fields, scalar, span, varint
from kupclient._types import Data, Kind, Message, message_from_pb
from kupclient.errors import ArgumentTypeError

#: From these sizes up the hand path is the faster one (below, the generated
#: classes' C beats a few microseconds of interpreter): writing a request
#: from 64 KiB of payload, reading a reply from 512 KiB (reading by hand
#: costs ~9 us more per message; upb's extra copy overtakes it near there).
ENCODE_MIN_BYTES = 64 * 1024
DECODE_MIN_BYTES = 512 * 1024

__all__ = [
    "DECODE_MIN_BYTES",
    "ENCODE_MIN_BYTES",
    "SESSION_METHOD",
    "WireOp",
    "WireReply",
    "deserialize",
    "read_reply",
    "reply_of",
    "serialize",
]

SESSION_METHOD = "/kup.v1.Kup/Session"

# Field numbers of kup.v1 (protos/kup/v1/kup.proto); tags are (n << 3) | type.
_REQ_SEND, _REQ_EXCHANGE = 3, 6
_RESP_RECEIVED, _RESP_EXCHANGED = 4, 7
_REQ_ID = 1
#: the fields read_reply reads (SessionResponse; ReceiveResponse; Message):
#: a reply with any other is the generated parser's
_REPLY_TOP = frozenset({_REQ_ID, _RESP_RECEIVED, _RESP_EXCHANGED})
_RESULT_FIELDS = frozenset({1, 2})
_MESSAGE_FIELDS = frozenset({1, 2, 3})

_KINDS: dict[int, Kind] = {int(k): k for k in Kind}
_new_message = object.__new__
_set = object.__setattr__


class WireOp:
    """A ``send`` or ``exchange`` request, encoded by :func:`serialize` as
    the generated class would encode it.  ``request_id`` is set by the
    stream's owner just before it is written, as on a generated request."""

    __slots__ = ("data", "field", "mode", "request_id", "timeout_ms")

    def __init__(self, field: int, data: Data, mode: int = 0, timeout_ms: int = 0) -> None:
        if not isinstance(data, (bytes, bytearray, memoryview)):
            # the library's own refusal, as data_arg words it for the other
            # RPCs (a plain TypeError would look like a bug of the caller's)
            raise ArgumentTypeError(f"data must be bytes, not {type(data).__name__}")
        self.field = field
        self.data = data
        self.mode = mode
        self.timeout_ms = timeout_ms
        self.request_id = 0

    @classmethod
    def send(cls, data: Data) -> WireOp:
        return cls(_REQ_SEND, data)

    @classmethod
    def exchange(cls, data: Data, mode: int, timeout_ms: int) -> WireOp:
        return cls(_REQ_EXCHANGE, data, mode, timeout_ms)

    def generated(self) -> kup_pb2.SessionRequest:
        """The same request as a generated SessionRequest."""
        req = kup_pb2.SessionRequest(request_id=self.request_id)
        if self.field == _REQ_EXCHANGE:
            x = req.exchange
            x.data = bytes(self.data)
            x.mode = self.mode  # type: ignore[assignment]
            x.timeout_ms = self.timeout_ms
        else:
            req.send.data = bytes(self.data)
        return req

    def encode(self) -> bytes:
        """The request written by hand, as :meth:`generated` would be."""
        n = memoryview(self.data).nbytes
        # the submessage: data (1), then for an exchange mode (2) and
        # timeout_ms (3); proto3 leaves out zeros and empty bytes
        inner = bytearray()
        if n:
            inner += b"\x0a" + varint(n)
        tail = b""
        if self.mode:
            tail += b"\x10" + varint(self.mode)
        if self.timeout_ms:
            tail += b"\x18" + varint(self.timeout_ms)
        head = bytearray()
        if self.request_id:
            head += b"\x08" + varint(self.request_id)
        head += varint((self.field << 3) | LEN) + varint(len(inner) + n + len(tail)) + inner
        return b"".join((head, self.data, tail))


class WireReply:
    """A ``received`` or ``exchanged`` response read by hand."""

    __slots__ = ("message", "not_ready", "request_id", "result")

    def __init__(
        self, request_id: int, result: str, not_ready: bool, message: Message | None
    ) -> None:
        self.request_id = request_id
        self.result = result  # "received" | "exchanged"
        self.not_ready = not_ready
        self.message = message


def serialize(req: Any) -> bytes:
    if isinstance(req, WireOp):
        if memoryview(req.data).nbytes >= ENCODE_MIN_BYTES:
            return req.encode()
        req = req.generated()
    return bytes(req.SerializeToString())


def read_reply(raw: bytes) -> WireReply:
    """A received / exchanged reply read by hand; Unexpected for anything else."""
    top = fields(raw, 0, len(raw), _REPLY_TOP)
    results = [f for f in (_RESP_RECEIVED, _RESP_EXCHANGED) if f in top]
    if len(results) != 1:
        raise Unexpected
    rr = fields(raw, *span(top, results[0]), _RESULT_FIELDS)
    rid = scalar(top, _REQ_ID, 64)
    not_ready = bool(scalar(rr, 1, 64))  # bool: any varint
    result = "received" if results[0] == _RESP_RECEIVED else "exchanged"
    if not_ready and 2 not in rr:
        return WireReply(rid, result, True, None)
    # an absent message reads as the default one, as the generated class has it
    m = fields(raw, *span(rr, 2), _MESSAGE_FIELDS) if 2 in rr else {}
    a, b = span(m, 1)
    k = _KINDS.get(scalar(m, 2, 31))
    if k is None:
        raise Unexpected  # the generated path raises for it, as before
    message = _new_message(Message)
    _set(message, "data", raw[a:b])
    _set(message, "kind", k)
    _set(message, "seq", scalar(m, 3, 64))
    return WireReply(rid, result, not_ready, message)


def deserialize(raw: bytes) -> kup_pb2.SessionResponse | WireReply:
    if len(raw) >= DECODE_MIN_BYTES:
        try:
            return read_reply(raw)
        except Unexpected:
            pass
    return kup_pb2.SessionResponse.FromString(raw)


def reply_of(
    resp: kup_pb2.SessionResponse | WireReply, result: str
) -> tuple[bool, Message | None]:
    """(not_ready, message) of a ``received`` / ``exchanged`` response,
    whichever path read it; the message is None only when not_ready and
    there is none (it is not built: a default one has no valid kind)."""
    if isinstance(resp, WireReply):
        return resp.not_ready, resp.message
    rr = getattr(resp, result)
    if rr.not_ready and not rr.HasField("message"):
        return True, None
    return rr.not_ready, message_from_pb(rr.message)

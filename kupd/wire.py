"""The Session stream's data path in protobuf's wire format, by hand.

Why: a Session carries payloads up to a channel's size (MiBs).  Through the
generated classes kupd copied a payload seven times per exchange (parse,
field read, the page in and out, the reply field, serialize, gRPC), the bare
echo server twice (bench/results/FINDINGS.md, session 3).  Here a ``send``
or ``exchange`` request's payload is a ``memoryview`` of the received bytes
(no copy until the channel's page), and an ``exchanged`` / ``received``
reply is its few header bytes joined with the payload (one copy).  All
other requests and replies go through the generated classes, and anything
this reader does not expect field for field (an unknown field, a field
twice, another wire type) is left to them too, so the wire format stays
kup.v1's and the two paths cannot disagree on it.

The low-level readers and writers (:mod:`kupapi.wire`: :func:`varint`,
:func:`fields`, ...) are the Python client's too (``kupclient._wire``);
this module, the service's side of it, is kupd's alone.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from typing import Any, Protocol

import grpc

from kupapi import kup_pb2, kup_pb2_grpc
from kupapi.abi import Kind
from kupapi.wire import (
    LEN,
    VARINT,
    Unexpected,
    fields,
    read_varint,
    scalar,
    span,
    varint,
)

__all__ = [
    "LEN",
    "VARINT",
    "WIRE_MIN_BYTES",
    "Handover",
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

#: Below this many bytes the generated classes (C) are faster than reading
#: or writing by hand (Python): the hand path costs a few microseconds of
#: interpreter per message, the generated one a copy or two of the payload
#: (measured: 64 B 5.3 vs 1.2 us to read, 64 KiB even, 1 MiB 6 vs 173 us).
WIRE_MIN_BYTES = 64 * 1024
# kup.v1 field numbers (protos/kup/v1/kup.proto)
_REQ_ID, _REQ_SEND, _REQ_EXCHANGE = 1, 3, 6
_RESP_RECEIVED, _RESP_EXCHANGED = 4, 7
#: the fields read_request reads: a request with any other is the
#: generated parser's (SessionRequest; SessionSend / SessionExchange)
_REQ_TOP = frozenset({_REQ_ID, _REQ_SEND, _REQ_EXCHANGE})
_SEND_FIELDS = frozenset({1})
_EXCHANGE_FIELDS = frozenset({1, 2, 3})


class ReceivedMessage(Protocol):
    """A received message as the replies carry it (kupd.channel.Message is
    one)."""

    @property
    def data(self) -> bytes: ...
    @property
    def kind(self) -> Kind: ...
    @property
    def seq(self) -> int: ...


class WireRequest:
    """A ``send`` or ``exchange`` request read by hand.  It answers what
    kupd's Session loop asks of a generated ``SessionRequest`` --
    ``request_id``, ``WhichOneof("op")``, ``.send.data``,
    ``.exchange.data/.mode/.timeout_ms`` -- with ``data`` a memoryview of
    the received bytes."""

    __slots__ = ("data", "mode", "op", "request_id", "timeout_ms")

    def __init__(
        self, request_id: int, op: str, data: memoryview, mode: int = 0, timeout_ms: int = 0
    ) -> None:
        self.request_id = request_id
        self.op = op
        self.data = data
        self.mode = mode
        self.timeout_ms = timeout_ms

    def WhichOneof(self, group: str) -> str:  # the protobuf name
        return self.op

    @property
    def exchange(self) -> WireRequest:
        return self

    @property
    def send(self) -> WireRequest:
        return self


def read_request(raw: bytes) -> WireRequest:
    """A send / exchange request read by hand; Unexpected for anything else."""
    top = fields(raw, 0, len(raw), _REQ_TOP)
    ops = [f for f in (_REQ_SEND, _REQ_EXCHANGE) if f in top]
    if len(ops) != 1:
        raise Unexpected
    a, b = span(top, ops[0])
    sub = fields(raw, a, b, _EXCHANGE_FIELDS if ops[0] == _REQ_EXCHANGE else _SEND_FIELDS)
    da, db = span(sub, 1)
    return WireRequest(
        scalar(top, _REQ_ID, 64),  # uint64
        "exchange" if ops[0] == _REQ_EXCHANGE else "send",
        memoryview(raw)[da:db],
        scalar(sub, 2, 31),  # ReceiveMode, an int32 enum: negative ones too
        scalar(sub, 3, 32),  # uint32
    )


class MalformedRequest:
    """A request protobuf could not parse (truncated, a length that lies,
    field 0): handed to the handler in its place, so that kupd answers
    INVALID_ARGUMENT naming it -- a deserializer that raises makes grpc.aio
    answer UNKNOWN "Unexpected <class DecodeError>", without kup-error.  In a
    Session stream it reads as an operation "malformed" (answered in-band:
    gRPC's framing is intact, the stream goes on)."""

    __slots__ = ("error", "method")
    request_id = 0

    def __init__(self, method: str, error: str) -> None:
        self.method = method
        self.error = error

    def WhichOneof(self, name: str) -> str:  # protobuf's name
        return "malformed"

    def describe(self) -> str:
        return f"malformed {self.method} request (not a kup.v1 message): {self.error}"


def _parse_session_request(raw: bytes) -> kup_pb2.SessionRequest | MalformedRequest:
    try:
        return kup_pb2.SessionRequest.FromString(raw)
    except Exception as exc:  # google.protobuf.message.DecodeError
        return MalformedRequest("Session", str(exc))


def deserialize_request(raw: bytes) -> kup_pb2.SessionRequest | WireRequest | MalformedRequest:
    if len(raw) >= WIRE_MIN_BYTES:
        try:
            return read_request(raw)
        except Unexpected:
            pass
    return _parse_session_request(raw)


def fill_receive(r: kup_pb2.ReceiveResponse, m: ReceivedMessage | None) -> None:
    """``r`` := the ReceiveResponse of ``m``, filled in place (building the
    nested messages with keyword arguments copies each one into its parent)."""
    if m is None:
        r.not_ready = True
    else:
        rm = r.message
        rm.data = m.data
        rm.kind = m.kind  # type: ignore[assignment]
        rm.seq = m.seq


def encode_reply(
    request_id: int, exchanged: bool, m: ReceivedMessage | None
) -> kup_pb2.SessionResponse | bytes:
    """The SessionResponse (``exchanged``, else ``received``) carrying ``m``
    (None: not_ready): written by hand (:func:`write_reply`) from
    WIRE_MIN_BYTES up, a generated one below."""
    if m is not None and len(m.data) >= WIRE_MIN_BYTES:
        return write_reply(request_id, exchanged, m)
    resp = kup_pb2.SessionResponse(request_id=request_id)
    fill_receive(resp.exchanged if exchanged else resp.received, m)
    return resp


def write_reply(request_id: int, exchanged: bool, m: ReceivedMessage | None) -> bytes:
    """The SessionResponse (``exchanged``, else ``received``) carrying ``m``
    (None: not_ready), written by hand as the generated class writes it."""
    field = _RESP_EXCHANGED if exchanged else _RESP_RECEIVED
    head = b"\x08" + varint(request_id) if request_id else b""
    if m is None:
        return head + bytes(((field << 3) | LEN, 2, 0x08, 1))
    n = len(m.data)
    tail = b""
    if m.kind:
        tail += b"\x10" + varint(int(m.kind))
    if m.seq:
        tail += b"\x18" + varint(m.seq)
    data_head = b"\x0a" + varint(n) if n else b""
    msg_len = len(data_head) + n + len(tail)
    rr = b"\x12" + varint(msg_len)  # ReceiveResponse.message (2)
    rr_len = len(rr) + msg_len
    head += varint((field << 3) | LEN) + varint(rr_len) + rr + data_head
    return b"".join((head, m.data, tail))


def serialize_response(resp: Any) -> bytes:
    if isinstance(resp, bytes):
        return resp
    return bytes(resp.SerializeToString())


class _Capture:
    """Stands in for a server to take the generated method handlers."""

    def __init__(self) -> None:
        self.handlers: dict[str, grpc.RpcMethodHandler] = {}

    def add_generic_rpc_handlers(self, handlers: Any) -> None:
        pass

    def add_registered_method_handlers(
        self, service: str, handlers: dict[str, grpc.RpcMethodHandler]
    ) -> None:
        self.handlers = handlers


def _tolerant(method: str, parse: Callable[[bytes], Any]) -> Callable[[bytes], Any]:
    def read(raw: bytes) -> Any:
        try:
            return parse(raw)
        except Exception as exc:  # google.protobuf.message.DecodeError
            return MalformedRequest(method, str(exc))

    return read


def _refusing(method: str, handler: Any, on_malformed: Any) -> Any:
    """``handler`` (unary request) whose deserializer hands a request
    protobuf cannot parse to ``on_malformed(request, context)`` (which
    aborts) instead of raising in gRPC."""
    read = _tolerant(method, handler.request_deserializer)
    if handler.unary_unary is not None:
        inner = handler.unary_unary

        async def unary(request: Any, context: Any) -> Any:
            if type(request) is MalformedRequest:
                await on_malformed(request, context)
            return await inner(request, context)

        return handler._replace(request_deserializer=read, unary_unary=unary)
    if handler.unary_stream is not None:
        gen = handler.unary_stream

        async def stream(request: Any, context: Any) -> AsyncIterator[Any]:
            if type(request) is MalformedRequest:
                await on_malformed(request, context)
            async for item in gen(request, context):
                yield item

        return handler._replace(request_deserializer=read, unary_stream=stream)
    return handler


class Handover:
    """What a unary handler served by :func:`_reply_watched` returns when
    its reply carries something taken for the caller (a lease's Receive and
    Send: the kernel's message): ``reply``, then ``settle(True)`` once it is
    written, or ``settle(False)`` when it cannot be -- the caller had gone
    -- exactly once either way."""

    __slots__ = ("reply", "settle")

    def __init__(self, reply: Any, settle: Callable[[bool], object]) -> None:
        self.reply = reply
        self.settle = settle


def _reply_watched(handler: Any, undelivered: Callable[[Any], object] | None = None) -> Any:
    """A unary handler served as a server stream of its one reply: the same
    on the wire (headers, the message, the status: a unary client sees no
    difference), but the reply is written by a batch of its own, after
    which the handler resumes.  gRPC writes a unary reply and its status in
    one batch whose failure it keeps to itself, and does not cancel a
    handler that has returned; nor does its ``context.cancelled()`` say
    that a client cancelled (it is true only for a status CANCELLED the
    server set itself: grpc.aio's _ServicerContext).  Here a reply that
    could not be written -- the caller had cancelled, passed its deadline
    or gone by the time the handler answered -- is seen, and
    ``undelivered(reply)`` undoes what the caller will never learn of
    (Attach: the lease); a :class:`Handover` is settled, written or not.
    A reply once written counts as delivered: a cancel that comes after it
    (before the status) does not take it back."""
    inner = handler.unary_unary

    async def one_reply(request: Any, context: Any) -> AsyncIterator[Any]:
        reply = await inner(request, context)
        settle = None
        if type(reply) is Handover:
            reply, settle = reply.reply, reply.settle
        written = False

        def done(_: object) -> None:
            if written:
                return
            if settle is not None:
                settle(False)
            elif undelivered is not None:
                undelivered(reply)

        # run when the RPC is over, whichever way: the write failed, or the
        # task was cancelled during it (the generator is not resumed then)
        context.add_done_callback(done)
        yield reply
        written = True
        if settle is not None:
            settle(True)

    return grpc.unary_stream_rpc_method_handler(
        one_reply,
        request_deserializer=handler.request_deserializer,
        response_serializer=handler.response_serializer,
    )


def add_kup_servicer(
    servicer: Any, server: grpc.aio.Server, on_malformed: Any = None
) -> None:
    """``kup_pb2_grpc.add_KupServicer_to_server`` with the Session stream's
    requests read by :func:`deserialize_request` and its replies written by
    :func:`serialize_response`; every other method as generated, except that
    a request protobuf cannot parse goes to ``on_malformed(request,
    context)`` -- kupd's service edge, which aborts INVALID_ARGUMENT -- and
    that Attach, when the servicer has ``undelivered(reply)``, and Receive
    and Send (which return a :class:`Handover` when their reply carries the
    kernel's message) are served so that a reply its caller was gone for
    is seen (:func:`_reply_watched`)."""
    cap = _Capture()
    kup_pb2_grpc.add_KupServicer_to_server(servicer, cap)
    handlers = dict(cap.handlers)
    if "Session" not in handlers:
        raise RuntimeError("kup.v1 stubs without a Session method: regenerate them")
    if on_malformed is not None:
        for name, h in list(handlers.items()):
            if name != "Session":
                handlers[name] = _refusing(name, h, on_malformed)
    undelivered = getattr(servicer, "undelivered", None)
    if undelivered is not None:
        handlers["Attach"] = _reply_watched(handlers["Attach"], undelivered)
    for name in ("Receive", "Send"):
        handlers[name] = _reply_watched(handlers[name])
    handlers["Session"] = grpc.stream_stream_rpc_method_handler(
        servicer.Session,
        request_deserializer=deserialize_request,
        response_serializer=serialize_response,
    )
    server.add_generic_rpc_handlers(
        (grpc.method_handlers_generic_handler("kup.v1.Kup", handlers),)
    )
    server.add_registered_method_handlers("kup.v1.Kup", handlers)

"""kupd.wire, the Session stream's hand-written codec on kupd's side: the
requests it reads are what protobuf reads, the replies it writes are what
protobuf writes, and whatever it does not expect field for field is left to
the generated classes -- checked against protobuf itself over random
messages.  (End to end, every gateway test's Session goes through it: the
generated stubs of tests/gateway, kupclient, and the Node client's
protobuf.js in tests/node.)"""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kupapi import kup_pb2
from kupd.abi import Kind
from kupd.channel import Message
from kupd.wire import (
    WIRE_MIN_BYTES,
    MalformedRequest,
    Unexpected,
    WireRequest,
    deserialize_request,
    encode_reply,
    read_request,
    serialize_response,
    varint,
    write_reply,
)

__all__: list[str] = []

u64 = st.integers(min_value=0, max_value=2**64 - 1)
u32 = st.integers(min_value=0, max_value=2**32 - 1)
payload = st.binary(max_size=3000)


@settings(max_examples=300, deadline=None)
@given(
    rid=u64, data=payload, mode=st.integers(0, 5), ms=u32, op=st.sampled_from(["send", "exchange"])
)
def test_data_requests_read_as_protobuf_does(
    rid: int, data: bytes, mode: int, ms: int, op: str
) -> None:
    if op == "send":
        req = kup_pb2.SessionRequest(request_id=rid, send=kup_pb2.SessionSend(data=data))
    else:
        req = kup_pb2.SessionRequest(
            request_id=rid,
            exchange=kup_pb2.SessionExchange(data=data, mode=mode, timeout_ms=ms),  # type: ignore[arg-type]
        )
    got = read_request(req.SerializeToString())
    assert isinstance(got, WireRequest)
    assert (got.request_id, got.WhichOneof("op")) == (rid, op)
    assert isinstance(got.data, memoryview) and bytes(got.data) == data
    if op == "exchange":
        assert (got.exchange.mode, got.exchange.timeout_ms) == (mode, ms)


@pytest.mark.parametrize(
    "req",
    [
        kup_pb2.SessionRequest(request_id=1, attach=kup_pb2.SessionAttach(device="echo")),
        kup_pb2.SessionRequest(request_id=2, receive=kup_pb2.SessionReceive(mode=1)),
        kup_pb2.SessionRequest(request_id=3, pass_turn=kup_pb2.SessionPass()),
        kup_pb2.SessionRequest(request_id=4),
    ],
    ids=["attach", "receive", "pass", "no-op"],
)
def test_other_requests_go_to_protobuf(req: kup_pb2.SessionRequest) -> None:
    got = deserialize_request(req.SerializeToString())
    assert isinstance(got, kup_pb2.SessionRequest) and got == req


def test_requests_by_size() -> None:
    """Below WIRE_MIN_BYTES the generated class reads every request (it is
    faster there); from it up a send / exchange is read by hand."""
    for n, hand in ((0, False), (WIRE_MIN_BYTES - 64, False), (WIRE_MIN_BYTES, True)):
        req = kup_pb2.SessionRequest(request_id=5, exchange=kup_pb2.SessionExchange(data=bytes(n)))
        got = deserialize_request(req.SerializeToString())
        assert isinstance(got, WireRequest) is hand, n
        assert bytes(got.exchange.data) == bytes(n)


def test_unexpected_encodings_go_to_protobuf() -> None:
    """An unknown field, a field twice (protobuf: the last wins), a
    submessage field of the wrong wire type, a truncated message: the hand
    reader refuses them, and protobuf decides."""
    big = bytes(WIRE_MIN_BYTES)
    one = kup_pb2.SessionRequest(
        request_id=1, exchange=kup_pb2.SessionExchange(data=big)
    ).SerializeToString()
    for odd in (one + b"\x98\x06\x01", one + b"\x08\x07", b"\x08\x01\x32\x02\x08\x05"):
        with pytest.raises(Unexpected):
            read_request(odd)
    got = deserialize_request(one + b"\x98\x06\x01")  # field 99
    assert isinstance(got, kup_pb2.SessionRequest) and got.exchange.data == big
    got = deserialize_request(one + b"\x08\x07")  # request_id again
    assert isinstance(got, kup_pb2.SessionRequest) and got.request_id == 7
    # exchange.data (field 1) as a varint: not kup.v1's type; protobuf
    # decides (it keeps it as an unknown field)
    got = deserialize_request(b"\x08\x01\x32\x02\x08\x05")
    assert isinstance(got, kup_pb2.SessionRequest) and got.exchange.data == b""
    with pytest.raises(Unexpected):
        read_request(one[:-1])
    # protobuf cannot parse it either: handed on as what it is, for kupd to
    # answer INVALID_ARGUMENT naming it (not an exception inside gRPC)
    bad = deserialize_request(one[:-1])
    assert isinstance(bad, MalformedRequest), bad
    assert bad.WhichOneof("op") == "malformed"
    assert "malformed Session request (not a kup.v1 message)" in bad.describe()


class _Counted(bytes):
    """bytes that count the indexing the hand reader does."""

    reads = 0

    def __getitem__(self, i):  # type: ignore[no-untyped-def, override]
        type(self).reads += 1
        return super().__getitem__(i)


def test_an_unknown_field_stops_the_hand_reader_at_once() -> None:
    """A request made of a great many unknown fields is refused at the
    first one (protobuf, much faster at skipping them, decides), not after
    every one was collected: 900 000 of them cost kupd's loop 0.8 s."""
    unknown = b"".join(varint((n << 3) | 0) + b"\x01" for n in range(100, 100_100))
    pad = varint((99 << 3) | 2) + varint(WIRE_MIN_BYTES) + bytes(WIRE_MIN_BYTES)
    raw = _Counted(unknown + pad)
    _Counted.reads = 0
    with pytest.raises(Unexpected):
        read_request(raw)
    assert _Counted.reads < 10, _Counted.reads
    got = deserialize_request(bytes(raw))
    assert isinstance(got, kup_pb2.SessionRequest) and got.WhichOneof("op") is None


def test_varints_wider_than_their_field_go_to_protobuf() -> None:
    """A varint can carry 70 bits.  The hand reader took a request_id of 2**64
    or more as it was (kupd then failed building the reply: UNKNOWN, "Value
    out of range") and a timeout_ms past uint32 whole, where protobuf
    truncates: values wider than their field are left to protobuf."""
    big = bytes(WIRE_MIN_BYTES)

    def raw(rid: int, mode: int, ms: int) -> bytes:
        sub = b"\x0a" + varint(len(big)) + big + b"\x10" + varint(mode) + b"\x18" + varint(ms)
        return b"\x08" + varint(rid) + b"\x32" + varint(len(sub)) + sub

    for rid, mode, ms in [(2**64, 1, 5), (2**70 - 1, 1, 5), (1, 2**31, 5), (1, 1, 2**40)]:
        odd = raw(rid, mode, ms)
        with pytest.raises(Unexpected):
            read_request(odd)
        got = deserialize_request(odd)
        assert isinstance(got, kup_pb2.SessionRequest), (rid, mode, ms)
        assert got == kup_pb2.SessionRequest.FromString(odd)
    fits = read_request(raw(2**64 - 1, 2, 2**32 - 1))
    assert (fits.request_id, fits.mode, fits.timeout_ms) == (2**64 - 1, 2, 2**32 - 1)


def _message(data: bytes, kind: Kind, seq: int) -> Message:
    return Message(data, kind, seq)


@settings(max_examples=300, deadline=None)
@given(
    rid=u64,
    exchanged=st.booleans(),
    data=payload,
    kind=st.sampled_from(list(Kind)),
    seq=u64,
    none=st.booleans(),
)
def test_replies_are_what_protobuf_writes(
    rid: int, exchanged: bool, data: bytes, kind: Kind, seq: int, none: bool
) -> None:
    m = None if none else _message(data, kind, seq)
    want = kup_pb2.SessionResponse(request_id=rid)
    rr = want.exchanged if exchanged else want.received
    if m is None:
        rr.not_ready = True
    else:
        rr.message.data = data
        rr.message.kind = int(kind)  # type: ignore[assignment]
        rr.message.seq = seq
        rr.SetInParent()
    raw = write_reply(rid, exchanged, m)
    assert raw == want.SerializeToString()
    assert kup_pb2.SessionResponse.FromString(raw) == want
    assert serialize_response(raw) is raw
    assert serialize_response(want) == raw
    # below WIRE_MIN_BYTES the generated class writes it
    small = encode_reply(rid, exchanged, m)
    assert isinstance(small, kup_pb2.SessionResponse) and small == want


def test_large_replies_are_written_by_hand() -> None:
    m = Message(bytes(range(256)) * (WIRE_MIN_BYTES // 256), Kind.DATA, 9)
    raw = encode_reply(3, True, m)
    assert isinstance(raw, bytes)
    back = kup_pb2.SessionResponse.FromString(raw)
    assert (back.request_id, back.exchanged.message.data, back.exchanged.message.seq) == (
        3,
        m.data,
        9,
    )

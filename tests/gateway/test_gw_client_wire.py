"""kupclient._wire, the Session data path's hand-written protobuf codec: what
it writes is what the generated classes read (and would have written), what
it reads agrees with the generated classes field for field, and anything it
does not expect goes to them -- checked against protobuf itself over random
messages, then end to end through kupd with large payloads."""

from __future__ import annotations

import asyncio

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kupapi import kup_pb2
from kupclient import AsyncClient, Client, Kind
from kupclient._types import message_from_pb
from kupclient._wire import WireOp, WireReply, deserialize, reply_of, serialize
from kupd.testing import Kupd

__all__: list[str] = []

u64 = st.integers(min_value=0, max_value=2**64 - 1)
u32 = st.integers(min_value=0, max_value=2**32 - 1)
payload = st.binary(max_size=3000)
modes = st.sampled_from([0, 1, 2])
kinds = st.sampled_from([1, 2, 3])


@settings(max_examples=300, deadline=None)
@given(rid=u64, data=payload, mode=modes, ms=u32)
def test_exchange_request_is_what_protobuf_writes(
    rid: int, data: bytes, mode: int, ms: int
) -> None:
    op = WireOp.exchange(data, mode, ms)
    op.request_id = rid
    raw = serialize(op)
    want = kup_pb2.SessionRequest(
        request_id=rid, exchange=kup_pb2.SessionExchange(data=data, mode=mode, timeout_ms=ms)  # type: ignore[arg-type]
    )
    assert raw == want.SerializeToString()
    back = kup_pb2.SessionRequest.FromString(raw)
    assert back.WhichOneof("op") == "exchange"
    assert (back.request_id, back.exchange.data, back.exchange.mode, back.exchange.timeout_ms) == (
        rid, data, mode, ms,
    )


@settings(max_examples=200, deadline=None)
@given(rid=u64, data=payload)
def test_send_request_is_what_protobuf_writes(rid: int, data: bytes) -> None:
    op = WireOp.send(bytearray(data))
    op.request_id = rid
    want = kup_pb2.SessionRequest(request_id=rid, send=kup_pb2.SessionSend(data=data))
    assert serialize(op) == want.SerializeToString()


def test_generated_requests_pass_through() -> None:
    req = kup_pb2.SessionRequest(request_id=3, pass_turn=kup_pb2.SessionPass())
    assert serialize(req) == req.SerializeToString()


def test_bad_payload_type_is_named() -> None:
    with pytest.raises(TypeError, match="data must be bytes, not str"):
        WireOp.exchange("text", 0, 0)  # type: ignore[arg-type]


@settings(max_examples=300, deadline=None)
@given(
    rid=u64,
    result=st.sampled_from(["received", "exchanged"]),
    not_ready=st.booleans(),
    has_message=st.booleans(),
    data=payload,
    kind=kinds,
    seq=u64,
)
def test_reply_reads_as_protobuf_does(
    rid: int, result: str, not_ready: bool, has_message: bool, data: bytes, kind: int, seq: int
) -> None:
    resp = kup_pb2.SessionResponse(request_id=rid)
    rr = getattr(resp, result)
    rr.not_ready = not_ready
    if has_message:
        rr.message.data = data
        rr.message.kind = kind  # type: ignore[assignment]
        rr.message.seq = seq
    else:
        rr.SetInParent()
    raw = resp.SerializeToString()
    generated = kup_pb2.SessionResponse.FromString(raw)
    got = deserialize(raw)
    if not has_message and not_ready:
        assert reply_of(got, result) == reply_of(generated, result) == (True, None)
        return
    if not has_message:
        # the default message's kind 0 is no Kind: the generated path takes
        # it, and raises where it always did (message_from_pb)
        assert isinstance(got, kup_pb2.SessionResponse)
        with pytest.raises(ValueError):
            reply_of(got, result)
        return
    assert isinstance(got, WireReply)
    assert (got.request_id, got.result) == (rid, result)
    assert reply_of(got, result) == reply_of(generated, result)
    assert reply_of(got, result) == (not_ready, message_from_pb(rr.message))


@pytest.mark.parametrize(
    "resp",
    [
        kup_pb2.SessionResponse(request_id=1, sent=kup_pb2.SendResponse()),
        kup_pb2.SessionResponse(request_id=2, error=kup_pb2.Error(grpc_code=5, message="m")),
        kup_pb2.SessionResponse(request_id=3, attached=kup_pb2.AttachResponse(channel=4)),
        kup_pb2.SessionResponse(request_id=4, passed=kup_pb2.PassResponse()),
    ],
    ids=["sent", "error", "attached", "passed"],
)
def test_other_results_go_to_protobuf(resp: kup_pb2.SessionResponse) -> None:
    got = deserialize(resp.SerializeToString())
    assert isinstance(got, kup_pb2.SessionResponse)
    assert got == resp


def test_unexpected_encodings_go_to_protobuf() -> None:
    """A field twice (protobuf: the last wins), an unknown field, a
    truncated message: the generated class decides, as it would have."""
    one = kup_pb2.SessionResponse(
        request_id=1, exchanged=kup_pb2.ReceiveResponse(message=kup_pb2.Message(data=b"a", kind=1))
    ).SerializeToString()
    twice = one + kup_pb2.SessionResponse(request_id=9).SerializeToString()
    got = deserialize(twice)
    assert isinstance(got, kup_pb2.SessionResponse) and got.request_id == 9
    unknown = one + b"\x98\x06\x01"  # field 99, varint 1
    got = deserialize(unknown)
    assert isinstance(got, kup_pb2.SessionResponse) and got.exchanged.message.data == b"a"
    with pytest.raises(Exception, match=r"(?i)pars|decod|truncat"):
        deserialize(one[:-1])


def test_large_payloads_through_kupd(kupd: Kupd) -> None:
    """Both clients, both paths (exchange, send + receive), a channel-sized
    payload and an empty one, through a real kupd and kupsim echo."""
    with Client(kupd.socket) as c, c.open("echo").channel() as ch:
        assert ch.receive(timeout=30).kind == Kind.PASS
        big = bytes(range(256)) * (ch.max_msg // 256)
        m = ch.exchange(big, timeout=30)
        assert (m.data, m.kind) == (big, Kind.DATA)
        ch.send(b"")
        assert ch.receive(timeout=30).data == b""
        ch.send(big[:1000])
        assert ch.receive(timeout=30).data == big[:1000]

    async def main() -> None:
        async with AsyncClient(kupd.socket) as ac:
            ch = await (await ac.open("echo")).channel()
            try:
                assert (await ch.receive(timeout=30)).kind == Kind.PASS
                got = await ch.exchange(big, timeout=30)
                assert got.data == big and got.kind == Kind.DATA
                await ch.send(memoryview(big)[:77])
                assert (await ch.receive(timeout=30)).data == big[:77]
            finally:
                await ch.close()

    asyncio.run(main())

"""kupclient._wire, the Session data path's hand-written protobuf codec: what
it writes is what the generated classes read (and would have written), what
it reads agrees with the generated classes field for field, and anything it
does not expect goes to them -- checked against protobuf itself over random
messages, then end to end through kupd with large payloads."""

from __future__ import annotations

import asyncio
import os

import pytest
from gateway_helpers import StartKupd, echo_sim
from hypothesis import given, settings
from hypothesis import strategies as st

from kupapi import kup_pb2
from kupclient import AsyncClient, Kind
from kupclient._types import message_from_pb
from kupclient._wire import (
    DECODE_MIN_BYTES,
    ENCODE_MIN_BYTES,
    WireOp,
    WireReply,
    deserialize,
    read_reply,
    reply_of,
    serialize,
)
from kupd.wire import Unexpected

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
    raw = op.encode()
    assert serialize(op) == raw  # below ENCODE_MIN_BYTES: the generated path
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
    assert op.encode() == serialize(op) == want.SerializeToString()


def test_requests_and_replies_by_size() -> None:
    """The hand path from ENCODE_MIN_BYTES (writing) / DECODE_MIN_BYTES
    (reading) up, the generated classes below: the same bytes either way."""
    for n in (0, ENCODE_MIN_BYTES - 1, ENCODE_MIN_BYTES, DECODE_MIN_BYTES):
        op = WireOp.exchange(bytes(n), 2, 500)
        op.request_id = 9
        assert serialize(op) == op.generated().SerializeToString() == op.encode()
    for n, hand in ((64, False), (DECODE_MIN_BYTES - 64, False), (DECODE_MIN_BYTES, True)):
        raw = kup_pb2.SessionResponse(
            request_id=9,
            exchanged=kup_pb2.ReceiveResponse(message=kup_pb2.Message(data=bytes(n), kind=1)),
        ).SerializeToString()
        got = deserialize(raw)
        assert isinstance(got, WireReply) is hand, n
        _, m = reply_of(got, "exchanged")
        assert m is not None and m.data == bytes(n)


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
    got: kup_pb2.SessionResponse | WireReply
    try:
        got = read_reply(raw)
    except Unexpected:  # what deserialize then leaves to protobuf
        got = generated
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
    truncated message: the hand reader refuses them, the generated class
    decides, as it would have."""
    big = bytes(DECODE_MIN_BYTES)
    one = kup_pb2.SessionResponse(
        request_id=1,
        exchanged=kup_pb2.ReceiveResponse(message=kup_pb2.Message(data=big, kind=1)),
    ).SerializeToString()
    twice = one + kup_pb2.SessionResponse(request_id=9).SerializeToString()
    unknown = one + b"\x98\x06\x01"  # field 99, varint 1
    for odd in (twice, unknown, one[:-1]):
        with pytest.raises(Unexpected):
            read_reply(odd)
    got = deserialize(twice)
    assert isinstance(got, kup_pb2.SessionResponse) and got.request_id == 9
    got = deserialize(unknown)
    assert isinstance(got, kup_pb2.SessionResponse) and got.exchanged.message.data == big
    with pytest.raises(Exception, match=r"(?i)pars|decod|truncat"):
        deserialize(one[:-1])


def test_large_payloads_through_kupd(start_kupd: StartKupd) -> None:
    """Both clients, both data paths (exchange, send + receive) through a
    real kupd and kupsim echo with 1 MiB channels: payloads below, at and
    above each hand-path threshold (so kupd.wire and kupclient._wire read
    and write for real), an empty one, and a memoryview."""
    env = dict(os.environ, KUP_PARAM_ECHO_CHANNELS="4", KUP_PARAM_ECHO_PAGES="256")
    # No ASCII a-z: an odd channel upper-cases them.
    alphabet = bytes(b for b in range(256) if not 0x61 <= b <= 0x7A)
    with echo_sim(env=env) as sim:
        k = start_kupd(sim, devices=("echo:0",))
        with k.client() as c, c.open("echo").channel() as ch:
            assert ch.receive(timeout=30).kind == Kind.PASS
            big = (alphabet * (ch.max_msg // len(alphabet) + 1))[: ch.max_msg]
            assert len(big) == 1 << 20
            for n in (0, 100, ENCODE_MIN_BYTES, DECODE_MIN_BYTES, len(big)):
                m = ch.exchange(big[:n], timeout=30)
                assert (m.data, m.kind) == (big[:n], Kind.DATA), n
                ch.send(big[:n])
                assert ch.receive(timeout=30).data == big[:n], n

        async def main() -> None:
            async with AsyncClient(k.socket) as ac:
                ch = await (await ac.open("echo")).channel()
                try:
                    assert (await ch.receive(timeout=30)).kind == Kind.PASS
                    got = await ch.exchange(big, timeout=30)
                    assert got.data == big and got.kind == Kind.DATA
                    await ch.send(memoryview(big)[:DECODE_MIN_BYTES])
                    assert (await ch.receive(timeout=30)).data == big[:DECODE_MIN_BYTES]
                finally:
                    await ch.close()

        asyncio.run(main())

"""Requests protobuf cannot parse (truncated, a length that lies, field 0),
sent as raw bytes on a real kupd's socket.  They used to end every RPC with
UNKNOWN "Unexpected <class 'google.protobuf.message.DecodeError'>", without
the kup-error metadata every kupd error carries, uncounted and unlogged.
Now: INVALID_ARGUMENT naming the RPC (kupd.wire.MalformedRequest, answered
by the service edge); in a Session after its attach, an in-band error and
the stream goes on."""

from __future__ import annotations

from collections.abc import Iterator

import grpc
import pytest
from gateway_helpers import Kupd

from kupapi import kup_pb2
from kupclient._types import target_for

__all__: list[str] = []

#: not a protobuf message: field 1 as a length of 100 with 3 bytes behind it
GARBAGE = b"\x0a\x64abc"


def _raw(c: grpc.Channel, method: str, stream: bool = False) -> grpc.UnaryUnaryMultiCallable:
    path = f"/kup.v1.Kup/{method}"
    if stream:
        return c.unary_stream(path)  # type: ignore[return-value]
    return c.unary_unary(path)


def _kup_error(err: grpc.RpcError) -> str:
    md = dict(err.trailing_metadata() or ())  # type: ignore[attr-defined]
    return str(md.get("kup-error", ""))


@pytest.mark.parametrize(
    ("method", "stream"),
    [("Call", False), ("Attach", False), ("Send", False), ("Receive", False),
     ("Release", False), ("ListDevices", False), ("Watch", True)],
)  # fmt: skip
def test_a_malformed_unary_request_is_invalid_argument(
    kupd: Kupd, method: str, stream: bool
) -> None:
    with grpc.insecure_channel(target_for(kupd.socket)) as c:
        call = _raw(c, method, stream)
        with pytest.raises(grpc.RpcError) as info:
            out = call(GARBAGE, timeout=10)
            if stream:
                list(out)
        err = info.value
        assert err.code() == grpc.StatusCode.INVALID_ARGUMENT, err  # type: ignore[attr-defined]
        details = err.details()  # type: ignore[attr-defined]
        assert f"malformed {method} request (not a kup.v1 message)" in details, details
        assert _kup_error(err) == "InvalidArgument"
    assert 'malformed ' + method in kupd.log()  # logged as any failed RPC


def _frames(*raw: bytes) -> Iterator[bytes]:
    yield from raw


def test_a_malformed_session_request_is_answered_in_band(kupd: Kupd) -> None:
    attach = kup_pb2.SessionRequest(
        request_id=1, attach=kup_pb2.SessionAttach(device="echo", channel=70)
    ).SerializeToString()
    # waits for echo's opening PASS (its worker hands it over after the
    # attach answered: a non-blocking receive could find nothing yet)
    recv = kup_pb2.SessionRequest(
        request_id=3, receive=kup_pb2.SessionReceive(mode=2, timeout_ms=10000)
    )
    big_garbage = b"\x32\xff\xff\x03" + b"x" * 70000  # at kupd.wire's hand size, lying
    with grpc.insecure_channel(target_for(kupd.socket)) as c:
        session = c.stream_stream("/kup.v1.Kup/Session")
        replies = [
            kup_pb2.SessionResponse.FromString(r)
            for r in session(
                _frames(attach, GARBAGE, big_garbage, recv.SerializeToString()), timeout=20
            )
        ]
        assert replies[0].WhichOneof("result") == "attached", replies[0]
        for bad in replies[1:3]:
            assert bad.WhichOneof("result") == "error", bad
            assert bad.error.kind == "InvalidArgument", bad
            assert "malformed Session request" in bad.error.message, bad
        assert replies[3].request_id == 3 and replies[3].received.message.kind == 2  # PASS
        with pytest.raises(grpc.RpcError) as info:
            list(session(_frames(GARBAGE), timeout=10))  # the first frame: no attach
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT  # type: ignore[attr-defined]
        assert "malformed Session request" in info.value.details()  # type: ignore[attr-defined]

"""exchange: send + wait for the reply as ONE request -- the Session's
``exchange`` op (``Channel.exchange``) and the unary ``Send`` with
``wait_reply`` (``Client.lease_exchange``) -- against a real kupd + kupsim
(echo module: unchanged on even channels, upper-cased on odd ones; "!delay"
answered after 300 ms; "!hold" never answered)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

import grpc
import pytest
from gateway_helpers import LOCKHOLD, Kupd, unlock, wait_locked

from kupapi import kup_pb2, kup_pb2_grpc
from kupclient import AsyncClient, Client, Kind
from kupd import errors
from kupd.testing import KupSim


def expected(chan: int, data: bytes) -> bytes:
    return data if chan % 2 == 0 else data.upper()


# ---------------------------------------------------------------- Session


def test_session_exchange_returns_the_reply(client: Client) -> None:
    with client.open("echo").channel(5) as ch:
        assert ch.receive().kind == Kind.PASS  # the kernel's opening hand-over
        for i, data in enumerate((b"hello", b"second", b"x" * ch.max_msg)):
            reply = ch.exchange(data, timeout=10)
            assert reply.kind == Kind.DATA and reply.seq == 2 + i
            assert reply.data == expected(ch.id, data)
        # blocking (no timeout) works too, and the turn is ours again afterwards
        assert ch.exchange(b"block").data == b"BLOCK"
        ch.pass_()
        assert ch.receive(timeout=10).kind == Kind.PASS


def test_session_exchange_mixes_with_send_and_receive(client: Client) -> None:
    with client.open("echo").channel(8) as ch:
        ch.receive()
        ch.send(b"one")
        assert ch.receive(timeout=10).data == b"one"
        assert ch.exchange(b"two", timeout=10).data == b"two"
        ch.send(b"three")
        assert ch.receive(timeout=10).data == b"three"


def test_session_exchange_too_big_sends_nothing(client: Client) -> None:
    with client.open("echo").channel() as ch:
        ch.receive()
        with pytest.raises(errors.TooBig, match=str(ch.max_msg)):
            ch.exchange(b"x" * (ch.max_msg + 1), timeout=10)
        # nothing was sent: the turn is still ours and the session goes on
        reply = ch.exchange(b"after", timeout=10)
        assert reply.data == expected(ch.id, b"after") and reply.seq == 2


def test_session_exchange_not_your_turn(sim: KupSim, client: Client) -> None:
    with client.open("echo").channel() as ch:
        assert ch.receive(timeout=10).kind == Kind.PASS
        ch.send(LOCKHOLD)
        wait_locked(sim, ch.id)
        with pytest.raises(errors.NotYourTurn):
            ch.exchange(b"too early", timeout=10)  # the kernel holds the turn
        unlock(client)
        assert ch.receive(timeout=10).data == expected(ch.id, LOCKHOLD)
        assert ch.exchange(b"now", timeout=10).data == expected(ch.id, b"now")


def test_session_exchange_deadline_leaves_the_reply_owed(client: Client) -> None:
    with client.open("echo").channel() as ch:
        ch.receive()
        with pytest.raises(errors.DeadlineExceeded, match="no message within"):
            ch.exchange(b"!hold", timeout=0.2)  # the module never answers
        # the data went out: the kernel holds the turn, a new send is refused
        with pytest.raises(errors.NotYourTurn):
            ch.exchange(b"again", timeout=10)
        assert ch.try_receive() is None


def test_session_exchange_nonblocking_then_receive(client: Client) -> None:
    with client.open("echo").channel() as ch:
        ch.receive()
        with pytest.raises(errors.NotReady):
            ch.exchange(b"!delay nb", timeout=0)  # sent; the reply comes in 300 ms
        assert ch.receive(timeout=10).data == expected(ch.id, b"!delay nb")


def test_session_exchange_raw_protocol(kupd: Kupd) -> None:
    """The wire shape: one `exchange` request, one `exchanged` response with
    the same request_id; a bad mode is an in-band InvalidArgument."""
    chan = grpc.insecure_channel("unix:" + kupd.socket)
    try:
        stub = kup_pb2_grpc.KupStub(chan)
        reqs = iter(
            [
                kup_pb2.SessionRequest(request_id=1, attach=kup_pb2.SessionAttach(device="echo")),
                kup_pb2.SessionRequest(request_id=2, receive=kup_pb2.SessionReceive()),
                kup_pb2.SessionRequest(
                    request_id=3,
                    exchange=kup_pb2.SessionExchange(data=b"raw", mode=7),  # type: ignore[arg-type]
                ),
                kup_pb2.SessionRequest(
                    request_id=4,
                    exchange=kup_pb2.SessionExchange(
                        data=b"raw", mode=kup_pb2.RECEIVE_MODE_DEADLINE, timeout_ms=10000
                    ),
                ),
            ]
        )
        got = list(stub.Session(reqs, timeout=30))
    finally:
        chan.close()
    assert [r.request_id for r in got] == [1, 2, 3, 4]
    assert got[2].WhichOneof("result") == "error"
    assert got[2].error.kind == "InvalidArgument" and "mode 7" in got[2].error.message
    assert got[3].WhichOneof("result") == "exchanged"
    assert got[3].exchanged.message.data == expected(got[0].attached.channel, b"raw")
    assert got[3].exchanged.message.seq == 2


# ---------------------------------------------------------------- unary lease


def test_lease_exchange_returns_the_reply(client: Client) -> None:
    lease = client.attach("echo", 21)
    try:
        assert client.lease_receive(lease.lease_id).kind == Kind.PASS
        for i, data in enumerate((b"first", b"second")):
            reply = client.lease_exchange(lease.lease_id, data, timeout=10)
            assert (reply.kind, reply.seq, reply.data) == (Kind.DATA, 2 + i, data.upper())
        assert client.lease_exchange(lease.lease_id, b"block").data == b"BLOCK"
    finally:
        client.release(lease.lease_id)


def test_lease_exchange_too_big_and_not_your_turn(sim: KupSim, client: Client) -> None:
    lease = client.attach("echo")
    try:
        client.lease_receive(lease.lease_id)
        client.lease_send(lease.lease_id, LOCKHOLD)
        wait_locked(sim, lease.channel)
        with pytest.raises(errors.NotYourTurn):
            client.lease_exchange(lease.lease_id, b"early", timeout=10)  # kernel's turn
        unlock(client)
        assert client.lease_receive(lease.lease_id, timeout=10).seq == 2
        with pytest.raises(errors.TooBig, match=str(lease.max_message_bytes)):
            client.lease_exchange(lease.lease_id, b"x" * (lease.max_message_bytes + 1))
        reply = client.lease_exchange(lease.lease_id, b"ok", timeout=10)
        assert reply.seq == 3  # the refused messages were never sent
    finally:
        client.release(lease.lease_id)


def test_lease_exchange_deadline_leaves_the_reply_owed(client: Client) -> None:
    lease = client.attach("echo")
    try:
        client.lease_receive(lease.lease_id)
        with pytest.raises(errors.DeadlineExceeded, match="no message within"):
            client.lease_exchange(lease.lease_id, b"!hold", timeout=0.2)
        with pytest.raises(errors.NotYourTurn):
            client.lease_send(lease.lease_id, b"again")
        with pytest.raises(errors.NotReady):
            client.lease_receive(lease.lease_id, timeout=0)
    finally:
        client.release(lease.lease_id)


def test_send_without_wait_reply_answers_no_reply(kupd: Kupd) -> None:
    """Old clients: a plain Send is unchanged (empty SendResponse)."""
    chan = grpc.insecure_channel("unix:" + kupd.socket)
    try:
        stub = kup_pb2_grpc.KupStub(chan)
        a = stub.Attach(kup_pb2.AttachRequest(device="echo"), timeout=10)
        stub.Receive(kup_pb2.ReceiveRequest(lease_id=a.lease_id), timeout=10)
        resp = stub.Send(kup_pb2.SendRequest(lease_id=a.lease_id, data=b"plain"), timeout=10)
        assert not resp.HasField("reply")
        r = stub.Receive(kup_pb2.ReceiveRequest(lease_id=a.lease_id), timeout=10)
        assert r.message.data == expected(a.channel, b"plain")
        with pytest.raises(grpc.RpcError) as ei:  # DEADLINE mode needs timeout_ms
            stub.Send(
                kup_pb2.SendRequest(
                    lease_id=a.lease_id,
                    data=b"x",
                    wait_reply=True,
                    reply_mode=kup_pb2.RECEIVE_MODE_DEADLINE,
                ),
                timeout=10,
            )
        assert ei.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "timeout_ms" in (ei.value.details() or "")
    finally:
        chan.close()


# ---------------------------------------------------------------- asyncio client


def test_async_exchange(kupd: Kupd) -> None:
    async def main() -> None:
        async with AsyncClient(kupd.socket) as c:
            ch = await (await c.open("echo")).channel(13)
            async with ch:
                await ch.receive()
                assert (await ch.exchange(b"async", timeout=10)).data == b"ASYNC"
                with pytest.raises(errors.TooBig):
                    await ch.exchange(b"x" * (ch.max_msg + 1))
                with pytest.raises(errors.DeadlineExceeded):
                    await ch.exchange(b"!hold", timeout=0.2)
                with pytest.raises(errors.NotYourTurn):
                    await ch.exchange(b"again", timeout=10)
            lease = await c.attach("echo", 14)
            await c.lease_receive(lease.lease_id)
            reply = await c.lease_exchange(lease.lease_id, b"lease", timeout=10)
            assert (reply.data, reply.seq) == (b"lease", 2)
            await c.release(lease.lease_id)

    asyncio.run(main())


def _until_unread(op: Callable[[], object]) -> str:
    """Run ``op`` until kupd refuses it because the kernel's reply is unread
    (before the reply comes it is refused too, "the kernel holds the turn");
    the refusal's text."""
    deadline = time.monotonic() + 20
    while True:
        with pytest.raises(errors.NotYourTurn) as info:
            op()
        if "unread" in str(info.value):
            return str(info.value)
        assert time.monotonic() < deadline, info.value
        time.sleep(0.02)


def test_kupd_never_drops_an_unread_kernel_message(client: Client) -> None:
    """A lease Send (or a Session send) while the kernel's reply is unread
    used to succeed and drop the reply silently.  kupd refuses it instead
    (NotYourTurn, "receive it first"), the reply stays for the next receive,
    and the conversation goes on."""
    lease = client.attach("echo", 60)
    try:
        assert client.lease_receive(lease.lease_id, timeout=10).kind == Kind.PASS
        client.lease_send(lease.lease_id, b"hello")
        said = _until_unread(lambda: client.lease_send(lease.lease_id, b"again"))
        assert "receive it first" in said, said
        reply = client.lease_receive(lease.lease_id, timeout=10)
        assert (reply.data, reply.seq) == (b"hello", 2)
        assert client.lease_exchange(lease.lease_id, b"again", timeout=10).data == b"again"
    finally:
        client.release(lease.lease_id)
    with client.open("echo").channel(62) as ch:
        assert ch.receive(timeout=10).kind == Kind.PASS
        with pytest.raises(errors.DeadlineExceeded):
            ch.exchange(b"!delay", timeout=0.05)  # the reply is owed to a receive
        _until_unread(lambda: ch.exchange(b"next", timeout=10))
        assert ch.receive(timeout=10).data == b"!delay"  # the session went on
        assert ch.exchange(b"next", timeout=10).data == b"next"

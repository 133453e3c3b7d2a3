"""A client pipelining a Session (many requests written before any response
is read): every response comes in request order with its request_id,
in-band errors in their place; the lease's end, kupd's drain and a cancel
with requests still queued behave as for a single request; and a client
pipelining far beyond what it reads does not make kupd take its requests
off the stream without limit (kupd reads the next request only when the
current one is answered: gRPC's flow control holds the rest).  Real kupd +
kupsim (echo module: even channels echo, odd ones upper-case; "!hold" is
never answered)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import grpc
import grpc.aio
import pytest
from gateway_helpers import Kupd, StartKupd

from kupapi import MAX_GRPC_MESSAGE, kup_pb2, kup_pb2_grpc
from kupclient import Client
from kupclient.admin import AdminClient
from kupd.testing import KupSim, start_kupd, wait_until

OPTS = [
    ("grpc.max_receive_message_length", MAX_GRPC_MESSAGE),
    ("grpc.max_send_message_length", MAX_GRPC_MESSAGE),
]
Req = kup_pb2.SessionRequest


def expected(chan: int, data: bytes) -> bytes:
    return data if chan % 2 == 0 else data.upper()


def attach(rid: int, channel: int) -> Req:
    return Req(request_id=rid, attach=kup_pb2.SessionAttach(device="echo", channel=channel))


def exchange(rid: int, data: bytes, **kw: object) -> Req:
    return Req(request_id=rid, exchange=kup_pb2.SessionExchange(data=data, **kw))  # type: ignore[arg-type]


def receive(rid: int) -> Req:
    return Req(request_id=rid, receive=kup_pb2.SessionReceive())


def send(rid: int, data: bytes) -> Req:
    return Req(request_id=rid, send=kup_pb2.SessionSend(data=data))


async def _session(socket: str, body: Callable[[kup_pb2_grpc.KupStub], object]) -> object:
    async with grpc.aio.insecure_channel("unix:" + socket, options=OPTS) as ch:
        return await body(kup_pb2_grpc.KupStub(ch))  # type: ignore[misc]


async def _held_with_queue(stub: kup_pb2_grpc.KupStub, chan: int, queued: int) -> Any:
    """A Session on ``chan`` whose first exchange is never answered
    ("!hold") with ``queued`` more written behind it and given time to reach
    kupd's side of the stream; the call and the attach response."""
    call = stub.Session(timeout=120)
    await call.write(attach(1, chan))
    await call.write(receive(2))
    attached = await call.read()
    assert attached.WhichOneof("result") == "attached"
    assert (await call.read()).WhichOneof("result") == "received"
    await call.write(exchange(3, b"!hold"))
    for i in range(queued):
        await call.write(exchange(4 + i, b"queued"))
    await asyncio.sleep(0.2)
    return call, attached


def _channel_free(c: Client, chan: int) -> bool:
    (dev,) = c.devices("echo")
    return dev.channels[chan].state == "free"


def test_pipelined_requests_answered_in_order(kupd: Kupd) -> None:
    """Everything written before any response is read: 300 requests mixing
    exchange, send + receive, and in-band errors (bad mode, too big, not your
    turn) in the middle; every response comes in order, with its id, and the
    errors change nothing for the requests after them."""
    chan = 6
    reqs: list[Req] = [attach(1, chan), receive(2)]
    want: list[tuple[str, object]] = [("attached", None), ("received", None)]
    for i in range(300):
        rid = len(reqs) + 1
        data = f"msg {i} ".encode() * (1 + i % 7)
        if i == 100:
            reqs.append(exchange(rid, b"bad", mode=9))
            want.append(("error", "InvalidArgument"))
        elif i == 150:
            reqs.append(exchange(rid, b"x" * 5000))  # > one 4 KiB page
            want.append(("error", "TooBig"))
        elif i == 200:
            reqs.append(receive(rid))  # nothing owed: the turn is ours
            want.append(("error", "NotYourTurn"))
        elif i % 3 == 0:
            reqs.append(send(rid, data))
            want.append(("sent", None))
            reqs.append(receive(rid + 1))
            want.append(("received", expected(chan, data)))
        else:
            reqs.append(exchange(rid, data))
            want.append(("exchanged", expected(chan, data)))

    async def body(stub: kup_pb2_grpc.KupStub) -> list[kup_pb2.SessionResponse]:
        call = stub.Session(timeout=120)
        for r in reqs:
            await call.write(r)
        await call.done_writing()
        return [resp async for resp in call]

    got = asyncio.run(_session(kupd.socket, body))
    assert isinstance(got, list)
    assert [r.request_id for r in got] == [r.request_id for r in reqs]
    seq = 1  # the kernel's opening PASS
    for resp, (kind, what) in zip(got, want, strict=True):
        assert resp.WhichOneof("result") == kind, (resp.request_id, resp)
        if kind == "error":
            assert resp.error.kind == what, resp
        elif kind in ("received", "exchanged"):
            m = resp.received.message if kind == "received" else resp.exchanged.message
            if what is not None:
                seq += 1
                assert (m.data, m.seq) == (what, seq), resp.request_id


def test_cancel_with_requests_queued_frees_the_channel(kupd: Kupd, client: Client) -> None:
    """The first exchange is never answered ("!hold") and 50 more are queued
    behind it; cancelling the stream ends the lease and frees the channel."""
    chan = 9

    async def body(stub: kup_pb2_grpc.KupStub) -> None:
        call, _ = await _held_with_queue(stub, chan, 50)
        call.cancel()
        with pytest.raises(asyncio.CancelledError):
            await call.read()

    asyncio.run(_session(kupd.socket, body))
    wait_until(lambda: _channel_free(client, chan), what=f"channel {chan} free again")
    # kupd serves on: the same channel can be taken and used again (kupd
    # waits for kupsim to renew it)
    with client.open("echo").channel(chan) as ch:
        ch.receive(timeout=10)
        assert ch.exchange(b"again", timeout=10).data == b"AGAIN"


def _admin_kupd(tmp_path: Path, sim: KupSim) -> tuple[Kupd, str]:
    admin = str(tmp_path / "admin.sock")
    conf = tmp_path / "kupd.toml"
    conf.write_text(
        f'socket = "{tmp_path}/kupd.sock"\n'
        f'admin_socket = "{admin}"\n'
        f'kupsim_dir = "{sim.rundir}"\n'
        "[[device]]\n"
        'name = "echo"\n'
        "call_channels = 0\n"
    )
    k = start_kupd(
        config=conf, socket=tmp_path / "kupd.sock", log=tmp_path / "kupd-admin.log", sim=sim
    )
    return k, admin


def test_lease_revoked_with_requests_queued(sim: KupSim, tmp_path: Path) -> None:
    """The lease ends (admin revoke) while one exchange waits and 30 more are
    queued: the stream ends with the lease's error, the queued requests are
    not handled (no response for them)."""
    k, admin = _admin_kupd(tmp_path, sim)
    try:

        async def body(stub: kup_pb2_grpc.KupStub) -> tuple[list[int], grpc.aio.AioRpcError]:
            call, attached = await _held_with_queue(stub, 4, 30)
            lease_id = attached.attached.lease_id
            with AdminClient(admin) as adm:
                await asyncio.to_thread(adm.revoke, lease_id, "pipelining test")
            ids: list[int] = []
            with pytest.raises(grpc.aio.AioRpcError) as ei:
                while (resp := await call.read()) is not grpc.aio.EOF:
                    ids.append(resp.request_id)
            return ids, ei.value

        out = asyncio.run(_session(k.socket, body))
        assert isinstance(out, tuple)
        ids, err = out
        assert ids == []
        assert err.code() == grpc.StatusCode.PERMISSION_DENIED
        assert "admin-revoke: pipelining test" in (err.details() or "")
    finally:
        k.stop()


def test_drain_with_requests_queued(sim: KupSim, start_kupd: StartKupd) -> None:
    """kupd drains (SIGTERM) while an exchange waits with requests queued:
    UNAVAILABLE, as for a single request."""
    k = start_kupd(sim)

    async def body(stub: kup_pb2_grpc.KupStub) -> grpc.aio.AioRpcError:
        call, _ = await _held_with_queue(stub, 14, 30)
        k.terminate()
        with pytest.raises(grpc.aio.AioRpcError) as ei:
            while await call.read() is not grpc.aio.EOF:
                pass
        return ei.value

    err = asyncio.run(_session(k.socket, body))
    assert isinstance(err, grpc.aio.AioRpcError)
    assert err.code() == grpc.StatusCode.UNAVAILABLE, err


def test_pipelining_beyond_the_bound_is_held_back(kupd: Kupd, client: Client) -> None:
    """A client offering 2000 x 64 KiB requests (125 MiB) behind an exchange
    that is never answered: only a bounded number of them leave the client
    (gRPC's flow-control windows), not all, and the session still ends
    cleanly when the client cancels."""
    chan = 12
    payload = b"p" * (64 * 1024)
    offered = 2000
    pulled = 0

    async def requests() -> AsyncIterator[Req]:
        nonlocal pulled
        yield attach(1, chan)
        yield receive(2)
        yield exchange(3, b"!hold")
        for i in range(offered):
            pulled += 1
            yield exchange(4 + i, payload)  # TooBig if ever handled: never is

    async def body(stub: kup_pb2_grpc.KupStub) -> int:
        call = stub.Session(requests(), timeout=120)
        assert (await call.read()).WhichOneof("result") == "attached"
        assert (await call.read()).WhichOneof("result") == "received"
        # wait until the client stops being able to write (bounded wait)
        last, still = -1, 0
        for _ in range(300):
            await asyncio.sleep(0.1)
            if pulled == last:
                still += 1
                if still >= 15:
                    break
            else:
                last, still = pulled, 0
        n = pulled
        call.cancel()
        return n

    n = asyncio.run(_session(kupd.socket, body))
    assert isinstance(n, int)
    assert 0 < n < offered, f"{n} of {offered} requests taken off the client"
    wait_until(lambda: _channel_free(client, chan), what=f"channel {chan} free again")

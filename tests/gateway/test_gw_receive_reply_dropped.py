"""A lease receive given up on after kupd wrote its reply loses nothing.

kupd counts a Receive's reply as delivered once it has written it (one it
could not write stays the lease's: test_gw_receive_undelivered.py).  A
client that gives up after that -- its task cancelled, its deadline past,
interrupted -- but before its gRPC library handed the reply over (the
reply is in, kupd's status is not, so the unary call is not over; or the
cancel was already on its way as kupd wrote) cancels the call, and gRPC
drops the reply with it.  The message was lost, and the lease's next
receive was refused: "this side holds the turn (the kernel's message was
already received)".

Now kupclient names each receive (``receive_id``, random), kupd keeps the
message it answered with until the lease's next operation, and the next
receive of a client that gave up names the one it gave up on
(``again_of``): kupd answers it with the same message.

A program whose receives outlive their client (kupctl: a process per
receive) names them itself: ``lease_receive(receive_id=, again_of=)``.

The window is held open by a proxy (h2stall) between the client and kupd
that passes kupd's reply and holds its status until the client resets the
stream.  Real kupsim (echo), kupd and clients.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import Iterator

import pytest
from gateway_helpers import Kupd, StartKupd
from h2stall import StallProxy

from kupapi import kup_pb2
from kupclient import AsyncClient, Client, Kind, Message
from kupclient.errors import ArgumentError
from kupd import errors
from kupd.testing import KupSim

#: far beyond the test: the lease must not idle out under it
IDLE_TIMEOUT = 600.0


@pytest.fixture
def kupd(sim: KupSim, start_kupd: StartKupd) -> Kupd:
    return start_kupd(sim, "--lease-idle-timeout", str(IDLE_TIMEOUT))


@pytest.fixture
def proxy(kupd: Kupd) -> Iterator[StallProxy]:
    p = StallProxy(kupd.socket + ".stall", kupd.socket)
    yield p
    p.close()


@pytest.fixture
def lease_id(client: Client) -> Iterator[str]:
    """An Attach lease on echo (taken directly, not through the proxy), its
    greeting (a PASS) received."""
    lease = client.attach("echo")
    assert client.lease_receive(lease.lease_id, timeout=30).kind == Kind.PASS
    yield lease.lease_id
    try:
        client.release(lease.lease_id)
    except errors.NotFound:
        pass


def test_an_asyncio_receive_cancelled_after_kupd_wrote_its_reply_gets_it_next(
    client: Client, proxy: StallProxy, lease_id: str
) -> None:
    client.lease_send(lease_id, b"the one message")

    async def main() -> None:
        async with AsyncClient(proxy.path) as c:
            task = asyncio.ensure_future(c.lease_receive(lease_id, timeout=30))
            while not proxy.status_held.is_set():
                assert not task.done(), task
                await asyncio.sleep(0.02)
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            # the call was cancelled, its reply dropped (the reset reaches
            # the proxy's thread in its own time)
            assert await asyncio.to_thread(proxy.reset_seen.wait, 60)
            got = await c.lease_receive(lease_id, timeout=30)
            assert (got.kind, got.data) == (Kind.DATA, b"the one message")
            # exactly once: the turn is this side's, and the lease goes on
            with pytest.raises(errors.NotYourTurn, match="already received"):
                await c.lease_receive(lease_id, timeout=0)
            assert (await c.lease_exchange(lease_id, b"next", timeout=30)).data == b"next"

    asyncio.run(main())


#: The receive's timeout in the deadline test: the message is there, so
#: kupd answers at once and its status is held; the client's gRPC deadline
#: (this + KUPD_GRACE, 5 s) then passes while it is held.  Below the
#: client's ping timeout (10 s): the proxy holds kupd's answer to the ping
#: gRPC sends as the reply comes in, and the client drops a connection
#: whose ping is not answered in time (Unavailable).
SHORT = 1.0


@pytest.mark.parametrize("flavour", ["sync", "asyncio"])
def test_a_lease_exchange_past_its_deadline_after_kupd_wrote_its_reply_gets_it_next(
    client: Client, proxy: StallProxy, lease_id: str, flavour: str
) -> None:
    """The same for Send with wait_reply, given up on by its deadline: the
    reply comes with the lease's next receive."""
    if flavour == "sync":
        with Client(proxy.path) as c:
            with pytest.raises(errors.DeadlineExceeded):
                c.lease_exchange(lease_id, b"request", timeout=SHORT)
            got = c.lease_receive(lease_id, timeout=30)
    else:

        async def main() -> Kind | bytes:
            async with AsyncClient(proxy.path) as c:
                with pytest.raises(errors.DeadlineExceeded):
                    await c.lease_exchange(lease_id, b"request", timeout=SHORT)
                return await c.lease_receive(lease_id, timeout=30)

        got = asyncio.run(main())
    assert proxy.status_held.is_set(), "kupd did not answer within the deadline"
    assert (got.kind, got.data) == (Kind.DATA, b"request")


def test_again_of_names_only_the_previous_operation(client: Client, lease_id: str) -> None:
    """kupd keeps a written reply only until the lease's next operation:
    again_of naming an older receive, or any other name, is a receive like
    any other -- here: refused, the turn being this side's -- and a name
    that is not a name is refused naming the field."""
    stub = client._stub
    client.lease_send(lease_id, b"one")
    first = stub.Receive(
        kup_pb2.ReceiveRequest(
            lease_id=lease_id, mode=kup_pb2.RECEIVE_MODE_BLOCK, receive_id="first"
        ),
        timeout=30,
    )
    assert first.message.data == b"one"
    # its reply reached this caller, which asks again all the same: served
    again = stub.Receive(
        kup_pb2.ReceiveRequest(
            lease_id=lease_id, mode=kup_pb2.RECEIVE_MODE_NONBLOCK, again_of="first"
        ),
        timeout=30,
    )
    assert again.message.data == b"one"
    # that receive was the lease's next operation: "first" is forgotten
    with pytest.raises(errors.NotYourTurn, match="already received"):
        client._unary(
            "Receive",
            kup_pb2.ReceiveRequest(
                lease_id=lease_id, mode=kup_pb2.RECEIVE_MODE_NONBLOCK, again_of="first"
            ),
            30.0,
        )
    for field, bad in (("receive_id", "x" * 65), ("again_of", "no spaces")):
        with pytest.raises(errors.InvalidArgument, match=f"{field} "):
            client._unary(
                "Receive",
                kup_pb2.ReceiveRequest(lease_id=lease_id, **{field: bad}),
                30.0,
            )


@pytest.mark.parametrize("flavour", ["sync", "asyncio"])
def test_a_receive_given_up_on_in_one_client_is_asked_again_from_another(
    kupd: Kupd, proxy: StallProxy, lease_id: str, flavour: str
) -> None:
    """A program whose receives outlive their client (kupctl recv: a new
    process each time) names them itself: ``receive_id`` for the one given
    up on, ``again_of`` in the next client's receive, which gets the same
    message.  The first client had no way to name its receive, the next
    none to ask for it: the message was lost."""
    with Client(kupd.socket) as c:
        c.lease_send(lease_id, b"outlives its client")
    if flavour == "sync":
        with Client(proxy.path) as c:
            with pytest.raises(errors.DeadlineExceeded):
                c.lease_receive(lease_id, timeout=SHORT, receive_id="given-up_1")
        with Client(kupd.socket) as c:
            got = c.lease_receive(lease_id, timeout=30, again_of="given-up_1")
    else:

        async def main() -> Message:
            async with AsyncClient(proxy.path) as c:
                with pytest.raises(errors.DeadlineExceeded):
                    await c.lease_receive(lease_id, timeout=SHORT, receive_id="given-up_1")
            async with AsyncClient(kupd.socket) as c:
                return await c.lease_receive(lease_id, timeout=30, again_of="given-up_1")

        got = asyncio.run(main())
    assert proxy.status_held.is_set(), "kupd did not answer within the deadline"
    assert (got.kind, got.data) == (Kind.DATA, b"outlives its client")


#: what kupd says refusing an operation over the message it kept for NAME
REFUSED = r"has not received the message of its receive {}.*receive it first \(again_of\)"


@pytest.mark.parametrize("flavour", ["sync", "asyncio"])
def test_an_exchange_given_up_on_in_one_client_is_asked_again_from_another(
    kupd: Kupd, proxy: StallProxy, lease_id: str, flavour: str
) -> None:
    """lease_exchange names itself as lease_receive does: ``receive_id``
    for the one given up on, whose reply kupd wrote (the proxy holds its
    status, the client's deadline passes); a fresh client's exchange naming
    it (``again_of``) is refused NotYourTurn, nothing sent, and its
    ``lease_receive(again_of=)`` gets the reply.  Before, lease_exchange
    took no names: its reply was lost with the client, and a fresh
    client's exchange ran over it."""
    refused = REFUSED.format("xchg-1")
    if flavour == "sync":
        with Client(proxy.path) as c:
            with pytest.raises(errors.DeadlineExceeded):
                c.lease_exchange(lease_id, b"request", timeout=SHORT, receive_id="xchg-1")
        with Client(kupd.socket) as c:
            with pytest.raises(errors.NotYourTurn, match=refused):
                c.lease_exchange(lease_id, b"sent anyway", timeout=30, again_of="xchg-1")
            got = c.lease_receive(lease_id, timeout=30, again_of="xchg-1")
            # the turn is this side's: the refused exchange sent nothing
            with pytest.raises(errors.NotYourTurn, match="already received"):
                c.lease_receive(lease_id, timeout=0)
    else:

        async def main() -> Message:
            async with AsyncClient(proxy.path) as c:
                with pytest.raises(errors.DeadlineExceeded):
                    await c.lease_exchange(
                        lease_id, b"request", timeout=SHORT, receive_id="xchg-1"
                    )
            async with AsyncClient(kupd.socket) as c:
                with pytest.raises(errors.NotYourTurn, match=refused):
                    await c.lease_exchange(
                        lease_id, b"sent anyway", timeout=30, again_of="xchg-1"
                    )
                got = await c.lease_receive(lease_id, timeout=30, again_of="xchg-1")
                with pytest.raises(errors.NotYourTurn, match="already received"):
                    await c.lease_receive(lease_id, timeout=0)
                return got

        got = asyncio.run(main())
    assert proxy.status_held.is_set(), "kupd did not answer within the deadline"
    assert (got.kind, got.data) == (Kind.DATA, b"request")


@pytest.mark.parametrize(
    ("kwargs", "needle"),
    [
        ({"receive_id": "no spaces"}, "receive_id 'no spaces': only letters"),
        ({"again_of": "x" * 65}, "again_of of 65 characters: at most 64"),
        ({"again_of": ""}, "again_of must not be empty"),
        ({"receive_id": 7}, "receive_id must be a str, not int"),
    ],
)
def test_a_receive_name_kupd_would_refuse_is_refused_before_it_is_sent(
    client: Client, lease_id: str, kwargs: dict[str, object], needle: str
) -> None:
    """Refused by the client, naming the argument; nothing sent: the lease's
    turn is as it was (the message still to be received)."""
    client.lease_send(lease_id, b"still here")
    with pytest.raises(ArgumentError, match=re.escape(needle)):
        client.lease_receive(lease_id, timeout=30, **kwargs)  # type: ignore[arg-type]
    # lease_exchange's are checked the same way (and its data not sent)
    with pytest.raises(ArgumentError, match=re.escape(needle)):
        client.lease_exchange(lease_id, b"x", timeout=30, **kwargs)  # type: ignore[arg-type]

    async def main() -> None:
        async with AsyncClient(client.path) as c:
            with pytest.raises(ArgumentError, match=re.escape(needle)):
                await c.lease_receive(lease_id, timeout=30, **kwargs)  # type: ignore[arg-type]
            with pytest.raises(ArgumentError, match=re.escape(needle)):
                await c.lease_exchange(
                    lease_id, b"x", timeout=30, **kwargs  # type: ignore[arg-type]
                )

    asyncio.run(main())
    assert client.lease_receive(lease_id, timeout=30).data == b"still here"

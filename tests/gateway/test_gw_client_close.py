"""kupclient's Session channels end cleanly: close() from another thread or
task while a receive waits cancels the stream (kupd releases the lease),
returns at once and fails the receive with a kupd.errors error saying the
channel was closed (an AsyncChannel's close() from another event loop
too); a Channel or AsyncChannel dropped without close() is
released; an AsyncClient serves whichever event loop uses it, one at a time; a send
larger than the channel is TooBig before anything is sent (over gRPC's
own message limit it used to kill the session); a closed Client says so."""

from __future__ import annotations

import asyncio
import gc
import threading
import time
from typing import Any

import pytest
from gateway_helpers import Kupd

from kupapi import MAX_GRPC_MESSAGE
from kupclient import AsyncClient, Client
from kupclient import aio as aio_mod
from kupd import errors
from kupd.testing import wait_until

BOUND = 5.0  # close() and the failing receive: prompt, far below this


def _state(c: Client, chan: int) -> str:
    return c.devices("echo")[0].channels[chan].state


def _wait_free(c: Client, chan: int) -> None:
    wait_until(lambda: _state(c, chan) == "free", what=f"channel {chan} released")


def test_sync_close_from_another_thread_ends_a_blocked_receive(kupd: Kupd) -> None:
    with kupd.client() as c:
        ch = c.open("echo").channel(20)
        ch.receive(timeout=10)  # echo's opening PASS
        ch.send(b"!hold")  # never answered: the receive below waits in kupd
        got: list[BaseException | object] = []

        def receive() -> None:
            try:
                got.append(ch.receive())
            except BaseException as exc:
                got.append(exc)

        t = threading.Thread(target=receive, daemon=True)
        t.start()
        time.sleep(0.3)
        closer = threading.Thread(target=ch.close, daemon=True)
        start = time.monotonic()
        closer.start()
        closer.join(BOUND)
        assert not closer.is_alive(), "close() hung behind the waiting receive"
        t.join(BOUND)
        assert not t.is_alive(), "the receive still waits after close()"
        assert time.monotonic() - start < BOUND
        (exc,) = got
        assert isinstance(exc, errors.InvalidArgument), repr(exc)
        assert "channel 20 of echo was closed" in str(exc)
        with pytest.raises(errors.InvalidArgument, match="channel 20 of echo is closed"):
            ch.send(b"x")
        ch.close()  # again: nothing
        _wait_free(c, 20)


def test_close_after_an_interrupt_that_left_a_reply_owed(kupd: Kupd) -> None:
    """^C landing between an operation's request going out and its read (in
    kupctl session: the KeyboardInterrupt left _op before its handler) left
    the reply owed, and close() half-closed and waited for the stream to
    end -- which kupd, blocked on the kernel for that receive, never did:
    kupctl hung.  The interrupted state is made here by hand: a receive
    request out, its reply never read."""
    from kupapi import kup_pb2
    from kupclient._types import receive_mode

    with kupd.client() as c:
        ch = c.open("echo").channel(25)
        ch.receive(timeout=10)
        ch.send(b"!hold")  # never answered: a receive waits in kupd for good
        mode, ms = receive_mode(None)  # a blocking receive, as kupctl's :recv
        req = kup_pb2.SessionRequest(receive=kup_pb2.SessionReceive(mode=mode, timeout_ms=ms))
        ch._next_id += 1
        req.request_id = ch._next_id
        ch._owed = True  # what _op sets before the put the interrupt followed
        ch._requests.put(req)
        closer = threading.Thread(target=ch.close, daemon=True)
        closer.start()
        closer.join(BOUND)
        assert not closer.is_alive(), "close() waited for a reply kupd cannot give"
        _wait_free(c, 25)


async def _blocked_receive(c: AsyncClient, chan: int) -> tuple[Any, asyncio.Task[Any]]:
    """A Session on echo's ``chan`` and a task blocked in its receive (echo
    never answers "!hold")."""
    ch = await (await c.open("echo")).channel(chan)
    await ch.receive(timeout=10)
    await ch.send(b"!hold")
    pending = asyncio.create_task(ch.receive())
    await asyncio.sleep(0.3)  # the receive is in kupd (a wait, not a timing check)
    return ch, pending


def test_async_close_from_another_task_ends_a_blocked_receive(kupd: Kupd) -> None:
    async def main() -> None:
        async with AsyncClient(kupd.socket) as c:
            ch, pending = await _blocked_receive(c, 21)
            await asyncio.wait_for(ch.close(), BOUND)
            with pytest.raises(errors.InvalidArgument, match="channel 21 of echo was closed"):
                await asyncio.wait_for(pending, BOUND)
            with pytest.raises(errors.InvalidArgument, match="channel 21 of echo is closed"):
                await ch.receive()
            await ch.close()

    asyncio.run(main())
    with kupd.client() as c:
        _wait_free(c, 21)


def test_async_cancelling_the_receivers_task_still_cancels(kupd: Kupd) -> None:
    """The task's own cancellation stays a CancelledError (not 'closed')."""

    async def main() -> None:
        async with AsyncClient(kupd.socket) as c:
            ch, pending = await _blocked_receive(c, 22)
            pending.cancel()
            with pytest.raises(asyncio.CancelledError):
                await pending
            await ch.close()

    asyncio.run(main())
    with kupd.client() as c:
        _wait_free(c, 22)


def test_idle_close_still_frees_the_channel_before_it_returns(kupd: Kupd) -> None:
    with kupd.client() as c:
        with c.open("echo").channel(23) as ch:
            ch.receive(timeout=10)
            assert ch.exchange(b"x", timeout=10).data == b"X"
        assert _state(c, 23) == "free"


def test_a_channel_dropped_without_close_is_released(kupd: Kupd) -> None:
    with kupd.client() as c:
        ch = c.open("echo").channel(24)
        ch.receive(timeout=10)
        assert _state(c, 24) == "session"
        del ch
        gc.collect()
        _wait_free(c, 24)


def test_an_async_channel_dropped_without_close_is_released(kupd: Kupd) -> None:
    async def main() -> None:
        async with AsyncClient(kupd.socket) as c:
            ch = await (await c.open("echo")).channel(25)
            await ch.receive(timeout=10)
            assert (await c.devices("echo"))[0].channels[25].state == "session"
            del ch
            gc.collect()
            for _ in range(100):
                if (await c.devices("echo"))[0].channels[25].state == "free":
                    return
                await asyncio.sleep(0.05)
            raise AssertionError("channel 25 still held after its AsyncChannel was collected")

    asyncio.run(main())


def test_an_async_client_made_outside_a_loop_serves_each_loop_in_turn(kupd: Kupd) -> None:
    """gRPC's aio channel belongs to one event loop: the client makes it in
    the loop that first uses it, and afresh once that loop is closed."""
    c = AsyncClient(kupd.socket)

    async def call() -> bytes:  # (lower(): the pool's odd channels upper-case)
        return (await c.call("echo", b"hi", timeout=10)).data.lower()

    assert asyncio.run(call()) == b"hi"
    assert asyncio.run(call()) == b"hi"  # a second asyncio.run(): a new loop

    async def open_channel() -> Any:
        ch = await (await c.open("echo")).channel(27)
        await ch.receive(timeout=10)
        return ch

    loop = asyncio.new_event_loop()
    try:
        ch = loop.run_until_complete(open_channel())
        other = asyncio.new_event_loop()
        try:
            # the first loop is still open: neither the client nor the
            # channel can serve a second one, and each says so
            with pytest.raises(errors.InvalidArgument, match="in use by another event loop"):
                other.run_until_complete(call())
            with pytest.raises(errors.InvalidArgument, match="channel 27 of echo belongs to"):
                other.run_until_complete(ch.exchange(b"x", timeout=10))
        finally:
            other.close()
        # ... and both still work in their own loop
        assert loop.run_until_complete(ch.exchange(b"x", timeout=10)).data == b"X"
        loop.run_until_complete(ch.close())
        assert loop.run_until_complete(call()) == b"hi"
        loop.run_until_complete(c.close())
    finally:
        loop.close()
    with kupd.client() as sync:
        assert _state(sync, 27) == "free"


def _in_written_op(task: asyncio.Task[Any]) -> bool:
    """Whether ``task`` (an AsyncChannel operation) has written its request
    and waits for the reply (its ``_op``'s ``written``)."""
    coro: Any = task.get_coro()
    while coro is not None:
        frame = getattr(coro, "cr_frame", None)
        if frame is not None and frame.f_code is aio_mod.AsyncChannel._op.__code__:
            return bool(frame.f_locals.get("written", False))
        coro = getattr(coro, "cr_await", None)
    return False


def test_an_async_channel_closed_from_another_loop_ends_its_waiting_operation(
    kupd: Kupd,
) -> None:
    """close() from another event loop, a receive waiting on the channel in
    its own loop: the receive fails "... was closed while the operation
    waited", as with AsyncClient.close() -- not with gRPC's bare
    CancelledError (the stream cancelled under it, unannounced) -- and the
    cancel, handed to the channel's loop, releases the lease."""
    c = AsyncClient(kupd.socket)

    async def open_channel() -> Any:
        ch = await (await c.open("echo")).channel(29)
        await ch.receive(timeout=10)
        await ch.send(b"!hold")  # never answered: the receive below waits in kupd
        return ch

    loop = asyncio.new_event_loop()
    try:
        ch = loop.run_until_complete(open_channel())
        waiter = loop.create_task(ch.receive(timeout=30))
        while not _in_written_op(waiter):
            loop.run_until_complete(asyncio.sleep(0.01))
        other = asyncio.new_event_loop()
        try:
            other.run_until_complete(ch.close())
        finally:
            other.close()
        loop.run_until_complete(asyncio.wait([waiter]))
        exc = waiter.exception()
        assert isinstance(exc, errors.InvalidArgument), repr(exc)
        assert str(exc) == "channel 29 of echo was closed while the operation waited"
        with kupd.client() as sync:
            _wait_free(sync, 29)
        loop.run_until_complete(c.close())
    finally:
        loop.close()


@pytest.mark.parametrize("size", ["max_msg + 1", "over gRPC's limit"])
def test_sync_session_send_too_big_is_refused_before_the_wire(kupd: Kupd, size: str) -> None:
    with kupd.client() as c, c.open("echo").channel(26) as ch:
        ch.receive(timeout=10)
        n = ch.max_msg + 1 if size == "max_msg + 1" else MAX_GRPC_MESSAGE + 1
        for op in (ch.send, lambda d: ch.exchange(d, timeout=10)):
            with pytest.raises(
                errors.TooBig,
                match=rf"^message of {n} bytes exceeds max_message_bytes={ch.max_msg} of "
                r"channel 26 of device echo \(the channel's data area\)$",
            ):
                op(b"." * n)
        # nothing was sent and the session goes on
        reply = ch.exchange(b"after", timeout=10)
        assert reply.data == b"after" and reply.seq == 2


def test_async_session_send_too_big_is_refused_before_the_wire(kupd: Kupd) -> None:
    async def main() -> None:
        async with AsyncClient(kupd.socket) as c:
            ch = await (await c.open("echo")).channel(28)
            async with ch:
                await ch.receive(timeout=10)
                big = b"." * (MAX_GRPC_MESSAGE + 1)
                with pytest.raises(errors.TooBig, match=rf"exceeds max_message_bytes={ch.max_msg}"):
                    await ch.send(big)
                with pytest.raises(errors.TooBig, match=rf"exceeds max_message_bytes={ch.max_msg}"):
                    await ch.exchange(big, timeout=10)
                reply = await ch.exchange(b"after", timeout=10)
                assert reply.data == b"after" and reply.seq == 2

    asyncio.run(main())


def test_a_session_refuses_a_timeout_past_uint32_ms_and_goes_on(kupd: Kupd) -> None:
    with kupd.client() as c, c.open("echo").channel(30) as ch:
        with pytest.raises(ValueError, match=r"timeout must be at most 4294967\.295 seconds"):
            ch.receive(1e10)
        ch.receive(timeout=10)
        with pytest.raises(ValueError, match="timeout must be at most"):
            ch.exchange(b"x", timeout=1e10)
        assert ch.exchange(b"x", timeout=10).data == b"x"


def test_a_closed_client_says_so() -> None:
    c = Client("/nonexistent/kupd.sock")
    c.close()
    for op in (
        lambda: c.devices(),
        lambda: c.call("echo", b"x"),
        lambda: c.health(),
        lambda: c.attach("echo"),
        lambda: c.lease_send("l", b"x"),
        lambda: c.watch(),
        lambda: c.open("echo"),
    ):
        closed = r"client of /nonexistent/kupd\.sock is closed"
        with pytest.raises(errors.InvalidArgument, match=closed):
            op()

    async def main() -> None:
        a = AsyncClient("/nonexistent/kupd.sock")
        await a.close()
        for op in (
            lambda: a.devices(),
            lambda: a.call("echo", b"x"),
            lambda: a.health(),
            lambda: a.lease_receive("l"),
            lambda: a.open("echo"),
        ):
            with pytest.raises(errors.InvalidArgument, match="is closed"):
                await op()
        with pytest.raises(errors.InvalidArgument, match="is closed"):
            async for _ in a.watch():
                pass

    asyncio.run(main())

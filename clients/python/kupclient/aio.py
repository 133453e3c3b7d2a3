"""asyncio kupd client: the same API as :mod:`kupclient.client`, awaitable."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import os
import secrets
import weakref
from collections.abc import AsyncIterator, Awaitable, Callable
from types import TracebackType
from typing import Any

import grpc
import grpc.aio
from grpc_health.v1 import health_pb2, health_pb2_grpc

from kupapi import errors, kup_pb2, kup_pb2_grpc
from kupclient import _fork, _types, _wire
from kupclient._again import ReceiveNames
from kupclient._args import (
    call_timeout_ms,
    channel_arg,
    check_size,
    data_arg,
    device_arg,
    device_filter_arg,
    lease_arg,
    receive_name_arg,
    socket_arg,
)
from kupclient._errors import (
    channel_closed,
    client_closed,
    client_forked,
    error_from_pb,
    error_from_rpc,
    error_from_status,
    kupd_not_answering,
    session_ended,
)
from kupclient._types import (
    CallReply,
    Data,
    DeviceInfo,
    Lease,
    Message,
    Sampled,
    WatchEvent,
    attach_deadline,
    call_reply_from_pb,
    channel_options,
    deadline,
    default_caller,
    device_from_pb,
    lease_from_pb,
    message_from_pb,
    note_channel_bytes,
    receive_mode,
    target_for,
)

__all__ = ["AsyncChannel", "AsyncClient", "AsyncDeviceHandle"]


#: How often a channel's watchdog looks at its waiting operation (seconds).
_TICK = 0.5

#: Why a session the client ended itself is closed (the next operation says so).
CAUSE_CANCELLED = "an operation on it was cancelled (use timeout= to keep the session)"
CAUSE_NO_ANSWER = "kupd did not answer an operation within its timeout plus the grace"


def _cancelled() -> bool:
    """True when the current task itself is being cancelled (not a stream
    cancelled under it by close())."""
    task = asyncio.current_task()
    return task is not None and task.cancelling() > 0


class AsyncClient:
    """``async with AsyncClient(path) as c: await c.call("echo", b"hi")``."""

    def __init__(self, path: str | os.PathLike[str], *, caller: str | None = None) -> None:
        self.path = socket_arg(path)
        self.caller = caller if caller is not None else default_caller()
        self._closed = False  # close(), or a fork (then _forked too)
        #: per lease, the name of its receive the caller gave up on (again_of)
        self._again = ReceiveNames()
        self._forked = False
        self._pid = os.getpid()
        #: each device's channel data area, as ListDevices last said (TooBig's text)
        self._channel_bytes: dict[str, int] = {}
        self._sessions: weakref.WeakSet[AsyncChannel] = weakref.WeakSet()
        #: releases of leases whose attach was given up on (cancelled, past
        #: its deadline), running: a task is only weakly held by the loop
        self._undoing: set[asyncio.Future[object]] = set()
        # gRPC's aio channel belongs to the event loop it is made in, so it is
        # made on first use, in the loop that uses it: an AsyncClient built
        # outside a loop and then used under asyncio.run() works (it failed
        # with "attached to a different loop"), and so does a second
        # asyncio.run() once the first loop is closed.
        self._loop: asyncio.AbstractEventLoop | None = None
        self._grpc: grpc.aio.Channel | None = None
        self._stub_: kup_pb2_grpc.KupStub | None = None
        _fork.track(self)

    def _gone(self, pending: bool = False) -> errors.KupError:
        """The error of an operation once ``_closed`` is set: closed (while
        it waited: ``pending``), or inherited across fork()."""
        if self._forked:
            return client_forked(f"client of {self.path}", self._pid, "AsyncClient")
        return client_closed(self.path, pending)

    def _check_open(self) -> None:
        if self._closed:
            raise self._gone()

    def _after_fork(self) -> None:
        """In a child process (see kupclient._fork): nothing of gRPC's is
        touched, every operation fails naming the fork."""
        self._forked = True
        self._closed = True
        for ch in list(self._sessions):
            ch._after_fork()

    def _bind(self) -> None:
        loop = asyncio.get_running_loop()
        if self._loop is loop:
            return
        if self._loop is not None and not self._loop.is_closed():
            raise errors.InvalidArgument(
                f"client of {self.path} is in use by another event loop"
                " (make one AsyncClient per event loop)"
            )
        # the old loop is closed, and its channel with it: start afresh
        self._grpc = grpc.aio.insecure_channel(target_for(self.path), options=channel_options())
        self._stub_ = kup_pb2_grpc.KupStub(self._grpc)
        self._loop = loop

    @property
    def _channel(self) -> grpc.aio.Channel:
        """gRPC's channel, for this event loop (InvalidArgument once closed)."""
        self._check_open()
        if self._loop is not asyncio.get_running_loop():
            self._bind()
        assert self._grpc is not None
        return self._grpc

    @property
    def _stub(self) -> kup_pb2_grpc.KupStub:
        self._check_open()
        if self._loop is not asyncio.get_running_loop():
            self._bind()
        assert self._stub_ is not None
        return self._stub_

    async def _unary(
        self,
        method: str,
        request: Any,
        timeout: float | None = None,
        given_up: Callable[[Any], Awaitable[object]] | None = None,
    ) -> Any:
        """One unary RPC.  ``given_up(response)``: the caller gave up on an
        RPC that may have done something it will never learn of (attach:
        taken a lease no one knows the id of) -- its task cancelled, or
        past the deadline -- to be undone before the cancellation (or
        DeadlineExceeded) propagates: with its ``response`` when it had
        already succeeded (its answer in, the task not resumed yet), None
        when it may have (gRPC drops the answer of a cancelled call even
        when kupd had written it).  Not for an RPC that failed."""
        stub = self._stub
        call = getattr(stub, method)(request, timeout=timeout)
        try:
            return await call
        except grpc.RpcError as exc:
            if self._closed:  # close() in another task cancelled it
                raise self._gone(pending=True) from None
            if given_up is not None and exc.code() == grpc.StatusCode.DEADLINE_EXCEEDED:
                await self._undo(None, given_up)  # kupd may have answered as it passed
            raise error_from_rpc(exc) from None
        except asyncio.CancelledError:
            if self._closed and not _cancelled():  # close(), not this task cancelled
                raise self._gone(pending=True) from None
            if given_up is not None and not self._closed:
                if not call.done() or call.cancelled():
                    await self._undo(None, given_up)
                elif await call.code() == grpc.StatusCode.OK:  # done: at once
                    await self._undo(await call, given_up)
            raise

    async def _undo(self, resp: Any, given_up: Callable[[Any], Awaitable[object]]) -> None:
        """``given_up(resp)`` in a task of its own, awaited unless the
        caller's task is cancelled (again): then it goes on without it, and
        the CancelledError propagates -- also from a call past its deadline,
        which would otherwise raise DeadlineExceeded and the task's cancel
        be lost (asyncio.timeout, TaskGroup and task.cancelled() rely on
        it)."""
        task = asyncio.ensure_future(given_up(resp))
        self._undoing.add(task)
        task.add_done_callback(self._undoing.discard)
        await asyncio.shield(task)

    async def _attach_given_up(self, attach_id: str, resp: kup_pb2.AttachResponse | None) -> None:
        """Undo an Attach whose caller gave up on it: release its lease (see
        :meth:`kupclient.Client._attach_given_up`), within KUPD_GRACE, best
        effort."""
        req = kup_pb2.ReleaseRequest()
        if resp is not None:
            req.lease_id = resp.lease_id
        else:
            req.attach_id = attach_id
        with contextlib.suppress(grpc.RpcError, errors.KupError):
            await self._stub.Release(req, timeout=_types.KUPD_GRACE)

    async def close(self) -> None:
        """Close the connection and end the client's open sessions: their
        waiting operations, and the client's, fail with InvalidArgument
        "... was closed while the operation waited"; later ones with
        "client of PATH is closed" / "channel N of DEV is closed".

        Resumable, as :meth:`kupclient.Client.close`: each call does all of
        it again (each step a no-op once done), so one interrupted anywhere
        -- a KeyboardInterrupt a signal handler raises in the loop's thread,
        a cancel -- and called again finishes what the first began.  It
        used to return at once when the client was already marked closed,
        and to drop gRPC's channel before closing it: an interrupt after
        the mark and before the sessions were cancelled left their leases
        held for as long as the process lived, and one inside gRPC's close
        left the channel to the collector."""
        if self._forked:
            return  # gRPC's channel belongs to the parent
        self._closed = True
        for session in list(self._sessions):
            session._abort()
        ch = self._grpc
        if ch is not None and self._loop is asyncio.get_running_loop():
            await ch.close()  # again after an interrupt: it goes on from there
        # else: never used, or its loop is gone (and the channel with it)
        self._grpc = self._stub_ = None

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(
        self, t: type[BaseException] | None, v: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()

    async def devices(self, device: str = "") -> list[DeviceInfo]:
        req = kup_pb2.ListDevicesRequest(device=device_filter_arg(device))
        resp = await self._unary("ListDevices", req, 30.0)
        devs = [device_from_pb(d) for d in resp.devices]
        note_channel_bytes(self._channel_bytes, devs)
        return devs

    async def open(self, device: str) -> AsyncDeviceHandle:
        await self.devices(device_arg(device))
        return AsyncDeviceHandle(self, device)

    async def health(self, service: str = "") -> str:
        stub = health_pb2_grpc.HealthStub(self._channel)
        try:
            resp = await stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=30.0)
        except grpc.RpcError as exc:
            if self._closed:
                raise self._gone(pending=True) from None
            raise error_from_rpc(exc) from None
        except asyncio.CancelledError:
            if self._closed and not _cancelled():
                raise self._gone(pending=True) from None
            raise
        name: str = health_pb2.HealthCheckResponse.ServingStatus.Name(resp.status)
        return name

    async def call(self, device: str, data: Data, timeout: float | None = None) -> CallReply:
        req = kup_pb2.CallRequest(
            device=device_arg(device),
            data=data_arg(data),
            timeout_ms=call_timeout_ms(timeout),
            caller=self.caller,
        )
        stub = self._stub
        try:  # the stub directly, not through _unary: this is the hot path
            resp = await stub.Call(req, timeout=deadline(timeout))
        except grpc.RpcError as exc:
            if self._closed:  # close() in another task cancelled it
                raise self._gone(pending=True) from None
            raise error_from_rpc(exc) from None
        except asyncio.CancelledError:
            if self._closed and not _cancelled():  # close(), not this task cancelled
                raise self._gone(pending=True) from None
            raise
        return call_reply_from_pb(resp)

    async def watch(
        self, device: str | None = None, *, initial_state: bool = False
    ) -> AsyncIterator[WatchEvent]:
        """Device and lease events; kupd's shutdown raises Shutdown at the end,
        the client's close() InvalidArgument "... was closed while the
        operation waited" (as for any operation under way)."""
        req = kup_pb2.WatchRequest(device=device_filter_arg(device), initial_state=initial_state)
        call = self._stub.Watch(req)
        try:
            async for ev in call:
                yield WatchEvent.from_pb(ev)
        except grpc.RpcError as exc:
            if exc.code() != grpc.StatusCode.CANCELLED:
                raise error_from_rpc(exc) from None
            if self._closed:
                raise self._gone(pending=True) from None
        except asyncio.CancelledError:
            # close() cancelled the stream (a CancelledError reached the
            # loop of a task nobody cancelled), unless this task is cancelled
            if self._closed and not _cancelled():
                raise self._gone(pending=True) from None
            raise
        finally:
            call.cancel()

    async def attach(
        self, device: str, chan_id: int | None = None, *, timeout: float | None = None
    ) -> Lease:
        """Take a lease on a channel (any free one if ``chan_id`` is None),
        waiting at most ``timeout`` seconds (None: 30 s; see
        :meth:`kupclient.Client.attach`).  Cancelled while it waits (or
        past its deadline), it leaves no lease behind: the RPC is
        cancelled (kupd takes none, or ends one it granted, reason ``caller
        gone``), and the client releases the lease kupd may have granted
        meanwhile -- by its id when the reply came in just as the task was
        cancelled, else by the attach's own random ``attach_id`` -- waiting
        at most KUPD_GRACE for kupd (not at all if the task is cancelled
        again) before the CancelledError propagates."""
        attach_id = secrets.token_hex(16)
        req = kup_pb2.AttachRequest(device=device_arg(device), attach_id=attach_id)
        chan = channel_arg(chan_id)
        if chan is not None:
            req.channel = chan
        wait = attach_deadline(timeout)
        given_up = functools.partial(self._attach_given_up, attach_id)
        return lease_from_pb(await self._unary("Attach", req, wait, given_up))

    async def lease_send(
        self, lease_id: str, data: Data, *, again_of: str | None = None
    ) -> None:
        """Send ``data`` on a lease (see :meth:`kupclient.Client.lease_send`:
        after a receive given up on whose message kupd had written, it is
        NotYourTurn and the next receive gets the message; ``again_of`` as
        there)."""
        lease = lease_arg(lease_id)
        pending = self._again.pending(lease_id)
        ask = receive_name_arg(again_of, "again_of")
        req = kup_pb2.SendRequest(
            lease_id=lease, data=data_arg(data), again_of=pending if ask is None else ask
        )
        await self._unary("Send", req, 30.0)  # NotYourTurn over that message: pending stays
        self._again.succeeded(lease_id, pending)  # it ran: nothing to ask again for

    async def lease_pass(self, lease_id: str, *, again_of: str | None = None) -> None:
        """Pass the turn on a lease without data (see
        :meth:`kupclient.Client.lease_pass`)."""
        lease = lease_arg(lease_id)
        pending = self._again.pending(lease_id)
        ask = receive_name_arg(again_of, "again_of")
        req = kup_pb2.PassRequest(lease_id=lease, again_of=pending if ask is None else ask)
        await self._unary("Pass", req, 30.0)
        self._again.succeeded(lease_id, pending)

    async def _receive_given_up(self, lease_id: str, receive_id: str, _resp: object) -> None:
        """See :meth:`kupclient.Client._receive_given_up`."""
        self._again.given_up(lease_id, receive_id)

    async def lease_receive(
        self,
        lease_id: str,
        timeout: float | None = None,
        *,
        receive_id: str | None = None,
        again_of: str | None = None,
    ) -> Message:
        """Receive on a lease (see :meth:`kupclient.Client.lease_receive`:
        one whose task is cancelled, or past its deadline, loses nothing;
        ``receive_id`` and ``again_of`` as there)."""
        mode, ms = receive_mode(timeout)
        lease = lease_arg(lease_id)
        pending, receive_id, ask = self._again.names(
            lease,
            receive_name_arg(receive_id, "receive_id"),
            receive_name_arg(again_of, "again_of"),
        )
        req = kup_pb2.ReceiveRequest(
            lease_id=lease, mode=mode, timeout_ms=ms, receive_id=receive_id, again_of=ask
        )
        given_up = functools.partial(self._receive_given_up, lease_id, receive_id)
        resp = await self._unary("Receive", req, deadline(timeout), given_up)
        if resp.not_ready:
            # kept: kupd may not have run it (another operation held the
            # lease), and the one given up on may write its reply yet
            raise errors.NotReady(f"lease {lease_id}: no message yet")
        self._again.succeeded(lease_id, pending)
        return message_from_pb(resp.message)

    async def lease_exchange(
        self,
        lease_id: str,
        data: Data,
        timeout: float | None = None,
        *,
        receive_id: str | None = None,
        again_of: str | None = None,
    ) -> Message:
        """Send ``data`` on a lease and wait for the reply, in one RPC (see
        :meth:`kupclient.Client.lease_exchange`; ``receive_id`` and
        ``again_of`` as there)."""
        mode, ms = receive_mode(timeout)
        lease = lease_arg(lease_id)
        pending, receive_id, ask = self._again.names(
            lease,
            receive_name_arg(receive_id, "receive_id"),
            receive_name_arg(again_of, "again_of"),
        )
        req = kup_pb2.SendRequest(
            lease_id=lease,
            data=data_arg(data),
            wait_reply=True,
            reply_mode=mode,
            reply_timeout_ms=ms,
            receive_id=receive_id,
            again_of=ask,  # as lease_send's
        )
        given_up = functools.partial(self._receive_given_up, lease_id, receive_id)
        resp = await self._unary("Send", req, deadline(timeout), given_up)
        self._again.succeeded(lease_id, pending)
        if not resp.HasField("reply"):  # a kupd without wait_reply: it only sent
            return await self.lease_receive(lease_id, timeout)
        if resp.reply.not_ready:
            raise errors.NotReady(f"lease {lease_id}: no message yet")
        return message_from_pb(resp.reply.message)

    async def release(self, lease_id: str) -> None:
        self._again.forget(lease_id)
        await self._unary("Release", kup_pb2.ReleaseRequest(lease_id=lease_arg(lease_id)), 30.0)


class AsyncDeviceHandle:
    """A device seen through kupd (``await client.open(name)``); ``async with``
    as :class:`kupclient.DeviceHandle` is ``with``."""

    def __init__(self, client: AsyncClient, name: str) -> None:
        self.client = client
        self.name = name

    async def info(self) -> DeviceInfo:
        return (await self.client.devices(self.name))[0]

    async def channel(self, chan_id: int | None = None) -> AsyncChannel:
        """Open a Session holding channel ``chan_id`` (None: any free one)."""
        chan_id = channel_arg(chan_id)
        self.client._check_open()
        ch = AsyncChannel(self.client, self.name)
        await ch._attach(chan_id)
        return ch

    async def call(self, data: Data, timeout: float | None = None) -> CallReply:
        return await self.client.call(self.name, data, timeout)

    async def close(self) -> None:
        """Nothing to release: channels are closed one by one."""

    async def __aenter__(self) -> AsyncDeviceHandle:
        return self

    async def __aexit__(
        self, t: type[BaseException] | None, v: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()


def _cancel_dropped(call: grpc.aio.StreamStreamCall, loop: asyncio.AbstractEventLoop) -> None:
    """Cancel the stream of an AsyncChannel collected without close(), or
    closed from another loop, in its own loop (a collection can run in any
    thread).  In that loop, also a call that looks done (see
    :func:`_cancel_under`); from elsewhere, one that looks done because it
    was cancelled here -- gRPC's cancel interrupted in its window may have
    left the core's stream going -- is handed to that loop too: only a call
    that ended by itself is left alone."""
    if loop.is_closed():
        return
    try:
        running = asyncio.get_running_loop()
    except RuntimeError:
        running = None
    if running is loop:
        _cancel_under(call)
    elif not call.done() or _locally_cancelled(call):
        with contextlib.suppress(RuntimeError):  # the loop closed meanwhile
            loop.call_soon_threadsafe(_cancel_under, call)


def _locally_cancelled(call: grpc.aio.StreamStreamCall) -> bool:
    """Whether this process cancelled ``call`` (gRPC's flag, set by its
    cancel() before the core is told; a read, safe from any thread)."""
    cy = getattr(call, "_cython_call", None)
    return cy is not None and bool(cy.is_locally_cancelled())


#: the details of the cancel that kupclient gives again (_cancel_under)
_CANCELLED_AGAIN = "Locally cancelled by application (again: the first cancel was interrupted)"


def _cancel_under(call: grpc.aio.StreamStreamCall) -> None:
    """Cancel a stream an operation may be waiting on.

    gRPC's write() first waits for the call's metadata to be sent, on an
    event that a cancel() does not set: an operation in that wait (the
    attach of a channel just opened) hung for good.  Setting it lets the
    write see the call done and raise (CancelledError).

    Again on a call cancelled before: gRPC's cancel marks the call done
    -- its status set, its done-callbacks (Python code) run -- before it
    cancels the call in gRPC's core, so an interrupt in between (a
    KeyboardInterrupt a signal handler raises in the loop's thread) left a
    call that looks done while its stream goes on, kupd holding the lease,
    and every later cancel() a no-op (AsyncClient.close(), called again,
    did nothing).  The core's cancel is asked for again then (a no-op in
    the core once done)."""
    if not call.done():
        call.cancel()
    else:
        cy = getattr(call, "_cython_call", None)
        if cy is not None and cy.is_locally_cancelled():
            cy.cancel(_CANCELLED_AGAIN)
    sent = getattr(call, "_metadata_sent", None)
    if isinstance(sent, asyncio.Event):
        sent.set()


def _watch(ref: weakref.ref[AsyncChannel]) -> None:
    """An AsyncChannel's watchdog (every _TICK in its loop, while it is open)."""
    ch = ref()
    if ch is None or ch._closed:
        return
    ch._watch(ch._loop.time())
    ch._loop.call_later(_TICK, _watch, ref)


class AsyncChannel(Sampled):
    """One channel held through a Session stream (``await handle.channel()``).

    Cancelling an operation (``task.cancel()``, ``asyncio.wait_for``) ends the
    session: gRPC cancels the stream with it, and the reply would be lost
    anyway.  The next operation says so: "channel N of DEV is closed: an
    operation on it was cancelled".  A ``timeout=`` keeps the session."""

    def __init__(self, client: AsyncClient, device: str) -> None:
        self.device = device
        self._client = client
        self._what = f"session on {device}"
        # the data path's own wire codec (kupclient._wire), not the stub's
        self._call = client._channel.stream_stream(
            _wire.SESSION_METHOD,
            request_serializer=_wire.serialize,
            response_deserializer=_wire.deserialize,
        )()
        self._loop = asyncio.get_running_loop()
        # A channel dropped without close() cancels its stream, so kupd
        # releases the lease: gRPC's own cancel-on-collection never runs for
        # a live stream (gRPC's core keeps its call object alive).
        self._release = weakref.finalize(self, _cancel_dropped, self._call, self._loop)
        self._release.atexit = False
        self._next_id = 0
        self._lock = asyncio.Lock()
        self._closed = False
        self._closing = False  # close() cancelled the stream under a waiting operation
        self._cause = ""  # why the client ended the session itself (the next op says)
        #: the error that ended the session (kupd's, the connection's): raised
        #: again, as session_ended says, by every later operation
        self._ended_by: errors.KupError | None = None
        self._late = 0.0  # the watchdog ended it: kupd did not answer within this bound
        self._owed = False  # a request is out whose reply has not been read
        self._bound: float | None = None  # the waiting operation's timeout + grace
        self._seen = 0  # the watchdog's last sample of _next_id
        self._seen_at = 0.0
        self.id = -1
        self.max_msg = 0
        client._sessions.add(self)
        self._loop.call_later(_TICK, _watch, weakref.ref(self))

    async def _attach(self, chan_id: int | None) -> None:
        attach = kup_pb2.SessionAttach(device=self.device)
        if chan_id is not None:
            attach.channel = chan_id
        try:
            resp = await self._op(kup_pb2.SessionRequest(attach=attach))
        except BaseException:
            await self.close()
            raise
        assert isinstance(resp, kup_pb2.SessionResponse)
        self.lease = lease_from_pb(resp.attached)
        self.id = self.lease.channel
        self.max_msg = self.lease.max_message_bytes
        self._what = f"channel {self.id} of {self.device}"

    def _gone(self, pending: bool = False) -> errors.KupError:
        """The error of an operation on the closed channel."""
        if self._client._forked:
            c = self._client
            return client_forked(f"{self._what} (client of {c.path})", c._pid, "AsyncClient")
        if self._late and pending:
            return kupd_not_answering(self._what, self._late)
        if self._ended_by is not None and not (pending and self._closing):
            return session_ended(self._what, self._ended_by)
        return channel_closed(self._what, pending and self._closing, self._cause)

    def _ended(self, exc: errors.KupError) -> errors.KupError:
        """``exc`` ended the stream: later operations raise it again (its
        class, "... the session already ended with ..."), as kup.js does --
        the admin's reason of a revocation, a device shutting down -- not an
        InvalidArgument "closed" that hides it."""
        self._ended_by = exc
        return exc

    def _abort(self) -> None:
        """AsyncClient.close(): end the session; an operation waiting fails
        with "... was closed while the operation waited"."""
        if not self._closed:
            self._closing = True
            self._closed = True
        _cancel_dropped(self._call, self._loop)

    def _after_fork(self) -> None:
        """In a child process: the stream is the parent's (not cancelled here)."""
        self._closed = True
        self._release.detach()

    def _watch(self, now: float) -> None:
        """End the session when the same operation has waited past its bound."""
        if self._overdue(now):
            self._late = self._bound or 0.0
            self._cause = CAUSE_NO_ANSWER
            self._closed = True
            _cancel_under(self._call)

    async def _op(
        self, req: kup_pb2.SessionRequest | _wire.WireOp, bound: float | None = None
    ) -> kup_pb2.SessionResponse | _wire.WireReply:
        if self._closed:
            raise self._gone()
        if self._loop is not asyncio.get_running_loop():
            raise errors.InvalidArgument(
                f"{self._what} belongs to another event loop (a Session stream"
                " lives in the loop that opened it)"
            )
        async with self._lock:
            if self._closed:
                raise self._gone()
            self._next_id += 1
            req.request_id = self._next_id
            self._bound = bound
            self._owed = True
            written = False
            try:
                await self._call.write(req)
                written = True
                resp = await self._call.read()
                self._owed = False
            except grpc.RpcError as exc:
                self._closed = True
                if self._closing or self._late:
                    raise self._gone(pending=True) from None
                if (
                    not written
                    and exc.code() == grpc.StatusCode.INTERNAL
                    and "Internal error from Core" in (exc.details() or "")
                ):
                    # kupd ended the stream (a revocation, a drain...) as
                    # this request was sent: grpc.aio then reports its own
                    # INTERNAL "Internal error from Core" in place of the
                    # status kupd sent, which is lost
                    raise self._ended(
                        errors.PeerGone(
                            f"{self._what}: kupd ended the session as this request was sent "
                            "(nothing was sent; gRPC did not pass on kupd's reason: a "
                            "revocation, a drain, the device or kupd stopping)"
                        )
                    ) from None
                raise self._ended(error_from_rpc(exc)) from None
            except asyncio.InvalidStateError:
                # gRPC's "RPC already finished": the stream was cancelled
                # (close(), the watchdog) before the write, or kupd ended it
                self._closed = True
                if self._closing or self._late:
                    raise self._gone(pending=True) from None
                code = await self._call.code()
                if (
                    self._ended_by is None
                    and not self._cause
                    and code not in (grpc.StatusCode.OK, grpc.StatusCode.CANCELLED)
                ):
                    raise self._ended(
                        error_from_status(
                            code, await self._call.details(), await self._call.trailing_metadata()
                        )
                    ) from None
                raise self._gone() from None
            except asyncio.CancelledError:
                # gRPC cancels the whole stream with the read: the session is over
                self._call.cancel()
                if (self._closing or self._late) and not _cancelled():
                    # not this task cancelled, but the stream by close()
                    self._closed = True
                    raise self._gone(pending=True) from None
                if not self._closed:
                    self._cause = CAUSE_CANCELLED
                self._closed = True
                raise
            if resp is grpc.aio.EOF:
                self._closed = True
                if self._closing or self._late:
                    raise self._gone(pending=True)
                code = await self._call.code()
                if code != grpc.StatusCode.OK:
                    raise self._ended(
                        error_from_status(
                            code, await self._call.details(), await self._call.trailing_metadata()
                        )
                    )
                raise self._ended(errors.PeerGone(f"{self._what}: session ended"))
        if isinstance(resp, _wire.WireReply):
            return resp
        assert isinstance(resp, kup_pb2.SessionResponse)
        if resp.WhichOneof("result") == "error":
            raise error_from_pb(resp.error)
        return resp

    async def send(self, data: Data) -> None:
        """Send ``data`` (TooBig, and nothing sent, over the channel's ``max_msg``)."""
        check_size(data, self.max_msg, self.id, self.device, self._client._channel_bytes)
        await self._op(_wire.WireOp.send(data))

    async def pass_(self) -> None:
        await self._op(kup_pb2.SessionRequest(pass_turn=kup_pb2.SessionPass()))

    async def receive(self, timeout: float | None = None) -> Message:
        mode, ms = receive_mode(timeout)
        resp = await self._op(
            kup_pb2.SessionRequest(receive=kup_pb2.SessionReceive(mode=mode, timeout_ms=ms)),
            deadline(timeout),
        )
        not_ready, msg = _wire.reply_of(resp, "received")
        if not_ready:
            raise errors.NotReady(f"channel {self.id} of {self.device}: no message yet")
        assert msg is not None  # reply_of: None only when not_ready
        return msg

    async def exchange(self, data: Data, timeout: float | None = None) -> Message:
        """``send(data)`` then ``receive(timeout)`` as one request on the
        stream (see :meth:`kupclient.Channel.exchange`)."""
        mode, ms = receive_mode(timeout)
        check_size(data, self.max_msg, self.id, self.device, self._client._channel_bytes)
        not_ready, msg = _wire.reply_of(
            await self._op(_wire.WireOp.exchange(data, mode, ms), deadline(timeout)), "exchanged"
        )
        if not_ready:
            raise errors.NotReady(f"channel {self.id} of {self.device}: no message yet")
        assert msg is not None  # reply_of: None only when not_ready
        return msg

    async def try_receive(self) -> Message | None:
        try:
            return await self.receive(0)
        except errors.NotReady:
            return None

    async def close(self) -> None:
        """End the session (the lease is released by kupd).

        An operation waiting on the channel in another task (a blocked
        receive) fails with InvalidArgument "... was closed while the
        operation waited"; close() cancels the stream and does not wait."""
        if self._client._forked:
            self._closed = True
            return  # the stream is the parent's
        if self._loop is not asyncio.get_running_loop():
            # closed from another loop: the stream can only be cancelled
            # (in its own loop, if that still runs), as AsyncClient.close()
            # does -- an operation waiting fails "... was closed while the
            # operation waited", not with gRPC's bare CancelledError
            self._abort()
            return
        if self._closed or self._call.done():
            # closed before (or the stream is over): cancel it again, as
            # _cancel_under does -- an earlier cancel interrupted in gRPC's
            # window (the call marked done, the core not told) left the
            # stream open at kupd, and gRPC's cancel() does nothing more
            self._closed = True
            _cancel_under(self._call)
            return
        if self._lock.locked():
            # an operation holds the stream: cancel it under the operation
            self._closing = True
            self._closed = True
            _cancel_under(self._call)
            return
        self._closed = True
        # idle: half-close, and kupd ends the stream once it has let go of
        # the lease, so the channel is free when close() returns -- within
        # KUPD_GRACE: a kupd that does not answer (hung, stopped) gets the
        # stream cancelled instead (the lease goes with it once kupd runs)
        async with self._lock:
            try:
                async with asyncio.timeout(_types.KUPD_GRACE):
                    await self._call.done_writing()
                    while await self._call.read() is not grpc.aio.EOF:
                        pass
            except TimeoutError:
                self._call.cancel()
            except asyncio.CancelledError:
                self._call.cancel()
                if _cancelled() or not self._client._closed:
                    raise
                # else the client's close() cancelled the stream: closed
            except Exception:  # over already (RpcError, "RPC already finished", ...)
                self._call.cancel()

    async def __aenter__(self) -> AsyncChannel:
        return self

    async def __aexit__(
        self, t: type[BaseException] | None, v: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()

"""Synchronous kupd client: libkup's API on top of the kup.v1 gRPC service."""

from __future__ import annotations

import collections
import contextlib
import functools
import os
import queue
import secrets
import threading
import time
import weakref
from collections.abc import Callable, Iterator
from types import TracebackType
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from kupapi import errors, kup_pb2, kup_pb2_grpc
from kupclient import _fork, _start, _types, _wire
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

__all__ = ["Channel", "Client", "DeviceHandle", "Watch"]

_END = object()

#: How often the watchdog looks at the Session operations waiting (seconds).
_TICK = 0.5

#: Why a session the client ended itself is closed (the next operation says so).
CAUSE_INTERRUPTED = "an operation on it was interrupted"
CAUSE_NO_ANSWER = "kupd did not answer an operation within its timeout plus the grace"


class _Watchdog:
    """Bounds the Session operations that have a timeout: one that kupd has
    not answered after timeout + KUPD_GRACE ends its session (DeadlineExceeded).

    A thread, started with the first Channel and ending with the last,
    samples each channel's request id every _TICK: an operation costs no
    clock reads or timers, only the bound stored with its request."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._channels: weakref.WeakSet[Channel] = weakref.WeakSet()
        self._thread: threading.Thread | None = None

    def track(self, ch: Channel) -> None:
        with self._lock:
            self._channels.add(ch)
            if self._thread is None:
                # recorded once started: an interrupt inside start() (a
                # Channel opened in the main thread) may leave no thread,
                # which the next Channel starts, or one more (harmless:
                # the samples are idempotent) -- not one never started
                t = threading.Thread(target=self._run, name="kupclient-watchdog", daemon=True)
                _start.start_thread(t)
                self._thread = t

    def _run(self) -> None:
        while True:
            time.sleep(_TICK)
            with self._lock:
                channels = list(self._channels)
                if not channels:
                    self._thread = None
                    return
            now = time.monotonic()
            for ch in channels:
                ch._watch(now)
            del channels, ch

    def _after_fork(self) -> None:
        # the thread did not survive the fork (and the channels are dead)
        self._lock = threading.Lock()
        self._channels = weakref.WeakSet()
        self._thread = None


_WATCHDOG = _Watchdog()
_fork.at_fork_in_child(_WATCHDOG._after_fork)


class Client:
    """A connection to kupd on a unix socket.

    ``Client(path)``; ``devices()``, ``open(device)``, ``call(...)``,
    ``watch()``, the lease operations and ``health()``.  Errors are
    :mod:`kupd.errors` exceptions.  Use as a context manager or ``close()``.
    """

    def __init__(self, path: str | os.PathLike[str], *, caller: str | None = None) -> None:
        self.path = socket_arg(path)
        self.caller = caller if caller is not None else default_caller()
        self._closed = False  # close(), or a fork (then _forked too)
        #: per lease, the name of its receive the caller gave up on (again_of)
        self._again = ReceiveNames()
        self._forked = False
        self._pid = os.getpid()
        self._lock = threading.Lock()  # close() against a Channel being opened
        #: each device's channel data area, as ListDevices last said (TooBig's text)
        self._channel_bytes: dict[str, int] = {}
        self._sessions: weakref.WeakSet[Channel] = weakref.WeakSet()
        self._channel = grpc.insecure_channel(target_for(self.path), options=channel_options())
        self._stub = kup_pb2_grpc.KupStub(self._channel)
        _fork.track(self)

    # -- plumbing ---------------------------------------------------------
    def _gone(self, pending: bool = False) -> errors.KupError:
        """The error of an operation once ``_closed`` is set: closed (while
        it waited: ``pending``), or inherited across fork()."""
        if self._forked:
            return client_forked(f"client of {self.path}", self._pid)
        return client_closed(self.path, pending)

    def _check_open(self) -> None:
        if self._closed:
            raise self._gone()

    def _unary(
        self, method: str, request: Any, timeout: float | None = None, stub: Any = None
    ) -> Any:
        """A unary RPC (of ``stub``, the client's kupd stub by default).

        From the main thread, through :meth:`_unary_owed`, not gRPC's
        blocking call: that one registers its call with the channel in a
        ``with`` on the channel's condition (cygrpc ``_segregated_call``),
        and an interrupt just as it took the lock (CPython runs a handler
        as ``Condition.__enter__``'s call into C returns) left the lock
        held by the main thread for good: the next call that gRPC's
        polling thread completes -- an attach, a Session -- waited for ever.
        Other threads, where no signal handler runs, keep the blocking call
        (cheaper: no polling thread to start)."""
        if threading.current_thread() is threading.main_thread():
            return self._unary_owed(method, request, timeout, stub=stub)
        self._check_open()
        try:
            return getattr(stub or self._stub, method)(request, timeout=timeout)
        except grpc.RpcError as exc:
            if self._closed:  # close() in another thread cancelled it
                raise self._gone(pending=True) from None
            raise error_from_rpc(exc) from None
        except ValueError:
            if self._closed:  # gRPC's "Cannot invoke RPC on closed channel!"
                raise self._gone(pending=True) from None
            raise

    def _unary_owed(
        self,
        method: str,
        request: Any,
        timeout: float | None,
        given_up: Callable[[Any], object] | None = None,
        stub: Any = None,
    ) -> Any:
        """:meth:`_unary` for an RPC that waits for the kernel's message
        (lease_receive, lease_exchange): one interrupted must leave it owed.

        Through ``.future()``, not gRPC's blocking call: that one waits in C
        and looks for signals only every 200 ms, so a KeyboardInterrupt
        (Ctrl-C, an exception a signal handler raises) surfaced up to 200 ms
        late -- and a reply that came meanwhile was taken by kupd for the
        RPC and lost with it.  Here the interrupt propagates at once, and
        the RPC is cancelled first: kupd leaves the reply for the next
        receive, as with the asyncio client.  (Every RPC from the main
        thread goes this way -- see :meth:`_unary` -- other threads' only
        when they wait for the kernel: gRPC starts a polling thread for a
        future when none is in flight, which with the hand-off to the
        starter thread costs a sync call() about 0.1 ms.)

        The main thread's RPC is started on kupclient's starter thread
        (kupclient._start: an interrupt in the middle of gRPC's start left
        the channel's close(), and later RPCs, waiting for ever).  An
        interrupt of the wait for that start cancels the RPC once started,
        and ``given_up`` undoes what it may have done all the same.

        ``given_up(response)``: the caller gave up on an RPC that may have
        done something it will never learn of (attach: taken a lease no one
        knows the id of), to be undone -- interrupted, or past the deadline
        -- with its ``response`` when it had already succeeded (its answer
        arrived as the caller gave up), None when it may have: gRPC drops
        the answer of a cancelled call even when kupd had written it (it
        came in before the status, or was on its way).  Not for an RPC that
        failed: it did nothing."""
        self._check_open()
        rpc = getattr(stub or self._stub, method)
        undo = None if given_up is None else functools.partial(self._given_up, given_up)
        try:
            return _start.unary(rpc, request, timeout, undo)
        except ValueError:
            if self._closed:  # gRPC's "Cannot invoke RPC on closed channel!"
                raise self._gone(pending=True) from None
            raise
        except grpc.RpcError as exc:
            if self._closed:  # close() in another thread cancelled it
                raise self._gone(pending=True) from None
            if given_up is not None and exc.code() == grpc.StatusCode.DEADLINE_EXCEEDED:
                given_up(None)  # gRPC's own deadline: kupd may have answered as it passed
            raise error_from_rpc(exc) from None
        except grpc.FutureCancelledError:
            if self._closed:  # close() in another thread cancelled it
                raise self._gone(pending=True) from None
            raise errors.SystemFailure(f"{method}: the RPC was cancelled by gRPC") from None

    def _given_up(self, given_up: Callable[[Any], object], resp: Any) -> None:
        """``given_up(resp)`` of an RPC interrupted (:func:`kupclient._start.
        unary`) -- unless it may not have run (None) and close() cancelled
        it: the connection is gone, nothing to undo with."""
        if resp is not None or not self._closed:
            given_up(resp)

    def _attach_given_up(self, attach_id: str, resp: kup_pb2.AttachResponse | None) -> None:
        """Undo an Attach whose caller gave up on it (interrupted, past its
        deadline): release its lease -- by its id when the reply had come
        in, else by the Attach's ``attach_id``, which also ends a lease kupd
        granted and wrote the reply of that gRPC then dropped, and makes
        kupd grant none when it has not yet.  Within KUPD_GRACE, best effort
        (kupd not answering, gone: its idle timeout ends the lease)."""
        req = kup_pb2.ReleaseRequest()
        if resp is not None:
            req.lease_id = resp.lease_id
        else:
            req.attach_id = attach_id
        with contextlib.suppress(errors.KupError, grpc.RpcError, ValueError):
            self._unary("Release", req, _types.KUPD_GRACE)

    def _after_fork(self) -> None:
        """In a child process (see kupclient._fork): nothing of gRPC's is
        touched, every operation fails naming the fork."""
        self._forked = True
        self._closed = True
        for ch in list(self._sessions):
            ch._after_fork()

    def close(self) -> None:
        """Close the connection and end the client's open sessions: their
        waiting operations, and the client's, fail with InvalidArgument
        "... was closed while the operation waited"; later ones with
        "client of PATH is closed" / "channel N of DEV is closed".

        Resumable: each call does all of it again (each step is a no-op
        once done), so a close() interrupted anywhere (Ctrl-C) and called
        again -- by ``with``, by the program -- finishes what the first
        began.  It used to return at once when the client was already
        marked closed, and an interrupt after the mark and before the
        sessions were cancelled left their leases held for as long as the
        process lived."""
        if self._forked:
            return  # gRPC's channel belongs to the parent
        with self._lock:
            self._closed = True
            sessions = list(self._sessions)
        for ch in sessions:
            ch._abort()
        # gRPC's close takes the channel's condition in a ``with``: from the
        # main thread, an interrupt just as the lock was taken left it held,
        # and the next close() waited for ever -- so on the starter thread
        # (kupclient._start), which goes on with it when the main thread is
        # interrupted; a close() after it waits for it there
        _start.start(self._channel.close, _start.ignore)

    def __enter__(self) -> Client:
        return self

    def __exit__(
        self, t: type[BaseException] | None, v: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    # -- devices ----------------------------------------------------------
    def devices(self, device: str = "") -> list[DeviceInfo]:
        """Devices kupd serves (or only ``device``), with channel states."""
        req = kup_pb2.ListDevicesRequest(device=device_filter_arg(device))
        resp = self._unary("ListDevices", req, 30.0)
        devs = [device_from_pb(d) for d in resp.devices]
        note_channel_bytes(self._channel_bytes, devs)
        return devs

    def open(self, device: str) -> DeviceHandle:
        """A handle on ``device`` (checked to exist: NotFound otherwise)."""
        self.devices(device_arg(device))
        return DeviceHandle(self, device)

    def health(self, service: str = "") -> str:
        """The health status name ("SERVING", "NOT_SERVING", ...) of ``service``."""
        self._check_open()
        stub = health_pb2_grpc.HealthStub(self._channel)
        req = health_pb2.HealthCheckRequest(service=service)
        resp = self._unary("Check", req, 30.0, stub=stub)
        name: str = health_pb2.HealthCheckResponse.ServingStatus.Name(resp.status)
        return name

    # -- calls ------------------------------------------------------------
    def call(self, device: str, data: Data, timeout: float | None = None) -> CallReply:
        """Send ``data`` on a pooled channel of ``device`` and return the reply."""
        req = kup_pb2.CallRequest(
            device=device_arg(device),
            data=data_arg(data),
            timeout_ms=call_timeout_ms(timeout),
            caller=self.caller,
        )
        resp = self._unary("Call", req, deadline(timeout))
        return call_reply_from_pb(resp)

    # -- watch ------------------------------------------------------------
    def watch(self, device: str | None = None, *, initial_state: bool = False) -> Watch:
        """Device and lease events (an iterator; ``cancel()`` or ``with`` to stop)."""
        req = kup_pb2.WatchRequest(device=device_filter_arg(device), initial_state=initial_state)
        self._check_open()
        try:
            # started on the starter thread, as a Session's stream
            # (_start_session): gRPC manages it
            if threading.current_thread() is not threading.main_thread():
                return Watch(self._stub.Watch(req), self)
            return _start.start(lambda: _main_watch(self, req), Watch.cancel)
        except ValueError:
            if self._closed:  # gRPC's "Cannot invoke RPC on closed channel!"
                raise self._gone(pending=True) from None
            raise

    # -- leases -----------------------------------------------------------
    def attach(
        self, device: str, chan_id: int | None = None, *, timeout: float | None = None
    ) -> Lease:
        """Take a lease on a channel (any free one if ``chan_id`` is None).

        ``timeout``: how long to wait for it, seconds (a finite number > 0;
        None: ATTACH_DEADLINE, 30 s) -- the RPC's deadline, past which it
        fails DeadlineExceeded.

        Interrupted (KeyboardInterrupt, an exception a signal handler
        raises) or past its deadline, it leaves no lease behind: the RPC is
        cancelled at once (kupd takes no lease for it, or ends the one it
        granted, reason ``caller gone``), and the client releases the lease
        kupd may have granted meanwhile -- by its id when the reply had come
        in, else by the attach's own random ``attach_id`` -- waiting at most
        KUPD_GRACE for kupd, before the interrupt propagates."""
        attach_id = secrets.token_hex(16)
        req = kup_pb2.AttachRequest(device=device_arg(device), attach_id=attach_id)
        chan = channel_arg(chan_id)
        if chan is not None:
            req.channel = chan
        wait = attach_deadline(timeout)
        given_up = functools.partial(self._attach_given_up, attach_id)
        resp = self._unary_owed("Attach", req, wait, given_up)
        try:
            return lease_from_pb(resp)
        except BaseException:  # interrupted before the caller has the lease
            self._attach_given_up(attach_id, resp)
            raise

    def lease_send(self, lease_id: str, data: Data, *, again_of: str | None = None) -> None:
        """Send ``data`` on a lease.  After a receive on the lease given up
        on (interrupted, past its deadline) it carries that receive's name
        (``again_of``): when kupd had written that receive's message, which
        this client then never got, the send is refused -- NotYourTurn,
        nothing sent -- and the next :meth:`lease_receive` gets the message
        (the name stays until then).  :meth:`lease_pass` and
        :meth:`lease_exchange` do the same.

        A program whose receives outlive the client (see
        :meth:`lease_receive`) gives that name itself: ``again_of``, the
        name of the lease's receive given up on, in place of the client's
        own (a bad one is an ArgumentError, before anything is sent)."""
        lease = lease_arg(lease_id)
        pending = self._again.pending(lease_id)
        ask = receive_name_arg(again_of, "again_of")
        req = kup_pb2.SendRequest(
            lease_id=lease, data=data_arg(data), again_of=pending if ask is None else ask
        )
        self._unary("Send", req, 30.0)  # NotYourTurn over that message: pending stays
        self._again.succeeded(lease_id, pending)  # it ran: nothing to ask again for

    def lease_pass(self, lease_id: str, *, again_of: str | None = None) -> None:
        """Pass the turn on a lease without data (``again_of`` as
        :meth:`lease_send`'s)."""
        lease = lease_arg(lease_id)
        pending = self._again.pending(lease_id)
        ask = receive_name_arg(again_of, "again_of")
        req = kup_pb2.PassRequest(lease_id=lease, again_of=pending if ask is None else ask)
        self._unary("Pass", req, 30.0)
        self._again.succeeded(lease_id, pending)

    def _receive_given_up(self, lease_id: str, receive_id: str, _resp: object) -> None:
        """A receive (or exchange) on ``lease_id`` its caller gave up on --
        interrupted, past its deadline: kupd may have written its reply,
        which gRPC then dropped.  The lease's next receive names it
        (again_of), and kupd answers that with the same message if so
        (kupclient._again)."""
        self._again.given_up(lease_id, receive_id)

    def lease_receive(
        self,
        lease_id: str,
        timeout: float | None = None,
        *,
        receive_id: str | None = None,
        again_of: str | None = None,
    ) -> Message:
        """Receive on a lease: None blocks, 0 raises NotReady when nothing is there.

        One given up on (interrupted, past its deadline) loses nothing: a
        message kupd took for it is this lease's next receive's -- also
        one whose reply kupd had written when gRPC dropped it (each receive
        has a random ``receive_id``, and the next one asks for that one's
        message again: ``again_of``, until a receive succeeds: see
        kupclient._again).  Receives on one lease from several threads at
        once race for its messages, and so for this too.

        Within one client, leave ``receive_id`` and ``again_of`` out.  A
        program whose receives outlive the client (a new process each
        time, like ``kupctl recv``) gives them itself: ``receive_id``, the
        name this receive carries (up to 64 of [A-Za-z0-9_-]); ``again_of``,
        the name of the lease's receive given up on -- kupd answers with
        the message it wrote for that one, if it did, else this is a
        receive like any other; this receive then carries that name too,
        unless ``receive_id`` is given.  Either takes the place of the name
        the client would have used.  A bad one is an ArgumentError, before
        anything is sent."""
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
        resp = self._unary_owed("Receive", req, deadline(timeout), given_up)
        if resp.not_ready:
            # kept: kupd may not have run it (another operation held the
            # lease), and the one given up on may write its reply yet
            raise errors.NotReady(f"lease {lease_id}: no message yet")
        self._again.succeeded(lease_id, pending)
        return message_from_pb(resp.message)

    def lease_exchange(
        self,
        lease_id: str,
        data: Data,
        timeout: float | None = None,
        *,
        receive_id: str | None = None,
        again_of: str | None = None,
    ) -> Message:
        """Send ``data`` on a lease and wait for the reply, in one RPC (Send
        with wait_reply).  ``timeout`` as for :meth:`lease_receive`; when the
        wait fails (e.g. DeadlineExceeded) the data was sent and the reply is
        still owed: :meth:`lease_receive` gets it -- also when it was given
        up on (interrupted) as kupd wrote the reply (``receive_id``).

        ``receive_id`` and ``again_of`` (keyword-only; within one client,
        leave them out) as :meth:`lease_receive`'s, for a program whose
        receives outlive the client: ``receive_id`` names the reply this
        exchange waits for, so that the next process's ``lease_receive(...,
        again_of=NAME)`` gets it should this one be given up on after kupd
        wrote it; ``again_of`` names the lease's receive (or exchange) given
        up on -- as in :meth:`lease_send`, the exchange is then refused
        NotYourTurn, nothing sent, while kupd keeps that one's DATA message
        -- and is this exchange's own name too unless ``receive_id`` is
        given.  A bad one is an ArgumentError, before anything is sent."""
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
        resp = self._unary_owed("Send", req, deadline(timeout), given_up)
        self._again.succeeded(lease_id, pending)
        if not resp.HasField("reply"):  # a kupd without wait_reply: it only sent
            return self.lease_receive(lease_id, timeout)
        if resp.reply.not_ready:
            raise errors.NotReady(f"lease {lease_id}: no message yet")
        return message_from_pb(resp.reply.message)

    def release(self, lease_id: str) -> None:
        self._again.forget(lease_id)
        self._unary("Release", kup_pb2.ReleaseRequest(lease_id=lease_arg(lease_id)), 30.0)


class DeviceHandle:
    """A device seen through kupd (``client.open(name)``)."""

    def __init__(self, client: Client, name: str) -> None:
        self.client = client
        self.name = name

    def info(self) -> DeviceInfo:
        return self.client.devices(self.name)[0]

    def channel(self, chan_id: int | None = None) -> Channel:
        """Open a Session holding channel ``chan_id`` (None: any free one)."""
        return Channel(self.client, self.name, channel_arg(chan_id))

    def call(self, data: Data, timeout: float | None = None) -> CallReply:
        return self.client.call(self.name, data, timeout)

    def close(self) -> None:
        """Nothing to release: channels are closed one by one."""

    def __enter__(self) -> DeviceHandle:
        return self

    def __exit__(
        self, t: type[BaseException] | None, v: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()


def _requests_of(q: queue.SimpleQueue[object]) -> Iterator[kup_pb2.SessionRequest | _wire.WireOp]:
    """A Session's request stream: what its Channel puts on ``q``, until _END.

    A function of the queue alone, not a method: gRPC's request thread runs
    it for the life of the stream, and a generator holding the Channel kept
    a Channel dropped without close() alive (and its channel held)."""
    while True:
        item = q.get()
        if item is _END:
            return
        assert isinstance(item, (kup_pb2.SessionRequest, _wire.WireOp))
        yield item


_Response = kup_pb2.SessionResponse | _wire.WireReply


#: How often a response reader waiting for room looks whether its stream
#: was closed (seconds): a bound on how long the thread outlives it.
_ROOM_POLL = 0.1

#: :attr:`_Responses._taken` when nothing is taken
_NOTHING = object()


def _wake(lock: threading.Lock) -> None:
    """Release ``lock`` -- a wake-up signal, not a count: one still
    pending is enough."""
    try:
        lock.release()
    except RuntimeError:  # not taken: the other side is awake already
        pass


class _Responses:
    """A stream's responses, read by a thread of their own
    ("kupclient-session", "kupclient-watch") and handed over through a
    buffer, so that no consumer waits for one inside gRPC: its ``next()``
    on the stream takes the call's condition in a ``with``, and an
    interrupt just as the lock was taken left it held by the main thread
    -- gRPC's polling thread, and with it every call of the client, then
    waited for ever.  The consumer waits on a bare lock the reader
    releases (a wake-up: the buffer is looked at again), and takes a
    response off the buffer with no point in between where a signal
    handler runs (``del`` of an item, a store: no call), keeping it in
    ``_taken`` until it is returned: an interrupt anywhere costs no
    response, the next ``next()`` returns it.

    ``bound``: at most that many responses wait in the buffer, the reader
    blocked with one more in hand -- so it reads no faster than the
    consumer, and gRPC's flow control backs up behind it as it did behind
    a consumer reading the stream itself (kupd ends a watch whose reader
    falls behind).  None: no bound (a Session: at most one response is
    owed at a time).  The hand-off costs nothing measurable for a Session
    (a scratch measurement: a sync exchange 3 % faster than with the main
    thread waiting in gRPC); for a watch see docs/gateway.md.

    Cancelling from the main thread goes through the starter thread
    (kupclient._start): gRPC's cancel takes the same lock in a ``with``."""

    __slots__ = (
        "_bound",
        "_buf",
        "_call",
        "_closed",
        "_convert",
        "_end",
        "_ended",
        "_ready",
        "_room",
        "_taken",
    )

    def __init__(
        self,
        call: Any,
        bound: int | None = None,
        convert: Callable[[Any], Any] | None = None,
    ) -> None:
        self._call = call
        self._bound = bound
        #: applied to each response by the reader: the consumer does
        #: nothing between taking it and returning it
        self._convert = convert
        self._buf: collections.deque[Any] = collections.deque()
        #: what ended the stream (None: its end), once ``_ended``
        self._end: BaseException | None = None
        self._ended = False  # the reader has put its last response
        self._closed = False  # close(): the reader stops waiting for room
        self._ready = threading.Lock()  # released: something to look at
        self._ready.acquire()
        self._room = threading.Lock()  # released: the consumer took one
        self._room.acquire()
        self._taken: Any = _NOTHING

    def read(self) -> None:
        """The reader thread: every response of the stream, then its end."""
        try:
            for resp in self._call:
                if self._bound is not None and not self._wait_room():
                    continue  # closed: dropped, and gRPC's next() ends it
                self._buf.append(resp if self._convert is None else self._convert(resp))
                _wake(self._ready)
        except BaseException as exc:
            self._end = exc
        self._ended = True
        _wake(self._ready)

    def _wait_room(self) -> bool:
        """Until the buffer has room: True; False once the stream is
        closed (``close()``, or cancelled: the client's ``close()``)."""
        assert self._bound is not None
        while len(self._buf) >= self._bound:
            if self._closed or (
                self._call.done() and self._call.code() == grpc.StatusCode.CANCELLED
            ):
                return False
            self._room.acquire(timeout=_ROOM_POLL)
        return True

    def __iter__(self) -> Iterator[Any]:
        return self

    def __next__(self) -> Any:
        item = self._taken
        if item is _NOTHING:
            while not self._buf:
                if self._ended and not self._buf:  # appended before it ended
                    if self._end is None:
                        raise StopIteration
                    raise self._end
                self._ready.acquire()
            item = self._buf[0]
            # no call between these two: no signal handler runs there
            self._taken = item
            del self._buf[0]
            _wake(self._room)
        self._taken = _NOTHING
        return item

    def cancel(self) -> None:
        if threading.current_thread() is threading.main_thread():
            _start.start(self._call.cancel, _start.ignore)
        else:
            self._call.cancel()

    def close(self) -> None:
        """Cancel the stream, and end a reader waiting for room."""
        self._closed = True
        _wake(self._room)
        self.cancel()


class _Stream:
    """A Session channel's stream as its cancel sees it: made, and the
    cancel registered (the Channel's finalizer), before the stream is
    started; :func:`_start_session` sets ``responses`` on the starter
    thread -- where no signal handler runs -- before the start returns, so
    an interrupt anywhere in the main thread after that finds the stream
    there to cancel.  (The finalizer used to be registered with the stream
    once started: interrupted in between, nothing cancelled it.)"""

    __slots__ = ("ended", "requests", "responses")

    def __init__(self) -> None:
        #: what the stream's request thread sends (:func:`_requests_of`)
        self.requests: queue.SimpleQueue[object] = queue.SimpleQueue()
        self.responses: _Responses | None = None  # once started
        self.ended = False  # end() has run to its end on a started stream

    def end(self) -> None:
        """Cancel the stream (kupd then releases its lease) and end its
        request thread.  close() of a channel with an operation waiting,
        and the finalizer of a channel dropped without close().  Before the
        stream has started -- an interrupt of the wait for its start -- only
        the request thread is told to end: the starter cancels the stream
        once started (kupclient._start's abandon)."""
        self.requests.put(_END)
        responses = self.responses
        if responses is not None:
            responses.cancel()
            self.ended = True


def _start_session(channel: grpc.Channel, stream: _Stream) -> _Responses:
    """Start a Session stream whose requests are what is put on
    ``stream.requests``: gRPC manages it (its polling thread), so the main
    thread's is started on kupclient's starter thread (kupclient._start:
    interrupted in the middle of gRPC's start, a call no thread polled for
    left the client's close() waiting for ever), and so is the thread that
    reads its responses (:class:`_Responses`).  ``stream.responses`` is
    set there.  Interrupted, the stream is cancelled once started.  Its
    data path has its own wire codec (kupclient._wire), not the stub's."""
    rpc = channel.stream_stream(
        _wire.SESSION_METHOD,
        request_serializer=_wire.serialize,
        response_deserializer=_wire.deserialize,
    )

    def begin() -> _Responses:
        responses = _Responses(rpc(_requests_of(stream.requests)))
        stream.responses = responses
        threading.Thread(target=responses.read, name="kupclient-session", daemon=True).start()
        return responses

    return _start.start(begin, lambda _: stream.end())


class Channel(Sampled):
    """One channel held through a Session stream for as long as it is open."""

    def __init__(self, client: Client, device: str, chan_id: int | None) -> None:
        client._check_open()
        self.device = device
        self._client = client
        self._what = f"session on {device}"
        self._next_id = 0
        self._lock = threading.Lock()
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
        self._drain_until: float | None = None  # close() waits for kupd until then
        self._seen_at = 0.0
        self.max_msg = 0
        self._stream = _Stream()
        self._requests = self._stream.requests
        # A Channel dropped without close() cancels its stream (nothing
        # else refers to the Channel: see _requests_of) -- registered
        # before the stream starts, so that an interrupt anywhere after the
        # start leaves it to this (the Channel never returned is dropped)
        self._cancel = weakref.finalize(self, self._stream.end)
        self._cancel.atexit = False
        with client._lock:  # not opened on a client being closed
            client._check_open()
            client._sessions.add(self)  # its close() reaches the stream too
            self._responses = _start_session(client._channel, self._stream)
        _WATCHDOG.track(self)
        attach = kup_pb2.SessionAttach(device=device)
        if chan_id is not None:
            attach.channel = chan_id
        try:
            resp = self._op(kup_pb2.SessionRequest(attach=attach))
        except BaseException:
            self.close()
            raise
        assert isinstance(resp, kup_pb2.SessionResponse)
        self.lease = lease_from_pb(resp.attached)
        self.id = self.lease.channel
        self.max_msg = self.lease.max_message_bytes
        self._what = f"channel {self.id} of {device}"

    def _gone(self, pending: bool = False) -> errors.KupError:
        """The error of an operation on the closed channel."""
        if self._client._forked:
            c = self._client
            return client_forked(f"{self._what} (client of {c.path})", c._pid)
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

    def _end_stream(self) -> None:
        """Cancel the stream (kupd releases the lease), also when an earlier
        cancel was interrupted: the finalizer runs only once -- it takes
        itself off weakref's registry before it calls the stream's end --
        so an interrupt in between left the stream open for good, and a
        later close() did nothing.  Done again here until it has run to its
        end."""
        self._cancel()
        if not self._stream.ended:
            self._stream.end()

    def _abort(self) -> None:
        """Client.close(): end the session; an operation waiting fails with
        "... was closed while the operation waited"."""
        if not self._closed:
            self._closing = True
            self._closed = True
        self._end_stream()

    def _after_fork(self) -> None:
        """In a child process: the stream is the parent's (not cancelled here)."""
        self._closed = True
        self._cancel.detach()
        self._stream.ended = True  # nor by _end_stream

    def _watch(self, now: float) -> None:
        """The watchdog's sample (see _Watchdog): end the session when the
        same operation has waited past its bound."""
        if self._drain_until is not None and now > self._drain_until:
            # close()'s wait for kupd to end the stream: kupd is not
            # answering; cancel (close() returns, the lease goes with the
            # stream once kupd runs again)
            self._drain_until = None
            self._end_stream()
            return
        if not self._closed and self._overdue(now):
            self._late = self._bound or 0.0
            self._cause = CAUSE_NO_ANSWER
            self._closed = True
            self._end_stream()

    def _op(
        self, req: kup_pb2.SessionRequest | _wire.WireOp, bound: float | None = None
    ) -> kup_pb2.SessionResponse | _wire.WireReply:
        if self._closed:  # before the lock: a forked child's may be held for ever
            raise self._gone()
        with self._lock:
            if self._closed:
                raise self._gone()
            self._next_id += 1
            req.request_id = self._next_id
            self._bound = bound
            # owed from the put until next() returns: an interrupt anywhere
            # in between (even before the try below) leaves a reply owed,
            # which close() must not wait for (kupd may wait forever)
            self._owed = True
            self._requests.put(req)
            try:
                resp: _Response = next(self._responses)
                self._owed = False
            except StopIteration:
                self._closed = True
                self._end_stream()
                if self._closing or self._late:
                    raise self._gone(pending=True) from None
                raise self._ended(errors.PeerGone(f"{self._what}: session ended")) from None
            except grpc.RpcError as exc:
                self._closed = True
                self._end_stream()  # the stream is over: end its request thread too
                if self._closing or self._late:
                    raise self._gone(pending=True) from None
                raise self._ended(error_from_rpc(exc)) from None
            except BaseException:
                # Interrupted while waiting (KeyboardInterrupt): the reply is
                # still owed and would answer the next request, so the
                # session cannot go on.  Cancel it (kupd releases the lease).
                if not self._closed:
                    self._cause = CAUSE_INTERRUPTED
                self._closed = True
                self._end_stream()
                raise
        if isinstance(resp, _wire.WireReply):
            return resp
        if resp.WhichOneof("result") == "error":
            raise error_from_pb(resp.error)
        return resp

    def send(self, data: Data) -> None:
        """Send ``data`` and hand the turn to the kernel (TooBig, and nothing
        sent, when it is larger than the channel's ``max_msg``)."""
        check_size(data, self.max_msg, self.id, self.device, self._client._channel_bytes)
        self._op(_wire.WireOp.send(data))

    def pass_(self) -> None:
        """Hand the turn to the kernel without data."""
        self._op(kup_pb2.SessionRequest(pass_turn=kup_pb2.SessionPass()))

    def receive(self, timeout: float | None = None) -> Message:
        """Wait for the kernel's message: None blocks, 0 raises NotReady, >0 seconds."""
        mode, ms = receive_mode(timeout)
        resp = self._op(
            kup_pb2.SessionRequest(receive=kup_pb2.SessionReceive(mode=mode, timeout_ms=ms)),
            deadline(timeout),
        )
        not_ready, msg = _wire.reply_of(resp, "received")
        if not_ready:
            raise errors.NotReady(f"channel {self.id} of {self.device}: no message yet")
        assert msg is not None  # reply_of: None only when not_ready
        return msg

    def exchange(self, data: Data, timeout: float | None = None) -> Message:
        """``send(data)`` then ``receive(timeout)`` as one request on the
        stream (half the messages).  A failed send sent nothing; when the wait
        fails (e.g. DeadlineExceeded) the data was sent and the reply is still
        owed: :meth:`receive` gets it."""
        mode, ms = receive_mode(timeout)
        check_size(data, self.max_msg, self.id, self.device, self._client._channel_bytes)
        resp = self._op(_wire.WireOp.exchange(data, mode, ms), deadline(timeout))
        not_ready, msg = _wire.reply_of(resp, "exchanged")
        if not_ready:
            raise errors.NotReady(f"channel {self.id} of {self.device}: no message yet")
        assert msg is not None  # reply_of: None only when not_ready
        return msg

    def try_receive(self) -> Message | None:
        """Non-blocking receive: the message, or None when the turn is not back."""
        try:
            return self.receive(0)
        except errors.NotReady:
            return None

    def close(self) -> None:
        """End the session (the lease is released by kupd).

        Safe from another thread: an operation waiting on the channel (a
        blocked receive) fails with InvalidArgument "... was closed while the
        operation waited", and close() does not wait for it."""
        if self._client._forked:
            self._closed = True
            return  # the stream is the parent's
        if self._closed:
            self._end_stream()  # no-op unless the stream is still open
            return
        if not self._lock.acquire(blocking=False):
            # an operation holds the stream: cancel it under the operation
            self._closing = True
            self._closed = True
            self._end_stream()
            return
        try:
            if self._closed:
                return
            self._closed = True
            if self._owed:
                # an operation was interrupted after its request went out:
                # kupd may be waiting on the kernel for it (a blocked
                # receive), so the stream would not end: cancel
                return
            # idle: half-close, and kupd ends the stream once it has let go
            # of the lease, so the channel is free when close() returns --
            # within KUPD_GRACE: a kupd that does not answer (hung, stopped)
            # gets the stream cancelled by the watchdog instead
            self._drain_until = time.monotonic() + _types.KUPD_GRACE
            self._requests.put(_END)
            try:
                for _ in self._responses:
                    pass
            except grpc.RpcError:
                pass
        finally:
            self._end_stream()
            self._lock.release()

    def __enter__(self) -> Channel:
        return self

    def __exit__(
        self, t: type[BaseException] | None, v: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()


def _main_watch(client: Client, req: kup_pb2.WatchRequest) -> Watch:
    """A watch for the main thread, started on the starter thread
    (kupclient._start), with the thread that reads its events
    ("kupclient-watch"), one event at a time ahead of the consumer at most
    (:class:`_Responses`): the main thread never waits inside gRPC, where
    an interrupt could leave the call's lock held."""
    call = client._stub.Watch(req)
    responses = _Responses(call, bound=1, convert=WatchEvent.from_pb)
    w = Watch(call, client, responses)
    threading.Thread(target=responses.read, name="kupclient-watch", daemon=True).start()
    return w


class Watch:
    """An iterator of :class:`WatchEvent`; ends when cancelled or kupd stops.

    A kupd shutdown ends the iteration by raising :class:`kupd.errors.Shutdown`
    (after the SERVER_SHUTTING_DOWN event); the client's ``close()`` by
    raising InvalidArgument "client of PATH was closed while the operation
    waited", as any other operation under way then.

    One made in the main thread has its events read by a thread of its own
    (:class:`_Responses`, bounded: it reads ahead of the consumer one event
    at most), ended by ``cancel()``, the client's ``close()``, or the
    Watch dropped unended.
    """

    def __init__(
        self, call: Any, client: Client | None = None, responses: _Responses | None = None
    ) -> None:
        self._call = call
        self._client = client
        self._cancelled = False  # cancel(): the iteration ends quietly
        self._responses = responses
        if responses is not None:
            # dropped unended: its reader thread ends too
            weakref.finalize(self, responses.close)

    def __iter__(self) -> Iterator[WatchEvent]:
        return self

    def __next__(self) -> WatchEvent:
        try:
            if self._responses is not None:
                # what the reader had read is dropped once the watch is
                # ended here, as gRPC drops what it had (attributes read:
                # no point where a signal handler runs)
                if self._cancelled:
                    raise StopIteration
                c = self._client
                if c is not None and c._closed:
                    raise c._gone(pending=True)
                # a call of a Python function, not the builtin next(): a
                # signal handler runs as a call into C returns, and there
                # the event would be lost (the walk's point after next())
                ev: WatchEvent = self._responses.__next__()
                return ev
            return WatchEvent.from_pb(next(self._call))
        except grpc.RpcError as exc:
            if exc.code() == grpc.StatusCode.CANCELLED:
                c = self._client
                if c is not None and c._closed and not self._cancelled:
                    # close() cancelled it (it used to end the loop silently)
                    raise c._gone(pending=True) from None
                raise StopIteration from None
            raise error_from_rpc(exc) from None

    def cancel(self) -> None:
        self._cancelled = True
        if self._responses is not None:
            self._responses.close()  # the main thread's through the starter
        else:
            self._call.cancel()

    def __enter__(self) -> Watch:
        return self

    def __exit__(
        self, t: type[BaseException] | None, v: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.cancel()

"""The kup.v1 gRPC servicer: THIN.  Decode the request, call the session /
call / watch machinery, encode the answer -- and map :mod:`kupd.errors` to
gRPC status codes, in ONE place (:func:`status_for`).

Every error status carries trailing metadata ``kup-error`` (the class name)
and ``kup-code`` (KUP_E_* or 0), so clients map it back to the same class;
a refusal kupd knows the end of (calls_per_second, channel_ops_per_second,
requests_per_second) adds
``kup-retry-after-ms`` (:func:`trailing_for`).
"""

from __future__ import annotations

import asyncio
import functools
import itertools
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from functools import wraps
from typing import Any, TypeVar

import grpc
import grpc.aio
import structlog

from kupapi import kup_pb2, kup_pb2_grpc
from kupapi.defaults import request_name_error
from kupd import errors, sessions
from kupd.abi import Kind
from kupd.calls import Calls
from kupd.channel import Message
from kupd.config import Config
from kupd.devices import PROBE_WAIT, DeviceManager, ManagedDevice
from kupd.log import bind, get_logger
from kupd.metrics import Metrics
from kupd.policy import Budget, Guard, Tenant, current_tenant, socket_retired, use_tenant
from kupd.retirement import StreamGuard, waiting_on
from kupd.sessions import Lease, LeaseTable, Leasing, SessionState
from kupd.watch import EventBus, Watches
from kupd.wire import Handover, MalformedRequest, WireRequest, encode_reply, fill_receive

__all__ = ["KupService", "error_pb", "seed_first", "status_for", "trailing_for"]

log = get_logger("kupd.service")
R = TypeVar("R")

# ---------------------------------------------------------------- the one mapping

_CODES: dict[type[errors.KupError], grpc.StatusCode] = {
    errors.NotFound: grpc.StatusCode.NOT_FOUND,
    errors.Busy: grpc.StatusCode.FAILED_PRECONDITION,
    errors.NotYourTurn: grpc.StatusCode.FAILED_PRECONDITION,
    errors.VersionMismatch: grpc.StatusCode.FAILED_PRECONDITION,
    errors.Shutdown: grpc.StatusCode.UNAVAILABLE,
    errors.Unavailable: grpc.StatusCode.UNAVAILABLE,
    errors.NotReady: grpc.StatusCode.UNAVAILABLE,  # attach before announce
    errors.TooBig: grpc.StatusCode.INVALID_ARGUMENT,
    errors.InvalidArgument: grpc.StatusCode.INVALID_ARGUMENT,
    errors.DeadlineExceeded: grpc.StatusCode.DEADLINE_EXCEEDED,
    errors.PeerGone: grpc.StatusCode.ABORTED,
    errors.ProtocolError: grpc.StatusCode.INTERNAL,
    errors.SystemFailure: grpc.StatusCode.INTERNAL,
    errors.PermissionDenied: grpc.StatusCode.PERMISSION_DENIED,
    errors.ResourceExhausted: grpc.StatusCode.RESOURCE_EXHAUSTED,
}


def status_for(exc: errors.KupError) -> tuple[grpc.StatusCode, str]:
    """The gRPC code and details of a kupd error.  Details start with the
    seed's name of the condition where it has one (``EKU_SHUTDOWN: ...``)."""
    code = grpc.StatusCode.UNKNOWN
    for cls in type(exc).__mro__:
        if cls in _CODES:
            code = _CODES[cls]
            break
    return code, seed_first(exc.seed_name, exc.message)


def trailing_for(exc: errors.KupError) -> tuple[tuple[str, str], ...]:
    """The trailing metadata of a kupd error's status: its class name and
    KUP_E_* code, and, when kupd knows it, the milliseconds until the
    request may be admitted again (``kup-retry-after-ms``)."""
    md: tuple[tuple[str, str], ...] = (
        ("kup-error", type(exc).__name__),
        ("kup-code", str(exc.code)),
    )
    if exc.retry_after_ms is not None:
        md += (("kup-retry-after-ms", str(exc.retry_after_ms)),)
    return md


def seed_first(name: str, details: str) -> str:
    """``details`` starting with the seed's ``name`` (as the API promises),
    once: libkup's text names it after the context ("receive on channel 72
    of device echo: EKU_SHUTDOWN: the device is shutting down"), and that
    inner one moves to the front ("EKU_SHUTDOWN: receive on channel 72 of
    device echo: the device is shutting down")."""
    if not name or details.startswith(name):
        return details
    inner = f": {name}: "
    if inner in details:
        details = details.replace(inner, ": ", 1)
    elif details.endswith(f": {name}"):
        details = details[: -len(name) - 2]
    return f"{name}: {details}"


def error_pb(exc: errors.KupError) -> kup_pb2.Error:
    """A Session's in-band error (same mapping; ``retry_after_ms`` set
    when, and as, :func:`trailing_for` would add kup-retry-after-ms)."""
    code, details = status_for(exc)
    return kup_pb2.Error(
        grpc_code=code.value[0],
        message=details,
        kind=type(exc).__name__,
        kup_code=exc.code,
        retry_after_ms=exc.retry_after_ms,
    )


def _message_pb(m: Message) -> kup_pb2.Message:
    return kup_pb2.Message(data=m.data, kind=int(m.kind), seq=m.seq)  # type: ignore[arg-type]


def _receive_pb(m: Message | None) -> kup_pb2.ReceiveResponse:
    if m is None:
        return kup_pb2.ReceiveResponse(not_ready=True)
    return kup_pb2.ReceiveResponse(message=_message_pb(m))


def _code_name(exc: errors.KupError) -> str:
    """The name of the gRPC code ``exc`` is answered with (what kupd_calls
    counts a failed Call under)."""
    name: str = status_for(exc)[0].name
    return name


_request_ids = itertools.count(1)


def _unary(fn: Callable[..., Awaitable[R]]) -> Callable[..., Awaitable[R]]:
    """Wrap a unary handler: log context, kupd errors -> status (via _abort)."""

    @wraps(fn)
    async def wrapper(self: KupService, request: Any, context: grpc.aio.ServicerContext) -> R:
        structlog.contextvars.clear_contextvars()
        bind(request=next(_request_ids), rpc=fn.__name__)
        try:
            return await fn(self, request, context)
        except errors.KupError as exc:
            await self._abort(context, exc)
            raise AssertionError("unreachable") from None

    return wrapper


def _stream(fn: Callable[..., AsyncIterator[R]]) -> Callable[..., AsyncIterator[R]]:
    """Wrap a server-streaming handler the same way."""

    @wraps(fn)
    async def wrapper(
        self: KupService, request: Any, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[R]:
        structlog.contextvars.clear_contextvars()
        bind(request=next(_request_ids), rpc=fn.__name__)
        self._stream_started()
        try:
            async for item in fn(self, request, context):
                yield item
        except errors.KupError as exc:
            await self._abort(context, exc)
        finally:
            self._stream_ended()

    return wrapper


# Session operation failures reported in-band (the session goes on).
# ResourceExhausted: the one a Session operation can meet is its tenant's
# max_message_bytes, which refuses that message only, as TooBig does.
_IN_BAND = (
    errors.NotYourTurn,
    errors.TooBig,
    errors.ResourceExhausted,
    errors.InvalidArgument,
    errors.DeadlineExceeded,
    errors.Busy,
)

_STATE = {
    "session": kup_pb2.CHANNEL_STATE_SESSION,
    "lease": kup_pb2.CHANNEL_STATE_LEASE,
}


class KupService(kup_pb2_grpc.KupServicer):
    """kup.v1.Kup over the domain layer: :class:`kupd.sessions.Leasing`
    (Attach, Release, Send, Receive, Pass, Session), :class:`kupd.calls.Calls`
    (Call), :class:`kupd.watch.Watches` (Watch), :class:`kupd.policy.Guard`
    (who may see which device)."""

    def __init__(
        self,
        config: Config,
        mgr: DeviceManager,
        leases: LeaseTable,
        bus: EventBus,
        metrics: Metrics,
        drain: asyncio.Future[None],
        guard: Guard | None = None,
    ) -> None:
        #: Tenant policy (kupd.policy): every check and denial goes through it.
        self.guard = guard = guard or Guard()
        self.mgr = mgr
        self.leases = leases
        self.bus = bus
        self.metrics = metrics
        self.drain = drain
        self.leasing = Leasing(config, guard, mgr, leases, drain)
        self.calls = Calls(config, guard, mgr, drain, _code_name)
        self.watches = Watches(guard, mgr, leases, bus, drain, self.leasing.owner_of)
        self._config = config
        self._log_budget = Budget(LOG_FAILURES_PER_SECOND, LOG_FAILURES_BURST)
        # Streams (Session, Watch) whose handler has not returned yet: at
        # SIGTERM kupd ends them with their status (Shutdown) and waits for
        # that status to be handed to gRPC before it stops the server, whose
        # grace period would otherwise cancel a stream that a loaded
        # machine had not scheduled yet (the client then sees CANCELLED
        # instead of kupd's Shutdown).
        self.streams_in_flight = 0
        self.streams_idle = asyncio.Event()
        self.streams_idle.set()

    @property
    def config(self) -> Config:
        """The running config (a reload replaces it: call_timeout is read
        per Call, reattach_grace per attach)."""
        return self._config

    @config.setter
    def config(self, config: Config) -> None:
        self._config = self.leasing.config = self.calls.config = config

    @property
    def calls_in_flight(self) -> int:
        """Calls under way (kupd lets them finish before it stops)."""
        return self.calls.in_flight

    @property
    def calls_idle(self) -> asyncio.Event:
        """Set while no Call is under way."""
        return self.calls.idle

    async def _abort(self, context: grpc.aio.ServicerContext, exc: errors.KupError) -> None:
        code, details = status_for(exc)
        self._count_error(code)
        if len(details) > DETAILS_MAX:  # a client's string may be in it
            details = f"{details[:DETAILS_MAX]}... ({len(details)} characters)"
        # A failed request costs its client nothing: its log line is within
        # a budget per tenant (the rest counted, in kupd_errors_total, and
        # said by the next line)
        tenant = current_tenant().name
        unlogged = self._log_budget.take(tenant)
        # the tenant on every line, not only once a lease bound it: an
        # operator filters the log by tenant to see why it was refused
        if unlogged:
            log.info(
                "rpc failed", code=code.name, error=details, tenant=tenant,
                unlogged_before=unlogged,
            )
        elif unlogged is not None:
            log.info("rpc failed", code=code.name, error=details, tenant=tenant)
        await context.abort(code, details, trailing_metadata=trailing_for(exc))

    async def refuse_malformed(
        self, request: MalformedRequest, context: grpc.aio.ServicerContext
    ) -> None:
        """A unary request protobuf could not parse (kupd.wire.add_kup_servicer):
        INVALID_ARGUMENT naming it, counted and logged as any other."""
        await self._abort_unbound(
            context, errors.InvalidArgument(request.describe()), request.method, {}
        )

    async def _abort_unbound(
        self,
        context: grpc.aio.ServicerContext,
        exc: errors.KupError,
        rpc: str,
        where: dict[str, Any],
    ) -> None:
        """_abort for the RPCs that bind no log context on success (Send,
        Call): bind what a failure is logged with, then abort."""
        structlog.contextvars.clear_contextvars()
        bind(request=next(_request_ids), rpc=rpc, **where)
        await self._abort(context, exc)

    def _stream_started(self) -> None:
        self.streams_in_flight += 1
        self.streams_idle.clear()

    def _stream_ended(self) -> None:
        self.streams_in_flight -= 1
        if self.streams_in_flight == 0:
            self.streams_idle.set()

    def _count_error(self, code: grpc.StatusCode) -> None:
        ctx = structlog.contextvars.get_contextvars()
        device = str(ctx.get("device", ""))
        channel = str(ctx.get("channel", ""))
        self.metrics.errors.labels(device, channel, code.name).inc()

    # ---------------------------------------------------------------- devices
    def _device_pb(self, d: ManagedDevice, t: Tenant) -> kup_pb2.DeviceInfo:
        """``d`` as ``t`` sees it: the Calls of the pool it is shown are its
        own, unless it is the admin's socket or the one tenant of a kupd
        without [[tenant]] tables (scope_device_pb trims the rest)."""
        info = d.info
        drained = d.name in self.guard.drained
        if info is None:
            return kup_pb2.DeviceInfo(name=d.name, reachable=False, error=d.error, drained=drained)
        stalled = ""
        silent_s = 0.0
        if d.stalled_since is not None:
            silent_s = time.monotonic() - d.stalled_since + PROBE_WAIT
            stalled = (
                f"device {d.name} has not answered for {silent_s:.1f} s (its host may be "
                "hung); the state shown is the last it gave"
            )
        out = kup_pb2.DeviceInfo(
            name=d.name,
            reachable=True,
            abi_version=info.abi_version,
            page_size=info.page_size,
            channel_count=info.chan_count,
            announced=info.announced,
            pages_per_channel=info.pages,
            max_message_bytes=info.max_msg,
            notify_gen=info.notify_gen,
            shutting_down=info.shutting_down,
            call_channels=len(d.pool.channels),
            drained=drained,
            error=stalled or d.node_gone or "",
            not_answering_ms=min(int(silent_s * 1000), 2**32 - 1),
            cannot_attach=d.node_gone is not None and not stalled,
        )
        pool = d.pool
        if t.admin or t.plain:  # every Call is the caller's business
            out.calls_in_flight, out.calls_queued = pool.in_flight, pool.queued
        else:  # other tenants' Calls are not: its own only, and it is told so
            group = self.guard.pool_group(t)
            out.calls_in_flight, out.calls_queued = pool.in_flight_of(group), pool.queued_of(group)
            out.calls_tenant = t.name
        attached = set(info.attached)
        module_holds = set(info.module_holds)
        for cid in range(info.chan_count):
            c = out.channels.add(id=cid)
            held = d.holders.get(cid)
            pool_state = d.pool.state_of(cid)
            if held is not None:
                c.state = _STATE[held[0]]
                c.lease_id = held[1]
            elif pool_state is not None:
                c.state = (
                    kup_pb2.CHANNEL_STATE_QUARANTINED
                    if pool_state == "quarantined"
                    else kup_pb2.CHANNEL_STATE_CALLS
                )
            elif cid >= info.announced:
                c.state = kup_pb2.CHANNEL_STATE_NOT_ANNOUNCED
            elif cid in attached:
                c.state = kup_pb2.CHANNEL_STATE_EXTERNAL
            elif cid in module_holds:
                # no user, yet not attachable: its module has not let go
                c.state = kup_pb2.CHANNEL_STATE_MODULE
            else:
                c.state = kup_pb2.CHANNEL_STATE_FREE
        return out

    @_unary
    async def ListDevices(
        self, request: kup_pb2.ListDevicesRequest, context: grpc.aio.ServicerContext
    ) -> kup_pb2.ListDevicesResponse:
        from kupd.tenants import scope_device_pb

        await self.guard.request_turn("list", context.time_remaining(), self.drain, request.device)
        t, devs = self.guard.devices_seen(self.mgr, request.device)
        # a fresh snapshot (and notices a device gone), each device waited
        # for at most PROBE_WAIT: a hung host shows as such, in time
        await asyncio.gather(*(d.probe() for d in devs))
        owner_of = self.leasing.owner_of
        return kup_pb2.ListDevicesResponse(
            devices=[scope_device_pb(self._device_pb(d, t), t, owner_of) for d in devs]
        )

    # ---------------------------------------------------------------- leases
    def _attach_pb(self, lease: Lease, idle_ms: int) -> kup_pb2.AttachResponse:
        return kup_pb2.AttachResponse(
            lease_id=lease.id,
            device=lease.dev.name,
            channel=lease.ch.id,
            max_message_bytes=self.leasing.sendable(lease),
            idle_timeout_ms=idle_ms,
        )

    @_unary
    async def Attach(
        self, request: kup_pb2.AttachRequest, context: grpc.aio.ServicerContext
    ) -> kup_pb2.AttachResponse:
        await self.guard.request_turn("lease", context.time_remaining(), self.drain, request.device)
        chan = request.channel if request.HasField("channel") else None
        attach_id = _attach_id_arg(request.attach_id)
        lease = await self.leasing.attach(request.device, chan, attach_id)
        return self._attach_pb(lease, round(lease.idle_timeout * 1000))

    def undelivered(self, resp: kup_pb2.AttachResponse) -> None:
        """The reply of an Attach could not be written (kupd.wire serves
        Attach so that a reply not written is seen: add_kup_servicer): its
        lease ends now (Leasing.undelivered)."""
        self.leasing.undelivered(resp.lease_id)

    @_unary
    async def Release(
        self, request: kup_pb2.ReleaseRequest, context: grpc.aio.ServicerContext
    ) -> kup_pb2.ReleaseResponse:
        # not paced (requests_per_second): a Release gives back, and one
        # refused for the pace would leave the lease held; an Attach/Release
        # loop is paced at its Attach
        self.leasing.release(request.lease_id, _attach_id_arg(request.attach_id))
        return kup_pb2.ReleaseResponse()

    async def Send(  # type: ignore[override]  # a Handover: kupd.wire serves it
        self,
        request: kup_pb2.SendRequest,
        context: grpc.aio.ServicerContext,
        tenant: Tenant | None = None,
        retired: asyncio.Future[None] | None = None,
    ) -> kup_pb2.SendResponse | Handover:
        # Not @_unary (as Call): a Send that succeeds logs nothing, so the log
        # context (a clear and five contextvars) is bound only when it fails,
        # with the same keys as before.  ``tenant``: TenantKup binds it here
        # instead of through a coroutine of its own (and its socket's
        # retirement, kupd.policy.socket_retired).
        if tenant is not None:
            use_tenant(tenant, retired)
        where: dict[str, Any] = {}
        try:
            leasing = self.leasing
            lease, t = leasing.lease_of(request.lease_id, where)
            receive_id = _attach_id_arg(request.receive_id, "receive_id")
            # the receive its client gave up on: a Send over its kept message
            # is refused (LeaseTable._over_held)
            again_of = _attach_id_arg(request.again_of, "again_of")
            data = request.data  # each read of a bytes field is a copy: once
            if not request.wait_reply:
                await leasing.send(lease, t, data, again_of, context, retired)
                return kup_pb2.SendResponse()
            msg = await leasing.exchange(
                lease, t, data, again_of, request.reply_mode, request.reply_timeout_ms,
                context, retired,
            )
        except errors.KupError as exc:
            await self._abort_unbound(context, exc, "Send", where)
            raise AssertionError("unreachable") from None
        resp = kup_pb2.SendResponse()
        fill_receive(resp.reply, msg)
        return resp if msg is None else self._handover(lease, msg, resp, receive_id)

    @_unary
    async def Pass(
        self, request: kup_pb2.PassRequest, context: grpc.aio.ServicerContext
    ) -> kup_pb2.PassResponse:
        lease, t = self.leasing.lease_of(request.lease_id)
        again_of = _attach_id_arg(request.again_of, "again_of")  # as Send's
        await self.leasing.pass_(lease, t, again_of, context, socket_retired())
        return kup_pb2.PassResponse()

    def _handover(self, lease: Lease, msg: Message, reply: Any, receive_id: str) -> Handover:
        """``reply`` carrying the kernel's ``msg``, taken by a unary Receive
        or Send on ``lease`` whose operation stays the lease's until the
        reply is written (kupd.wire serves them so that one not written is
        seen): one whose caller had gone leaves ``msg`` for the lease's
        next receive instead of losing it, and one written for a named
        receive (``receive_id``) is kept until the lease's next operation,
        for a client that gave up on it all the same (LeaseTable.settle)."""
        return Handover(reply, functools.partial(self.leases.settle, lease, msg, receive_id))

    @_unary
    async def Receive(  # type: ignore[override]  # a Handover: kupd.wire serves it
        self, request: kup_pb2.ReceiveRequest, context: grpc.aio.ServicerContext
    ) -> kup_pb2.ReceiveResponse | Handover:
        lease, t = self.leasing.lease_of(request.lease_id)
        # nothing awaited from here to the wait for the kernel's message
        # (or for the lease's turn, another operation under way on it),
        # unless the tenant's channel_ops_per_second makes it wait its turn
        log.debug("receive", mode=request.mode, timeout_ms=request.timeout_ms)
        paced = t if t.channel_ops_per_second else None
        receive_id = _attach_id_arg(request.receive_id, "receive_id")
        again_of = _attach_id_arg(request.again_of, "again_of")
        msg = await self.leasing.receive(
            lease, request.mode, request.timeout_ms, context, paced, again_of
        )
        resp = _receive_pb(msg)
        return resp if msg is None else self._handover(lease, msg, resp, receive_id)

    # ---------------------------------------------------------------- sessions
    async def Session(  # type: ignore[override]  # the stream's codec is kupd.wire's
        self,
        request_iterator: AsyncIterator[kup_pb2.SessionRequest | WireRequest | MalformedRequest],
        context: grpc.aio.ServicerContext,
        tenant: Tenant | None = None,
        retired: asyncio.Future[None] | None = None,
    ) -> AsyncIterator[kup_pb2.SessionResponse | bytes]:
        """One async generator for the whole stream: what ``_stream`` does
        for the other streams (log context, KupError -> status) and the
        tenant's context (``TenantKup`` passes ``tenant`` and its socket's
        ``retired``) are inlined, since every extra generator layer costs a
        resume per response.  Each request is decoded here and handed to
        one :class:`kupd.sessions.Leasing` method (no coroutine between: a
        data path message costs no more awaits than that method's); its
        reply is encoded here (kupd.wire: the payload copied once; a send /
        exchange request's data is a memoryview of the received bytes when
        kupd.wire read it)."""
        if tenant is not None:
            use_tenant(tenant, retired)  # this RPC's own task (it iterates us)
        structlog.contextvars.clear_contextvars()
        bind(request=next(_request_ids), rpc="Session")
        reader = request_iterator.__aiter__()
        leasing = self.leasing
        guard: StreamGuard | None = None
        lease: Lease | None = None
        reason = "stream ended"
        self._stream_started()
        try:
            leasing.raise_if_draining()
            guard = StreamGuard(self.drain)
            if retired is not None:
                # a reload that retires this socket ends the stream's wait
                # (attached, its lease ends first: socket moved by reload)
                guard.watch(retired)
            counted = leasing.unattached()
            try:
                # not attached yet: no lease a reload could end, so counted
                # as a Session the socket's retirement ends
                with waiting_on(retired, "Session"):
                    first = await leasing.next_request(reader, None, guard, retired)
            finally:
                self.leases.unattached_leave(counted)
            if first is None:
                return
            if isinstance(first, MalformedRequest):
                raise errors.InvalidArgument(first.describe())
            if not isinstance(first, kup_pb2.SessionRequest) or first.WhichOneof("op") != "attach":
                raise errors.InvalidArgument("the first Session request must be attach")
            a = first.attach
            chan = a.channel if a.HasField("channel") else None
            await self.guard.request_turn("session", context.time_remaining(), self.drain, a.device)
            lease = await leasing.take(a.device, chan, "session")
            # A stream cancelled while kupd writes to it leaves this
            # generator where it was (gRPC does not close it): the lease
            # would end only when the generator is collected.  It ends when
            # the RPC does (a no-op when the stream ended by the code below).
            context.add_done_callback(functools.partial(leasing.session_gone, lease))
            guard.watch(lease.ended)
            st = SessionState(context, self.guard, lease)
            yield kup_pb2.SessionResponse(
                request_id=first.request_id, attached=self._attach_pb(lease, 0)
            )
            while True:
                req = await leasing.next_request(reader, lease, guard, retired)
                if req is None:
                    return
                resp: kup_pb2.SessionResponse | bytes
                try:
                    if isinstance(req, MalformedRequest):
                        raise errors.InvalidArgument(req.describe())  # in-band: the stream goes on
                    rid = req.request_id
                    op = req.WhichOneof("op")
                    if op == "exchange":
                        x = req.exchange
                        msg = await leasing.session_exchange(st, x.data, x.mode, x.timeout_ms)
                        resp = encode_reply(rid, True, msg)
                    elif op == "send":
                        await leasing.session_send(st, req.send.data)
                        resp = kup_pb2.SessionResponse(request_id=rid, sent=kup_pb2.SendResponse())
                    else:
                        # kupd.wire reads send / exchange only
                        assert isinstance(req, kup_pb2.SessionRequest)
                        if op == "receive":
                            r = req.receive
                            msg = await leasing.session_receive(st, r.mode, r.timeout_ms)
                            resp = encode_reply(rid, False, msg)
                        elif op == "pass_turn":
                            await leasing.session_pass(st)
                            resp = kup_pb2.SessionResponse(
                                request_id=rid, passed=kup_pb2.PassResponse()
                            )
                        else:
                            st.tenant()  # a removed tenant hears so first, as for the others
                            if op == "attach":
                                raise errors.InvalidArgument(
                                    f"session already holds channel {lease.ch.id} of device "
                                    f"{lease.dev.name}"
                                )
                            raise errors.InvalidArgument("session request without an operation")
                except _IN_BAND as exc:
                    self._count_error(status_for(exc)[0])
                    resp = kup_pb2.SessionResponse(request_id=req.request_id, error=error_pb(exc))
                yield resp
        except errors.KupError as exc:
            # the lease ends before the status goes out
            if lease is not None:
                await leasing.session_failed(lease, exc)
            await self._abort(context, exc)
        except (asyncio.CancelledError, GeneratorExit):
            # GeneratorExit: gRPC left the generator (a write to the stream
            # failed: its client had cancelled or gone) and it is collected
            reason = "stream cancelled"
            raise
        finally:
            if lease is not None:
                self.leases.end(lease, reason)  # no-op if it ended above
            if guard is not None:
                guard.close()
            self._stream_ended()

    # ---------------------------------------------------------------- calls
    async def Call(
        self,
        request: kup_pb2.CallRequest,
        context: grpc.aio.ServicerContext,
        tenant: Tenant | None = None,
        retired: asyncio.Future[None] | None = None,
    ) -> kup_pb2.CallResponse:
        # Not @_unary: binding the log context (structlog contextvars: a clear
        # and five keys) costs about a third of kupd's own Python work per
        # Call, and a Call that succeeds logs nothing.  A failed Call binds
        # the same keys as before (request, rpc; device, caller, tenant once
        # the device was ready) before its status is logged and counted.
        # ``tenant``: TenantKup binds it here, as for Send (and ``retired``,
        # its socket's retirement: a queued Call ends with it, not sent).
        if tenant is not None:
            use_tenant(tenant, retired)
        where: dict[str, Any] = {}
        try:
            msg, chan = await self.calls.call(
                request.device, request.caller, request.data, request.timeout_ms, context,
                where, retired,
            )
        except errors.KupError as exc:
            await self._abort_unbound(context, exc, "Call", where)
            raise AssertionError("unreachable") from None
        resp = kup_pb2.CallResponse(channel=chan)
        reply = resp.reply  # filled in place: no Message built and then copied
        reply.data = msg.data
        reply.kind = int(msg.kind)  # type: ignore[assignment]
        reply.seq = msg.seq
        return resp

    # ---------------------------------------------------------------- watch
    @_stream
    async def Watch(
        self, request: kup_pb2.WatchRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[kup_pb2.WatchEvent]:
        watches = self.watches
        watches.raise_if_draining()  # before the turn: Shutdown wins over the pace
        await self.guard.request_turn("watch", context.time_remaining(), self.drain, request.device)
        t = watches.start(request.device)
        retired = socket_retired()
        with watches.slot(t, request.device), waiting_on(retired, "Watch"):
            async for ev, lease_id, reason in watches.events(
                request.device, request.initial_state, t, retired
            ):
                yield kup_pb2.WatchEvent(
                    type=ev.type,  # type: ignore[arg-type]
                    device=ev.device,
                    channel=ev.channel,
                    lease_id=lease_id,
                    holder=ev.holder,
                    announced=ev.announced,
                    notify_gen=ev.notify_gen,
                    reason=reason,
                    initial=ev.initial,
                    time_unix_ms=ev.time_unix_ms,
                )
        raise errors.Shutdown("kupd is shutting down")


def _attach_id_arg(attach_id: str, field: str = "attach_id") -> str:
    """``attach_id`` of an AttachRequest / ReleaseRequest -- or another name
    a client gives its request, ``field`` -- checked ("" when none) by
    kupapi's rule, which the clients check too (kupclient names its
    requests with 32 hex digits)."""
    why = request_name_error(attach_id, field)
    if why is not None:
        raise errors.InvalidArgument(why)
    return attach_id


#: "rpc failed" lines one tenant gets in kupd's log: a burst, then this many
#: per second (the rest are counted, and the next line says how many)
LOG_FAILURES_PER_SECOND = 10.0
LOG_FAILURES_BURST = 100.0
#: how much of a failed request's error text goes to its client and into
#: kupd's log (a client's string may be in it)
DETAILS_MAX = 1024

# Kind values are the proto's MessageKind values; receive modes its ReceiveMode's.
assert int(Kind.DATA) == kup_pb2.MESSAGE_KIND_DATA
assert int(Kind.PASS) == kup_pb2.MESSAGE_KIND_PASS
assert int(Kind.CLOSE) == kup_pb2.MESSAGE_KIND_CLOSE
assert sessions.RECEIVE_BLOCK == kup_pb2.RECEIVE_MODE_BLOCK
assert sessions.RECEIVE_NONBLOCK == kup_pb2.RECEIVE_MODE_NONBLOCK
assert sessions.RECEIVE_DEADLINE == kup_pb2.RECEIVE_MODE_DEADLINE

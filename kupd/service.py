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
from kupd import errors
from kupd.abi import Kind
from kupd.calls import Calls
from kupd.channel import Message
from kupd.config import Config
from kupd.devices import (
    PROBE_WAIT,
    REATTACH_PAUSE,
    DeviceManager,
    ManagedDevice,
    device_arg,
)
from kupd.log import bind, get_logger
from kupd.metrics import Metrics
from kupd.policy import (
    Budget,
    Guard,
    Tenant,
    check_socket,
    current_tenant,
    raise_if_ended,
    sendable,
    socket_retired,
    use_tenant,
)
from kupd.retirement import StreamGuard, waiting_on
from kupd.sessions import Lease, LeaseTable, no_lease
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


def _code_name(exc: errors.KupError) -> str:
    """The name of the gRPC code ``exc`` is answered with (what kupd_calls
    counts a failed Call under)."""
    name: str = status_for(exc)[0].name
    return name


def _message_pb(m: Message) -> kup_pb2.Message:
    return kup_pb2.Message(data=m.data, kind=int(m.kind), seq=m.seq)  # type: ignore[arg-type]


def _receive_pb(m: Message | None) -> kup_pb2.ReceiveResponse:
    if m is None:
        return kup_pb2.ReceiveResponse(not_ready=True)
    return kup_pb2.ReceiveResponse(message=_message_pb(m))


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


class _SessionState:
    """What a Session's operations look up once per stream rather than once
    per message: whether the RPC has a deadline at all, and the tenant's size
    limit under the policy it was read from (a reload installs a new policy
    object, which makes the next check look the tenant up again)."""

    __slots__ = ("_context", "_deadline", "_policy", "_tenant")

    def __init__(self, context: grpc.aio.ServicerContext, guard: Guard) -> None:
        self._context = context
        self._deadline = context.time_remaining() is not None
        self._policy = guard.policy
        self._tenant = guard.tenant()

    def cap(self, timeout: float | None) -> float | None:
        """``timeout`` capped by the RPC's deadline (as ``_deadline_cap``)."""
        if not self._deadline:
            return timeout
        remaining: float | None = self._context.time_remaining()
        if remaining is None:
            return timeout
        return remaining if timeout is None else min(timeout, remaining)

    def tenant(self, guard: Guard) -> Tenant:
        """The stream's tenant under the running policy (looked up again
        only after a reload)."""
        if guard.policy is not self._policy:
            self._tenant = guard.tenant()  # PermissionDenied if it was removed
            self._policy = guard.policy
        return self._tenant

    def check_size(self, guard: Guard, lease: Lease, n: int) -> None:
        """The tenant's max_message_bytes (``Guard.check_size``)."""
        t = self.tenant(guard)
        if t.max_message_bytes and n > t.max_message_bytes:
            guard.check_size(t, "session", lease.dev.name, lease.ch.id, n)


class KupService(kup_pb2_grpc.KupServicer):
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
        self.calls = Calls(config, guard, mgr, drain, _code_name)
        self._config = config
        self.watches = Watches(guard, mgr, leases, bus, drain, self._owner_of)
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
        self._config = self.calls.config = config

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

    def _unattached(self) -> str:
        """Count a Session stream that has not sent its attach yet (see
        LeaseTable.unattached), refused (ResourceExhausted) when kupd's or
        its tenant's max_sessions is reached.  Returns the tenant's name,
        for LeaseTable.unattached_leave."""
        t = self.guard.caller()
        # a tenant not allowed Sessions at all holds no stream open (and
        # takes no room from the others): refused now, not at its attach
        self.guard.check_op(t, "session")
        if t.max_sessions:  # counting walks every lease: only when there is a limit
            self.guard.check_sessions(t, "session", "", self._open_of(t.name))
        self.leases.check_room(t.name)
        self.leases.unattached_enter(t.name)
        return t.name

    def _open_of(self, tenant: str) -> int:
        """The tenant's leases, attaches under way and Session streams not
        attached yet: what its max_sessions bounds."""
        mine = sum(1 for le in self.leases.leases.values() if le.tenant == tenant)
        return mine + self.guard.pending.get(tenant, 0) + self.leases.unattached.get(tenant, 0)

    def _owner_of(self, lease_id: str) -> str:
        """The tenant of ``lease_id``: an open lease's own, else what the
        guard remembers of an ended one (a bounded record)."""
        lease = self.leases.leases.get(lease_id)
        return lease.tenant if lease is not None else self.guard.owner_of(lease_id)

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

    @staticmethod
    def _deadline_cap(context: grpc.aio.ServicerContext, timeout: float | None) -> float | None:
        remaining: float | None = context.time_remaining()
        if remaining is None:
            return timeout
        return remaining if timeout is None else min(timeout, remaining)

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
        return kup_pb2.ListDevicesResponse(
            devices=[scope_device_pb(self._device_pb(d, t), t, self._owner_of) for d in devs]
        )

    # ---------------------------------------------------------------- leases
    def _attach_pb(self, lease: Lease, idle_ms: int) -> kup_pb2.AttachResponse:
        return kup_pb2.AttachResponse(
            lease_id=lease.id,
            device=lease.dev.name,
            channel=lease.ch.id,
            # what this caller may send: a client sizing its messages by it
            # must not meet its tenant's lower limit
            max_message_bytes=sendable(lease.ch.max_msg, self.guard.tenant()),
            idle_timeout_ms=idle_ms,
        )

    async def _take(self, device: str, chan: int | None, holder: str) -> Lease:
        self._raise_if_draining()
        t = self.guard.caller()
        if not device:
            raise errors.InvalidArgument("attach: device is required")
        device = device_arg(device)
        md = self.mgr.devices.get(device)
        if md is not None:
            # an attach refused below is counted (kupd_errors_total) and
            # logged under its device -- and its channel when there is
            # such a channel: the labels stay bounded by the configuration
            bind(device=device)
            if chan is not None and md.info is not None and chan < md.info.chan_count:
                bind(channel=chan)
        # the socket this request came in on: the tenant's own under the
        # policy it was served by (a reload may have moved it since)
        via = current_tenant().socket
        self.guard.check_op(t, holder, device, chan)
        self.guard.check_drained(device)
        check_socket(t, via)
        if t.max_sessions:
            self.guard.check_sessions(t, holder, device, self._open_of(t.name))
        allowed = self.guard.channels_for(t, device)
        self.guard.pending[t.name] = self.guard.pending.get(t.name, 0) + 1
        try:
            if chan is None and allowed is not None:
                lease = await self._take_granted(device, allowed, holder, t, via)
            else:
                try:
                    lease = await self.leases.take(device, chan, holder, tenant=t.name, via=via)
                except errors.Busy as exc:
                    # the holder's lease id only to its own tenant
                    held = md.holders.get(chan) if md is not None and chan is not None else None
                    if held is None or self._owner_of(held[1]) != t.name:
                        raise
                    raise type(exc)(f"{exc.message}: your {held[0]} {held[1]}") from None
        finally:
            self.guard.pending[t.name] -= 1
        # The attach awaited the host (a channel its module had not let go
        # of: up to reattach_grace): kupd's own drain (SIGTERM), an admin's
        # drain of the device, or a reload that took the grant away or
        # moved the tenant's socket, may have come meanwhile and found no
        # lease to end.
        try:
            self._raise_if_draining()
            self.guard.check_drained(device)
            check_socket(self.guard.caller(), via)
            rule = self.guard.still_allowed(t.name, holder, device, lease.ch.id)
            if rule:
                self.guard.record(t.name, holder, device, lease.ch.id, rule)
                raise errors.PermissionDenied(
                    f"tenant {t.name}: rule {rule}: a reload while the attach waited no "
                    f"longer allows {holder} on device {device} channel {lease.ch.id}"
                )
        except errors.KupError as exc:
            self.leases.end(lease, "refused after its attach", exc)
            raise
        self.guard.owned(lease.id, t.name)
        bind(device=device, channel=lease.ch.id, lease=lease.id, tenant=t.name)
        return lease

    async def _take_granted(
        self, device: str, allowed: frozenset[int], holder: str, t: Tenant, via: str
    ) -> Lease:
        """ "Any free channel" for a tenant granted only some channels.  One
        its module still holds (Releasing) is waited for only when no other
        granted channel is free: the host's own "any" passes over it too."""
        dev = self.mgr.get(device)
        grace = self.config.reattach_grace
        waited_since: float | None = None
        while True:
            _, info = dev.require()
            releasing = False
            for cid in sorted(allowed):
                if cid >= info.announced or cid in dev.holders:
                    continue
                if dev.pool.state_of(cid) is not None:
                    continue
                try:
                    return await self.leases.take(
                        device, cid, holder, wait_releasing=False, tenant=t.name, via=via
                    )
                except errors.Releasing:
                    releasing = True
                except errors.Busy:
                    continue
            if not releasing:
                break
            # only channels their module still holds are left: try them all
            # again, for as long as one attach would wait for its channel
            now = asyncio.get_running_loop().time()
            if waited_since is None:
                waited_since = now
            if now - waited_since >= grace:
                raise errors.Releasing(
                    f"tenant {t.name}: every free granted channel of device {device} is "
                    f"still held by its module after its last user left (kupd waited "
                    f"{now - waited_since:.1f} s); retry later"
                )
            await asyncio.sleep(REATTACH_PAUSE)
        raise errors.Busy(
            f"tenant {t.name}: no free channel of device {device} among the granted channels"
        )

    @_unary
    async def Attach(
        self, request: kup_pb2.AttachRequest, context: grpc.aio.ServicerContext
    ) -> kup_pb2.AttachResponse:
        await self.guard.request_turn("lease", context.time_remaining(), self.drain, request.device)
        chan = request.channel if request.HasField("channel") else None
        attach_id = _attach_id_arg(request.attach_id)
        if not attach_id:
            lease = await self._take(request.device, chan, "lease")
            return self._attach_pb(lease, round(lease.idle_timeout * 1000))
        tenant = self.guard.caller().name
        self._check_attach_id(tenant, attach_id)
        # the attach may wait for its channel: its client may withdraw it
        # meanwhile (Release by attach_id), which marks it here
        self.leases.attaching(tenant, attach_id)
        try:
            lease = await self._take(request.device, chan, "lease")
        except BaseException:
            # cancelled, past its deadline, or failed: no lease; its client
            # may send Release by this name as it gives up, and finds it done
            if not self.leases.attached(tenant, attach_id):
                self.leases.attach_given_up(tenant, attach_id)
            raise
        withdrawn = self.leases.attached(tenant, attach_id)
        if withdrawn:
            self.leases.abandoned(lease, f"its attach {attach_id} was withdrawn")
            raise self._withdrawn(attach_id)
        self.leases.named(lease, attach_id)
        return self._attach_pb(lease, round(lease.idle_timeout * 1000))

    @staticmethod
    def _withdrawn(attach_id: str) -> errors.NotFound:
        return errors.NotFound(
            f"attach {attach_id} was withdrawn by its client (Release by attach_id) "
            "before kupd granted it: no lease taken"
        )

    def _check_attach_id(self, tenant: str, attach_id: str) -> None:
        """An Attach named ``attach_id``: NotFound when its client withdrew
        it (Release by attach_id) before it came, InvalidArgument when a
        live lease of the tenant, or an attach of it under way, has the
        name already."""
        if self.leases.attach_withdrawn(tenant, attach_id):
            raise self._withdrawn(attach_id)
        held = self.leases.attach_in_use(tenant, attach_id)
        if held is not None:
            raise errors.InvalidArgument(
                f"attach_id {attach_id} is in use by {held}: one attach_id names one attach"
            )

    def undelivered(self, resp: kup_pb2.AttachResponse) -> None:
        """The reply of an Attach could not be written: its caller had gone
        (its client interrupted, dead, past its deadline, or it cancelled)
        by the time the lease was granted.  No one knows the lease's id, to
        use or release it: it ends now, reason ``caller gone``, instead of
        holding the channel until it idles out (kupd.wire serves Attach so
        that a reply not written is seen: add_kup_servicer)."""
        lease = self.leases.leases.get(resp.lease_id)
        if lease is not None and lease.holder == "lease":
            self.leases.abandoned(lease, "its Attach reply could not be delivered")

    def _lease(self, lease_id: str) -> Lease:
        return self._lease_t(lease_id)[0]

    def _lease_t(self, lease_id: str, where: dict[str, Any] | None = None) -> tuple[Lease, Tenant]:
        """The caller's Attach lease ``lease_id`` and the caller's tenant; its
        device, channel and id go into the log context, or into ``where``."""
        t = self.guard.caller()
        if not lease_id:
            raise errors.InvalidArgument("lease_id is required")
        if len(lease_id) > LEASE_ID_MAX:  # kupd's are 16 hex digits
            raise errors.InvalidArgument(f"lease_id of {len(lease_id)} characters: not a lease id")
        try:
            lease = self.leases.get(lease_id, None if t.admin else t.name)
        except errors.NotFound:
            # An ENDED lease of another tenant's gets the same NotFound as an
            # unknown id (below), and its attempt the same audit line: a
            # tenant guessing at ids is seen whether the id is live or not.
            owner = "" if t.admin else self.guard.owner_of(lease_id)
            if owner and owner != t.name:
                self.guard.record(
                    t.name, "lease", "", None, "lease-owner", lease=lease_id, owner=owner
                )
            raise
        if lease.tenant != t.name and not t.admin:
            # Another tenant's lease is answered as one that does not exist
            # (the same NotFound, word for word): any other answer would
            # confirm that the id is live.  The operator's audit log still
            # records the attempt, as rule lease-owner, naming the owner.
            self.guard.record(
                t.name,
                "lease",
                lease.dev.name,
                lease.ch.id,
                "lease-owner",
                lease=lease.id,
                owner=lease.tenant,
            )
            raise no_lease(lease_id)
        self.guard.check_op(t, "lease", lease.dev.name, lease.ch.id)
        if lease.holder != "lease":
            raise errors.Busy(f"lease {lease_id} belongs to a Session stream")
        if where is None:
            bind(device=lease.dev.name, channel=lease.ch.id, lease=lease.id)
        else:
            where.update(device=lease.dev.name, channel=lease.ch.id, lease=lease.id)
        return lease, t

    @_unary
    async def Release(
        self, request: kup_pb2.ReleaseRequest, context: grpc.aio.ServicerContext
    ) -> kup_pb2.ReleaseResponse:
        # not paced (requests_per_second): a Release gives back, and one
        # refused for the pace would leave the lease held; an Attach/Release
        # loop is paced at its Attach
        attach_id = _attach_id_arg(request.attach_id)
        if not attach_id:
            if not request.lease_id:
                raise errors.InvalidArgument("release: lease_id or attach_id is required")
            self.leases.end(self._lease(request.lease_id), "released")
            return kup_pb2.ReleaseResponse()
        if request.lease_id:
            raise errors.InvalidArgument(
                "release: lease_id and attach_id are both set (one names the lease)"
            )
        # as an Attach: a tenant without the 'lease' operation has no
        # attach to withdraw (nor a table of withdrawn names to fill)
        t = self.guard.caller()
        self.guard.check_op(t, "lease")
        # the client gave up on that attach: its lease, if kupd granted it,
        # ends as one whose reply could not be delivered would
        lease = self.leases.withdraw(t.name, attach_id)
        if lease is not None:
            self.leases.abandoned(self._lease(lease.id), f"its client withdrew attach {attach_id}")
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
            return await self._send(request, context, where, retired)
        except errors.KupError as exc:
            await self._abort_unbound(context, exc, "Send", where)
            raise AssertionError("unreachable") from None

    async def _send(
        self,
        request: kup_pb2.SendRequest,
        context: grpc.aio.ServicerContext,
        where: dict[str, Any],
        retired: asyncio.Future[None] | None,
    ) -> kup_pb2.SendResponse | Handover:
        lease, t = self._lease_t(request.lease_id, where)
        receive_id = _attach_id_arg(request.receive_id, "receive_id")
        # the receive its client gave up on: a Send over its kept message
        # is refused (LeaseTable._over_held)
        again_of = _attach_id_arg(request.again_of, "again_of")
        data = request.data  # each read of a bytes field is a copy: once
        if t.max_message_bytes and len(data) > t.max_message_bytes:
            self.guard.check_size(t, "lease", lease.dev.name, lease.ch.id, len(data))
        # what waits below (the lease's turn, the reply) ends when a reload
        # retires the socket: counted in its reply (kupd.retirement)
        if not request.wait_reply:
            if t.channel_ops_per_second:
                limit = self._deadline_cap(context, None)
                await self.guard.take_turn(t, "lease", lease, self.drain, limit, "Send", retired)
            with waiting_on(retired, "Send", lease.ended):
                await self.leases.send(lease, data, retired, again_of)
            return kup_pb2.SendResponse()
        mode = request.reply_mode
        if mode == kup_pb2.RECEIVE_MODE_BLOCK:
            timeout: float | None = None
            nonblocking = False
        else:
            timeout, nonblocking = self._receive_args(mode, request.reply_timeout_ms)
        if t.channel_ops_per_second:
            limit = self._deadline_cap(context, timeout)
            timeout = await self.guard.take_turn_within(
                t, "lease", lease, self.drain, limit, "Send", retired, nonblocking
            )
        with waiting_on(retired, "Send", lease.ended):
            msg = await self.leases.exchange(
                lease,
                data,
                self._deadline_cap(context, timeout),
                nonblocking=nonblocking,
                abort=self.drain,
                retired=retired,
                handover=True,
                again_of=again_of,
            )
        resp = kup_pb2.SendResponse()
        fill_receive(resp.reply, msg)
        return resp if msg is None else self._handover(lease, msg, resp, receive_id)

    @_unary
    async def Pass(
        self, request: kup_pb2.PassRequest, context: grpc.aio.ServicerContext
    ) -> kup_pb2.PassResponse:
        lease, t = self._lease_t(request.lease_id)
        again_of = _attach_id_arg(request.again_of, "again_of")  # as Send's
        retired = socket_retired()
        if t.channel_ops_per_second:
            await self.guard.take_turn(
                t, "lease", lease, self.drain, self._deadline_cap(context, None), "Pass", retired
            )
        log.debug("pass")  # nothing awaited from here to the wait for the lease
        with waiting_on(retired, "Pass", lease.ended):  # for its turn
            await self.leases.pass_(lease, retired, again_of)
        return kup_pb2.PassResponse()

    @staticmethod
    def _receive_args(mode: int, timeout_ms: int) -> tuple[float | None, bool]:
        """(timeout in seconds or None, nonblocking) of a receive mode."""
        if mode == kup_pb2.RECEIVE_MODE_BLOCK:
            return None, False
        if mode == kup_pb2.RECEIVE_MODE_NONBLOCK:
            return None, True
        if mode == kup_pb2.RECEIVE_MODE_DEADLINE:
            if timeout_ms <= 0:
                raise errors.InvalidArgument("RECEIVE_MODE_DEADLINE needs timeout_ms > 0")
            return timeout_ms / 1000, False
        raise errors.InvalidArgument(f"unknown receive mode {mode}")

    async def _receive(
        self,
        lease: Lease,
        mode: int,
        timeout_ms: int,
        context: grpc.aio.ServicerContext,
        t: Tenant | None = None,
        receive_id: str = "",
        again_of: str = "",
    ) -> kup_pb2.ReceiveResponse | Handover:
        """A unary Receive; ``t``: the caller's tenant, when it has a
        channel_ops_per_second to wait under first.  ``receive_id`` /
        ``again_of``: the ReceiveRequest's (LeaseTable.settle, .receive)."""
        timeout, nonblocking = self._receive_args(mode, timeout_ms)
        timeout = self._deadline_cap(context, timeout)
        retired = socket_retired()
        if t is not None:
            timeout = await self.guard.take_turn_within(
                t, "lease", lease, self.drain, timeout, "Receive", retired, nonblocking
            )
        with waiting_on(retired, "Receive", lease.ended):
            msg = await self.leases.receive(
                lease,
                timeout,
                nonblocking=nonblocking,
                abort=self.drain,
                retired=retired,
                handover=True,
                again_of=again_of,
            )
        resp = _receive_pb(msg)
        return resp if msg is None else self._handover(lease, msg, resp, receive_id)

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
        lease, t = self._lease_t(request.lease_id)
        # nothing awaited from here to the wait for the kernel's message
        # (or for the lease's turn, another operation under way on it),
        # unless the tenant's channel_ops_per_second makes it wait its turn
        log.debug("receive", mode=request.mode, timeout_ms=request.timeout_ms)
        paced = t if t.channel_ops_per_second else None
        receive_id = _attach_id_arg(request.receive_id, "receive_id")
        again_of = _attach_id_arg(request.again_of, "again_of")
        return await self._receive(
            lease, request.mode, request.timeout_ms, context, paced, receive_id, again_of
        )

    # ---------------------------------------------------------------- sessions
    def _raise_if_draining(self) -> None:
        if self.drain.done():
            raise errors.Shutdown("kupd is shutting down")

    async def _next(
        self,
        reader: AsyncIterator[kup_pb2.SessionRequest | WireRequest | MalformedRequest],
        lease: Lease | None,
        guard: StreamGuard,
        retired: asyncio.Future[None] | None = None,
    ) -> kup_pb2.SessionRequest | WireRequest | MalformedRequest | None:
        """The next request, or None at the end of the stream; raises when
        kupd drains, the lease is ended or the stream's socket is retired
        (``retired``) first (``guard`` cancels the wait)."""
        raise_if_ended(lease, self.drain, retired)
        guard.waiting = True
        try:
            return await reader.__anext__()
        except StopAsyncIteration:
            return None
        except asyncio.CancelledError:
            if not guard.take_cancel():
                raise  # not ours: the client went away
            raise_if_ended(lease, self.drain, retired)
            raise errors.Shutdown("kupd is shutting down") from None
        finally:
            guard.waiting = False

    async def _session_op(
        self,
        lease: Lease,
        req: kup_pb2.SessionRequest | WireRequest | MalformedRequest,
        st: _SessionState,
    ) -> kup_pb2.SessionResponse | bytes:
        """One request's response: a generated SessionResponse, or for the
        data path (exchanged, received) its encoding (kupd.wire: the payload
        copied once; a send / exchange request's data is a memoryview of
        the received bytes when kupd.wire read it)."""
        if isinstance(req, MalformedRequest):
            raise errors.InvalidArgument(req.describe())  # in-band: the stream goes on
        rid = req.request_id
        op = req.WhichOneof("op")
        paced = st.tenant(self.guard).channel_ops_per_second != 0.0
        if op == "exchange":
            x = req.exchange
            data = x.data
            st.check_size(self.guard, lease, len(data))
            mode = x.mode
            if mode == kup_pb2.RECEIVE_MODE_BLOCK:
                timeout: float | None = None
                nonblocking = False
            else:
                timeout, nonblocking = self._receive_args(mode, x.timeout_ms)
            timeout = st.cap(timeout)
            if paced:
                timeout = await self.guard.take_turn_within(
                    st.tenant(self.guard), "session", lease, self.drain, timeout, "Session",
                    nonblocking=nonblocking,
                )
            msg = await self.leases.exchange(
                lease, data, timeout, nonblocking=nonblocking, abort=self.drain
            )
            return encode_reply(rid, True, msg)
        if op == "send":
            data = req.send.data
            st.check_size(self.guard, lease, len(data))
            if paced:
                await self.guard.take_turn(
                    st.tenant(self.guard), "session", lease, self.drain, st.cap(None), "Session"
                )
            await self.leases.send(lease, data)
            return kup_pb2.SessionResponse(request_id=rid, sent=kup_pb2.SendResponse())
        assert isinstance(req, kup_pb2.SessionRequest)  # kupd.wire reads send / exchange only
        if op == "receive":
            timeout, nonblocking = self._receive_args(req.receive.mode, req.receive.timeout_ms)
            timeout = st.cap(timeout)
            if paced:
                timeout = await self.guard.take_turn_within(
                    st.tenant(self.guard), "session", lease, self.drain, timeout, "Session",
                    nonblocking=nonblocking,
                )
            msg = await self.leases.receive(
                lease, timeout, nonblocking=nonblocking, abort=self.drain
            )
            return encode_reply(rid, False, msg)
        if op == "pass_turn":
            if paced:
                await self.guard.take_turn(
                    st.tenant(self.guard), "session", lease, self.drain, st.cap(None), "Session"
                )
            await self.leases.pass_(lease)
            return kup_pb2.SessionResponse(request_id=rid, passed=kup_pb2.PassResponse())
        if op == "attach":
            raise errors.InvalidArgument(
                f"session already holds channel {lease.ch.id} of device {lease.dev.name}"
            )
        raise errors.InvalidArgument("session request without an operation")

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
        resume per response."""
        if tenant is not None:
            use_tenant(tenant, retired)  # this RPC's own task (it iterates us)
        structlog.contextvars.clear_contextvars()
        bind(request=next(_request_ids), rpc="Session")
        reader = request_iterator.__aiter__()
        guard: StreamGuard | None = None
        lease: Lease | None = None
        reason = "stream ended"
        self._stream_started()
        try:
            self._raise_if_draining()
            guard = StreamGuard(self.drain)
            if retired is not None:
                # a reload that retires this socket ends the stream's wait
                # (attached, its lease ends first: socket moved by reload)
                guard.watch(retired)
            counted = self._unattached()
            try:
                # not attached yet: no lease a reload could end, so counted
                # as a Session the socket's retirement ends
                with waiting_on(retired, "Session"):
                    first = await self._next(reader, None, guard, retired)
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
            lease = await self._take(a.device, chan, "session")
            # A stream cancelled while kupd writes to it leaves this
            # generator where it was (gRPC does not close it): the lease
            # would end only when the generator is collected.  It ends when
            # the RPC does (a no-op when the stream ended by the code below).
            context.add_done_callback(functools.partial(self._stream_gone, lease))
            guard.watch(lease.ended)
            st = _SessionState(context, self.guard)
            yield kup_pb2.SessionResponse(
                request_id=first.request_id, attached=self._attach_pb(lease, 0)
            )
            while True:
                req = await self._next(reader, lease, guard, retired)
                if req is None:
                    return
                try:
                    resp = await self._session_op(lease, req, st)
                except _IN_BAND as exc:
                    self._count_error(status_for(exc)[0])
                    resp = kup_pb2.SessionResponse(request_id=req.request_id, error=error_pb(exc))
                yield resp
        except errors.KupError as exc:
            # the lease ends before the status goes out
            if lease is not None:
                if isinstance(exc, errors.Shutdown) and lease.active:
                    # The kernel's SHUTDOWN reached this Session before kupd
                    # read the device's state: read it now, so that watchers
                    # see the device shutting down before this lease ends,
                    # and it ends for the reason its device's other leases do.
                    await lease.dev.refresh()
                self.leases.end(lease, f"error: {type(exc).__name__}")
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

    def _stream_gone(self, lease: Lease, _: object) -> None:
        """A Session RPC is over: its lease ends, if it has not yet."""
        self.leases.end(lease, "stream cancelled")

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
        await self.guard.request_turn("watch", context.time_remaining(), self.drain, request.device)
        watches = self.watches
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


#: the longest lease_id a request may carry (kupd's are 16 hex digits;
#: a longer one is refused before it is looked up or quoted)
LEASE_ID_MAX = 64


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

# Kind values are the proto's MessageKind values.
assert int(Kind.DATA) == kup_pb2.MESSAGE_KIND_DATA
assert int(Kind.PASS) == kup_pb2.MESSAGE_KIND_PASS
assert int(Kind.CLOSE) == kup_pb2.MESSAGE_KIND_CLOSE

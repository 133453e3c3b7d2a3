"""Leases: one channel held exclusively by one Session stream or one
Attach lease id, and the operations on it.

A lease ends when its Session stream ends, on Release, after
``lease_idle_timeout`` without use (Attach leases only), when the device
goes away, or when kupd shuts down.  Ending a lease that has an operation
in flight (a blocked receive) wakes that operation with the reason first;
the channel is closed once it has left the channel.

A unary receive (or exchange) that takes the kernel's message stays the
lease's operation until its reply is written (``handover``): one whose
reply could not be written -- its caller cancelled or went away as kupd
took the message -- leaves the message on the lease (:attr:`Lease.held`),
and the lease's next receive returns it before looking at the channel.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import secrets
import time
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any, TypeVar

from kupd import errors
from kupd.abi import KUP_E_PEER
from kupd.channel import Channel, Kind, Message
from kupd.devices import REATTACH_PAUSE, DeviceManager, ManagedDevice, device_arg
from kupd.log import bind, get_logger
from kupd.metrics import ChannelMetrics
from kupd.policy import (
    ADMIN,
    DEFAULT,
    Budget,
    Guard,
    Tenant,
    check_socket,
    current_tenant,
    raise_if_ended,
    sendable,
    socket_retired,
)
from kupd.retirement import StreamGuard, waiting_on
from kupd.waiting import ChannelWaiter, Deadline
from kupd.watch import Event, EventType

if TYPE_CHECKING:
    from kupd.config import Config

__all__ = [
    "CALLER_GONE",
    "LEASE_ID_MAX",
    "RECEIVE_BLOCK",
    "RECEIVE_DEADLINE",
    "RECEIVE_NONBLOCK",
    "Lease",
    "LeaseTable",
    "Leasing",
    "OpLock",
    "SessionState",
    "Withdrawn",
    "no_lease",
    "receive_args",
]

Req = TypeVar("Req")

log = get_logger("kupd.sessions")

#: how many ended leases get() still explains (~200 bytes each)
ENDED_KEPT = 4096

#: How long kupd keeps an attach id withdrawn before its Attach reached it
#: (Release by attach_id first): a name matters only until its Attach
#: reaches kupd, and an Attach reaches it within moments of being sent --
#: gRPC runs it no later than its own deadline after its headers came
#: (the clients' default Attach deadline: 30 s) -- or never (lost with
#: its connection, or refused).  Ten times that: a name older is
#: forgotten (an Attach given a longer timeout by its caller that comes
#: later still takes a lease, which lease_idle_timeout ends).
#: (One withdrawn while its Attach waits in kupd is marked on that attach
#: instead: :meth:`LeaseTable.attaching`.)
WITHDRAWN_FOR = 300.0

#: How many such names a tenant may have kupd keep at once (younger than
#: WITHDRAWN_FOR): a quota, not a window -- a Release by attach_id past
#: it is refused RESOURCE_EXHAUSTED, the name not withdrawn, instead of
#: pushing out an older name whose Attach may still come (which then took
#: a lease nobody knew of).  ~100 bytes each.
WITHDRAWN_KEPT = 1024

#: how many operations (unary RPCs on an Attach lease) may wait for a
#: lease's one running operation: each waiting RPC costs kupd memory, and
#: nothing else bounds how many a client starts on one lease
MAX_WAITING_OPS = 64

#: "lease taken" / "lease released" lines one tenant may write: a burst,
#: then a rate per second (the rest counted: ``unlogged_before``)
LEASE_LINES_BURST = 200.0
LEASE_LINES_PER_SECOND = 20.0

#: The reason a lease ends when its Attach's caller went away before the
#: reply reached it (the RPC cancelled, its deadline passed).
CALLER_GONE = "caller gone"


class Withdrawn:
    """One tenant's attach ids withdrawn before their Attach reached kupd
    (:meth:`LeaseTable.withdraw`): each kept WITHDRAWN_FOR seconds, at most
    WITHDRAWN_KEPT at once, oldest first.  A name is kept until its Attach
    comes (:meth:`take`) or it is WITHDRAWN_FOR old and room is needed: a
    name is never pushed out younger -- a new one is refused instead."""

    __slots__ = ("_names",)

    def __init__(self) -> None:
        #: name -> when it was withdrawn (time.monotonic()), oldest first
        self._names: collections.OrderedDict[str, float] = collections.OrderedDict()

    def __len__(self) -> int:
        return len(self._names)

    def add(self, tenant: str, name: str, now: float) -> None:
        """Keep ``name`` withdrawn (from ``now``).  ResourceExhausted, the
        name not kept, when ``tenant`` has WITHDRAWN_KEPT names younger than
        WITHDRAWN_FOR already."""
        names = self._names
        while names and now - next(iter(names.values())) >= WITHDRAWN_FOR:
            names.popitem(last=False)
        if name not in names and len(names) >= WITHDRAWN_KEPT:
            raise errors.ResourceExhausted(
                f"tenant {tenant}: {len(names)} attaches withdrawn before they reached "
                f"kupd in the last {WITHDRAWN_FOR:g} s (Release by attach_id), the most "
                f"kupd keeps: attach {name} is not withdrawn; release it again later "
                "(an Attach of that name that comes meanwhile takes a lease, which "
                "that Release ends)"
            )
        names[name] = now
        names.move_to_end(name)

    def take(self, name: str) -> bool:
        """Whether ``name`` is withdrawn (then forgotten: an attach id names
        one attach)."""
        return self._names.pop(name, None) is not None


class OpLock:
    """A FIFO lock for a lease's operations, like :class:`asyncio.Lock` but
    taken without a coroutine when free (:meth:`try_take`): a Session's
    operations are already one after another, so the lock is almost always
    free and an ``await lock.acquire()`` per message was pure overhead."""

    __slots__ = ("_waiters", "held")

    def __init__(self) -> None:
        self.held = False
        self._waiters: collections.deque[asyncio.Future[None]] = collections.deque()

    @property
    def waiting(self) -> int:
        """Takers waiting for the lock."""
        return len(self._waiters)

    def try_take(self) -> bool:
        if self.held or self._waiters:
            return False
        self.held = True
        return True

    async def take(self, abort: asyncio.Future[None] | None = None) -> None:
        """Wait for the lock; when ``abort`` fails first, raise (a fresh
        copy of) its error instead, the lock not taken."""
        if self.try_take():
            return
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.append(fut)

        def aborted(a: asyncio.Future[None]) -> None:
            exc = None if a.cancelled() else a.exception()
            if not fut.done() and isinstance(exc, errors.KupError):
                fut.set_exception(type(exc)(exc.message))

        if abort is not None:
            abort.add_done_callback(aborted)
        try:
            await fut  # release() hands the lock over: held stays True
        except BaseException:
            if fut.done() and not fut.cancelled() and fut.exception() is None:
                self.release()  # handed over, then cancelled: pass it on
            else:
                with contextlib.suppress(ValueError):
                    self._waiters.remove(fut)
            raise
        finally:
            if abort is not None:
                abort.remove_done_callback(aborted)

    def release(self) -> None:
        while self._waiters:
            fut = self._waiters.popleft()
            if not fut.done():
                fut.set_result(None)  # still held: now by that waiter
                return
        self.held = False


class Lease:
    def __init__(
        self,
        lease_id: str,
        holder: str,
        dev: ManagedDevice,
        ch: Channel,
        metrics: ChannelMetrics,
    ) -> None:
        self.id = lease_id
        self.holder = holder  # "session" | "lease"
        self.dev = dev
        self.ch = ch
        self.last_used = time.monotonic()
        self.ops = 0
        self.lock = OpLock()
        self.ended: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.end_reason = ""
        #: The tenant that took it (kupd.policy; "default" without tenants).
        self.tenant = "default"
        #: The tenant socket it was taken through ("" for kupd's own socket):
        #: a reload that moves that socket ends the Sessions it serves.
        self.via = ""
        #: Seconds without use after which an Attach lease ends: the table's
        #: value when it was taken (what its Attach reply announced), kept
        #: for its life even if a reload changes the table's.
        self.idle_timeout = 0.0
        #: This channel's metric children (looked up once, not per message).
        self.m = metrics
        self.rx_what = f"receive on channel {ch.id} of device {dev.name}"
        #: The channel's data area in bytes (a plain int: read per message).
        self.max_msg = ch.max_msg
        #: Waits for the kernel's messages (made at the first wait: it puts
        #: the channel in poll mode).
        self.waiter: ChannelWaiter | None = None
        #: The kernel's message a unary receive took but could not deliver
        #: (its caller had gone before the reply was written): the next
        #: receive returns it first (LeaseTable.settle).
        self.held: Message | None = None
        #: (receive_id, message) of the unary receive whose reply was written
        #: last, until the lease's next operation: a client that gave up on
        #: that reply -- its gRPC library drops a reply that comes after the
        #: cancel -- gets the message again by naming it (again_of); a send
        #: or pass naming it is refused and leaves it kept
        #: (LeaseTable._over_held), as does a receive not naming it
        #: (refused: this side holds the turn).
        self.delivered: tuple[str, Message] | None = None
        #: The name its client gave the Attach ("" when none): Release by
        #: attach_id ends it (LeaseTable.withdraw).
        self.attach_id = ""

    @property
    def active(self) -> bool:
        return not self.ended.done()

    def describe(self) -> str:
        return f"{self.holder} {self.id} (device {self.dev.name} channel {self.ch.id})"


def no_lease(lease_id: str) -> errors.NotFound:
    """The answer for a lease id that names no lease of the caller's: one
    never taken, one ended long ago -- and another tenant's, live or not,
    which must read exactly the same (docs/security.md)."""
    return errors.NotFound(f"no lease {lease_id!r} (released, expired, or never taken)")


class LeaseTable:
    def __init__(self, mgr: DeviceManager, idle_timeout: float, max_leases: int) -> None:
        self.mgr = mgr
        #: For leases taken from now on (a reload sets it: lease_idle_timeout).
        self.idle_timeout = idle_timeout
        #: Sessions + leases open at once (a reload sets it: max_sessions;
        #: lowering it ends none, it refuses new ones until below).
        self.max_leases = max_leases
        self.leases: dict[str, Lease] = {}
        #: "lease taken" / "lease released" lines per tenant: a tenant that
        #: attaches and releases in a loop, within its limits, wrote two
        #: lines per lease (300 KiB/s from one tenant); past the budget they
        #: are counted, and the next line written says how many were not
        self._line_budget = Budget(LEASE_LINES_PER_SECOND, LEASE_LINES_BURST)
        #: takes between their max_leases check and their lease (an attach
        #: awaits the host): counted, or concurrent ones all pass the check
        self._taking = 0
        #: Session streams not attached yet, per tenant: a stream costs kupd
        #: ~23 KB before its first request, so it counts against
        #: max_sessions (kupd's and its tenant's) from its start
        self.unattached: dict[str, int] = {}
        #: recently ended leases: id -> (tenant, the error a later use of
        #: the id gets), the oldest dropped past ENDED_KEPT, so that an
        #: Attach lease's holder learns why it ended (revoked, expired ...)
        self._ended: collections.OrderedDict[str, tuple[str, errors.KupError]] = (
            collections.OrderedDict()
        )
        #: live Attach leases by (tenant, attach_id), and per tenant the
        #: attaches withdrawn before kupd granted them (the oldest dropped
        #: past WITHDRAWN_KEPT): see :meth:`withdraw`
        self._by_attach: dict[tuple[str, str], Lease] = {}
        self._withdrawn: dict[str, Withdrawn] = {}
        #: named Attaches under way (not granted yet) by (tenant, attach_id):
        #: whether their client withdrew them meanwhile
        self._attaching: dict[tuple[str, str], bool] = {}
        #: per tenant, its named Attaches that reached kupd and ended without
        #: a lease its client knows of (cancelled, past their deadline,
        #: failed; or granted but their reply not delivered): name -> when,
        #: oldest first, at most WITHDRAWN_KEPT, none older than
        #: WITHDRAWN_FOR.  A Release by such a name has nothing to withdraw
        #: (:meth:`withdraw`): it is what a client sends as it gives up on
        #: an attach, and must not use up the quota of names whose Attach is
        #: still on its way.  Pushed out, a name is simply withdrawn as one
        #: kupd has not seen.
        self._gave_up: dict[str, collections.OrderedDict[str, float]] = {}
        self._reaper: asyncio.Task[None] | None = None
        for d in mgr.devices.values():
            d.on_gone.append(self._device_gone)
            d.on_shutdown.append(self._device_shutting_down)

    def check_room(self, tenant: str = DEFAULT.name) -> None:
        """ResourceExhausted when the leases open, those being attached and
        the Session streams not attached yet reach max_sessions.  The
        refusal tells a ``tenant`` of [[tenant]] tables its own share only:
        how busy the others are is not its business (the admin's socket and
        a kupd without tenants: how many are held, being attached, not
        attached yet)."""
        waiting = sum(self.unattached.values())
        open_now = len(self.leases) + self._taking + waiting
        if open_now >= self.max_leases:
            if tenant not in (DEFAULT.name, ADMIN.name):
                mine = sum(1 for le in self.leases.values() if le.tenant == tenant)
                mine += self.unattached.get(tenant, 0)
                raise errors.ResourceExhausted(
                    f"kupd's limit max_sessions={self.max_leases} is reached: the sessions "
                    f"and leases of every tenant count ({mine} of them tenant {tenant}'s)"
                )
            parts = [
                f"{n} {what}"
                for n, what in (
                    (len(self.leases), "held"),
                    (self._taking, "being attached"),
                    (waiting, "Sessions not attached yet"),
                )
                if n
            ]
            raise errors.ResourceExhausted(
                f"{open_now} sessions and leases open ({', '.join(parts)}; "
                f"limit max_sessions={self.max_leases})"
            )

    def unattached_enter(self, tenant: str) -> None:
        """A Session stream of ``tenant`` before its attach: it counts like
        the lease it asks for (pair with :meth:`unattached_leave`)."""
        self.unattached[tenant] = self.unattached.get(tenant, 0) + 1
        self.mgr.metrics.sessions_unattached.inc()

    def unattached_leave(self, tenant: str) -> None:
        self.mgr.metrics.sessions_unattached.dec()
        n = self.unattached[tenant] - 1
        if n:
            self.unattached[tenant] = n
        else:
            del self.unattached[tenant]

    def start(self) -> None:
        self._reaper = asyncio.ensure_future(self._reap_loop())

    # -- taking and ending ---------------------------------------------------------
    async def take(
        self,
        device: str,
        chan_id: int | None,
        holder: str,
        *,
        wait_releasing: bool = True,
        tenant: str = "default",
        via: str = "",
    ) -> Lease:
        """Attach and lease a channel (see :meth:`ManagedDevice.attach`;
        ``wait_releasing`` False: a channel its module still holds is
        Releasing at once, not waited for) for ``tenant``, through its
        socket ``via`` (Lease.tenant, Lease.via)."""
        if self.mgr.closing:
            raise errors.Shutdown("kupd is shutting down")
        self.check_room(tenant)
        dev = self.mgr.get(device)
        self._taking += 1
        try:
            ch = await dev.attach(chan_id, wait_releasing=wait_releasing, tenant=tenant)
        except asyncio.CancelledError:
            # the RPC was cancelled while the channel was being attached (its
            # client interrupted, gone, or past its deadline): no lease is
            # taken, and a channel the host attaches meanwhile is closed
            # (ManagedDevice.attach)
            unlogged = self._line_budget.take(tenant)
            if unlogged is not None:
                log.info(
                    "attach abandoned",
                    device=device,
                    channel="any" if chan_id is None else chan_id,
                    holder=holder,
                    tenant=tenant,
                    reason=CALLER_GONE,
                    **({"unlogged_before": unlogged} if unlogged else {}),
                )
            raise
        finally:
            self._taking -= 1
        if dev.dev is None or self.mgr.closing:
            ch.close()
            raise errors.Shutdown(f"device {device} went away during attach")
        # a client's send or pass never drops the kernel's unread message:
        # NotYourTurn, "receive it first" (kupd loses nothing on its behalf)
        ch.keep_unread(True)
        lease = Lease(
            secrets.token_hex(8), holder, dev, ch, self.mgr.metrics.channel(device, ch.id)
        )
        lease.idle_timeout = self.idle_timeout
        lease.tenant, lease.via = tenant, via
        self.leases[lease.id] = lease
        dev.holders[ch.id] = (holder, lease.id)
        gauge = self.mgr.metrics.sessions if holder == "session" else self.mgr.metrics.leases
        gauge.labels(device).inc()
        unlogged = self._line_budget.take(tenant)
        if unlogged is not None:
            log.info(
                "lease taken",
                device=device,
                channel=ch.id,
                lease=lease.id,
                holder=holder,
                tenant=tenant,
                **({"unlogged_before": unlogged} if unlogged else {}),
            )
        self.mgr.publish(
            Event(EventType.LEASE_TAKEN, device, channel=ch.id, lease_id=lease.id, holder=holder)
        )
        return lease

    def get(self, lease_id: str, tenant: str | None = None) -> Lease:
        """The active lease ``lease_id``.  One that ended lately is NotFound
        saying how it ended -- PermissionDenied with the reason when the
        admin revoked it -- to its own ``tenant`` (None: anyone's)."""
        lease = self.leases.get(lease_id)
        if lease is None or not lease.active:
            gone = self._ended.get(lease_id)
            if gone is not None and (tenant is None or gone[0] == tenant):
                raise type(gone[1])(gone[1].message)
            raise no_lease(lease_id)
        return lease

    def end(self, lease: Lease, reason: str, error: errors.KupError | None = None) -> None:
        """End ``lease``: wake its in-flight operation with ``error``, free the channel."""
        if not lease.active:
            return
        lease.end_reason = reason
        lease.ended.set_exception(error or errors.NotFound(f"lease {lease.id} {reason}"))
        lease.ended.exception()  # retrieved: no "never retrieved" warning
        self.leases.pop(lease.id, None)
        if lease.attach_id:
            self._by_attach.pop((lease.tenant, lease.attach_id), None)
        later: errors.KupError = (
            errors.PermissionDenied(error.message)
            if isinstance(error, errors.PermissionDenied)
            else errors.NotFound(f"lease {lease.id} has ended ({reason})")
        )
        self._ended[lease.id] = (lease.tenant, later)
        if len(self._ended) > ENDED_KEPT:
            self._ended.popitem(last=False)
        dev = lease.dev
        if dev.holders.get(lease.ch.id, ("", ""))[1] == lease.id:
            del dev.holders[lease.ch.id]
        gauge = self.mgr.metrics.sessions if lease.holder == "session" else self.mgr.metrics.leases
        gauge.labels(dev.name).dec()
        if lease.ops == 0:
            self._close_channel(lease)
        unlogged = self._line_budget.take(lease.tenant)
        if unlogged is not None:
            log.info(
                "lease released",
                device=dev.name,
                channel=lease.ch.id,
                lease=lease.id,
                reason=reason,
                tenant=lease.tenant,
                **({"unlogged_before": unlogged} if unlogged else {}),
            )
        self.mgr.publish(
            Event(
                EventType.LEASE_RELEASED,
                dev.name,
                channel=lease.ch.id,
                lease_id=lease.id,
                holder=lease.holder,
                reason=reason,
            )
        )

    def abandoned(self, lease: Lease, why: str) -> None:
        """End ``lease``, just granted to an Attach whose caller has gone
        (``why``): no one knows its id to use or release it.  Reason
        ``caller gone``; a later use of the id is told why."""
        self.end(
            lease,
            CALLER_GONE,
            errors.NotFound(f"lease {lease.id} ended at once: its caller had gone ({why})"),
        )
        if lease.attach_id:
            self.attach_given_up(lease.tenant, lease.attach_id)

    # -- attach ids: undoing an attach its client gave up on -------------------
    def attach_in_use(self, tenant: str, attach_id: str) -> str | None:
        """What of ``tenant``'s has the name ``attach_id`` already: its live
        lease granted to it ("lease ID"), or an Attach of it under way."""
        lease = self._by_attach.get((tenant, attach_id))
        if lease is not None:
            return f"lease {lease.id}"
        if (tenant, attach_id) in self._attaching:
            return "an attach under way"
        return None

    def attaching(self, tenant: str, attach_id: str) -> None:
        """``tenant``'s Attach ``attach_id`` is under way (waiting for its
        channel): a Release by that name meanwhile marks it withdrawn
        (:meth:`withdraw`), and :meth:`attached` says so."""
        self._attaching[(tenant, attach_id)] = False
        gave_up = self._gave_up.get(tenant)
        if gave_up is not None and gave_up.pop(attach_id, None) is not None and not gave_up:
            del self._gave_up[tenant]  # the name is this attach's now

    def attached(self, tenant: str, attach_id: str) -> bool:
        """The Attach ``attach_id`` is no longer under way (granted, or
        failed): whether its client withdrew it meanwhile."""
        return self._attaching.pop((tenant, attach_id), False)

    def attach_given_up(self, tenant: str, attach_id: str) -> None:
        """``tenant``'s Attach ``attach_id`` reached kupd and ended without a
        lease its client knows of: a Release by that name that follows (its
        client giving up) finds nothing to withdraw (:meth:`withdraw`)."""
        names = self._gave_up.setdefault(tenant, collections.OrderedDict())
        now = time.monotonic()
        while names and (
            len(names) >= WITHDRAWN_KEPT or now - next(iter(names.values())) >= WITHDRAWN_FOR
        ):
            names.popitem(last=False)
        names[attach_id] = now
        names.move_to_end(attach_id)

    def attach_withdrawn(self, tenant: str, attach_id: str) -> bool:
        """Whether ``tenant`` withdrew the Attach ``attach_id`` before it
        was granted (then forgotten: an attach id names one attach)."""
        ids = self._withdrawn.get(tenant)
        if ids is None or not ids.take(attach_id):
            return False
        if not ids:
            del self._withdrawn[tenant]
        return True

    def named(self, lease: Lease, attach_id: str) -> None:
        """``lease`` was granted to the Attach ``attach_id``."""
        lease.attach_id = attach_id
        self._by_attach[(lease.tenant, attach_id)] = lease

    def withdraw(self, tenant: str, attach_id: str) -> Lease | None:
        """``tenant``'s client gave up on its Attach ``attach_id`` (Release
        by attach_id): the lease granted to it, which the caller ends; or,
        when there is none yet, None, and the Attach grants none -- one
        under way (waiting for its channel) is marked (:meth:`attached`),
        one that has not reached kupd finds the name in the tenant's
        withdrawn ones when it comes (:meth:`attach_withdrawn`) --
        ResourceExhausted when the tenant has too many of those already
        (:class:`Withdrawn`)."""
        lease = self._by_attach.get((tenant, attach_id))
        if lease is not None and lease.active:
            return lease
        if (tenant, attach_id) in self._attaching:
            self._attaching[(tenant, attach_id)] = True
            return None
        gave_up = self._gave_up.get(tenant)
        if gave_up is not None and gave_up.pop(attach_id, None) is not None:
            if not gave_up:
                del self._gave_up[tenant]
            return None  # its Attach came, and ended without a lease
        ids = self._withdrawn.setdefault(tenant, Withdrawn())
        try:
            ids.add(tenant, attach_id, time.monotonic())
        finally:
            if not ids:
                del self._withdrawn[tenant]
        return None

    @staticmethod
    def _close_channel(lease: Lease) -> None:
        if lease.waiter is not None:
            lease.waiter.close()  # before the channel closes its fd
        with contextlib.suppress(errors.KupError):
            lease.ch.close()

    def _device_gone(self, dev: ManagedDevice, why: errors.KupError) -> None:
        # Unavailable: its host stopped answering, the module did not unload
        # (kupd.devices): a client may try again, which Shutdown says it may not
        cls = errors.Unavailable if isinstance(why, errors.Unavailable) else errors.Shutdown
        for lease in [le for le in self.leases.values() if le.dev is dev]:
            self.end(lease, "device gone", cls(f"device {dev.name} went away: {why}"))

    def _device_shutting_down(self, dev: ManagedDevice) -> None:
        for lease in [le for le in self.leases.values() if le.dev is dev]:
            self.end(
                lease,
                "device shutting down",
                errors.Shutdown(f"device {dev.name} is shutting down"),
            )

    def end_all(self, reason: str, error: errors.KupError) -> None:
        for lease in list(self.leases.values()):
            self.end(lease, reason, error)

    async def _reap_loop(self) -> None:
        shortest = self.idle_timeout
        while True:
            # a quarter of the shortest timeout in use (leases keep theirs)
            pause = max(0.05, min(1.0, shortest / 4))
            before = time.monotonic()
            await asyncio.sleep(pause)
            now = time.monotonic()
            # Time this loop did not run (kupd stopped -- SIGSTOP, a
            # suspended VM -- or its event loop blocked) is not idle time of
            # the leases: no request could be taken meanwhile, and one that
            # was waiting in the socket would find its lease expired the
            # moment kupd runs again.  What the sleep overran by is credited
            # to every lease before it is judged: a lease expires after
            # idle_timeout of kupd running without it being used.
            stalled = now - before - pause
            if stalled > 0:
                for lease in self.leases.values():
                    lease.last_used = min(now, lease.last_used + stalled)
            shortest = self.idle_timeout
            for lease in list(self.leases.values()):
                if lease.ops == 0 and self._ended_by_module(lease):
                    continue
                if lease.holder != "lease":
                    continue
                if lease.ops == 0 and now - lease.last_used > lease.idle_timeout:
                    self.end(
                        lease,
                        "expired",
                        errors.NotFound(
                            f"lease {lease.id} expired after {lease.idle_timeout:g}s idle"
                        ),
                    )
                else:
                    shortest = min(shortest, lease.idle_timeout)

    def close(self) -> None:
        if self._reaper is not None:
            self._reaper.cancel()

    # -- operations ------------------------------------------------------------------
    async def _enter(
        self, lease: Lease, retired: asyncio.Future[None] | None = None
    ) -> tuple[str, Message] | None:
        """Take the lease for one operation (they run one at a time).
        ``retired``: the retirement of the socket the operation came in on
        (kupd.policy.socket_retired): a wait for the lease's turn ends with
        its error, nothing done.  Returns the previous operation's
        :attr:`Lease.delivered`, which no later operation may take (but
        this one puts back when it is refused over it, see
        :meth:`_over_held`)."""
        if not lease.active:
            raise self._ended_error(lease)
        if not lease.lock.try_take():
            if lease.lock.waiting >= MAX_WAITING_OPS:
                raise errors.ResourceExhausted(
                    f"lease {lease.id}: {lease.lock.waiting} operations already wait for "
                    f"it (they run one at a time; at most {MAX_WAITING_OPS} wait)"
                )
            try:
                await lease.lock.take(retired)
            except errors.Unavailable as exc:
                raise errors.Unavailable(
                    f"{exc.message} (it waited for lease {lease.id}'s turn: nothing was done)"
                ) from None
        if not lease.active:
            lease.lock.release()
            raise self._ended_error(lease)
        lease.ops += 1
        lease.last_used = time.monotonic()
        delivered, lease.delivered = lease.delivered, None
        return delivered

    def _ended_by_module(self, lease: Lease) -> bool:
        """End an idle ``lease`` whose channel the kernel side is done with
        (its page says EKU_PEER: kupdev_disconnect, say of an idle user);
        True if it did.  The kernel wakes only a user that waits, so a
        Session or lease that holds its channel without using it would keep
        it -- from every other user -- until its stream ended or it idled
        out; the reaper reads each idle lease's page once a round instead
        (a read of shared memory, no call to the host)."""
        try:
            state = lease.ch.state()
        except errors.KupError:
            return False  # closed under us: its own path ends the lease
        if state != KUP_E_PEER:
            return False
        self.end(
            lease,
            "ended by the module",
            errors.PeerGone(
                f"EKU_PEER: channel {lease.ch.id} of device {lease.dev.name}: the kernel "
                "side ended the session while it was idle"
            ),
        )
        return True

    def _peer_gone(self, lease: Lease, exc: errors.PeerGone) -> None:
        """The kernel side ended this user's session (kupdev_disconnect, or
        it gave up on a user that broke the protocol): the channel is of no
        more use to the lease, so the lease ends now and its channel is let
        go (the module frees it for the next user once kupd closes it).
        Sessions end on the same error in the service; an Attach lease kept
        the dead channel until its client released it or it idled out."""
        self.end(lease, f"ended by the module ({exc.message})", errors.PeerGone(exc.message))

    def _leave(self, lease: Lease) -> None:
        lease.ops -= 1
        lease.last_used = time.monotonic()
        lease.lock.release()
        if not lease.active and lease.ops == 0:
            self._close_channel(lease)

    def settle(self, lease: Lease, msg: Message, receive_id: str, delivered: bool) -> None:
        """End the operation that took ``msg`` with ``handover`` (see
        :meth:`receive`): its reply was written (``delivered``), or its
        caller had gone first -- cancelled, past its deadline, its
        connection lost -- and the message stays the lease's unread one,
        for its next receive (a lease that ended meanwhile took it along).
        Being held back is a use of the lease (idle timeout).  A reply
        written for a receive its client named (``receive_id``) is kept
        until the lease's next operation (:attr:`Lease.delivered`): a
        written reply may still not reach its client, which then asks for
        it again (:meth:`receive`'s ``again_of``)."""
        if delivered and receive_id and lease.active:
            lease.delivered = (receive_id, msg)
        if not delivered:
            kept = lease.active
            if kept:
                lease.held = msg
            log.debug(
                "reply not delivered",
                device=lease.dev.name,
                channel=lease.ch.id,
                lease=lease.id,
                kind=msg.kind.name,
                seq=msg.seq,
                outcome="held back for the next receive" if kept else "gone with the lease",
            )
        self._leave(lease)

    @staticmethod
    def _over_held(
        lease: Lease,
        what: str,
        delivered: tuple[str, Message] | None = None,
        again_of: str = "",
    ) -> None:
        """Before a send or pass: a held-back DATA message (:meth:`settle`)
        is the lease's unread message, which a send or pass would answer
        without reading -- NotYourTurn, as the channel's keep_unread refuses
        one over the kernel's unread message; a held PASS or CLOSE carries
        nothing and is dropped, as libkup drops an unread PASS.

        So is the DATA message kupd wrote for the receive its client gave up
        on: ``delivered`` (what :meth:`_enter` took from the lease) named by
        ``again_of``, the operation's.  Its client never got it; it stays
        kept (:attr:`Lease.delivered`) for the receive that asks again."""
        if (
            again_of
            and delivered is not None
            and delivered[0] == again_of
            and delivered[1].kind == Kind.DATA
        ):
            lease.delivered = delivered
            raise errors.NotYourTurn(
                f"{what}: channel {lease.ch.id} of device {lease.dev.name}: the client has "
                f"not received the message of its receive {again_of} (kupd wrote the reply, "
                f"the client gave up on it); receive it first (again_of): "
                f"{'sending' if what == 'send' else 'passing'} now would drop it"
            )
        held = lease.held
        if held is None:
            return
        if held.kind == Kind.DATA:
            raise errors.NotYourTurn(
                f"{what}: channel {lease.ch.id} of device {lease.dev.name}: the kernel's "
                f"message is unread (this side holds the turn; a receive whose caller had "
                f"gone took it, and kept it for the next one); receive it first: "
                f"{'sending' if what == 'send' else 'passing'} now would drop it"
            )
        lease.held = None

    @staticmethod
    def _ended_error(lease: Lease) -> errors.KupError:
        exc = lease.ended.exception()
        if isinstance(exc, errors.KupError):
            return type(exc)(exc.message)
        return errors.NotFound(f"lease {lease.id} {lease.end_reason or 'ended'}")

    def _check_size(self, lease: Lease, n: int) -> None:
        if n > lease.max_msg:
            raise errors.TooBig(
                f"message of {n} bytes exceeds the data area of channel {lease.ch.id} of "
                f"device {lease.dev.name} ({lease.max_msg} bytes)"
            )

    async def send(
        self,
        lease: Lease,
        data: bytes | memoryview,
        retired: asyncio.Future[None] | None = None,
        again_of: str = "",
    ) -> None:
        """``again_of``: the receive its client gave up on (see
        :meth:`_over_held`)."""
        self._check_size(lease, len(data))
        delivered = await self._enter(lease, retired)
        try:
            self._over_held(lease, "send", delivered, again_of)
            lease.ch.send(data)
            lease.m.sent(len(data))
        except errors.PeerGone as exc:
            self._peer_gone(lease, exc)
            raise
        finally:
            self._leave(lease)

    async def pass_(
        self, lease: Lease, retired: asyncio.Future[None] | None = None, again_of: str = ""
    ) -> None:
        """``again_of``: as :meth:`send`'s."""
        delivered = await self._enter(lease, retired)
        try:
            self._over_held(lease, "pass", delivered, again_of)
            lease.ch.pass_()
            lease.m.sent(0)
        except errors.PeerGone as exc:
            self._peer_gone(lease, exc)
            raise
        finally:
            self._leave(lease)

    async def receive(
        self,
        lease: Lease,
        timeout: float | None,
        nonblocking: bool,
        abort: asyncio.Future[None] | None = None,
        retired: asyncio.Future[None] | None = None,
        handover: bool = False,
        again_of: str = "",
    ) -> Message | None:
        """The kernel's message; None for a non-blocking receive with nothing
        there -- or with another operation on the lease under way (a
        blocking receive would take what comes first): it does not wait.
        ``abort`` (kupd's drain) or ``retired`` (the retirement of the
        socket it came in on) failing first ends the wait with its error,
        the message left for the next receive.

        ``handover``: a message returned is not delivered yet (a unary
        RPC's reply still to be written): the operation stays the lease's
        -- the next one waits for its turn -- until :meth:`settle` says
        whether it reached its caller.

        ``again_of``: the receive_id of the lease's previous operation,
        which its client gave up on: if that operation's reply was written
        (:attr:`Lease.delivered`), its message is returned again -- the
        lease still holds the turn it came with -- instead of waiting for
        another."""
        if nonblocking and (lease.lock.held or lease.lock.waiting) and lease.active:
            lease.last_used = time.monotonic()  # a use all the same (idle timeout)
            return None
        delivered = await self._enter(lease, retired)
        msg = None
        try:
            if again_of and delivered is not None and delivered[0] == again_of:
                msg = delivered[1]
                log.debug(
                    "reply delivered again",
                    device=lease.dev.name,
                    channel=lease.ch.id,
                    lease=lease.id,
                    kind=msg.kind.name,
                    seq=msg.seq,
                    receive_id=again_of,
                )
                return msg
            try:
                msg = await self._receive_entered(lease, timeout, nonblocking, abort, retired)
            except errors.NotYourTurn as exc:
                if delivered is None:
                    raise
                # this side holds the turn with the message kupd wrote for
                # the receive ``delivered`` names, which did not name it:
                # refused, nothing done -- so the message stays kept for
                # the receive that does (as a send's refusal leaves it)
                lease.delivered = delivered
                raise errors.NotYourTurn(
                    f"{exc.message} -- it was the reply kupd wrote for receive "
                    f"{delivered[0]}, kept for a receive that names it (again_of) in case "
                    "its client gave up on the reply"
                ) from None
            return msg
        except errors.PeerGone as exc:
            self._peer_gone(lease, exc)
            raise
        finally:
            if msg is None or not handover:
                self._leave(lease)

    async def exchange(
        self,
        lease: Lease,
        data: bytes | memoryview,
        timeout: float | None,
        nonblocking: bool,
        abort: asyncio.Future[None] | None = None,
        retired: asyncio.Future[None] | None = None,
        handover: bool = False,
        again_of: str = "",
    ) -> Message | None:
        """``send(data)`` then ``receive(...)`` as one operation (one lock
        hold).  A failed send sent nothing; a failed receive leaves the data
        sent and the reply owed to a later receive (``retired`` failing
        while the reply is awaited says so).  ``handover``: as
        :meth:`receive`'s, for the reply; ``again_of``: as :meth:`send`'s."""
        self._check_size(lease, len(data))
        delivered = await self._enter(lease, retired)
        msg = None
        try:
            self._over_held(lease, "send", delivered, again_of)
            if nonblocking:
                lease.ch.send(data)
                lease.m.sent(len(data))
                msg = await self._receive_entered(lease, timeout, nonblocking, abort)
                return msg
            # The fast path: send, then spin (GIL released) for the channel's
            # short adaptive budget; a kernel that answers within it needs no
            # fd wake-up, future or event-loop round.  None: sent, reply owed.
            t0 = time.monotonic()
            msg = lease.ch.try_exchange(data)
            lease.m.sent(len(data))
            if msg is None:
                if retired is None:
                    msg = await self._receive_entered(lease, timeout, nonblocking, abort)
                    return msg
                try:
                    msg = await self._receive_entered(
                        lease, timeout, nonblocking, abort, retired
                    )
                    return msg
                except errors.Unavailable as exc:
                    if not retired.done() or not lease.active:
                        raise
                    raise errors.Unavailable(
                        f"{exc.message} (the request was sent: the next receive on lease "
                        f"{lease.id} gets its reply)"
                    ) from None
            lease.m.turn_wait.observe(time.monotonic() - t0)
            lease.m.received(len(msg.data))
            return msg
        except errors.PeerGone as exc:
            self._peer_gone(lease, exc)
            raise
        finally:
            if msg is None or not handover:
                self._leave(lease)

    async def _receive_entered(
        self,
        lease: Lease,
        timeout: float | None,
        nonblocking: bool,
        abort: asyncio.Future[None] | None,
        retired: asyncio.Future[None] | None = None,
    ) -> Message | None:
        held = lease.held
        if held is not None:  # taken before, its reply not delivered: first
            lease.held = None
            return held
        if nonblocking:
            msg = lease.ch.try_receive()
        else:
            t0 = time.monotonic()
            w = lease.waiter
            if w is None:
                w = lease.waiter = ChannelWaiter(lease.ch, lease.rx_what)
            # an abort is seen before the channel is read: the message a
            # wait ended so leaves stays for the next receive
            msg = await w.wait(timeout, (lease.ended, abort, retired))
            lease.m.turn_wait.observe(time.monotonic() - t0)
        if msg is not None:
            lease.m.received(len(msg.data))
        return msg


# ---------------------------------------------------------------- the RPCs' side

#: the longest lease_id a request may carry (kupd's are 16 hex digits;
#: a longer one is refused before it is looked up or quoted)
LEASE_ID_MAX = 64

#: How a receive waits (the kup.v1 ReceiveMode values): until the turn
#: comes back (bounded by the RPC's deadline), not at all, or timeout_ms.
RECEIVE_BLOCK = 0
RECEIVE_NONBLOCK = 1
RECEIVE_DEADLINE = 2


def receive_args(mode: int, timeout_ms: int) -> tuple[float | None, bool]:
    """(timeout in seconds or None, nonblocking) of a receive mode."""
    if mode == RECEIVE_BLOCK:
        return None, False
    if mode == RECEIVE_NONBLOCK:
        return None, True
    if mode == RECEIVE_DEADLINE:
        if timeout_ms <= 0:
            raise errors.InvalidArgument("RECEIVE_MODE_DEADLINE needs timeout_ms > 0")
        return timeout_ms / 1000, False
    raise errors.InvalidArgument(f"unknown receive mode {mode}")


def _withdrawn(attach_id: str) -> errors.NotFound:
    return errors.NotFound(
        f"attach {attach_id} was withdrawn by its client (Release by attach_id) "
        "before kupd granted it: no lease taken"
    )


class SessionState:
    """What a Session's operations look up once per stream rather than once
    per message: its lease, whether the RPC has a deadline at all, and the
    tenant's size limit under the policy it was read from (a reload
    installs a new policy object, which makes the next check look the
    tenant up again)."""

    __slots__ = ("_deadline", "_guard", "_policy", "_rpc", "_tenant", "lease")

    def __init__(self, rpc: Deadline, guard: Guard, lease: Lease) -> None:
        self.lease = lease
        self._rpc = rpc
        self._deadline = rpc.time_remaining() is not None
        self._guard = guard
        self._policy = guard.policy
        self._tenant = guard.tenant()

    def cap(self, timeout: float | None) -> float | None:
        """``timeout`` capped by the RPC's deadline."""
        if not self._deadline:
            return timeout
        remaining: float | None = self._rpc.time_remaining()
        if remaining is None:
            return timeout
        return remaining if timeout is None else min(timeout, remaining)

    def tenant(self) -> Tenant:
        """The stream's tenant under the running policy (looked up again
        only after a reload)."""
        guard = self._guard
        if guard.policy is not self._policy:
            self._tenant = guard.tenant()  # PermissionDenied if it was removed
            self._policy = guard.policy
        return self._tenant

    def check_size(self, t: Tenant, n: int) -> None:
        """``n`` bytes under ``t``'s max_message_bytes (``Guard.check_size``)."""
        if t.max_message_bytes and n > t.max_message_bytes:
            lease = self.lease
            self._guard.check_size(t, "session", lease.dev.name, lease.ch.id, n)


class Leasing:
    """Leases as the RPCs ask for them: the caller's tenant checked
    (kupd.policy) and paced, ownership of lease ids, Attach / Release by
    attach_id, the unary operations and a Session's -- over the
    :class:`LeaseTable`.  Errors are kupd.errors; kupd.service maps them."""

    def __init__(
        self,
        config: Config,
        guard: Guard,
        mgr: DeviceManager,
        leases: LeaseTable,
        drain: asyncio.Future[None],
    ) -> None:
        #: The running config (a reload replaces it: reattach_grace).
        self.config = config
        self.guard = guard
        self.mgr = mgr
        self.leases = leases
        self.drain = drain

    # -- checks ---------------------------------------------------------------
    def raise_if_draining(self) -> None:
        if self.drain.done():
            raise errors.Shutdown("kupd is shutting down")

    def unattached(self) -> str:
        """Count a Session stream that has not sent its attach yet (see
        LeaseTable.unattached), refused (ResourceExhausted) when kupd's or
        its tenant's max_sessions is reached.  Returns the tenant's name,
        for LeaseTable.unattached_leave."""
        t = self.guard.caller()
        # a tenant not allowed Sessions at all holds no stream open (and
        # takes no room from the others): refused now, not at its attach
        self.guard.check_op(t, "session")
        if t.max_sessions:  # counting walks every lease: only when there is a limit
            self.guard.check_sessions(t, "session", "", self.open_of(t.name))
        self.leases.check_room(t.name)
        self.leases.unattached_enter(t.name)
        return t.name

    def open_of(self, tenant: str) -> int:
        """The tenant's leases, attaches under way and Session streams not
        attached yet: what its max_sessions bounds."""
        mine = sum(1 for le in self.leases.leases.values() if le.tenant == tenant)
        return mine + self.guard.pending.get(tenant, 0) + self.leases.unattached.get(tenant, 0)

    def owner_of(self, lease_id: str) -> str:
        """The tenant of ``lease_id``: an open lease's own, else what the
        guard remembers of an ended one (a bounded record)."""
        lease = self.leases.leases.get(lease_id)
        return lease.tenant if lease is not None else self.guard.owner_of(lease_id)

    def sendable(self, lease: Lease) -> int:
        """What the caller may send on ``lease``: a client sizing its
        messages by it must not meet its tenant's lower limit."""
        return sendable(lease.ch.max_msg, self.guard.tenant())

    # -- taking ---------------------------------------------------------------
    async def take(self, device: str, chan: int | None, holder: str) -> Lease:
        """A lease of ``device``'s channel ``chan`` (None: any the tenant may
        use) for ``holder`` ("lease": an Attach; "session": a Session)."""
        self.raise_if_draining()
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
            self.guard.check_sessions(t, holder, device, self.open_of(t.name))
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
                    if held is None or self.owner_of(held[1]) != t.name:
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
            self.raise_if_draining()
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

    async def attach(self, device: str, chan: int | None, attach_id: str) -> Lease:
        """An Attach: a lease of ``device``'s channel ``chan``, named
        ``attach_id`` by its client ("" none: see :meth:`LeaseTable.withdraw`)."""
        if not attach_id:
            return await self.take(device, chan, "lease")
        tenant = self.guard.caller().name
        self._check_attach_id(tenant, attach_id)
        # the attach may wait for its channel: its client may withdraw it
        # meanwhile (Release by attach_id), which marks it here
        self.leases.attaching(tenant, attach_id)
        try:
            lease = await self.take(device, chan, "lease")
        except BaseException:
            # cancelled, past its deadline, or failed: no lease; its client
            # may send Release by this name as it gives up, and finds it done
            if not self.leases.attached(tenant, attach_id):
                self.leases.attach_given_up(tenant, attach_id)
            raise
        withdrawn = self.leases.attached(tenant, attach_id)
        if withdrawn:
            self.leases.abandoned(lease, f"its attach {attach_id} was withdrawn")
            raise _withdrawn(attach_id)
        self.leases.named(lease, attach_id)
        return lease

    def _check_attach_id(self, tenant: str, attach_id: str) -> None:
        """An Attach named ``attach_id``: NotFound when its client withdrew
        it (Release by attach_id) before it came, InvalidArgument when a
        live lease of the tenant, or an attach of it under way, has the
        name already."""
        if self.leases.attach_withdrawn(tenant, attach_id):
            raise _withdrawn(attach_id)
        held = self.leases.attach_in_use(tenant, attach_id)
        if held is not None:
            raise errors.InvalidArgument(
                f"attach_id {attach_id} is in use by {held}: one attach_id names one attach"
            )

    def undelivered(self, lease_id: str) -> None:
        """The reply of an Attach granting ``lease_id`` could not be written:
        its caller had gone (its client interrupted, dead, past its
        deadline, or it cancelled) by the time the lease was granted.  No
        one knows the lease's id, to use or release it: it ends now, reason
        ``caller gone``, instead of holding the channel until it idles out."""
        lease = self.leases.leases.get(lease_id)
        if lease is not None and lease.holder == "lease":
            self.leases.abandoned(lease, "its Attach reply could not be delivered")

    # -- Attach leases --------------------------------------------------------
    def lease_of(self, lease_id: str, where: dict[str, Any] | None = None) -> tuple[Lease, Tenant]:
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

    def release(self, lease_id: str, attach_id: str) -> None:
        """Release the caller's lease ``lease_id``, or withdraw its attach
        ``attach_id`` (one of the two)."""
        if not attach_id:
            if not lease_id:
                raise errors.InvalidArgument("release: lease_id or attach_id is required")
            self.leases.end(self.lease_of(lease_id)[0], "released")
            return
        if lease_id:
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
            self.leases.abandoned(
                self.lease_of(lease.id)[0], f"its client withdrew attach {attach_id}"
            )

    async def send(
        self,
        lease: Lease,
        t: Tenant,
        data: bytes | memoryview,
        again_of: str,
        rpc: Deadline,
        retired: asyncio.Future[None] | None,
    ) -> None:
        """A unary Send that waits for no reply (``t``: the caller's
        tenant).  What waits (the lease's turn) ends when a reload retires
        the socket: counted in its reply (kupd.retirement)."""
        if t.max_message_bytes and len(data) > t.max_message_bytes:
            self.guard.check_size(t, "lease", lease.dev.name, lease.ch.id, len(data))
        if t.channel_ops_per_second:
            limit = _deadline_cap(rpc, None)
            await self.guard.take_turn(t, "lease", lease, self.drain, limit, "Send", retired)
        with waiting_on(retired, "Send", lease.ended):
            await self.leases.send(lease, data, retired, again_of)

    async def exchange(
        self,
        lease: Lease,
        t: Tenant,
        data: bytes | memoryview,
        again_of: str,
        mode: int,
        timeout_ms: int,
        rpc: Deadline,
        retired: asyncio.Future[None] | None,
    ) -> Message | None:
        """A unary Send that waits for the reply, as ``mode`` / ``timeout_ms``
        say (None: a non-blocking one found none).  The message taken stays
        the lease's until its reply is written (``LeaseTable.settle``)."""
        if t.max_message_bytes and len(data) > t.max_message_bytes:
            self.guard.check_size(t, "lease", lease.dev.name, lease.ch.id, len(data))
        if mode == RECEIVE_BLOCK:
            timeout: float | None = None
            nonblocking = False
        else:
            timeout, nonblocking = receive_args(mode, timeout_ms)
        if t.channel_ops_per_second:
            limit = _deadline_cap(rpc, timeout)
            timeout = await self.guard.take_turn_within(
                t, "lease", lease, self.drain, limit, "Send", retired, nonblocking
            )
        with waiting_on(retired, "Send", lease.ended):
            return await self.leases.exchange(
                lease,
                data,
                _deadline_cap(rpc, timeout),
                nonblocking=nonblocking,
                abort=self.drain,
                retired=retired,
                handover=True,
                again_of=again_of,
            )

    async def pass_(
        self,
        lease: Lease,
        t: Tenant,
        again_of: str,
        rpc: Deadline,
        retired: asyncio.Future[None] | None,
    ) -> None:
        """A unary Pass."""
        if t.channel_ops_per_second:
            await self.guard.take_turn(
                t, "lease", lease, self.drain, _deadline_cap(rpc, None), "Pass", retired
            )
        log.debug("pass")  # nothing awaited from here to the wait for the lease
        with waiting_on(retired, "Pass", lease.ended):  # for its turn
            await self.leases.pass_(lease, retired, again_of)

    async def receive(
        self,
        lease: Lease,
        mode: int,
        timeout_ms: int,
        rpc: Deadline,
        t: Tenant | None,
        again_of: str,
    ) -> Message | None:
        """A unary Receive; ``t``: the caller's tenant, when it has a
        channel_ops_per_second to wait under first.  ``again_of``: the
        ReceiveRequest's (LeaseTable.receive).  The message taken stays the
        lease's until its reply is written (``LeaseTable.settle``)."""
        timeout, nonblocking = receive_args(mode, timeout_ms)
        timeout = _deadline_cap(rpc, timeout)
        retired = socket_retired()
        if t is not None:
            timeout = await self.guard.take_turn_within(
                t, "lease", lease, self.drain, timeout, "Receive", retired, nonblocking
            )
        with waiting_on(retired, "Receive", lease.ended):
            return await self.leases.receive(
                lease,
                timeout,
                nonblocking=nonblocking,
                abort=self.drain,
                retired=retired,
                handover=True,
                again_of=again_of,
            )

    # -- Sessions -------------------------------------------------------------
    async def next_request(
        self,
        reader: AsyncIterator[Req],
        lease: Lease | None,
        guard: StreamGuard,
        retired: asyncio.Future[None] | None = None,
    ) -> Req | None:
        """A Session's next request, or None at the end of the stream;
        raises when kupd drains, the lease is ended or the stream's socket
        is retired (``retired``) first (``guard`` cancels the wait)."""
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

    # Each Session operation looks its tenant up once (SessionState.tenant:
    # PermissionDenied once a reload removed it), before anything else.
    async def session_exchange(
        self, st: SessionState, data: bytes | memoryview, mode: int, timeout_ms: int
    ) -> Message | None:
        """A Session's exchange."""
        t = st.tenant()
        lease = st.lease
        if t.max_message_bytes:
            st.check_size(t, len(data))
        if mode == RECEIVE_BLOCK:
            timeout: float | None = None
            nonblocking = False
        else:
            timeout, nonblocking = receive_args(mode, timeout_ms)
        timeout = st.cap(timeout)
        if t.channel_ops_per_second:
            timeout = await self.guard.take_turn_within(
                t, "session", lease, self.drain, timeout, "Session", nonblocking=nonblocking
            )
        return await self.leases.exchange(
            lease, data, timeout, nonblocking=nonblocking, abort=self.drain
        )

    async def session_send(self, st: SessionState, data: bytes | memoryview) -> None:
        """A Session's send."""
        t = st.tenant()
        lease = st.lease
        if t.max_message_bytes:
            st.check_size(t, len(data))
        if t.channel_ops_per_second:
            await self.guard.take_turn(t, "session", lease, self.drain, st.cap(None), "Session")
        await self.leases.send(lease, data)

    async def session_receive(self, st: SessionState, mode: int, timeout_ms: int) -> Message | None:
        """A Session's receive."""
        t = st.tenant()
        lease = st.lease
        timeout, nonblocking = receive_args(mode, timeout_ms)
        timeout = st.cap(timeout)
        if t.channel_ops_per_second:
            timeout = await self.guard.take_turn_within(
                t, "session", lease, self.drain, timeout, "Session", nonblocking=nonblocking
            )
        return await self.leases.receive(lease, timeout, nonblocking=nonblocking, abort=self.drain)

    async def session_pass(self, st: SessionState) -> None:
        """A Session's pass."""
        t = st.tenant()
        lease = st.lease
        if t.channel_ops_per_second:
            await self.guard.take_turn(t, "session", lease, self.drain, st.cap(None), "Session")
        await self.leases.pass_(lease)

    async def session_failed(self, lease: Lease, exc: errors.KupError) -> None:
        """A Session ends with ``exc``: its lease ends before the status goes out."""
        if isinstance(exc, errors.Shutdown) and lease.active:
            # The kernel's SHUTDOWN reached this Session before kupd
            # read the device's state: read it now, so that watchers
            # see the device shutting down before this lease ends,
            # and it ends for the reason its device's other leases do.
            await lease.dev.refresh()
        self.leases.end(lease, f"error: {type(exc).__name__}")

    def session_gone(self, lease: Lease, _: object) -> None:
        """A Session RPC is over: its lease ends, if it has not yet."""
        self.leases.end(lease, "stream cancelled")


def _deadline_cap(rpc: Deadline, timeout: float | None) -> float | None:
    """``timeout`` capped by what is left of the RPC's deadline."""
    remaining: float | None = rpc.time_remaining()
    if remaining is None:
        return timeout
    return remaining if timeout is None else min(timeout, remaining)

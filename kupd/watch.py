"""Watch fan-out: device and lease events to every Watch stream.

Publishing never blocks: each subscriber has a bounded queue; a subscriber
that falls that far behind is dropped (its stream ends RESOURCE_EXHAUSTED)
rather than slowing kupd down or growing memory without bound.  Only the
events a subscriber may see go into its queue (its device, its tenant's
devices and channels): events it would never be shown must not count
towards its bound -- a tenant whose Watch ended "fell behind" would learn
that other tenants were busy on devices it may not know of.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from kupd import errors
from kupd.retirement import fresh_error

if TYPE_CHECKING:
    from kupd.devices import DeviceManager
    from kupd.policy import Guard, Tenant
    from kupd.sessions import LeaseTable

__all__ = [
    "DEVICE_REASONS",
    "RECHECK",
    "WATCHES_PER_TENANT",
    "Event",
    "EventBus",
    "EventType",
    "Watches",
]


class EventType:
    DEVICE_APPEARED = 1
    DEVICE_GONE = 2
    CHANNELS_ANNOUNCED = 3
    DEVICE_SHUTTING_DOWN = 4
    LEASE_TAKEN = 5
    LEASE_RELEASED = 6
    SERVER_SHUTTING_DOWN = 7
    DEVICE_DRAINED = 8
    DEVICE_UNDRAINED = 9


@dataclass(frozen=True)
class Event:
    type: int  # EventType.* (the kup.v1 WatchEventType values)
    device: str = ""
    channel: int = 0
    lease_id: str = ""
    holder: str = ""
    announced: int = 0
    notify_gen: int = 0
    reason: str = ""
    initial: bool = False
    time_unix_ms: int = field(default_factory=lambda: int(time.time() * 1000))


#: Not an event for clients: handed to every subscriber after a policy
#: reload so that each Watch re-checks its tenant's permission at once
#: instead of at the next real event (which may never come).
RECHECK = Event(type=0, reason="policy reloaded")

_QUEUE = 1024
_OVERFLOW = object()
_END = object()


#: Which events a subscriber's queue takes (RECHECK always)
Accept = Callable[[Event], bool]


class EventBus:
    def __init__(self) -> None:
        #: each subscriber's queue, and which events go into it
        self._subs: dict[asyncio.Queue[object], Accept] = {}

    def publish(self, event: Event) -> None:
        for q, accept in list(self._subs.items()):
            if event is not RECHECK and not accept(event):
                continue  # not its to see: not in its queue, not counted
            if q.qsize() >= _QUEUE - 1:
                del self._subs[q]
                q.put_nowait(_OVERFLOW)
            else:
                q.put_nowait(event)

    def close(self) -> None:
        """End every subscription (after the events already queued)."""
        for q in list(self._subs):
            q.put_nowait(_END)
        self._subs.clear()

    def recheck(self) -> None:
        """Hand RECHECK to every subscriber (after a policy reload)."""
        self.publish(RECHECK)

    @property
    def subscribers(self) -> int:
        return len(self._subs)

    async def subscribe(
        self, device: str = "", initial: list[Event] | None = None, accept: Accept | None = None
    ) -> AsyncIterator[Event]:
        """Events for ``device`` (all if empty) that ``accept`` takes (None:
        all), after ``initial``; both are judged as an event is published."""

        def take(ev: Event) -> bool:
            if device and ev.device and ev.device != device:
                return False
            return accept is None or accept(ev)

        q: asyncio.Queue[object] = asyncio.Queue()
        self._subs[q] = take
        try:
            for ev in initial or ():
                yield ev
            while True:
                item = await q.get()
                if item is _END:
                    return
                if item is _OVERFLOW:
                    raise errors.ResourceExhausted(
                        f"watch fell more than {_QUEUE} events behind; re-subscribe"
                    )
                assert isinstance(item, Event)
                yield item
        finally:
            self._subs.pop(q, None)


#: LEASE_RELEASED reasons a tenant is told for another tenant's lease: the
#: device's own fate, which its device events tell it anyway
DEVICE_REASONS = frozenset({"device gone", "device shutting down", "shutdown", "drained"})

#: Watch streams one tenant may hold open at once (with [[tenant]] tables;
#: not the admin's).  Every event is queued to every Watch: a tenant that
#: opened 11,000 of them slowed every other tenant's attach 60-fold.
WATCHES_PER_TENANT = 64


class Watches:
    """The Watch RPC below its protobuf: who may watch what (kupd.policy),
    each tenant's open watch streams, the initial state, and the events as
    the caller's tenant may see them -- another tenant's lease shown as a
    channel taken or let go, nothing more."""

    def __init__(
        self,
        guard: Guard,
        mgr: DeviceManager,
        leases: LeaseTable,
        bus: EventBus,
        drain: asyncio.Future[None],
        owner_of: Callable[[str], str],
    ) -> None:
        self.guard = guard
        self.mgr = mgr
        self.leases = leases
        self.bus = bus
        self.drain = drain
        #: the tenant of a lease id, open or ended (kupd.sessions.Leasing.owner_of)
        self.owner_of = owner_of
        #: Watch streams open per tenant (bounded: WATCHES_PER_TENANT)
        self.open: dict[str, int] = {}

    def raise_if_draining(self) -> None:
        """Shutdown once kupd drains: the first check of a Watch, before
        its turn under requests_per_second (a draining kupd says so, not
        "retry later")."""
        if self.drain.done():
            raise errors.Shutdown("kupd is shutting down")

    def start(self, device: str) -> Tenant:
        """The caller's tenant, allowed to watch ``device`` ("" all); after
        :meth:`raise_if_draining` and the request's turn."""
        from kupd.devices import device_arg

        t = self.guard.caller()
        if device:
            device_arg(device)
        self.guard.check_op(t, "watch", device)  # before the lookup
        if device:
            self.mgr.get(device)
        return t

    @contextlib.contextmanager
    def slot(self, t: Tenant, device: str = "") -> Iterator[None]:
        """One of the tenant's WATCHES_PER_TENANT watch streams (kup.v1 Watch
        and the health service's Watch alike), for the block; past the
        limit ResourceExhausted, rule watches."""
        if not self.guard.policy.multi or t.admin:
            yield
            return
        open_now = self.open.get(t.name, 0)
        if open_now >= WATCHES_PER_TENANT:
            self.guard.exhaust(
                t,
                "watch",
                device,
                None,
                "watches",
                f"{open_now} watch streams open (limit {WATCHES_PER_TENANT} per tenant)",
            )
        self.open[t.name] = open_now + 1
        try:
            yield
        finally:
            self.open[t.name] -= 1

    def initial(self, device: str) -> list[Event]:
        """The state of ``device`` ("" every device) as events."""
        from kupd.devices import SHUTDOWN_REASON

        out: list[Event] = []
        for d in self.mgr.devices.values():
            if device and d.name != device:
                continue
            if d.info is not None:
                out.append(
                    Event(
                        EventType.DEVICE_APPEARED,
                        d.name,
                        announced=d.info.announced,
                        notify_gen=d.info.notify_gen,
                        initial=True,
                    )
                )
                if d.info.shutting_down:
                    out.append(
                        Event(
                            EventType.DEVICE_SHUTTING_DOWN,
                            d.name,
                            reason=SHUTDOWN_REASON,
                            initial=True,
                        )
                    )
            else:
                out.append(Event(EventType.DEVICE_GONE, d.name, reason=d.error, initial=True))
            if d.name in self.guard.drained:
                out.append(Event(EventType.DEVICE_DRAINED, d.name, reason="admin", initial=True))
        for lease in self.leases.leases.values():
            if not device or lease.dev.name == device:
                out.append(
                    Event(
                        EventType.LEASE_TAKEN,
                        lease.dev.name,
                        channel=lease.ch.id,
                        lease_id=lease.id,
                        holder=lease.holder,
                        initial=True,
                    )
                )
        return out

    async def events(
        self,
        device: str,
        initial_state: bool,
        t: Tenant,
        retired: asyncio.Future[None] | None = None,
    ) -> AsyncIterator[tuple[Event, str, str]]:
        """The events of ``device`` ("" all) ``t`` may see, after the
        initial state when ``initial_state``: each with the lease id and
        reason it is shown (another tenant's lease: neither, unless the
        device is why it ended).  Ends with the socket's retirement
        (``retired``) or a reload that took the tenant's watch away."""
        initial = self.initial(device) if initial_state else []
        scoped = not (t.admin or t.grants is None)
        guard = self.guard

        def visible(ev: Event) -> bool:
            """Whether the tenant may see ``ev`` now: only such events are
            queued for this stream (and count towards its bound)."""
            if not ev.device:
                return True
            now = guard.policy.tenant(t.name)
            return now is not None and now.may_see(ev.device, ev.channel if ev.lease_id else None)

        async for ev in self.bus.subscribe(device, initial, visible if scoped else None):
            if ev is RECHECK and retired is not None and retired.done():
                # a reload retired the socket it came in on: the events
                # before it were delivered (Server._reload hands every
                # Watch RECHECK after it retired sockets)
                raise fresh_error(retired)
            lease_id, reason = ev.lease_id, ev.reason
            if scoped:
                # A reload may have removed the tenant or its watch since
                # (a reload hands every Watch RECHECK, so this runs at once).
                guard.check_op(guard.tenant(), "watch", device)
            if ev is RECHECK:
                continue
            if scoped and ev.device:
                now = guard.policy.tenant(t.name)
                chan = ev.channel if ev.lease_id else None
                if now is None or not now.may_see(ev.device, chan):
                    continue  # only what this tenant may use
                if lease_id and self.owner_of(lease_id) != t.name:
                    # another tenant's lease: that the channel was taken or
                    # let go, nothing more -- its id, and why it ended
                    # unless the device itself is why (an admin's revocation,
                    # a reload of the other's policy, its client's doings
                    # are the other tenant's business)
                    lease_id = ""
                    if reason not in DEVICE_REASONS:
                        reason = ""
            yield ev, lease_id, reason

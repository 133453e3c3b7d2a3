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
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field

from kupd import errors

__all__ = ["RECHECK", "Event", "EventBus", "EventType"]


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

"""Watch fan-out: device and lease events to every Watch stream.

Publishing never blocks: each subscriber has a bounded queue; a subscriber
that falls that far behind is dropped (its stream ends RESOURCE_EXHAUSTED)
rather than slowing kupd down or growing memory without bound.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
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


class EventBus:
    def __init__(self) -> None:
        self._subs: set[asyncio.Queue[object]] = set()

    def publish(self, event: Event) -> None:
        for q in list(self._subs):
            if q.qsize() >= _QUEUE - 1:
                self._subs.discard(q)
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
        self, device: str = "", initial: list[Event] | None = None
    ) -> AsyncIterator[Event]:
        """Events for ``device`` (all if empty), after ``initial``."""
        q: asyncio.Queue[object] = asyncio.Queue()
        self._subs.add(q)
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
                if item is RECHECK or not device or not item.device or item.device == device:
                    yield item
        finally:
            self._subs.discard(q)

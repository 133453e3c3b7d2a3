"""What a reload ends by retiring a socket: the RPCs waiting there, by kind.

A tenant socket a reload moves or removes is *retired*: its server's
retirement future (:func:`kupd.policy.socket_retired`) fails, and every RPC
of that socket that waits for something -- a message, its lease's turn, a
pool channel, the next event -- ends with its Unavailable.  Those RPCs say
so themselves as they end, but only after the reload has answered; the
reload's reply (``Admin.Reload``'s ``rpcs_ended``, the ``config reloaded``
log line) counts them as the retirement fires instead: each such wait is
registered here for as long as it lasts (:class:`waiting_on`), and
:func:`waiting_now` counts the registrations of one retirement.

A wait whose ``settled`` future is done already when the socket retires
ends for another reason, and is not counted: the lease it works on ended
(a lease this reload ended is in ``sessions_ended``), a queued Call was
granted its channel just before.
"""

from __future__ import annotations

import asyncio
import weakref
from collections.abc import Awaitable
from types import TracebackType
from typing import Any

from kupd import errors

__all__ = ["StreamGuard", "fresh_error", "until_retired", "waiting_now", "waiting_on"]

#: each retirement's waits (a weak key: a socket's future goes with its server)
_WAITING: weakref.WeakKeyDictionary[asyncio.Future[None], set[waiting_on]] = (
    weakref.WeakKeyDictionary()
)


class waiting_on:  # a context manager, used as a function
    """``with waiting_on(retired, "Receive", lease.ended): await ...``: an
    RPC of ``kind`` waits, and ``retired`` failing ends the wait.  Nothing
    is registered without a retirement (a request not served through a
    socket of kupd.tenants) or once it has fired.  Cheap: the hot path's
    RPCs (Send, Receive, Call) register too."""

    __slots__ = ("_retired", "kind", "settled")

    def __init__(
        self,
        retired: asyncio.Future[None] | None,
        kind: str,
        settled: asyncio.Future[Any] | None = None,
    ) -> None:
        self._retired = retired
        self.kind = kind
        self.settled = settled

    def __enter__(self) -> waiting_on:
        r = self._retired
        if r is not None:
            if r.done():
                self._retired = None
            else:
                waits = _WAITING.get(r)
                if waits is None:
                    waits = _WAITING[r] = set()
                waits.add(self)
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        r = self._retired
        if r is not None:
            waits = _WAITING.get(r)
            if waits is not None:
                waits.discard(self)


def waiting_now(retired: asyncio.Future[None]) -> dict[str, int]:
    """The waits ``retired`` failing now would end, by kind (none: {}).
    Call it before failing the future: their registrations go as each wait
    ends, in the tasks that run after."""
    counts: dict[str, int] = {}
    for w in _WAITING.get(retired, ()):
        if w.settled is None or not w.settled.done():
            counts[w.kind] = counts.get(w.kind, 0) + 1
    return counts


def fresh_error(fut: asyncio.Future[None]) -> errors.KupError:
    """A fresh copy of the KupError a done future (a retirement, kupd's
    drain) failed with -- one per request that reports it -- Shutdown if
    none."""
    exc = None if fut.cancelled() else fut.exception()
    if isinstance(exc, errors.KupError):
        return type(exc)(exc.message)
    return errors.Shutdown("kupd is shutting down")


class StreamGuard:
    """Ends a stream's wait for its next request when its lease ends, kupd
    drains or its socket is retired -- without a Task and an
    ``asyncio.wait`` per request: a done-callback on those futures cancels
    the handler's task, but only while it is waiting for a request
    (``waiting``); operations in flight see the same futures themselves
    (``wait_message`` aborts)."""

    __slots__ = ("_futs", "_task", "fired", "waiting")

    def __init__(self, *futs: asyncio.Future[None]) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._task = task
        self._futs: list[asyncio.Future[None]] = []
        self.waiting = False
        self.fired = False
        for f in futs:
            self.watch(f)

    def watch(self, fut: asyncio.Future[None]) -> None:
        self._futs.append(fut)
        fut.add_done_callback(self._done)

    def _done(self, _: asyncio.Future[None]) -> None:
        if self.waiting and not self.fired:
            self.fired = True
            self._task.cancel()

    def take_cancel(self) -> bool:
        """After a CancelledError: True when it was this guard's alone (now
        withdrawn); False when someone else cancelled too."""
        if not self.fired:
            return False
        self.fired = False
        return self._task.uncancel() == 0

    def close(self) -> None:
        for f in self._futs:
            f.remove_done_callback(self._done)
        self._futs.clear()


async def until_retired(aw: Awaitable[None], retired: asyncio.Future[None] | None) -> None:
    """Await ``aw`` (a stream that only ends when its client goes, as the
    health service's Watch); when ``retired`` -- the retirement of the
    socket the request came in on (kupd.policy.socket_retired) -- fires
    meanwhile, it is cancelled and the retirement's Unavailable raised
    instead."""
    if retired is None:
        await aw
        return
    guard = StreamGuard(retired)
    guard.waiting = True
    try:
        with waiting_on(retired, "Health.Watch"):
            await aw
    except asyncio.CancelledError:
        if not guard.take_cancel():
            raise  # not ours: the client went away
        raise fresh_error(retired) from None
    finally:
        guard.waiting = False
        guard.close()

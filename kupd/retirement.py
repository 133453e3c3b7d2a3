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
from types import TracebackType
from typing import Any

__all__ = ["waiting_now", "waiting_on"]

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

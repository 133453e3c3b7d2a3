"""The names of a client's lease receives (ReceiveRequest.receive_id,
again_of), shared by the sync and the asyncio client.

kupd keeps the message it answered a named receive with until the lease's
next operation (Lease.delivered), and the lease's next Receive naming that
receive in ``again_of`` gets it again.  A client that gave up on a receive
(interrupted, cancelled, past its deadline) does not know whether kupd wrote
its reply, nor -- when it gives up on the next one too, or that one fails --
whether that one reached kupd at all: one refused before it ran (a tenant's
channel_ops_per_second, an interrupt while gRPC started the RPC, the
connection lost) leaves kupd's Lease.delivered as it was, one that ran
replaced it.  So the lease's receives and exchanges after one given up on
take that one's name as their own (``receive_id``, and ``again_of`` for a
receive) until one of the lease's operations succeeds: whichever of them
kupd ran last, the name kupd kept is the one the next receive asks for.
The lease's sends and passes (and exchanges) carry that name in
``again_of`` too: kupd refuses one over the message it kept for it
(NotYourTurn: the client never got that message, and a send now would
answer it unread), and the name stays for the receive that asks again.
A non-blocking receive that found nothing does not count: kupd answers
one at once when another operation holds the lease -- such as the one
given up on, still under way in kupd, which may write its reply yet.

A caller that keeps the names itself -- across processes, as kupctl does:
each ``kupctl recv`` is a client of its own -- passes them to
``lease_receive`` (``receive_id=``, ``again_of=``): they take the place of
the client's own (:meth:`ReceiveNames.names`).
"""

from __future__ import annotations

import collections
import secrets
import threading

__all__ = ["AGAIN_KEPT", "ReceiveNames"]

#: how many leases' given-up receive names a client keeps, the oldest
#: forgotten past it (a lease never used again -- ended by kupd, or not
#: released -- would otherwise keep its name for the client's life)
AGAIN_KEPT = 1024


class ReceiveNames:
    """Per lease, the name of the receive (or exchange) its caller gave up
    on, until the lease's next operation that succeeds.  Thread-safe: one
    sync Client may be shared by threads."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._pending: collections.OrderedDict[str, str] = collections.OrderedDict()

    def __len__(self) -> int:
        return len(self._pending)

    def pending(self, lease_id: str) -> str:
        """The name of ``lease_id``'s receive given up on ("" when none)."""
        with self._lock:
            return self._pending.get(lease_id, "")

    @staticmethod
    def fresh() -> str:
        """A new receive_id: 32 random hex digits."""
        return secrets.token_hex(16)

    def names(
        self, lease_id: str, receive_id: str | None, again_of: str | None
    ) -> tuple[str, str, str]:
        """(pending, receive_id, again_of) of a receive on ``lease_id``:
        the name of the lease's receive given up on (see :meth:`pending`),
        and the names the request carries.  The caller's ``again_of``
        (checked, not None) takes the place of that pending name, and is
        the receive's own name too unless it gives ``receive_id``: should
        this receive be given up on as well, the name kupd keeps is the one
        the next asks for, whichever of the two kupd ran last."""
        pending = self.pending(lease_id)
        ask = pending if again_of is None else again_of
        return pending, receive_id or ask or self.fresh(), ask

    def given_up(self, lease_id: str, receive_id: str) -> None:
        """A receive or exchange named ``receive_id`` was given up on."""
        with self._lock:
            self._pending[lease_id] = receive_id
            self._pending.move_to_end(lease_id)
            while len(self._pending) > AGAIN_KEPT:
                self._pending.popitem(last=False)

    def succeeded(self, lease_id: str, pending: str) -> None:
        """An operation on ``lease_id`` that started while ``pending`` was
        its name (see :meth:`pending`) succeeded: kupd ran it after the one
        given up on, so that one's message is no longer kept.  A name set
        meanwhile (another thread's receive given up on) stays."""
        with self._lock:
            if self._pending.get(lease_id, "") == pending:
                self._pending.pop(lease_id, None)

    def forget(self, lease_id: str) -> None:
        """``lease_id`` was released."""
        with self._lock:
            self._pending.pop(lease_id, None)

    def clear(self) -> None:
        with self._lock:
            self._pending.clear()

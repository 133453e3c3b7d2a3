"""Waiting for a channel's turn on the asyncio loop: ``add_reader`` on the
channel's fd plus ``try_receive`` -- no thread per channel, no busy loop.

The fd is a hint (the turn may have come back, or the device is shutting
down); the control page is the truth, so every wake-up re-checks with
``try_receive`` (which, in libkup's poll mode, also consumes the wake-ups
that made the fd readable, so a stale wake-up cannot make the loop spin).
Each wait also re-checks once per ``SAFETY_SLICE`` seconds
even without a wake-up, so a lost wake-up could only ever delay a reply,
never hang it; an idle waiter costs one cheap check per slice.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Protocol

from kupd import errors
from kupd.channel import Channel, Message

__all__ = ["SAFETY_SLICE", "ChannelWaiter", "Deadline", "wait_message"]

SAFETY_SLICE = 5.0


class Deadline(Protocol):
    """What an operation's waits are bounded by besides their own timeout:
    its RPC's deadline (a ``grpc.aio.ServicerContext`` is one)."""

    def time_remaining(self) -> float | None:
        """Seconds left (None: no deadline)."""


async def wait_message(
    ch: Channel,
    timeout: float | None = None,
    aborts: Sequence[asyncio.Future[None] | None] = (),
    what: str = "",
) -> Message:
    """The kernel's next message on ``ch``.

    ``timeout`` seconds (None: no bound) -> DeadlineExceeded; when one of
    ``aborts`` completes first its exception (or Shutdown) is raised.
    """
    msg = ch.try_receive()
    if msg is not None:
        return msg
    loop = asyncio.get_running_loop()
    deadline = None if timeout is None else loop.time() + timeout
    fd = ch.fileno()
    live = [a for a in aborts if a is not None]
    while True:
        # One future woken by whichever comes first: the fd, an abort, the
        # slice's timer -- callbacks only, no asyncio.wait (sets, a waiter
        # future and a done-callback round per future per wake-up).
        woke: asyncio.Future[None] = loop.create_future()

        def _ready(_: object = None, f: asyncio.Future[None] = woke) -> None:
            if not f.done():
                f.set_result(None)

        slice_end = loop.time() + SAFETY_SLICE
        if deadline is not None and deadline < slice_end:
            slice_end = deadline
        timer = loop.call_at(slice_end, _ready)
        loop.add_reader(fd, _ready)
        for a in live:
            a.add_done_callback(_ready)
        try:
            await woke
        finally:
            loop.remove_reader(fd)
            timer.cancel()
            for a in live:
                a.remove_done_callback(_ready)
        for abort in live:
            if abort.done():
                exc = abort.exception() if not abort.cancelled() else None
                if isinstance(exc, errors.KupError):
                    raise type(exc)(exc.message)  # a fresh exception per waiter
                raise errors.Shutdown(f"{what or 'wait'} aborted: kupd is shutting down")
        msg = ch.try_receive()
        if msg is not None:
            return msg
        if deadline is not None and loop.time() >= deadline:
            raise errors.DeadlineExceeded(
                f"{what or f'channel {ch.id}'}: no message within {timeout:.3f}s"
            )


class ChannelWaiter:
    """:func:`wait_message` for a holder that waits on the same channel again
    and again (a lease): the per-wait set-up is kept between waits.

    * The fd stays registered with the loop after a wait (no
      ``add_reader`` / ``remove_reader`` -- two ``epoll_ctl`` -- per
      message).  When it polls readable while nobody waits, the callback
      unregisters it (a level-triggered fd would otherwise call it on every
      loop iteration); the next wait registers it again.
    * The abort futures get one done-callback each, the first time they are
      passed, not one per wait.
    * The safety slice is one timer per waiter, armed while a wait runs and
      re-armed only when it fires during a wait, instead of a timer per wait;
      a wait with a ``timeout`` still gets its own deadline timer.

    :meth:`close` before closing the channel (the fd is closed with it).
    """

    __slots__ = ("_fut", "_loop", "_registered", "_slice", "_watched", "ch", "fd", "what")

    def __init__(self, ch: Channel, what: str = "") -> None:
        self.ch = ch
        self.what = what
        self._loop = asyncio.get_running_loop()
        self.fd = ch.fileno()
        self._fut: asyncio.Future[None] | None = None
        self._registered = False
        self._slice: asyncio.TimerHandle | None = None
        self._watched: list[asyncio.Future[None]] = []

    def _ready(self) -> None:
        fut = self._fut
        if fut is None:
            if self._registered:
                self._loop.remove_reader(self.fd)
                self._registered = False
            return
        if not fut.done():
            fut.set_result(None)

    def _woken(self, _: object = None) -> None:
        fut = self._fut
        if fut is not None and not fut.done():
            fut.set_result(None)

    def _slice_end(self) -> None:
        self._slice = None
        if self._fut is not None:
            self._woken()
            self._slice = self._loop.call_later(SAFETY_SLICE, self._slice_end)

    async def wait(
        self,
        timeout: float | None = None,
        aborts: Sequence[asyncio.Future[None] | None] = (),
    ) -> Message:
        """As :func:`wait_message`: the kernel's next message; DeadlineExceeded
        after ``timeout`` seconds; an abort's exception (or Shutdown)."""
        msg = self.ch.try_receive()
        if msg is not None:
            return msg
        loop = self._loop
        live = [a for a in aborts if a is not None]
        for a in live:
            if a not in self._watched:
                a.add_done_callback(self._woken)
                self._watched.append(a)
        deadline = None if timeout is None else loop.time() + timeout
        timer = None if deadline is None else loop.call_at(deadline, self._woken)
        try:
            while True:
                for abort in live:
                    if abort.done():
                        exc = abort.exception() if not abort.cancelled() else None
                        if isinstance(exc, errors.KupError):
                            raise type(exc)(exc.message)  # a fresh exception per waiter
                        raise errors.Shutdown(
                            f"{self.what or 'wait'} aborted: kupd is shutting down"
                        )
                fut = self._fut = loop.create_future()
                if not self._registered:
                    loop.add_reader(self.fd, self._ready)
                    self._registered = True
                if self._slice is None:
                    self._slice = loop.call_later(SAFETY_SLICE, self._slice_end)
                try:
                    await fut
                finally:
                    self._fut = None
                for abort in live:
                    if abort.done():
                        break
                else:
                    msg = self.ch.try_receive()
                    if msg is not None:
                        return msg
                    if deadline is not None and loop.time() >= deadline:
                        raise errors.DeadlineExceeded(
                            f"{self.what or f'channel {self.ch.id}'}: "
                            f"no message within {timeout:.3f}s"
                        )
        finally:
            if timer is not None:
                timer.cancel()

    def close(self) -> None:
        """Stop watching the fd and the aborts.  Idempotent."""
        if self._registered:
            self._loop.remove_reader(self.fd)
            self._registered = False
        if self._slice is not None:
            self._slice.cancel()
            self._slice = None
        for a in self._watched:
            a.remove_done_callback(self._woken)
        self._watched.clear()
        self._woken()

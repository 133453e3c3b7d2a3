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

from kupd import errors
from kupd.channel import Channel, Message

__all__ = ["SAFETY_SLICE", "wait_message"]

SAFETY_SLICE = 5.0


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

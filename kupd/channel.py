"""The Python channel layer: KUP devices and channels over libkup.

A *device* is what a kernel module created with ``kupdev_create``; a
*channel* is one of its shared-page, turn-taking conversations.  This module
wraps the C extension :mod:`kupd._kupchan` (libkup compiled in) in typed
objects::

    from kupd.channel import Device

    with Device.open("echo") as dev:               # NotFound
        print(dev.info())                          # DeviceInfo(...)
        with dev.channel() as ch:                  # any free channel
            greeting = ch.receive()                # the kernel holds a fresh channel
            ch.send(b"hello")                      # hand the turn over with data
            reply = ch.receive(timeout=5.0)        # Message(data, kind, seq)
            reply = ch.exchange(b"again", 5.0)     # the same two steps as ONE call

``exchange`` (send + receive) is the fastest round trip: one call into the
extension, no Python frame; ``try_exchange`` sends and only spins briefly for
the answer (None: it is owed to a later receive), for callers that have an
event loop to return to.

Turn rules (docs/DESIGN.md): exactly one side holds the turn; ``send`` and
``pass_`` need it (else :class:`~kupd.errors.NotYourTurn`, never a wait);
``receive`` waits until the kernel hands it back.

Timeouts: ``receive(timeout=None)`` blocks, ``timeout=0`` never blocks
(:class:`~kupd.errors.NotReady` if the kernel still holds the turn), a
positive number of seconds raises :class:`~kupd.errors.DeadlineExceeded`
when it expires.  Every blocking wait runs with the GIL released; libkup
spins briefly, then sleeps on the channel's wake-up fd, so an idle waiter
costs (almost) no CPU.  The wait is cut into slices of at most
``_kupchan.WAIT_SLICE_MS`` so that ^C and a ``close()`` from another thread
are noticed.

Errors are the classes of :mod:`kupd.errors`, one per ``KUP_E_*`` code.

Threads: different channels may be used by different threads at once (this
is the point of releasing the GIL).  One channel is used by one thread at a
time; a second thread touching a channel that is busy in another thread
gets :class:`~kupd.errors.Busy` rather than a corrupted channel.  Closing a
channel while another thread is blocked in ``receive`` makes that receive
raise :class:`~kupd.errors.InvalidArgument` within one wait slice.

Multiplexing many channels (the gateway pattern)
-------------------------------------------------
Blocking one thread per channel does not scale to thousands of channels.
Instead, register each channel's :meth:`Channel.fileno` with an event loop
and call :meth:`Channel.try_receive` when it polls readable::

    loop = asyncio.get_running_loop()

    def on_readable(ch: Channel) -> None:
        try:
            msg = ch.try_receive()      # never blocks; None: not our turn yet
        except NotYourTurn:
            return                      # a late wake-up for a message already taken
        if msg is not None:
            handle(ch, msg)             # e.g. resolve a future waiting for it

    loop.add_reader(ch.fileno(), on_readable, ch)

The fd is only a hint ("the turn may have come back, or the device is
shutting down"): the control page is the truth, which is why the callback
re-checks with ``try_receive``.  Spurious readiness is harmless; a
``None`` just means wait for the next event.  ``try_receive`` holds the GIL
and never sleeps (a few loads of the control page, at most a non-blocking
read of the wake-up fd), so it is cheap enough to call on every event; it
raises :class:`~kupd.errors.Shutdown` once the device is going away (remove
the reader then), and :class:`~kupd.errors.NotYourTurn` if this side
already holds the turn and has taken the kernel's message.
tests/kupd/test_channel_asyncio.py runs this pattern over 32 channels.

The first ``fileno()`` call switches the channel into poll mode: from then
on the kernel side signals the fd on every hand-over (one eventfd write or
wake-up per message), which blocking users of a channel do not pay for.
Call it only for channels you multiplex.  Remove the reader
(``loop.remove_reader``) before closing the channel: the fd is closed with
it.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from types import TracebackType
from typing import Protocol, Self

from kupd import _kupchan
from kupd.abi import KUP_INFO_ATTACHED, KUP_INFO_MODULE_HOLDS, Kind
from kupd.errors import InvalidArgument

__all__ = ["Channel", "Device", "DeviceInfo", "Kind", "Message"]


@dataclass(frozen=True, slots=True)
class Message:
    """One received hand-over: the payload, what kind it was, its sequence number."""

    data: bytes
    kind: Kind
    seq: int


@dataclass(frozen=True, slots=True)
class DeviceInfo:
    """A snapshot of a device's state (``kernproxy_info``)."""

    name: str
    abi_version: int
    page_size: int
    chan_count: int
    announced: int  # channels announced (attachable): ids [0, announced)
    pages: int  # pages per direction
    max_msg: int  # bytes per message (= pages * page_size)
    notify_gen: int  # bumped by every kupdev_notify / announce
    shutting_down: bool
    attached: tuple[int, ...]  # ids of the channels a user side holds
    #: ids of the channels a module thread holds locked (from its receive to
    #: kupdev_unlock_channel): computing a reply, or, not attached, still
    #: not let go after its user left -- for good if the thread exited or
    #: hangs without unlocking (attaching it waits, then Releasing)
    module_holds: tuple[int, ...] = ()


# int -> Kind without going through EnumType.__call__ on every message: a
# plain dict lookup is a handful of instructions, the enum call a few hundred,
# which shows after the process sat idle (cold caches: bench F5, helper-15).
_KINDS: dict[int, Kind] = {int(k): k for k in Kind}
# receive / try_receive / exchange / try_exchange build their Message in C,
# without a frame (the timeout's seconds -> ms conversion is in C too)
_kupchan.set_message_type(Message, _KINDS)


class _Exchange(Protocol):
    def __call__(
        self, data: bytes | bytearray | memoryview, timeout: float | None = None
    ) -> Message: ...


class _Receive(Protocol):
    def __call__(self, timeout: float | None = None) -> Message: ...


class Channel:
    """An attached channel.  Made by :meth:`Device.channel`.

    ``receive(timeout=None) -> Message``
        Wait for the kernel's next message.  ``timeout``: None waits without
        bound, 0 does not wait (:class:`~kupd.errors.NotReady`), otherwise
        seconds (:class:`~kupd.errors.DeadlineExceeded`); anything else
        (negative, NaN, not a number) is :class:`~kupd.errors.InvalidArgument`.

    ``try_receive() -> Message | None``
        The kernel's message if the turn is ours, else None.  Never blocks.

    ``exchange(data, timeout=None) -> Message``
        Send ``data`` and wait for the kernel's answer: :meth:`send` then
        :meth:`receive` as ONE call into the extension (the GIL is released
        once, libkup spins briefly then sleeps, the Message is built in C).
        Errors as those two: a refused send (:class:`~kupd.errors.TooBig`,
        :class:`~kupd.errors.NotYourTurn`, :class:`~kupd.errors.Busy`, a
        closed channel, a bad ``timeout``) sends nothing; a failed wait
        (:class:`~kupd.errors.DeadlineExceeded`, ``timeout=0``'s
        :class:`~kupd.errors.NotReady`, :class:`~kupd.errors.Shutdown`,
        :class:`~kupd.errors.PeerGone`, a signal) leaves the data sent and the
        reply owed to a later :meth:`receive` / :meth:`try_receive`.
        ``timeout`` is as :meth:`receive`'s.

    ``try_exchange(data) -> Message | None``
        Send ``data``, then spin for the kernel's answer for at most the
        channel's adaptive spin budget (the spin a blocking receive does
        before it sleeps: microseconds, learnt from recent replies), with the
        GIL released.  Never sleeps.  Returns the reply, or None if it has not
        come by then: the data is sent and the reply is owed to a later
        :meth:`receive` / :meth:`try_receive` (e.g. when :meth:`fileno` polls
        readable).  Send errors as :meth:`send` (nothing sent); errors after
        the send (:class:`~kupd.errors.Shutdown`,
        :class:`~kupd.errors.PeerGone`) leave the data sent.

    These four are the extension's own methods, bound per channel: a call
    runs no Python frame at all (after an idle spell each frame costs ~10 us
    on the development VM: bench FINDINGS F5).
    """

    __slots__ = ("_c", "_device", "exchange", "receive", "try_exchange", "try_receive")

    receive: _Receive
    try_receive: Callable[[], Message | None]
    exchange: _Exchange
    try_exchange: Callable[[bytes | bytearray | memoryview], Message | None]

    def __init__(self, device: Device, c: _kupchan.Channel) -> None:
        self._device = device  # keeps the device (and its handle) alive
        self._c = c
        self.receive = c.receive_message
        self.try_receive = c.try_receive_message
        self.exchange = c.exchange
        self.try_exchange = c.try_exchange

    # -- facts -------------------------------------------------------------
    @property
    def id(self) -> int:
        """This channel's index on its device."""
        return self._c.id

    @property
    def max_msg(self) -> int:
        """The largest message, in bytes, either direction."""
        return self._c.max_msg

    @property
    def device(self) -> Device:
        return self._device

    @property
    def closed(self) -> bool:
        return self._c.closed

    def fileno(self) -> int:
        """A fd that polls readable when the turn may have come back (or the
        device is shutting down).  Owned by the channel: do not close it."""
        return self._c.fileno()

    def my_turn(self) -> bool:
        """True if this side holds the turn right now."""
        return self._c.my_turn()

    def state(self) -> int:
        """0 while the channel is usable, else the ``KUP_E_*`` code its next
        operation would fail with (``KUP_E_PEER``: the kernel side ended
        this user's session), read from its page: never waits.  How a holder
        that is not using the channel learns that the kernel is done with
        it (only a waiting user is woken)."""
        return self._c.state()

    def unread(self) -> Kind | None:
        """The kind of the kernel's message this side holds the turn with
        and has not received yet; None when there is none."""
        kind = self._c.unread()
        return Kind(kind) if kind else None

    def keep_unread(self, on: bool = True) -> None:
        """A send or pass while the kernel's DATA message is unread drops
        it (the caller answers without reading).  With ``on`` it raises
        :class:`~kupd.errors.NotYourTurn` instead and the message stays for
        a receive -- what kupd sets on every channel it leases: it never
        drops a kernel message on a client's behalf."""
        self._c.keep_unread(on)

    # -- the turn protocol -----------------------------------------------------
    def send(self, data: bytes | bytearray | memoryview) -> None:
        """Send ``data`` (any C-contiguous buffer) and hand the turn to the kernel.

        :class:`~kupd.errors.TooBig` (nothing sent, channel unchanged) if
        ``len(data) > max_msg``; :class:`~kupd.errors.NotYourTurn` if the
        kernel holds the turn; :class:`~kupd.errors.Shutdown`,
        :class:`~kupd.errors.PeerGone`.  It raises only before the
        hand-over: once it returns, the message is the kernel's (never send
        it again).  A failed wake-up of the kernel side does not make it
        raise: the next receive wakes it again, or raises that error
        (libkup's kup.h, kernproxy_send "Delivery").
        """
        self._c.send(data)

    def pass_(self) -> None:
        """Hand the turn to the kernel without data (a PASS message)."""
        self._c.pass_()

    def close(self) -> None:
        """Leave the channel (sends CLOSE if holding the turn).  Idempotent."""
        self._c.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "closed" if self.closed else f"max_msg={self.max_msg}"
        return f"<Channel {self._device.name}#{self.id} {state}>"


class Device:
    """An open KUP device.  Use :meth:`Device.open`."""

    __slots__ = ("_d",)

    def __init__(self, d: _kupchan.Device) -> None:
        self._d = d

    @classmethod
    def open(cls, name: str | os.PathLike[str]) -> Device:
        """Open a device by name (``"echo"``) or path (contains ``/``: e.g. a
        kupsim socket).  :class:`~kupd.errors.NotFound` if there is none."""
        text = os.fspath(name)
        if not isinstance(text, str):
            raise InvalidArgument(f"device name must be str or a path, not {name!r}")
        return cls(_kupchan.open(text))

    @property
    def name(self) -> str:
        """The name or path given to :meth:`open`."""
        return self._d.name

    @property
    def closed(self) -> bool:
        return self._d.closed

    def info(self) -> DeviceInfo:
        """A fresh snapshot of the device's state."""
        (name, abi_version, page_size, chan_count, announced, pages, max_msg, notify_gen,
         shutting_down, attached) = self._d.info()
        return DeviceInfo(
            name=name,
            abi_version=abi_version,
            page_size=page_size,
            chan_count=chan_count,
            announced=announced,
            pages=pages,
            max_msg=max_msg,
            notify_gen=notify_gen,
            shutting_down=bool(shutting_down),
            attached=tuple(i for i, a in enumerate(attached) if a & KUP_INFO_ATTACHED),
            module_holds=tuple(
                i for i, a in enumerate(attached) if a & KUP_INFO_MODULE_HOLDS
            ),
        )

    def channel(self, chan_id: int | None = None, pages: int = 0) -> Channel:
        """Attach channel ``chan_id`` (None: the first free announced one).

        ``pages`` 0 accepts the device's size, otherwise it must match
        (:class:`~kupd.errors.InvalidArgument`).  Errors:
        :class:`~kupd.errors.NotReady` (not announced yet),
        :class:`~kupd.errors.Busy` (attached elsewhere / none free),
        :class:`~kupd.errors.NotFound` (id out of range),
        :class:`~kupd.errors.VersionMismatch`, :class:`~kupd.errors.Shutdown`.
        """
        if chan_id is not None and (isinstance(chan_id, bool) or not isinstance(chan_id, int)
                                    or chan_id < 0):
            raise InvalidArgument(f"chan_id must be None or an int >= 0, not {chan_id!r}")
        if isinstance(pages, bool) or not isinstance(pages, int) or pages < 0:
            raise InvalidArgument(f"pages must be an int >= 0, not {pages!r}")
        return Channel(self, self._d.channel(-1 if chan_id is None else chan_id, pages))

    def event_fd(self) -> int:
        """A fd that polls readable on device events (announce, shutdown);
        call :meth:`info` to see what changed.  Owned by the device."""
        return self._d.event_fd()

    def close(self) -> None:
        """Close the device.  Idempotent; channels still open keep working and
        the underlying handle is released when the last of them closes."""
        self._d.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<Device {self.name!r}{' closed' if self.closed else ''}>"

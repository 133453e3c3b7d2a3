"""Plain data types of the client API (converted from the protobuf messages)."""

from __future__ import annotations

import enum
import os
import socket
from dataclasses import dataclass, field
from typing import TypeAlias

from kupapi import MAX_GRPC_MESSAGE, kup_pb2
from kupapi.abi import Kind
from kupclient._args import seconds_arg

__all__ = [
    "ATTACH_DEADLINE",
    "KEEPALIVE_TIMEOUT_MS",
    "KEEPALIVE_TIME_MS",
    "KUPD_GRACE",
    "RECONNECT_INITIAL_MS",
    "RECONNECT_MAX_MS",
    "CallReply",
    "ChannelInfo",
    "Data",
    "DeviceInfo",
    "EventType",
    "Kind",
    "Lease",
    "Message",
    "Sampled",
    "WatchEvent",
    "attach_deadline",
    "call_reply_from_pb",
    "channel_options",
    "deadline",
    "default_caller",
    "message_from_pb",
    "note_channel_bytes",
    "receive_mode",
    "target_for",
]


#: What a data argument may be: a ``bytearray`` or ``memoryview`` is copied
#: (or encoded as it is) before the call returns.
Data: TypeAlias = bytes | bytearray | memoryview


@dataclass(frozen=True)
class Message:
    """A message from the kernel side: payload, kind and sequence number."""

    data: bytes
    kind: Kind
    seq: int


@dataclass(frozen=True, eq=False)
class CallReply(Message):
    """A Call's reply (``call()``): the :class:`Message`, and the pool
    ``channel`` of the device that carried it (as Node's ``call`` gives).

    It compares equal to a plain Message of the same data, kind and seq
    (call() returned a Message before), and to a CallReply only with the
    same channel too."""

    channel: int = 0

    def __eq__(self, other: object) -> bool:
        if isinstance(other, CallReply):
            return (self.data, self.kind, self.seq, self.channel) == (
                other.data,
                other.kind,
                other.seq,
                other.channel,
            )
        if type(other) is Message:
            return (self.data, self.kind, self.seq) == (other.data, other.kind, other.seq)
        return NotImplemented

    def __hash__(self) -> int:  # as the Message's: equal ones hash alike
        return hash((self.data, self.kind, self.seq))


@dataclass(frozen=True)
class ChannelInfo:
    id: int
    #: "free", "session", "lease", "calls", "quarantined", "external",
    #: "module" (its module still holds it locked, no user), "not_announced"
    state: str
    lease_id: str = ""


@dataclass(frozen=True)
class DeviceInfo:
    name: str
    reachable: bool
    abi_version: int
    page_size: int
    channel_count: int
    announced: int
    pages_per_channel: int
    max_message_bytes: int
    notify_gen: int
    shutting_down: bool
    call_channels: int
    error: str = ""
    #: the Call pool's Calls in flight / queued: the caller's tenant's own
    #: (calls_tenant names it), or every Call of the pool (calls_tenant "":
    #: the admin socket, a kupd without tenants)
    calls_in_flight: int = 0
    calls_queued: int = 0
    channels: list[ChannelInfo] = field(default_factory=list)
    #: the admin drained it: no new sessions, leases or Calls until undone
    drained: bool = False
    #: seconds its host has not answered kupd (reachable: hung or stopped;
    #: the rest is the last state it gave); 0.0 while it answers
    not_answering_s: float = 0.0
    #: the tenant whose Calls calls_in_flight / calls_queued count ("": all)
    calls_tenant: str = ""
    #: reachable and answering, but new attaches cannot reach it (its node,
    #: kupsim: socket, was removed); those attached go on; error says why
    cannot_attach: bool = False


@dataclass(frozen=True)
class Lease:
    lease_id: str
    device: str
    channel: int
    max_message_bytes: int
    idle_timeout_ms: int


class EventType(enum.Enum):
    DEVICE_APPEARED = kup_pb2.WATCH_EVENT_TYPE_DEVICE_APPEARED
    DEVICE_GONE = kup_pb2.WATCH_EVENT_TYPE_DEVICE_GONE
    CHANNELS_ANNOUNCED = kup_pb2.WATCH_EVENT_TYPE_CHANNELS_ANNOUNCED
    DEVICE_SHUTTING_DOWN = kup_pb2.WATCH_EVENT_TYPE_DEVICE_SHUTTING_DOWN
    LEASE_TAKEN = kup_pb2.WATCH_EVENT_TYPE_LEASE_TAKEN
    LEASE_RELEASED = kup_pb2.WATCH_EVENT_TYPE_LEASE_RELEASED
    SERVER_SHUTTING_DOWN = kup_pb2.WATCH_EVENT_TYPE_SERVER_SHUTTING_DOWN
    DEVICE_DRAINED = kup_pb2.WATCH_EVENT_TYPE_DEVICE_DRAINED
    DEVICE_UNDRAINED = kup_pb2.WATCH_EVENT_TYPE_DEVICE_UNDRAINED


@dataclass(frozen=True)
class WatchEvent:
    type: EventType
    device: str
    channel: int = 0
    lease_id: str = ""
    holder: str = ""
    announced: int = 0
    notify_gen: int = 0
    reason: str = ""
    initial: bool = False
    time_unix_ms: int = 0

    @classmethod
    def from_pb(cls, ev: kup_pb2.WatchEvent) -> WatchEvent:
        return cls(
            type=EventType(ev.type),
            device=ev.device,
            channel=ev.channel,
            lease_id=ev.lease_id,
            holder=ev.holder,
            announced=ev.announced,
            notify_gen=ev.notify_gen,
            reason=ev.reason,
            initial=ev.initial,
            time_unix_ms=ev.time_unix_ms,
        )


_STATE_NAMES = {
    kup_pb2.CHANNEL_STATE_NOT_ANNOUNCED: "not_announced",
    kup_pb2.CHANNEL_STATE_FREE: "free",
    kup_pb2.CHANNEL_STATE_SESSION: "session",
    kup_pb2.CHANNEL_STATE_LEASE: "lease",
    kup_pb2.CHANNEL_STATE_CALLS: "calls",
    kup_pb2.CHANNEL_STATE_QUARANTINED: "quarantined",
    kup_pb2.CHANNEL_STATE_EXTERNAL: "external",
    kup_pb2.CHANNEL_STATE_MODULE: "module",
}


def device_from_pb(d: kup_pb2.DeviceInfo) -> DeviceInfo:
    return DeviceInfo(
        name=d.name,
        reachable=d.reachable,
        abi_version=d.abi_version,
        page_size=d.page_size,
        channel_count=d.channel_count,
        announced=d.announced,
        pages_per_channel=d.pages_per_channel,
        max_message_bytes=d.max_message_bytes,
        notify_gen=d.notify_gen,
        shutting_down=d.shutting_down,
        call_channels=d.call_channels,
        error=d.error,
        calls_in_flight=d.calls_in_flight,
        calls_queued=d.calls_queued,
        drained=d.drained,
        not_answering_s=d.not_answering_ms / 1000,
        calls_tenant=d.calls_tenant,
        cannot_attach=d.cannot_attach,
        channels=[
            ChannelInfo(c.id, _STATE_NAMES.get(c.state, "unknown"), c.lease_id) for c in d.channels
        ],
    )


def note_channel_bytes(sizes: dict[str, int], devices: list[DeviceInfo]) -> None:
    """Keep each device's channel data area (pages_per_channel x page_size)
    in ``sizes``: a Session's TooBig then tells the channel's limit from a
    tenant's lower one (kupclient._args.check_size)."""
    for d in devices:
        if d.reachable and d.pages_per_channel and d.page_size:
            sizes[d.name] = d.pages_per_channel * d.page_size


def lease_from_pb(a: kup_pb2.AttachResponse) -> Lease:
    return Lease(a.lease_id, a.device, a.channel, a.max_message_bytes, a.idle_timeout_ms)


_KINDS: dict[int, Kind] = {int(k): k for k in Kind}
_new_message = object.__new__
_set = object.__setattr__


def call_reply_from_pb(resp: kup_pb2.CallResponse) -> CallReply:
    """The CallReply of a CallResponse (the fast path of message_from_pb)."""
    m = resp.reply
    kind = m.kind
    k = _KINDS.get(kind)
    reply = _new_message(CallReply)
    _set(reply, "data", bytes(m.data))
    _set(reply, "kind", Kind(kind) if k is None else k)
    _set(reply, "seq", m.seq)
    _set(reply, "channel", resp.channel)
    return reply


def message_from_pb(m: kup_pb2.Message) -> Message:
    """The Message of ``m``.  On every reply's path, so it skips the frozen
    dataclass's generated ``__init__`` (same fields, same object) and maps the
    kind by dict; an unknown kind still goes through ``Kind()`` and raises."""
    kind = m.kind
    k = _KINDS.get(kind)
    msg = _new_message(Message)
    _set(msg, "data", bytes(m.data))
    _set(msg, "kind", Kind(kind) if k is None else k)
    _set(msg, "seq", m.seq)
    return msg


#: Seconds the client waits past an operation's own timeout for kupd's
#: answer: kupd applies the timeout and answers DeadlineExceeded itself (with
#: its error attached); only when kupd does not answer at all (hung, stopped)
#: does the client give up, after timeout + KUPD_GRACE.  The gRPC deadline
#: of a unary RPC with a timeout, and the bound of a Session operation.
KUPD_GRACE = 5.0

#: The gRPC deadline of an Attach (seconds) unless its caller gives one
#: (``attach(timeout=)``): kupd itself waits up to 10 s for a channel its
#: module has not let go of, then answers Releasing.
ATTACH_DEADLINE = 30.0


def attach_deadline(timeout: object) -> float:
    """The gRPC deadline of an Attach whose caller gave ``timeout``
    (seconds, a finite number > 0; None: ATTACH_DEADLINE, read at each
    attach).  kupd has no timeout of its own for an Attach: the deadline is
    all of it, and an attach past it is given up on as an interrupted one."""
    t = seconds_arg(timeout, zero_ok=False)
    return ATTACH_DEADLINE if t is None else t


def deadline(timeout: float | None) -> float | None:
    """The client-side bound of an operation with ``timeout`` (None: none)."""
    return None if timeout is None else timeout + KUPD_GRACE


class Sampled:
    """What a Session channel keeps for the watchdog that bounds its
    operations (sync: a thread; async: a loop timer): the operation waiting
    (``_next_id``, its bound, whether its reply is owed) and the watchdog's
    last look at it.  :meth:`_overdue` is that look."""

    _next_id: int
    _owed: bool
    _bound: float | None
    _seen: int
    _seen_at: float

    def _overdue(self, now: float) -> bool:
        """Whether the same operation has now waited past its bound (the
        request id sampled at the previous look is still the one waiting)."""
        bound = self._bound
        if not self._owed or bound is None:
            self._seen = 0
            return False
        if self._seen != self._next_id:
            self._seen, self._seen_at = self._next_id, now
            return False
        return now - self._seen_at > bound


def receive_mode(timeout: float | None) -> tuple[kup_pb2.ReceiveMode.ValueType, int]:
    """(mode, timeout_ms) for a libkup-style timeout: None blocks, 0 does not wait."""
    t = seconds_arg(timeout, zero_ok=True)
    if t is None:
        return kup_pb2.RECEIVE_MODE_BLOCK, 0
    if t == 0:
        return kup_pb2.RECEIVE_MODE_NONBLOCK, 0
    return kup_pb2.RECEIVE_MODE_DEADLINE, max(1, round(t * 1000))


def target_for(path: str) -> str:
    """The gRPC target of kupd's unix socket."""
    if path.startswith("unix:"):
        return path
    return "unix:" + os.path.abspath(path)


#: The client pings kupd after this long without traffic on the connection
#: (kupd accepts a ping every 5 s at most, and answers more with GOAWAY) ...
KEEPALIVE_TIME_MS = 30_000
#: ... and drops the connection when the ping is not answered within this
#: long: an operation waiting on a hung (e.g. stopped) kupd fails Unavailable
#: instead of waiting as long as kupd does.
KEEPALIVE_TIMEOUT_MS = 10_000

#: After a failed connect, gRPC waits this long before the next attempt,
#: growing the wait (x1.6, +-20 % jitter) up to RECONNECT_MAX_MS.  gRPC's own
#: defaults (1 s growing to 120 s) are for remote servers: with them a client
#: whose kupd was down for 20 s kept failing "connect failed ... No such file
#: or directory" for up to 13 s after kupd served again -- and so did a new
#: Client in the same process, as gRPC shares the connection between
#: channels of the same target and options.  A local socket costs nothing to
#: retry, so the next call after a restart connects within about a second.
RECONNECT_INITIAL_MS = 100
RECONNECT_MAX_MS = 1_000


def channel_options() -> list[tuple[str, int]]:
    return [
        ("grpc.max_send_message_length", MAX_GRPC_MESSAGE),
        ("grpc.max_receive_message_length", MAX_GRPC_MESSAGE),
        ("grpc.keepalive_time_ms", KEEPALIVE_TIME_MS),
        ("grpc.keepalive_timeout_ms", KEEPALIVE_TIMEOUT_MS),
        # gRPC's core times a ping out by this one (keepalive_timeout_ms
        # alone left the Python client waiting for a stopped kupd as long as
        # it was stopped), and by default sends only two pings while no data
        # flows: a receive that waits long would be unguarded after that
        ("grpc.http2.ping_timeout_ms", KEEPALIVE_TIMEOUT_MS),
        ("grpc.http2.max_pings_without_data", 0),
        # (grpc.min_reconnect_backoff_ms is left alone: despite its name it is
        # how long a connection attempt may take, which a busy kupd needs)
        ("grpc.initial_reconnect_backoff_ms", RECONNECT_INITIAL_MS),
        ("grpc.max_reconnect_backoff_ms", RECONNECT_MAX_MS),
    ]


def default_caller() -> str:
    """The Call fairness key of this process."""
    return f"{socket.gethostname()}:{os.getpid()}"

"""The Call pool of one device: request/reply over a set of pooled channels.

* A channel is *free* when user space holds its turn with nothing pending;
  a Call takes a free channel, sends the request, waits for the kernel's
  reply (``kupd.waiting``), returns it and puts the channel back.
* Waiting callers are queued per caller (FIFO) and served round-robin
  across callers, so one busy caller cannot starve the others.
* A reply that does not come within the deadline fails the Call with
  DeadlineExceeded and *quarantines* the channel: it is not handed to the
  next caller (whose request would be answered with the late reply) until
  the kernel hands the turn back; the late reply is dropped.  A channel
  still owing its reply after ``quarantine`` seconds is closed (the module
  sees its user leave) and the device attaches a fresh one: a module that
  never answers some request costs the pool a channel for that long, not
  for good.
* A channel that fails with Shutdown / PeerGone / ProtocolError leaves the
  pool and is closed.
* A group (tenant) may be given a *share*: the most pool channels its Calls
  hold at once, busy or quarantined.  Its Calls beyond that wait in the
  queue (their turn passes to the next group) until one of its channels is
  back: a tenant whose Calls time out at once can take that many channels
  out of service, never the whole pool.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol, cast

from kupd import errors
from kupd.abi import KUP_E_PEER
from kupd.channel import Channel, Message
from kupd.log import get_logger
from kupd.metrics import CallCount, Metrics
from kupd.retirement import waiting_on
from kupd.waiting import ChannelWaiter, Deadline

if TYPE_CHECKING:
    from kupd.config import Config
    from kupd.devices import DeviceManager, ManagedDevice
    from kupd.policy import Guard, Tenant

__all__ = [
    "CALLER_MAX",
    "TENANT_GROUP",
    "CallPool",
    "CallSlot",
    "Calls",
    "PoolChannel",
    "call_timeout",
    "caller_arg",
]

log = get_logger("kupd.calls")

#: The longest Call ``caller`` (fairness key) kupd takes, in UTF-8 bytes: a
#: key is kept per queued Call and logged with a failed one (a 3 MiB key
#: made a 3 MiB log line per refused Call).
CALLER_MAX = 256


def caller_arg(caller: str) -> str:
    """A Call's ``caller`` as the client sent it; InvalidArgument when it is
    longer than CALLER_MAX bytes."""
    if len(caller) > CALLER_MAX or len(caller.encode()) > CALLER_MAX:
        raise errors.InvalidArgument(
            f"call: caller of {len(caller.encode())} bytes: a caller (fairness key) "
            f"is at most {CALLER_MAX} bytes"
        )
    return caller


def call_timeout(requested_ms: int, default: float, remaining: float | None) -> float:
    """How long a Call may wait for its reply, in seconds: the request's
    ``timeout_ms`` (0: kupd's ``call_timeout``, ``default``), capped by what
    is left of the RPC's deadline (``remaining``, None: it has none).
    DeadlineExceeded when none is left: the request must not be sent, since
    its caller has already been told that the Call failed."""
    timeout = requested_ms / 1000 if requested_ms else default
    if remaining is None:
        return timeout
    if remaining <= 0:
        raise errors.DeadlineExceeded(
            "call: the RPC's deadline passed before kupd could send the request (not sent)"
        )
    return min(timeout, remaining)


class _Exchanging(Protocol):
    def try_exchange(self, data: bytes) -> Message | None: ...


#: Whether channels have ``try_exchange(data) -> Message | None`` (send, then
#: spin briefly for the reply with the GIL released; None: sent, the reply is
#: owed to a later receive); without it, send + the waiter.
_HAS_TRY_EXCHANGE = hasattr(Channel, "try_exchange")


#: A queued Call granted its channel with less time left than this sends
#: nothing (DeadlineExceeded): the reply could not come in time, and the
#: channel would be left quarantined owing it.
_SEND_MIN_LEFT = 0.001


#: A tenant's Call pool group starts with this (kupd.policy, Guard.fair_key).
TENANT_GROUP = "tenant:"


class _QueueTimeout(Exception):
    """A queued Call's deadline passed before a pool channel was free."""


def _expire(fut: asyncio.Future[PoolChannel]) -> None:
    if not fut.done():
        fut.set_exception(_QueueTimeout())


def _holds_turn(ch: Channel) -> bool:
    """Whether user space still holds ``ch``'s turn (False if it cannot tell)."""
    try:
        return ch.my_turn()
    except errors.KupError:
        return False


@dataclass(eq=False)
class PoolChannel:
    ch: Channel
    #: waits for the kernel's reply when it is not there right after the send;
    #: keeps the fd registered with the loop between waits (kupd.waiting)
    waiter: ChannelWaiter
    state: str = "warming"  # warming | free | busy | quarantined
    #: the share-limited group whose Call holds it (busy or quarantined), or ""
    group: str = ""
    #: run once its quarantine settles (back in the pool or dropped): what
    #: the Call that left it quarantined still holds (a tenant's slot)
    settled: list[Callable[[], None]] = field(default_factory=list)


def _down(counts: dict[str, int], key: str) -> None:
    """One fewer for ``key`` (gone at 0: keys are tenants' and callers')."""
    n = counts[key] - 1
    if n:
        counts[key] = n
    else:
        del counts[key]


class CallPool:
    def __init__(
        self, device: str, metrics: Metrics, max_queued: int, size: int, quarantine: float = 30.0
    ) -> None:
        self.device = device
        self.size = size  # configured number of pool channels
        self.quarantine = quarantine
        self.metrics = metrics
        self.max_queued = max_queued
        self.channels: dict[int, PoolChannel] = {}
        self._free: deque[PoolChannel] = deque()
        self._queues: dict[str, deque[asyncio.Future[PoolChannel]]] = {}
        #: Round-robin over groups (tenants), and within each group over its
        #: callers.  A caller key "GROUP\x1fCALLER" belongs to GROUP; a key
        #: without the separator is its own group (one caller per group).
        self._rr: deque[str] = deque()
        self._groups: dict[str, deque[str]] = {}
        self._queued = 0
        #: per share-limited group: its share, and the channels its Calls hold
        self._shares: dict[str, int] = {}
        self._held: dict[str, int] = {}
        self._in_flight = 0
        #: of _in_flight and _queued, each group's (tenant's): what
        #: ListDevices shows a tenant, whose view is its own Calls only
        self._group_in_flight: dict[str, int] = {}
        self._group_queued: dict[str, int] = {}
        self._idle = asyncio.Event()
        self._idle.set()
        self._tasks: set[asyncio.Task[None]] = set()
        self.closed = False
        self._abort: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.on_change: Callable[[], None] = lambda: None
        #: why the device's host is not answering (None while it answers):
        #: its queue's Calls could only wait for it (kupd.devices sets it)
        self.silence: Callable[[], str | None] = lambda: None
        self._counted: dict[str, CallCount] = {}
        self._queued_gauge = metrics.calls_queued.labels(device)

    # -- membership ---------------------------------------------------------
    def add(self, ch: Channel) -> None:
        """Adopt a freshly attached channel: free once its first message
        (the kernel's opening hand-over) has arrived."""
        pc = PoolChannel(ch, ChannelWaiter(ch, f"call on device {self.device} channel {ch.id}"))
        self.channels[ch.id] = pc
        self._spawn(self._settle(pc, "warming"))

    def _spawn(self, coro: object) -> None:
        task = asyncio.ensure_future(coro)  # type: ignore[call-overload]
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _settle(self, pc: PoolChannel, why: str) -> None:
        """Wait for the kernel to hand ``pc`` back, drop what it says, free it;
        then run ``pc.settled``."""
        try:
            await self._settle_once(pc, why)
        finally:
            while pc.settled:
                pc.settled.pop()()

    async def _settle_once(self, pc: PoolChannel, why: str) -> None:
        pc.state = why
        try:
            if not pc.ch.my_turn():
                # A warming channel (fresh, waiting for the module's opening
                # hand-over) has no limit, on purpose: a module that is slow
                # to take up a channel would get every replacement dropped
                # too, and the pool would never fill; one that is truly hung
                # would not serve a replacement either.  ListDevices shows
                # it as "calls"; the pool works one short, and a Call that
                # finds no channel in time says how many are warming.
                limit = self.quarantine if why == "quarantined" else None
                await pc.waiter.wait(limit, aborts=(self._abort,))
            else:
                pc.ch.try_receive()  # consume a pending message, if any
        except errors.DeadlineExceeded:
            log.warning(
                "pool channel replaced: its reply did not come",
                device=self.device,
                channel=pc.ch.id,
                waited_s=self.quarantine,
            )
            self._drop(pc)
            return
        except errors.KupError as exc:
            log.warning(
                "pool channel dropped", device=self.device, channel=pc.ch.id, error=str(exc)
            )
            self._drop(pc)
            return
        except asyncio.CancelledError:
            return
        if why == "quarantined":
            log.info("pool channel back from quarantine", device=self.device, channel=pc.ch.id)
        self._put_back(pc)

    def _ended_by_module(self, pc: PoolChannel) -> bool:
        """Drop ``pc``, just taken for a Call, if the kernel side has ended
        its session (kupdev_disconnect of an idle pool channel: nothing
        woke kupd) -- True then, and the Call takes another channel, nothing
        sent: the Call is not the one that failed.  One read of the
        channel's page (kernproxy_state), no call to the host."""
        if pc.ch.state() != KUP_E_PEER:
            return False
        log.info("pool channel ended by the module", device=self.device, channel=pc.ch.id)
        self._drop(pc)
        return True

    def _drop(self, pc: PoolChannel) -> None:
        # not "busy" any more: the Call that dropped it must not put it back
        pc.state = "dropped"
        if pc.group:
            self._let_go(pc)
            self._dispatch()  # its group may take a free channel now
        if self.channels.get(pc.ch.id) is pc:
            del self.channels[pc.ch.id]
        with contextlib.suppress(ValueError):
            self._free.remove(pc)
        pc.waiter.close()  # before the channel (its fd goes with it)
        with contextlib.suppress(errors.KupError):
            pc.ch.close()
        self.on_change()

    def _take(self, pc: PoolChannel, group: str, share: int) -> PoolChannel:
        pc.state = "busy"
        if share:
            pc.group = group
            self._held[group] = self._held.get(group, 0) + 1
        return pc

    def _let_go(self, pc: PoolChannel) -> None:
        """``pc`` no longer counts in its group's share (back, or dropped)."""
        if pc.group:
            n = self._held[pc.group] - 1
            if n:
                self._held[pc.group] = n
            else:
                del self._held[pc.group]
            pc.group = ""

    def set_shares(self, shares: dict[str, int]) -> None:
        """The share of every group, as a reload left them (0 or absent: no
        limit): the next dispatch judges queued Calls by them, not by the
        share their group had when they queued."""
        self._shares = {g: n for g, n in shares.items() if n}
        self._dispatch()

    def _at_share(self, group: str) -> bool:
        share = self._shares.get(group, 0)
        return bool(share) and self._held.get(group, 0) >= share

    def _put_back(self, pc: PoolChannel) -> None:
        self._let_go(pc)
        if self.closed:
            self._drop(pc)
            return
        pc.state = "free"
        self._free.append(pc)
        self._dispatch()

    def _dispatch(self) -> None:
        passed = 0  # groups at their share whose turn passed, in a row
        while self._free and len(self._rr) > passed:
            group = self._rr.popleft()
            if self._at_share(group):
                self._rr.append(group)  # waits for one of its own channels
                passed += 1
                continue
            passed = 0
            callers = self._groups[group]
            caller = callers.popleft()
            q = self._queues[caller]
            while q and q[0].done():  # cancelled waiters
                q.popleft()
            if not q:
                del self._queues[caller]
                if callers:
                    self._rr.appendleft(group)  # its next caller; no turn was used
                else:
                    del self._groups[group]
                continue
            fut = q.popleft()
            if q:
                callers.append(caller)
            else:
                del self._queues[caller]
            if callers:
                self._rr.append(group)
            else:
                del self._groups[group]
            fut.set_result(self._take(self._free.popleft(), group, self._shares.get(group, 0)))

    def groups_queued(self) -> list[str]:
        """The groups with Calls waiting in the queue."""
        return list(self._groups)

    def refuse_group(self, group: str, why: errors.KupError) -> int:
        """Fail every queued Call of ``group`` with ``why`` (a reload took
        its tenant's right to Call away); returns how many.  Calls already
        on a channel run on."""
        n = 0
        for caller in list(self._groups.get(group, ())):
            for fut in list(self._queues.get(caller, ())):
                if not fut.done():
                    fut.set_exception(type(why)(why.message))
                    n += 1
        return n

    def _forget(self, caller: str, group: str) -> None:
        """``caller``'s queue is empty: drop it, and its group when that was
        the group's last caller."""
        del self._queues[caller]
        callers = self._groups.get(group)
        if callers is None:
            return
        with contextlib.suppress(ValueError):
            callers.remove(caller)
        if not callers:
            del self._groups[group]
            with contextlib.suppress(ValueError):
                self._rr.remove(group)

    # -- facts ----------------------------------------------------------------
    @property
    def queued(self) -> int:
        return self._queued

    @property
    def in_flight(self) -> int:
        return self._in_flight

    def in_flight_of(self, group: str) -> int:
        """Of :attr:`in_flight`, the Calls of ``group`` (a tenant's, as
        Guard.fair_key names it)."""
        return self._group_in_flight.get(group, 0)

    def queued_of(self, group: str) -> int:
        """Of :attr:`queued`, the Calls of ``group``."""
        return self._group_queued.get(group, 0)

    def _queued_text(self, group: str) -> str:
        """The queue as a refused Call of ``group`` is told of it: a
        tenant's own Calls only (the others' are not its business, as in
        ListDevices); without tenants, every Call."""
        if group.startswith(TENANT_GROUP):
            name = group[len(TENANT_GROUP) :]
            return f"{self.queued_of(group)} of tenant {name}'s Calls queued"
        return f"{self._queued} calls queued"

    def state_of(self, chan_id: int) -> str | None:
        pc = self.channels.get(chan_id)
        return None if pc is None else pc.state

    # -- the call ---------------------------------------------------------------
    async def _acquire(
        self,
        caller: str,
        timeout: float,
        share: int = 0,
        retired: asyncio.Future[None] | None = None,
    ) -> PoolChannel:
        group = caller.split("\x1f", 1)[0]
        if self._free and not (share and self._at_share(group)):
            # A channel free while callers queue is one every queued group
            # is at its share for (dispatch serves the others as soon as a
            # channel is free): this caller may have it at once -- before
            # the queue limit, or such a group's waiting Calls, filling the
            # queue, would lock every other tenant out of free channels.
            return self._take(self._free.popleft(), group, share)
        silent = self.silence()
        if silent is not None:
            # no channel free, and none will come back from a host that does
            # not answer (nor be attached on it): not a wait until the deadline
            raise errors.Unavailable(f"call: {silent}")
        if self._queued >= self.max_queued:
            if group.startswith(TENANT_GROUP):  # its own share: see _queued_text
                raise errors.ResourceExhausted(
                    f"device {self.device}: its Call queue is full (limit "
                    f"max_queued_calls={self.max_queued}: the Calls of every tenant count; "
                    f"{self._queued_text(group)})"
                )
            raise errors.ResourceExhausted(
                f"device {self.device}: {self._queued} calls already queued "
                f"(limit max_queued_calls={self.max_queued})"
            )
        fut: asyncio.Future[PoolChannel] = asyncio.get_running_loop().create_future()
        q = self._queues.get(caller)
        if q is None:
            q = self._queues[caller] = deque()
            callers = self._groups.get(group)
            if callers is None:
                callers = self._groups[group] = deque()
                self._rr.append(group)
            callers.append(caller)
        q.append(fut)
        self._queued += 1
        self._group_queued[group] = self._group_queued.get(group, 0) + 1
        self._queued_gauge.inc()
        # The deadline fails the waiter's future itself (a timer, not an
        # asyncio.timeout scope per queued Call); a future granted first
        # keeps its channel, and _dispatch skips futures already done.
        timer = fut.get_loop().call_later(timeout, _expire, fut)
        refuse = None
        if retired is not None:
            # the socket it came in on retired by a reload: out of the
            # queue now, with where the socket went, instead of cut
            # call_timeout later by gRPC (a grant first keeps its channel)
            refuse = functools.partial(self._refuse_retired, fut)
            retired.add_done_callback(refuse)
        try:
            # counted as a Call the socket's retirement ends, unless it was
            # granted (or timed out) first
            with waiting_on(retired, "Call", fut):
                return await fut
        except BaseException as exc:
            if fut.done() and not fut.cancelled() and fut.exception() is None:
                self._put_back(fut.result())  # granted just as we gave up: hand it on
            else:
                # out of its caller's queue now (FIFO: mostly the head), not
                # when its group next gets a turn: a group at its share may
                # not get one for call_quarantine seconds, and its expired
                # waiters would pile up meanwhile
                waiting = self._queues.get(caller)
                if waiting is not None:
                    with contextlib.suppress(ValueError):
                        waiting.remove(fut)
                    if not waiting:
                        # and its caller out of its group, its group out of
                        # the round: a stream of Calls under new caller keys
                        # that all time out would leave one entry each
                        self._forget(caller, group)
            if isinstance(exc, _QueueTimeout):
                silent = self.silence()
                if silent is not None:  # it stopped answering while the Call waited
                    raise errors.Unavailable(
                        f"call: no pool channel became free within {timeout:.3f}s: {silent}"
                    ) from None
                if share and self._at_share(group):
                    mine = [pc for pc in self.channels.values() if pc.group == group]
                    n_q = sum(1 for pc in mine if pc.state == "quarantined")
                    why = (
                        f"; {n_q} of them quarantined: a timed-out Call's reply is still "
                        "owed, each back when the module answers, or replaced after "
                        f"call_quarantine={self.quarantine:g}s"
                        if n_q
                        else ""
                    )
                    raise errors.DeadlineExceeded(
                        f"device {self.device}: tenant {group.removeprefix(TENANT_GROUP)}'s "
                        f"Calls already hold {len(mine)} of the device's "
                        f"{len(self.channels)} pool channels (limit max_pool_channels="
                        f"{share}{why}), and none came back within {timeout:.3f}s"
                    ) from None
                if not self.channels:
                    raise errors.DeadlineExceeded(
                        f"device {self.device}: its Call pool got no channel within "
                        f"{timeout:.3f}s (the module has announced none yet, or every "
                        "channel is held by a session)"
                    ) from None
                # quarantined channels are out of service for up to
                # call_quarantine: say so, or a caller sees a pool of N
                # channels that serves nobody with no reason given
                n_q = sum(1 for pc in self.channels.values() if pc.state == "quarantined")
                held = (
                    f", {n_q} of them quarantined: a timed-out Call's reply is still owed "
                    f"(each back when the module answers, or replaced after "
                    f"call_quarantine={self.quarantine:g}s)"
                    if n_q
                    else ""
                )
                # and so are channels whose module never made the session's
                # first call: to its author the pool looks merely busy
                n_w = sum(1 for pc in self.channels.values() if pc.state == "warming")
                if n_w:
                    held += (
                        f", {n_w} of them still waiting for the module's first hand-over "
                        "since kupd attached it: a module starts each session with "
                        "kupdev_pass or a greeting"
                    )
                raise errors.DeadlineExceeded(
                    f"device {self.device}: no pool channel became free within {timeout:.3f}s "
                    f"({len(self.channels)} channels{held}; {self._queued_text(group)})"
                ) from None
            raise
        finally:
            timer.cancel()
            if refuse is not None and retired is not None:
                retired.remove_done_callback(refuse)
            self._queued -= 1
            _down(self._group_queued, group)
            self._queued_gauge.dec()

    def _refuse_retired(
        self, fut: asyncio.Future[PoolChannel], retired: asyncio.Future[None]
    ) -> None:
        exc = None if retired.cancelled() else retired.exception()
        if not fut.done() and isinstance(exc, errors.KupError):
            fut.set_exception(
                type(exc)(
                    f"{exc.message} (the Call waited for a pool channel of device "
                    f"{self.device}: it was not sent)"
                )
            )

    async def call(
        self,
        data: bytes,
        timeout: float,
        caller: str,
        limit: int,
        held: list[Callable[[], None]] | None = None,
        share: int = 0,
        retired: asyncio.Future[None] | None = None,
    ) -> tuple[Message, int]:
        """Send ``data`` on a free pool channel; the kernel's reply and the channel id.
        ``limit`` is the device's max message.  While the pool is (re)filling,
        callers wait in the queue.  ``held``: what the Call holds (one
        callable that lets it go); a Call that leaves its channel
        quarantined takes it out of the list and runs it only once the
        quarantine settles -- the caller runs what is left, if anything.
        ``share``: the most pool channels the caller's group may hold at
        once (0: no limit).  ``retired``: the retirement of the socket the
        Call came in on (kupd.policy.socket_retired): one still queued then
        is refused with its error, not sent; one on a channel runs on."""
        if self.closed:
            raise errors.Shutdown(f"device {self.device} is going away")
        if self.size == 0:
            raise errors.Unavailable(
                f"device {self.device} has no Call pool (set call_channels in its [[device]] "
                "config or --device NAME:N)"
            )
        if len(data) > limit:
            raise errors.TooBig(
                f"call of {len(data)} bytes exceeds device {self.device}'s "
                f"max message of {limit} bytes"
            )
        self._in_flight += 1
        if self._in_flight == 1:
            self._idle.clear()
        group = caller.partition("\x1f")[0]
        mine = self._group_in_flight
        mine[group] = mine.get(group, 0) + 1
        try:
            if self._free and not self._rr and not share:
                # the usual case: no wait, no deadline sums
                pc = self._free.popleft()
                pc.state = "busy"
                if not self._ended_by_module(pc):
                    return await self._exchange(pc, data, timeout, held)
            if share or self._shares:  # the group's share as it is now (a reload)
                if share:
                    self._shares[group] = share
                else:
                    self._shares.pop(group, None)
            loop = asyncio.get_running_loop()
            deadline = loop.time() + timeout
            while True:
                pc = await self._acquire(caller, deadline - loop.time(), share, retired)
                left = deadline - loop.time()
                if left < _SEND_MIN_LEFT:
                    # granted at its deadline: sending now would only leave the
                    # channel quarantined, owing a reply nobody waits for
                    self._put_back(pc)
                    raise errors.DeadlineExceeded(
                        f"device {self.device}: a pool channel became free only at the "
                        f"Call's deadline ({timeout:.3f}s); nothing was sent"
                    )
                if not self._ended_by_module(pc):
                    return await self._exchange(pc, data, left, held)
        finally:
            _down(mine, group)
            self._in_flight -= 1
            if self._in_flight == 0:
                self._idle.set()

    def count(self, code: str) -> None:
        """One finished Call with status ``code`` (the labelled child is
        looked up once per code, not per Call)."""
        cc = self._counted.get(code)
        if cc is None:
            cc = self._counted[code] = self.metrics.call_count(self.device, code)
        cc.n += 1

    async def _exchange(
        self,
        pc: PoolChannel,
        data: bytes,
        timeout: float,
        held: list[Callable[[], None]] | None = None,
    ) -> tuple[Message, int]:
        ch = pc.ch
        sent = False
        done = False
        try:
            t0 = time.monotonic()
            # Send, then the reply if it is already there: the kernel side
            # usually answers within microseconds, and waiting through the
            # event loop (add_reader, a loop iteration, epoll) costs far more
            # than that.  try_exchange (where the channel has it) spins
            # briefly for the reply with the GIL released.
            if _HAS_TRY_EXCHANGE:
                msg = cast(_Exchanging, ch).try_exchange(data)
            else:
                ch.send(data)
                msg = None
            sent = True
            cm = self.metrics.channel(self.device, ch.id)
            cm.sent(len(data))
            if msg is None:
                msg = await pc.waiter.wait(timeout, (self._abort,))
            done = True
            cm.turn_wait.observe(time.monotonic() - t0)
            cm.received(len(msg.data))
            return msg, ch.id
        except (errors.Shutdown, errors.PeerGone, errors.ProtocolError, errors.SystemFailure):
            done = True
            self._drop(pc)
            raise
        finally:
            if not done:
                if sent or not _holds_turn(ch):
                    # the reply is still owed: never hand this channel on mid-exchange
                    log.warning("pool channel quarantined", device=self.device, channel=ch.id)
                    # and the Call's tenant keeps its slot until it settles:
                    # Calls that time out at once must not take a tenant's
                    # whole share of the pool out of service for everyone
                    if held:
                        pc.settled.extend(held)
                        held.clear()
                    # quarantined from now, not from the task's first step:
                    # a close() before that step must see it as not busy
                    pc.state = "quarantined"
                    self._spawn(self._settle(pc, "quarantined"))
                else:
                    self._put_back(pc)
            elif pc.state == "busy":
                self._put_back(pc)

    async def wait_idle(self) -> None:
        """Until no call is in flight or queued."""
        await self._idle.wait()

    def close(self, why: errors.KupError | None = None) -> None:
        """No more Calls: every one in flight or queued fails with ``why``
        (default: Shutdown, the device is going away)."""
        self.closed = True
        if why is None:
            why = errors.Shutdown(f"device {self.device} is going away")
        if not self._abort.done():
            # wakes every wait on a pool channel (a vanished host writes no wake-up)
            self._abort.set_exception(why)
            self._abort.exception()
        for q in self._queues.values():
            for fut in q:
                if not fut.done():
                    fut.set_exception(type(why)(why.message))
        self._queues.clear()
        self._rr.clear()
        self._groups.clear()
        for task in list(self._tasks):
            task.cancel()
        for pc in list(self.channels.values()):
            if pc.state != "busy":
                # A settle task cancelled before its first step runs none of
                # its code (its finally included): what the channel's last
                # Call still held (a tenant's slot) is given back here.
                while pc.settled:
                    pc.settled.pop()()
                self._drop(pc)


class CallSlot:
    """A Call's place in its tenant's ``max_calls_in_flight``: calling it
    lets the place go (once).  A Call that leaves its pool channel
    quarantined hands it to the pool, which calls it when the channel
    settles; :meth:`keep` counts it meanwhile, so that a refusal can say
    why slots are taken with no Call running."""

    __slots__ = ("_done", "_guard", "_kept", "_tenant")

    def __init__(self, guard: Guard, tenant: Tenant) -> None:
        self._guard, self._tenant = guard, tenant
        self._done = self._kept = False

    def __call__(self) -> None:
        if not self._done:
            self._done = True
            self._guard.end_call(self._tenant, kept=self._kept)

    def keep(self) -> None:
        if not self._done and not self._kept:
            self._kept = True
            self._guard.keep_call(self._tenant)


class Calls:
    """The Call RPC below its protobuf: the caller's tenant admitted
    (kupd.policy: grant, size, rate, max_calls_in_flight), the device's
    pool called, the Call counted (kupd_calls) -- and the Calls in flight,
    which kupd lets finish before it stops.  ``code_name``: the name of the
    gRPC code an error is answered with (kupd.service.status_for: the one
    mapping), which kupd_calls counts it under."""

    def __init__(
        self,
        config: Config,
        guard: Guard,
        mgr: DeviceManager,
        drain: asyncio.Future[None],
        code_name: Callable[[errors.KupError], str],
    ) -> None:
        #: The running config (a reload replaces it: call_timeout is read per Call).
        self.config = config
        self.guard = guard
        self.mgr = mgr
        self.drain = drain
        self.code_name = code_name
        self.in_flight = 0
        self.idle = asyncio.Event()
        self.idle.set()

    async def call(
        self,
        device: str,
        caller: str,
        data: bytes,
        timeout_ms: int,
        rpc: Deadline,
        where: dict[str, Any],
        retired: asyncio.Future[None] | None = None,
    ) -> tuple[Message, int]:
        """The reply to ``data`` on a pool channel of ``device`` and the
        channel's id.  ``where`` gets the log context a failed Call is
        logged with (tenant, device, caller, once the device was ready, or
        once it was refused); ``retired``: the retirement of the socket it
        came in on (a queued Call ends with it, not sent)."""
        dev: ManagedDevice | None = None
        try:
            if self.drain.done():
                raise errors.Shutdown("kupd is shutting down")
            t = self.guard.caller()
            if not device:
                raise errors.InvalidArgument("call: device is required")
            device = _devices.device_arg(device)
            if not t.may_see(device):  # before the lookup: see ListDevices
                self.guard.check_op(t, "call", device)
            dev = self.mgr.get(device)
            caller_arg(caller)
            self.guard.begin_call(t, dev.name, len(data))
            # the tenant's slot: let go when the Call ends -- or, when it
            # leaves its pool channel quarantined, when that settles (the
            # pool takes it out of the list)
            slot = CallSlot(self.guard, t)
            held: list[Callable[[], None]] = [slot]
            try:
                self.guard.check_drained(dev.name)
                where["tenant"] = t.name
                _, info = dev.require()
                where["device"] = dev.name  # the log context, should the Call fail
                where["caller"] = caller
                timeout = call_timeout(timeout_ms, self.config.call_timeout, rpc.time_remaining())
                pool = dev.pool
                self.in_flight += 1
                if self.in_flight == 1:
                    self.idle.clear()
                code = "OK"
                try:
                    return await pool.call(
                        data,
                        timeout,
                        self.guard.fair_key(t, caller),
                        info.max_msg,
                        held,
                        t.max_pool_channels,
                        retired,
                    )
                except errors.KupError as exc:
                    code = self.code_name(exc)
                    raise
                except asyncio.CancelledError:
                    code = "CANCELLED"  # the client went away (or its deadline): not OK
                    raise
                finally:
                    pool.count(code)  # kupd_calls{device, code}, the child cached per code
                    self.in_flight -= 1
                    if self.in_flight == 0:
                        self.idle.set()
            finally:
                if held:
                    for let_go in held:
                        let_go()
                else:  # the pool runs it once the channel is back
                    slot.keep()
        except errors.KupError as exc:
            if dev is not None and "device" not in where:
                # refused before its exchange (policy, device not ready): a
                # Call of this served device all the same, counted and logged
                # under it -- an unknown name never becomes a label
                where["device"] = dev.name
                # refused above when too long: then shortened
                where["caller"] = caller if len(caller.encode()) <= CALLER_MAX else (
                    _devices.shown(caller)
                )
                # the tenant the Call started with (dev is set after t): the
                # current policy's may have been removed by a reload meanwhile,
                # and asking for it here would raise inside this handler
                where["tenant"] = t.name
                dev.pool.count(self.code_name(exc))
            raise


# kupd.devices builds every device's CallPool (it imports this module first):
# imported last, once what it takes from here is defined
from kupd import devices as _devices  # noqa: E402

"""The devices kupd serves: opening them, following their events, health,
attaching channels, and each device's Call pool.

Blocking channel-layer calls that talk to the device host (open, info,
attach: a round trip to kupsim or an ioctl) run on a small bounded thread
pool; everything else runs on the asyncio loop.  A configured device that is
not there is retried every ``health_interval``; a present one is probed with
``info()`` at that interval (the health check) and on every device event.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import os
import queue
import threading
import time
from collections.abc import AsyncIterator, Callable
from concurrent.futures import Executor, Future
from typing import Any, ParamSpec, TypeVar

from kupd import errors
from kupd.calls import CallPool
from kupd.channel import Channel, Device, DeviceInfo
from kupd.config import DEVICE_ARG_MAX, Config, DeviceConfig
from kupd.log import get_logger
from kupd.metrics import Metrics
from kupd.watch import Event, EventBus, EventType

__all__ = [
    "REATTACH_PAUSE",
    "SHOWN_MAX",
    "SHUTDOWN_REASON",
    "DeviceManager",
    "ManagedDevice",
    "device_arg",
    "grants_past_device",
    "looked_for",
    "shown",
]

log = get_logger("kupd.devices")

#: DEVICE_SHUTTING_DOWN's reason, however kupd learnt it (the device's INFO,
#: or the kernel's mark on a channel kupd holds once the device has closed)
SHUTDOWN_REASON = "module shutting down"

#: how much of a client's device name goes into a message, a log or the audit
SHOWN_MAX = 64


def device_arg(name: str) -> str:
    """A device name a client sent, refused (InvalidArgument) when no device
    can have it: longer than any (DEVICE_ARG_MAX), or with a NUL.  Checked
    before the name reaches a lookup, a policy record or a log line: a
    4 MiB name made a 4 MiB audit line per request."""
    if len(name) > DEVICE_ARG_MAX or len(name.encode()) > DEVICE_ARG_MAX:
        raise errors.InvalidArgument(
            f"device name of {len(name.encode())} bytes: no device name is longer "
            f"than {DEVICE_ARG_MAX}"
        )
    if "\x00" in name:
        raise errors.InvalidArgument(f"device name {shown(name)} contains a NUL")
    return name


def looked_for(name: str) -> str:
    """Where libkup's ``kernproxy_open`` looks for device ``name``, as
    kupd runs it (``$KUP_BACKEND``, ``$KUPSIM_DIR`` from ``kupsim_dir``):
    for the log line of a device that is not reachable, so that a wrong
    ``kupsim_dir`` or a module not loaded shows as the path it is."""
    if "/" in name:
        return name
    sim = os.path.join(os.environ.get("KUPSIM_DIR") or "/run/kupsim", f"{name}.sock")
    kdev = f"/dev/kup/{name}"
    backend = os.environ.get("KUP_BACKEND", "")
    if backend == "sim":
        return f"{sim} (kupsim)"
    if backend in ("linux", "freebsd"):
        return kdev
    return f"{kdev}, then {sim} (kupsim)"


def grants_past_device(cfg: Config, device: str, chan_count: int) -> list[tuple[str, str]]:
    """The tenants' grants on ``device`` that name channels it does not
    have (``chan_count`` of them): (key, why), for the warning logged when
    the device appears -- only then is its size known, and at each
    appearance anew (a module loaded again may have another channel
    count; tests/tenancy/test_tenancy_reload_reply.py).  A typo such as
    "8-630" for "8-63" would otherwise grant every channel from 8 on,
    unseen."""
    from kupd.policy import tenant_key

    out: list[tuple[str, str]] = []
    for i, t in enumerate(cfg.tenants):
        for j, g in enumerate(t.grants or ()):
            if g.device != device or g.channels is None:
                continue
            past = [c for c in g.channels if c >= chan_count]
            if past:
                out.append((
                    f"{tenant_key(i, t.name)}.grant[{j}].channels",
                    f"{g.text!r} names {len(past)} channel{'s' if len(past) != 1 else ''} "
                    f"from {min(past)} on, but device {device} has {chan_count} "
                    f"(0-{chan_count - 1}): tenant {t.name} can use none of them",
                ))
    return out


def shown(name: str) -> str:
    """``name`` quoted for a message or a record, at most SHOWN_MAX characters
    of it (a client chose it)."""
    if len(name) <= SHOWN_MAX:
        return repr(name)
    return f"{name[:SHOWN_MAX]!r}... ({len(name.encode())} bytes)"
T = TypeVar("T")
P = ParamSpec("P")

#: Threads for attaching channels on a device's host (an attach may wait
#: there up to half a second for a module to let go of its channel), per
#: device: a host that hangs ties up its own device's attach threads, never
#: another device's (one shared pool let six attaches to a hung host hold
#: up every device's for libkup's whole RPC timeout).  Started on demand.
BLOCKING_THREADS = 4

#: Attaches one tenant may have under way on one device's host at once: a
#: tenant that keeps asking for channels its module still holds (each
#: attempt parked by the host) takes at most these of the device's
#: threads, not every tenant's.
ATTACHES_PER_TENANT = BLOCKING_THREADS // 2


class HostThreads(Executor):
    """At most ``n`` threads, started on demand, for calls into a device
    host: ``loop.run_in_executor(HostThreads(...), fn, ...)``.

    Unlike ThreadPoolExecutor's, they are daemon threads: the interpreter
    does not join them at exit.  A call into a hung host (stopped, not
    dead) returns only at libkup's RPC timeout, 30 s with kupsim; joined at
    exit, a thread inside one held kupd's exit that long after its drain
    had finished.  At exit the OS takes back the connection and memory
    such a call holds; a daemon thread that comes back from the extension
    after the interpreter began to finalize is ended as it takes the GIL,
    without touching Python objects."""

    def __init__(self, n: int, name: str) -> None:
        self._n = n
        self._name = name
        self._work: queue.SimpleQueue[
            tuple[Future[Any], Callable[..., Any], tuple[Any, ...], dict[str, Any]] | None
        ] = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._threads: list[threading.Thread] = []
        self._idle = 0
        self._shutdown = False

    def submit(self, fn: Callable[P, T], /, *args: P.args, **kwargs: P.kwargs) -> Future[T]:
        fut: Future[T] = Future()
        with self._lock:
            if self._shutdown:
                raise RuntimeError("cannot schedule new futures after shutdown")
            self._work.put((fut, fn, args, kwargs))
            if self._idle > 0:
                self._idle -= 1
            elif len(self._threads) < self._n:
                t = threading.Thread(
                    target=self._run, name=f"{self._name}_{len(self._threads)}", daemon=True
                )
                self._threads.append(t)
                t.start()
        return fut

    def _run(self) -> None:
        while True:
            item = self._work.get()
            if item is None:
                return
            fut, fn, args, kwargs = item
            del item
            if fut.set_running_or_notify_cancel():
                try:
                    result = fn(*args, **kwargs)
                except BaseException as exc:
                    fut.set_exception(exc)
                    del exc
                else:
                    fut.set_result(result)
                    del result
            del fut, fn, args, kwargs
            with self._lock:
                self._idle += 1

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        with self._lock:
            if self._shutdown:
                return
            self._shutdown = True
            threads = list(self._threads)
        if cancel_futures:
            with contextlib.suppress(queue.Empty):
                while True:
                    item = self._work.get_nowait()
                    if item is not None:
                        item[0].cancel()
        for _ in threads:
            self._work.put(None)
        if wait:
            for t in threads:
                t.join()


#: How long the "no free channel" answer waits for a fresh INFO to count
#: the channels their module still holds (seconds)
MODULE_HELD_WAIT = 1.0

#: A channel whose last user has just left may not be attachable at once:
#: its module lets go of it only when its worker, often asleep in a receive,
#: wakes and sees the user gone, or, computing a reply, once it is done.
#: The host waits for that for a moment (kupsim parks the ATTACH for 0.5 s,
#: a kernel tries the lock for KUP_ATTACH_LETGO_MS) and then answers
#: :class:`~kupd.errors.Releasing` -- not Busy, which is another user
#: holding it.  kupd tries a Releasing channel again for the config's
#: reattach_grace seconds (10 by default), so that a client re-attaching the
#: channel it just left (a restarted client, a reconnecting Session) is not
#: refused because a loaded machine was slow to wake the module.
#: Pause between such tries (the host's own wait covers most of it).
REATTACH_PAUSE = 0.05

#: How long a health check, ListDevices or the monitor's round waits for
#: one device's host to answer (a host stopped or hung can keep a call for
#: libkup's whole RPC timeout, 30 s with kupsim).  Past it the device is
#: *stalled* -- NOT_SERVING, ListDevices says so -- while the call goes on
#: in the background; the other devices are not held up meanwhile.
PROBE_WAIT = 2.0


class ManagedDevice:
    def __init__(self, mgr: DeviceManager, cfg: DeviceConfig) -> None:
        self.mgr = mgr
        self.cfg = cfg
        self.name = cfg.name
        #: One thread of its own for the calls health and events rest on
        #: (open, info, the event fd): a hung host ties up only its own
        #: device's, never another device's probe (the extension serialises
        #: a device's info and event fd anyway), and attaches -- which may
        #: wait on the host for a module to let go -- run elsewhere
        #: (DeviceManager.attaching).
        self.monitor = HostThreads(1, f"kupd-mon-{cfg.name[:8]}")
        #: the threads its attaches run on (see BLOCKING_THREADS), and the
        #: slots that bound them: the device's, and per tenant ("" for
        #: kupd's own Call pool) ATTACHES_PER_TENANT of them
        self.attacher = HostThreads(BLOCKING_THREADS, f"kupd-att-{cfg.name[:8]}")
        self._attach_threads = asyncio.Semaphore(BLOCKING_THREADS)
        self._attach_slots: dict[str, asyncio.Semaphore] = {}
        self.dev: Device | None = None
        self.info: DeviceInfo | None = None
        self.error = "not opened yet"
        self.pool = self._new_pool()
        #: why the Call pool was last left short (logged once per cause)
        self._pool_short_why: str | None = None
        #: channel id -> (holder "session"/"lease", lease id) for our leases
        self.holders: dict[int, tuple[str, str]] = {}
        self._event_fd = -1
        #: the refresh in progress (done when it and any pass asked for
        #: during it have run), None when none runs
        self._refreshing: asyncio.Task[None] | None = None
        self._refresh_again = False
        #: the open in progress (try_open), None when none runs
        self._opening: asyncio.Task[None] | None = None
        #: since when (monotonic) a probe has waited PROBE_WAIT in vain for
        #: the host, None while it answers
        self.stalled_since: float | None = None
        #: set while stalled_since is: attaches waiting for a slot give up
        self._stalled = asyncio.Event()
        #: why new attaches cannot reach the device although it answers and
        #: its module runs (its node was removed: see _refused), else None
        self.node_gone: str | None = None
        self._announced_seen = -1
        self._shutdown_seen = False
        self._pool_filling = False
        self.fill_task: asyncio.Future[Any] | None = None
        #: callbacks run when the device goes away (sessions/leases end)
        self.on_gone: list[Callable[[ManagedDevice, errors.KupError], None]] = []
        #: callbacks run when its module starts unloading (sessions/leases end:
        #: every channel of the device now answers SHUTDOWN)
        self.on_shutdown: list[Callable[[ManagedDevice], None]] = []

    @property
    def reachable(self) -> bool:
        return self.dev is not None and self.info is not None

    @property
    def healthy(self) -> bool:
        return (
            self.reachable
            and self.info is not None
            and not self.info.shutting_down
            and self.stalled_since is None
            and self.node_gone is None
        )

    def require(self) -> tuple[Device, DeviceInfo]:
        """The open device, or the error a request on it gets."""
        if self.dev is None or self.info is None:
            raise errors.Unavailable(f"device {self.name} is not reachable: {self.error}")
        if self.info.shutting_down:
            raise errors.Shutdown(f"device {self.name} is shutting down")
        return self.dev, self.info

    async def blocking(self, fn: Callable[..., T], *args: Any) -> T:
        """``fn(*args)`` (open, info, event fd) on this device's thread."""
        return await asyncio.get_running_loop().run_in_executor(self.monitor, fn, *args)

    # -- opening and events ---------------------------------------------------
    async def probe(self, limit: float = PROBE_WAIT) -> None:
        """Reach the host now (open the device if it is not open), waiting
        at most ``limit`` seconds: one that has not answered by then marks
        the device stalled until it does (the call goes on meanwhile).
        Known stalled with that call still under way: nothing new to wait
        for, so no wait at all."""
        if self.stalled_since is not None and self._host_call_under_way():
            return
        work = asyncio.ensure_future(self.try_open() if self.dev is None else self.refresh())
        try:
            await asyncio.wait_for(asyncio.shield(work), limit)
        except TimeoutError:
            if self.stalled_since is None and not work.done():
                self.stalled_since = time.monotonic()
                self._stalled.set()
                log.warning("device not answering", device=self.name, waited_s=limit)
                self.mgr.health_changed()

    async def health_round(self) -> None:
        """One health round for this device: reach the host, then check
        its node still opens."""
        await self.probe()
        await self.check_node()

    def _host_call_under_way(self) -> bool:
        busy = [t for t in (self._refreshing, self._opening) if t is not None]
        return any(not t.done() for t in busy)

    def _answered(self) -> None:
        """The host answered (or is gone for good): no longer stalled."""
        if self.stalled_since is not None:
            log.info(
                "device answering again",
                device=self.name,
                after_s=round(time.monotonic() - self.stalled_since, 1),
            )
            self.stalled_since = None
            self._stalled.clear()
            self.mgr.health_changed()

    async def try_open(self) -> None:
        """Open the device if it is not open (one open at a time: callers
        join the one in progress)."""
        if self.dev is not None or self.mgr.closing:
            return
        if self._opening is None or self._opening.done():
            self._opening = asyncio.get_running_loop().create_task(
                self._open(), context=contextvars.Context()
            )
        await asyncio.shield(self._opening)

    async def _open(self) -> None:
        try:
            await self._open_once()
        finally:
            self._answered()

    async def _open_once(self) -> None:
        if self.dev is not None or self.mgr.closing:
            return
        try:
            dev = await self.blocking(Device.open, self.name)
        except errors.KupError as exc:
            if str(exc) != self.error:
                log.info(
                    "device not reachable",
                    device=self.name,
                    error=str(exc),
                    looked_for=looked_for(self.name),
                )
            self.error = str(exc)
            return
        if self.mgr.closing:  # kupd stopped while the host answered the open
            dev.close()
            return
        try:
            info = await self.blocking(dev.info)
            # its first call connects (kupsim: a WATCH round trip the host
            # may be slow to answer): never on the loop thread
            fd = await self.blocking(dev.event_fd)
        except errors.KupError as exc:
            log.info("device not usable yet", device=self.name, error=str(exc))
            self.error = str(exc)
            dev.close()
            return
        if self.mgr.closing:
            dev.close()
            return
        self.dev, self.info, self.error = dev, info, ""
        self.node_gone = None
        self._event_fd = fd
        self._announced_seen = info.announced
        self._shutdown_seen = info.shutting_down
        self.pool = self._new_pool()
        asyncio.get_running_loop().add_reader(fd, self._on_event)
        log.info(
            "device appeared",
            device=self.name,
            channels=info.chan_count,
            announced=info.announced,
            max_msg=info.max_msg,
        )
        for key, why in grants_past_device(self.mgr.config, self.name, info.chan_count):
            log.warning("config key has no effect as set", key=key, why=why)
        self.mgr.publish(
            Event(
                EventType.DEVICE_APPEARED,
                self.name,
                announced=info.announced,
                notify_gen=info.notify_gen,
            )
        )
        self.mgr.health_changed()
        if self.cfg.call_channels >= info.chan_count:
            # the pool would take every channel it can attach, and keep
            # trying for the rest: sessions and leases get none
            log.warning(
                "call_channels is not below the device's channel count",
                device=self.name,
                call_channels=self.cfg.call_channels,
                channels=info.chan_count,
                effect="the Call pool takes every free channel; none is left for sessions",
            )
        if info.max_msg + 65536 > self.mgr.max_grpc_message:
            log.warning(
                "device messages exceed the gRPC limit",
                device=self.name,
                max_msg=info.max_msg,
                grpc_limit=self.mgr.max_grpc_message,
            )
        self._fill_pool()

    def _on_event(self) -> None:
        # The fd is level-triggered and only the refresh's INFO drains it,
        # on the device's thread, after whatever call is ahead of it there
        # and for as long as the host takes to answer: until then it stays
        # readable, and a reader left registered would run this on every
        # loop iteration.  So it is watched again once the refresh is done.
        dev, fd = self.dev, self._event_fd
        loop = asyncio.get_running_loop()
        loop.remove_reader(fd)

        def rearm(_: object) -> None:
            if self.dev is dev and dev is not None and self._event_fd == fd:
                loop.add_reader(fd, self._on_event)

        self.mgr.spawn(self.refresh()).add_done_callback(rearm)

    async def refresh(self) -> None:
        """Re-read the device's state; publish what changed; notice it gone.

        Returns once a read that started after the call has been acted on
        (joining the refresh in progress, which then reads once more).  The
        reads run in a task of their own, in an empty context: what the
        device logs (shutting down, gone, the leases that end with it) is
        the device's, not the fields of the request that asked."""
        if self._refreshing is None:
            self._refreshing = asyncio.get_running_loop().create_task(
                self._refresh_passes(), context=contextvars.Context()
            )
        else:
            self._refresh_again = True
        await asyncio.shield(self._refreshing)

    async def _refresh_passes(self) -> None:
        try:
            while True:
                self._refresh_again = False
                await self._refresh_once()
                if not self._refresh_again or self.dev is None:
                    break
        finally:
            self._refreshing = None
            self._answered()

    async def _refresh_once(self) -> None:
        dev = self.dev
        if dev is None:
            return
        try:
            info = await self.blocking(dev.info)
        except errors.KupError as exc:
            if self.dev is dev and not self._shutdown_seen and self._channels_say_shutdown():
                # The host unloaded the module and closed before we could
                # read its state: the channels it marked tell us it did.
                self._shutting_down(
                    Event(EventType.DEVICE_SHUTTING_DOWN, self.name, reason=SHUTDOWN_REASON)
                )
            if isinstance(exc, errors.DeadlineExceeded):
                # libkup's RPC timeout: the host is there but silent (stopped,
                # hung), its module not unloaded.  The handle is closed all the
                # same (a late answer would be read as the next request's), but
                # what ends with it is told to try again, not that it is over.
                silent = self.silence() or f"device {self.name}: its host is not answering"
                exc = errors.Unavailable(f"{silent} ({exc})")
            self.gone(exc)
            return
        if self.dev is not dev:
            return
        self.info = info
        if self.node_gone is not None and await self.blocking(self._reaches_node):
            log.info("device can be attached again", device=self.name)
            self.node_gone = None
            self.mgr.health_changed()
            self._fill_pool()
        if info.announced != self._announced_seen:
            self._announced_seen = info.announced
            self.mgr.publish(
                Event(
                    EventType.CHANNELS_ANNOUNCED,
                    self.name,
                    announced=info.announced,
                    notify_gen=info.notify_gen,
                )
            )
            self._fill_pool()
        if info.shutting_down and not self._shutdown_seen:
            self._shutting_down(
                Event(
                    EventType.DEVICE_SHUTTING_DOWN,
                    self.name,
                    reason=SHUTDOWN_REASON,
                    notify_gen=info.notify_gen,
                )
            )
            self.mgr.health_changed()
        elif len(self.pool.channels) < self.cfg.call_channels and not self.pool.closed:
            # A pool left short (every channel was held when it filled, or
            # an attach failed: out of descriptors) tries again each round:
            # a channel freed by a session or by another user of the device
            # makes no event of its own.
            self._fill_pool()

    def _shutting_down(self, ev: Event) -> None:
        """The module unloads: say so, then end what holds its channels (in
        that order, so a watcher sees why the leases end)."""
        self._shutdown_seen = True
        log.warning("device shutting down", device=self.name)
        self.mgr.publish(ev)
        for cb in list(self.on_shutdown):
            cb(self)

    def _channels_say_shutdown(self) -> bool:
        """Whether a free pool channel carries the kernel's SHUTDOWN mark.
        (Free pool channels hold the turn with the last message consumed, so
        probing them cannot take a message from anyone.)"""
        for pc in list(self.pool.channels.values()):
            if pc.state != "free":
                continue
            try:
                pc.ch.try_receive()
            except errors.Shutdown:
                return True
            except errors.KupError:
                continue
        return False

    def gone(self, why: errors.KupError) -> None:
        """The device went away: end everything on it; retry opening later."""
        dev = self.dev
        if dev is None:
            return
        log.warning("device gone", device=self.name, error=str(why))
        if self._event_fd >= 0:
            with contextlib.suppress(Exception):
                asyncio.get_running_loop().remove_reader(self._event_fd)
            self._event_fd = -1
        self.dev, self.info, self.error = None, None, str(why)
        self.node_gone = None
        for cb in list(self.on_gone):
            cb(self, why)
        self.pool.close()
        self.holders.clear()
        with contextlib.suppress(errors.KupError):
            dev.close()
        self.mgr.publish(Event(EventType.DEVICE_GONE, self.name, reason=str(why)))
        self.mgr.health_changed()

    # -- channels -------------------------------------------------------------------
    async def attach(
        self, chan_id: int | None, *, wait_releasing: bool = True, tenant: str = ""
    ) -> Channel:
        """Attach channel ``chan_id`` (None: any free one) on the host, for
        ``tenant`` ("": kupd's own Call pool; see DeviceManager.attaching).

        A channel held by another kupd lease, the Call pool or a process
        using the device directly is :class:`~kupd.errors.Busy` at once.
        One the host answers :class:`~kupd.errors.Releasing` (its last user
        left, its module has not let go of it yet) is tried again, every
        REATTACH_PAUSE, for up to the config's reattach_grace seconds (as it
        was when the attach began) -- unless ``wait_releasing`` is False (a
        caller with other channels to try).
        """
        started: float | None = None
        grace = self.mgr.config.reattach_grace
        while True:
            dev, info = self.require()
            if self.stalled_since is not None:
                # it would wait on a host known not to answer, for up to
                # libkup's RPC timeout, holding one of the device's threads
                raise self.not_answering()
            if self.node_gone is not None:
                raise errors.Unavailable(self.node_gone)
            if chan_id is not None:
                if chan_id >= info.chan_count:
                    raise errors.NotFound(
                        f"device {self.name} has no channel {chan_id} (it has {info.chan_count})"
                    )
                held = self.holders.get(chan_id)
                if held is not None or self.pool.state_of(chan_id) is not None:
                    # not the lease id: it is its holder's, and tenants with
                    # overlapping grants see each other's channels busy
                    what = f"a {held[0]}" if held else "the Call pool"
                    raise errors.Busy(
                        f"channel {chan_id} of device {self.name} is held by {what}"
                    )
            fut = asyncio.ensure_future(self._on_host(tenant, dev.channel, chan_id))
            try:
                return await asyncio.shield(fut)
            except asyncio.CancelledError:
                # The requester went away while the host was attaching: do not
                # leave the channel attached to nobody.
                fut.add_done_callback(self._close_attached)
                raise
            except errors.Releasing as exc:
                if not wait_releasing:
                    raise
                now = time.monotonic()
                if started is None:
                    started = now
                    if grace > 0:
                        log.info(
                            "attach waits for the module to let go",
                            device=self.name,
                            channel="any" if chan_id is None else chan_id,
                        )
                if now - started >= grace:
                    what = "every free channel" if chan_id is None else f"channel {chan_id}"
                    raise errors.Releasing(
                        f"device {self.name}: {what} is still held by the module after "
                        f"its last user left (kupd waited {now - started:.1f} s for it "
                        "to let go); retry later"
                    ) from exc
                await asyncio.sleep(REATTACH_PAUSE)
            except errors.Shutdown as exc:
                err = await self._refused(dev, exc)
                if err is exc:
                    raise
                raise err from exc
            except errors.Busy as exc:  # after Releasing, a Busy of its own
                if chan_id is not None:
                    raise
                # libkup's "channel held by another user" for ANY: say that
                # none is free, and who holds them
                module = await self._module_held(dev)
                raise errors.Busy(
                    self._none_free(info.chan_count, info.announced, module)
                ) from exc

    async def _refused(self, dev: Device, exc: errors.Shutdown) -> errors.KupError:
        """What an attach the host refused with Shutdown gets.

        libkup's sim backend says Shutdown when the device's socket is not
        there (kupsim removes it as its module starts unloading), so the
        same answer comes when something else removed it (a run directory
        cleaned) while kupsim and its module run on: every attach then
        failed as Shutdown -- final, for a client -- while health and
        ListDevices, asked over kupd's open connection, said all was well.
        kupd reads the device's state again: shutting down, it is Shutdown
        (the refresh ends what holds its channels); still running and
        answering, the device cannot be attached until its node is back --
        Unavailable, and the device not healthy (ListDevices says why)
        until a fresh open of it works (each health round tries one)."""
        if self.dev is not dev or self._shutdown_seen:
            return exc
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(asyncio.shield(self.refresh()), PROBE_WAIT)
        if (
            self.dev is not dev
            or self.info is None
            or self.info.shutting_down
            or self.stalled_since is not None
        ):
            return exc
        if self.node_gone is None:
            self.node_gone = (
                f"device {self.name} cannot be attached: its host refuses new attaches as "
                f"if it were gone ({exc}), yet it answers and its module runs -- was its "
                "device node (kupsim: socket) removed? Sessions already attached go on"
            )
            log.warning("device cannot be attached", device=self.name, error=str(exc))
            self.mgr.health_changed()
        return errors.Unavailable(self.node_gone)

    def _reaches_node(self) -> bool:
        """Whether the device can be opened afresh (on the device's thread)."""
        return self._open_error() is None

    def _open_error(self) -> errors.KupError | None:
        """What a fresh open of the device meets (None: it opens), on the
        device's thread.  About 20 us for kupsim (a connect, no RPC)."""
        try:
            Device.open(self.name).close()
        except errors.KupError as exc:
            return exc
        return None

    async def check_node(self) -> None:
        """The health round's look at the device's node (kupsim: socket).

        kupd talks to a device over the handle it opened, which a removed
        node does not touch: info() and the sessions already attached go
        on, while every new attach would fail.  Without this, the device
        was shown SERVING and healthy until an attach or a pool refill met
        the removal.  A fresh open says so at once; the open's error is
        then read as an attach's refusal would be (_refused: the device
        re-read, a module unloading is Shutdown, not a missing node).  Only
        "no such device" and "gone" mean a missing node: an open that fails
        for another reason (kupd out of file descriptors) says nothing
        about the node."""
        dev = self.dev
        if dev is None or not self.healthy:
            return
        exc = await self.blocking(self._open_error)
        if isinstance(exc, (errors.NotFound, errors.Shutdown)) and self.dev is dev:
            await self._refused(dev, errors.Shutdown(str(exc)))

    def silence(self) -> str | None:
        """What to tell a request the device cannot serve because its host
        has stopped answering (None while it answers)."""
        if self.stalled_since is None:
            return None
        silent_s = time.monotonic() - self.stalled_since + PROBE_WAIT
        return (
            f"device {self.name}: its host has not answered for {silent_s:.1f} s (hung or "
            "stopped, not unloaded); try again when it answers"
        )

    def not_answering(self) -> errors.Unavailable:
        why = self.silence() or f"device {self.name}: its host is not answering"
        return errors.Unavailable(why)

    async def _on_host(self, tenant: str, fn: Callable[..., T], *args: Any) -> T:
        """``fn(*args)`` (a host attach) on one of this device's attach
        threads, with one of ``tenant``'s ATTACHES_PER_TENANT slots on it
        ("default", every client of a kupd without [[tenant]] tables: all
        of them).  A wait for a slot ends with :meth:`not_answering` once
        the device is known stalled: the slots are held by attaches that
        wait on its host, and would be for up to libkup's RPC timeout."""
        slots = self._attach_slots.get(tenant)
        if slots is None:
            n = BLOCKING_THREADS if tenant == "default" else ATTACHES_PER_TENANT
            slots = self._attach_slots[tenant] = asyncio.Semaphore(n)
        async with self._slot(slots), self._slot(self._attach_threads):
            if self.stalled_since is not None:
                raise self.not_answering()
            return await asyncio.get_running_loop().run_in_executor(self.attacher, fn, *args)

    @contextlib.asynccontextmanager
    async def _slot(self, sem: asyncio.Semaphore) -> AsyncIterator[None]:
        """Hold one of ``sem``'s slots; Unavailable instead if the device is
        found stalled first."""
        if not sem.locked():
            await sem.acquire()
        else:
            acq = asyncio.ensure_future(sem.acquire())
            stall = asyncio.ensure_future(self._stalled.wait())
            try:
                await asyncio.wait((acq, stall), return_when=asyncio.FIRST_COMPLETED)
            except BaseException:  # the requester went away: no slot kept
                stall.cancel()
                if acq.done() and not acq.cancelled() and acq.exception() is None:
                    sem.release()
                else:
                    acq.cancel()
                raise
            stall.cancel()
            if not (acq.done() and not acq.cancelled() and acq.exception() is None):
                acq.cancel()  # a cancelled acquire holds no slot
                raise self.not_answering()
        try:
            yield
        finally:
            sem.release()

    async def _module_held(self, dev: Device) -> int:
        """Channels no user holds that their module still holds locked,
        from a fresh INFO (0 when the host does not answer within
        MODULE_HELD_WAIT: this is for an error message)."""
        try:
            fresh = await asyncio.wait_for(self.blocking(dev.info), MODULE_HELD_WAIT)
        except (errors.KupError, TimeoutError):
            return 0
        return len(set(fresh.module_holds) - set(fresh.attached))

    def _none_free(self, count: int, announced: int, module: int = 0) -> str:
        kinds: dict[str, int] = {}
        for kind, _ in self.holders.values():
            kinds[kind] = kinds.get(kind, 0) + 1
        held = [f"{n} by {k}s" for k, n in sorted(kinds.items())]
        if self.pool.channels:
            held.append(f"{len(self.pool.channels)} by the Call pool")
        rest = announced - len(self.holders) - len(self.pool.channels)
        module = min(module, max(rest, 0))
        if rest - module > 0:
            held.append(f"{rest - module} by other users of the device")
        if module:
            # a worker that exited or hangs between its receive and
            # kupdev_unlock_channel keeps its channel for good
            held.append(f"{module} by the module itself, with no user (not let go)")
        unannounced = f", {count - announced} not announced yet" if count > announced else ""
        channels = f"{count} channel{'s' if count != 1 else ''}"
        return (
            f"device {self.name} has no free channel: of its {channels}, "
            f"{', '.join(held) or 'all are held'}{unannounced}"
        )

    def _close_attached(self, fut: asyncio.Future[Channel]) -> None:
        if not fut.cancelled() and fut.exception() is None:
            ch = fut.result()
            with contextlib.suppress(errors.KupError):
                ch.close()

    def _new_pool(self) -> CallPool:
        pool = CallPool(
            self.name,
            self.mgr.metrics,
            self.mgr.config.max_queued_calls,
            self.cfg.call_channels,
            self.mgr.config.call_quarantine,
        )

        def changed() -> None:  # a channel left the pool: attach another
            if self.pool is pool and not pool.closed and self.dev is not None:
                self._fill_pool()

        pool.on_change = changed
        pool.silence = self.silence
        return pool

    def _fill_pool(self) -> None:
        if self._pool_filling or self.cfg.call_channels <= len(self.pool.channels):
            return
        self._pool_filling = True
        self.fill_task = self.mgr.spawn(self._fill_pool_task())

    async def _fill_pool_task(self) -> None:
        try:
            while self.dev is not None and len(self.pool.channels) < self.cfg.call_channels:
                dev, pool = self.dev, self.pool
                try:
                    ch = await self.attach(None)
                except (errors.NotReady, errors.Busy) as exc:
                    # retried every health round: said once per cause
                    self._pool_short("call pool not full yet", "info", exc)
                    return
                except errors.KupError as exc:
                    self._pool_short("call pool attach failed", "warning", exc)
                    return
                if self.dev is not dev or self.pool is not pool or pool.closed:
                    # the device went away (and maybe came back, with a new
                    # pool) during the attach: this channel is the old one's;
                    # a new pool is filled on (this task keeps _pool_filling)
                    ch.close()
                    if self.dev is None or self.pool.closed:
                        return
                    continue
                self.pool.add(ch)
            if self._pool_short_why is not None and self.dev is not None:
                self._pool_short_why = None
                log.info("call pool full again", device=self.name, have=len(self.pool.channels))
        finally:
            self._pool_filling = False

    def _pool_short(self, what: str, level: str, exc: errors.KupError) -> None:
        why = f"{what}: {type(exc).__name__}"
        if why == self._pool_short_why:
            return
        self._pool_short_why = why
        getattr(log, level)(
            what,
            device=self.name,
            have=len(self.pool.channels),
            want=self.cfg.call_channels,
            error=str(exc),
        )

    def close(self) -> None:
        if self._event_fd >= 0:
            with contextlib.suppress(Exception):
                asyncio.get_running_loop().remove_reader(self._event_fd)
            self._event_fd = -1
        self.pool.close()
        if self.dev is not None:
            with contextlib.suppress(errors.KupError):
                self.dev.close()
        self.dev = None
        self.info = None
        self.error = "kupd stopped"


class DeviceManager:
    def __init__(
        self,
        config: Config,
        bus: EventBus,
        metrics: Metrics,
        max_grpc_message: int,
        on_health: Callable[[], None] = lambda: None,
    ) -> None:
        self.config = config
        self.bus = bus
        self.metrics = metrics
        self.max_grpc_message = max_grpc_message
        self.on_health = on_health
        self.closing = False
        self.devices = {d.name: ManagedDevice(self, d) for d in config.devices}
        self._tasks: set[asyncio.Future[Any]] = set()
        self._monitor: asyncio.Task[None] | None = None
        #: set by reschedule(): the monitor's wait ends early (a reload
        #: changed health_interval; the round under way must not wait out
        #: the old one, which may be an hour)
        self._rescheduled = asyncio.Event()
        if config.kupsim_dir:
            os.environ["KUPSIM_DIR"] = config.kupsim_dir

    def get(self, name: str) -> ManagedDevice:
        dev = self.devices.get(name)
        if dev is None:
            served = ", ".join(sorted(self.devices)) or "none"
            raise errors.NotFound(f"unknown device {shown(name)} (kupd serves: {served})")
        return dev


    def spawn(self, coro: Any) -> asyncio.Future[Any]:
        task: asyncio.Future[Any] = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._done)
        return task

    def _done(self, task: asyncio.Future[Any]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("background task failed", error=repr(task.exception()))

    def publish(self, event: Event) -> None:
        self.bus.publish(event)

    def health_changed(self) -> None:
        self.on_health()

    @property
    def all_healthy(self) -> bool:
        return all(d.healthy for d in self.devices.values())

    async def start(self) -> None:
        # Each device's open waits at most PROBE_WAIT: one whose host does
        # not answer by then (stopped, hung: libkup waits 30 s for it) is
        # shown not answering while its open goes on, and the sockets are
        # served meanwhile -- it held up every device's service for 30 s.
        await asyncio.gather(*(d.probe() for d in self.devices.values()))
        # Ready means ready: the Call pools of the devices present are
        # filled -- bounded the same way (a fill goes on in the background).
        fills = [d.fill_task for d in self.devices.values() if d.fill_task is not None]
        if fills:
            await asyncio.wait(fills, timeout=PROBE_WAIT)
        self._monitor = asyncio.ensure_future(self._monitor_loop())

    def reschedule(self) -> None:
        """health_interval changed: run a round now, then wait the new one."""
        self._rescheduled.set()

    async def _monitor_loop(self) -> None:
        while not self.closing:
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._rescheduled.wait(), self.config.health_interval)
            self._rescheduled.clear()
            # each device on its own: one whose host hangs holds up no other
            await asyncio.gather(*(d.health_round() for d in list(self.devices.values())))

    async def close(self) -> None:
        self.closing = True
        if self._monitor is not None:
            self._monitor.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._monitor
        for task in list(self._tasks):
            task.cancel()
        for d in self.devices.values():
            d.close()
        for d in self.devices.values():
            # not waited for: a thread inside a call to a hung host comes
            # back only at libkup's RPC timeout (HostThreads: nor does the
            # exit wait for it)
            d.attacher.shutdown(wait=False, cancel_futures=True)
            d.monitor.shutdown(wait=False, cancel_futures=True)

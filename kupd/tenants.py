"""Per-tenant sockets: identity by the socket a request came in on.

grpcio cannot tell a server handler the uid of a unix-socket peer (no
SO_PEERCRED in its API), and a grpc.aio server cannot tell a handler which
of its listening ports a connection was accepted on either (the
ServicerContext exposes the peer address, which for a unix-socket client is
an unnamed "unix:", not the local path).  So kupd runs ONE grpc.aio server
PER SOCKET, all in the same event loop and all sharing the one
:class:`kupd.service.KupService`: each server gets a thin
:class:`TenantKup` wrapper that sets the tenant (a context variable, see
``kupd.policy.use_tenant``) before delegating.  grpc.aio runs every RPC in a
task of its own, so the variable is per request.

Who may connect to a socket is decided by the kernel: the socket file's
owner, group and mode (``connect(2)`` needs write permission on it).  A
socket is created under a umask that gives it exactly the configured mode
at ``bind(2)`` (never wider, never chmod'ed open later; the umask is the
whole process's, so it is set around grpcio's synchronous bind alone, see
:func:`_bind_with_mode`) inside a directory
owned by kupd's user and writable by nobody else; then it is chown'ed to
the configured owner/group.  Between bind and chown the socket is owned by
kupd's user and group, which only narrows access.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import functools
import os
import socket
import stat
import tempfile
from collections.abc import AsyncIterator, Callable, Coroutine, Iterator
from dataclasses import dataclass
from typing import Any

import grpc
import grpc.aio
import structlog
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from kupapi import MAX_GRPC_MESSAGE, kup_pb2, kup_pb2_grpc
from kupd import errors
from kupd.config import SUN_PATH_MAX
from kupd.connections import open_connections, open_rpcs
from kupd.log import bind, get_logger
from kupd.policy import (
    ADMIN,
    Tenant,
    plain_tenant,
    sendable,
    socket_moved,
    socket_removed,
    socket_retired,
    use_tenant,
)
from kupd.retirement import until_retired, waiting_now
from kupd.wire import add_kup_servicer

__all__ = [
    "Endpoint",
    "SocketSet",
    "TenantHealth",
    "TenantKup",
    "check_path",
    "endpoints_for",
    "open_regular",
    "scope_device_pb",
    "write_replacing",
]

log = get_logger("kupd.tenants")

KUP_SERVICE = kup_pb2.DESCRIPTOR.services_by_name["Kup"].full_name
ADMIN_SERVICE = kup_pb2.DESCRIPTOR.services_by_name["Admin"].full_name
HEALTH_SERVICE = health_pb2.DESCRIPTOR.services_by_name["Health"].full_name


class TenantHealth(health_pb2_grpc.HealthServicer):  # type: ignore[misc]
    """kupd's health service as seen through one tenant's socket (per-device
    health only for the devices the tenant may see)."""

    def __init__(
        self, inner: Any, tenant: Tenant, kup: Any, retired: asyncio.Future[None] | None = None
    ) -> None:
        self.inner = inner
        self.tenant = tenant
        self.kup = kup  # KupService: the tenant's watch streams are counted there
        self.retired = retired  # this socket's (kupd.policy.socket_retired)

    def rebind(self, retired: asyncio.Future[None]) -> None:
        """The retirement the RPCs that start from now on are served with
        (:meth:`TenantKup.rebind`)."""
        self.retired = retired

    async def Check(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        use_tenant(self.tenant, self.retired)
        try:
            await self.kup.guard.request_turn("health", context.time_remaining(), self.kup.drain)
            return await self.inner.Check(request, context)
        except errors.KupError as exc:  # its socket retired (kupd.policy.refuse_retired)
            structlog.contextvars.clear_contextvars()
            bind(rpc="Health.Check")  # what its failure is logged with
            await self.kup._abort(context, exc)
            raise AssertionError("unreachable") from None

    async def Watch(self, request: Any, context: grpc.aio.ServicerContext) -> None:
        use_tenant(self.tenant, self.retired)
        structlog.contextvars.clear_contextvars()
        bind(rpc="Health.Watch")  # what its failure is logged with
        try:
            await self.kup.guard.request_turn("health", context.time_remaining(), self.kup.drain)
            with self.kup.watches.slot(self.tenant):
                # it never ends by itself: a reload that retires this
                # socket ends it (Unavailable, where the socket went)
                await until_retired(self.inner.Watch(request, context), socket_retired())
        except errors.KupError as exc:  # past the tenant's watch streams, or retired
            await self.kup._abort(context, exc)


class TenantKup(kup_pb2_grpc.KupServicer):
    """The Kup service as seen through one tenant's socket."""

    def __init__(
        self, inner: Any, tenant: Tenant, retired: asyncio.Future[None] | None = None
    ) -> None:
        self.inner = inner
        self.tenant = tenant
        #: this socket's server's retirement (kupd.policy.socket_retired)
        self.retired = retired
        # Session: the service's own generator with the tenant bound, instead
        # of a generator re-yielding every response of another (a resume per
        # message).  grpc.aio sees through the partial (inspect unwraps it).
        self.__dict__["Session"] = functools.partial(
            inner.Session, tenant=tenant, retired=retired
        )
        # Send (the unary exchange) and Call: the same, one coroutine instead
        # of two.
        self.__dict__["Send"] = functools.partial(inner.Send, tenant=tenant, retired=retired)
        self.__dict__["Call"] = functools.partial(inner.Call, tenant=tenant, retired=retired)

    def rebind(self, retired: asyncio.Future[None]) -> None:
        """The retirement (kupd.policy.socket_retired) that the RPCs of this
        socket's server starting from now on are served with; those under
        way keep theirs.  A new one when a retired server serves its
        tenant's socket again, or a failed one that says where the tenant's
        socket is now (SocketSet._reinstate, SocketSet._reword).

        The server's handlers are the partials above, taken as it was
        built (kupd.wire.add_kup_servicer): their keywords are changed in
        place, which the next call of each uses."""
        self.retired = retired
        for name in ("Session", "Send", "Call"):
            self.__dict__[name].keywords["retired"] = retired

    async def _unary(self, name: str, request: Any, context: grpc.aio.ServicerContext) -> Any:
        use_tenant(self.tenant, self.retired)  # this RPC's own task: no reset needed
        return await getattr(self.inner, name)(request, context)

    async def ListDevices(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        return await self._unary("ListDevices", request, context)

    async def Attach(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        return await self._unary("Attach", request, context)

    def undelivered(self, reply: Any) -> None:
        # an Attach reply its caller was gone for (kupd.wire._reply_watched)
        self.inner.undelivered(reply)

    async def Release(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        return await self._unary("Release", request, context)

    async def Send(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        # Shadowed per instance in __init__, as Session.
        return await self.inner.Send(request, context, tenant=self.tenant, retired=self.retired)

    async def Receive(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        return await self._unary("Receive", request, context)

    async def Pass(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        return await self._unary("Pass", request, context)

    async def Call(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        # Shadowed per instance in __init__, as Session.
        return await self.inner.Call(request, context, tenant=self.tenant, retired=self.retired)

    async def Session(
        self, request_iterator: Any, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[Any]:
        # Shadowed per instance in __init__ (what grpc.aio calls); this is
        # the same thing spelled as a method, for the servicer's type.
        async for item in self.inner.Session(
            request_iterator, context, tenant=self.tenant, retired=self.retired
        ):
            yield item

    async def Watch(self, request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
        use_tenant(self.tenant, self.retired)
        async for item in self.inner.Watch(request, context):
            yield item


@dataclass(frozen=True)
class Endpoint:
    path: str
    tenant: Tenant
    owner: int | None = None
    group: int | None = None
    mode: int = 0o600
    #: Tenant and admin sockets must live in a directory only kupd's user
    #: can write; the plain socket (no tenants) may be in a shared sticky one
    #: such as /tmp.  Either way every directory and link on the way is
    #: checked (:func:`check_path`).
    check_dir: bool = True
    #: Connections at once (0: no limit): gRPC's
    #: grpc.max_allowed_incoming_connections on this socket's own server,
    #: which closes one more as it is accepted, before any HTTP/2 --
    #: the one cap grpcio offers on connections, and why each tenant's
    #: socket has a server of its own is what makes it a per-tenant cap.
    max_connections: int = 0
    #: RPCs (streams included) open at once on this socket's server, all
    #: its connections together (0: no cap): grpcio's
    #: maximum_concurrent_rpcs, which counts an RPC from its headers on,
    #: before its request has arrived -- what kupd's own limits cannot
    #: see (tenant_rpc_bound)
    max_rpcs: int = 0
    #: gRPC's receive limit on this socket (0: kupd's, MAX_GRPC_MESSAGE):
    #: a request whose declared length is above it is refused before it is
    #: buffered (receive_limit)
    max_receive: int = 0

    @property
    def key(self) -> tuple[str, str]:
        return (self.path, self.tenant.name)

    @property
    def transport(self) -> tuple[int, int, int]:
        """What this socket's gRPC server is built with beyond the options
        every server shares, and cannot change once built: a reload that
        changes it gives the socket a new server (SocketSet.commit)."""
        return (self.max_connections, self.max_rpcs, self.max_receive)


def endpoints_for(config: Any) -> list[Endpoint]:
    """The sockets a config asks for: ``socket`` as tenant "default" when no
    tenants are configured, each tenant's socket, and the admin socket."""
    eps: list[Endpoint] = []
    if not config.tenants:
        # the plain socket: the same RPC cap as a tenant's, derived from
        # kupd's own limits (its tenant "default" has none of its own), and
        # the receive limit that follows the top-level max_message_bytes
        plain = plain_tenant(config)
        eps.append(
            Endpoint(
                os.path.abspath(config.socket),
                plain,
                mode=config.socket_mode,
                check_dir=False,
                max_connections=config.max_connections,
                max_rpcs=tenant_rpc_bound(config, plain),
                max_receive=receive_limit(plain),
            )
        )
    for t in config.tenants:
        eps.append(
            Endpoint(
                t.socket,
                t,
                t.owner,
                t.group,
                t.mode,
                max_connections=t.max_connections,
                max_rpcs=tenant_rpc_bound(config, t),
                max_receive=receive_limit(t),
            )
        )
    if config.admin_socket:
        # no RPC cap: only kupd's own user reaches it, and a cap there could
        # keep the operator out just when a client misbehaves
        eps.append(Endpoint(os.path.abspath(config.admin_socket), ADMIN, os.geteuid(), None, 0o600))
    return eps


def endpoint_key(ep: Endpoint) -> str:
    """The config key that names ``ep``'s socket, for its errors."""
    if ep.tenant.admin:
        return "admin_socket"
    if not ep.check_dir:
        return "socket"  # the plain socket: served only without tenants
    return f"tenant[name={ep.tenant.name}].socket"


#: What a request may carry besides its payload (device name, caller,
#: framing) on a socket whose tenant has a max_message_bytes: requests a
#: little over the limit still reach kupd, which answers TooBig naming it.
RECEIVE_HEADROOM = 16 * 1024

#: RPCs a tenant may have open beyond its own limits (unary operations
#: waiting on its leases, Checks, ListDevices...) before gRPC refuses more.
RPC_SLACK = 1024


def receive_limit(t: Tenant) -> int:
    """gRPC's receive limit on ``t``'s socket: its max_message_bytes plus
    RECEIVE_HEADROOM (0: kupd's own limit, for a tenant without one).

    Why: gRPC buffers a request until the whole message is there, before
    kupd sees anything.  A client that starts thousands of RPCs and never
    finishes their 4 MiB requests made kupd hold gigabytes; with this limit
    a request declared larger is refused as its length arrives."""
    if not t.max_message_bytes:
        return 0
    return min(t.max_message_bytes + RECEIVE_HEADROOM, MAX_GRPC_MESSAGE)


#: The least a stream may hold of what its client sent ahead: what gRPC's
#: default window lets it send.
MIN_STREAM_WINDOW = 64 * 1024


def window_for(max_receive: int) -> int:
    """What a stream on a socket whose receive limit is ``max_receive``
    (0: kupd's, MAX_GRPC_MESSAGE) may hold of requests kupd has not read:
    that limit, at least MIN_STREAM_WINDOW.  See stream_window."""
    return max(max_receive or MAX_GRPC_MESSAGE, MIN_STREAM_WINDOW)


def lookahead_for(max_receive: int) -> int:
    """gRPC's ``grpc.http2.lookahead_bytes`` on that socket: half its
    window_for.  gRPC lets a client send up to about twice the lookahead
    ahead of what the server has read -- measured: twice for 64 KiB, 1.5
    to 1.75 times for 4 MiB (tests/tenancy/test_tenancy_hostile_wire.py)."""
    return window_for(max_receive) // 2


def stream_window(t: Tenant) -> int:
    """What a stream of ``t``'s socket may hold of requests kupd has not
    read yet: its receive limit, at least MIN_STREAM_WINDOW (HTTP/2 flow
    control, the window fixed: lookahead_for).

    Why: gRPC holds what a client sends on a stream before kupd reads it
    -- a Session's next operations, sent ahead while kupd waits in one --
    up to the window it announces.  gRPC's flow-control probe, which kupd
    turns off (kupd.server.server_options), grew that window as it
    measured the connection, to 8 MiB and more whatever the tenant's
    max_message_bytes; fixed, a stream holds no more than one whole
    request could, which is what held_bound counts per RPC.  A request
    larger than the window still comes through: gRPC opens the window
    for the message kupd is reading."""
    return window_for(receive_limit(t))


#: What each RPC gRPC holds open for a tenant costs kupd besides its
#: request's bytes -- gRPC's call and stream state, its metadata, and
#: grpc.aio's task and context for it -- rounded up from what was
#: measured: RPCs opened with their headers alone, and never a request,
#: grew kupd's resident size by 18-21 KiB each (3 000 on one connection:
#: 21 KiB each; 20 000 on five connections: 364 MB).  Their metadata
#: counts too, which a client chooses: gRPC lets in up to 8 KiB of it
#: always, and up to 16 KiB at random (the further past 8 KiB, the fewer):
#: 3 000 RPCs with 7 000 bytes of it each held 29 KiB each; with 12 000
#: bytes, the half gRPC let in held ~36 KiB each.  (This was 24 KiB, from
#: the headers alone: kupd's advisory under-counted such a tenant.)
RPC_HELD_BYTES = 40 * 1024

#: The memory a tenant's unfinished requests may tie up (held_bound) above
#: which kupd warns at start and reload (kupd.config.advisories).
HELD_WARN_BYTES = 1 << 30


def held_bound(config: Any, t: Tenant) -> int:
    """The most memory ``t`` can make kupd hold in RPCs whose requests
    never arrive whole, or that kupd has not read yet: its socket's RPC cap
    (tenant_rpc_bound) times what each may hold, its stream window
    (stream_window: its receive limit, else gRPC's whole message, at least
    64 KiB) plus RPC_HELD_BYTES."""
    per_rpc = stream_window(t) + RPC_HELD_BYTES
    return tenant_rpc_bound(config, t) * per_rpc


def tenant_rpc_bound(config: Any, t: Tenant) -> int:
    """The RPCs ``t``'s socket serves at once: its sessions and leases
    (max_sessions, else kupd's; each with the unary operations that may wait
    on a lease), its Calls (max_calls_in_flight, else, on each device it may
    use, kupd's max_queued_calls queued and one on each pool channel), its
    watch streams, and RPC_SLACK -- above what kupd's
    own limits let through, so that those refuse first, naming themselves;
    gRPC's refusal (RESOURCE_EXHAUSTED "Concurrent RPC limit exceeded")
    meets only RPCs that never got as far as kupd.  Together with
    receive_limit it bounds the memory a tenant can tie up in requests that
    never arrive whole."""
    from kupd.sessions import MAX_WAITING_OPS
    from kupd.watch import WATCHES_PER_TENANT

    # each session or lease: its stream, or its unary operation and those
    # that may wait behind it
    sessions = 0
    if {"session", "lease"} & set(t.ops):
        sessions = (t.max_sessions or config.max_sessions) * (1 + MAX_WAITING_OPS)
    calls = 0
    if "call" in t.ops:
        calls = t.max_calls_in_flight or sum(
            config.max_queued_calls + d.call_channels
            for d in config.devices
            if t.may_see(d.name)
        )
    return sessions + calls + WATCHES_PER_TENANT + RPC_SLACK


#: Symbolic links followed by hand on the way to one path, at most (the
#: kernel's own limit, ELOOP).
_MAX_LINKS = 40


def _trusted(uid: int) -> bool:
    """Root or kupd's user: the owners whose entries nobody else may change."""
    return uid in (0, os.geteuid())


def _others_write(st: os.stat_result) -> bool:
    """A directory that users other than root and kupd's user may write in
    (its owner can always give itself write permission)."""
    return not _trusted(st.st_uid) or bool(st.st_mode & (stat.S_IWGRP | stat.S_IWOTH))


def _unsafe_above(st: os.stat_result) -> bool:
    """A directory on the way to a file kupd makes that someone else could
    rename an entry in: another user's, or writable by others without the
    sticky bit (with it, as /tmp, nobody renames what they do not own)."""
    return not _trusted(st.st_uid) or bool(
        st.st_mode & (stat.S_IWGRP | stat.S_IWOTH) and not st.st_mode & stat.S_ISVTX
    )


def _trusted_owners() -> str:
    """Who may own a directory on a socket's path: root, or kupd's user."""
    uid = os.geteuid()
    return "root (uid 0)" if uid == 0 else f"root or kupd's user (uid {uid})"


def check_path(path: str, what: str = "socket", private: bool = True, create: bool = False) -> str:
    """Check the directories a file kupd makes at ``path`` (a socket, its
    lock, pid file or audit log) is reached through, as the path is written:
    each component is lstat'ed from ``/`` down and a symbolic link is
    followed by hand, so a link planted on the way is seen, not resolved
    away.  Whoever can rename an entry on the way, or point a link on it
    elsewhere, can put a file of their own at the path or have kupd write
    through to another.  So:

    * every directory on the way is root's or kupd's user's, and writable
      by others only with the sticky bit;
    * a symbolic link on the way sits in a directory nobody else can write,
      or is root's or kupd's user's in a sticky one (nobody else can replace
      it there);
    * the last directory, when ``private`` (tenant and admin sockets): kupd's
      user's and writable by nobody else at all; otherwise (the plain
      socket, lock_file, pid_file, audit_log) it may be shared and sticky,
      as /tmp, and the file itself is then made so that nothing planted at
      its name is followed (see :func:`open_regular`).

    ``create``: make missing directories (0755) on the way; otherwise a
    missing one is FileNotFoundError.  OSError naming the component and
    ``what`` for anything unsafe.  Returns the directory resolved."""
    if not os.path.isabs(path):
        path = os.path.join(os.getcwd(), path)
    parts = [p for p in os.path.dirname(path).split("/") if p]
    #: the directories entered so far (resolved) with their lstat, "/" first
    trail: list[tuple[str, os.stat_result]] = [("/", os.lstat("/"))]
    links = 0

    def refuse_above(d: str, st: os.stat_result) -> None:
        raise OSError(
            f"directory {d} above the {what} {path} must be owned by {_trusted_owners()} "
            f"and writable by nobody else unless sticky (it is uid "
            f"{st.st_uid}, mode {stat.S_IMODE(st.st_mode):04o}): another user could "
            f"rename the entries in it and replace the {what}"
        )

    if parts and _unsafe_above(trail[0][1]):
        refuse_above("/", trail[0][1])
    while parts:
        name = parts.pop(0)
        if name == ".":
            continue
        if name == "..":
            if len(trail) > 1:
                trail.pop()
            continue
        cur, cur_st = trail[-1]
        nxt = os.path.join(cur, name)
        try:
            st = os.lstat(nxt)
        except FileNotFoundError:
            if not create:
                raise FileNotFoundError(errno.ENOENT, os.strerror(errno.ENOENT), nxt) from None
            with contextlib.suppress(FileExistsError):  # made meanwhile: judged below
                os.mkdir(nxt, 0o755)
            st = os.lstat(nxt)
        if stat.S_ISLNK(st.st_mode):
            if _others_write(cur_st) and not _trusted(st.st_uid):
                raise OSError(
                    f"{nxt} on the way to the {what} {path} is a symbolic link (uid "
                    f"{st.st_uid}) in directory {cur}, which users other than root and uid "
                    f"{os.geteuid()} can write (it is uid {cur_st.st_uid}, mode "
                    f"{stat.S_IMODE(cur_st.st_mode):04o}): kupd will not follow it -- "
                    "another user could point it elsewhere"
                )
            links += 1
            if links > _MAX_LINKS:
                raise OSError(errno.ELOOP, os.strerror(errno.ELOOP), path)
            target = os.readlink(nxt)
            if target.startswith("/"):
                del trail[1:]
            parts[:0] = [p for p in target.split("/") if p]
            continue
        if not stat.S_ISDIR(st.st_mode):
            raise NotADirectoryError(errno.ENOTDIR, os.strerror(errno.ENOTDIR), nxt)
        if parts and _unsafe_above(st):
            refuse_above(nxt, st)
        trail.append((nxt, st))
    d, st = trail[-1]
    shown = os.path.dirname(path)
    shown = d if d == shown else f"{shown} (that is {d})"
    if private:
        if st.st_uid != os.geteuid() or st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
            raise OSError(
                f"socket directory {shown} of {path} must be owned by uid {os.geteuid()} "
                f"and writable by nobody else (it is uid {st.st_uid}, mode "
                f"{stat.S_IMODE(st.st_mode):04o}): another user could replace the socket"
            )
    elif _unsafe_above(st):
        raise OSError(
            f"directory {shown} of the {what} {path} must be owned by {_trusted_owners()} "
            f"and writable by nobody else unless sticky (it is uid "
            f"{st.st_uid}, mode {stat.S_IMODE(st.st_mode):04o}): another user could "
            f"replace the {what} or plant a link at its name"
        )
    return d


def open_regular(path: str, flags: int, mode: int, what: str, devices: bool = False) -> int:
    """``os.open`` a file kupd writes (lock_file, audit_log) without
    following a link at its name (O_NOFOLLOW) and without blocking on a
    FIFO, after :func:`check_path` of its directory; refused unless it is a
    regular file of one name (a hard link to another file, which anyone may
    make in a shared directory where the kernel allows it, would have kupd
    write there) -- or, with ``devices``, a character device (only root
    makes one: /dev/null, /dev/full).  OSError naming ``what``, its
    strerror saying why, otherwise."""
    check_path(path, what, private=False)
    try:
        fd = os.open(path, flags | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, mode)
    except OSError as exc:
        why = exc
        with contextlib.suppress(OSError):
            found = os.lstat(path).st_mode
            if stat.S_ISLNK(found):
                why = OSError(
                    errno.ELOOP,
                    "it is a symbolic link (kupd follows none at the name of a file it writes)",
                )
            elif stat.S_ISFIFO(found) or stat.S_ISSOCK(found):  # ENXIO: no reader
                why = OSError(exc.errno, "it is not a regular file: kupd will not write to it")
        raise why from None
    st = os.fstat(fd)
    kind = ""
    if stat.S_ISREG(st.st_mode):
        if st.st_nlink != 1:
            kind = f"a regular file of {st.st_nlink} names (a hard link)"
        elif not _trusted(st.st_uid):
            # made first by another user in a shared directory: it could
            # read, rewrite or truncate what kupd writes (the audit log)
            kind = f"a file of uid {st.st_uid}, not root's or kupd's"
    elif not (devices and stat.S_ISCHR(st.st_mode)):
        kind = "not a regular file"
    if kind:
        os.close(fd)
        raise OSError(errno.EPERM, f"it is {kind}: kupd will not write to it")
    return fd


def write_replacing(path: str, data: bytes, mode: int, what: str) -> None:
    """Write ``path`` (the pid_file) as a new file: made under a fresh name
    next to it (O_CREAT|O_EXCL|O_NOFOLLOW: nothing planted is followed) and
    renamed over the name, so a link or file someone left there is replaced,
    never written through."""
    d = check_path(path, what, private=False)
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", dir=d)
    try:
        try:
            os.fchmod(fd, mode)
            os.write(fd, data)
        finally:
            os.close(fd)
        os.rename(tmp, os.path.join(d, os.path.basename(path)))
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def _bind_with_mode(server: grpc.aio.Server, path: str, mode: int) -> int:
    """Bind ``server`` at unix socket ``path``, born with exactly ``mode``;
    gRPC's port number (0, or RuntimeError turned into 0: not bound).

    The umask is the whole process's: a file any other code of kupd's
    creates while it is changed (the audit log re-opened by SIGUSR1 or a
    reload, a socket directory, the pid file) would be born under the
    socket's umask.  So it is changed around this one synchronous call and
    nothing else: grpcio creates, binds and listens on a unix socket inside
    ``add_insecure_port``, on the calling thread (seen with strace; grpc.aio's
    ``start`` only begins accepting), and the call has no await, so no other
    task of the event loop runs inside the window.  kupd's own threads (the
    device hosts' calls, the config-read thread, the metrics endpoint)
    create no files."""
    old = os.umask(0o777 & ~mode)
    try:
        port: int = server.add_insecure_port("unix:" + path)
        return port
    except RuntimeError:  # grpcio's "Failed to bind", without the reason
        return 0
    finally:
        os.umask(old)


#: A server started by :meth:`SocketSet.prepare`: its endpoint, the server,
#: and the name it is bound at until :meth:`SocketSet.commit` renames it to
#: ``ep.path``.
Started = tuple[Endpoint, grpc.aio.Server, str]


def _file_id(path: str) -> tuple[int, int] | None:
    """(st_dev, st_ino) of the file at ``path``, or None when there is none."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return None
    return (st.st_dev, st.st_ino)


def _someone_accepts(path: str) -> bool:
    """A unix socket at ``path`` that a process accepts connections on."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(1.0)
        try:
            s.connect(path)
        except OSError:
            return False  # refused (stale), gone, or not ours to judge: EACCES
        return True


def _not_ours(path: str, tenant: str) -> OSError:
    return OSError(
        f"{path} (tenant {tenant}) is no longer the socket kupd bound there (replaced or "
        "moved since): kupd will not change the owner or mode of another file; restart "
        "kupd to serve the socket again"
    )


@contextlib.contextmanager
def _the_socket(
    path: str, fid: tuple[int, int] | None, tenant: str
) -> Iterator[tuple[str, os.stat_result, bool]]:
    """The socket kupd bound at ``path`` (inode ``fid``; None: any socket),
    pinned for chown/chmod: (name, stat, follow_symlinks) to pass them,
    never another file, whatever is renamed at ``path`` meanwhile.  On
    Linux, an O_PATH|O_NOFOLLOW descriptor of it, changed through
    /proc/self/fd (there is no lchmod); elsewhere the path itself, links
    not followed.  OSError when ``path`` is not that socket (a link, another
    file, another socket)."""

    def check(st: os.stat_result) -> None:
        if not stat.S_ISSOCK(st.st_mode) or (fid is not None and (st.st_dev, st.st_ino) != fid):
            raise _not_ours(path, tenant)

    check(os.lstat(path))
    if not hasattr(os, "O_PATH") or not os.path.isdir("/proc/self/fd"):
        # lchmod where there is one (the BSDs); a Linux without /proc has
        # none: the path then, checked just now in a directory nobody else
        # can write (check_path)
        yield path, os.lstat(path), os.chmod not in os.supports_follow_symlinks
        return
    fd = os.open(path, os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        st = os.fstat(fd)
        check(st)
        yield f"/proc/self/fd/{fd}", st, True
    finally:
        os.close(fd)


class SocketSet:
    """The running gRPC servers, one per endpoint.

    What is at a socket's path matters: binding needs the path free, and a
    gRPC server removes the socket at the path it bound when it stops.  So
    every server is bound under a private name in the socket's directory
    (".kN", never reused) and then renamed to its path -- atomically, over a
    stale socket -- and kupd itself removes a path only while it is still the
    file that server bound (told by its inode).  Hence:

    * a file at the path that is not a socket, or a socket another process
      serves, is refused, never replaced;
    * a reload that gives a path kupd serves to another tenant (a renamed
      tenant, two tenants swapping sockets) renames the new server over the
      old one: the path is never missing, and stopping the old server (which
      removes only its private name) leaves the new one in place.
    """

    def __init__(
        self,
        options: list[tuple[str, Any]],
        kup: kup_pb2_grpc.KupServicer,
        health: Any,
        admin: Callable[[], Any],
    ) -> None:
        self.options = options
        self.kup = kup
        self.health = health
        self.admin = admin  # builds the AdminServicer
        self.servers: dict[tuple[str, str], tuple[Endpoint, grpc.aio.Server]] = {}
        #: the socket file each server bound (st_dev, st_ino), by key
        self._bound: dict[tuple[str, str], tuple[int, int] | None] = {}
        #: servers bound at their path itself (no room for a private name):
        #: stopping one removes the path, so it cannot be handed over
        self._direct: set[tuple[str, str]] = set()
        #: every server bound at its path itself, by server, until its stop
        #: has returned -- a retired one too: gRPC removes that path as the
        #: server stops, whatever socket is there by then (_direct_busy)
        self._direct_at: dict[grpc.aio.Server, str] = {}
        self._names = 0
        #: the inode each started server's socket was bound as, by the name
        #: it was bound at (until _install renames it)
        self._born: dict[str, tuple[int, int]] = {}
        #: kept sockets whose permissions prepare() changed: (path, the
        #: socket's inode, tenant, uid, gid, mode) as they were, restored by
        #: discard()
        self._undo: list[tuple[str, tuple[int, int] | None, str, int, int, int]] = []
        #: servers a reload removed, finishing their Calls (see commit): the
        #: task stopping each, and the server (stop() cuts its grace short)
        self._retiring: dict[asyncio.Task[None], grpc.aio.Server] = {}
        #: each server's retirement (kupd.policy.socket_retired), failed by
        #: _retire: what its RPCs wait for ends then
        self._retired: dict[grpc.aio.Server, asyncio.Future[None]] = {}
        #: the path each server's socket was bound at (channelz's name for
        #: it, kept after the rename: kupd.connections)
        self._bound_at: dict[grpc.aio.Server, str] = {}
        #: by key: the retirements of the servers _swap replaced there that
        #: still finish RPCs of theirs (a later _retire of the key ends
        #: their waits too)
        self._replaced: dict[tuple[str, str], list[asyncio.Future[None]]] = {}
        #: set by stop(): what waits for a replaced server to empty ends
        self._stopping = asyncio.Event()
        #: what a retired server's RPCs are given to end (commit's
        #: calls_grace, the running call_timeout: _stop_retired)
        self.calls_grace = 1.0
        #: the shared options (``options``) each server was built with
        self._built_with: dict[grpc.aio.Server, tuple[tuple[str, Any], ...]] = {}
        #: each server's tenant services, until it stops: what _reinstate
        #: and _reword give a new retirement
        self._wrappers: dict[grpc.aio.Server, tuple[TenantKup, TenantHealth]] = {}
        #: by key: the retired servers waiting for their RPCs to end before
        #: they stop (_stop_retired), each with the future _reinstate
        #: fulfils -- with the server's new retirement -- when a reload
        #: gives that tenant its socket at that path back
        self._awaiting: dict[
            tuple[str, str], dict[grpc.aio.Server, asyncio.Future[asyncio.Future[None]]]
        ] = {}
        #: by key: the owner, group and mode the socket had when a reload
        #: last retired it -- who its servers' open connections were let in
        #: as (_reinstate serves them again only if the new socket lets in
        #: the same)
        self._retired_as: dict[tuple[str, str], tuple[int | None, int | None, int]] = {}

    def _serving(self, path: str) -> tuple[str, str] | None:
        """The key of kupd's running server whose socket is at ``path``."""
        fid = _file_id(path)
        for key, bound in self._bound.items():
            if fid is not None and bound == fid:
                return key
        return None

    @staticmethod
    def _check_free(ep: Endpoint) -> None:
        """ep.path may take a socket: nothing there, or a stale socket (then
        replaced by the rename).  OSError naming the path and the tenant for
        anything else."""
        try:
            st = os.lstat(ep.path)
        except FileNotFoundError:
            return
        if not stat.S_ISSOCK(st.st_mode):
            raise OSError(
                f"{ep.path} (tenant {ep.tenant.name}) exists and is not a socket: "
                "kupd will not replace it"
            )
        if _someone_accepts(ep.path):
            raise OSError(
                f"{ep.path} (tenant {ep.tenant.name}) is a socket another process serves: "
                "kupd will not take it over"
            )

    def _private_name(self, ep: Endpoint) -> str:
        """A free name next to ep.path to bind at, or ep.path itself when
        no name fits in sun_path there."""
        while True:
            self._names += 1
            path = os.path.join(os.path.dirname(ep.path), f".k{self._names}")
            if len(os.fsencode(path)) >= SUN_PATH_MAX:
                return ep.path
            if _file_id(path) is None:
                return path

    async def _serve(self, ep: Endpoint, handover: bool = False) -> Started:
        """A started server of ep, bound at a private name (not yet at
        ep.path, not registered in servers).  ``handover``: another of
        kupd's servers is at ep.path now."""
        try:
            check_path(ep.path, "socket", private=ep.check_dir, create=True)
        except OSError as exc:
            # an unsafe or unusable directory: the message names the path;
            # the operator edits a config key, so name that too
            raise OSError(f"config key {endpoint_key(ep)!r}: {exc}") from None
        path = self._private_name(ep)
        if path == ep.path and handover:
            raise OSError(
                f"cannot hand socket {ep.path} over to tenant {ep.tenant.name}: no room "
                "for a private name next to it (sun_path); restart kupd instead"
            )
        if path == ep.path:
            self._check_free(ep)
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)  # stale (checked above)
        options = list(self.options)
        if ep.max_connections:
            options.append(("grpc.max_allowed_incoming_connections", ep.max_connections))
        if ep.max_receive:
            options = [o for o in options if o[0] != "grpc.max_receive_message_length"]
            options.append(("grpc.max_receive_message_length", ep.max_receive))
        options = [o for o in options if o[0] != "grpc.http2.lookahead_bytes"]
        options.append(("grpc.http2.lookahead_bytes", lookahead_for(ep.max_receive)))
        server = grpc.aio.server(options=options, maximum_concurrent_rpcs=ep.max_rpcs or None)
        self._built_with[server] = tuple(self.options)
        retired: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._retired[server] = retired
        # kupd.wire: the Session by hand; a request protobuf cannot parse
        # answered INVALID_ARGUMENT by the service edge
        kup = TenantKup(self.kup, ep.tenant, retired)
        health = TenantHealth(self.health, ep.tenant, self.kup, retired)
        self._wrappers[server] = (kup, health)
        add_kup_servicer(kup, server, getattr(self.kup, "refuse_malformed", None))
        health_pb2_grpc.add_HealthServicer_to_server(health, server)
        names = [KUP_SERVICE, HEALTH_SERVICE, reflection.SERVICE_NAME]
        if ep.tenant.admin:
            kup_pb2_grpc.add_AdminServicer_to_server(self.admin(), server)
            names.append(ADMIN_SERVICE)
        reflection.enable_server_reflection(names, server)
        try:
            port = _bind_with_mode(server, path, ep.mode)
            if port == 0:
                raise OSError(f"cannot bind unix socket {ep.path} (tenant {ep.tenant.name})")
            starting = asyncio.ensure_future(server.start())
            try:
                await asyncio.shield(starting)
            except asyncio.CancelledError:
                # grpc.aio's start cancelled half-way leaves a server
                # whose stop fails (InvalidStateError), its socket
                # bound: it finishes first, and is stopped below
                await asyncio.wait({starting})
                raise
            try:
                # The socket just bound, pinned: a file renamed to its name
                # meanwhile is refused, never chown'ed.
                with _the_socket(path, None, ep.tenant.name) as (name, st, follow):
                    if ep.owner is not None or ep.group is not None:
                        os.chown(
                            name,
                            -1 if ep.owner is None else ep.owner,
                            -1 if ep.group is None else ep.group,
                            follow_symlinks=follow,
                        )
            except OSError as exc:
                if exc.strerror is None:  # _not_ours
                    raise
                raise OSError(
                    f"cannot give socket {ep.path} (tenant {ep.tenant.name}) to owner "
                    f"{ep.owner} / group {ep.group}: {exc.strerror} (chown needs CAP_CHOWN)"
                ) from None
        except BaseException:
            # Not bound, or bound and not handed out (a cancel at the start
            # included: prepare's caller went away): stopped, which removes
            # the socket gRPC bound at the private name, and forgotten.
            self._retired.pop(server, None)
            self._built_with.pop(server, None)
            self._bound_at.pop(server, None)
            self._wrappers.pop(server, None)
            await server.stop(None)
            raise
        self._born[path] = (st.st_dev, st.st_ino)
        self._bound_at[server] = path
        return ep, server, path

    def _install(self, started: Started) -> None:
        """Rename a started server's socket to its path; it serves there now."""
        ep, server, path = started
        if path != ep.path:
            os.rename(path, ep.path)
        else:
            self._direct.add(ep.key)
            self._direct_at[server] = path
        self.servers[ep.key] = (ep, server)
        self._bound[ep.key] = self._born.pop(path, None) or _file_id(ep.path)
        log.info(
            "socket serving",
            socket=ep.path,
            tenant=ep.tenant.name,
            mode=f"{ep.mode:04o}",
            max_connections=ep.max_connections or None,
        )

    def _swap(self, started: Started) -> None:
        """A started server takes the path of the running one of the same
        key, whose connection cap, RPC cap or receive limit a reload
        changed (gRPC fixes them when it builds a server).

        The new socket is renamed over the old one (rename(2): a client
        connecting meanwhile reaches the old server or the new one, never
        nothing; its mode and owner were set at its private name).  The
        old server serves on what it has: the connections it accepted and
        their RPCs -- a reload that keeps a tenant's socket leaves its
        Sessions and waiting RPCs alone --, each connection until it has
        been idle for CONNECTION_IDLE (gRPC then closes it: its client's
        next RPC goes to the new server); a connection still open after
        SWAP_DRAIN is told to go (GOAWAY) as the server stops, its RPCs
        left to end (:meth:`_drain`)."""
        ep = started[0]
        old_ep, old = self.servers[ep.key]
        fid = self._bound.get(ep.key)
        # The old socket keeps a second name until its server has accepted
        # the connections that reached it before the rename: stopping it
        # closes its listening socket, and one still in its backlog would
        # be reset, not served.
        marker = self._private_name(ep)
        try:
            if marker == ep.path or fid is None or _file_id(ep.path) != fid:
                raise OSError("no second name")
            os.link(ep.path, marker, follow_symlinks=False)
            if _file_id(marker) != fid:  # not the socket it was a moment ago
                self._unlink_if(marker, _file_id(marker))
                marker = ""
        except OSError:
            marker = ""
        self._install(started)
        retired = self._retired.pop(old, None)
        if retired is not None:
            self._replaced.setdefault(ep.key, []).append(retired)
        log.info(
            "socket server rebuilt",
            socket=ep.path,
            tenant=ep.tenant.name,
            was=_transport_text(old_ep),
            now=_transport_text(ep),
            options_changed=self._built_with.get(old) != tuple(self.options),
        )
        bound_at = self._bound_at.get(old, ep.path)
        task = asyncio.ensure_future(
            self._drain(ep.key, old, bound_at, retired, marker, fid)
        )
        self._retiring[task] = old
        task.add_done_callback(lambda t: self._retiring.pop(t, None))

    async def _drain(
        self,
        key: tuple[str, str],
        server: grpc.aio.Server,
        bound_at: str,
        retired: asyncio.Future[None] | None,
        marker: str,
        fid: tuple[int, int] | None,
    ) -> None:
        """Stop a server :meth:`_swap` replaced, once it has accepted every
        connection that reached it before the swap, and once what it
        serves is over (no deadline: kupd's stop cuts it short, as it
        does a removed socket's grace: :meth:`stop`).

        Why not stop it at once: a stopping gRPC server cancels every RPC
        that reaches it after the stop began -- those a client sent on
        its connection before it read the server's GOAWAY --, without
        running them (CANCELLED).  A connection gRPC closes because it is
        idle (CONNECTION_IDLE) is closed without that race.  So the stop
        waits until the server's connections are gone, SWAP_DRAIN at
        most: only a connection busy all that time meets the race."""
        try:
            await self._unless_retired(_accepted_through(marker), retired)
        finally:
            if marker:
                self._unlink_if(marker, fid)
        retiring = await self._until_idle(bound_at, retired)
        self._bound_at.pop(server, None)
        self._built_with.pop(server, None)
        try:
            if retiring:
                await self._stop_retired(key, server, bound_at, self.calls_grace)
            else:
                await server.stop(float("inf"))
                self._wrappers.pop(server, None)
                self._direct_at.pop(server, None)
        finally:
            self._forget_replaced(key, retired)
        log.info(
            "replaced socket server stopped: what it served is over",
            socket=key[0],
            tenant=key[1],
            second_name=bool(marker),
        )

    async def _until_idle(self, bound_at: str, retired: asyncio.Future[None] | None) -> bool:
        """Return once the server a swap replaced (:meth:`_drain`), or a
        retired one whose socket a reload gave back (:meth:`_stop_retired`),
        listening at ``bound_at``, has no connection left -- SWAP_DRAIN at
        most, or until kupd stops --: False; True, at once, when its
        retirement ``retired`` fires meanwhile (a later reload moved or
        removed the socket: _retire).  Then the server's connections must
        go now, as a retired server's do (once their RPCs are over:
        _stop_retired); kept, every RPC on them would keep meeting the
        move's "connect there", a new client's too (gRPC shares
        connections by target)."""
        loop = asyncio.get_running_loop()
        until = loop.time() + SWAP_DRAIN
        while loop.time() < until and not self._stopping.is_set():
            if retired is not None and retired.done():
                return True
            counts = open_connections([bound_at])
            if counts is None or not counts.get(bound_at, 0):
                break  # none left (or channelz cannot say: stop now)
            await self._unless_retired(asyncio.sleep(SWAP_POLL), retired)
        return False

    def _forget_replaced(self, key: tuple[str, str], retired: asyncio.Future[None] | None) -> None:
        """A replaced server's retirement, its server stopped: no longer one
        that a _retire of ``key`` fails."""
        waits = self._replaced.get(key, [])
        if retired in waits:
            waits.remove(retired)
        if not waits:
            self._replaced.pop(key, None)

    async def _unless_retired(
        self, aw: Coroutine[Any, Any, None], retired: asyncio.Future[Any] | None
    ) -> None:
        """Await ``aw`` (:meth:`_drain`'s waits), cut short the moment the
        server's retirement fires (_retire: a reload moved or removed the
        socket) or kupd stops: a replaced server must not go on serving a
        socket that is gone -- polled instead, it answered its clients "moved
        ... connect there" for up to a poll's length, after the socket was
        back even (found by the stateful probe)."""
        work = asyncio.ensure_future(aw)
        stopping = asyncio.ensure_future(self._stopping.wait())
        waits: set[asyncio.Future[Any]] = {work, stopping}
        if retired is not None:
            waits.add(retired)  # awaited, never cancelled: it is the server's
        try:
            await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for f in (work, stopping):
                f.cancel()
            await asyncio.gather(work, stopping, return_exceptions=True)

    @staticmethod
    def _unlink_if(path: str, fid: tuple[int, int] | None) -> None:
        """Remove ``path`` if it is still the file ``fid`` (not a socket
        renamed there since for another server)."""
        if fid is not None and _file_id(path) == fid:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)

    async def start_one(self, ep: Endpoint) -> None:
        self._check_free(ep)
        self._install(await self._serve(ep))

    async def stop_one(self, key: tuple[str, str], grace: float | None = 1.0) -> None:
        ep, server = self.servers.pop(key)
        fid = self._bound.pop(key, None)
        self._direct.discard(key)
        self._retired.pop(server, None)
        self._built_with.pop(server, None)
        self._bound_at.pop(server, None)
        self._wrappers.pop(server, None)
        await server.stop(grace)
        self._direct_at.pop(server, None)
        self._unlink_if(ep.path, fid)
        log.info("socket removed", socket=ep.path, tenant=ep.tenant.name)

    async def prepare(
        self, wanted: list[Endpoint], options: list[tuple[str, Any]] | None = None
    ) -> list[Started]:
        """The first half of a reload's socket change, the half that can fail:
        start the servers of ``wanted``'s new endpoints, all or none -- a
        socket that cannot be bound or handed over stops the ones already
        started and raises OSError, so the reload is refused with nothing
        changed.  The owner/group/mode of kept sockets is changed here too
        (the step that may be refused: EPERM), and put back should the rest
        fail.  They take effect with :meth:`commit` (or go with
        :meth:`discard`); no handler runs before the caller next awaits.

        ``options``: the gRPC options every server is to be built with from
        now on (kupd.server.server_options of the new config); a kept
        socket whose server was built with others gets a new one, as one
        whose own settings changed (:meth:`_swap`)."""
        started: list[Started] = []
        self._undo = []
        was = self.options
        if options is not None:
            self.options = options
        try:
            for ep in wanted:
                running = self.servers.get(ep.key)
                if (
                    running is not None
                    and running[0].transport == ep.transport
                    and self._built_with.get(running[1]) == tuple(self.options)
                ):
                    self._set_permissions(ep, running[0], self._bound.get(ep.key))
                    continue
                if running is not None:
                    # its server's connection cap, RPC cap, receive limit or
                    # shared options changed: a new server, swapped in by
                    # commit (the old socket's permissions are not touched:
                    # it is replaced)
                    if ep.key in self._direct:
                        raise OSError(
                            f"cannot rebuild the server of socket {ep.path} (tenant "
                            f"{ep.tenant.name}) for its new settings (max_connections, "
                            "max_message_bytes, RPC cap, keepalive_*, max_sessions, "
                            "max_queued_calls): it is bound at the path itself (no room "
                            "for a private name next to it in sun_path); restart kupd "
                            "instead, or use a shorter path"
                        )
                    started.append(await self._serve(ep, handover=True))
                    continue
                self._direct_busy(ep)
                holder = self._serving(ep.path)
                if holder is None:
                    self._check_free(ep)
                elif holder in self._direct:
                    raise OSError(
                        f"cannot hand socket {ep.path} over to tenant {ep.tenant.name}: "
                        "its server is bound at the path itself (no room for a private "
                        "name next to it in sun_path); restart kupd instead"
                    )
                started.append(await self._serve(ep, handover=holder is not None))
        except BaseException:
            self.options = was
            await self.discard(started)
            raise
        return started

    def _direct_busy(self, ep: Endpoint) -> None:
        """OSError when a server kupd bound at ep.path itself (no room for a
        private name there) and retired since is still up, finishing what
        it serves: as it stops, gRPC removes the path it bound -- any socket
        there by then, a server bound there now would lose its socket."""
        running = self.servers.get(self._serving(ep.path) or ("", ""))
        for server, path in self._direct_at.items():
            if path == ep.path and (running is None or running[1] is not server):
                raise OSError(
                    f"cannot bind socket {ep.path} (tenant {ep.tenant.name}) yet: the "
                    "server kupd bound at that path before a reload retired it is still "
                    "finishing its RPCs, and gRPC removes the path as that server stops "
                    "(bound at the path itself: no room for a private name next to it in "
                    "sun_path); reload again once it has stopped (log: retired socket "
                    "server stopped), or use a shorter path"
                )

    def _set_permissions(self, ep: Endpoint, old: Endpoint, fid: tuple[int, int] | None) -> None:
        """A kept socket whose owner/group/mode changed: apply it to the
        file in place (it governs new connections only: the kernel checked
        the old permissions when the open ones connected).  Only to the
        socket kupd bound (inode ``fid``), reached through directories
        still out of other users' reach: anything else at the path refuses
        the reload.  Undone by discard(): a reload refused later leaves it
        as it was."""
        if (ep.owner, ep.group, ep.mode) == (old.owner, old.group, old.mode):
            return
        check_path(ep.path, "socket", private=ep.check_dir)
        try:
            with _the_socket(ep.path, fid, ep.tenant.name) as (name, st, follow):
                self._undo.append(
                    (ep.path, fid, ep.tenant.name, st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode))
                )
                # Narrow first (mode), then hand over (owner/group), then the final mode.
                os.chmod(name, ep.mode & old.mode, follow_symlinks=follow)
                os.chown(
                    name,
                    os.geteuid() if ep.owner is None else ep.owner,
                    os.getegid() if ep.group is None else ep.group,
                    follow_symlinks=follow,
                )
                os.chmod(name, ep.mode, follow_symlinks=follow)
        except OSError as exc:
            if exc.strerror is None:  # _not_ours
                raise
            raise OSError(
                f"cannot change owner/group/mode of socket {ep.path} (tenant "
                f"{ep.tenant.name}): {exc.strerror} (chown/chmod of a socket another "
                "user owns needs CAP_CHOWN / CAP_FOWNER)"
            ) from None
        log.info("socket permissions changed", socket=ep.path, mode=f"{ep.mode:04o}")

    async def discard(self, started: list[Started]) -> None:
        for path, fid, tenant, uid, gid, mode in reversed(self._undo):
            # as far as it can go back, and only on the socket kupd bound
            with contextlib.suppress(OSError), _the_socket(path, fid, tenant) as (name, _, f):
                os.chown(name, uid, gid, follow_symlinks=f)
                os.chmod(name, mode, follow_symlinks=f)
        self._undo = []
        for _ep, server, name in started:
            self._born.pop(name, None)
            self._retired.pop(server, None)
            self._built_with.pop(server, None)
            self._bound_at.pop(server, None)
            self._wrappers.pop(server, None)
            await server.stop(None)  # gRPC removes the socket it bound

    async def commit(
        self, wanted: list[Endpoint], started: list[Started], calls_grace: float = 1.0
    ) -> tuple[list[str], list[str], dict[str, int]]:
        """Make the running sockets match ``wanted`` (prepared by
        :meth:`prepare`): (added, removed) paths, and the RPCs that waited on
        the sockets it retired, ended now, by kind (kupd.retirement).  A new server's socket is
        renamed to its path (atomic: a client connecting meanwhile reaches
        the old server or the new one, never nothing).  A tenant that keeps
        its socket path keeps its server (its open sessions are untouched;
        a changed owner/group/mode was applied by prepare) -- unless that
        server's own settings changed (:attr:`Endpoint.transport`): the
        new server prepare started then takes the path (:meth:`_swap`),
        and the old one finishes what it serves.  A removed
        server's socket goes at once; its RPCs that wait (for a message,
        a pool channel, an event) end at once with Unavailable saying
        where the tenant's socket went, and those that start on its open
        connections are refused with it (:meth:`_retire`); the server
        itself stops in the background once its RPCs are over and their
        statuses written, its Calls in flight (admitted before the reload)
        given up to ``calls_grace`` seconds to finish -- not cut off with
        gRPC's "Cancelling all calls" (:meth:`_stop_retired`)."""
        want = {ep.key: ep for ep in wanted}
        self.calls_grace = calls_grace
        added = [ep.path for ep, _, _ in started if ep.key not in self.servers]
        for st in started:
            if st[0].key in self.servers:
                self._swap(st)
            else:
                self._install(st)
                self._reinstate(st[0])
        removed: list[str] = []
        ended: dict[str, int] = {}
        for key in list(self.servers):
            if key not in want:
                path, name = key
                for kind, n in self._retire(
                    key, calls_grace, _retired_why(name, path, wanted)
                ).items():
                    ended[kind] = ended.get(kind, 0) + n
                if path not in added:
                    removed.append(path)
        self._undo = []
        for key, ep in want.items():
            self.servers[key] = (ep, self.servers[key][1])
        self._reword(wanted)
        return added, removed, ended

    def _reinstate(self, ep: Endpoint) -> None:
        """A reload gave tenant ``key[1]`` its socket at ``key[0]`` back
        while the server retired there (moved or removed by an earlier
        reload) still waits for its RPCs to end before it stops
        (:meth:`_stop_retired`): that server serves the tenant's socket
        again -- as a server a swap replaced does (:meth:`_swap`): what
        starts on the connections it has is served, until each has been
        idle for CONNECTION_IDLE (:meth:`_until_idle`); the new server
        has the path, and every new connection.

        Why: its connections are still open, and gRPC hands a process's
        open connection to every channel of it to the same path -- a new
        client's too.  Refused as the retirement said, their RPCs were
        told to connect to the path the socket had moved to, which serves
        nobody now (found by the stateful fuzz); stopped at once, the
        server would cancel, unrun, what its clients send before they read
        its GOAWAY (see _drain) and cut the Calls it still runs.

        Not when the new socket's owner, group or mode differ from the
        retired one's: the old connections were let in by the old ones,
        and a reload that removed the socket and made it again with others
        may have meant to shut some of those clients out.  Those servers
        stay retired, refusing as the tenant's socket now is
        (:meth:`_reword`), and stop once their RPCs are over."""
        key = ep.key
        loop = asyncio.get_running_loop()
        admitted = self._retired_as.pop(key, None)
        if admitted != (ep.owner, ep.group, ep.mode):
            if key in self._awaiting:
                log.info(
                    "retired socket server not served again: the socket's owner, group "
                    "or mode changed",
                    socket=key[0],
                    tenant=key[1],
                )
            return
        for server, back in self._awaiting.pop(key, {}).items():
            if back.done():
                continue
            retired: asyncio.Future[None] = loop.create_future()
            for w in self._wrappers.get(server, ()):
                w.rebind(retired)
            self._replaced.setdefault(key, []).append(retired)
            back.set_result(retired)
            log.info("retired socket server serves again", socket=key[0], tenant=key[1])

    def _reword(self, wanted: list[Endpoint]) -> None:
        """After a reload that serves ``wanted``: the retired servers still
        waiting for their RPCs to end (:meth:`_stop_retired`) refuse what
        starts on their connections saying where their tenant's socket is
        now -- not where an earlier reload had moved it, a path that may
        serve nobody since (or another tenant)."""
        loop = asyncio.get_running_loop()
        for (path, tenant), waiting in self._awaiting.items():
            why = _retired_why(tenant, path, wanted)
            for server in waiting:
                wrappers = self._wrappers.get(server, ())
                r = wrappers[0].retired if wrappers else None
                if r is None or not r.done():
                    continue  # serving again (_reinstate)
                said = None if r.cancelled() else r.exception()
                if isinstance(said, errors.KupError) and said.message == why.message:
                    continue
                now: asyncio.Future[None] = loop.create_future()
                now.set_exception(why)
                now.exception()  # retrieved: no "never retrieved" warning
                for w in wrappers:
                    w.rebind(now)
                log.info(
                    "retired socket server refuses anew",
                    socket=path,
                    tenant=tenant,
                    why=why.message,
                )

    def _retire(
        self, key: tuple[str, str], grace: float, why: errors.Unavailable
    ) -> dict[str, int]:
        """Take a removed server out of service: its socket file goes now
        (no new connection reaches it), and its retirement fails with
        ``why``: every RPC of it that waits ends now with that
        (kupd.policy.socket_retired), and every RPC that starts on the
        connections it has is refused with it (kupd.policy.refuse_retired),
        each logged and counted as any failed RPC; a Call already on a pool
        channel runs on.  The server stops in the background once what it
        serves is over, ``grace`` seconds at most (:meth:`_stop_retired`).
        Returns the RPCs ended, by kind (kupd.retirement: counted as the
        retirement fires, before they run)."""
        ep, server = self.servers.pop(key)
        fid = self._bound.pop(key, None)
        self._direct.discard(key)
        self._retired_as[key] = (ep.owner, ep.group, ep.mode)
        self._unlink_if(ep.path, fid)
        retired = self._retired.pop(server, None)
        self._built_with.pop(server, None)
        bound_at = self._bound_at.pop(server, ep.path)
        ended: dict[str, int] = {}
        # and the retirements of the servers it replaced (_swap) that still
        # finish RPCs of theirs: those RPCs came in on this socket too
        for r in [retired, *self._replaced.pop(key, [])]:
            if r is not None and not r.done():
                for kind, n in waiting_now(r).items():
                    ended[kind] = ended.get(kind, 0) + n
                r.set_exception(why)
                r.exception()  # retrieved: no "never retrieved" warning
        log.info(
            "socket removed",
            socket=ep.path,
            tenant=ep.tenant.name,
            why=why.message,
            rpcs_ended=ended,
        )
        task = asyncio.ensure_future(self._stop_retired(key, server, bound_at, grace))
        self._retiring[task] = server
        task.add_done_callback(lambda t: self._retiring.pop(t, None))
        return ended

    async def _stop_retired(
        self, key: tuple[str, str], server: grpc.aio.Server, bound_at: str, grace: float
    ) -> None:
        """Stop a server whose socket a reload retired (:meth:`_retire`; or
        one a swap had replaced there, :meth:`_drain`) once every RPC it
        serves is over and its status written to its connection --
        ``grace`` seconds at most.

        Why wait: a stopping gRPC server tells its connections to go (a
        GOAWAY and a ping) and closes each once its last RPC is over.
        Stopped in the same turn as the retirement ended its RPCs, it did
        so before their statuses were written, and a client could lose its
        status to the closing connection (kupctl watch: "Stream removed
        (sendmsg: Broken pipe)" instead of "moved its socket ... connect
        there").  Written first, each status is ahead of the GOAWAY's ping
        on the connection, and gRPC closes the connection only once the
        client has answered that ping: after it read the status.  Waiting
        is safe: an RPC that starts meanwhile on the server's connections
        is refused at its start (kupd.policy.refuse_retired), never run
        with the tenant the socket served.

        Why ``grace`` (call_timeout) is enough: the retirement ends every
        RPC of the server that waits, and refuses every one that starts;
        what is left ends by its own bound -- a Call already on a pool
        channel within call_timeout (unless it asked for longer), an Attach
        waiting for a channel its module still holds within reattach_grace,
        a ListDevices' probe within PROBE_WAIT.  Past it only an RPC whose
        client stopped reading (its handler blocked in a write) or a longer
        Call is left: gRPC cuts it as the server stops ("Cancelling all
        calls").  kupd's stop cuts the wait short (:meth:`stop`).

        Unless a reload gives the socket back to its tenant meanwhile
        (:meth:`_reinstate`): the server then serves what starts on its
        connections again until they are idle (:meth:`_until_idle`), and
        stops as a replaced server does -- or as this, should a later
        reload retire the socket again."""
        loop = asyncio.get_running_loop()
        while True:
            back: asyncio.Future[asyncio.Future[None]] = loop.create_future()
            self._awaiting.setdefault(key, {})[server] = back
            try:
                left = await self._until_rpcs_over(bound_at, grace, back)
            finally:
                waiting = self._awaiting.get(key, {})
                if waiting.get(server) is back:
                    del waiting[server]
                    if not waiting:
                        self._awaiting.pop(key, None)
                        self._retired_as.pop(key, None)
            if not back.done() or self._stopping.is_set():
                break
            retired = back.result()
            try:
                if await self._until_idle(bound_at, retired):
                    grace = self.calls_grace
                    continue  # retired again (its retirement failed by _retire)
                await server.stop(float("inf"))
            finally:
                self._forget_replaced(key, retired)
            self._wrappers.pop(server, None)
            self._direct_at.pop(server, None)
            log.info(
                "replaced socket server stopped: what it served is over",
                socket=key[0],
                tenant=key[1],
                second_name=False,
            )
            return
        direct = self._direct_at.get(server)
        if direct is not None and _file_id(direct) is not None:
            # kupd binds nothing there while this server is up (_direct_busy),
            # and _retire removed its socket: this file was put there since
            # by hand, and gRPC removes it as the server stops (the path is
            # all it knows; no window-free way to keep the file)
            log.warning(
                "retired socket server stops: gRPC removes the path it was bound at, "
                "and with it the file someone put there since",
                socket=direct,
                tenant=key[1],
            )
        await server.stop(RETIRED_STOP_GRACE)
        self._wrappers.pop(server, None)
        self._direct_at.pop(server, None)
        log.info(
            "retired socket server stopped",
            socket=key[0],
            tenant=key[1],
            rpcs_cut=left or None,
        )

    async def _until_rpcs_over(
        self, bound_at: str, bound: float, back: asyncio.Future[Any] | None = None
    ) -> int:
        """Return once the server listening at ``bound_at`` has no RPC under
        way (kupd.connections.open_rpcs) -- or after ``bound`` seconds, or
        when kupd stops, or when ``back`` is done (:meth:`_reinstate`) --:
        how many it still had (0: none, or channelz cannot say, or back).
        Looked at every RETIRE_POLL at first, then less often, up to every
        SWAP_POLL: the RPCs a retirement ended are over within a few turns
        of the loop, a Call on a pool channel may take call_timeout."""
        loop = asyncio.get_running_loop()
        until = loop.time() + bound
        pause = RETIRE_POLL
        while True:
            if back is not None and back.done():
                return 0
            counts = open_rpcs([bound_at])
            left = 0 if counts is None else counts.get(bound_at, 0)
            remaining = until - loop.time()
            if not left or remaining <= 0 or self._stopping.is_set():
                return left
            await self._unless_retired(asyncio.sleep(min(pause, remaining)), back)
            pause = min(2 * pause, SWAP_POLL)

    async def start(self, wanted: list[Endpoint]) -> None:
        for ep in wanted:
            await self.start_one(ep)

    async def stop(self, grace: float | None = 1.0) -> None:
        """Stop every server, each given ``grace`` -- a removed socket's
        server still in its own grace (call_timeout) too: kupd's stop must
        not wait that out (docs/gateway.md: a stop's worst case), and gRPC
        cuts a stopping server's calls at the end of whichever grace ends
        first."""
        self._stopping.set()  # a replaced server waiting for idle connections stops now
        retiring = list(self._retiring.items())
        await asyncio.gather(
            *(self.stop_one(k, grace) for k in list(self.servers)),
            *(server.stop(grace) for _, server in retiring),
            *(task for task, _ in retiring),
        )

    def connections(self) -> list[tuple[Endpoint, int]] | None:
        """(endpoint, connections open on it) for each socket served now
        (kupd.connections: gRPC's channelz); None when that cannot be read."""
        served = [(ep, self._bound_at.get(server, ep.path)) for ep, server in self.servers.values()]
        counts = open_connections(path for _, path in served)
        if counts is None:
            return None
        return [(ep, counts.get(path, 0)) for ep, path in served]

    def unlink_all(self) -> None:
        for key, (ep, _) in self.servers.items():
            self._unlink_if(ep.path, self._bound.get(key))


#: How long a replaced server is given to accept a connection of kupd's
#: own made behind those that reached it before the swap
#: (SocketSet._drain), and, without a second name to reach it by, how long
#: it is given instead: it accepts connections as they come, so either is
#: a bound, not a wait that is expected to run out.
SWAP_SETTLE = 10.0
SWAP_SETTLE_BLIND = 1.0

#: A connection without an RPC for this long is closed by gRPC on every
#: socket (grpc.max_connection_idle_ms, kupd.server.server_options): its
#: client makes its next RPC on a new one.  What moves a replaced server's
#: clients to the new server without a stop's race (SocketSet._drain).
CONNECTION_IDLE = 60.0
#: How long a replaced server's connections are given to go idle before it
#: stops all the same, and how often it looks (channelz) meanwhile.
SWAP_DRAIN = 5 * CONNECTION_IDLE
SWAP_POLL = 1.0
#: How often a retired server is first looked at for RPCs still under way
#: (SocketSet._until_rpcs_over), and the grace its stop then gives an RPC
#: that reached it in the meantime (refused at its start: it ends at once).
RETIRE_POLL = 0.05
RETIRED_STOP_GRACE = 1.0


async def _accepted_through(marker: str) -> None:
    """Return once the server listening at ``marker`` (a second name of a
    socket a swap replaced) has accepted a connection made now -- and so
    every connection queued before it: a listening socket hands them out
    in order --, as its first HTTP/2 frame shows; SWAP_SETTLE seconds at
    most.  No ``marker``: after SWAP_SETTLE_BLIND seconds."""
    if not marker:
        await asyncio.sleep(SWAP_SETTLE_BLIND)
        return
    loop = asyncio.get_running_loop()
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.setblocking(False)
        with contextlib.suppress(OSError, TimeoutError):
            async with asyncio.timeout(SWAP_SETTLE):
                await loop.sock_connect(s, marker)
                await loop.sock_recv(s, 9)


def _transport_text(ep: Endpoint) -> str:
    """An endpoint's own server settings, for the log."""
    return (
        f"max_connections={ep.max_connections or 'none'} rpc_cap={ep.max_rpcs or 'none'} "
        f"receive_limit={ep.max_receive or MAX_GRPC_MESSAGE}"
    )


def _retired_why(tenant: str, path: str, wanted: list[Endpoint]) -> errors.Unavailable:
    """What the RPCs of ``tenant``'s server at ``path`` get when a reload
    that serves ``wanted`` retires it: where the tenant's socket went, or
    that it was removed (and which tenant the path serves now, if any)."""
    for ep in wanted:
        if ep.tenant.name == tenant and ep.path != path:
            return socket_moved(tenant, path, ep.path)
    now = next((ep.tenant.name for ep in wanted if ep.path == path), "")
    return socket_removed(tenant, path, now)


def scope_device_pb(
    pb: kup_pb2.DeviceInfo, t: Tenant, owner_of: Callable[[str], str]
) -> kup_pb2.DeviceInfo:
    """Trim a DeviceInfo to what ``t`` may see: its granted channels only,
    lease ids of other tenants' leases blanked, and the largest message it
    may send (:func:`sendable`)."""
    if t.admin:
        return pb
    pb.max_message_bytes = sendable(pb.max_message_bytes, t)
    if t.plain:  # every channel and lease id
        return pb
    g = t.grant(pb.name)
    keep = [c for c in pb.channels if g is not None and g.allows(c.id)]
    del pb.channels[:]
    for c in keep:
        if c.lease_id and owner_of(c.lease_id) != t.name:
            c.lease_id = ""
        pb.channels.append(c)
    return pb

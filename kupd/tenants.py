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
at ``bind(2)`` (never wider, never chmod'ed open later) inside a directory
owned by kupd's user and writable by nobody else; then it is chown'ed to
the configured owner/group.  Between bind and chown the socket is owned by
kupd's user and group, which only narrows access.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import os
import socket
import stat
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

import grpc
import grpc.aio
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from kupapi import kup_pb2, kup_pb2_grpc
from kupd.config import SUN_PATH_MAX
from kupd.log import get_logger
from kupd.policy import ADMIN, DEFAULT, Tenant, use_tenant
from kupd.wire import add_kup_servicer

__all__ = ["Endpoint", "SocketSet", "TenantKup", "endpoints_for", "scope_device_pb"]

log = get_logger("kupd.tenants")

KUP_SERVICE = kup_pb2.DESCRIPTOR.services_by_name["Kup"].full_name
ADMIN_SERVICE = kup_pb2.DESCRIPTOR.services_by_name["Admin"].full_name
HEALTH_SERVICE = health_pb2.DESCRIPTOR.services_by_name["Health"].full_name


class TenantKup(kup_pb2_grpc.KupServicer):
    """The Kup service as seen through one tenant's socket."""

    def __init__(self, inner: Any, tenant: Tenant) -> None:
        self.inner = inner
        self.tenant = tenant
        # Session: the service's own generator with the tenant bound, instead
        # of a generator re-yielding every response of another (a resume per
        # message).  grpc.aio sees through the partial (inspect unwraps it).
        self.__dict__["Session"] = functools.partial(inner.Session, tenant=tenant)
        # Send (the unary exchange) and Call: the same, one coroutine instead
        # of two.
        self.__dict__["Send"] = functools.partial(inner.Send, tenant=tenant)
        self.__dict__["Call"] = functools.partial(inner.Call, tenant=tenant)

    async def _unary(self, name: str, request: Any, context: grpc.aio.ServicerContext) -> Any:
        use_tenant(self.tenant)  # this RPC's own task: no reset needed
        return await getattr(self.inner, name)(request, context)

    async def ListDevices(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        return await self._unary("ListDevices", request, context)

    async def Attach(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        return await self._unary("Attach", request, context)

    async def Release(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        return await self._unary("Release", request, context)

    async def Send(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        # Shadowed per instance in __init__, as Session.
        return await self.inner.Send(request, context, tenant=self.tenant)

    async def Receive(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        return await self._unary("Receive", request, context)

    async def Pass(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        return await self._unary("Pass", request, context)

    async def Call(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        # Shadowed per instance in __init__, as Session.
        return await self.inner.Call(request, context, tenant=self.tenant)

    async def Session(
        self, request_iterator: Any, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[Any]:
        # Shadowed per instance in __init__ (what grpc.aio calls); this is
        # the same thing spelled as a method, for the servicer's type.
        async for item in self.inner.Session(request_iterator, context, tenant=self.tenant):
            yield item

    async def Watch(self, request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
        use_tenant(self.tenant)
        async for item in self.inner.Watch(request, context):
            yield item


@dataclass(frozen=True)
class Endpoint:
    path: str
    tenant: Tenant
    owner: int | None = None
    group: int | None = None
    mode: int = 0o600
    #: Tenant and admin sockets must live in a directory only kupd's user can write.
    check_dir: bool = True

    @property
    def key(self) -> tuple[str, str]:
        return (self.path, self.tenant.name)


def endpoints_for(config: Any) -> list[Endpoint]:
    """The sockets a config asks for: ``socket`` as tenant "default" when no
    tenants are configured, each tenant's socket, and the admin socket."""
    eps: list[Endpoint] = []
    if not config.tenants:
        eps.append(
            Endpoint(
                os.path.abspath(config.socket), DEFAULT, mode=config.socket_mode, check_dir=False
            )
        )
    for t in config.tenants:
        eps.append(Endpoint(t.socket, t, t.owner, t.group, t.mode))
    if config.admin_socket:
        eps.append(Endpoint(os.path.abspath(config.admin_socket), ADMIN, os.geteuid(), None, 0o600))
    return eps


def _check_dir(path: str) -> None:
    """The directory of a tenant or admin socket, and every directory above
    it, must be out of other users' reach: whoever can rename an entry on
    the way can put a socket of their own at the path.  The directory
    itself: kupd's user's, writable by nobody else.  Each one above: root's
    or kupd's user's, and writable by others only with the sticky bit (as
    /tmp: nobody renames what they do not own)."""
    d = os.path.dirname(path)
    os.makedirs(d, mode=0o755, exist_ok=True)
    st = os.stat(d)
    if st.st_uid != os.geteuid() or st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        raise OSError(
            f"socket directory {d} of {path} must be owned by uid {os.geteuid()} and writable "
            f"by nobody else (it is uid {st.st_uid}, mode {stat.S_IMODE(st.st_mode):04o}): "
            "another user could replace the socket"
        )
    up = os.path.dirname(os.path.realpath(d))
    while True:
        st = os.stat(up)
        shared = st.st_mode & (stat.S_IWGRP | stat.S_IWOTH) and not st.st_mode & stat.S_ISVTX
        if st.st_uid not in (0, os.geteuid()) or shared:
            raise OSError(
                f"directory {up} above the socket {path} must be owned by root or uid "
                f"{os.geteuid()} and writable by nobody else unless sticky (it is uid "
                f"{st.st_uid}, mode {stat.S_IMODE(st.st_mode):04o}): another user could "
                "rename the directories below it and replace the socket"
            )
        if up == "/":
            return
        up = os.path.dirname(up)


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
        self._names = 0
        #: kept sockets whose permissions prepare() changed: (path, uid,
        #: gid, mode) as they were, restored by discard()
        self._undo: list[tuple[str, int, int, int]] = []
        #: servers a reload removed, finishing their Calls (see commit)
        self._retiring: set[asyncio.Task[None]] = set()

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
        if ep.check_dir:
            _check_dir(ep.path)
        else:
            os.makedirs(os.path.dirname(ep.path), mode=0o755, exist_ok=True)
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
        server = grpc.aio.server(options=self.options)
        # kupd.wire: the Session by hand; a request protobuf cannot parse
        # answered INVALID_ARGUMENT by the service edge
        add_kup_servicer(
            TenantKup(self.kup, ep.tenant), server, getattr(self.kup, "refuse_malformed", None)
        )
        health_pb2_grpc.add_HealthServicer_to_server(self.health, server)
        names = [KUP_SERVICE, HEALTH_SERVICE, reflection.SERVICE_NAME]
        if ep.tenant.admin:
            kup_pb2_grpc.add_AdminServicer_to_server(self.admin(), server)
            names.append(ADMIN_SERVICE)
        reflection.enable_server_reflection(names, server)
        old = os.umask(0o777 & ~ep.mode)  # born with exactly ep.mode
        try:
            try:
                port = server.add_insecure_port("unix:" + path)
            except RuntimeError:  # grpcio's "Failed to bind", without the reason
                port = 0
            if port == 0:
                raise OSError(f"cannot bind unix socket {ep.path} (tenant {ep.tenant.name})")
            await server.start()
        finally:
            os.umask(old)
        try:
            if ep.owner is not None or ep.group is not None:
                os.chown(
                    path,
                    -1 if ep.owner is None else ep.owner,
                    -1 if ep.group is None else ep.group,
                )
        except OSError as exc:
            await server.stop(None)
            raise OSError(
                f"cannot give socket {ep.path} (tenant {ep.tenant.name}) to owner "
                f"{ep.owner} / group {ep.group}: {exc.strerror} (chown needs CAP_CHOWN)"
            ) from None
        return ep, server, path

    def _install(self, started: Started) -> None:
        """Rename a started server's socket to its path; it serves there now."""
        ep, server, path = started
        if path != ep.path:
            os.rename(path, ep.path)
        else:
            self._direct.add(ep.key)
        self.servers[ep.key] = (ep, server)
        self._bound[ep.key] = _file_id(ep.path)
        log.info("socket serving", socket=ep.path, tenant=ep.tenant.name, mode=f"{ep.mode:04o}")

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
        await server.stop(grace)
        self._unlink_if(ep.path, fid)
        log.info("socket removed", socket=ep.path, tenant=ep.tenant.name)

    async def prepare(self, wanted: list[Endpoint]) -> list[Started]:
        """The first half of a reload's socket change, the half that can fail:
        start the servers of ``wanted``'s new endpoints, all or none -- a
        socket that cannot be bound or handed over stops the ones already
        started and raises OSError, so the reload is refused with nothing
        changed.  The owner/group/mode of kept sockets is changed here too
        (the step that may be refused: EPERM), and put back should the rest
        fail.  They take effect with :meth:`commit` (or go with
        :meth:`discard`); no handler runs before the caller next awaits."""
        started: list[Started] = []
        self._undo = []
        try:
            for ep in wanted:
                if ep.key in self.servers:
                    self._set_permissions(ep, self.servers[ep.key][0])
                    continue
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
            await self.discard(started)
            raise
        return started

    def _set_permissions(self, ep: Endpoint, old: Endpoint) -> None:
        """A kept socket whose owner/group/mode changed: apply it to the
        file in place (it governs new connections only: the kernel checked
        the old permissions when the open ones connected).  Undone by
        discard(): a reload refused later leaves it as it was."""
        if (ep.owner, ep.group, ep.mode) == (old.owner, old.group, old.mode):
            return
        st = os.stat(ep.path)
        self._undo.append((ep.path, st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode)))
        try:
            # Narrow first (mode), then hand over (owner/group), then the final mode.
            os.chmod(ep.path, ep.mode & old.mode)
            os.chown(
                ep.path,
                os.geteuid() if ep.owner is None else ep.owner,
                os.getegid() if ep.group is None else ep.group,
            )
            os.chmod(ep.path, ep.mode)
        except OSError as exc:
            raise OSError(
                f"cannot change owner/group/mode of socket {ep.path} (tenant "
                f"{ep.tenant.name}): {exc.strerror} (chown/chmod of a socket another "
                "user owns needs CAP_CHOWN / CAP_FOWNER)"
            ) from None
        log.info("socket permissions changed", socket=ep.path, mode=f"{ep.mode:04o}")

    async def discard(self, started: list[Started]) -> None:
        for path, uid, gid, mode in reversed(self._undo):
            with contextlib.suppress(OSError):  # as far as it can go back
                os.chown(path, uid, gid)
                os.chmod(path, mode)
        self._undo = []
        for _ep, server, _name in started:
            await server.stop(None)  # gRPC removes the socket it bound

    async def commit(
        self, wanted: list[Endpoint], started: list[Started], calls_grace: float = 1.0
    ) -> tuple[list[str], list[str]]:
        """Make the running sockets match ``wanted`` (prepared by
        :meth:`prepare`): (added, removed) paths.  A new server's socket is
        renamed to its path (atomic: a client connecting meanwhile reaches
        the old server or the new one, never nothing).  A tenant that keeps
        its socket path keeps its server (its open sessions are untouched;
        a changed owner/group/mode was applied by prepare).  A removed
        server's socket goes at once; the server itself stops in the
        background, its Calls in flight (admitted before the reload) given
        up to ``calls_grace`` seconds to finish -- not cut off with gRPC's
        "Cancelling all calls"."""
        want = {ep.key: ep for ep in wanted}
        added = [ep.path for ep, _, _ in started]
        for st in started:
            self._install(st)
        removed: list[str] = []
        for key in list(self.servers):
            if key not in want:
                path = self.servers[key][0].path
                self._retire(key, calls_grace)
                if path not in added:
                    removed.append(path)
        self._undo = []
        for key, ep in want.items():
            self.servers[key] = (ep, self.servers[key][1])
        return added, removed

    def _retire(self, key: tuple[str, str], grace: float) -> None:
        """Take a removed server out of service: its socket file goes now
        (no new connection reaches it; gRPC itself refuses new RPCs on the
        ones open), the server stops in the background with ``grace``."""
        ep, server = self.servers.pop(key)
        fid = self._bound.pop(key, None)
        self._direct.discard(key)
        self._unlink_if(ep.path, fid)
        log.info("socket removed", socket=ep.path, tenant=ep.tenant.name)
        task = asyncio.ensure_future(server.stop(grace))
        self._retiring.add(task)
        task.add_done_callback(self._retiring.discard)

    async def start(self, wanted: list[Endpoint]) -> None:
        for ep in wanted:
            await self.start_one(ep)

    async def stop(self, grace: float | None = 1.0) -> None:
        await asyncio.gather(
            *(self.stop_one(k, grace) for k in list(self.servers)),
            *list(self._retiring),  # a removed tenant's last Calls
        )

    def unlink_all(self) -> None:
        for key, (ep, _) in self.servers.items():
            self._unlink_if(ep.path, self._bound.get(key))


def scope_device_pb(
    pb: kup_pb2.DeviceInfo, t: Tenant, owner_of: Callable[[str], str]
) -> kup_pb2.DeviceInfo:
    """Trim a DeviceInfo to what ``t`` may see: its granted channels only,
    and lease ids of other tenants' leases blanked."""
    if t.admin or t is DEFAULT:
        return pb
    g = t.grant(pb.name)
    keep = [c for c in pb.channels if g is not None and g.allows(c.id)]
    del pb.channels[:]
    for c in keep:
        if c.lease_id and owner_of(c.lease_id) != t.name:
            c.lease_id = ""
        pb.channels.append(c)
    return pb

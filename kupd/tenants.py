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
import stat
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

import grpc
import grpc.aio
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from kupapi import kup_pb2, kup_pb2_grpc
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
    d = os.path.dirname(path)
    os.makedirs(d, mode=0o755, exist_ok=True)
    st = os.stat(d)
    if st.st_uid != os.geteuid() or st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        raise OSError(
            f"socket directory {d} of {path} must be owned by uid {os.geteuid()} and writable "
            f"by nobody else (it is uid {st.st_uid}, mode {stat.S_IMODE(st.st_mode):04o}): "
            "another user could replace the socket"
        )


class SocketSet:
    """The running gRPC servers, one per endpoint."""

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

    async def start_one(self, ep: Endpoint) -> None:
        self.servers[ep.key] = (ep, await self._serve(ep))

    async def _serve(self, ep: Endpoint) -> grpc.aio.Server:
        """A started server on ep's socket (not registered in servers)."""
        if ep.check_dir:
            _check_dir(ep.path)
        else:
            os.makedirs(os.path.dirname(ep.path), mode=0o755, exist_ok=True)
        server = grpc.aio.server(options=self.options)
        add_kup_servicer(TenantKup(self.kup, ep.tenant), server)  # kupd.wire: Session by hand
        health_pb2_grpc.add_HealthServicer_to_server(self.health, server)
        names = [KUP_SERVICE, HEALTH_SERVICE, reflection.SERVICE_NAME]
        if ep.tenant.admin:
            kup_pb2_grpc.add_AdminServicer_to_server(self.admin(), server)
            names.append(ADMIN_SERVICE)
        reflection.enable_server_reflection(names, server)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(ep.path)  # stale: we hold kupd's lock, nobody serves it
        old = os.umask(0o777 & ~ep.mode)  # born with exactly ep.mode
        try:
            try:
                port = server.add_insecure_port("unix:" + ep.path)
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
                    ep.path,
                    -1 if ep.owner is None else ep.owner,
                    -1 if ep.group is None else ep.group,
                )
        except OSError:
            await server.stop(None)
            raise
        log.info("socket serving", socket=ep.path, tenant=ep.tenant.name, mode=f"{ep.mode:04o}")
        return server

    async def stop_one(self, key: tuple[str, str], grace: float | None = 1.0) -> None:
        ep, server = self.servers.pop(key)
        await server.stop(grace)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(ep.path)
        log.info("socket removed", socket=ep.path, tenant=ep.tenant.name)

    async def prepare(self, wanted: list[Endpoint]) -> list[tuple[Endpoint, grpc.aio.Server]]:
        """The first half of a reload's socket change, the half that can fail:
        start the servers of ``wanted``'s new endpoints, all or none -- a
        socket that cannot be bound or handed over stops the ones already
        started and raises OSError, so the reload is refused with nothing
        changed.  They take effect with :meth:`commit` (or go with
        :meth:`discard`); no handler runs before the caller next awaits."""
        started: list[tuple[Endpoint, grpc.aio.Server]] = []
        try:
            for ep in wanted:
                if ep.key not in self.servers:
                    started.append((ep, await self._serve(ep)))
        except BaseException:
            await self.discard(started)
            raise
        return started

    async def discard(self, started: list[tuple[Endpoint, grpc.aio.Server]]) -> None:
        for ep, server in started:
            await server.stop(None)
            with contextlib.suppress(FileNotFoundError):
                os.unlink(ep.path)
            log.info("socket removed", socket=ep.path, tenant=ep.tenant.name)

    async def commit(
        self, wanted: list[Endpoint], started: list[tuple[Endpoint, grpc.aio.Server]]
    ) -> tuple[list[str], list[str]]:
        """Make the running sockets match ``wanted`` (prepared by
        :meth:`prepare`): (added, removed) paths.  A tenant that keeps its
        socket path keeps its server (its open sessions are untouched); a
        changed owner/group/mode is applied to the socket file in place,
        which governs new connections only (the kernel checked the old
        permissions when the open ones connected)."""
        want = {ep.key: ep for ep in wanted}
        for ep, server in started:
            self.servers[ep.key] = (ep, server)
        added = [ep.path for ep, _ in started]
        removed: list[str] = []
        for key in list(self.servers):
            if key not in want:
                path = self.servers[key][0].path
                await self.stop_one(key)
                removed.append(path)
        for key, ep in want.items():
            old, server = self.servers[key]
            if (ep.owner, ep.group, ep.mode) != (old.owner, old.group, old.mode):
                # Narrow first (mode), then hand over (owner/group), then the final mode.
                os.chmod(ep.path, ep.mode & old.mode)
                os.chown(
                    ep.path,
                    os.geteuid() if ep.owner is None else ep.owner,
                    os.getegid() if ep.group is None else ep.group,
                )
                os.chmod(ep.path, ep.mode)
                log.info("socket permissions changed", socket=ep.path, mode=f"{ep.mode:04o}")
            self.servers[key] = (ep, server)
        return added, removed

    async def start(self, wanted: list[Endpoint]) -> None:
        for ep in wanted:
            await self.start_one(ep)

    async def stop(self, grace: float | None = 1.0) -> None:
        await asyncio.gather(*(self.stop_one(k, grace) for k in list(self.servers)))

    def unlink_all(self) -> None:
        for ep, _ in self.servers.values():
            with contextlib.suppress(FileNotFoundError):
                os.unlink(ep.path)


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

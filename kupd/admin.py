"""The kup.v1.Admin service, served only on the root-only admin socket.

ListLeases / RevokeLease / Reload / DrainDevice / GetMetrics.  Errors use the same one
mapping as the Kup service (``kupd.service.status_for``).
"""

from __future__ import annotations

import re
import time
from typing import TYPE_CHECKING

import grpc
import grpc.aio

from kupapi import kup_pb2, kup_pb2_grpc
from kupd import errors
from kupd.config import ConfigError
from kupd.devices import shown
from kupd.log import get_logger
from kupd.watch import Event, EventType

if TYPE_CHECKING:
    from kupd.server import Server

__all__ = ["REASON_MAX", "AdminService"]

log = get_logger("kupd.admin")

#: What may start a metric name (Prometheus' data model: [a-zA-Z_:][a-zA-Z0-9_:]*).
_METRIC_PREFIX = re.compile(r"[a-zA-Z_:][a-zA-Z0-9_:]*")


#: the longest RevokeLease reason kupd takes (it goes to the log, the audit
#: file and the lease holder's error)
REASON_MAX = 1024


class AdminService(kup_pb2_grpc.AdminServicer):
    def __init__(self, server: Server) -> None:
        self.server = server

    async def _abort(self, context: grpc.aio.ServicerContext, exc: errors.KupError) -> None:
        from kupd.service import status_for, trailing_for

        code, details = status_for(exc)
        await context.abort(code, details, trailing_metadata=trailing_for(exc))

    async def ListLeases(
        self, request: kup_pb2.ListLeasesRequest, context: grpc.aio.ServicerContext
    ) -> kup_pb2.ListLeasesResponse:
        now = time.monotonic()
        out = kup_pb2.ListLeasesResponse()
        for lease in list(self.server.leases.leases.values()):
            tenant = getattr(lease, "tenant", "default")
            if request.tenant and tenant != request.tenant:
                continue
            out.leases.add(
                lease_id=lease.id,
                tenant=tenant,
                device=lease.dev.name,
                channel=lease.ch.id,
                holder=lease.holder,
                idle_seconds=max(0.0, now - lease.last_used),
            )
        return out

    async def RevokeLease(
        self, request: kup_pb2.RevokeLeaseRequest, context: grpc.aio.ServicerContext
    ) -> kup_pb2.RevokeLeaseResponse:
        try:
            from kupd.sessions import LEASE_ID_MAX

            if len(request.lease_id) > LEASE_ID_MAX:  # refused before it is quoted
                raise errors.InvalidArgument(
                    f"lease_id of {len(request.lease_id)} characters: not a lease id"
                )
            if len(request.reason) > REASON_MAX:  # it goes into logs and the audit file
                raise errors.InvalidArgument(
                    f"reason of {len(request.reason)} characters: at most {REASON_MAX}"
                )
            try:
                lease = self.server.leases.get(request.lease_id)
            except errors.PermissionDenied:  # its holder's answer, not the admin's
                raise errors.NotFound(f"lease {request.lease_id} has ended (revoked)") from None
        except errors.KupError as exc:
            await self._abort(context, exc)
            raise AssertionError("unreachable") from None
        reason = request.reason or "revoked by the admin"
        log.info("lease revoked", lease=lease.id, reason=reason)
        self.server.audit.admin(
            "revoke",
            lease=lease.id,
            tenant=lease.tenant,
            device=lease.dev.name,
            channel=lease.ch.id,
            reason=reason,
        )
        self.server.leases.end(
            lease,
            "revoked",
            errors.PermissionDenied(f"lease {lease.id}: rule admin-revoke: {reason}"),
        )
        return kup_pb2.RevokeLeaseResponse()

    async def Reload(
        self, request: kup_pb2.ReloadRequest, context: grpc.aio.ServicerContext
    ) -> kup_pb2.ReloadResponse:
        try:
            done = await self.server.reload(via="admin")
        except (ConfigError, OSError) as exc:
            # Either way nothing changed and the running config stays: a
            # key's value, or a path it names that cannot be served (an
            # unsafe directory, a path in use) -- the operator's to fix, as
            # kupctl's exit code 8 says, not kupd's INTERNAL fault.
            await self._abort(context, errors.InvalidArgument(f"reload refused: {exc}"))
            raise AssertionError("unreachable") from None
        except errors.KupError as exc:  # Shutdown: kupd is draining
            await self._abort(context, exc)
            raise AssertionError("unreachable") from None
        return kup_pb2.ReloadResponse(
            tenants=done.tenants,
            sessions_ended=done.sessions_ended,
            needs_restart=done.needs_restart,
            applied=done.applied,
            rpcs_ended=done.rpcs_ended,
            audit_log_error=done.audit_error,
            warnings=[kup_pb2.ConfigWarning(key=k, why=w) for k, w in done.warnings],
            sockets_added=done.sockets_added,
            sockets_removed=done.sockets_removed,
            calls_refused=done.calls_refused,
        )

    async def DrainDevice(
        self, request: kup_pb2.DrainDeviceRequest, context: grpc.aio.ServicerContext
    ) -> kup_pb2.DrainDeviceResponse:
        try:
            dev = self.server.mgr.get(request.device)
        except errors.KupError as exc:
            await self._abort(context, exc)
            raise AssertionError("unreachable") from None
        guard = self.server.service.guard
        out = kup_pb2.DrainDeviceResponse()
        if request.undo:
            if dev.name not in guard.drained:  # nothing changes: no event, no audit line
                log.info("undrain: device was not drained", device=dev.name)
                out.unchanged = True
                return out
            guard.drained.discard(dev.name)
            log.info("device undrained", device=dev.name)
            self.server.audit.admin("undrain", device=dev.name)
            self.server.health_changed()
            self.server.bus.publish(Event(EventType.DEVICE_UNDRAINED, dev.name, reason="admin"))
            return out
        if dev.name in guard.drained:  # drained already: its leases ended then
            log.info("drain: device is drained already", device=dev.name)
            out.unchanged = True
            return out
        guard.drained.add(dev.name)
        self.server.health_changed()  # its health: NOT_SERVING
        # before the LEASE_RELEASED "drained" of its leases: a watcher learns why
        self.server.bus.publish(Event(EventType.DEVICE_DRAINED, dev.name, reason="admin"))
        for lease in [le for le in self.server.leases.leases.values() if le.dev is dev]:
            out.leases_ended.append(lease.id)
            self.server.leases.end(
                lease, "drained", errors.Shutdown(f"device {dev.name} is drained by the admin")
            )
        log.info("device drained", device=dev.name, leases=len(out.leases_ended))
        self.server.audit.admin("drain", device=dev.name, leases_ended=list(out.leases_ended))
        return out

    async def GetMetrics(
        self, request: kup_pb2.GetMetricsRequest, context: grpc.aio.ServicerContext
    ) -> kup_pb2.GetMetricsResponse:
        prefix = request.prefix
        if prefix and not _METRIC_PREFIX.fullmatch(prefix):
            await self._abort(
                context,
                errors.InvalidArgument(
                    f"metrics prefix {shown(prefix)} cannot start a metric name "
                    "(letters, digits, '_' and ':', not starting with a digit)"
                ),
            )
            raise AssertionError("unreachable") from None
        # collected in the loop's thread, where the hot path bumps the
        # plain-number series: one consistent snapshot
        return kup_pb2.GetMetricsResponse(text=self.server.metrics.exposition(prefix))

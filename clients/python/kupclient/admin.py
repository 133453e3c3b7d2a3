"""Client of the kup.v1.Admin service (kupd's root-only admin socket).

    with AdminClient("/run/kupd/admin.sock") as a:
        for lease in a.list_leases():
            print(lease.tenant, lease.device, lease.channel)
        a.reload()

Errors are :mod:`kupd.errors` exceptions (the same one mapping as Client).
"""

from __future__ import annotations

from dataclasses import dataclass
from types import TracebackType
from typing import Any

import grpc

from kupapi import kup_pb2, kup_pb2_grpc
from kupclient._errors import error_from_rpc
from kupclient._types import channel_options, target_for

__all__ = ["AdminClient", "LeaseInfo", "ReloadResult"]


@dataclass(frozen=True)
class LeaseInfo:
    lease_id: str
    tenant: str
    device: str
    channel: int
    holder: str
    idle_seconds: float


@dataclass(frozen=True)
class ReloadResult:
    tenants: tuple[str, ...]
    sessions_ended: tuple[str, ...]


class AdminClient:
    def __init__(self, path: str) -> None:
        self.path = path
        self._channel = grpc.insecure_channel(target_for(path), options=channel_options())
        self._stub = kup_pb2_grpc.AdminStub(self._channel)

    def _unary(self, method: str, request: Any, timeout: float | None = 30.0) -> Any:
        try:
            return getattr(self._stub, method)(request, timeout=timeout)
        except grpc.RpcError as exc:
            raise error_from_rpc(exc) from None

    def list_leases(self, tenant: str = "") -> list[LeaseInfo]:
        resp = self._unary("ListLeases", kup_pb2.ListLeasesRequest(tenant=tenant))
        return [
            LeaseInfo(x.lease_id, x.tenant, x.device, x.channel, x.holder, x.idle_seconds)
            for x in resp.leases
        ]

    def revoke(self, lease_id: str, reason: str = "") -> None:
        self._unary("RevokeLease", kup_pb2.RevokeLeaseRequest(lease_id=lease_id, reason=reason))

    def reload(self) -> ReloadResult:
        resp = self._unary("Reload", kup_pb2.ReloadRequest())
        return ReloadResult(tuple(resp.tenants), tuple(resp.sessions_ended))

    def drain(self, device: str, undo: bool = False) -> list[str]:
        resp = self._unary("DrainDevice", kup_pb2.DrainDeviceRequest(device=device, undo=undo))
        return list(resp.leases_ended)

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> AdminClient:
        return self

    def __exit__(
        self, t: type[BaseException] | None, v: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

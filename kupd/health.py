"""The grpc.health.v1 statuses kupd keeps, and their Watch streams.

Why not grpc_health's own asyncio servicer: its Watch writes each status
while holding the service's ``asyncio.Condition``, and its ``set`` takes
that condition.  One client that stops reading -- an HTTP/2 stream window
of 0 is enough, and any tenant may open a health Watch -- then blocked
every later ``set`` of that service: kupd's health stopped changing, every
Check (which updates the statuses) hung with it, and SIGTERM's drain,
which starts by setting NOT_SERVING, never finished.

Here ``set`` is synchronous and takes no lock: it stores the status and
wakes the watchers of that service through an event that each watcher
picked up *before* it read the status, so a change that lands while a
watcher is still writing the previous one is never missed -- only
intermediate statuses may be skipped, which the health protocol allows
(a watcher wants the latest).  A watcher stuck in a write blocks nobody
but itself, until its RPC ends (the client goes, or the server stops).
"""

from __future__ import annotations

import asyncio
from typing import Any

import grpc
import grpc.aio
from grpc_health.v1 import health_pb2, health_pb2_grpc

__all__ = ["HealthStatuses"]

_Status = Any  # health_pb2.HealthCheckResponse.ServingStatus (an int enum value)


class HealthStatuses(health_pb2_grpc.HealthServicer):  # type: ignore[misc]
    """The status per service name ("" is the server as a whole), with the
    standard Check and Watch over them."""

    def __init__(self) -> None:
        self._status: dict[str, _Status] = {"": health_pb2.HealthCheckResponse.SERVING}
        #: per service: the event the next change sets (made by a watcher)
        self._changed: dict[str, asyncio.Event] = {}
        self._shutting_down = False

    def get(self, service: str) -> _Status | None:
        return self._status.get(service)

    def set(self, service: str, status: _Status) -> None:
        """Set a service's status (ignored once the shutdown began: all
        NOT_SERVING from then on).  Never waits."""
        if self._shutting_down:
            return
        self._store(service, status)

    def _store(self, service: str, status: _Status) -> None:
        if self._status.get(service) == status:
            return
        self._status[service] = status
        ev = self._changed.pop(service, None)
        if ev is not None:
            ev.set()

    def enter_graceful_shutdown(self) -> None:
        """Every service NOT_SERVING, for good: later ``set`` calls are
        ignored."""
        if self._shutting_down:
            return
        self._shutting_down = True
        for service in list(self._status):
            self._store(service, health_pb2.HealthCheckResponse.NOT_SERVING)

    async def Check(
        self, request: health_pb2.HealthCheckRequest, context: grpc.aio.ServicerContext
    ) -> health_pb2.HealthCheckResponse:
        status = self._status.get(request.service)
        if status is None:
            await context.abort(grpc.StatusCode.NOT_FOUND)
        return health_pb2.HealthCheckResponse(status=status)

    async def Watch(
        self, request: health_pb2.HealthCheckRequest, context: grpc.aio.ServicerContext
    ) -> None:
        service = request.service
        last: _Status | None = None
        while True:
            # the event first, then the status: a change from here on sets it
            ev = self._changed.get(service)
            if ev is None:
                ev = self._changed[service] = asyncio.Event()
            # a service set for the first time after the shutdown began
            # (never, now) is NOT_SERVING like every other
            unknown = (
                health_pb2.HealthCheckResponse.NOT_SERVING
                if self._shutting_down
                else health_pb2.HealthCheckResponse.SERVICE_UNKNOWN
            )
            status = self._status.get(service, unknown)
            if status != last:
                await context.write(health_pb2.HealthCheckResponse(status=status))
                last = status
            await ev.wait()

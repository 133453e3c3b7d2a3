"""The kupd server object: lock, socket, gRPC server, devices, drain.

``Server(config)``: ``await start()``, then ``await wait_stopped()``;
``request_stop()`` (SIGTERM) drains: health NOT_SERVING, new requests and
open sessions/watches get UNAVAILABLE (EKU_SHUTDOWN), calls in flight get
``drain_grace`` seconds to finish, channels are released, the socket, pid
file and lock are removed.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import os
import resource
from typing import Any

import grpc
import grpc.aio
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1._async import HealthServicer
from grpc_reflection.v1alpha import reflection

from kupapi import MAX_GRPC_MESSAGE, kup_pb2, kup_pb2_grpc
from kupd import errors
from kupd.config import Config
from kupd.devices import DeviceManager
from kupd.log import get_logger
from kupd.metrics import Metrics
from kupd.service import KupService
from kupd.sessions import LeaseTable
from kupd.watch import Event, EventBus, EventType

__all__ = ["AlreadyRunning", "Server", "server_options"]

log = get_logger("kupd.server")
SERVICE_NAME = kup_pb2.DESCRIPTOR.services_by_name["Kup"].full_name


class AlreadyRunning(RuntimeError):
    """Another kupd holds the lock of this socket."""


def server_options(config: Config) -> list[tuple[str, Any]]:
    return [
        ("grpc.max_send_message_length", MAX_GRPC_MESSAGE),
        ("grpc.max_receive_message_length", MAX_GRPC_MESSAGE),
        # Dead or hung clients: ping idle connections, drop those that do not answer.
        ("grpc.keepalive_time_ms", int(config.keepalive_time * 1000)),
        ("grpc.keepalive_timeout_ms", int(config.keepalive_timeout * 1000)),
        ("grpc.http2.ping_timeout_ms", int(config.keepalive_timeout * 1000)),
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.http2.max_pings_without_data", 0),
        # Clients may ping us (kupclient: every 30 s) without being sent GOAWAY.
        ("grpc.http2.min_ping_interval_without_data_ms", 5000),
        ("grpc.http2.min_time_between_pings_ms", 5000),
        ("grpc.max_concurrent_streams", config.max_sessions + 1024),
        ("grpc.so_reuseport", 0),
    ]


class _Health(HealthServicer):  # type: ignore[misc]
    """Health backed by a live check: each Check first probes the devices."""

    def __init__(self, server: Server) -> None:
        super().__init__()
        self._kupd = server

    async def Check(
        self, request: health_pb2.HealthCheckRequest, context: grpc.aio.ServicerContext
    ) -> health_pb2.HealthCheckResponse:
        await self._kupd.probe()
        return await super().Check(request, context)


class Server:
    def __init__(self, config: Config) -> None:
        self.config = config
        self.metrics = Metrics()
        self.metrics_port = 0
        self.bus = EventBus()
        self._lock_fd = -1
        self._grpc: grpc.aio.Server | None = None
        self._stopped = asyncio.Event()
        self._stopping = False
        self._drain_task: asyncio.Task[None] | None = None
        self.drain: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.mgr = DeviceManager(
            config, self.bus, self.metrics, MAX_GRPC_MESSAGE, on_health=self._health_changed
        )
        self.leases = LeaseTable(self.mgr, config.lease_idle_timeout, config.max_sessions)
        self.service = KupService(config, self.mgr, self.leases, self.bus, self.metrics, self.drain)
        self.health = _Health(self)

    # -- start ---------------------------------------------------------------
    def _take_lock(self) -> None:
        path = self.config.lock_path
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = ""
            with contextlib.suppress(OSError):
                holder = os.pread(fd, 64, 0).decode(errors="replace").strip()
            os.close(fd)
            raise AlreadyRunning(
                f"another kupd (pid {holder or '?'}) serves {self.config.socket}: "
                f"lock {path} is held"
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._lock_fd = fd

    async def start(self) -> None:
        cfg = self.config
        sock_dir = os.path.dirname(os.path.abspath(cfg.socket))
        os.makedirs(sock_dir, mode=0o755, exist_ok=True)
        # The lock BEFORE the socket: gRPC unlinks an existing socket path
        # when it binds, so a second instance must never get that far.
        self._take_lock()
        try:
            await self._start_locked()
        except BaseException:
            await self._cleanup()
            raise

    async def _start_locked(self) -> None:
        cfg = self.config
        _raise_nofile()
        if cfg.pid_path:
            with open(cfg.pid_path, "w") as f:
                f.write(f"{os.getpid()}\n")
        if cfg.metrics_port:
            self.metrics_port = self.metrics.serve(cfg.metrics_port, cfg.metrics_address)
        await self.mgr.start()
        self.leases.start()
        server = grpc.aio.server(options=server_options(cfg))
        kup_pb2_grpc.add_KupServicer_to_server(self.service, server)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, server)
        reflection.enable_server_reflection(
            (
                SERVICE_NAME,
                health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
                reflection.SERVICE_NAME,
            ),
            server,
        )
        with contextlib.suppress(FileNotFoundError):
            os.unlink(cfg.socket)  # stale: we hold the lock, nobody serves it
        old = os.umask(0o177)  # the socket is born 0600, then opened up to socket_mode
        try:
            port = server.add_insecure_port("unix:" + os.path.abspath(cfg.socket))
            if port == 0:
                raise OSError(f"cannot bind unix socket {cfg.socket}")
            await server.start()
        finally:
            os.umask(old)
        os.chmod(cfg.socket, cfg.socket_mode)
        self._grpc = server
        await self._update_health()
        log.info(
            "kupd ready",
            socket=cfg.socket,
            devices=[d.name for d in cfg.devices],
            pid=os.getpid(),
            metrics_port=self.metrics_port,
        )

    # -- health --------------------------------------------------------------
    def _health_changed(self) -> None:
        if not self._stopping:
            self.mgr.spawn(self._update_health())

    async def _update_health(self) -> None:
        if self._stopping:
            return
        serving = health_pb2.HealthCheckResponse.SERVING
        not_serving = health_pb2.HealthCheckResponse.NOT_SERVING
        overall = serving if self.mgr.all_healthy else not_serving
        await self.health.set("", overall)
        await self.health.set(SERVICE_NAME, overall)
        for d in self.mgr.devices.values():
            await self.health.set(f"{SERVICE_NAME}/{d.name}", serving if d.healthy else not_serving)

    async def probe(self) -> None:
        """The real health check: reach every device now."""
        if self._stopping:
            return
        for d in list(self.mgr.devices.values()):
            if d.dev is None:
                await d.try_open()
            else:
                await d.refresh()
        await self._update_health()

    # -- stop ----------------------------------------------------------------
    def request_stop(self) -> None:
        if not self._stopping:
            self._stopping = True
            self._drain_task = asyncio.ensure_future(self._drain_and_stop())

    async def _drain_and_stop(self) -> None:
        cfg = self.config
        log.info(
            "kupd draining",
            grace=cfg.drain_grace,
            calls=self.service.calls_in_flight,
            leases=len(self.leases.leases),
        )
        try:
            await self.health.enter_graceful_shutdown()
            self.drain.set_exception(errors.Shutdown("kupd is shutting down"))
            self.drain.exception()
            self.bus.publish(Event(EventType.SERVER_SHUTTING_DOWN, reason="SIGTERM"))
            try:
                async with asyncio.timeout(cfg.drain_grace):
                    await self.service.calls_idle.wait()
            except TimeoutError:
                log.warning(
                    "calls still in flight after the grace period",
                    calls=self.service.calls_in_flight,
                )
            self.leases.end_all("shutdown", errors.Shutdown("kupd is shutting down"))
            self.bus.close()  # watchers saw the leases go; their streams end UNAVAILABLE
            if self._grpc is not None:
                await self._grpc.stop(grace=1.0)
        finally:
            await self._cleanup()
            log.info("kupd stopped")
            self._stopped.set()

    async def _cleanup(self) -> None:
        self.leases.close()
        await self.mgr.close()
        self.metrics.close()
        cfg = self.config
        if self._grpc is not None:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(cfg.socket)
        if cfg.pid_path and self._lock_fd >= 0:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(cfg.pid_path)
        if self._lock_fd >= 0:
            # The lock file stays: unlinking it would let two instances lock
            # different inodes of the same path.
            os.close(self._lock_fd)
            self._lock_fd = -1

    async def stop(self) -> None:
        self.request_stop()
        await self._stopped.wait()

    async def wait_stopped(self) -> None:
        await self._stopped.wait()


def _raise_nofile() -> None:
    """Each held channel costs a few fds (socket, memfd, eventfds): allow many."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = hard if hard != resource.RLIM_INFINITY else 1 << 16
    if soft != resource.RLIM_INFINITY and soft < want:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))

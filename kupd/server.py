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
import dataclasses
import errno
import fcntl
import os
import resource
import threading
import time
from collections.abc import Callable
from typing import Any

import grpc
import grpc.aio
from grpc_health.v1 import health_pb2

from kupapi import MAX_GRPC_MESSAGE, kup_pb2
from kupd import errors
from kupd.audit import AuditLog
from kupd.config import Config, ConfigError, advisories, load_config, reloaded
from kupd.devices import DeviceManager, grants_past_device, shown
from kupd.health import HealthStatuses
from kupd.log import get_logger, set_level
from kupd.metrics import Metrics, TenantCollector
from kupd.notify import notifier_from_env
from kupd.policy import (
    Guard,
    Policy,
    Tenant,
    current_tenant,
    plain_tenant,
    refuse_retired,
    socket_moved,
)
from kupd.service import KupService
from kupd.sessions import LeaseTable
from kupd.tenants import (
    CONNECTION_IDLE,
    SocketSet,
    check_path,
    endpoints_for,
    open_regular,
    write_replacing,
)
from kupd.watch import Event, EventBus, EventType

__all__ = ["AlreadyRunning", "Reloaded", "Server", "pending_bound", "server_options"]

log = get_logger("kupd.server")
SERVICE_NAME = kup_pb2.DESCRIPTOR.services_by_name["Kup"].full_name


class AlreadyRunning(RuntimeError):
    """Another kupd holds the lock of this socket."""


@dataclasses.dataclass(frozen=True)
class Reloaded:
    """What a reload did."""

    #: tenants served now ("default" without tenants)
    tenants: list[str]
    #: lease ids the new policy forbade (ended with PERMISSION_DENIED)
    sessions_ended: list[str]
    #: changed keys now in effect (kupd.config.RELOADED_KEYS)
    applied: list[str]
    #: changed keys that only a restart applies (kupd.config.RESTART_KEYS)
    needs_restart: list[str]
    #: RPCs that waited on a socket the reload moved or removed, ended by it,
    #: by RPC ("Receive", "Call", "Watch", ...: kupd.retirement); none: {}
    rpcs_ended: dict[str, int] = dataclasses.field(default_factory=dict)
    #: why audit_log (unchanged) was not re-opened ("": it was): the reload
    #: was applied all the same (Server._reload)
    audit_error: str = ""
    #: (key, why) of each setting that has no effect as set (_advise)
    warnings: list[tuple[str, str]] = dataclasses.field(default_factory=list)
    #: socket paths the reload started serving / stopped serving
    sockets_added: list[str] = dataclasses.field(default_factory=list)
    sockets_removed: list[str] = dataclasses.field(default_factory=list)
    #: queued Calls the new policy refused (PERMISSION_DENIED, not sent)
    calls_refused: int = 0


def _advise(cfg: Config) -> list[tuple[str, str]]:
    """A warning per setting that is valid but does not do what its key
    suggests (kupd.config.advisories): an operator would otherwise learn it
    only when the protection it meant is not there.  Returns them (a
    reload's reply names them too)."""
    found = advisories(cfg)
    for key, why in found:
        log.warning("config key has no effect as set", key=key, why=why)
    return found


#: gRPC's own int options are int32
_GRPC_INT_MAX = 2**31 - 1


def pending_bound(config: Config) -> int:
    """gRPC's bound on new RPCs waiting for kupd to take them
    (``grpc.server.max_pending_requests``): above kupd's own queues."""
    return min(config.max_queued_calls + config.max_sessions + 1024, _GRPC_INT_MAX)


def server_options(config: Config) -> list[tuple[str, Any]]:
    """The gRPC server options, fixed when a server is built: a reload that
    changes them builds every socket a new server (kupd.tenants.SocketSet:
    keepalive_*, and max_concurrent_streams and the pending bound derived
    from max_sessions and max_queued_calls)."""
    # gRPC's core cancels new RPCs that wait for the application beyond
    # 1000 (at random, then all beyond 3000): a burst of a few thousand
    # Calls on one connection came back partly CANCELLED, with no reason
    # and nothing in kupd's log.  kupd bounds its own queues and says so
    # (max_queued_calls, max_sessions: RESOURCE_EXHAUSTED naming the key).
    pending = pending_bound(config)
    return [
        ("grpc.max_send_message_length", MAX_GRPC_MESSAGE),
        ("grpc.max_receive_message_length", MAX_GRPC_MESSAGE),
        # Dead or hung clients: ping idle connections, drop those that do not answer.
        ("grpc.keepalive_time_ms", int(config.keepalive_time * 1000)),
        ("grpc.keepalive_timeout_ms", int(config.keepalive_timeout * 1000)),
        ("grpc.http2.ping_timeout_ms", int(config.keepalive_timeout * 1000)),
        ("grpc.keepalive_permit_without_calls", 1),
        # Flow control: a fixed stream window in place of gRPC's BDP probe.
        # The probe pings a client several times a second while its data
        # arrives, and gRPC times every ping kupd sends by ping_timeout_ms
        # (keepalive_timeout, above: the one setting that drops a hung
        # client): a live client busy sending, slow to answer one such
        # ping, lost its whole connection (GOAWAY ENHANCE_YOUR_CALM
        # "ping_timeout").  Without the probe, keepalive pings only a
        # connection that has gone quiet.  The window is each socket's own
        # (kupd.tenants.stream_window), set where SocketSet builds its server.
        ("grpc.http2.bdp_probe", 0),
        ("grpc.http2.max_pings_without_data", 0),
        # Clients may ping us (kupclient: every 30 s) without being sent GOAWAY.
        ("grpc.http2.min_ping_interval_without_data_ms", 5000),
        ("grpc.http2.min_time_between_pings_ms", 5000),
        # An idle connection is closed (a GOAWAY, which gRPC clients follow
        # by connecting again for their next RPC): what moves the clients of
        # a socket server a reload replaced (kupd.tenants.SocketSet._drain).
        ("grpc.max_connection_idle_ms", int(CONNECTION_IDLE * 1000)),
        ("grpc.max_concurrent_streams", config.max_sessions + 1024),
        ("grpc.server.max_pending_requests", pending),
        ("grpc.server.max_pending_requests_hard_limit", pending),
        ("grpc.so_reuseport", 0),
    ]


def tenant_health_key(tenant: str) -> str:
    """The health service's name for "kupd as a whole" as ``tenant`` sees
    it (its devices only): Watched in place of "" and kup.v1.Kup by a
    tenant that sees only some devices.  No client can name it: Check and
    Watch take only the names ``health_services`` lists."""
    return f"{SERVICE_NAME}#tenant={tenant}"


class _Health(HealthStatuses):
    """Health backed by a live check: each Check first probes the devices."""

    def __init__(self, server: Server) -> None:
        super().__init__()
        self._kupd = server

    def _tenant(self) -> Tenant:
        """The caller's tenant under the running policy, refused on a socket
        a reload retired (as every RPC is: kupd.policy.refuse_retired).  A
        socket a reload kept keeps the Tenant it was built with
        (current_tenant()); its grants are the reloaded ones, and a tenant
        the reload removed sees no device."""
        refuse_retired()
        t = current_tenant()
        if t.admin or t.grants is None:
            return t
        now = self._kupd.guard.policy.tenant(t.name)
        return now if now is not None else dataclasses.replace(t, grants=())

    async def Check(
        self, request: health_pb2.HealthCheckRequest, context: grpc.aio.ServicerContext
    ) -> health_pb2.HealthCheckResponse:
        t = self._tenant()
        known = self._kupd.health_services(t)
        if request.service in known:
            # only what the tenant may see is probed: how long a device it
            # is not granted takes to answer is not its business either
            await self._kupd.probe(request.service, t)
        log.debug("health check", service=request.service)
        if request.service not in known:
            # the stock servicer's NOT_FOUND has no details: say what there is
            await self._kupd.service._abort(
                context,
                errors.NotFound(
                    f"no health status for service {shown(request.service)}; kupd reports "
                    + ", ".join(repr(s) for s in known)
                    + " ('' is kupd as a whole)"
                ),
            )
        if request.service in ("", SERVICE_NAME) and self._kupd.sees_part(t):
            # kupd as a whole, for a tenant that sees only some devices:
            # the devices it may use (not whether others' are down)
            status = health_pb2.HealthCheckResponse
            up = not self._kupd.stopping and self._kupd.tenant_healthy(t)
            return status(status=status.SERVING if up else status.NOT_SERVING)
        return await super().Check(request, context)

    async def Watch(
        self, request: health_pb2.HealthCheckRequest, context: grpc.aio.ServicerContext
    ) -> None:
        t = self._tenant()
        if request.service not in self._kupd.health_services(t):
            # a device the tenant may not see is a service it cannot know:
            # answered as gRPC answers one nobody reports (SERVICE_UNKNOWN,
            # then nothing)
            unknown = health_pb2.HealthCheckResponse.SERVICE_UNKNOWN
            await context.write(health_pb2.HealthCheckResponse(status=unknown))
            await asyncio.Event().wait()
        if request.service in ("", SERVICE_NAME) and self._kupd.sees_part(t):
            # kupd as a whole for a tenant that sees only some devices, as
            # its Check: a status of its own, which kupd keeps up to date
            # with the others (kupd's own would go NOT_SERVING for a device
            # it may not know of)
            key = tenant_health_key(t.name)
            if not self._kupd.stopping:
                self.set(key, self._kupd.tenant_status(t))
            request = health_pb2.HealthCheckRequest(service=key)
        await super().Watch(request, context)


class Server:
    def __init__(self, config: Config) -> None:
        self.config = config
        self.metrics = Metrics()
        self.metrics_port = 0
        self.bus = EventBus()
        self._lock_fd = -1
        #: lock_file's path as taken (a reload does not change it)
        self._lock_path = ""
        #: the last reason the lock could not be taken again (said once)
        self._lock_said = ""
        #: the pid file this process wrote: (path, (st_dev, st_ino)), or None
        self._pid_written: tuple[str, tuple[int, int]] | None = None
        #: each socket served, with the file it bound: (st_dev, st_ino) by
        #: path (_note_paths, after the start and each reload)
        self._socket_ids: dict[str, tuple[int, int] | None] = {}
        #: kupd's exit status once stopped: 0 after SIGTERM, 1 when it
        #: stopped itself because its socket went (_check_paths)
        self.exit_status = 0
        self._stopped = asyncio.Event()
        self._stopping = False
        self._stop_began = asyncio.Event()  # _stopping, for a wait (_read_new_config)
        #: why the stop began (SERVER_SHUTTING_DOWN's reason)
        self._stop_why = "SIGTERM"
        #: ready_file written by this process (and not removed since)
        self._ready_written = False
        self._drain_task: asyncio.Task[None] | None = None
        self.drain: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.mgr = DeviceManager(
            config, self.bus, self.metrics, MAX_GRPC_MESSAGE, on_health=self._health_changed
        )
        self.leases = LeaseTable(self.mgr, config.lease_idle_timeout, config.max_sessions)
        self.audit = AuditLog(config.audit_log)
        self.guard = Guard(Policy(config.tenants, plain_tenant(config)), self.audit)
        self.metrics.registry.register(
            TenantCollector(
                # read from the scrape thread: list() copies under the GIL
                lambda: [(le.tenant, le.holder) for le in list(self.leases.leases.values())],
                self._calls_in_flight,
                lambda: self.guard.denials.copy(),
                lambda: (self.guard.paced.copy(), self.guard.paced_seconds.copy()),
                lambda: (
                    self.guard.requests_paced.copy(),
                    self.guard.requests_paced_seconds.copy(),
                ),
            )
        )
        self.service = KupService(
            config, self.mgr, self.leases, self.bus, self.metrics, self.drain, self.guard
        )
        self.health = _Health(self)
        self.sockets: SocketSet | None = None
        self._reload_lock = asyncio.Lock()
        #: reloads under way, each its own task (reload): a stop waits for them
        self._reloads: set[asyncio.Task[Reloaded]] = set()
        #: Re-reads the configuration for a reload (the daemon sets one that
        #: re-applies its command-line flags); default: the same file.
        self.reload_source: Callable[[], Config] = self._read_config_again
        #: systemd's notify socket ($NOTIFY_SOCKET; a no-op without one)
        self.notify = notifier_from_env()

    # -- start ---------------------------------------------------------------
    def _take_lock(self) -> None:
        path = self.config.lock_path
        try:
            # a link, FIFO or hard link planted at the name is refused, never
            # truncated through (the directory may be shared, as /tmp)
            fd = open_regular(path, os.O_RDWR | os.O_CREAT, 0o600, "lock_file")
        except OSError as exc:
            raise OSError(f"cannot open lock_file {path}: {exc.strerror or exc}") from None
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
        if self._lock_fd >= 0:
            os.close(self._lock_fd)  # the lock of a file no longer at the path
        self._lock_fd = fd
        self._lock_path = path

    def _write_pid_file(self) -> None:
        """``pid_file``: this process's pid, as a new file renamed into place
        (nothing planted at the name is written through).  Its inode is
        kept: only that file, still naming this pid, is removed at exit."""
        path = self.config.pid_path
        if not path:
            return
        try:
            write_replacing(path, f"{os.getpid()}\n".encode(), 0o644, "pid_file")
            st = os.lstat(path)
        except OSError as exc:
            raise OSError(f"cannot write pid_file {path}: {exc.strerror or exc}") from None
        self._pid_written = (path, (st.st_dev, st.st_ino))

    def _remove_pid_file(self) -> None:
        """Remove the pid file this process wrote, if it is still that file
        (same inode) and still names this process: another kupd's, written
        at the same path since (a second instance once the run directory or
        lock was removed, say), stays where it is."""
        written, self._pid_written = self._pid_written, None
        if written is None:
            return
        path, fid = written
        try:
            st = os.lstat(path)
            if (st.st_dev, st.st_ino) != fid:
                return
            with open(path, "rb") as f:
                pid = f.read(64).split()[:1]
        except OSError:
            return
        if pid == [str(os.getpid()).encode()]:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)

    async def start(self) -> None:
        cfg = self.config
        # The socket's directory (made if missing; the lock is there by
        # default): every directory and link on the way out of other users'
        # reach (kupd.tenants.check_path; a shared sticky one, as /tmp, is
        # accepted for the plain socket).
        check_path(os.path.abspath(cfg.socket), "socket", private=False, create=True)
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
        # A ready file left by a kupd that did not stop cleanly (killed,
        # crashed) is not this kupd's readiness: gone before anything else,
        # by the lock's holder only.  Its directory is checked as the pid
        # file's is: an unsafe one refuses the start.
        if cfg.ready_file:
            check_path(os.path.abspath(cfg.ready_file), "ready_file", private=False)
            self._remove_ready_file(only_ours=False)
        if cfg.pid_path:
            # its directory checked now (an unsafe one refuses the start
            # before any device is opened); the file is written once this
            # instance owns its sockets (_write_pid_file)
            try:
                check_path(os.path.abspath(cfg.pid_path), "pid_file", private=False)
            except OSError as exc:
                raise OSError(
                    f"cannot write pid_file {cfg.pid_path}: {exc.strerror or exc}"
                ) from None
        if cfg.metrics_port:
            self.metrics_port = self.metrics.serve(cfg.metrics_port, cfg.metrics_address)
        await self.mgr.start()
        self.leases.start()
        from kupd.admin import AdminService

        # One grpc.aio server per socket (the tenant is the socket): kupd.tenants.
        self.sockets = SocketSet(
            server_options(cfg), self.service, self.health, lambda: AdminService(self)
        )
        await self.sockets.start(endpoints_for(cfg))
        # The pid file only now, when this instance holds the lock AND
        # serves its sockets: one that fails before (another kupd serves
        # the socket, a device cannot be opened) never names itself there,
        # so it never replaces -- nor, exiting, removes -- the pid file of
        # the kupd that does serve.
        self._write_pid_file()
        self._note_paths()
        await self._update_health()
        _advise(cfg)
        log.info(
            "kupd ready",
            # with [[tenant]] tables the plain socket is not served
            socket=None if cfg.tenants else cfg.socket,
            tenants={t.name: t.socket for t in cfg.tenants},
            admin_socket=cfg.admin_socket,
            devices=[d.name for d in cfg.devices],
            pid=os.getpid(),
            metrics_port=self.metrics_port,
        )
        self.mgr.spawn(self._watch_fds())
        self.mgr.spawn(self._watch_connections())

    async def _watch_connections(self) -> None:
        """Say when a socket is at its max_connections.  gRPC closes a
        connection over the cap as it is accepted and tells kupd nothing
        (kupd.connections: the refusals cannot be counted), so kupd looks
        at what it can see, every CONN_WATCH_S: the connections open on
        each socket.  A socket that has reached its cap refuses whatever
        connects next: a warning when it gets there (again at most every
        CONN_REPEAT_S while it stays there), a line when it is under it
        again; kupd_connections / kupd_connections_max carry the counts.
        A socket that reaches its cap and drops back between two looks is
        not seen."""
        at_cap: dict[tuple[str, str], float] = {}  # key -> when last said
        listed: set[str] = set()  # tenants in kupd_connections
        capped: set[str] = set()  # tenants in kupd_connections_max
        unreadable = False
        while not self._stopping:
            await asyncio.sleep(CONN_WATCH_S)
            if self.sockets is None or self._stopping:
                continue
            seen = self.sockets.connections()
            if seen is None:
                if not unreadable:
                    unreadable = True
                    log.warning(
                        "cannot read gRPC's channelz: connections per socket are not "
                        "watched (a socket at its max_connections is not reported)"
                    )
                continue
            unreadable = False
            now = time.monotonic()
            tenants: set[str] = set()
            caps: set[str] = set()
            for ep, n in seen:
                name = ep.tenant.name
                tenants.add(name)
                self.metrics.connections.labels(name).set(n)
                cap = ep.max_connections
                if not cap:
                    continue
                caps.add(name)
                self.metrics.connections_max.labels(name).set(cap)
                if n >= cap:
                    said = at_cap.get(ep.key)
                    if said is None or now - said >= CONN_REPEAT_S:
                        log.warning(
                            "socket at max_connections: gRPC closes every further "
                            "connection as it is accepted (kupd cannot count those)"
                            if said is None
                            else "socket still at max_connections",
                            socket=ep.path,
                            tenant=name,
                            connections=n,
                            max_connections=cap,
                        )
                        at_cap[ep.key] = now
                elif ep.key in at_cap:
                    del at_cap[ep.key]
                    log.info(
                        "socket under max_connections again",
                        socket=ep.path,
                        tenant=name,
                        connections=n,
                        max_connections=cap,
                    )
            keys = {ep.key for ep, _ in seen}
            for key in [k for k in at_cap if k not in keys]:
                del at_cap[key]  # a socket a reload took away
            # tenants (or caps) a reload took away: out of the metrics
            for name in listed - tenants:
                self.metrics.connections.remove(name)
            for name in capped - caps:
                self.metrics.connections_max.remove(name)
            listed, capped = tenants, caps

    def write_ready_file(self) -> None:
        """``ready_file``: "PID ready", once kupd serves (after "kupd ready"
        and the signal handlers).  A service manager that cannot read kupd's
        log (log_level above info) or does not trust it learns from it that
        this process -- the pid, compared with the one it started -- is up.
        Replaced atomically (renamed into place): a reader sees the whole
        line or no file.  One that cannot be written is logged, not fatal:
        kupd serves anyway, and rc.d/kupd's start check falls back to the
        log and, in the end, to "still starting"."""
        path = self.config.ready_file
        if not path or self._stopping:
            return
        try:
            write_replacing(path, f"{os.getpid()} ready\n".encode(), 0o644, "ready_file")
        except OSError as exc:
            log.error(
                "cannot write ready_file: a service manager waiting for it will not see "
                "kupd ready",
                ready_file=path,
                error=exc.strerror or str(exc),
            )
            return
        self._ready_written = True

    def _remove_ready_file(self, only_ours: bool = True) -> None:
        """Remove ``ready_file`` (``only_ours``: if it names this process:
        another kupd's, written after ours at a shared path, stays)."""
        path = self.config.ready_file
        if not path:
            return
        if only_ours:
            if not self._ready_written:
                return
            self._ready_written = False
            try:
                with open(path, "rb") as f:
                    pid = f.read(64).split()[:1]
            except OSError:
                return
            if pid != [str(os.getpid()).encode()]:
                return
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)

    def _note_paths(self) -> None:
        """Remember the file each served socket is now (after the start and
        after each reload's commit): :meth:`_check_paths` compares."""
        if self.sockets is None:
            return
        self._socket_ids = {ep.path: _file_id(ep.path) for ep, _ in self.sockets.servers.values()}

    def _check_paths(self) -> None:
        """Whether kupd's socket(s) and lock are still the files it made (a
        run directory removed or emptied under it: tmpfiles cleaning, an
        operator's ``rm -rf``, a second kupd's start on the same config).

        * A socket gone or replaced: no client can reach this kupd there any
          more, and a second kupd may be serving the path -- both holding
          the devices.  kupd logs an error naming the path and stops itself
          (the SIGTERM drain: clients are told, every channel is released,
          nothing another instance made at these paths is removed) with exit
          status 1, so that a supervisor (systemd ``Restart=on-failure``)
          starts it afresh: directories, socket, lock and pid file made
          again the ordinary way.  Re-binding in place is not done: a gRPC
          server cannot bind again once started, and the path may now be
          another kupd's.
        * The lock file alone gone or replaced (the sockets still ours): the
          lock is taken again at the path, so that a second kupd started
          now is refused by the lock, as ever.  If another process holds the
          new lock it is a kupd starting on this config: it either finds
          these sockets served and exits, or finds one gone -- which the
          first rule catches on the next look.  Tried again on each look.
        """
        if self._stopping or self.sockets is None or self._reload_lock.locked():
            return  # a reload moves sockets: looked at once it is done
        gone = [p for p, fid in self._socket_ids.items() if fid is None or _file_id(p) != fid]
        if gone:
            log.error(
                "socket removed or replaced under kupd: clients cannot reach it there "
                "(another kupd may serve the path now); stopping, exit status 1, for a "
                "supervisor to start kupd afresh",
                sockets=gone,
            )
            self.exit_status = 1
            # the event's reason names no path: tenants watch it, and a
            # socket may be another tenant's
            self.request_stop("kupd's socket was removed or replaced")
            return
        if self._lock_fd < 0 or not self._lock_path:
            return
        mine = os.fstat(self._lock_fd)
        if _file_id(self._lock_path) == (mine.st_dev, mine.st_ino):
            return
        try:
            self._take_lock()
        except (AlreadyRunning, OSError) as exc:
            if str(exc) != self._lock_said:  # once per cause, not every look
                self._lock_said = str(exc)
                log.error(
                    "lock_file removed or replaced under kupd, and not taken again: "
                    "another kupd may start on this config",
                    lock_file=self._lock_path,
                    error=str(exc),
                )
            return
        self._lock_said = ""
        log.error(
            "lock_file was removed or replaced under kupd: taken again",
            lock_file=self._lock_path,
        )

    async def _watch_fds(self) -> None:
        """Say so before kupd runs out of file descriptors.  At the limit
        nothing connects any more -- the admin socket included -- and new
        channels cannot be received; what gRPC logs then is one plain line a
        second.  A warning at FD_WARN of the limit (and a line when usage is
        back under FD_CLEAR of it) tells the operator in time, in kupd's own
        log.  Each look also checks kupd's socket and lock paths
        (:meth:`_check_paths`)."""
        high = False
        countable = None not in fd_usage()  # /proc/self/fd or /dev/fd, and a limit
        while not self._stopping:
            await asyncio.sleep(FD_WATCH_S)
            self._check_paths()
            if not countable:
                continue
            used, limit = fd_usage()
            if used is None or limit is None:
                continue
            if not high and used >= FD_WARN * limit:
                high = True
                log.warning(
                    "file descriptors nearly used up: at the limit no client can connect, "
                    "the admin socket included",
                    used=used,
                    limit=limit,
                    hint="close sessions or connections, or raise kupd's limit "
                    "(systemd LimitNOFILE, login.conf openfiles)",
                )
            elif high and used < FD_CLEAR * limit:
                high = False
                log.info("file descriptors back under the warning level", used=used, limit=limit)

    # -- reload --------------------------------------------------------------
    def _read_config_again(self) -> Config:
        path = self.config.extra.get("path")
        if not path:
            return self.config
        return load_config(path, {"socket": self.config.socket})

    def _calls_in_flight(self) -> dict[str, int]:
        """Per tenant of the running policy (0 included), plus any tenant a
        reload removed whose Calls are still finishing."""
        names = [t.name for t in self.guard.policy.tenants] or ["default"]
        return {**dict.fromkeys(names, 0), **self.guard.in_flight}

    async def reload(self, via: str = "SIGHUP") -> Reloaded:
        """Reload (:meth:`_reload_framed`), run to its end whatever happens
        to the one who asked: the work is a task of its own, kept by the
        server, and awaited shielded.  A requester that leaves before the
        answer (an Admin.Reload whose client's deadline passed, or that
        cancelled: grpc.aio cancels its handler) gets its CancelledError;
        the reload goes on -- applied or refused, audited, the service
        manager told READY -- and its outcome is logged, since nobody else
        would see a refusal (:meth:`_reload_outcome`).  Cancelled at one
        of its awaits, the reload would have stopped half-way: new sockets
        bound at private names and never served nor stopped, no audit
        line, the service manager left at RELOADING.  kupd's stop waits
        for a reload under way (:meth:`_drain_and_stop`)."""
        work = asyncio.ensure_future(self._reload_framed(via))
        self._reloads.add(work)
        work.add_done_callback(self._reloads.discard)
        try:
            return await asyncio.shield(work)
        except asyncio.CancelledError:
            work.add_done_callback(lambda t: self._reload_outcome(via, t))
            raise

    def _reload_outcome(self, via: str, work: asyncio.Task[Reloaded]) -> None:
        """Log how a reload whose requester left ended (its exception
        retrieved: no "Task exception was never retrieved")."""
        if work.cancelled():  # not done by kupd: said all the same
            log.error("reload cancelled; its requester had left", via=via)
            return
        exc = work.exception()
        if exc is None:
            log.info("reload applied; its requester had left before the answer", via=via)
        else:
            log.error(
                "reload refused; its requester had left before the answer, "
                "the running config stays",
                via=via,
                error=str(exc),
            )

    async def _reload_framed(self, via: str) -> Reloaded:
        """Re-read the config and apply every key a running kupd can change
        (kupd.config.RELOADED_KEYS) at once: the tenant policy and sockets,
        the timeouts and limits, the log level and the audit log.  All of
        it is checked first: a ConfigError (bad value, unopenable audit_log)
        changes nothing and the running config stays.  Either way one audit
        line (``via``: who asked).  The service manager hears RELOADING
        before and READY after, whether the reload was applied or refused
        (STOPPING again if a stop began meanwhile)."""
        self.notify.reloading()
        try:
            done = await self._reload()
        except Exception as exc:  # ConfigError: ValueError; OSError; KupError; or a fault
            self.audit.admin("reload", via=via, ok=False, error=str(exc))
            self._notify_after_reload(f"last reload refused: {exc}")
            raise
        note = f"audit log not re-opened: {done.audit_error}" if done.audit_error else ""
        self._notify_after_reload(note)
        extra = {"audit_error": done.audit_error} if done.audit_error else {}
        self.audit.admin(
            "reload",
            via=via,
            ok=True,
            tenants=done.tenants,
            sessions_ended=done.sessions_ended,
            rpcs_ended=done.rpcs_ended,
            applied=done.applied,
            needs_restart=done.needs_restart,
            # what the reply says too: the audit log is the record of what
            # a reload did, whoever asked and whether or not they looked
            sockets_added=done.sockets_added,
            sockets_removed=done.sockets_removed,
            calls_refused=done.calls_refused,
            warnings=[{"key": k, "why": why} for k, why in done.warnings],
            **extra,
        )
        return done

    def _notify_after_reload(self, note: str) -> None:
        if self._stopping:
            self.notify.stopping("draining")
        else:
            self.notify.ready("; ".join(x for x in (self.status_line(), note) if x))

    def status_line(self) -> str:
        """One line for ``systemctl status``: what kupd serves, and where."""
        cfg = self.config
        where = ", ".join(t.socket for t in cfg.tenants) if cfg.tenants else cfg.socket
        n = len(cfg.devices)
        return f"serving {n} device{'s' if n != 1 else ''} on {where}"

    async def _read_new_config(self) -> Config:
        """``reload_source()`` -- the config file read and checked -- off
        the event loop.  A read that blocks (a config file on a hung
        network mount, a FIFO nobody writes) froze all of kupd: every RPC,
        health check and timer.  It runs in a daemon thread, not the loop's
        executor, because such a read may never return and the executor's
        threads are joined at exit.  The reload lock stays held meanwhile
        (a later reload waits its turn); kupd's stop does not wait for the
        read: the reload is refused as shutting down, nothing applied."""
        loop = asyncio.get_running_loop()
        got: asyncio.Future[Config] = loop.create_future()

        def settle(cfg: Config | None, exc: BaseException | None) -> None:
            if got.done():  # the stop came first
                return
            if exc is not None:
                got.set_exception(exc)
            else:
                assert cfg is not None
                got.set_result(cfg)

        def read() -> None:
            cfg: Config | None = None
            exc: BaseException | None = None
            try:
                cfg = self.reload_source()
            except BaseException as e:  # handed to the reload, which says it
                exc = e
            with contextlib.suppress(RuntimeError):  # the loop is gone: kupd ended
                loop.call_soon_threadsafe(settle, cfg, exc)

        threading.Thread(target=read, name="kupd-config-read", daemon=True).start()
        stop = asyncio.ensure_future(self._stop_began.wait())
        try:
            waits: set[asyncio.Future[Any]] = {got, stop}
            await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
        finally:
            stop.cancel()
        if not got.done():
            got.cancel()
            raise errors.Shutdown(
                "kupd is shutting down: reload refused (its config file was still being read)"
            )
        return got.result()

    async def _reload(self) -> Reloaded:
        async with self._reload_lock:
            # -- check: a refusal here leaves everything as it was
            if self._stopping:
                # its sockets would be bound only to answer EKU_SHUTDOWN
                raise errors.Shutdown("kupd is shutting down: reload refused")
            new = await self._read_new_config()
            cfg, applied, needs_restart = reloaded(self.config, new)
            policy = Policy(cfg.tenants, plain_tenant(cfg))
            audit_kept = ""  # why the audit file was not re-opened ("": it was)
            try:
                audit_fd = self.audit.open_file(cfg.audit_log)
            except ConfigError as exc:
                if cfg.audit_log != self.audit.path:
                    raise  # a new path that cannot be opened: refused
                # The same path, not openable right now (its directory
                # removed, say): refusing would keep the operator from
                # applying any other change until it is back.  The reload
                # goes on with the file kupd has (a removed one: its lines
                # counted as lost, kupd.audit), and says so.
                audit_fd = -1
                audit_kept = str(exc)
            # The new tenants' sockets are bound and served before anything
            # is applied, the last check: one that cannot be bound refuses
            # the reload.  Each is bound at a private name and renamed into
            # place at the swap below (no await in between), so no client
            # reaches it before -- except one bound at its path itself (no
            # room for a private name in sun_path): a request there in the
            # few milliseconds before the swap is judged under the running
            # policy, which does not know a tenant this reload adds
            # (refused "tenant removed by a reload", and audited).
            # Every socket whose server was built with other gRPC options
            # (keepalive_*, and the bounds derived from max_sessions and
            # max_queued_calls: server_options) gets a new one, as one whose
            # own cap or limit changed (kupd.tenants.SocketSet._swap).
            endpoints = endpoints_for(cfg)
            try:
                started = (
                    await self.sockets.prepare(endpoints, server_options(cfg))
                    if self.sockets
                    else []
                )
            except BaseException:
                if audit_fd >= 0:
                    os.close(audit_fd)
                raise
            # -- apply: nothing below refuses
            old = self.config
            # The one running config: every holder reads this object.
            self.config = self.service.config = self.mgr.config = cfg
            if cfg.log_level != old.log_level:
                set_level(cfg.log_level)
            if audit_kept:
                log.error(
                    "reload: audit log not re-opened; the reload goes on with the file kupd "
                    "had" + ("" if self.audit.reachable() else
                             " (removed: its lines are counted as lost until a re-open)"),
                    error=audit_kept,
                )
            else:
                self.audit.use(cfg.audit_log, audit_fd)
            if cfg.health_interval != old.health_interval:
                self.mgr.reschedule()
            self.leases.idle_timeout = cfg.lease_idle_timeout
            self.leases.max_leases = cfg.max_sessions
            for d in self.mgr.devices.values():
                # A pool made later (a device re-opened) reads mgr.config.
                d.pool.quarantine = cfg.call_quarantine
                d.pool.max_queued = cfg.max_queued_calls
            if needs_restart:
                log.warning("reload: these keys need a restart", keys=needs_restart)
            warnings = _advise(cfg)
            # grants past a present device's channels: known only now that
            # it is there (a device that appears later is checked then)
            for d in self.mgr.devices.values():
                if d.info is not None:
                    for key, why in grants_past_device(cfg, d.name, d.info.chan_count):
                        log.warning("config key has no effect as set", key=key, why=why)
                        warnings.append((key, why))
            self.guard.policy = policy  # one assignment: the swap
            shares = self.guard.pool_shares()
            calls_refused = 0
            for d in self.mgr.devices.values():
                # Calls already queued are judged by the new shares too --
                # and by the new grants: a tenant the reload took Calls on
                # this device from (or removed) has its queued ones refused
                # (those already on a channel run on)
                for group in d.pool.groups_queued():
                    rule = self.guard.calls_allowed(group, d.name)
                    if rule:
                        name = group.removeprefix("tenant:")
                        self.guard.record(name, "call", d.name, None, rule)
                        calls_refused += d.pool.refuse_group(
                            group,
                            errors.PermissionDenied(
                                f"tenant {name}: rule {rule}: the reloaded policy no longer "
                                f"allows call on device {d.name}"
                            ),
                        )
                d.pool.set_shares(shares)
            ended: list[str] = []
            for lease in list(self.leases.leases.values()):
                rule = self.guard.still_allowed(
                    lease.tenant, lease.holder, lease.dev.name, lease.ch.id
                )
                if rule:
                    ended.append(lease.id)
                    self.guard.record(lease.tenant, lease.holder, lease.dev.name, lease.ch.id, rule)
                    self.leases.end(
                        lease,
                        "policy reload",
                        errors.PermissionDenied(
                            f"tenant {lease.tenant}: rule {rule}: the reloaded policy no longer "
                            f"allows {lease.holder} on device {lease.dev.name} "
                            f"channel {lease.ch.id}"
                        ),
                    )
            ended += self._end_moved_sessions(old, cfg)
            rpcs_ended: dict[str, int] = {}
            if self.sockets is not None:
                added, removed, rpcs_ended = await self.sockets.commit(
                    endpoints, started, calls_grace=cfg.call_timeout
                )
            else:
                added, removed = [], []
            self._note_paths()  # the sockets served now (no await since the commit)
            # Open Watches re-check their permission now (the events above
            # re-check it too, before they are delivered), and one on a
            # socket commit retired ends here, after those events (its
            # tenant's Sessions' LEASE_RELEASED).  No await since the swap.
            self.bus.recheck()
            self._health_changed()  # a tenant's view of kupd's health: its new grants
            names = [t.name for t in cfg.tenants] or ["default"]
            log.info(
                "config reloaded",
                applied=applied,
                needs_restart=needs_restart,
                tenants=names,
                sessions_ended=len(ended),
                rpcs_ended=rpcs_ended,
                calls_refused=calls_refused,
                sockets_added=added,
                sockets_removed=removed,
            )
            return Reloaded(
                names, ended, applied, needs_restart, rpcs_ended, audit_kept,
                warnings=warnings, sockets_added=added, sockets_removed=removed,
                calls_refused=calls_refused,
            )  # fmt: skip

    def _end_moved_sessions(self, old: Config, cfg: Config) -> list[str]:
        """End the Sessions served by a tenant socket this reload moves
        (the tenant stays, its socket path changed): that socket's server
        stops, which would cut them after call_timeout with gRPC's bare
        "Cancelling all calls" and count them nowhere.  They end now with
        Unavailable naming the new socket, counted in sessions_ended.  An
        Attach lease stays: its id works through the new socket.  (The old
        socket's other RPCs that wait end as its server is retired:
        SocketSet.commit.)"""
        was = {t.name: t.socket for t in old.tenants}
        moved = {t.name: t.socket for t in cfg.tenants if was.get(t.name, t.socket) != t.socket}
        ended: list[str] = []
        for lease in list(self.leases.leases.values()):
            new = moved.get(lease.tenant)
            if new is None or lease.holder != "session" or not lease.via or lease.via == new:
                continue
            ended.append(lease.id)
            self.leases.end(
                lease, "socket moved by reload", socket_moved(lease.tenant, lease.via, new)
            )
        return ended

    def reopen_audit_log(self) -> None:
        """SIGUSR1: open ``audit_log`` at its path again (a rotation renamed
        the file kupd writes to) and let go of the old one; nothing else of
        the config is read.  A path that cannot be opened keeps the old
        file, and says so."""
        path = self.config.audit_log
        if not path:
            log.info("SIGUSR1: no audit_log to re-open")
            return
        try:
            fd = self.audit.open_file(path)
        except (OSError, ValueError) as exc:
            if self.audit.reachable():
                log.error("audit log not re-opened; writing on to the old file", error=str(exc))
            else:
                log.error(
                    "audit log not re-opened, and its old file was removed: lines are "
                    "counted as lost until a re-open succeeds (then the file says how many)",
                    error=str(exc),
                    lost=self.audit.lost,
                )
            return
        self.audit.use(path, fd)
        log.info("audit log re-opened", audit_log=path)

    async def reload_logged(self) -> None:
        """SIGHUP: reload; a bad file is logged and the running config stays."""
        try:
            await self.reload()
        except (ValueError, OSError, errors.KupError) as exc:
            log.error("reload refused; the running config stays", error=str(exc))

    # -- health --------------------------------------------------------------
    def health_changed(self) -> None:
        """Something health depends on changed (a device, a drain): update."""
        self._health_changed()

    def _health_changed(self) -> None:
        if not self._stopping:
            self.mgr.spawn(self._update_health())

    def health_services(self, tenant: Tenant | None = None) -> list[str]:
        """The services kupd reports health for: "" (kupd as a whole),
        kup.v1.Kup, and kup.v1.Kup/DEVICE for each device (that ``tenant``
        may see: a tenant learns nothing of devices not granted to it)."""
        names = [n for n in self.mgr.devices if tenant is None or tenant.may_see(n)]
        return ["", SERVICE_NAME, *(f"{SERVICE_NAME}/{name}" for name in names)]

    def sees_part(self, tenant: Tenant) -> bool:
        """Whether ``tenant`` may see only some of the devices: its "kupd as
        a whole" is then its devices' health, not kupd's."""
        return not tenant.admin and not all(tenant.may_see(n) for n in self.mgr.devices)

    def tenant_healthy(self, tenant: Tenant) -> bool:
        """Every device ``tenant`` may see is healthy."""
        return all(d.healthy for n, d in self.mgr.devices.items() if tenant.may_see(n))

    def tenant_status(self, tenant: Tenant) -> Any:
        """``tenant``'s "kupd as a whole", as a HealthCheckResponse status."""
        ok = self.tenant_healthy(tenant)
        status = health_pb2.HealthCheckResponse
        return status.SERVING if ok else status.NOT_SERVING

    async def _update_health(self) -> None:
        if self._stopping:
            return
        serving = health_pb2.HealthCheckResponse.SERVING
        not_serving = health_pb2.HealthCheckResponse.NOT_SERVING
        overall = serving if self.mgr.all_healthy else not_serving
        self.health.set("", overall)
        self.health.set(SERVICE_NAME, overall)
        for t in self.guard.policy.tenants:
            # the status a tenant that sees only some devices Watches for ""
            # and kup.v1.Kup (_Health.Watch): under the policy as it is now,
            # and for every tenant -- a Watch opened while it saw only some
            # devices goes on after a reload granted it all of them
            self.health.set(tenant_health_key(t.name), self.tenant_status(t))
        drained = self.guard.drained
        for d in self.mgr.devices.values():
            # a drained device refuses every new session, lease and Call: a
            # health checker must not send it traffic (kupd as a whole, ""
            # and kup.v1.Kup, stays SERVING for the other devices)
            up = d.healthy and d.name not in drained
            self.health.set(f"{SERVICE_NAME}/{d.name}", serving if up else not_serving)

    async def probe(self, service: str = "", tenant: Tenant | None = None) -> None:
        """The real health check: reach the devices now -- only the one a
        per-device ``service`` (kup.v1.Kup/DEVICE) names, else all (that
        ``tenant`` may see)."""
        if self._stopping:
            return
        devices = [
            d for d in self.mgr.devices.values() if tenant is None or tenant.may_see(d.name)
        ]
        prefix = f"{SERVICE_NAME}/"
        if service.startswith(prefix) and service[len(prefix):] in self.mgr.devices:
            devices = [self.mgr.devices[service[len(prefix):]]]
        # each device waited for at most PROBE_WAIT: a hung host makes its
        # device NOT_SERVING, not the whole check late
        await asyncio.gather(*(d.probe() for d in devices))
        await self._update_health()

    # -- stop ----------------------------------------------------------------
    @property
    def stopping(self) -> bool:
        """SIGTERM's drain (or a stop) has begun: nothing is SERVING."""
        return self._stopping

    def request_stop(self, why: str = "SIGTERM") -> None:
        if not self._stopping:
            self._stop_why = why
            self._stopping = True
            self._stop_began.set()
            # not ready any more: a start check or a "status" that reads the
            # file must not take a draining kupd for one that serves
            self._remove_ready_file()
            self.notify.stopping(f"draining: Calls get {self.config.drain_grace:g} s to finish")
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
            # A reload under way ends first, applied or refused (one that
            # starts now is refused: _reload).  It is short -- a re-read, and
            # its new sockets bound --, and, let run alongside, it could
            # install a socket server after this drain stopped them all.
            if self._reloads:
                await asyncio.wait(set(self._reloads))
            self.health.enter_graceful_shutdown()
            self.drain.set_exception(errors.Shutdown("kupd is shutting down"))
            self.drain.exception()
            self.bus.publish(Event(EventType.SERVER_SHUTTING_DOWN, reason=self._stop_why))
            try:
                async with asyncio.timeout(cfg.drain_grace):
                    await self.service.calls_idle.wait()
            except TimeoutError:
                log.warning(
                    "calls still in flight after the grace period",
                    calls=self.service.calls_in_flight,
                )
                # end them with kupd's own answer, not gRPC's "Cancelling
                # all calls" when the sockets stop
                why = errors.Shutdown(
                    f"kupd is shutting down: the Call did not finish within "
                    f"drain_grace ({cfg.drain_grace:g} s)"
                )
                for d in self.mgr.devices.values():
                    d.pool.close(why)
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(1.0):
                        await self.service.calls_idle.wait()
            self.leases.end_all("shutdown", errors.Shutdown("kupd is shutting down"))
            self.bus.close()  # watchers saw the leases go; their streams end UNAVAILABLE
            # Let every stream hand its final status to gRPC (bounded: a
            # client that stopped reading holds its handler in a write).
            try:
                async with asyncio.timeout(cfg.drain_grace):
                    await self.service.streams_idle.wait()
            except TimeoutError:
                log.warning(
                    "streams still open after the grace period",
                    streams=self.service.streams_in_flight,
                )
            if self.sockets is not None:
                await self.sockets.stop(grace=1.0)
        finally:
            await self._cleanup()
            log.info("kupd stopped")
            self._stopped.set()

    async def _cleanup(self) -> None:
        if self.sockets is not None:
            self.sockets.unlink_all()
            # Servers still running here are those of a start that failed
            # after binding some sockets (a drain has stopped its own).  They
            # stop now, on this loop: left to grpc.aio's Server.__del__ after
            # asyncio.run closed the loop, each printed "Exception ignored
            # ... Event loop is closed" and "coroutine 'AioServer.shutdown'
            # was never awaited" under kupd's one-line refusal.
            try:
                await self.sockets.stop(grace=None)
            except Exception as exc:  # the rest of the cleanup still runs
                log.warning("stopping the gRPC servers failed", error=repr(exc))
        self.leases.close()
        await self.mgr.close()
        self.metrics.close()
        self.audit.close()
        self._remove_ready_file()
        self._remove_pid_file()
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


#: How often kupd counts the connections on its sockets (seconds), and how
#: often at most it repeats that a socket is still at its max_connections
CONN_WATCH_S = 2.0
CONN_REPEAT_S = 60.0

#: How often kupd counts its file descriptors (seconds), and the shares of
#: its RLIMIT_NOFILE at which it warns and says it is clear again.
FD_WATCH_S = 5.0
FD_WARN = 0.9
FD_CLEAR = 0.8


def _file_id(path: str) -> tuple[int, int] | None:
    """(st_dev, st_ino) of the file at ``path``; None when there is none
    (or it cannot be looked at)."""
    try:
        st = os.lstat(path)
    except OSError:
        return None
    return (st.st_dev, st.st_ino)


def fd_usage() -> tuple[int | None, int | None]:
    """(descriptors open, soft RLIMIT_NOFILE); None where they cannot be
    counted (/proc/self/fd on Linux; /dev/fd on FreeBSD only with fdescfs
    mounted -- without it /dev/fd shows 0-2, which would under-count)."""
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    limit = None if soft == resource.RLIM_INFINITY else soft
    for d in ("/proc/self/fd", "/dev/fd"):
        if d == "/dev/fd" and not os.path.ismount("/dev/fd"):
            continue
        try:
            return len(os.listdir(d)), limit
        except OSError as exc:
            if exc.errno in (errno.EMFILE, errno.ENFILE):
                # listing them takes one more: there is none left
                return limit, limit
            continue
    return None, limit


def _raise_nofile() -> None:
    """Each held channel costs a few fds (socket, memfd, eventfds): allow many."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = hard if hard != resource.RLIM_INFINITY else 1 << 16
    if soft != resource.RLIM_INFINITY and soft < want:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))

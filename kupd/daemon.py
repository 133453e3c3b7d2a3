"""``kupd``: the KUP gateway daemon (console script).

    kupd --config /etc/kupd.toml
    kupd --socket /tmp/kupd.sock --device echo:4 --kupsim-dir /tmp/sim

Flags override the config file (at start and at every reload: SIGHUP
re-reads the file, see kupd.config.RELOADED_KEYS for what it applies).
Exit status: 0 after a clean SIGTERM /
SIGINT drain, 1 when another kupd already serves the socket or start-up
fails -- or when kupd stopped itself because its socket was removed or
replaced under it (kupd.server.Server._check_paths) --, 2 for a bad
configuration (the message names the key).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import sys
import threading
from collections.abc import Sequence
from types import FrameType
from typing import TYPE_CHECKING, Any

#: A SIGHUP came before the server was up to reload (serve() reloads once
#: when it is).
_hup_pending = False


def _remember_hup(signum: int, frame: FrameType | None) -> None:
    global _hup_pending
    _hup_pending = True


def _hold_sighup() -> None:
    """SIGHUP's default action ends the process (exit 129, which systemd
    counts as a clean exit: no restart).  A reload right after the start
    (``systemctl start kupd; systemctl reload kupd``: ExecReload falls back
    to ``kill -HUP`` while there is no admin socket yet) must not do that:
    from here until serve() installs the loop's handler a SIGHUP is
    remembered, and applied once the server is up.  Installed when this
    module loads, before the rest of kupd (and grpc) is imported -- the
    console script and ``python -m kupd.daemon`` both get here first."""
    # SIG_IGN too: started under nohup(1), kupd inherits an ignored SIGHUP,
    # which serve() replaces with the reload handler all the same -- the
    # reload asked for during the start must not be the one that is lost
    if threading.current_thread() is not threading.main_thread():
        return
    if signal.getsignal(signal.SIGHUP) in (signal.SIG_DFL, signal.SIG_IGN, _remember_hup):
        signal.signal(signal.SIGHUP, _remember_hup)
    # SIGUSR1 (re-open the audit log: logrotate's postrotate) would end kupd
    # the same way; during the start there is nothing to re-open yet
    if signal.getsignal(signal.SIGUSR1) == signal.SIG_DFL:
        signal.signal(signal.SIGUSR1, signal.SIG_IGN)


_hold_sighup()

from kupd import __version__  # noqa: E402  (after _hold_sighup: see there)
from kupd.abi import KUP_ABI_VERSION  # noqa: E402
from kupd.config import Config, ConfigError, load_config  # noqa: E402
from kupd.log import configure, get_logger  # noqa: E402
from kupd.nativelog import NativeStderr  # noqa: E402

if TYPE_CHECKING:
    from kupd.server import Server

__all__ = ["main", "parse_args"]


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="kupd", description="KUP gateway: kup.v1 gRPC on a unix socket"
    )
    p.add_argument(
        "--version",
        action="version",
        version=f"kupd {__version__} (API kup.v1, KUP ABI version {KUP_ABI_VERSION})",
    )
    p.add_argument("--config", "-c", help="TOML config file (see deploy/kupd.sample.toml)")
    p.add_argument("--socket", "-s", help="unix socket path to serve on")
    p.add_argument(
        "--device",
        "-d",
        action="append",
        metavar="NAME[:CALL_CHANNELS]",
        help="serve this device (repeatable; replaces the config's devices)",
    )
    p.add_argument("--kupsim-dir", help="where kupsim publishes devices ($KUPSIM_DIR)")
    p.add_argument("--lock-file", help="lock file (default: SOCKET.lock)")
    p.add_argument("--pid-file", help="pid file (default: SOCKET.pid; '-' for none)")
    p.add_argument(
        "--ready-file",
        help="written ('PID ready') once kupd serves, removed when it stops (default: none)",
    )
    p.add_argument("--metrics-port", type=int, help="serve Prometheus metrics on loopback:PORT")
    p.add_argument("--lease-idle-timeout", type=float, help="seconds before an idle lease ends")
    p.add_argument("--call-timeout", type=float, help="default Call deadline, seconds")
    p.add_argument(
        "--call-quarantine",
        type=float,
        help="seconds a Call pool channel may owe its reply before it is replaced",
    )
    p.add_argument("--drain-grace", type=float, help="seconds calls get to finish at SIGTERM")
    p.add_argument(
        "--reattach-grace",
        type=float,
        help="seconds an attach retries a channel its module has not let go of yet",
    )
    p.add_argument("--health-interval", type=float, help="device probe interval, seconds")
    p.add_argument("--max-sessions", type=int, help="limit on open sessions + leases")
    p.add_argument(
        "--max-connections",
        type=int,
        help="connections at once on --socket (0: no limit; tenants: their own key)",
    )
    p.add_argument(
        "--keepalive-time", type=float, help="ping idle client connections every N seconds"
    )
    p.add_argument(
        "--keepalive-timeout", type=float, help="drop a client whose ping is unanswered for N s"
    )
    p.add_argument(
        "--log-level",
        choices=("debug", "info", "warning", "error"),
        help="the least severe record logged: debug, info (default), warning or error",
    )
    return p.parse_args(argv)


def _device_flag(text: str) -> dict[str, Any]:
    """``--device NAME[:CALL_CHANNELS]`` (a path may hold ':' of its own)."""
    name, sep, calls = text.rpartition(":")
    if sep and calls.isdigit():
        return {"name": name, "call_channels": int(calls)}
    if sep and "/" not in text:
        raise ConfigError(
            "--device",
            f"{text!r}: CALL_CHANNELS after the ':' must be a number >= 0, not {calls!r}",
        )
    return {"name": text}


def config_from_args(args: argparse.Namespace) -> Config:
    overrides: dict[str, Any] = {
        "socket": args.socket,
        "kupsim_dir": args.kupsim_dir,
        "lock_file": args.lock_file,
        "pid_file": args.pid_file,
        "ready_file": args.ready_file,
        "metrics_port": args.metrics_port,
        "lease_idle_timeout": args.lease_idle_timeout,
        "call_timeout": args.call_timeout,
        "call_quarantine": args.call_quarantine,
        "drain_grace": args.drain_grace,
        "reattach_grace": args.reattach_grace,
        "health_interval": args.health_interval,
        "max_sessions": args.max_sessions,
        "max_connections": args.max_connections,
        "keepalive_time": args.keepalive_time,
        "keepalive_timeout": args.keepalive_timeout,
        "log_level": args.log_level,
    }
    if args.device:
        overrides["devices"] = [_device_flag(d) for d in args.device]
    return load_config(args.config, overrides)


async def serve(config: Config, args: argparse.Namespace | None = None) -> int:
    from kupd.server import AlreadyRunning, Server  # needs the C extension

    log = get_logger("kupd.daemon")
    try:
        server = Server(config)  # opens the audit log
        await server.start()
    except AlreadyRunning as exc:
        log.error("refusing to start", error=str(exc))
        print(f"kupd: {exc}", file=sys.stderr)
        return 1
    except (ConfigError, OSError) as exc:
        # an unsafe path, a socket another process serves, an audit log
        # that cannot be opened: in the log too, not only on stderr (main
        # prints it and picks the exit code)
        log.error("refusing to start", error=str(exc))
        raise
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, server.request_stop)
    # SIGHUP: re-read the config and apply what a running kupd can change
    # (kupd.config.RELOADED_KEYS).  The command-line flags are re-applied on
    # top of the file, so a key given as a flag keeps the flag's value.
    if args is not None:
        server.reload_source = lambda: config_from_args(args)
    loop.add_signal_handler(signal.SIGHUP, lambda: server.mgr.spawn(server.reload_logged()))
    # SIGUSR1: re-open the audit log only (after logrotate / newsyslog
    # renamed it), without re-reading a config file that may be mid-edit
    loop.add_signal_handler(signal.SIGUSR1, server.reopen_audit_log)
    # a SIGHUP during the start (_hold_sighup): the reload it asked for, now
    # (after the loop's handler is in place: one arriving meanwhile is not lost)
    global _hup_pending
    if _hup_pending:
        _hup_pending = False
        log.info("SIGHUP during start-up: reloading now")
        server.mgr.spawn(server.reload_logged())
    # systemd's Type=notify: started now, not at exec (kupd.notify); rc.d:
    # the ready file (both after the signal handlers: a reload or stop sent
    # the moment the service manager sees kupd started is handled)
    server.notify.ready(server.status_line())
    server.write_ready_file()
    pings = (
        asyncio.ensure_future(_watchdog(server))
        if server.notify.enabled and server.notify.watchdog_usec
        else None
    )
    try:
        await server.wait_stopped()
    finally:
        if pings is not None:
            pings.cancel()
        server.notify.close()
    # Drained (exit_status 1: kupd stopped itself, its socket gone).
    # Closing the loop would put SIGTERM and SIGHUP back to their
    # defaults: one of them while the interpreter and gRPC's threads wind
    # down (a service manager's or a test's second stop, a late reload)
    # would turn this clean exit into death by signal.  Ignored from here
    # on; SIGKILL still ends a hung exit.
    for sig in (signal.SIGTERM, signal.SIGHUP, signal.SIGUSR1):
        loop.remove_signal_handler(sig)
        signal.signal(sig, signal.SIG_IGN)
    return server.exit_status


async def _watchdog(server: Server) -> None:
    """WatchdogSec: ping at half the period while this loop runs, the
    drain included (a drain is bounded by TimeoutStopSec, not the
    watchdog).  A loop that hangs stops the pings, and systemd restarts
    kupd."""
    period = server.notify.watchdog_usec / 2e6
    while True:
        server.notify.watchdog()
        await asyncio.sleep(period)


#: libkup's backends (kmod/libkup/kup.c backend_by_name; $KUP_BACKEND)
KUP_BACKENDS = ("sim", "linux", "freebsd")


def main(argv: Sequence[str] | None = None) -> int:
    _hold_sighup()  # again: kupd.daemon may have been imported in another way
    args = parse_args(argv)
    try:
        config = config_from_args(args)
    except ConfigError as exc:
        print(f"kupd: {exc}", file=sys.stderr)
        return 2
    backend = os.environ.get("KUP_BACKEND", "")
    if backend not in ("", *KUP_BACKENDS):
        # libkup would refuse every device with a bare EKU_INVAL
        print(
            f"kupd: environment KUP_BACKEND={backend!r}: not a libkup backend "
            f"({', '.join(KUP_BACKENDS)}; unset: the kernel's device node if there is "
            "one, else kupsim)",
            file=sys.stderr,
        )
        return 2
    # gRPC core's own log lines (a client can cause one per request) under
    # a budget, as kupd's own are, by a helper process; before configure(): the JSON log is
    # written to the stream kupd was started with, not through the budget
    native = NativeStderr()
    native.start()
    configure(config.log_level)
    if native.failed:
        # kupd serves on; native lines go to the log unbudgeted, as before
        get_logger("kupd.nativelog").warning(
            "native log lines not budgeted: helper not started", error=native.failed
        )
    try:
        return asyncio.run(serve(config, args))
    except ConfigError as exc:  # found only at start (audit_log cannot be opened)
        print(f"kupd: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:
        print(f"kupd: {exc}", file=sys.stderr)
        return 1
    finally:
        native.stop()


if __name__ == "__main__":
    sys.exit(main())

"""Telling a service manager how kupd is doing: systemd's notify protocol.

With ``Type=notify`` (deploy/linux/kupd.service) systemd counts kupd as
started only once kupd says ``READY=1``, i.e. once every socket is served
and the first health check is done.  With ``Type=exec`` it counted kupd as
started the moment the program was exec'd, so a unit ordered
``After=kupd.service`` (a client started at boot) could run before the
socket existed, and a start that failed on a bad device was reported as
"started" first and "failed" a moment later.

The protocol is one datagram per state change to the unix socket named by
``$NOTIFY_SOCKET`` (a path, or ``@name`` for the abstract namespace),
newline-separated ``KEY=VALUE`` fields:

- ``READY=1`` once serving, and again after each reload;
- ``RELOADING=1`` with ``MONOTONIC_USEC`` when a reload begins (what
  ``Type=notify-reload`` expects; plain ``Type=notify`` shows it as
  "reloading");
- ``STOPPING=1`` when SIGTERM's drain begins;
- ``STATUS=...``: a line ``systemctl status kupd`` shows;
- ``WATCHDOG=1`` every half of ``$WATCHDOG_USEC`` while the event loop
  runs, when the unit sets ``WatchdogSec=``: a loop that hangs stops
  pinging and systemd restarts kupd.

Without ``$NOTIFY_SOCKET`` (rc.d, a shell, the tests' own kupd) every call
is a no-op.  A datagram that cannot be sent is logged, never fatal: kupd
serves clients whether or not its service manager hears about it.
"""

from __future__ import annotations

import contextlib
import os
import socket
import time

from kupd.log import get_logger

__all__ = ["Notifier", "notifier_from_env"]

log = get_logger("kupd.notify")


class Notifier:
    """Sends notify datagrams to one address (``None``: to nowhere)."""

    def __init__(self, address: str | None, watchdog_usec: int = 0) -> None:
        self.address = address
        #: the unit's WatchdogSec in microseconds (0: no watchdog)
        self.watchdog_usec = watchdog_usec
        self._sock: socket.socket | None = None
        self._failed = False

    @property
    def enabled(self) -> bool:
        return self.address is not None

    def send(self, **fields: str | int) -> bool:
        """Send one datagram of ``KEY=VALUE`` lines (keyword names are the
        keys).  True if it was sent; False without an address or on an
        error, which is logged once per kind of trouble, not per call."""
        if self.address is None:
            return False
        body = "\n".join(f"{k}={_one_line(str(v))}" for k, v in fields.items())
        try:
            if self._sock is None:
                self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
                # a service manager that does not read must not stall kupd
                self._sock.setblocking(False)
            self._sock.sendto(body.encode(), _sockaddr(self.address))
        except OSError as exc:
            if not self._failed:
                self._failed = True
                log.warning(
                    "cannot tell the service manager (NOTIFY_SOCKET)",
                    address=self.address,
                    error=exc.strerror or str(exc),
                    fields=sorted(fields),
                )
            return False
        if self._failed:
            self._failed = False
            log.info("the service manager hears kupd again (NOTIFY_SOCKET)")
        return True

    def ready(self, status: str) -> bool:
        return self.send(READY=1, STATUS=status, MAINPID=os.getpid())

    def reloading(self) -> bool:
        usec = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        return self.send(RELOADING=1, MONOTONIC_USEC=usec, STATUS="reloading the config")

    def stopping(self, status: str) -> bool:
        return self.send(STOPPING=1, STATUS=status)

    def watchdog(self) -> bool:
        return self.send(WATCHDOG=1)

    def close(self) -> None:
        if self._sock is not None:
            with contextlib.suppress(OSError):
                self._sock.close()
            self._sock = None


def _sockaddr(address: str) -> str | bytes:
    # "@name" is the abstract namespace: a leading NUL byte on the wire
    if address.startswith("@"):
        return b"\0" + address[1:].encode()
    return address


def _one_line(value: str) -> str:
    # a field is one line: a newline in a value would start another field
    return value.replace("\n", " ")


def notifier_from_env(environ: dict[str, str] | None = None) -> Notifier:
    """The notifier $NOTIFY_SOCKET asks for (systemd sets it for
    ``Type=notify`` units).  An address kupd cannot use (not a path, not
    ``@abstract``: e.g. a ``vsock:`` one) is logged and ignored.
    ``$WATCHDOG_USEC`` applies only when ``$WATCHDOG_PID`` is unset or is
    kupd's own pid: systemd sets it for the main process, not for what that
    process starts."""
    env = os.environ if environ is None else environ
    address = env.get("NOTIFY_SOCKET", "")
    if not address:
        return Notifier(None)
    if not (address.startswith("/") or address.startswith("@")) or len(address) < 2:
        log.warning(
            "NOTIFY_SOCKET is not a unix socket path or @abstract name: not notifying",
            address=address,
        )
        return Notifier(None)
    watchdog = 0
    pid = env.get("WATCHDOG_PID", "")
    if not pid or pid == str(os.getpid()):
        try:
            watchdog = max(0, int(env.get("WATCHDOG_USEC", "0") or "0"))
        except ValueError:
            log.warning(
                "WATCHDOG_USEC is not a number of microseconds: no watchdog pings",
                value=env.get("WATCHDOG_USEC"),
            )
    return Notifier(address, watchdog)

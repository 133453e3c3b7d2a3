"""The audit log: one JSON line per policy denial and per admin action.

    {"time": "...", "event": "denied", "tenant": "bob", "op": "session",
     "device": "echo", "channel": 40, "rule": "channels"}
    {"time": "...", "event": "admin", "action": "revoke", "lease": "...",
     "tenant": "bob", "device": "echo", "channel": 40, "reason": "..."}

Admin actions: ``revoke`` (lease, tenant, device, channel, reason),
``drain`` / ``undrain`` (device, leases_ended), ``reload`` (via: admin or
SIGHUP; ok; tenants, sessions_ended, applied and needs_restart -- the
changed keys applied and those left for a restart -- or the error when
refused).

Written to the file named by the config key ``audit_log`` (opened for
append, mode 0600, line-buffered; never through a symbolic link at its
name, and only a regular file of one name or a character device such as
/dev/null: kupd.tenants.open_regular) and, always, to kupd's structured
log as an ``audit`` event.  ``channel`` is null when the request named
none.
A config reload re-opens the file (at the new path if ``audit_log``
changed): :meth:`AuditLog.open_file` first, which may refuse, then
:meth:`AuditLog.use`, which cannot fail.  Re-opening at each reload also
lets go of a file that logrotate renamed.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Mapping

from kupd.config import ConfigError
from kupd.log import get_logger
from kupd.tenants import open_regular

__all__ = ["AuditLog"]

log = get_logger("kupd.audit")


class AuditLog:
    def __init__(self, path: str = "") -> None:
        self.path = path
        self._fd = -1
        self._fd = self.open_file(path)
        self.count = 0
        self._write_errno: int | None = None

    @staticmethod
    def open_file(path: str) -> int:
        """Open ``path`` for :meth:`use` (-1 for "": no file).  ConfigError
        naming ``audit_log`` when it cannot be opened."""
        if not path:
            return -1
        try:
            # a link, FIFO or hard link planted at the name is refused, never
            # written through (kupd.tenants.open_regular)
            flags = os.O_WRONLY | os.O_APPEND | os.O_CREAT
            return open_regular(path, flags, 0o600, "audit_log", devices=True)
        except OSError as exc:
            raise ConfigError("audit_log", f"cannot open {path}: {exc.strerror or exc}") from None

    def use(self, path: str, fd: int) -> None:
        """Write to ``fd`` (from :meth:`open_file` of ``path``) from now on;
        the previous file is closed."""
        old, self._fd, self.path = self._fd, fd, path
        if old >= 0:
            os.close(old)

    def denial(
        self,
        tenant: str,
        op: str,
        device: str,
        channel: int | None,
        rule: str,
        unrecorded: int = 0,
    ) -> None:
        """One denial; ``unrecorded``: the tenant's denials left out since its
        last line (kupd.policy's budget of lines per tenant)."""
        self.count += 1
        rec: dict[str, object] = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "event": "denied",
            "tenant": tenant,
            "op": op,
            "device": device,
            "channel": channel,
            "rule": rule,
        }
        if unrecorded:
            rec["unrecorded_before"] = unrecorded
        log.warning("audit", **{k: v for k, v in rec.items() if k not in ("time", "event")})
        self._write(rec)

    def admin(self, action: str, **fields: object) -> None:
        """One line for an action taken through the admin socket (or SIGHUP)."""
        rec: dict[str, object] = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "event": "admin",
            "action": action,
            **fields,
        }
        log.info("audit", **{k: v for k, v in rec.items() if k not in ("time", "event")})
        self._write(rec)

    def _write(self, rec: Mapping[str, object]) -> None:
        if self._fd < 0:
            return
        try:
            # One write(2) of one line with O_APPEND: lines never interleave.
            os.write(self._fd, (json.dumps(rec, sort_keys=True) + "\n").encode())
        except OSError as exc:
            # A full disk must not turn the denial being recorded into an
            # internal error for its client: the denial stands, and the
            # failure is logged once per cause, not once per line.
            if exc.errno != self._write_errno:
                log.error("audit log write failed", path=self.path, error=exc.strerror)
            self._write_errno = exc.errno
        else:
            self._write_errno = None

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

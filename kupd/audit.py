"""The audit log: one JSON line per policy denial and per admin action.

    {"time": "...", "event": "denied", "tenant": "bob", "op": "session",
     "device": "echo", "channel": 40, "rule": "channels"}
    {"time": "...", "event": "denied", "tenant": "carol", "op": "lease",
     "device": "echo", "channel": 9, "rule": "lease-owner",
     "lease": "...", "owner": "alice"}
    {"time": "...", "event": "admin", "action": "revoke", "lease": "...",
     "tenant": "bob", "device": "echo", "channel": 40, "reason": "..."}

Records that could not be written (a full disk), or not to a file anyone
can read (the file, or its directory, was removed: kupd does not write on
into a file with no name), are counted; the next line that can be written
-- after a re-open, for a removed file -- says how many are missing and
since when: ``{"time": "...", "event": "lost", "lost": 12, "since": "..."}``.
A line a full disk cut short is cut off the file again, so the file holds
whole JSON lines only.

A ``lease-owner`` line is a tenant's use of another tenant's live lease
id: the tenant was answered NOT_FOUND as for an id that names no lease;
the line names the lease and its ``owner``.

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

import errno
import json
import os
import stat
import time
from collections.abc import Mapping

from kupd.config import ConfigError
from kupd.log import get_logger
from kupd.tenants import open_regular

__all__ = ["AuditLog"]

log = get_logger("kupd.audit")

#: _error's cause for a file that has no name left (not an errno)
UNREACHABLE = -1
REMOVED = (
    "the audit file was removed (no name left): lines are counted as lost, not "
    "written, until it is re-opened (SIGUSR1 or a reload)"
)


class AuditLog:
    def __init__(self, path: str = "") -> None:
        self.path = path
        self._fd = -1
        self._fd = self.open_file(path)
        self.count = 0
        self._write_errno: int | None = None
        #: records that could not be written since the last one that was
        #: (a full disk); the next line written says so ("event": "lost")
        self.lost = 0
        self._lost_since = ""
        self._cut: int | None = None

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
        the previous file is closed.  Lines lost meanwhile (a full disk, a
        removed file) are said in the log now, and in the file before the
        next line written to it."""
        old, self._fd, self.path = self._fd, fd, path
        if old >= 0:
            os.close(old)
        if self.lost and fd >= 0:
            log.warning(
                "audit log re-opened after lines were lost: the next line written says "
                "how many",
                path=path,
                lost=self.lost,
                since=self._lost_since,
            )
        self._write_errno = None

    def reachable(self) -> bool:
        """Whether the file written to still has a name (True: no file, or
        not a regular one)."""
        if self._fd < 0:
            return True
        try:
            st = os.fstat(self._fd)
        except OSError:
            return False
        return not (stat.S_ISREG(st.st_mode) and st.st_nlink == 0)

    def denial(
        self,
        tenant: str,
        op: str,
        device: str,
        channel: int | None,
        rule: str,
        unrecorded: int = 0,
        **extra: str,
    ) -> None:
        """One denial; ``unrecorded``: the tenant's denials left out since its
        last line (kupd.policy's budget of lines per tenant); ``extra``: more
        fields (rule lease-owner: ``lease`` and its ``owner`` tenant)."""
        self.count += 1
        rec: dict[str, object] = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "event": "denied",
            "tenant": tenant,
            "op": op,
            "device": device,
            "channel": channel,
            "rule": rule,
            **extra,
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
        text = json.dumps(rec, sort_keys=True) + "\n"
        if self.lost:
            # the first record written after a failure comes after a line
            # saying what is missing, in the same write: both or neither
            gap = {
                "time": rec["time"],
                "event": "lost",
                "lost": self.lost,
                "since": self._lost_since,
            }
            text = json.dumps(gap, sort_keys=True) + "\n" + text
        if not self._append(text):
            if not self.lost:
                self._lost_since = str(rec["time"])
            self.lost += 1
        elif self.lost:
            log.info("audit log written again", path=self.path, lost=self.lost)
            self.lost = 0

    def _append(self, line: str) -> bool:
        """One write(2) of whole lines with O_APPEND (lines never
        interleave); False when they did not all get there.  A line cut
        short by a full disk is cut off again, so that the file holds whole
        JSON lines only and the next one does not run on from a fragment."""
        data = line.encode()
        try:
            st = os.fstat(self._fd)
            if stat.S_ISREG(st.st_mode) and st.st_nlink == 0:
                # the file was removed (its directory too, perhaps): a line
                # written there is one nobody can read -- counted as lost,
                # and said so in the file a re-open (SIGUSR1, a reload)
                # gets to, as for a full disk
                self._error(UNREACHABLE, REMOVED)
                return False
            if self._cut is not None:  # a fragment that could not be removed
                os.write(self._fd, b"\n")
                self._cut = None
                st = os.fstat(self._fd)
            end = st.st_size
            n = os.write(self._fd, data)
        except OSError as exc:
            self._error(exc.errno, exc.strerror or str(exc))
            return False
        if n == len(data):
            self._write_errno = None
            return True
        try:
            os.ftruncate(self._fd, end)
        except OSError:
            self._cut = end  # end it with a newline before the next line
        self._error(errno.ENOSPC, f"short write ({n} of {len(data)} bytes)")
        return False

    def _error(self, code: int | None, why: str) -> None:
        # A full disk must not turn the denial being recorded into an
        # internal error for its client: the denial stands, and the failure
        # is logged once per cause, not once per line.
        if code != self._write_errno:
            log.error("audit log write failed", path=self.path, error=why)
        self._write_errno = code

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

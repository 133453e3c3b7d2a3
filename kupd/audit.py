"""The audit log: one JSON line per policy denial.

    {"time": "...", "event": "denied", "tenant": "bob", "op": "session",
     "device": "echo", "channel": 40, "rule": "channels"}

Written to the file named by the config key ``audit_log`` (opened for
append, mode 0600, line-buffered) and, always, to kupd's structured log
as an ``audit`` event.  ``channel`` is null when the request named none.
"""

from __future__ import annotations

import json
import os
import time

from kupd.log import get_logger

__all__ = ["AuditLog"]

log = get_logger("kupd.audit")


class AuditLog:
    def __init__(self, path: str = "") -> None:
        self.path = path
        self._fd = -1
        if path:
            self._fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600)
        self.count = 0

    def denial(self, tenant: str, op: str, device: str, channel: int | None, rule: str) -> None:
        self.count += 1
        rec = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "event": "denied",
            "tenant": tenant,
            "op": op,
            "device": device,
            "channel": channel,
            "rule": rule,
        }
        log.warning("audit", **{k: v for k, v in rec.items() if k not in ("time", "event")})
        if self._fd >= 0:
            # One write(2) of one line with O_APPEND: lines never interleave.
            os.write(self._fd, (json.dumps(rec, sort_keys=True) + "\n").encode())

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

"""What native code writes to kupd's stderr -- gRPC core's own log lines
above all -- passed on under a budget.

gRPC core logs on file descriptor 2 by itself, below kupd's Python: no
tenant, no budget.  Some of its lines a client causes at will, one per
request: a request whose header block passes gRPC's metadata limit with
many fields is refused with a summary of them, too long for the trailers,
and gRPC's encoder logs ``Ignoring key value pair due to size limit`` --
measured, a tenant wrote 53 KB a second of such lines into kupd's log on
one connection (a disk filled at ~4.5 GB a day), where kupd's own lines
are budgeted per tenant (kupd.policy.Budget).

So kupd points descriptor 2 at a pipe and a thread of its own passes the
lines on to the log kupd was started with: ``NATIVE_LINES_BURST`` at once,
then ``NATIVE_LINES_PER_SECOND``; the rest are counted and said in a JSON
line, ``native log lines left out`` with ``left_out``, before the next
line passed on (or after a second without any).  kupd's Python (its
structured log, tracebacks, warnings) writes to the original stream
directly, never through the pipe: sys.stderr is re-opened on it.
"""

from __future__ import annotations

import os
import select
import sys
import threading
import time
from typing import IO

from kupd.log import get_logger

__all__ = [
    "NATIVE_LINES_BURST",
    "NATIVE_LINES_PER_SECOND",
    "NATIVE_LINE_MAX",
    "NativeStderr",
]

log = get_logger("kupd.nativelog")

#: Native log lines passed on at once, then per second (kupd's audit lines
#: have the same budget per tenant: kupd.policy.AUDIT_DENIALS_*)
NATIVE_LINES_BURST = 100.0
NATIVE_LINES_PER_SECOND = 10.0
#: The longest native line passed on whole (bytes); a longer one is cut
#: there, marked with "...".
NATIVE_LINE_MAX = 4096
#: How long the pipe may stay quiet before lines left out are said (s).
_QUIET = 1.0


def _flush(stream: IO[str] | None) -> None:
    try:
        if stream is not None:
            stream.flush()
    except (OSError, ValueError):
        pass  # its reader gone: kupd.log._Sink drops such lines too


class NativeStderr:
    """Descriptor 2 through a pipe read by a thread of its own, which
    writes what it reads to the stream kupd was started with under a
    budget.  start() once, stop() at exit (what is still in the pipe is
    passed on, budget permitting)."""

    def __init__(
        self, burst: float = NATIVE_LINES_BURST, rate: float = NATIVE_LINES_PER_SECOND
    ) -> None:
        self.burst = burst
        self.rate = rate
        self.left_out = 0  # lines not passed on and not said yet
        self._tokens = burst
        self._stamp = time.monotonic()
        self._out = -1  # the original stderr, duplicated
        self._thread: threading.Thread | None = None
        self._python: IO[str] | None = None
        self._prior: IO[str] | None = None

    def start(self) -> None:
        """Point descriptor 2 at the pipe (and Python's sys.stderr at the
        original stream); start the thread."""
        if self._thread is not None:
            return
        if sys.stderr is None:
            # Python started without a descriptor 2: nothing to pass lines
            # on to, and what holds descriptor 2 by now is something kupd
            # opened since (a socket, a file), not to be replaced
            return
        _flush(sys.stderr)
        try:
            self._out = os.dup(2)
        except OSError:
            return  # closed since: nothing to pass lines on to
        read, write = os.pipe()
        os.dup2(write, 2)
        os.close(write)
        # kupd's own writes go on as before, and not through the budget
        self._python = open(self._out, "w", buffering=1, errors="backslashreplace", closefd=False)
        self._prior = sys.stderr
        sys.stderr = self._python
        self._thread = threading.Thread(
            target=self._forward, args=(read,), name="kupd-native-log", daemon=True
        )
        self._thread.start()

    def stop(self, timeout: float = 1.0) -> None:
        """Descriptor 2 back to the original stream: the pipe's last writer
        is gone, so the thread passes on what is left and ends."""
        if self._thread is None:
            return
        _flush(sys.stderr)
        os.dup2(self._out, 2)
        self._thread.join(timeout)
        self._thread = None
        if sys.stderr is self._python and self._prior is not None:
            sys.stderr = self._prior
        if self._python is not None:
            # a stream whose reader went away keeps what it could not
            # write: dropped here, not raised at exit (kupd.log._Sink)
            try:
                self._python.close()
            except (OSError, ValueError):
                pass

    def _allowed(self) -> bool:
        now = time.monotonic()
        self._tokens = min(self.burst, self._tokens + (now - self._stamp) * self.rate)
        self._stamp = now
        if self._tokens < 1.0:
            return False
        self._tokens -= 1.0
        return True

    def _write(self, data: bytes) -> None:
        try:
            while data:
                data = data[os.write(self._out, data) :]
        except OSError:
            pass  # nowhere left to write (kupd.log._Sink: the same)

    def _say_left_out(self) -> None:
        n, self.left_out = self.left_out, 0
        log.warning(
            "native log lines left out",
            left_out=n,
            why=f"more than {self.burst:g} at once, then {self.rate:g} a second, "
            "from gRPC core or other native code",
        )

    def _line(self, line: bytes) -> None:
        if not self._allowed():
            self.left_out += 1
            return
        if self.left_out:
            self._say_left_out()
        if len(line) > NATIVE_LINE_MAX:
            line = line[:NATIVE_LINE_MAX] + b"...\n"
        self._write(line)

    def _forward(self, fd: int) -> None:
        pending = b""
        try:
            while True:
                ready, _, _ = select.select([fd], [], [], _QUIET)
                if not ready:
                    # quiet for a while: say what was left out, if the
                    # budget allows a line again
                    if self.left_out and self._allowed():
                        self._say_left_out()
                    continue
                chunk = os.read(fd, 65536)
                if not chunk:
                    break
                pending += chunk
                while b"\n" in pending:
                    line, pending = pending.split(b"\n", 1)
                    self._line(line + b"\n")
                if len(pending) > NATIVE_LINE_MAX:
                    self._line(pending + b"\n")
                    pending = b""
            if pending:
                self._line(pending + b"\n")
            if self.left_out:
                self._say_left_out()
        except Exception:
            # keep the pipe drained: a thread that stopped reading would
            # stall every gRPC thread that logs
            while True:
                try:
                    if not os.read(fd, 65536):
                        break
                except OSError:
                    break
        finally:
            os.close(fd)

"""What native code writes to kupd's stderr -- gRPC core's own log lines
above all -- passed on under a budget, by a helper process.

gRPC core logs on file descriptor 2 by itself, below kupd's Python: no
tenant, no budget.  Some of its lines a client causes at will, one per
request: a request whose header block passes gRPC's metadata limit with
many fields is refused with a summary of them, too long for the trailers,
and gRPC's encoder logs ``Ignoring key value pair due to size limit`` --
measured, a tenant wrote 53 KB a second of such lines into kupd's log on
one connection (a disk filled at ~4.5 GB a day), where kupd's own lines
are budgeted per tenant (kupd.policy.Budget).

So kupd points descriptor 2 at a pipe read by a small process of its own,
``python -m kupd.nativelog`` (``ps`` shows it as kupd's child), which
passes the lines on to the log kupd was started with:
``NATIVE_LINES_BURST`` at once, then ``NATIVE_LINES_PER_SECOND``; the
rest are counted and said in a JSON line, ``native log lines left out``
with ``left_out``, before the next line passed on (or after a second
without any).

A process, not a thread of kupd's: what native code writes as it crashes
the process (a gRPC assertion, abort(), a sanitizer's report, Python's
"Fatal Python error") is in the pipe when kupd dies, and a thread would
die with it before passing it on -- the one message an operator needs.
The helper reads on until end of file, which comes only when every
holder of the pipe's write end (kupd) is gone, however it went.  And the
budget does not cost those lines either: the helper keeps the last
``NATIVE_RING`` lines it left out, and at end of file passes them on
after a ``native log lines left out`` line with ``last`` (how many
follow).  It ignores SIGINT, SIGTERM, SIGHUP and SIGPIPE, and runs in a
process group of its own: a ^C at a terminal, or a signal to kupd's
group, ends kupd, whose end is the helper's.

kupd's Python (its structured log, tracebacks, warnings) writes to the
original stream directly, never through the pipe: sys.stderr is re-opened
on it.  This module imports only the standard library at the top: the
helper starts a fresh interpreter that needs nothing of kupd's.
"""

from __future__ import annotations

import argparse
import collections
import datetime
import json
import os
import select
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from typing import IO

__all__ = [
    "NATIVE_LINES_BURST",
    "NATIVE_LINES_PER_SECOND",
    "NATIVE_LINE_MAX",
    "NATIVE_RING",
    "NativeStderr",
]

#: Native log lines passed on at once, then per second (kupd's audit lines
#: have the same budget per tenant: kupd.policy.AUDIT_DENIALS_*)
NATIVE_LINES_BURST = 100.0
NATIVE_LINES_PER_SECOND = 10.0
#: The longest native line passed on whole (bytes); a longer one is cut
#: there, marked with "...".
NATIVE_LINE_MAX = 4096
#: The last lines left out that are passed on at the end all the same
#: (a crash's last words: an abort's message, a sanitizer's report).
NATIVE_RING = 20
#: How long the pipe may stay quiet before lines left out are said (s).
_QUIET = 1.0
#: How long kupd's stop waits for the helper to pass on what is left (s).
_STOP_WAIT = 2.0
_LOGGER = "kupd.nativelog"


def _flush(stream: IO[str] | None) -> None:
    try:
        if stream is not None:
            stream.flush()
    except (OSError, ValueError):
        pass  # its reader gone: kupd.log._Sink drops such lines too


class NativeStderr:
    """Descriptor 2 through a pipe read by a helper process
    (``python -m kupd.nativelog``), which writes what it reads to the
    stream kupd was started with under a budget.  start() once, stop() at
    exit.  If the helper cannot be started, descriptor 2 is left as it
    was and :attr:`failed` says why (kupd logs it once it has a log)."""

    def __init__(
        self, burst: float = NATIVE_LINES_BURST, rate: float = NATIVE_LINES_PER_SECOND
    ) -> None:
        self.burst = burst
        self.rate = rate
        #: why the helper was not started ("" when it was, or not tried)
        self.failed = ""
        self.proc: subprocess.Popen[bytes] | None = None
        self._out = -1  # the original stderr, duplicated
        self._python: IO[str] | None = None
        self._prior: IO[str] | None = None

    def start(self) -> None:
        """Start the helper on the pipe's read end, point descriptor 2 at
        its write end (and Python's sys.stderr at the original stream)."""
        if self.proc is not None:
            return
        if sys.stderr is None:
            # Python started without a descriptor 2: nothing to pass lines
            # on to, and what holds descriptor 2 by now is something kupd
            # opened since (a socket, a file), not to be replaced
            return
        _flush(sys.stderr)
        try:
            out = os.dup(2)
        except OSError:
            return  # closed since: nothing to pass lines on to
        read, write = os.pipe()  # neither inherited by kupd's children
        env = dict(os.environ)
        # the helper imports this very module, wherever kupd was loaded from
        env["PYTHONPATH"] = os.pathsep.join(p for p in sys.path if p)
        try:
            self.proc = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "kupd.nativelog",
                    f"--burst={self.burst:g}",
                    f"--rate={self.rate:g}",
                ],
                stdin=read,
                stdout=subprocess.DEVNULL,
                stderr=out,
                close_fds=True,  # no socket or file of kupd's, nor the write end
                env=env,
                # a ^C (SIGINT to the terminal's foreground group) or a
                # signal to kupd's group goes to kupd, not to the helper
                process_group=0,
            )
        except (OSError, subprocess.SubprocessError) as exc:
            os.close(read)
            os.close(write)
            os.close(out)
            self.failed = f"{sys.executable} -m kupd.nativelog: {exc}"
            return
        os.close(read)
        self._out = out
        os.dup2(write, 2)  # inheritable: kupd's children write there too
        os.close(write)
        # kupd's own writes go on as before, and not through the budget
        self._python = open(out, "w", buffering=1, errors="backslashreplace", closefd=False)
        self._prior = sys.stderr
        sys.stderr = self._python

    def stop(self, timeout: float = _STOP_WAIT) -> None:
        """Descriptor 2 back to the original stream: the pipe's last writer
        is gone, so the helper passes on what is left and ends; it is
        waited for ``timeout`` seconds, then killed, and reaped."""
        proc, self.proc = self.proc, None
        if proc is None:
            return
        _flush(sys.stderr)
        os.dup2(self._out, 2)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            # a child of kupd's still holds the pipe (or the helper hangs):
            # it must not outlive kupd
            proc.kill()
            proc.wait()
        if sys.stderr is self._python and self._prior is not None:
            sys.stderr = self._prior
        if self._python is not None:
            # a stream whose reader went away keeps what it could not
            # write: dropped here, not raised at exit (kupd.log._Sink)
            try:
                self._python.close()
            except (OSError, ValueError):
                pass
        os.close(self._out)
        self._out = -1


class _Forwarder:
    """The helper's work: lines from ``src`` to ``out`` under the budget."""

    def __init__(self, out: int, burst: float, rate: float, ring: int = NATIVE_RING) -> None:
        self.out = out
        self.burst = burst
        self.rate = rate
        self.left_out = 0  # lines left out and not counted in a line yet
        #: the last lines left out, each with whether it was counted already
        self.ring: collections.deque[tuple[bytes, bool]] = collections.deque(maxlen=ring)
        self._tokens = burst
        self._stamp = time.monotonic()

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
                data = data[os.write(self.out, data) :]
        except OSError:
            pass  # nowhere left to write (kupd.log._Sink: the same)

    def _say(self, left_out: int, **more: object) -> None:
        """A JSON line as kupd's log writes them (kupd.log)."""
        now = datetime.datetime.now(datetime.UTC)
        fields: dict[str, object] = {
            "event": "native log lines left out",
            "left_out": left_out,
            "level": "warning",
            "logger": _LOGGER,
            "timestamp": now.isoformat().replace("+00:00", "Z"),
            "why": f"more than {self.burst:g} at once, then {self.rate:g} a second, "
            "from gRPC core or other native code",
            **more,
        }
        self._write(json.dumps(fields, sort_keys=True).encode() + b"\n")

    def _say_left_out(self) -> None:
        n, self.left_out = self.left_out, 0
        self.ring = collections.deque(((line, True) for line, _ in self.ring), self.ring.maxlen)
        self._say(n)

    def line(self, line: bytes) -> None:
        if len(line) > NATIVE_LINE_MAX:
            line = line[:NATIVE_LINE_MAX] + b"...\n"
        if not self._allowed():
            self.left_out += 1
            self.ring.append((line, False))
            return
        if self.left_out:
            self._say_left_out()
        self._write(line)

    def quiet(self) -> None:
        """The pipe was quiet a while: say what was left out, if the budget
        allows a line again."""
        if self.left_out and self._allowed():
            self._say_left_out()

    def end(self) -> None:
        """End of file: the writers are gone (kupd stopped, or died).  The
        last lines left out are passed on now, after a line that counts
        the rest."""
        if not self.ring:
            if self.left_out:
                self._say_left_out()
            return
        fresh = sum(not counted for _, counted in self.ring)
        self._say(
            self.left_out - fresh,
            last=len(self.ring),
            last_counted_before=len(self.ring) - fresh,
        )
        self._write(b"".join(line for line, _ in self.ring))
        self.left_out = 0
        self.ring.clear()

    def run(self, fd: int) -> None:
        pending = b""
        try:
            while True:
                ready, _, _ = select.select([fd], [], [], _QUIET)
                if not ready:
                    self.quiet()
                    continue
                chunk = os.read(fd, 65536)
                if not chunk:
                    break
                pending += chunk
                while b"\n" in pending:
                    line, pending = pending.split(b"\n", 1)
                    self.line(line + b"\n")
                if len(pending) > NATIVE_LINE_MAX:
                    self.line(pending + b"\n")
                    pending = b""
            if pending:
                self.line(pending + b"\n")
            self.end()
        except Exception:
            # keep the pipe drained: a reader that stopped reading would
            # stall every gRPC thread that logs
            while True:
                try:
                    if not os.read(fd, 65536):
                        break
                except OSError:
                    break


def main(argv: Sequence[str] | None = None) -> int:
    """The helper: standard input (the pipe) to standard error (kupd's
    original stream) under the budget, until end of file."""
    # kupd's end is the helper's: never a signal's (SIGPIPE: Python's
    # default already, a write to a gone reader is an error, dropped)
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGPIPE):
        signal.signal(sig, signal.SIG_IGN)
    p = argparse.ArgumentParser(
        prog="python -m kupd.nativelog",
        description="kupd's helper: native log lines from stdin to stderr under a budget",
    )
    p.add_argument("--burst", type=float, default=NATIVE_LINES_BURST)
    p.add_argument("--rate", type=float, default=NATIVE_LINES_PER_SECOND)
    p.add_argument("--ring", type=int, default=NATIVE_RING)
    args = p.parse_args(argv)
    _Forwarder(2, args.burst, args.rate, args.ring).run(0)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Helper processes of a benchmark run: start, wait until ready, stop, inspect.

Every process started here is stopped by the same object (context manager),
by its own pid, with SIGTERM then SIGKILL after a grace period.
"""

from __future__ import annotations

import os
import select
import signal
import subprocess
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from types import TracebackType
from typing import IO

__all__ = ["BenchError", "Proc", "cpu_seconds", "rss_bytes", "run_ns", "wait_for"]


class BenchError(RuntimeError):
    """A benchmark could not run (missing program, helper died, bad reply...)."""


def wait_for(cond: Callable[[], bool], what: str, timeout: float = 20.0,
             proc: subprocess.Popen[bytes] | None = None) -> None:
    """Poll ``cond`` until true; BenchError naming ``what`` on timeout or if
    ``proc`` exits first."""
    deadline = time.monotonic() + timeout
    while not cond():
        if proc is not None and proc.poll() is not None:
            raise BenchError(f"{what}: process exited with status {proc.returncode} first")
        if time.monotonic() > deadline:
            raise BenchError(f"{what}: not ready after {timeout:.0f} s")
        time.sleep(0.02)


class Proc:
    """A child process; ``ready_line`` (if given) must appear on its stdout,
    ``ready_path`` (if given) must come to exist, before ``start`` returns."""

    def __init__(
        self,
        argv: Sequence[str],
        *,
        name: str,
        env: dict[str, str] | None = None,
        cwd: Path | None = None,
        ready_line: str | None = None,
        ready_path: Path | None = None,
        log: Path | None = None,
        timeout: float = 20.0,
    ) -> None:
        self.argv = [str(a) for a in argv]
        self.name = name
        self.env = env
        self.cwd = cwd
        self.ready_line = ready_line
        self.ready_path = ready_path
        self.log = log
        self.timeout = timeout
        self.proc: subprocess.Popen[bytes] | None = None
        self._logf: IO[bytes] | None = None

    @property
    def pid(self) -> int:
        if self.proc is None:
            raise BenchError(f"{self.name}: not started")
        return self.proc.pid

    def start(self) -> Proc:
        if self.proc is not None:
            raise BenchError(f"{self.name}: started twice")
        full_env = dict(os.environ)
        if self.env:
            full_env.update(self.env)
        stderr_target: int | IO[bytes] = subprocess.DEVNULL
        if self.log is not None:
            self.log.parent.mkdir(parents=True, exist_ok=True)
            logf = open(self.log, "ab")  # closed in stop()
            self._logf = logf
            stderr_target = logf
        try:
            self.proc = subprocess.Popen(
                self.argv,
                env=full_env,
                cwd=self.cwd,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE if self.ready_line is not None else stderr_target,
                stderr=stderr_target,
            )
        except OSError as exc:
            raise BenchError(f"{self.name}: cannot start {self.argv[0]}: {exc}") from exc
        try:
            if self.ready_line is not None:
                self._wait_line(self.ready_line)
            if self.ready_path is not None:
                path = self.ready_path
                wait_for(path.exists, f"{self.name}: {path}", self.timeout, self.proc)
        except BaseException:
            self.stop()
            raise
        return self

    def _wait_line(self, want: str) -> None:
        assert self.proc is not None and self.proc.stdout is not None
        fd = self.proc.stdout.fileno()
        deadline = time.monotonic() + self.timeout
        buf = b""
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise BenchError(f"{self.name}: no {want!r} line after {self.timeout:.0f} s")
            r, _, _ = select.select([fd], [], [], left)
            if not r:
                continue
            chunk = os.read(fd, 4096)
            if not chunk:
                raise BenchError(f"{self.name}: exited (status {self.proc.wait()}) "
                                 f"before printing {want!r}")
            buf += chunk
            if want.encode() in buf.splitlines():
                return

    def stop(self, grace: float = 5.0) -> None:
        p = self.proc
        if p is not None and p.poll() is None:
            p.send_signal(signal.SIGTERM)
            try:
                p.wait(grace)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        if p is not None and p.stdout is not None:
            p.stdout.close()
        logf = self._logf
        if logf is not None:
            logf.close()
            self._logf = None

    def __enter__(self) -> Proc:
        return self if self.proc is not None else self.start()

    def __exit__(self, et: type[BaseException] | None, ev: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()


def cpu_seconds(pid: int) -> float:
    """utime + stime of ``pid`` (all its threads) from /proc/<pid>/stat, in seconds."""
    raw = Path(f"/proc/{pid}/stat").read_text()
    # comm may contain spaces and parentheses: split after the last ')'.
    fields = raw[raw.rindex(")") + 2:].split()
    utime, stime = int(fields[11]), int(fields[12])  # fields 14 and 15 of stat(5)
    return (utime + stime) / os.sysconf("SC_CLK_TCK")


def run_ns(pid: int) -> int:
    """Nanoseconds on CPU of every thread of ``pid`` (sum of
    /proc/<pid>/task/*/schedstat field 1): finer than utime+stime's ticks.
    Threads that exited since the last call are not counted."""
    total = 0
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            total += int((task / "schedstat").read_text().split()[0])
        except (OSError, ValueError, IndexError):
            continue  # the thread exited meanwhile
    return total


def rss_bytes(pid: int) -> int:
    """VmRSS of ``pid`` from /proc/<pid>/status, in bytes."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            parts = line.split()
            if len(parts) != 3 or parts[2] != "kB":
                raise BenchError(f"unexpected VmRSS line for pid {pid}: {line!r}")
            return int(parts[1]) * 1024
    raise BenchError(f"no VmRSS for pid {pid}")

"""The native baselines: C programs (bench/c) and the Python unix-socket client.

* ``c_trial``: run one C ping-pong program (kup_floor or uds_pingpong) for one
  trial; it prints one round-trip time in ns per line.
* ``UdsClient``: a Python client of ``uds_pingpong -S`` (a C echo process),
  the syscall alternative for the Python channel layer: same process layout
  (Python client process <-> C echo process), same payloads.
"""

from __future__ import annotations

import asyncio
import socket
import subprocess
import time
from pathlib import Path

from .procs import BenchError, Proc

__all__ = ["MIB", "UdsClient", "build_c", "c_trial", "start_uds_server"]

MIB = 1024.0 * 1024.0


def build_c(root: Path, target: str) -> Path:
    """Build bench/c target ``target`` ("uds" or "floor"); the program's path."""
    prog = {"uds": "uds_pingpong", "floor": "kup_floor"}[target]
    r = subprocess.run(["make", "-s", "-C", str(root / "bench" / "c"), target],
                       capture_output=True, text=True, check=False)
    if r.returncode != 0:
        raise BenchError(f"building bench/c {target} failed: {(r.stderr or r.stdout).strip()}")
    return root / "bench" / "out" / prog


async def c_trial(argv: list[str], env: dict[str, str] | None, what: str,
                  timeout: float = 120.0) -> dict[str, list[float]]:
    """One trial of a C ping-pong program; samples in microseconds."""
    proc = await asyncio.create_subprocess_exec(
        *argv, env=env, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    try:
        out, err = await asyncio.wait_for(proc.communicate(), timeout)
    except TimeoutError as exc:
        proc.kill()
        await proc.wait()
        raise BenchError(f"{what}: no result after {timeout:.0f} s") from exc
    if proc.returncode != 0:
        raise BenchError(f"{what}: exit status {proc.returncode}: "
                         f"{err.decode(errors='replace').strip()}")
    samples = [int(x) / 1000.0 for x in out.split()]
    if not samples:
        raise BenchError(f"{what}: printed no samples")
    return {"": samples}


def start_uds_server(prog: Path, sock: Path, size: int, log: Path) -> Proc:
    return Proc([str(prog), "-S", "-d", str(sock), "-s", str(size)],
                name=f"uds echo ({size} B)", ready_line="ready", log=log).start()


class UdsClient:
    """Blocking Python client of a ``uds_pingpong -S`` echo process."""

    def __init__(self, sock: Path, size: int) -> None:
        self.size = size
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.connect(str(sock))
        self.buf = bytearray(size)
        self.view = memoryview(self.buf)

    def rt(self, data: bytes) -> None:
        self.sock.sendall(data)
        got = 0
        while got < self.size:
            n = self.sock.recv_into(self.view[got:])
            if n == 0:
                raise BenchError("uds echo closed the connection")
            got += n

    def latency(self, data: bytes, n: int) -> dict[str, list[float]]:
        if len(data) != self.size:
            raise BenchError(f"uds client: payload {len(data)} B, server echoes {self.size} B")
        lat: list[float] = []
        for _ in range(n):
            t0 = time.perf_counter_ns()
            self.rt(data)
            lat.append((time.perf_counter_ns() - t0) / 1000.0)
        if bytes(self.buf) != data:
            raise BenchError("uds client: echo mismatch")
        return {"": lat}

    def throughput(self, data: bytes, count: int) -> dict[str, list[float]]:
        """Ping-pong of ``count`` messages (the channel's turn discipline)."""
        t0 = time.perf_counter()
        for _ in range(count):
            self.rt(data)
        dt = time.perf_counter() - t0
        if bytes(self.buf) != data:
            raise BenchError("uds client: echo mismatch")
        return {"": [len(data) * count / MIB / dt]}

    def close(self) -> None:
        self.sock.close()

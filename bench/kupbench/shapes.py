"""Workload shapes shared by every gRPC-facing system under test.

A system under test provides ``Echoer`` objects; the shapes below (latency,
throughput, concurrency) are the same code for the bare gRPC echo server and
for kupd, so a ratio between them compares the servers, not the clients.
"""

from __future__ import annotations

import asyncio
import sys
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Protocol

from .procs import BenchError

__all__ = [
    "Echoer",
    "check_echo",
    "concurrent_trial",
    "latency_trial",
    "pattern",
    "pump_trial",
    "stamp_latency_us",
    "stamp_request",
]

MIB = 1024.0 * 1024.0


class Echoer(Protocol):
    """One client of an echo service."""

    async def rt(self, data: bytes) -> bytes:
        """One round trip: ``data`` out, the echo back."""
        ...

    async def pump(self, data: bytes, count: int) -> int:
        """Send ``count`` copies of ``data`` as fast as the stream allows while
        reading the echoes; returns the echoed bytes received."""
        ...

    async def close(self) -> None:
        ...


def pattern(size: int) -> bytes:
    """A payload of ``size`` bytes with no ASCII a-z: the echo module upper-cases
    a-z on odd channels, so such a payload comes back unchanged on any channel."""
    return (bytes(range(96)) * (size // 96 + 1))[:size]


def check_echo(sent: bytes, got: bytes, what: str) -> None:
    if got != sent:
        raise BenchError(f"{what}: echo mismatch ({len(got)} bytes back for {len(sent)} sent)")


async def latency_trial(e: Echoer, data: bytes, n: int, what: str) -> dict[str, list[float]]:
    """``n`` sequential round trips; samples are microseconds per round trip."""
    lat: list[float] = []
    for _ in range(n):
        t0 = time.perf_counter_ns()
        got = await e.rt(data)
        lat.append((time.perf_counter_ns() - t0) / 1000.0)
        check_echo(data, got, what)
    return {"": lat}


async def pump_trial(e: Echoer, data: bytes, count: int, what: str) -> dict[str, list[float]]:
    """One throughput sample: MiB/s of echoed payload over the trial."""
    t0 = time.perf_counter()
    got = await e.pump(data, count)
    dt = time.perf_counter() - t0
    if got != len(data) * count:
        raise BenchError(f"{what}: {got} bytes echoed, expected {len(data) * count}")
    return {"": [got / MIB / dt]}


async def concurrent_trial(
    clients: Sequence[Callable[[bytes], Awaitable[bytes]]],
    data: bytes,
    n_each: int,
    what: str,
) -> dict[str, list[float]]:
    """Every client (a round-trip function, e.g. ``Echoer.rt``) does ``n_each``
    sequential round trips, all clients at once.

    Samples: "rate" = aggregate round trips per second for the trial (one
    sample); "lat" = microseconds of every single round trip (pooled)."""
    lat: list[float] = []

    async def one(rt: Callable[[bytes], Awaitable[bytes]]) -> None:
        for _ in range(n_each):
            t0 = time.perf_counter_ns()
            got = await rt(data)
            lat.append((time.perf_counter_ns() - t0) / 1000.0)
            check_echo(data, got, what)

    t0 = time.perf_counter()
    await asyncio.gather(*(one(c) for c in clients))
    dt = time.perf_counter() - t0
    return {"rate": [len(clients) * n_each / dt], "lat": lat}


def stamp_request(idle_ms: int, size: int = 64) -> bytes:
    """echo's b"!stamp<ms>": answered idle_ms later, its last 8 bytes the
    module's CLOCK_MONOTONIC at the hand-over (kmod/examples/echo)."""
    return (b"!stamp%d" % idle_ms).ljust(size, b".")


def stamp_latency_us(reply: bytes, now_ns: int) -> float:
    """How long the stamped reply took from the module's hand-over to now_ns."""
    return (now_ns - int.from_bytes(reply[-8:], sys.byteorder)) / 1000.0

"""Client side of the bare gRPC echo server (kupbench.grpc_echo) and of the
hop floor (kupbench.grpc_hop: the same methods, one channel hop per message)."""

from __future__ import annotations

import asyncio
import contextlib
import os
import sys
from pathlib import Path
from typing import Any

import grpc

from .grpc_echo import BIDI, GRPC_OPTIONS, UNARY
from .procs import BenchError, Proc

__all__ = ["BareBidi", "BareUnary", "bare_channel", "start_bare_server", "start_hop_server"]


def start_bare_server(sock: Path, log: Path, kup_call: bool = False) -> Proc:
    """Start the bare echo server process (caller stops it); with ``kup_call``
    it also answers kup.v1 Call (protobuf messages) as an echo."""
    here = Path(__file__).resolve().parent.parent
    kupapi_dir = here.parent / "clients" / "python"  # kup.v1's messages (kup_call)
    return Proc(
        [sys.executable, "-m", "kupbench.grpc_echo", "--socket", str(sock),
         *(["--kup-call"] if kup_call else [])],
        name="bare grpc echo server" + (" (kup.v1 Call)" if kup_call else ""),
        env={"PYTHONPATH": os.pathsep.join([str(here), str(kupapi_dir)])},
        ready_line="ready",
        log=log,
    ).start()


def start_hop_server(sock: Path, log: Path, device: str, unary_channels: int,
                     kup_v1: bool = False) -> Proc:
    """Start the hop-floor server (kupbench.grpc_hop) in front of the kupsim
    echo device ``device`` (caller stops it); ``kup_v1``: kup.v1 Session and
    Call too."""
    here = Path(__file__).resolve().parent.parent
    root = here.parent  # kupd's channel layer; kupapi for kup.v1's messages
    return Proc(
        [sys.executable, "-m", "kupbench.grpc_hop", "--socket", str(sock), "--device", device,
         "--unary-channels", str(unary_channels), *(["--kup-v1"] if kup_v1 else [])],
        name="hop-floor server (bare grpc.aio + one channel hop)",
        env={"PYTHONPATH": os.pathsep.join([str(here), str(root),
                                            str(root / "clients" / "python")])},
        ready_line="ready",
        log=log,
    ).start()


def bare_channel(sock: Path) -> grpc.aio.Channel:
    return grpc.aio.insecure_channel(f"unix:{sock}", options=GRPC_OPTIONS)


class BareUnary:
    """Round trips as unary calls."""

    def __init__(self, channel: grpc.aio.Channel) -> None:
        self._call: Any = channel.unary_unary(UNARY)

    async def rt(self, data: bytes) -> bytes:
        reply: bytes = await self._call(data)
        return reply

    async def pump(self, data: bytes, count: int) -> int:
        raise BenchError("unary echo has no stream to pump")

    async def close(self) -> None:
        return None


class BareBidi:
    """Round trips on one long-lived bidi stream."""

    def __init__(self, channel: grpc.aio.Channel) -> None:
        self._channel = channel
        self._stream: Any = channel.stream_stream(BIDI)()

    async def rt(self, data: bytes) -> bytes:
        await self._stream.write(data)
        reply = await self._stream.read()
        if reply is grpc.aio.EOF:
            raise BenchError("bare bidi: stream ended")
        return bytes(reply)

    async def pump(self, data: bytes, count: int) -> int:
        """Writer and reader run concurrently on a fresh stream."""
        stream: Any = self._channel.stream_stream(BIDI)()

        async def writer() -> None:
            for _ in range(count):
                await stream.write(data)
            await stream.done_writing()

        got = 0
        wtask = asyncio.create_task(writer())
        try:
            for _ in range(count):
                reply = await stream.read()
                if reply is grpc.aio.EOF:
                    raise BenchError("bare pump: stream ended early")
                got += len(reply)
            await wtask
        finally:
            if not wtask.done():
                wtask.cancel()
            stream.cancel()
        return got

    async def close(self) -> None:
        """End the stream (idempotent)."""
        if self._stream.done():
            return
        with contextlib.suppress(grpc.RpcError, asyncio.CancelledError):
            await self._stream.done_writing()
        self._stream.cancel()

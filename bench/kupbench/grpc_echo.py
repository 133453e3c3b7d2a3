"""The transport floor: a bare grpc.aio echo server on a unix socket.

Run as its own process (``python -m kupbench.grpc_echo --socket PATH``), the
same layout as kupd: a benchmark client process talks to a server process.
Messages are raw bytes (no protobuf), so this is the floor of the transport
itself: whatever kupd adds on top of it shows up in the ratio.

Methods:
  /kupbench.Echo/Unary  unary -> unary, the request echoed
  /kupbench.Echo/Bidi   stream <-> stream, every request echoed in order
"""

from __future__ import annotations

import argparse
import asyncio
import signal
from collections.abc import AsyncIterator

import grpc

__all__ = ["BIDI", "GRPC_OPTIONS", "UNARY", "main", "serve"]

UNARY = "/kupbench.Echo/Unary"
BIDI = "/kupbench.Echo/Bidi"

# Large enough for the largest channel message (KUP_MAX_PAGES pages) plus framing.
GRPC_OPTIONS = [
    ("grpc.max_send_message_length", 64 << 20),
    ("grpc.max_receive_message_length", 64 << 20),
]


async def _unary(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
    return request


async def _bidi(requests: AsyncIterator[bytes],
                context: grpc.aio.ServicerContext) -> AsyncIterator[bytes]:
    async for req in requests:
        yield req


async def serve(socket_path: str) -> None:
    server = grpc.aio.server(options=GRPC_OPTIONS)
    handler = grpc.method_handlers_generic_handler(
        "kupbench.Echo",
        {
            "Unary": grpc.unary_unary_rpc_method_handler(_unary),
            "Bidi": grpc.stream_stream_rpc_method_handler(_bidi),
        },
    )
    server.add_generic_rpc_handlers((handler,))
    if server.add_insecure_port(f"unix:{socket_path}") == 0:
        raise SystemExit(f"grpc_echo: cannot listen on unix:{socket_path}")
    await server.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    print("ready", flush=True)
    await stop.wait()
    await server.stop(grace=0.5)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    ap.add_argument("--socket", required=True, help="unix socket path to listen on")
    args = ap.parse_args()
    asyncio.run(serve(args.socket))


if __name__ == "__main__":
    main()

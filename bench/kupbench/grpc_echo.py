"""The transport floor: a bare grpc.aio echo server on a unix socket.

Run as its own process (``python -m kupbench.grpc_echo --socket PATH``), the
same layout as kupd: a benchmark client process talks to a server process.
Messages are raw bytes (no protobuf), so this is the floor of the transport
itself: whatever kupd adds on top of it shows up in the ratio.

Methods:
  /kupbench.Echo/Unary  unary -> unary, the request echoed
  /kupbench.Echo/Bidi   stream <-> stream, every request echoed in order
  /kup.v1.Kup/Call      (with --kup-call, needs kupapi) kup.v1's own Call messages:
                        the CallRequest's data comes back as the CallResponse's
                        reply, so a client's Call against this server costs
                        what the protocol's messages cost (protobuf on both
                        sides, a larger request) with no kupd behind it
"""

from __future__ import annotations

import argparse
import asyncio
import signal
from collections.abc import AsyncIterator

import grpc

__all__ = ["BIDI", "GRPC_OPTIONS", "UNARY", "main", "run_until_signalled", "serve"]

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


def _kup_call_handler() -> grpc.GenericRpcHandler:
    """The kup.v1 Call echo (a separate server process: loading protobuf and
    kup.v1 would change the plain echo server's memory figures)."""
    from kupapi import kup_pb2
    data_kind = 1  # KUP_KIND_DATA

    async def call(request: kup_pb2.CallRequest,
                   context: grpc.aio.ServicerContext) -> kup_pb2.CallResponse:
        return kup_pb2.CallResponse(
            reply=kup_pb2.Message(data=request.data, kind=data_kind, seq=1))  # type: ignore[arg-type]

    return grpc.method_handlers_generic_handler(
        "kup.v1.Kup",
        {
            "Call": grpc.unary_unary_rpc_method_handler(
                call,
                request_deserializer=kup_pb2.CallRequest.FromString,
                response_serializer=kup_pb2.CallResponse.SerializeToString,
            ),
        },
    )


async def serve(socket_path: str, kup_call: bool = False) -> None:
    server = grpc.aio.server(options=GRPC_OPTIONS)
    handler = grpc.method_handlers_generic_handler(
        "kupbench.Echo",
        {
            "Unary": grpc.unary_unary_rpc_method_handler(_unary),
            "Bidi": grpc.stream_stream_rpc_method_handler(_bidi),
        },
    )
    handlers = [handler]
    if kup_call:
        handlers.append(_kup_call_handler())
    server.add_generic_rpc_handlers(handlers)
    await run_until_signalled(server, socket_path, "grpc_echo")


async def run_until_signalled(server: grpc.aio.Server, socket_path: str, name: str) -> None:
    """Listen on ``socket_path``, say "ready" (the benchmark waits for that
    line), serve until SIGTERM / SIGINT."""
    if server.add_insecure_port(f"unix:{socket_path}") == 0:
        raise SystemExit(f"{name}: cannot listen on unix:{socket_path}")
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
    ap.add_argument("--kup-call", action="store_true",
                    help="also serve kup.v1 Call as an echo (protobuf messages)")
    args = ap.parse_args()
    asyncio.run(serve(args.socket, args.kup_call))


if __name__ == "__main__":
    main()

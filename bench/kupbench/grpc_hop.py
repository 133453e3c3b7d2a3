"""The hop floor: the bare grpc.aio echo server, plus one channel hop.

Run as its own process (``python -m kupbench.grpc_hop --socket PATH --device
DEV``).  It serves the same raw-bytes methods as :mod:`kupbench.grpc_echo`,
but before answering, every request is exchanged over a channel of a kupsim
echo device (even channels: echo answers them unchanged) with kupd's channel
layer, as kupd does: ``Channel.try_exchange`` (send, short spin) and, when
the spin misses, a wait on the channel's fd on the loop
(:func:`kupd.waiting.wait_message`).  Nothing else of kupd runs: no protobuf,
no leases, no policy, no metrics, no logging.

So a figure of this server over the bare echo's is the least any gateway
built this way -- grpc.aio in front of a channel of another process -- can
cost over the bare transport on this machine: the floor under kupd's
"kupd / bare" target rows.  kupd over this server is what kupd's own layers
add.

Channels: a bidi stream takes one for its life (a free one, else it attaches
the next even channel) and gives it back when it ends; unary calls share
``--unary-channels`` of them, first come first served, as kupd's Call pool
shares its channels.  A stream that ends while a request is with the module
closes its channel instead (its reply is owed; kupsim renews it).
"""

from __future__ import annotations

import argparse
import asyncio
import signal
from collections.abc import AsyncIterator

import grpc

from kupd.channel import Channel, Device
from kupd.waiting import wait_message

from .grpc_echo import GRPC_OPTIONS

__all__ = ["main", "serve"]


class _Channels:
    def __init__(self, device: str, unary_channels: int) -> None:
        self.dev = Device.open(device)
        self.free: list[Channel] = []
        self.next_id = 0
        self.unary: asyncio.Queue[Channel] = asyncio.Queue()
        for _ in range(unary_channels):
            self.unary.put_nowait(self.take())

    def take(self) -> Channel:
        """A channel at the user's turn (blocking attach: stream start only)."""
        if self.free:
            return self.free.pop()
        while True:
            cid = self.next_id
            self.next_id += 2  # even channels: echo answers unchanged
            ch = self.dev.channel(cid)
            first = ch.receive(timeout=10.0)  # echo hands the turn over: PASS
            del first
            return ch

    @staticmethod
    async def exchange(ch: Channel, data: bytes) -> bytes:
        msg = ch.try_exchange(data)
        if msg is None:
            msg = await wait_message(ch, 30.0)
        return msg.data


async def serve(socket_path: str, device: str, unary_channels: int) -> None:
    chans = _Channels(device, unary_channels)

    async def unary(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        ch = await chans.unary.get()
        try:
            reply = await chans.exchange(ch, request)
        except BaseException:
            ch.close()
            chans.unary.put_nowait(chans.take())
            raise
        chans.unary.put_nowait(ch)
        return reply

    async def bidi(requests: AsyncIterator[bytes],
                   context: grpc.aio.ServicerContext) -> AsyncIterator[bytes]:
        ch = chans.take()
        clean = True
        try:
            async for req in requests:
                clean = False
                reply = await chans.exchange(ch, req)
                clean = True
                yield reply
        finally:
            if clean:
                chans.free.append(ch)
            else:
                ch.close()

    server = grpc.aio.server(options=GRPC_OPTIONS)
    server.add_generic_rpc_handlers([grpc.method_handlers_generic_handler(
        "kupbench.Echo",
        {
            "Unary": grpc.unary_unary_rpc_method_handler(unary),
            "Bidi": grpc.stream_stream_rpc_method_handler(bidi),
        },
    )])
    if server.add_insecure_port(f"unix:{socket_path}") == 0:
        raise SystemExit(f"grpc_hop: cannot listen on unix:{socket_path}")
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
    ap.add_argument("--device", required=True, help="a kupsim echo device's socket path")
    ap.add_argument("--unary-channels", type=int, default=8,
                    help="channels shared by the unary calls (kupd's Call pool: 8)")
    args = ap.parse_args()
    asyncio.run(serve(args.socket, args.device, args.unary_channels))


if __name__ == "__main__":
    main()

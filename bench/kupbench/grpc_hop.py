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

With ``--kup-v1`` it also serves kup.v1's own Session (attach, receive,
exchange) and Call, in kup.v1's protobuf messages through the generated
classes, the same way: the floor under kupd with the API's messages, so
that what is left above it is kupd's own code.

Channels: a bidi stream takes an even one for its life (a free one, else it attaches
the next even channel) and gives it back when it ends; unary calls share
``--unary-channels`` of them, first come first served, as kupd's Call pool
shares its channels (kup.v1 Calls too).  A stream that ends while a request
is with the module closes its channel instead (its reply is owed; kupsim
renews it).  A kup.v1 Session attaches an odd channel of its own, receives
echo's first PASS when its client asks, as from kupd, and closes it at the
end.
"""

from __future__ import annotations

import argparse
import asyncio
from collections.abc import AsyncIterator
from typing import Any

import grpc

from kupd.channel import Channel, Device, Message
from kupd.waiting import wait_message

from .grpc_echo import GRPC_OPTIONS, run_until_signalled

__all__ = ["main", "serve"]


class _Channels:
    def __init__(self, device: str, unary_channels: int) -> None:
        self.dev = Device.open(device)
        self.free: list[Channel] = []
        self.next_id = 0
        self.next_odd = 1
        self.unary: asyncio.Queue[Channel] = asyncio.Queue()
        for _ in range(unary_channels):
            self.unary.put_nowait(self.take())

    def take(self) -> Channel:
        """A channel at the user's turn (blocking attach: stream start only)."""
        if self.free:
            return self.free.pop()
        cid = self.next_id
        self.next_id += 2  # even channels: echo answers unchanged
        ch = self.dev.channel(cid)
        ch.receive(timeout=10.0)  # echo hands the turn over: PASS
        return ch

    def attach_fresh(self) -> Channel:
        """A newly attached odd channel, echo's first PASS still to be received
        (a kup.v1 Session receives it, as from kupd; closed when the Session
        ends).  Odd channels upper-case a-z, which the bench's payloads avoid."""
        cid = self.next_odd
        self.next_odd += 2
        return self.dev.channel(cid)

    @staticmethod
    async def exchange(ch: Channel, data: bytes) -> Message:
        """kupd's way: send and spin briefly, else wait on the fd."""
        msg = ch.try_exchange(data)
        if msg is None:
            msg = await wait_message(ch, 30.0)
        return msg

    async def pooled_exchange(self, data: bytes) -> tuple[Message, int]:
        """An exchange on one of the unary channels (first come first served);
        a channel whose reply is still owed is replaced, not handed on."""
        ch = await self.unary.get()
        try:
            msg = await self.exchange(ch, data)
        except BaseException:
            ch.close()
            self.unary.put_nowait(self.take())
            raise
        self.unary.put_nowait(ch)
        return msg, ch.id


def _kup_v1_handler(chans: _Channels) -> grpc.GenericRpcHandler:
    """kup.v1 Session (attach, receive, exchange) and Call over the same
    channels, in the generated classes: nothing of kupd's service."""
    from kupapi import kup_pb2 as pb

    def message(m: Any) -> Any:
        return pb.Message(data=m.data, kind=int(m.kind), seq=m.seq)  # type: ignore[arg-type]

    async def session(requests: AsyncIterator[Any],
                      context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
        ch: Channel | None = None
        try:
            async for req in requests:
                op = req.WhichOneof("op")
                rid = req.request_id
                if op == "attach" and ch is None:
                    ch = chans.attach_fresh()
                    yield pb.SessionResponse(request_id=rid, attached=pb.AttachResponse(
                        device=req.attach.device, channel=ch.id, max_message_bytes=ch.max_msg))
                elif op == "exchange" and ch is not None:
                    m = await chans.exchange(ch, req.exchange.data)
                    yield pb.SessionResponse(request_id=rid, exchanged=pb.ReceiveResponse(
                        message=message(m)))
                elif op == "receive" and ch is not None:
                    m = await wait_message(ch, 30.0)
                    yield pb.SessionResponse(request_id=rid, received=pb.ReceiveResponse(
                        message=message(m)))
                else:
                    await context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                                        f"hop floor: no {op} here")
        finally:
            if ch is not None:
                ch.close()

    async def call(request: Any, context: grpc.aio.ServicerContext) -> Any:
        m, chan = await chans.pooled_exchange(request.data)
        return pb.CallResponse(channel=chan, reply=message(m))

    return grpc.method_handlers_generic_handler("kup.v1.Kup", {
        "Session": grpc.stream_stream_rpc_method_handler(
            session, request_deserializer=pb.SessionRequest.FromString,
            response_serializer=pb.SessionResponse.SerializeToString),
        "Call": grpc.unary_unary_rpc_method_handler(
            call, request_deserializer=pb.CallRequest.FromString,
            response_serializer=pb.CallResponse.SerializeToString),
    })


async def serve(socket_path: str, device: str, unary_channels: int,
                kup_v1: bool = False) -> None:
    chans = _Channels(device, unary_channels)

    async def unary(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        return (await chans.pooled_exchange(request))[0].data

    async def bidi(requests: AsyncIterator[bytes],
                   context: grpc.aio.ServicerContext) -> AsyncIterator[bytes]:
        ch = chans.take()
        clean = True
        try:
            async for req in requests:
                clean = False
                reply = await chans.exchange(ch, req)
                clean = True
                yield reply.data
        finally:
            if clean:
                chans.free.append(ch)
            else:
                ch.close()

    server = grpc.aio.server(options=GRPC_OPTIONS)
    handlers = [grpc.method_handlers_generic_handler(
        "kupbench.Echo",
        {
            "Unary": grpc.unary_unary_rpc_method_handler(unary),
            "Bidi": grpc.stream_stream_rpc_method_handler(bidi),
        },
    )]
    if kup_v1:
        handlers.append(_kup_v1_handler(chans))
    server.add_generic_rpc_handlers(handlers)
    await run_until_signalled(server, socket_path, "grpc_hop")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    ap.add_argument("--socket", required=True, help="unix socket path to listen on")
    ap.add_argument("--device", required=True, help="a kupsim echo device's socket path")
    ap.add_argument("--unary-channels", type=int, default=8,
                    help="channels shared by the unary calls (kupd's Call pool: 8)")
    ap.add_argument("--kup-v1", action="store_true",
                    help="also serve kup.v1 Session and Call (protobuf messages; needs kupapi)")
    args = ap.parse_args()
    asyncio.run(serve(args.socket, args.device, args.unary_channels, args.kup_v1))


if __name__ == "__main__":
    main()

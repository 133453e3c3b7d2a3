"""Python client of kupd: libkup's API (open, channel, send, receive, pass_,
close) over the kup.v1 gRPC service, plus ``call`` and ``watch``.

Synchronous::

    with Client("/run/kupd.sock") as c:
        with c.open("echo").channel() as ch:
            ch.receive()              # the kernel's first hand-over
            ch.send(b"hello")
            print(ch.receive().data)
        print(c.call("echo", b"ping").data)

asyncio: :class:`AsyncClient` with the same methods, awaitable.
Errors are the classes of :mod:`kupd.errors`.
"""

from __future__ import annotations

from kupclient import errors
from kupclient._types import (
    ChannelInfo,
    DeviceInfo,
    EventType,
    Kind,
    Lease,
    Message,
    WatchEvent,
)
from kupclient.aio import AsyncChannel, AsyncClient, AsyncDeviceHandle
from kupclient.client import Channel, Client, DeviceHandle, Watch

__all__ = [
    "AsyncChannel",
    "AsyncClient",
    "AsyncDeviceHandle",
    "Channel",
    "ChannelInfo",
    "Client",
    "DeviceHandle",
    "DeviceInfo",
    "EventType",
    "Kind",
    "Lease",
    "Message",
    "Watch",
    "WatchEvent",
    "errors",
]

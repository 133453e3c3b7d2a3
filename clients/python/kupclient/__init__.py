"""Python client of kupd: libkup's API (open, channel, send, receive, pass_,
close) over the kup.v1 gRPC service, plus ``call`` and ``watch``.

Synchronous::

    with Client("/run/kupd/kupd.sock") as c:
        with c.open("echo").channel() as ch:
            ch.receive()              # the kernel's first hand-over
            ch.send(b"hello")
            print(ch.receive().data)
        print(c.call("echo", b"ping").data)

asyncio: :class:`AsyncClient` with the same methods, awaitable.
Errors are the classes of :mod:`kupapi.errors` (= :mod:`kupd.errors`),
re-exported by :mod:`kupclient.errors` with the client's argument errors
(ArgumentTypeError, ArgumentValueError) and ``is_connection_failure``.

Importing the package loads only :mod:`kupclient.errors`; the names below
(and with them grpc) are loaded when first used.  kupctl relies on that: it
configures gRPC's logging before anything imports grpc.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from kupclient import errors

if TYPE_CHECKING:
    from kupclient._types import (
        CallReply,
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
    "CallReply",
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

#: Where each public name lives (loaded on first use: see the module docstring).
_LAZY = {
    **dict.fromkeys(
        (
            "CallReply",
            "ChannelInfo",
            "DeviceInfo",
            "EventType",
            "Kind",
            "Lease",
            "Message",
            "WatchEvent",
        ),
        "kupclient._types",
    ),
    **dict.fromkeys(("AsyncChannel", "AsyncClient", "AsyncDeviceHandle"), "kupclient.aio"),
    **dict.fromkeys(("Channel", "Client", "DeviceHandle", "Watch"), "kupclient.client"),
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})

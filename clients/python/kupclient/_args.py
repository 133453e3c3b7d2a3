"""Argument checks shared by the sync and async clients.

Why: protobuf takes ``None`` for a bytes field as "unset" (an empty
message goes out), a negative Call timeout became 1 ms, ``open("")``
listed every device instead of failing, and a negative channel id (or one
>= 2**32, or a timeout of more than 2**32 ms) failed deep in protobuf
("Value out of range") naming nothing.  Each public method checks its
arguments here first, so a bad one is refused before anything goes on the
wire, with an error that names it: TypeError for a wrong type, ValueError
for a wrong value.  Both are :class:`ArgumentError`\\ s, so a program (like
kupctl) can tell a refused argument from any other ValueError / TypeError.
"""

from __future__ import annotations

import argparse
import math
import os
from collections.abc import Mapping

from kupapi import MAX_GRPC_MESSAGE, errors
from kupapi.defaults import request_name_error
from kupclient.errors import ArgumentError, ArgumentTypeError, ArgumentValueError

__all__ = [
    "MAX_CHANNEL",
    "MAX_TIMEOUT_MS",
    "ArgumentError",
    "ArgumentTypeError",
    "ArgumentValueError",
    "call_timeout_ms",
    "channel_arg",
    "check_size",
    "data_arg",
    "device_arg",
    "device_filter_arg",
    "lease_arg",
    "receive_name_arg",
    "seconds_arg",
    "seconds_option",
    "socket_arg",
]

#: Channel ids are uint32 on the wire (SessionAttach.channel, AttachRequest.channel).
MAX_CHANNEL = 0xFFFF_FFFF
#: Timeouts travel as uint32 milliseconds (timeout_ms, reply_timeout_ms).
MAX_TIMEOUT_MS = 0xFFFF_FFFF
_MAX_TIMEOUT_S = MAX_TIMEOUT_MS / 1000


#: The largest payload kupd's messages carry: gRPC's limit on both ends
#: (kupapi.MAX_GRPC_MESSAGE) less its headroom for the envelope.  Larger,
#: gRPC itself refuses the message ("Sent message larger than max").
MAX_PAYLOAD = MAX_GRPC_MESSAGE - 64 * 1024


def data_arg(data: object, name: str = "data") -> bytes:
    """Bytes for a generated message's bytes field (a bytearray or memoryview
    is copied into one; bytes pass as they are).  TooBig past MAX_PAYLOAD."""
    if isinstance(data, bytes):
        out = data
    elif isinstance(data, (bytearray, memoryview)):
        out = bytes(data)
    else:
        raise ArgumentTypeError(f"{name} must be bytes, not {type(data).__name__}")
    if len(out) > MAX_PAYLOAD:
        raise errors.TooBig(
            f"{name} of {len(out)} bytes is larger than any message kupd carries "
            f"({MAX_PAYLOAD} bytes, gRPC's limit)"
        )
    return out


def _text_arg(value: object, name: str) -> str:
    if not isinstance(value, str):
        raise ArgumentTypeError(f"{name} must be a str, not {type(value).__name__}")
    try:
        value.encode()
    except UnicodeEncodeError:
        raise ArgumentValueError(f"{name} must be valid UTF-8 text, not {value!r}") from None
    return value


def socket_arg(path: object) -> str:
    """kupd's socket path: a non-empty str or os.PathLike (``unix:PATH`` as
    well).  "" used to be taken for the current directory, which fails only
    at the first call and then with a connect error naming no argument."""
    if isinstance(path, os.PathLike):
        path = os.fspath(path)
    name = _text_arg(path, "socket path")
    if not name or name == "unix:":
        raise ArgumentValueError(
            "socket path must not be empty (kupd's unix socket, e.g. /run/kupd/kupd.sock)"
        )
    return name


def device_arg(device: object) -> str:
    """A device name (required)."""
    name = _text_arg(device, "device")
    if not name:
        raise ArgumentValueError("device name is required")
    return name


def device_filter_arg(device: object) -> str:
    """A device to filter by: a name, or None / "" for every device."""
    if device is None:
        return ""
    return _text_arg(device, "device")


def lease_arg(lease_id: object) -> str:
    """A lease id (required)."""
    lease = _text_arg(lease_id, "lease id")
    if not lease:
        raise ArgumentValueError("lease id is required")
    return lease


def receive_name_arg(value: object, name: str) -> str | None:
    """A receive's ``receive_id`` or ``again_of`` given by the caller: None
    (the client's own), or up to 64 of [A-Za-z0-9_-] -- what kupd takes
    (kupapi.defaults), checked here so a bad one is refused before it is
    sent, naming the argument."""
    if value is None:
        return None
    text = _text_arg(value, name)
    if not text:
        raise ArgumentValueError(f"{name} must not be empty (leave it out: None)")
    why = request_name_error(text, name)
    if why is not None:
        raise ArgumentValueError(why)
    return text


def channel_arg(chan_id: object) -> int | None:
    """A channel id (uint32), or None for any free channel."""
    if chan_id is None:
        return None
    if isinstance(chan_id, bool) or not isinstance(chan_id, int):
        raise ArgumentTypeError(f"channel must be an int or None, not {type(chan_id).__name__}")
    if chan_id < 0:
        raise ArgumentValueError(f"channel must be >= 0, not {chan_id}")
    if chan_id > MAX_CHANNEL:
        raise ArgumentValueError(
            f"channel must be <= {MAX_CHANNEL} (channel ids are uint32), not {chan_id}"
        )
    return chan_id


def seconds_arg(timeout: object, zero_ok: bool) -> float | None:
    """A timeout in seconds: None, or a finite number > 0 (>= 0 with
    ``zero_ok``) of at most 2**32-1 ms (what the protocol's uint32 holds)."""
    if timeout is None:
        return None
    if isinstance(timeout, bool) or not isinstance(timeout, (int, float)):
        kind = type(timeout).__name__
        raise ArgumentTypeError(f"timeout must be a number of seconds or None, not {kind}")
    try:
        t = float(timeout)
    except OverflowError:  # an int too large for a float
        t = math.inf
    if not math.isfinite(t) or t < 0 or (t == 0 and not zero_ok):
        bound = ">= 0" if zero_ok else "> 0"
        raise ArgumentValueError(
            f"timeout must be None or a finite number {bound} seconds, not {timeout!r}"
        )
    if round(t * 1000) > MAX_TIMEOUT_MS:
        raise ArgumentValueError(
            f"timeout must be at most {_MAX_TIMEOUT_S} seconds (uint32 milliseconds on "
            f"the wire), not {timeout!r}"
        )
    return t


def seconds_option(value: str) -> float:
    """argparse ``type=`` for a command line's timeout in seconds (kupctl,
    ``python -m kupclient.admin``): a number > 0 within :func:`seconds_arg`'s
    bounds, else argparse's usage error naming the option."""
    try:
        t = float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number of seconds: {value!r}") from None
    if not t > 0:
        raise argparse.ArgumentTypeError(f"must be > 0 seconds, not {value!r}")
    try:  # the client's own bounds: finite, and what the wire's uint32 ms holds
        checked = seconds_arg(t, zero_ok=False)
    except ArgumentError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    assert checked is not None
    return checked


def call_timeout_ms(timeout: object) -> int:
    """A Call's timeout_ms: 0 (kupd's default) for None, else at least 1 ms."""
    t = seconds_arg(timeout, zero_ok=False)
    return 0 if t is None else max(1, round(t * 1000))


def check_size(
    data: object, limit: int, chan: int, device: str, sizes: Mapping[str, int] | None = None
) -> None:
    """TooBig when ``data`` is larger than ``limit``, the session's
    max_message_bytes (the channel's data area, or the tenant's own limit if
    lower): refused before it is sent, so the session goes on (a message
    over gRPC's own limit would otherwise end the stream).

    ``sizes``: each device's channel data area, where the client knows it
    (pages_per_channel x page_size, from ListDevices): a ``limit`` lower
    than the channel's is the tenant's rule, named as kupd names it when it
    refuses the same message ("rule max_message_bytes")."""
    n = memoryview(data).nbytes if isinstance(data, (bytes, bytearray, memoryview)) else 0
    if not limit or n <= limit:
        return
    channel_bytes = (sizes or {}).get(device, 0)
    where = f"channel {chan} of device {device}"
    if channel_bytes and limit < channel_bytes:
        why = (
            f"rule max_message_bytes: message of {n} bytes exceeds max_message_bytes={limit} "
            f"(this tenant's limit; {where} itself carries {channel_bytes} bytes)"
        )
    elif channel_bytes:
        why = (
            f"message of {n} bytes exceeds max_message_bytes={limit} of {where} "
            "(the channel's data area)"
        )
    else:
        why = (
            f"message of {n} bytes exceeds max_message_bytes={limit} of {where} "
            "(its data area, or the tenant's own limit if lower)"
        )
    raise errors.TooBig(why)

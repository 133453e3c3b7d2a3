"""Argument checks shared by the sync and async clients.

Why: protobuf takes ``None`` for a bytes field as "unset" (an empty
message goes out), a negative Call timeout became 1 ms, ``open("")``
listed every device instead of failing, and a negative channel id failed
deep in protobuf ("Value out of range").  Each public method checks its
arguments here first, so a bad one is refused before anything goes on the
wire, with an error that names it: TypeError for a wrong type, ValueError
for a wrong value.
"""

from __future__ import annotations

import math

__all__ = ["call_timeout_ms", "channel_arg", "data_arg", "device_arg", "seconds_arg"]

def data_arg(data: object, name: str = "data") -> bytes:
    """Bytes for a generated message's bytes field (a bytearray or memoryview
    is copied into one; bytes pass as they are)."""
    if isinstance(data, bytes):
        return data
    if isinstance(data, (bytearray, memoryview)):
        return bytes(data)
    raise TypeError(f"{name} must be bytes, not {type(data).__name__}")


def device_arg(device: object) -> str:
    if not isinstance(device, str):
        raise TypeError(f"device must be a str, not {type(device).__name__}")
    if not device:
        raise ValueError("device name is required")
    return device


def channel_arg(chan_id: object) -> int | None:
    """A channel id, or None for any free channel."""
    if chan_id is None:
        return None
    if isinstance(chan_id, bool) or not isinstance(chan_id, int):
        raise TypeError(f"channel must be an int or None, not {type(chan_id).__name__}")
    if chan_id < 0:
        raise ValueError(f"channel must be >= 0, not {chan_id}")
    return chan_id


def seconds_arg(timeout: object, zero_ok: bool) -> float | None:
    """A timeout in seconds: None, or a finite number > 0 (>= 0 with ``zero_ok``)."""
    if timeout is None:
        return None
    if isinstance(timeout, bool) or not isinstance(timeout, (int, float)):
        kind = type(timeout).__name__
        raise TypeError(f"timeout must be a number of seconds or None, not {kind}")
    t = float(timeout)
    if not math.isfinite(t) or t < 0 or (t == 0 and not zero_ok):
        bound = ">= 0" if zero_ok else "> 0"
        raise ValueError(
            f"timeout must be None or a finite number {bound} seconds, not {timeout!r}"
        )
    return t


def call_timeout_ms(timeout: object) -> int:
    """A Call's timeout_ms: 0 (kupd's default) for None, else at least 1 ms."""
    t = seconds_arg(timeout, zero_ok=False)
    return 0 if t is None else max(1, round(t * 1000))

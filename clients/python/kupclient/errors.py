"""The error classes raised by the client: exactly those of :mod:`kupd.errors`
(re-exported so client code need not know the daemon's package name)."""

from __future__ import annotations

from kupd.errors import (
    Busy,
    DeadlineExceeded,
    InvalidArgument,
    KupError,
    NotFound,
    NotReady,
    NotYourTurn,
    PeerGone,
    PermissionDenied,
    ProtocolError,
    Releasing,
    ResourceExhausted,
    Shutdown,
    SystemFailure,
    TooBig,
    Unavailable,
    VersionMismatch,
)

__all__ = [
    "Busy",
    "DeadlineExceeded",
    "InvalidArgument",
    "KupError",
    "NotFound",
    "NotReady",
    "NotYourTurn",
    "PeerGone",
    "PermissionDenied",
    "ProtocolError",
    "Releasing",
    "ResourceExhausted",
    "Shutdown",
    "SystemFailure",
    "TooBig",
    "Unavailable",
    "VersionMismatch",
]

"""kupd's error taxonomy: :mod:`kupapi.errors`, re-exported.

The classes live in ``kupapi`` (the ``kupclient`` distribution, which kupd
depends on), so that kupd and kupclient raise the same objects:
``except kupd.errors.NotYourTurn`` catches what kupclient raises, and
either distribution can be uninstalled without taking the other's files.
This module defines nothing of its own.
"""

from __future__ import annotations

from kupapi.errors import (
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
    error_class,
    error_for_code,
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
    "error_class",
    "error_for_code",
]

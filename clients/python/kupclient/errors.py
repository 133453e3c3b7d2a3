"""The error classes raised by the client: exactly those of :mod:`kupapi.errors`
(the ones kupd raises too, as :mod:`kupd.errors`), the client's own
argument errors, and :func:`is_connection_failure`.

This module imports neither grpc nor the generated stubs (see the package
docstring): the argument errors and the record of gRPC's own errors live
here, and kupclient._args / kupclient._errors use them.
"""

from __future__ import annotations

import weakref

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
)

__all__ = [
    "ArgumentError",
    "ArgumentTypeError",
    "ArgumentValueError",
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
    "is_connection_failure",
]


class ArgumentError(Exception):
    """An argument check of the client refused an argument (nothing was sent)."""


class ArgumentValueError(ArgumentError, ValueError):
    """A refused argument value (a ValueError)."""


class ArgumentTypeError(ArgumentError, TypeError):
    """A refused argument type (a TypeError)."""


#: Errors made from a status kupd did not send (no kup-error metadata):
#: gRPC's own, e.g. the connection to the socket failed (kupclient._errors
#: adds them).
_NOT_FROM_KUPD: weakref.WeakSet[KupError] = weakref.WeakSet()


def is_connection_failure(exc: BaseException) -> bool:
    """True for an Unavailable that gRPC itself raised (kupd could not be
    reached, or the connection to it broke), False for one kupd answered
    (e.g. "device rot13 is not reachable") and for any other exception."""
    return isinstance(exc, Unavailable) and exc in _NOT_FROM_KUPD

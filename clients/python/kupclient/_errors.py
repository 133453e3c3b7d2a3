"""gRPC status -> kupd.errors exception: the client's ONE mapping.

The server attaches trailing metadata ``kup-error`` (the class name in
:mod:`kupd.errors`) to every error it raises, and the same fields appear in
a Session's in-band ``Error``; both are turned back into that class here.
Statuses without it (gRPC's own: connection refused, client-side deadline)
are mapped by code.

The client imports the taxonomy from :mod:`kupd.errors` rather than keeping
its own copy: the daemon and the client ship in one distribution, the module
has no dependencies (importing ``kupd`` loads nothing else), and one set of
classes means ``except kupd.errors.NotFound`` works the same whether code
talks to a channel directly or through kupd.
"""

from __future__ import annotations

import weakref
from typing import Any

import grpc

from kupapi import kup_pb2
from kupd import errors

__all__ = [
    "channel_closed",
    "client_closed",
    "error_from_pb",
    "error_from_rpc",
    "error_from_status",
    "is_connection_failure",
]

#: Errors made from a status kupd did not send (no kup-error metadata):
#: gRPC's own, e.g. the connection to the socket failed.
_NOT_FROM_KUPD: weakref.WeakSet[errors.KupError] = weakref.WeakSet()

_BY_STATUS: dict[grpc.StatusCode, type[errors.KupError]] = {
    grpc.StatusCode.NOT_FOUND: errors.NotFound,
    grpc.StatusCode.FAILED_PRECONDITION: errors.NotYourTurn,
    grpc.StatusCode.INVALID_ARGUMENT: errors.InvalidArgument,
    grpc.StatusCode.DEADLINE_EXCEEDED: errors.DeadlineExceeded,
    grpc.StatusCode.UNAVAILABLE: errors.Unavailable,
    grpc.StatusCode.PERMISSION_DENIED: errors.PermissionDenied,
    grpc.StatusCode.RESOURCE_EXHAUSTED: errors.ResourceExhausted,
    grpc.StatusCode.ABORTED: errors.PeerGone,
    # gRPC's own "Method not found!": not on this socket (an Admin call on a
    # client socket), not a failure inside kupd
    grpc.StatusCode.UNIMPLEMENTED: errors.NotFound,
}


def _build(kind: str, message: str, fallback: type[errors.KupError]) -> errors.KupError:
    cls = errors.error_class(kind) if kind else None
    return (cls or fallback)(message)


def error_from_rpc(exc: grpc.RpcError) -> errors.KupError:
    """The kupd.errors exception for a failed RPC."""
    code = exc.code() if hasattr(exc, "code") else grpc.StatusCode.UNKNOWN
    details = exc.details() if hasattr(exc, "details") else None
    trailing = exc.trailing_metadata() if hasattr(exc, "trailing_metadata") else None
    return error_from_status(code, details, trailing)


def error_from_status(code: grpc.StatusCode, details: str | None, trailing: Any) -> errors.KupError:
    """The kupd.errors exception for a status (code, details, trailing metadata)."""
    details = details or str(code)
    kind = ""
    for key, value in trailing or ():
        if key == "kup-error":
            kind = value if isinstance(value, str) else value.decode()
    if not kind and code == grpc.StatusCode.UNAVAILABLE and "EKU_SHUTDOWN" in details:
        kind = "Shutdown"
    if not kind and code == grpc.StatusCode.UNIMPLEMENTED:
        # gRPC's own "Method not found!": say what that means here
        details = (
            f"the server on this socket does not serve that method ({details}): an Admin "
            "call needs kupd's admin_socket; otherwise the kupd is older than this client"
        )
    fallback = _BY_STATUS.get(code, errors.SystemFailure)
    exc = _build(kind, details, fallback)
    if not kind:
        _NOT_FROM_KUPD.add(exc)
    return exc


def is_connection_failure(exc: BaseException) -> bool:
    """True for an Unavailable that gRPC itself raised (kupd could not be
    reached, or the connection to it broke), False for one kupd answered
    (e.g. "device rot13 is not reachable")."""
    return isinstance(exc, errors.Unavailable) and exc in _NOT_FROM_KUPD


def client_closed(path: str) -> errors.KupError:
    """The error of an RPC on a Client after its close()."""
    return errors.InvalidArgument(f"client of {path} is closed")


def channel_closed(what: str, pending: bool = False) -> errors.KupError:
    """The error of an operation on a closed Session channel; ``pending``: the
    operation was waiting when close() ended the session."""
    if pending:
        return errors.InvalidArgument(f"{what} was closed while the operation waited")
    return errors.InvalidArgument(f"{what} is closed")


def error_from_pb(err: kup_pb2.Error) -> errors.KupError:
    """The exception for a Session's in-band error."""
    try:
        status = next(c for c in grpc.StatusCode if c.value[0] == err.grpc_code)
    except StopIteration:
        status = grpc.StatusCode.UNKNOWN
    return _build(err.kind, err.message, _BY_STATUS.get(status, errors.SystemFailure))

"""gRPC status -> kupapi.errors exception: the client's ONE mapping.

The server attaches trailing metadata ``kup-error`` (the class name in
:mod:`kupapi.errors`, which kupd.errors re-exports) to every error it
raises, and the same fields appear in a Session's in-band ``Error``; both
are turned back into that class here.
Statuses without it (gRPC's own: connection refused, client-side deadline)
are mapped by code.

The client imports the taxonomy from :mod:`kupapi.errors` rather than
keeping its own copy: kupd raises the same classes (kupd.errors re-exports
them; kupapi ships with kupclient, which kupd depends on), the module has no
dependencies, and one set of classes means ``except kupd.errors.NotFound``
works the same whether code talks to a channel directly or through kupd.
"""

from __future__ import annotations

from typing import Any

import grpc

from kupapi import errors, kup_pb2
from kupclient._types import KEEPALIVE_TIMEOUT_MS
from kupclient.errors import _NOT_FROM_KUPD, is_connection_failure

__all__ = [
    "CLOSED_AS_MADE",
    "RETRY_AFTER_KEY",
    "channel_closed",
    "client_closed",
    "client_forked",
    "closed_as_made",
    "error_from_pb",
    "error_from_rpc",
    "error_from_status",
    "is_connection_failure",
    "is_from_kupd",
    "kupd_not_answering",
    "reload_unanswered",
    "retry_after_ms",
    "session_ended",
]

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


#: What a connection closed as it was accepted most likely means: gRPC's
#: connection cap (kupd's max_connections) closes one more that way.
CLOSED_AS_MADE = (
    "the connection was closed as it was made: a kupd socket with max_connections "
    "set closes connections beyond it -- other clients of it must close theirs first"
)


#: What gRPC's bare "ping timeout" means: an HTTP/2 ping on the connection
#: went unanswered too long, and the connection was closed with every RPC
#: on it.  Either side may have sent the ping.
PING_TIMEOUT = (
    "the connection was closed because a keepalive ping went unanswered: kupd drops a "
    "client that does not answer within its keepalive_timeout while the connection is "
    "quiet -- a stopped process, or one too busy to answer -- and this client drops a kupd "
    f"that does not answer within {KEEPALIVE_TIMEOUT_MS // 1000} s"
)


def closed_as_made(details: str) -> bool:
    """Whether gRPC's text says the connection was closed as it was made
    (before any HTTP/2): gRPC words it three ways, depending on which side
    wrote first."""
    return "failed to connect" in details and any(
        why in details for why in ("Connection reset by peer", "Broken pipe", "Socket closed")
    )


def error_from_status(code: grpc.StatusCode, details: str | None, trailing: Any) -> errors.KupError:
    """The kupd.errors exception for a status (code, details, trailing metadata)."""
    details = details or str(code)
    kind = ""
    retry_after: int | None = None
    for key, value in trailing or ():
        if key == "kup-error":
            kind = value if isinstance(value, str) else value.decode()
        elif key == RETRY_AFTER_KEY:
            retry_after = retry_after_ms(value)
    if not kind and code == grpc.StatusCode.UNAVAILABLE and "EKU_SHUTDOWN" in details:
        kind = "Shutdown"
    if not kind and code == grpc.StatusCode.UNAVAILABLE and closed_as_made(details):
        details += f" ({CLOSED_AS_MADE})"
    if not kind and code == grpc.StatusCode.UNAVAILABLE and details == "ping timeout":
        details += f" ({PING_TIMEOUT})"
    if not kind and code == grpc.StatusCode.DEADLINE_EXCEEDED and details == "Deadline Exceeded":
        # gRPC's own deadline, not kupd's answer: kupd gets the timeout
        # and answers DEADLINE_EXCEEDED itself, so kupd did not answer
        details = (
            "kupd did not answer within the RPC's deadline (the operation's timeout plus "
            "the client's grace, or the fixed deadline of a short RPC): Deadline Exceeded"
        )
    if not kind and code == grpc.StatusCode.UNIMPLEMENTED:
        # gRPC's own "Method not found!": say what that means here
        details = (
            f"the server on this socket does not serve that method ({details}): an Admin "
            "call needs kupd's admin_socket; otherwise the kupd is older than this client"
        )
    if not kind and code == grpc.StatusCode.RESOURCE_EXHAUSTED and "larger than max" in details:
        # gRPC's receive limit, met before kupd saw the request (a tenant's
        # max_message_bytes + 16 KiB, or kupd's 4 MiB): the one size error
        # the API has, TooBig, as kupd's own answer a little over the limit
        kind = "TooBig"
        details = (
            f"the message is larger than this socket accepts ({details}): the tenant's "
            "max_message_bytes (ListDevices, the lease) is the limit to keep to"
        )
    # only kupd's own answer (kup-error) says when to retry
    exc = _answer(kind, details, code, retry_after if kind else None)
    if not kind:
        _NOT_FROM_KUPD.add(exc)
    return exc


def _answer(
    kind: str, details: str, code: grpc.StatusCode, retry_after: int | None
) -> errors.KupError:
    """The error a status or a Session's in-band Error ends in, both
    mapped here: the class ``kind`` names (else ``code``'s), its
    ``grpc_code`` and, when kupd said, its ``retry_after_ms``."""
    exc = _build(kind, details, _BY_STATUS.get(code, errors.SystemFailure))
    exc.grpc_code = code
    if retry_after is not None:
        exc.retry_after_ms = retry_after
    return exc


#: The trailing metadata of a refusal kupd knows the end of: whole
#: milliseconds until it may admit the request again (kupd.service.trailing_for).
RETRY_AFTER_KEY = "kup-retry-after-ms"
#: The most kupd says (kupapi.errors.RETRY_AFTER_MAX_MS: what every client,
#: JavaScript's numbers included, holds exactly); a larger value is not
#: kupd's, and is ignored.
_RETRY_AFTER_MAX = errors.RETRY_AFTER_MAX_MS


def retry_after_ms(value: str | bytes | int) -> int | None:
    """A ``kup-retry-after-ms`` value (or an in-band Error's
    ``retry_after_ms``) as an int (> 0), None for anything else (ignored,
    as an unknown key would be: the error stays as it is)."""
    if isinstance(value, int):
        ms = value
    else:
        text = value if isinstance(value, str) else value.decode(errors="replace")
        if not text.isascii() or not text.isdigit():
            return None
        ms = int(text)
    return ms if 0 < ms <= _RETRY_AFTER_MAX else None


def client_closed(path: str, pending: bool = False) -> errors.KupError:
    """The error of an RPC on a Client after its close(); ``pending``: the RPC
    was under way when close() ended it."""
    if pending:
        return errors.InvalidArgument(f"client of {path} was closed while the operation waited")
    return errors.InvalidArgument(f"client of {path} is closed")


def client_forked(what: str, pid: int, new: str = "Client") -> errors.KupError:
    """The error of an operation on a client (or one of its channels) in a
    child process: gRPC's channels do not survive fork()."""
    return errors.InvalidArgument(
        f"{what} was created in process {pid} and cannot be used after fork(); "
        f"create a new {new} in the child"
    )


def channel_closed(what: str, pending: bool = False, cause: str = "") -> errors.KupError:
    """The error of an operation on a closed Session channel; ``pending``: the
    operation was waiting when close() ended the session; ``cause``: why the
    client itself ended it (an operation cancelled, kupd not answering)."""
    if pending:
        return errors.InvalidArgument(f"{what} was closed while the operation waited")
    if cause:
        return errors.InvalidArgument(f"{what} is closed: {cause}")
    return errors.InvalidArgument(f"{what} is closed")


def session_ended(what: str, exc: errors.KupError) -> errors.KupError:
    """The error of an operation on a Session channel whose session ``exc``
    ended (kupd's answer -- a device or kupd shutting down, a revocation,
    a drain -- or the connection breaking): the same class, saying the
    session already ended, so ``except Shutdown`` sees every operation
    after it, not only the one that met it."""
    again = type(exc)(
        f"{what} is closed: the session already ended with {type(exc).__name__}: {exc.message}"
    )
    if exc in _NOT_FROM_KUPD:  # is_connection_failure() answers as for exc
        _NOT_FROM_KUPD.add(again)
    again.grpc_code = exc.grpc_code
    return again


def kupd_not_answering(what: str, bound: float) -> errors.KupError:
    """The error of a Session operation kupd did not answer within its
    timeout plus the grace (kupclient._types.KUPD_GRACE): the session is
    ended, its state being unknown."""
    return errors.DeadlineExceeded(
        f"{what}: kupd did not answer within {bound:g} s (the operation's timeout plus "
        "the client's grace); the session was ended"
    )


def is_from_kupd(exc: errors.KupError) -> bool:
    """Whether ``exc`` is kupd's answer, not gRPC's own failure (a status
    without kup-error) -- nor a refusal of the client's own."""
    return exc.grpc_code is not None and exc not in _NOT_FROM_KUPD


def reload_unanswered(exc: errors.KupError, wait: float) -> errors.KupError:
    """The error of a Reload kupd did not answer within ``wait`` seconds
    (``exc``: gRPC's DEADLINE_EXCEEDED): for the operator who ran
    ``kupctl reload`` or ``service kupd reload``, what it means."""
    again = errors.DeadlineExceeded(
        f"kupd did not answer the reload within {wait:g} s (the reload's timeout, kupctl "
        "reload --timeout): it may be stopped or hung, and whether it reloaded is not "
        "known -- its log and audit log say"
    )
    again.grpc_code = exc.grpc_code
    _NOT_FROM_KUPD.add(again)
    return again


def error_from_pb(err: kup_pb2.Error) -> errors.KupError:
    """The exception for a Session's in-band error: as a status with the
    same code, class and retry figure (``retry_after_ms``, the in-band
    ``kup-retry-after-ms``) would be."""
    try:
        status = next(c for c in grpc.StatusCode if c.value[0] == err.grpc_code)
    except StopIteration:
        status = grpc.StatusCode.UNKNOWN
    retry_after = retry_after_ms(err.retry_after_ms) if err.HasField("retry_after_ms") else None
    return _answer(err.kind, err.message, status, retry_after)

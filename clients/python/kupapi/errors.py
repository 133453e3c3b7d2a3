"""The one error taxonomy of kupd (re-exported, the same classes, as
:mod:`kupd.errors`).

Every failure anywhere below the gRPC service -- the C channel layer, the
session and call machinery, policy -- is raised as a subclass of
:class:`KupError`.  The service edge maps these to gRPC status codes in one
place (``kupd.service``), and the Python client maps the codes back to the
same classes in one place (``kupclient``), so application code catches
``kupd.errors.NotFound`` whether it talks to a channel directly or through
kupd.

The numeric ``code`` of the errors that come from the shared-page protocol
is the ``KUP_E_*`` value of ``kmod/include/kup_abi.h`` (mirrored in
``kupapi.abi``); errors that exist only above the channel layer have
``code = 0``.
"""

from __future__ import annotations

import errno
from typing import TYPE_CHECKING, ClassVar

if TYPE_CHECKING:  # the client's attribute only: kupapi.errors imports nothing
    import grpc

__all__ = [
    "RETRY_AFTER_MAX_MS",
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


#: The largest ``retry_after_ms`` kupd sends (a longer wait is said as
#: this): 2**53 - 1, the largest integer every client holds exactly.
RETRY_AFTER_MAX_MS = 2**53 - 1


class KupError(Exception):
    """Base of every kupd error.  ``code`` is the KUP_E_* value or 0."""

    code: ClassVar[int] = 0
    #: The seed's name of the condition, when it has one (e.g. ``EKU_SHUTDOWN``).
    seed_name: ClassVar[str] = ""
    #: The gRPC status code the client received this error as (set by
    #: kupclient: kupd's answer, or gRPC's own failure); None for an error
    #: no status came with (the client's own refusals, kupd's internals).
    grpc_code: grpc.StatusCode | None = None
    #: Milliseconds until kupd may admit the refused request again, when
    #: kupd knows (a ResourceExhausted of calls_per_second), rounded up:
    #: no sooner, but no promise either (another client of the tenant may
    #: take that turn).  Carried as the status's trailing metadata
    #: ``kup-retry-after-ms``; None when it came without one.
    retry_after_ms: int | None = None

    def __init__(self, message: str, *, retry_after_ms: int | None = None) -> None:
        super().__init__(message)
        self.message = message
        if retry_after_ms is not None:
            self.retry_after_ms = retry_after_ms


class Shutdown(KupError):
    """The device is shutting down (the seed's EKU_SHUTDOWN)."""

    code = 1001
    seed_name = "EKU_SHUTDOWN"


class NotReady(KupError):
    """Not ready: the device has not announced the channel yet, or a
    non-blocking operation would have to wait (the seed's EKU_NOTREADY)."""

    code = 1002
    seed_name = "EKU_NOTREADY"


class NotYourTurn(KupError):
    """The turn is on the wrong side: a send or pass while the kernel holds
    it, or a receive of a message already taken (this side holds it)."""

    code = 1003
    seed_name = "EKU_NOTTURN"


class TooBig(KupError):
    """A message is larger than the channel's data area; nothing was sent."""

    code = 1004
    seed_name = "EKU_TOOBIG"


class DeadlineExceeded(KupError):
    """A deadline passed before the operation could complete."""

    code = 1005
    seed_name = "EKU_TIMEDOUT"


class ProtocolError(KupError):
    """The peer broke the shared-page protocol (length, kind or sequence)."""

    code = 1006
    seed_name = "EKU_PROTO"


class VersionMismatch(KupError):
    """The channel's ABI magic or version is not the one we were built for."""

    code = 1007
    seed_name = "EKU_VERSION"


class Busy(KupError):
    """The channel (or lease) is held by someone else."""

    code = 1008
    seed_name = "EKU_BUSY"


class Releasing(Busy):
    """An attach found the channel's last user gone but its kernel side still
    holding it (a module computing a reply): retry shortly.  A :class:`Busy`,
    so code that retries or reports Busy treats it alike; plain Busy means
    another user holds the channel."""

    code = 1013
    seed_name = "EKU_RELEASING"


class NotFound(KupError):
    """No such device, channel or lease."""

    code = 1009
    seed_name = "EKU_NOENT"


class PeerGone(KupError):
    """The other side left the channel (closed, died or was detached), or the
    kernel module ended the session (kupdev_disconnect)."""

    code = 1010
    seed_name = "EKU_PEER"


class InvalidArgument(KupError):
    """A request argument is out of range or malformed."""

    code = 1011
    seed_name = "EKU_INVAL"


class SystemFailure(KupError):
    """A system call failed underneath the channel layer."""

    code = 1012
    seed_name = "EKU_SYS"


class PermissionDenied(KupError):
    """Policy forbids this tenant the operation."""


class ResourceExhausted(KupError):
    """A quota or limit was reached."""


class Unavailable(KupError):
    """The gateway cannot be reached, or refused service for a reason that is
    not a device condition (client side: the socket is missing, the
    connection broke)."""


_BY_CODE: dict[int, type[KupError]] = {
    cls.code: cls
    for cls in (
        Shutdown,
        NotReady,
        NotYourTurn,
        TooBig,
        DeadlineExceeded,
        ProtocolError,
        VersionMismatch,
        Busy,
        NotFound,
        PeerGone,
        InvalidArgument,
        SystemFailure,
        Releasing,
    )
}


#: errno values of a failed system call that mean kupd itself ran out of
#: file descriptors: a limit to raise or sessions to close, not a fault
_OUT_OF_FDS = (errno.EMFILE, errno.ENFILE)


def error_for_code(code: int, message: str, sys_errno: int = 0) -> KupError:
    """Build the exception for a KUP_E_* code (unknown codes: SystemFailure).
    ``sys_errno``: the errno of a failed system call (KUP_E_SYS)."""
    if code == SystemFailure.code and sys_errno in _OUT_OF_FDS:
        return ResourceExhausted(
            f"{message}: kupd has run out of file descriptors (close sessions, or raise "
            "its limit: LimitNOFILE / login.conf openfiles)"
        )
    cls = _BY_CODE.get(code, SystemFailure)
    return cls(message)


_BY_NAME: dict[str, type[KupError]] = {
    cls.__name__: cls
    for cls in (*_BY_CODE.values(), KupError, PermissionDenied, ResourceExhausted, Unavailable)
}


def error_class(name: str) -> type[KupError] | None:
    """The error class called ``name`` (as carried on the wire), or None."""
    return _BY_NAME.get(name)

"""Client of the kup.v1.Admin service (kupd's root-only admin socket).

    with AdminClient("/run/kupd/admin.sock") as a:
        for lease in a.list_leases():
            print(lease.tenant, lease.device, lease.channel)
        a.reload()

Errors are :mod:`kupd.errors` exceptions (the same one mapping as Client).
Also a small command line (``python -m kupclient.admin``)::

    python -m kupclient.admin [--socket PATH] leases [--tenant T] [--json]
    python -m kupclient.admin [--socket PATH] revoke LEASE_ID [--reason TEXT]
    python -m kupclient.admin [--socket PATH] reload [--timeout S]
    python -m kupclient.admin [--socket PATH] drain DEVICE [--undo]
    python -m kupclient.admin [--socket PATH] metrics [--prefix NAME]

``--socket`` defaults to ``$KUPD_ADMIN_SOCKET``, else /run/kupd/admin.sock.
Exit status 0, or 1 with the error on stderr.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import threading
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from types import TracebackType
from typing import Any

import grpc

from kupapi import errors, kup_pb2, kup_pb2_grpc
from kupclient import _fork, _start
from kupclient._args import device_arg, lease_arg, seconds_arg, seconds_option, socket_arg
from kupclient._errors import (
    client_closed,
    client_forked,
    error_from_rpc,
    is_from_kupd,
    reload_unanswered,
)
from kupclient._types import channel_options, target_for

__all__ = [
    "DEFAULT_ADMIN_SOCKET",
    "RELOAD_TIMEOUT",
    "AdminClient",
    "DrainResult",
    "LeaseInfo",
    "ReloadResult",
    "main",
    "reload_summary",
]

DEFAULT_ADMIN_SOCKET = "/run/kupd/admin.sock"

#: How long :meth:`AdminClient.reload` waits for kupd's answer (seconds)
#: unless told (``timeout``).
RELOAD_TIMEOUT = 30.0


@dataclass(frozen=True)
class LeaseInfo:
    lease_id: str
    tenant: str
    device: str
    channel: int
    holder: str
    idle_seconds: float


@dataclass(frozen=True)
class ReloadResult:
    tenants: tuple[str, ...]
    sessions_ended: tuple[str, ...]
    #: changed keys that only a restart applies (kupd runs on with the old values)
    needs_restart: tuple[str, ...] = ()
    #: changed keys the reload applied (the tenants, call_timeout, log_level, ...)
    applied: tuple[str, ...] = ()
    #: RPCs that waited on a socket the reload moved or removed, ended by it,
    #: by RPC ("Receive", "Send", "Pass", "Call", "Watch", "Health.Watch",
    #: "Session": a stream not attached yet); a kupd older than this: {}
    rpcs_ended: dict[str, int] = field(default_factory=dict)
    #: why audit_log, which the reload left as it was, could not be opened
    #: again (the reload was applied all the same: kupd writes on to the
    #: file it had, or counts the lines as lost if that file was removed);
    #: "": it was (or there is no audit_log, or the kupd is older than this)
    audit_log_error: str = ""
    #: (key, why) of each setting of the reloaded config that has no effect
    #: as set (kupd logs them as "config key has no effect as set")
    warnings: tuple[tuple[str, str], ...] = ()
    #: socket paths the reload started serving, and stopped serving
    sockets_added: tuple[str, ...] = ()
    sockets_removed: tuple[str, ...] = ()
    #: queued Calls the new policy no longer allows, refused
    #: (PERMISSION_DENIED) before they were sent
    calls_refused: int = 0


@dataclass(frozen=True)
class DrainResult:
    #: the leases the drain ended
    leases_ended: tuple[str, ...]
    #: False when nothing changed: the device was drained already (its
    #: leases ended then) or, undoing, it was not drained (a kupd older
    #: than this field always says True)
    changed: bool = True


def reload_summary(r: ReloadResult) -> str:
    """For an operator: one line saying what the reload applied and what
    waits for a restart, then a ``warning:`` line for each thing that did
    not go as the file says although the reload was applied (an audit log
    not re-opened, a setting with no effect)."""
    ended = len(r.sessions_ended)
    line = (
        f"reloaded: tenants {', '.join(r.tenants)}; "
        f"{ended} session{'s' if ended != 1 else ''} ended by the new policy"
    )
    n = sum(r.rpcs_ended.values())
    if n:
        each = ", ".join(f"{k} {v}" for k, v in sorted(r.rpcs_ended.items()))
        line += f"; {n} RPC{'s' if n != 1 else ''} ended on moved or removed sockets ({each})"
    if r.calls_refused:
        n = r.calls_refused
        line += f"; {n} queued Call{'s' if n != 1 else ''} refused by the new policy"
    if r.applied:
        line += f"; applied: {', '.join(r.applied)}"
    if r.needs_restart:
        line += f"; changed but applied only at restart: {', '.join(r.needs_restart)}"
    if r.sockets_added:
        line += f"; sockets added: {', '.join(r.sockets_added)}"
    if r.sockets_removed:
        line += f"; sockets removed: {', '.join(r.sockets_removed)}"
    lines = [line]
    if r.audit_log_error:
        lines.append(
            "warning: audit log not re-opened (the reload was applied all the same; kupd "
            f"writes on to the file it had, or counts lines as lost): {r.audit_log_error}"
        )
    lines += [f"warning: config key {k!r} has no effect as set: {why}" for k, why in r.warnings]
    return "\n".join(lines)


class AdminClient:
    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = socket_arg(path)
        self._closed = False  # close(), or a fork (then _forked too)
        self._forked = False
        self._pid = os.getpid()
        self._channel = grpc.insecure_channel(target_for(self.path), options=channel_options())
        self._stub = kup_pb2_grpc.AdminStub(self._channel)
        _fork.track(self)

    def _gone(self, pending: bool = False) -> errors.KupError:
        """The error of a call once ``_closed`` is set, as a Client's:
        closed (while it waited: ``pending``), or inherited across fork()."""
        if self._forked:
            return client_forked(f"client of {self.path}", self._pid, "AdminClient")
        return client_closed(self.path, pending)

    def _after_fork(self) -> None:
        """In a child process (see kupclient._fork): nothing of gRPC's is
        touched, every call fails naming the fork, as a Client's does."""
        self._forked = True
        self._closed = True

    def _unary(self, method: str, request: Any, timeout: float | None = 30.0) -> Any:
        """One RPC.  From the main thread through :func:`kupclient._start.
        unary`, as :class:`kupclient.Client`'s: gRPC's blocking call takes
        the channel's lock in a ``with``, and an interrupt (Ctrl-C) just as
        it was taken left it held by the main thread -- the next call from
        another thread, or completed by gRPC's polling thread, waited for
        ever.  Other threads, where no signal handler runs, keep the
        blocking call.

        After :meth:`close` it fails as :class:`kupclient.Client`'s
        operations do, with the same error: InvalidArgument "client of PATH
        is closed", or "... was closed while the operation waited" for a
        call under way when another thread closed it (before: gRPC's raw
        ``ValueError`` "Cannot invoke RPC ...", and SystemFailure "Channel
        closed!" for one under way).  In a child process forked after it
        was made, as a Client's: InvalidArgument "client of PATH was created
        in process PID and cannot be used after fork(); ..." (gRPC's channel
        does not survive the fork)."""
        if self._closed:
            raise self._gone()
        rpc = getattr(self._stub, method)
        try:
            if threading.current_thread() is threading.main_thread():
                return _start.unary(rpc, request, timeout)
            return rpc(request, timeout=timeout)
        except ValueError:
            if self._closed:  # gRPC's "Cannot invoke RPC ...": closed meanwhile
                raise self._gone(pending=True) from None
            raise
        except grpc.RpcError as exc:
            if self._closed:  # close() in another thread cancelled it
                raise self._gone(pending=True) from None
            raise error_from_rpc(exc) from None
        except grpc.FutureCancelledError:
            if self._closed:  # close() in another thread cancelled it
                raise self._gone(pending=True) from None
            raise errors.SystemFailure(f"{method}: the RPC was cancelled by gRPC") from None

    def list_leases(self, tenant: str = "") -> list[LeaseInfo]:
        resp = self._unary("ListLeases", kup_pb2.ListLeasesRequest(tenant=tenant))
        return [
            LeaseInfo(x.lease_id, x.tenant, x.device, x.channel, x.holder, x.idle_seconds)
            for x in resp.leases
        ]

    def revoke(self, lease_id: str, reason: str = "") -> None:
        req = kup_pb2.RevokeLeaseRequest(lease_id=lease_arg(lease_id), reason=reason)
        self._unary("RevokeLease", req)

    def reload(self, timeout: float | None = None) -> ReloadResult:
        """Have kupd re-read its config and apply what can change live.

        ``timeout``: seconds to wait for kupd's answer (a finite number > 0;
        None: RELOAD_TIMEOUT); past it, DeadlineExceeded saying kupd did
        not answer -- stopped or hung -- and that whether it reloaded is
        not known (its log and audit log say).  A bad ``timeout`` is an
        ArgumentError, nothing sent."""
        t = seconds_arg(timeout, zero_ok=False)
        wait = RELOAD_TIMEOUT if t is None else t
        try:
            resp = self._unary("Reload", kup_pb2.ReloadRequest(), wait)
        except errors.DeadlineExceeded as exc:
            if is_from_kupd(exc):
                raise
            raise reload_unanswered(exc, wait) from None
        return ReloadResult(
            tuple(resp.tenants),
            tuple(resp.sessions_ended),
            tuple(resp.needs_restart),
            tuple(resp.applied),
            dict(resp.rpcs_ended),
            resp.audit_log_error,
            tuple((w.key, w.why) for w in resp.warnings),
            tuple(resp.sockets_added),
            tuple(resp.sockets_removed),
            resp.calls_refused,
        )

    def drain(self, device: str, undo: bool = False) -> list[str]:
        """Drain ``device`` (``undo``: undrain it); the ids of the leases ended."""
        return list(self.drain_device(device, undo).leases_ended)

    def drain_device(self, device: str, undo: bool = False) -> DrainResult:
        """:meth:`drain`, also telling whether anything changed (a device
        drained already, or undrained while not drained, is not)."""
        req = kup_pb2.DrainDeviceRequest(device=device_arg(device), undo=undo)
        resp = self._unary("DrainDevice", req)
        return DrainResult(tuple(resp.leases_ended), not resp.unchanged)

    def metrics(self, prefix: str = "") -> str:
        """kupd's metrics in Prometheus text format (what the metrics
        endpoint serves, with no metrics_port needed), only the families
        whose name starts with ``prefix`` if given."""
        resp = self._unary("GetMetrics", kup_pb2.GetMetricsRequest(prefix=prefix))
        text: str = resp.text
        return text

    def close(self) -> None:
        """Close the connection.  gRPC's close takes the channel's lock in
        a ``with`` (see :meth:`_unary`): the main thread's runs on
        kupclient's starter thread, which finishes it when the main thread
        is interrupted; called again, it is a no-op once done.  Calls after
        it (and those it ends) fail InvalidArgument, see :meth:`_unary`.
        In a forked child it does nothing: the channel is the parent's."""
        if self._forked:
            return
        self._closed = True
        _start.start(self._channel.close, _start.ignore)

    def __enter__(self) -> AdminClient:
        return self

    def __exit__(
        self, t: type[BaseException] | None, v: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="kupclient.admin", description="kupd's Admin service")
    p.add_argument(
        "--socket",
        default=os.environ.get("KUPD_ADMIN_SOCKET", DEFAULT_ADMIN_SOCKET),
        help="kupd's admin socket (default: $KUPD_ADMIN_SOCKET, else %(default)s)",
    )
    sub = p.add_subparsers(dest="cmd", required=True)
    ls = sub.add_parser("leases", help="every lease of every tenant")
    ls.add_argument("--tenant", default="")
    ls.add_argument("--json", action="store_true")
    rv = sub.add_parser("revoke", help="end a lease (its session gets PERMISSION_DENIED)")
    rv.add_argument("lease_id")
    rv.add_argument("--reason", default="")
    rl = sub.add_parser("reload", help="re-read the config, apply what can change live")
    rl.add_argument(
        "--timeout",
        type=seconds_option,
        metavar="S",
        help=f"wait at most S seconds for kupd's answer (default {RELOAD_TIMEOUT:g}); "
        "whether a kupd that did not answer reloaded is then not known",
    )
    dr = sub.add_parser("drain", help="refuse new work on a device and end its leases")
    dr.add_argument("device")
    dr.add_argument("--undo", action="store_true")
    me = sub.add_parser("metrics", help="kupd's metrics, in Prometheus text format")
    me.add_argument("--prefix", default="")
    args = p.parse_args(argv)
    try:
        with AdminClient(args.socket) as a:
            if args.cmd == "leases":
                leases = a.list_leases(args.tenant)
                if args.json:
                    print(json.dumps([asdict(x) for x in leases], indent=2))
                else:
                    print(
                        f"{'LEASE':<18} {'TENANT':<12} {'DEVICE':<12} {'CH':>4} {'HOLDER':<8} IDLE"
                    )
                    for x in leases:
                        print(
                            f"{x.lease_id:<18} {x.tenant:<12} {x.device:<12} {x.channel:>4} "
                            f"{x.holder:<8} {x.idle_seconds:.1f}s"
                        )
            elif args.cmd == "revoke":
                a.revoke(args.lease_id, args.reason)
                print(f"revoked {args.lease_id}")
            elif args.cmd == "reload":
                print(reload_summary(a.reload(args.timeout)))
            elif args.cmd == "metrics":
                sys.stdout.write(a.metrics(args.prefix))
            else:
                ended = a.drain(args.device, args.undo)
                what = "undrained" if args.undo else f"drained ({len(ended)} leases ended)"
                print(f"{args.device}: {what}")
    except errors.KupError as exc:
        print(f"kupclient.admin: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

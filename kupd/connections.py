"""Connections open on kupd's sockets, as gRPC's channelz sees them.

``max_connections`` is gRPC's ``grpc.max_allowed_incoming_connections`` on
a socket's server: gRPC core closes a connection over the cap as it is
accepted (``ConnectionQuota::AllowIncomingConnection`` in the chttp2
listener's ``OnAccept``) and tells nobody -- no log line, no trace, no
counter, no callback, and the refused connection never becomes a channelz
socket; grpcio gives Python no hook on accept (no passive listener, no
``add_channel_from_fd``).  So kupd cannot count the refusals.  What it can
see is the connections *open* on each socket: channelz lists every server
of the process with its listening sockets (named by the path they were
bound at) and the connections it serves.  A socket whose open connections
have reached its ``max_connections`` refuses every further one: kupd
watches for that (Server._watch_connections), logs it and exports the
counts (``kupd_connections``, ``kupd_connections_max``).

channelz is reached through grpcio's Cython layer (``grpc._cython.cygrpc``,
what the grpcio-channelz package serves); a grpcio without it, or one whose
answers do not parse, makes :func:`open_connections` return None: kupd then
says once that it cannot watch connections, and serves on.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from typing import Any

__all__ = ["open_connections", "open_rpcs"]

#: channelz's name of a listening socket: "chttp2 listener unix:PATH"
_LISTENER = "chttp2 listener unix:"
#: server sockets asked for per channelz call
_PAGE = 500


def _cygrpc() -> Any:
    from grpc._cython import cygrpc

    return cygrpc


def _servers(cz: Any) -> Iterable[dict[str, Any]]:
    start = 0
    while True:
        page = json.loads(cz.channelz_get_servers(start))
        servers = page.get("server", [])
        yield from servers
        if page.get("end") or not servers:
            return
        start = max(int(s["ref"]["serverId"]) for s in servers) + 1


def _count_sockets(cz: Any, server_id: int) -> int:
    n = 0
    start = 0
    while True:
        page = json.loads(cz.channelz_get_server_sockets(server_id, start, _PAGE))
        refs = page.get("socketRef", [])
        n += len(refs)
        if page.get("end") or not refs:
            return n
        start = max(int(r["socketId"]) for r in refs) + 1


def _by_path(cz: Any, wanted: set[str]) -> Iterable[tuple[str, dict[str, Any]]]:
    """(path, channelz server) for each server listening at a path of
    ``wanted``."""
    for s in _servers(cz):
        paths = [
            ls.get("name", "")[len(_LISTENER):]
            for ls in s.get("listenSocket", [])
            if ls.get("name", "").startswith(_LISTENER)
        ]
        mine = [p for p in paths if p in wanted]
        if mine:
            yield mine[0], s


def open_connections(bound_at: Iterable[str]) -> dict[str, int] | None:
    """The connections open on the servers listening at each path of
    ``bound_at`` (the path a server's socket was *bound* at: channelz keeps
    that name after kupd renamed the socket into place).  None when
    channelz cannot be read."""
    try:
        cz = _cygrpc()
        return {
            path: _count_sockets(cz, int(s["ref"]["serverId"]))
            for path, s in _by_path(cz, set(bound_at))
        }
    except (ImportError, AttributeError, KeyError, TypeError, ValueError):
        return None


def open_rpcs(bound_at: Iterable[str]) -> dict[str, int] | None:
    """The RPCs under way on the servers listening at each path of
    ``bound_at`` (as :func:`open_connections`): those gRPC counts as
    started and not yet over.  gRPC counts an RPC over (succeeded or
    failed) when it has closed the stream both ways: its status handed to
    the connection -- or the RPC cancelled.  None when channelz cannot be
    read."""
    try:
        cz = _cygrpc()
        out: dict[str, int] = {}
        for path, s in _by_path(cz, set(bound_at)):
            data = s.get("data", {})
            ended = int(data.get("callsSucceeded", 0)) + int(data.get("callsFailed", 0))
            out[path] = int(data.get("callsStarted", 0)) - ended
        return out
    except (ImportError, AttributeError, KeyError, TypeError, ValueError):
        return None

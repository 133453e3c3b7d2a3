"""A stand-in for kupd that answers Attach alone and records the deadline
each Attach carried: how long the client gave it (gRPC's ``grpc-timeout``,
as the server sees it: ``time_remaining()`` when the call came in).

Every client's attach has a default deadline (30 s) and a caller's
``timeout``; a test checks which one reached the wire without waiting it
out.  A real gRPC server on a unix socket (kup.v1.Kup, every other method
UNIMPLEMENTED); its replies are leases of no kupd (``lease_id``
"recorded").

Why its users check a range (e.g. 20 < default <= 30.5) and not the value
itself: the configured timeout never reaches the wire.  Each client turns
it into an absolute deadline as it starts the call (Python's grpc from
``timeout=``, C++'s ``ClientContext::set_deadline(now + timeout)``, Node's
``{deadline: new Date(Date.now() + ms)}``), and gRPC writes
``grpc-timeout`` as that deadline less the time it writes the headers
(grpc core rounding up into its coarse units, grpc-js to the ms);
``time_remaining()`` also loses the time until the handler runs.  Reading
the header itself would take only the last part away: the server's gRPC
consumes it (it is not in ``invocation_metadata()``), so it would take an
HTTP/2 proxy with an HPACK decoder (h2stall.py reads frame headers only;
the ``hpack`` package is not installed), and what it read would still be
the timeout less the client's own elapsed time.  An exact check needs a
seam in each client that reports the timeout it handed to gRPC -- a test
hook in three clients, not something on the wire.  So the checks stay
bounds: at most the configured value (plus gRPC's rounding), and far from
any other candidate (the other timeout, no deadline at all).
"""

from __future__ import annotations

import threading
from concurrent import futures

import grpc

from kupapi import kup_pb2, kup_pb2_grpc

__all__ = ["AttachRecorder"]


class _Servicer(kup_pb2_grpc.KupServicer):
    def __init__(self, recorder: AttachRecorder) -> None:
        self._recorder = recorder

    def Attach(
        self, request: kup_pb2.AttachRequest, context: grpc.ServicerContext
    ) -> kup_pb2.AttachResponse:
        remaining = context.time_remaining()
        with self._recorder.lock:
            self._recorder.deadlines.append(remaining)
        return kup_pb2.AttachResponse(
            lease_id="recorded", device=request.device, channel=request.channel
        )


class AttachRecorder:
    """``AttachRecorder(path)``: serves at ``path`` until :meth:`close`;
    ``deadlines`` the seconds each Attach had left as it came in (None:
    it carried no deadline)."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.lock = threading.Lock()
        self.deadlines: list[float | None] = []
        self._server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
        kup_pb2_grpc.add_KupServicer_to_server(_Servicer(self), self._server)
        self._server.add_insecure_port(f"unix:{path}")
        self._server.start()

    def close(self) -> None:
        self._server.stop(None)

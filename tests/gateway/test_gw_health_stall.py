"""A health Watch whose client never reads (an HTTP/2 stream window of 0)
must stall nobody but itself: other clients' health Checks answer, health
goes on changing, and SIGTERM's drain ends kupd while that client is still
connected.  With grpc_health's stock servicer its Watch held the service's
lock while writing: every later status change waited on it, so every Check
hung and the drain never finished.  Real kupd, kupsim and a hand-framed
HTTP/2 client (h2raw)."""

from __future__ import annotations

import signal

import grpc
from gateway_helpers import StartKupd
from grpc_health.v1 import health_pb2, health_pb2_grpc
from h2raw import HEADERS, H2Conn

from kupd.testing import KupSim

__all__: list[str] = []


def test_a_health_watch_that_is_never_read_stalls_nobody(
    sim: KupSim, start_kupd: StartKupd
) -> None:
    k = start_kupd(sim)
    stalled = H2Conn(k.socket, window=0)
    try:
        watches = [
            stalled.grpc_request(
                "/grpc.health.v1.Health/Watch",
                health_pb2.HealthCheckRequest(service=service).SerializeToString(),
            )
            for service in ("", "kup.v1.Kup", "kup.v1.Kup/echo")
        ]
        # kupd's handlers are in their first write: the response headers
        # went out, the status itself waits for a window that never opens
        for stream in watches:
            stalled.wait_for(HEADERS, stream)
        with grpc.insecure_channel(f"unix:{k.socket}") as chan:
            health = health_pb2_grpc.HealthStub(chan)
            for service in ("", "kup.v1.Kup", "kup.v1.Kup/echo"):
                # each Check sets every status first: it must not wait on the
                # stalled watchers (before: DEADLINE_EXCEEDED, for good)
                r = health.Check(health_pb2.HealthCheckRequest(service=service), timeout=20)
                assert r.status == health_pb2.HealthCheckResponse.SERVING
        k.proc.send_signal(signal.SIGTERM)
        # the drain's first step sets NOT_SERVING; the stalled streams are
        # cancelled when the sockets stop
        assert k.proc.wait(60) == 0, k.log()
    finally:
        stalled.close()
        k.kill()

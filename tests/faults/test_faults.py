"""Faults kupd must survive, the ones tests/gateway does not already cover:

* kupd SIGKILLed: the kernel side sees an error on every channel kupd held
  (echo logs "peer gone (-EPIPE)" per channel), and a restarted kupd
  re-attaches (on the stale socket and lock the killed one left): the same
  channels serve sessions and the Call pool again;
* one device shut down (kupsim unloads it) or its host killed, with a
  session and a Call open on it: those end UNAVAILABLE, health goes
  NOT_SERVING for it, Watch reports the device going, and another device
  (another host) keeps serving.

Covered in tests/gateway (reused, not duplicated): a SIGKILLed client frees
its channel (test_gw_lifecycle), a SIGSTOPped client is dropped by
keepalive, with 1 s and with the DEFAULT settings, bounded by the issue's
5 s (test_gw_limits), a Call whose reply never comes fails
DEADLINE_EXCEEDED and quarantines its channel (test_gw_api).
"""

from __future__ import annotations

import os
import re
import signal
import threading
from collections.abc import Iterator

import grpc
import pytest
from gateway_helpers import StartKupd, call_in_flight, echo_sim, live_watch

from kupclient import EventType
from kupd import errors
from kupd.testing import kupsim, wait_until


def test_kupd_sigkill_every_channel_sees_it_and_a_restart_reattaches(
    start_kupd: StartKupd,
) -> None:
    with echo_sim() as sim:
        k = start_kupd(sim)
        held = [10, 11, 12]
        with k.client() as c:
            chans = [c.open("echo").channel(i) for i in held]
            for ch in chans:
                ch.receive()
            assert c.call("echo", b"before").data.lower() == b"before"
            pool = [x.id for x in c.devices("echo")[0].channels if x.state == "calls"]
            assert len(pool) == 4
            k.proc.kill()
            k.proc.wait(30)
            assert os.path.exists(k.socket)  # left behind by the killed instance
            for ch in chans:
                ch.close()
        expect = set(held) | set(pool)

        def kernel_saw() -> set[int]:
            return {
                int(m) for m in re.findall(r"echo: chan (\d+): peer gone", sim.output())
            } & expect

        wait_until(lambda: kernel_saw() == expect, what=f"EPIPE logged for channels {expect}")
        again = start_kupd(sim, socket=k.socket)  # stale socket + lock of the dead one
        with again.client() as c:
            for i in held:
                with c.open("echo").channel(i) as ch:
                    ch.receive()
                    ch.send(b"back")
                    assert ch.receive(timeout=10).data.lower() == b"back"
            wait_until(
                lambda: (
                    sorted(x.id for x in c.devices("echo")[0].channels if x.state == "calls")
                    == sorted(pool)
                ),
                what="the Call pool re-attached",
            )
            for i in range(8):
                assert c.call("echo", f"{i}".encode(), timeout=10).data == f"{i}".encode()
        assert again.terminate() == 0


@pytest.mark.parametrize("how", ["shutdown", "host-killed"])
def test_device_goes_others_keep_serving(start_kupd: StartKupd, how: str) -> None:
    with (
        kupsim("echo", check_exit=False, ready_timeout=60.0) as echo,
        kupsim("rot13", check_exit=False, ready_timeout=60.0) as rot,
    ):
        # Two hosts: a device may be configured by the path of its socket.
        rot13 = str(rot.rundir / "rot13.sock")
        k = start_kupd(echo, devices=("echo:2", rot13))
        with k.client() as c:
            w = live_watch(c, "echo")
            other = c.open(rot13).channel()
            other.receive()
            ch = c.open("echo").channel(20)
            ch.receive()
            ch.send(b"!delay")
            ch.receive(timeout=10)
            finish = call_in_flight(c, b"!hold", timeout=120)
            if how == "shutdown":
                echo.signal(signal.SIGTERM)  # kupsim unloads: EKU_SHUTDOWN
            else:
                echo.proc.kill()  # the host vanishes
            # the signal is seen by kupsim some time after kill(2) returns: an
            # exchange may still be answered meanwhile (echo answers "!delay"
            # after 300 ms, which the unload cuts short); one must not be, once
            # it is seen
            with pytest.raises(errors.KupError) as ei:
                for _ in range(100):
                    ch.send(b"!delay after")
                    ch.receive(timeout=60)
            ch.close()
            held = finish(60)  # far less than the call's own 120 s deadline
            # Both end UNAVAILABLE (EKU_SHUTDOWN for an unload).
            for exc in (ei.value, held):
                assert isinstance(exc, (errors.Shutdown, errors.Unavailable)), exc
            if how == "shutdown":
                assert "EKU_SHUTDOWN" in str(ei.value), ei.value
            kinds = set()
            for ev in w:
                kinds.add(ev.type)
                if ev.type in (EventType.DEVICE_SHUTTING_DOWN, EventType.DEVICE_GONE):
                    break
            w.cancel()
            wait_until(lambda: c.health() == "NOT_SERVING", what="NOT_SERVING")
            assert c.health("kup.v1.Kup/echo") == "NOT_SERVING"
            # the other device (another host) carries on
            other.send(b"abc")
            assert other.receive(timeout=10).data == b"nop"
            other.close()
            with c.open(rot13).channel() as again:
                again.receive()
    assert k.terminate() == 0


def test_session_grpc_status_on_device_shutdown(start_kupd: StartKupd) -> None:
    """The status itself, as a non-Python client sees it: UNAVAILABLE with
    EKU_SHUTDOWN in the details."""
    from kupapi import kup_pb2, kup_pb2_grpc

    with echo_sim() as sim:
        k = start_kupd(sim)
        chan = grpc.insecure_channel("unix:" + k.socket)
        stub = kup_pb2_grpc.KupStub(chan)
        go = threading.Event()

        def reqs() -> Iterator[kup_pb2.SessionRequest]:
            yield kup_pb2.SessionRequest(request_id=1, attach=kup_pb2.SessionAttach(device="echo"))
            yield kup_pb2.SessionRequest(request_id=2, receive=kup_pb2.SessionReceive())
            yield kup_pb2.SessionRequest(request_id=3, send=kup_pb2.SessionSend(data=b"!hold"))
            yield kup_pb2.SessionRequest(request_id=4, receive=kup_pb2.SessionReceive())
            go.wait(60)  # keep the stream open

        it = stub.Session(reqs(), timeout=120)
        assert next(it).HasField("attached")
        assert next(it).HasField("received")
        assert next(it).HasField("sent")
        sim.signal(signal.SIGTERM)  # the blocked receive must end, with the status
        with pytest.raises(grpc.RpcError) as ei:
            for _ in it:
                pass
        go.set()
        chan.close()
        assert ei.value.code() == grpc.StatusCode.UNAVAILABLE
        assert "EKU_SHUTDOWN" in (ei.value.details() or "")

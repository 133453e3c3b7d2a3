"""The gRPC-side benchmark shapes against real processes: the bare kup.v1
Call echo (the protobuf floor), kupd started through kupd.testing with its
two kupsim echo hosts, Calls through the raw stub, a pump striped over
several Sessions, and the client/server CPU sub-figures of a latency trial.
A few round trips each; no timing assertions, only that each shape moves
what it claims."""

from __future__ import annotations

import asyncio
import contextlib
import sys
from dataclasses import replace
from pathlib import Path

from kupd.testing import REPO_ROOT

sys.path.insert(0, str(REPO_ROOT / "bench"))

from kupbench import kupd_sut
from kupbench.bare import bare_channel, start_bare_server
from kupbench.config import Config
from kupbench.context import RunCtx
from kupbench.groups_grpc import _lat, _pb_call
from kupbench.harness import Report
from kupbench.shapes import pattern, pump_trial


def test_bare_kup_call_echo_answers_with_kup_messages(tmp_path: Path) -> None:
    async def run() -> dict[str, list[float]]:
        sock = tmp_path / "pb.sock"
        with start_bare_server(sock, tmp_path / "pb.log", kup_call=True) as srv:
            ch = bare_channel(sock)
            try:
                e = _pb_call(ch)
                assert await e.rt(b"\x00\x01 kup call") == b"\x00\x01 kup call"
                return await _lat(e, 5, "pb call", srv.pid)()
            finally:
                await ch.close()

    out = asyncio.run(run())
    assert len(out[""]) == 5  # one latency per round trip
    assert len(out["cpu"]) == 1 and out["cpu"][0] > 0  # server CPU per round trip
    assert len(out["ccpu"]) == 1 and out["ccpu"][0] > 0  # this client's CPU per round trip


def test_kupd_striped_pump_and_raw_calls(tmp_path: Path) -> None:
    cfg = replace(Config.quick(), call_channels=2, stripe_sessions=(3,))

    async def run() -> tuple[int, bytes, int]:
        async with contextlib.AsyncExitStack() as stack:
            sut = await kupd_sut.KupdSut.start(RunCtx(cfg, tmp_path, Report({})), stack)
            assert (tmp_path / "logs" / "kupd.log").exists()  # kupd.testing's log capture
            call = kupd_sut.RawCallEcho(sut.stub, sut.pb, sut.device, "test")
            echoed = await call.rt(pattern(64))
            sp = await sut.stripes(3)
            try:
                assert len(sp.sessions) == 3
                # 7 messages over 3 Sessions (3 + 2 + 2): every one echoed once
                got = await sp.pump(pattern(4096), 7)
                rate = await pump_trial(sp, pattern(4096), 4, "striped")
                assert rate[""][0] > 0
            finally:
                await sut.close_idle([sp])
            pid = sut.pid
        return got, echoed, pid

    got, echoed, pid = asyncio.run(run())
    assert got == 7 * 4096
    assert echoed == pattern(64)
    assert not Path(f"/proc/{pid}").exists() or _is_zombie_free(pid)  # kupd stopped


def _is_zombie_free(pid: int) -> bool:
    """True if ``pid`` is no longer a live kupd (reaped, or reused by another process)."""
    try:
        cmd = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return True
    return b"kupd.daemon" not in cmd


def test_hop_floor_server_echoes_through_even_channels_and_reuses_them(tmp_path: Path) -> None:
    """The hop floor (kupbench.grpc_hop) answers what echo answered: on even
    channels unchanged, so lower-case letters come back as sent.  Its device
    has 16 channels, 8 of them even: 2 for the unary calls, so the 8 bidi
    streams opened one after the other can only all be served if a finished
    stream's channel is handed to the next one.  With --kup-v1 it speaks
    kup.v1 Session and Call to kupd's own raw-stub clients."""
    from kupbench.bare import BareBidi, BareUnary, start_hop_server
    from kupbench.kupsim_echo import echo_sim

    from kupapi import kup_pb2, kup_pb2_grpc

    async def run() -> tuple[bytes, list[bytes], int, dict[str, list[float]], bytes, bytes]:
        with echo_sim(4, 16, rundir=tmp_path / "sim") as sim:
            sock = tmp_path / "hop.sock"
            with start_hop_server(sock, tmp_path / "hop.log", sim.device_path("echo"), 2,
                                  kup_v1=True) as srv:
                ch = bare_channel(sock)
                try:
                    unary = await BareUnary(ch).rt(b"lower case, unary")
                    streams = []
                    for i in range(8):
                        s = BareBidi(ch)
                        streams.append(await s.rt(b"stream %d" % i))
                        await s.close()
                    got = await BareBidi(ch).pump(pattern(4096), 5)
                    lat = await _lat(BareUnary(ch), 5, "hop unary", srv.pid)()
                    stub = kup_pb2_grpc.KupStub(ch)
                    sess = await kupd_sut.RawSession(stub, kup_pb2, "echo").open()
                    try:
                        by_session = await sess.rt(pattern(64))
                    finally:
                        await sess.close()
                    by_call = await kupd_sut.RawCallEcho(stub, kup_pb2, "echo").rt(pattern(64))
                finally:
                    await ch.close()
        return unary, streams, got, lat, by_session, by_call

    unary, streams, got, lat, by_session, by_call = asyncio.run(run())
    assert unary == b"lower case, unary"
    assert streams == [b"stream %d" % i for i in range(8)]
    assert got == 5 * 4096
    assert len(lat[""]) == 5 and lat["cpu"][0] > 0
    assert by_session == pattern(64) and by_call == pattern(64)

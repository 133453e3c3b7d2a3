"""Groups 4-8: the bare gRPC transport floor and kupd end to end, side by side.

Both servers run at once (the bare echo server and kupd in front of a
kupsim echo), so every kupd figure's trials are interleaved with its bare
baseline's.  The client shapes (kupbench.shapes) are the same code for both.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from .bare import BareBidi, BareUnary, bare_channel, start_bare_server, start_hop_server
from .config import KIB, MIB, Config
from .context import FigSpec, RunCtx, cost, group, lat, log, rate
from .harness import Figure, TrialFn
from .kupsim_echo import echo_sim
from .procs import BenchError, Proc, cpu_seconds, rss_bytes, run_ns
from .sections import S_E2E, S_IDLE, S_MEM, S_SCALE, S_TRANSPORT
from .shapes import (
    Echoer,
    concurrent_trial,
    latency_trial,
    pattern,
    pump_trial,
    stamp_latency_us,
    stamp_request,
)

__all__ = ["run"]

PAYLOAD = pattern(64)

#: the hop floor's kupsim echo: channels of 1 MiB (the 1 MiB pump), enough
#: even ones for the 64-stream scale figure, the pumps and the unary pool
HOP_PAGES = 256
HOP_CHANNELS = 256
HOP_NOTE = ("the bare echo server, exchanging every message over a kupsim echo channel "
            "with kupd's channel layer before answering (kupbench.grpc_hop): no kupd code")
TWIN_NOTE = ("a second hop-floor server, identical to the first (own process, own kupsim): "
             "how far two servers running the same code land apart in this run")


def _lat(e: Echoer, n: int, what: str, server_pid: int | None = None) -> TrialFn:
    """Round-trip latencies; with ``server_pid`` also the server's CPU time per
    round trip over the trial (sub-figure "cpu", one sample per trial).  Sub-figure
    "ccpu": this client process's CPU time per round trip (all its threads: the
    client shares the 2 cores with the server, so its cost counts too)."""
    async def trial() -> dict[str, list[float]]:
        c0 = run_ns(server_pid) if server_pid is not None else 0
        cc0 = time.process_time()
        out = await latency_trial(e, PAYLOAD, n, what)
        out["ccpu"] = [(time.process_time() - cc0) * 1e6 / n]
        if server_pid is not None:
            out["cpu"] = [(run_ns(server_pid) - c0) / 1000.0 / n]
        return out
    return trial


def _pump(e: Echoer, size: int, total: int, what: str) -> TrialFn:
    data = pattern(size)
    count = max(4, total // size)

    async def trial() -> dict[str, list[float]]:
        return await pump_trial(e, data, count, what)
    return trial


def _conc(rts: list[Callable[[bytes], Awaitable[bytes]]], n_each: int, what: str) -> TrialFn:
    async def trial() -> dict[str, list[float]]:
        return await concurrent_trial(rts, PAYLOAD, n_each, what)
    return trial


def _pb_call(channel: Any) -> Echoer:
    """Raw-stub kup.v1 Calls (the bare kup.v1 Call echo's, the hop floor's)."""
    from kupapi import kup_pb2, kup_pb2_grpc

    from .kupd_sut import RawCallEcho
    return RawCallEcho(kup_pb2_grpc.KupStub(channel), kup_pb2, "echo")


def _optional_server(stack: contextlib.AsyncExitStack, what: str, sock: Path,
                     start: Callable[[], Proc]) -> tuple[Proc | None, Any, str]:
    """(process, gRPC channel to it, "") -- or (None, None, why) when it could
    not start: only the figures that need it are skipped."""
    try:
        proc = start()
    except BenchError as exc:
        why = f"{what}: {exc}"
        log(f"  ! {why}")
        return None, None, why
    stack.callback(proc.stop)
    ch = bare_channel(sock)
    stack.push_async_callback(ch.close)
    return proc, ch, ""


async def _hop_kup_sessions(channel: Any, k: int) -> list[Any]:
    """``k`` raw-stub kup.v1 Sessions on the hop floor (kupd's raw-stub client)."""
    from kupapi import kup_pb2, kup_pb2_grpc

    from .kupd_sut import RawSession
    stub = kup_pb2_grpc.KupStub(channel)
    return [await RawSession(stub, kup_pb2, "echo").open() for _ in range(k)]


def _pump_sizes(largest: int | None) -> list[tuple[str, str, int]]:
    out = [("64k", "64 KiB", 64 * KIB), ("1m", "1 MiB", MIB)]
    if largest is not None and largest not in (64 * KIB, MIB):
        out.append(("max", f"largest ({largest // KIB} KiB)", largest))
    return out


async def _idle_rts(echoer: Echoer, cfg: Config) -> list[float]:
    """cfg.wake_samples round trips, each after cfg.wake_idle_s of silence."""
    out: list[float] = []
    for _ in range(cfg.wake_samples):
        await asyncio.sleep(cfg.wake_idle_s)
        t0 = time.perf_counter_ns()
        await echoer.rt(PAYLOAD)
        out.append((time.perf_counter_ns() - t0) / 1000.0)
    return out


async def run(ctx: RunCtx) -> None:
    from . import kupd_sut

    cfg = ctx.cfg
    stack = contextlib.AsyncExitStack()
    async with stack:
        bare_specs = [
            lat("bare.unary64", S_TRANSPORT, "unary round trip, 64 B"),
            lat("bare.bidi64", S_TRANSPORT, "bidi-stream round trip, 64 B"),
            lat("bare.call_pb", S_TRANSPORT,
                "unary round trip with kup.v1 Call messages (protobuf, raw stub), 64 B",
                note="a second bare server echoing kup.v1 Call: what the API's messages "
                     "cost without kupd"),
            lat("hop.unary64", S_TRANSPORT, "hop floor: unary round trip + one channel hop, 64 B",
                baseline="bare.unary64", note=HOP_NOTE),
            lat("hop.bidi64", S_TRANSPORT,
                "hop floor: bidi-stream round trip + one channel hop, 64 B",
                baseline="bare.bidi64", note=HOP_NOTE),
            # the same, in kup.v1's messages through the generated classes and
            # driven by the same raw-stub clients as kupd's "raw stub" rows: the
            # floor under kupd with its API; kupd over it is kupd's own code.
            # Then the same two on a second, identical server (A/A).
            *(spec for sfx, what, note in (
                ("", "hop floor, kup.v1 messages", HOP_NOTE),
                ("_twin", "A/A twin of the hop floor", TWIN_NOTE),
            ) for spec in (
                lat(f"hop.kup_session{sfx}", S_TRANSPORT,
                    f"{what}: Session exchange round trip (raw stub), 64 B",
                    baseline="bare.bidi64", note=note),
                lat(f"hop.kup_call{sfx}", S_TRANSPORT,
                    f"{what}: Call round trip (raw stub), 64 B",
                    baseline="bare.unary64", note=note),
            )),
        ]
        cpu_specs = [
            cost("bare.unary64", S_TRANSPORT, "server CPU per unary round trip", "us CPU",
                 sub="cpu"),
            cost("bare.bidi64", S_TRANSPORT, "server CPU per bidi round trip", "us CPU",
                 sub="cpu"),
            cost("hop.unary64", S_TRANSPORT, "hop floor: server CPU per unary round trip",
                 "us CPU", sub="cpu", baseline="bare.unary64.cpu"),
            cost("hop.bidi64", S_TRANSPORT, "hop floor: server CPU per bidi round trip",
                 "us CPU", sub="cpu", baseline="bare.bidi64.cpu"),
            cost("hop.kup_session", S_TRANSPORT,
                 "hop floor, kup.v1 messages: server CPU per Session exchange", "us CPU",
                 sub="cpu", baseline="bare.bidi64.cpu"),
            cost("hop.kup_call", S_TRANSPORT, "hop floor, kup.v1 messages: server CPU per Call",
                 "us CPU", sub="cpu", baseline="bare.unary64.cpu"),
            cost("kupd.session_rt", S_E2E, "kupd CPU per Session round trip (client exchange)",
                 "us CPU", sub="cpu", baseline="bare.bidi64.cpu"),
            cost("kupd.session_rt_sr", S_E2E,
                 "kupd CPU per Session round trip (client send+receive)",
                 "us CPU", sub="cpu", baseline="bare.bidi64.cpu"),
            cost("kupd.session_rt_pipe", S_E2E, "kupd CPU per Session round trip (pipelined)",
                 "us CPU", sub="cpu", baseline="bare.bidi64.cpu"),
            cost("kupd.unary_x", S_E2E, "kupd CPU per unary Send (wait_reply)", "us CPU",
                 sub="cpu", baseline="bare.unary64.cpu"),
            cost("kupd.unary_sr", S_E2E, "kupd CPU per unary Send + Receive", "us CPU",
                 sub="cpu", baseline="bare.unary64.cpu"),
            cost("kupd.call_rt", S_E2E, "kupd CPU per Call", "us CPU", sub="cpu",
                 baseline="bare.unary64.cpu"),
            cost("bare.call_pb", S_TRANSPORT, "server CPU per kup.v1 Call echo", "us CPU",
                 sub="cpu"),
            cost("kupd.call_rt_raw", S_E2E, "kupd CPU per Call (raw stub)", "us CPU",
                 sub="cpu", baseline="bare.call_pb.cpu"),
            # the client's own CPU per round trip (the client shares the cores)
            cost("bare.unary64", S_TRANSPORT, "client CPU per unary round trip", "us CPU",
                 sub="ccpu"),
            cost("bare.bidi64", S_TRANSPORT, "client CPU per bidi round trip", "us CPU",
                 sub="ccpu"),
            cost("bare.call_pb", S_TRANSPORT, "client CPU per kup.v1 Call echo (raw stub)",
                 "us CPU", sub="ccpu"),
            cost("kupd.call_rt_raw", S_E2E, "client CPU per Call, raw stub", "us CPU",
                 sub="ccpu", baseline="bare.call_pb.ccpu"),
            cost("kupd.call_rt", S_E2E, "client CPU per Call, kupclient", "us CPU",
                 sub="ccpu", baseline="kupd.call_rt_raw.ccpu"),
            cost("kupd.session_rt_raw", S_E2E, "client CPU per Session exchange, raw stub",
                 "us CPU", sub="ccpu", baseline="bare.bidi64.ccpu"),
            cost("kupd.session_rt", S_E2E, "client CPU per Session exchange, kupclient",
                 "us CPU", sub="ccpu", baseline="kupd.session_rt_raw.ccpu"),
        ]
        kupd_rt_specs = [
            lat("kupd.session_rt", S_E2E, "Session round trip (client exchange), 64 B",
                baseline="bare.bidi64"),
            lat("kupd.session_rt_sr", S_E2E, "Session round trip (client send+receive), 64 B",
                baseline="bare.bidi64"),
            lat("kupd.session_rt_pipe", S_E2E,
                "Session round trip, send+receive pipelined on the stream, 64 B",
                baseline="bare.bidi64"),
            lat("kupd.unary_x", S_E2E, "unary Send with wait_reply (1 RPC), 64 B",
                baseline="bare.unary64"),
            lat("kupd.unary_sr", S_E2E, "unary Send + Receive (2 RPCs), 64 B",
                baseline="bare.unary64"),
            lat("kupd.call_rt", S_E2E, "Call round trip, 64 B", baseline="bare.unary64"),
            lat("kupd.call_rt_raw", S_E2E, "Call round trip, raw kup.v1 stub, 64 B",
                baseline="bare.call_pb"),
            lat("kupd.session_rt_raw", S_E2E, "Session round trip (raw stub exchange), 64 B",
                baseline="bare.bidi64"),
        ]
        # -- the two servers
        bare: Proc | None = None
        bare_pb: Proc | None = None
        bare_pb_why = ""
        pbch: Any = None
        hop: Proc | None = None
        hop_why = ""
        hch: Any = None
        twin: Proc | None = None
        twin_why = ""
        tch: Any = None
        kupd: Any = None
        kupd_why = ""
        async with group(ctx, "grpc: start servers", bare_specs):
            bare = start_bare_server(ctx.tmp / "bare.sock", ctx.logs / "bare.log")
            stack.callback(bare.stop)
            bch = bare_channel(ctx.tmp / "bare.sock")
            stack.push_async_callback(bch.close)
            # e.g. no kupapi: only its figures go
            bare_pb, pbch, bare_pb_why = _optional_server(
                stack, "kup.v1 Call echo server", ctx.tmp / "bare-pb.sock",
                lambda: start_bare_server(ctx.tmp / "bare-pb.sock", ctx.logs / "bare-pb.log",
                                          kup_call=True))

            def hop_start(name: str) -> Callable[[], Proc]:
                def start() -> Proc:
                    sim = stack.enter_context(echo_sim(HOP_PAGES, HOP_CHANNELS,
                                                       rundir=ctx.tmp / f"sim-{name}"))
                    return start_hop_server(ctx.tmp / f"{name}.sock", ctx.logs / f"{name}.log",
                                            sim.device_path("echo"), cfg.call_channels,
                                            kup_v1=True)
                return start

            # e.g. kupsim not built: only the floor figures go
            hop, hch, hop_why = _optional_server(stack, "hop-floor server",
                                                 ctx.tmp / "hop.sock", hop_start("hop"))
            twin, tch, twin_why = _optional_server(stack, "hop-floor twin",
                                                   ctx.tmp / "hop-twin.sock",
                                                   hop_start("hop-twin"))
        if bare is None:
            return
        try:
            kupd = await kupd_sut.KupdSut.start(ctx, stack)
        except (BenchError, ImportError, OSError, RuntimeError) as exc:
            kupd_why = f"{type(exc).__name__}: {(str(exc).splitlines() or [''])[0]}"
            log(f"  ! kupd not available: {kupd_why}")

        # -- round trips
        all_rt = bare_specs + kupd_rt_specs + cpu_specs
        async with group(ctx, "grpc: round trips", all_rt):
            bu, bb = BareUnary(bch), BareBidi(bch)
            stack.push_async_callback(bb.close)
            n = cfg.grpc_rounds
            work: dict[str, TrialFn] = {
                "bare.unary64": _lat(bu, n, "bare unary", bare.pid),
                "bare.bidi64": _lat(bb, n, "bare bidi", bare.pid),
            }
            if bare_pb is not None:
                work["bare.call_pb"] = _lat(_pb_call(pbch), n, "bare kup.v1 Call", bare_pb.pid)
            else:
                ctx.skip([s for s in all_rt if s.workload == "bare.call_pb"], bare_pb_why)
            hb: BareBidi | None = None
            hop_kup_sessions: list[Any] = []
            if hop is not None:
                hb = BareBidi(hch)
                stack.push_async_callback(hb.close)
                work["hop.unary64"] = _lat(BareUnary(hch), n, "hop unary", hop.pid)
                work["hop.bidi64"] = _lat(hb, n, "hop bidi", hop.pid)
                hop_kup_sessions = await _hop_kup_sessions(hch, 1)
                work["hop.kup_session"] = _lat(hop_kup_sessions[0], n, "hop kup.v1 Session",
                                               hop.pid)
                work["hop.kup_call"] = _lat(_pb_call(hch), n, "hop kup.v1 Call", hop.pid)
            else:
                ctx.skip([s for s in all_rt if s.workload.startswith("hop.")
                          and not s.workload.endswith("_twin")], hop_why)
            if twin is not None:
                twin_sessions = await _hop_kup_sessions(tch, 1)
                hop_kup_sessions += twin_sessions
                work["hop.kup_session_twin"] = _lat(twin_sessions[0], n, "hop twin Session",
                                                    twin.pid)
                work["hop.kup_call_twin"] = _lat(_pb_call(tch), n, "hop twin Call", twin.pid)
            else:
                ctx.skip([s for s in all_rt if s.workload.endswith("_twin")], twin_why)
            echoers: dict[str, Any] = {}
            if kupd is not None:
                echoers = await kupd.rt_echoers()
                for name, e in echoers.items():
                    work[name] = _lat(e, n, name, kupd.pid)
            else:
                ctx.skip([s for s in all_rt if s.workload.startswith("kupd.")], kupd_why)
            try:
                await ctx.measure(work, all_rt)
            finally:
                await bb.close()
                if hb is not None:
                    await hb.close()
                for hs in hop_kup_sessions:
                    await hs.close()
                if kupd is not None:
                    await kupd.close_idle(list(echoers.values()))

        # -- stream throughput
        pipe: Any = None
        pipe_pb: Any = None
        client: Any = None
        stripes: dict[int, Any] = {}
        largest: int | None = None
        if kupd is not None:
            try:
                pipe, pipe_pb, client = await kupd.pump_echoers()
                largest = kupd.max_msg
                for k in cfg.stripe_sessions:
                    stripes[k] = await kupd.stripes(k)
            except Exception as exc:
                kupd_pump_why = f"{type(exc).__name__}: {(str(exc).splitlines() or [''])[0]}"
                log(f"  ! kupd pump set-up: {kupd_pump_why}")
        else:
            kupd_pump_why = kupd_why
        sizes = _pump_sizes(largest)
        pump_specs: list[FigSpec] = []
        for nm, pretty, _size in sizes:
            pump_specs.append(rate(f"bare.pump_{nm}", S_TRANSPORT,
                                   f"bidi stream throughput, {pretty}"))
            if nm != "max":
                pump_specs.append(rate(f"hop.pump_{nm}", S_TRANSPORT,
                                       f"hop floor: bidi stream throughput, {pretty}",
                                       baseline=f"bare.pump_{nm}", note=HOP_NOTE))
            pump_specs.append(rate(f"kupd.pump_{nm}", S_E2E,
                                   f"Session stream throughput (pipelined exchanges), {pretty}",
                                   baseline=f"bare.pump_{nm}"))
            if nm != "max":
                pump_specs.append(rate(
                    f"kupd.pump_pb_{nm}", S_E2E,
                    f"Session stream throughput, client on the generated stubs, {pretty}",
                    baseline=f"kupd.pump_{nm}"))
        pump_specs.append(rate("kupd.client_pp_64k", S_E2E,
                               "kupclient channel exchange throughput, 64 KiB",
                               baseline="bare.pump_64k"))
        # Not the target rows above (one Session, one channel): one client
        # striping its pump over k Sessions, against the one bare stream.
        stripe_sizes = [(nm, pretty, size) for nm, pretty, size in sizes if nm != "max"]
        for k in cfg.stripe_sessions:
            for nm, pretty, _size in stripe_sizes:
                pump_specs.append(rate(
                    f"kupd.stripe{k}_{nm}", S_E2E,
                    f"stream throughput striped over {k} Sessions (pipelined exchanges), "
                    f"{pretty}", baseline=f"bare.pump_{nm}"))
        async with group(ctx, "grpc: stream throughput", pump_specs):
            work = {}
            for nm, _pretty, size in sizes:
                work[f"bare.pump_{nm}"] = _pump(bb, size, cfg.pump_bytes, f"bare pump {nm}")
                if hb is not None and nm != "max":
                    # a pump opens a fresh stream per trial (as ``bb``'s): the
                    # round trips' stream, closed by now, only names the channel
                    work[f"hop.pump_{nm}"] = _pump(hb, size, cfg.pump_bytes, f"hop pump {nm}")
            if hb is None:
                ctx.skip([s for s in pump_specs if s.workload.startswith("hop.")], hop_why)
            if pipe is not None:
                for nm, _pretty, size in sizes:
                    if size <= kupd.max_msg:
                        work[f"kupd.pump_{nm}"] = _pump(pipe, size, cfg.pump_bytes,
                                                        f"kupd pump {nm}")
                        if nm != "max":
                            work[f"kupd.pump_pb_{nm}"] = _pump(
                                pipe_pb, size, cfg.pump_bytes, f"kupd pump {nm} (stubs)")
                work["kupd.client_pp_64k"] = _pump(client, 64 * KIB, cfg.pump_bytes,
                                                   "kupclient 64k")
                for k, sp in stripes.items():
                    for nm, _pretty, size in stripe_sizes:
                        work[f"kupd.stripe{k}_{nm}"] = _pump(sp, size, cfg.pump_bytes,
                                                             f"kupd pump {nm} over {k}")
            else:
                ctx.skip([s for s in pump_specs if s.workload.startswith("kupd.")],
                         kupd_pump_why)
            try:
                await ctx.measure(work, pump_specs)
            finally:
                if kupd is not None and pipe is not None:
                    await kupd.close_idle([pipe, pipe_pb, client, *stripes.values()])

        # -- scale
        scale_specs: list[FigSpec] = []
        for k in cfg.scale_clients:
            for who, base in (("bare", None), ("hop", "bare"), ("hopkup", "bare"),
                              ("kupdraw", "bare"), ("kupd", "bare")):
                what = {"bare": "bidi streams", "hop": "hop floor: bidi streams + a channel each",
                        "hopkup": "hop floor: kup.v1 Sessions (raw stub), a channel each",
                        # the hop floor's client on kupd: kupd's own cost at this load
                        "kupdraw": "Sessions (raw stub), one channel each",
                        "kupd": "Sessions, one channel each"}[who]
                scale_specs.append(rate(
                    f"scale.{who}_{k}", S_SCALE, f"{who}: {k} clients ({what}), aggregate",
                    sub="rate", unit="rt/s",
                    baseline=f"scale.bare_{k}.rate" if base else None))
                scale_specs.append(lat(
                    f"scale.{who}_{k}", S_SCALE, f"{who}: {k} clients, per round trip",
                    sub="lat", baseline=f"scale.bare_{k}.lat" if base else None))
        c, cc = cfg.call_clients, cfg.call_channels
        scale_specs += [
            rate("scale.bare_call", S_SCALE, f"bare: {c} clients unary, aggregate",
                 sub="rate", unit="rt/s"),
            lat("scale.bare_call", S_SCALE, f"bare: {c} clients unary, per call", sub="lat"),
            rate("scale.hop_call", S_SCALE,
                 f"hop: {c} clients unary over {cc} channels (hop floor), aggregate",
                 sub="rate", unit="rt/s", baseline="scale.bare_call.rate"),
            lat("scale.hop_call", S_SCALE, f"hop: {c} clients unary, per call", sub="lat",
                baseline="scale.bare_call.lat"),
            rate("scale.kupd_call", S_SCALE,
                 f"kupd: {c} clients Call over {cc} channels, aggregate", sub="rate",
                 unit="rt/s", baseline="scale.bare_call.rate"),
            lat("scale.kupd_call", S_SCALE, f"kupd: {c} clients Call, per call", sub="lat",
                baseline="scale.bare_call.lat"),
            # the same 256 raw-stub clients on one gRPC channel against the bare
            # kup.v1 Call echo: what the API's messages alone cost at this load
            rate("scale.bare_call_pb", S_SCALE,
                 f"bare: {c} clients kup.v1 Call echo (protobuf), aggregate", sub="rate",
                 unit="rt/s"),
            lat("scale.bare_call_pb", S_SCALE,
                f"bare: {c} clients kup.v1 Call echo (protobuf), per call", sub="lat"),
        ]
        async with group(ctx, "grpc: scale", scale_specs):
            if kupd is None:
                ctx.skip([s for s in scale_specs if s.workload.startswith("scale.kupd")],
                         kupd_why)
            if hop is None:
                ctx.skip([s for s in scale_specs if s.workload.startswith("scale.hop")],
                         hop_why)
            for k in cfg.scale_clients:
                n_each = max(1, cfg.scale_total // k)
                bstreams = [BareBidi(bch) for _ in range(k)]
                hstreams = [BareBidi(hch) for _ in range(k)] if hop is not None else []
                hkups = await _hop_kup_sessions(hch, k) if hop is not None else []
                sessions: list[Any] = []
                raw_sessions: list[Any] = []
                try:
                    work = {f"scale.bare_{k}": _conc([s.rt for s in bstreams], n_each,
                                                     f"bare x{k}")}
                    if hstreams:
                        work[f"scale.hop_{k}"] = _conc([s.rt for s in hstreams], n_each,
                                                       f"hop x{k}")
                        work[f"scale.hopkup_{k}"] = _conc([s.rt for s in hkups], n_each,
                                                          f"hop kup.v1 x{k}")
                    if kupd is not None:
                        sessions = await kupd.sessions(k)
                        work[f"scale.kupd_{k}"] = _conc([s.rt for s in sessions], n_each,
                                                        f"kupd x{k}")
                        raw_sessions = await kupd.sessions(k, raw=True)
                        work[f"scale.kupdraw_{k}"] = _conc([s.rt for s in raw_sessions], n_each,
                                                           f"kupd raw stub x{k}")
                    await ctx.measure(work, [s for s in scale_specs
                                             if s.workload in work], cfg.scale_trials)
                finally:
                    for bs in bstreams + hstreams:
                        await bs.close()
                    for hs in hkups:
                        await hs.close()
                    if kupd is not None:
                        await kupd.close_sessions(sessions + raw_sessions)
            n_each = max(1, cfg.scale_total // c)
            work = {"scale.bare_call": _conc([bu.rt] * c, n_each, "bare unary x256")}
            if bare_pb is not None:
                pb_rt = _pb_call(pbch).rt
                work["scale.bare_call_pb"] = _conc([pb_rt] * c, n_each, "bare kup.v1 Call x256")
            else:
                ctx.skip([s for s in scale_specs if s.workload == "scale.bare_call_pb"],
                         bare_pb_why)
            if hop is not None:
                work["scale.hop_call"] = _conc([BareUnary(hch).rt] * c, n_each, "hop unary x256")
            if kupd is not None:
                work["scale.kupd_call"] = _conc(kupd.callers(c), n_each, "kupd call x256")
            await ctx.measure(work, [s for s in scale_specs if "call" in s.workload],
                              cfg.scale_trials)

        # -- idle cost
        idle_specs = [
            cost("idle.bare_cpu", S_IDLE,
                 f"bare server CPU per 1 s, {cfg.idle_sessions} idle streams", "% core"),
            cost("idle.kupd_cpu", S_IDLE,
                 f"kupd CPU per 1 s, {cfg.idle_sessions} idle Sessions + {cfg.idle_channels} "
                 "idle leased channels", "% core", baseline="idle.bare_cpu"),
            cost("idle.kupd_cpu_stat", S_IDLE,
                 f"kupd CPU over the whole {cfg.idle_seconds} s (utime+stime)", "% core"),
            lat("idle.wake_bare", S_IDLE,
                f"bare gRPC bidi round trip after {cfg.wake_idle_s:g} s idle, 64 B"),
            lat("idle.wake_kupd", S_IDLE,
                f"kupd Session round trip after {cfg.wake_idle_s:g} s idle, 64 B",
                baseline="idle.wake_bare"),
            lat("idle.arrive_kupd", S_IDLE,
                f"message arriving on a Session idle for {cfg.wake_idle_s:g} s: "
                "module's hand-over -> client has it through kupd, 64 B",
                baseline="idle.arrive_chan"),
        ]
        async with group(ctx, "grpc: idle cost", idle_specs):
            bstreams = [BareBidi(bch) for _ in range(cfg.idle_sessions)]
            for s in bstreams:
                await s.rt(PAYLOAD)  # streams really open
            assert bare is not None
            samples, _total = await cpu_samples(bare.pid, cfg.idle_seconds)
            _add(ctx, idle_specs[0], samples)
            _add(ctx, idle_specs[3], await _idle_rts(bstreams[0], cfg))
            for s in bstreams:
                await s.close()
            if kupd is None:
                ctx.skip(idle_specs[1:3] + idle_specs[4:], kupd_why)
            else:
                idle = await kupd.idle_population(cfg.idle_sessions, cfg.idle_channels)
                samples, total = await cpu_samples(kupd.pid, cfg.idle_seconds)
                _add(ctx, idle_specs[1], samples)
                _add(ctx, idle_specs[2], [total])
                await kupd.close_idle(idle)
                sess = (await kupd.sessions(1))[0]
                await sess.rt(PAYLOAD)
                wake = await _idle_rts(sess, cfg)
                # the module answers a second after the request: kupd's
                # loop and the client both wait that second
                arrive: list[float] = []
                req = stamp_request(int(cfg.wake_idle_s * 1000))
                for _ in range(cfg.wake_samples):
                    reply = await sess.rt(req)
                    arrive.append(stamp_latency_us(reply, time.monotonic_ns()))
                await kupd.close_sessions([sess])
                _add(ctx, idle_specs[4], wake)
                _add(ctx, idle_specs[5], arrive)

        # -- memory
        mem_specs: list[FigSpec] = []
        for k in cfg.memory_sessions:
            mem_specs.append(cost(f"mem.bare_{k}", S_MEM, f"bare server RSS, {k} streams",
                                  "MiB"))
            mem_specs.append(cost(f"mem.kupd_{k}", S_MEM, f"kupd RSS, {k} Sessions", "MiB",
                                  baseline=f"mem.bare_{k}"))
        async with group(ctx, "grpc: memory", mem_specs):
            for k in cfg.memory_sessions:
                bstreams = [BareBidi(bch) for _ in range(k)]
                await asyncio.gather(*(s.rt(PAYLOAD) for s in bstreams))
                assert bare is not None
                _add(ctx, _spec(mem_specs, f"mem.bare_{k}"), await rss_samples(bare.pid))
                for s in bstreams:
                    await s.close()
                if kupd is None:
                    ctx.skip([_spec(mem_specs, f"mem.kupd_{k}")], kupd_why)
                    continue
                try:
                    sessions = await kupd.sessions(k)
                except (BenchError, RuntimeError, OSError) as exc:
                    ctx.skip([_spec(mem_specs, f"mem.kupd_{k}")],
                             f"{type(exc).__name__}: {exc}")
                    continue
                _add(ctx, _spec(mem_specs, f"mem.kupd_{k}"), await rss_samples(kupd.pid))
                await kupd.close_sessions(sessions)


def _spec(specs: list[FigSpec], key: str) -> FigSpec:
    return next(s for s in specs if s.key == key)


def _add(ctx: RunCtx, s: FigSpec, samples: list[float]) -> None:
    ctx.report.add(Figure(s.key, s.section, s.label, s.unit, s.better, samples, s.baseline,
                          s.note))


async def cpu_samples(pid: int, seconds: int) -> tuple[list[float], float]:
    """CPU use of ``pid`` in % of one core: per-second samples from the
    threads' schedstat run time (ns resolution), and the whole window from
    /proc/<pid>/stat utime+stime (clock-tick resolution)."""
    out: list[float] = []
    await asyncio.sleep(0.5)  # let set-up work finish
    t_start, stat_start = time.monotonic(), cpu_seconds(pid)
    prev_ns, prev_t = run_ns(pid), t_start
    for _ in range(seconds):
        await asyncio.sleep(1.0)
        ns, t = run_ns(pid), time.monotonic()
        out.append(100.0 * (ns - prev_ns) / 1e9 / (t - prev_t))
        prev_ns, prev_t = ns, t
    total = 100.0 * (cpu_seconds(pid) - stat_start) / (time.monotonic() - t_start)
    return out, total


async def rss_samples(pid: int, n: int = 5) -> list[float]:
    """RSS of ``pid`` in MiB, read ``n`` times 0.2 s apart after a settle."""
    await asyncio.sleep(0.5)
    out: list[float] = []
    for _ in range(n):
        out.append(rss_bytes(pid) / MIB)
        await asyncio.sleep(0.2)
    return out

"""Groups 1-3 and the channel wake-up: the C floor, the unix-socket
alternative, the Python channel layer.

One kupsim (echo module, the largest channel the ABI allows) serves the C
floor and the channel layer; C echo processes (``uds_pingpong -S``) serve the
Python unix-socket baseline.  Round-trip figures are measured interleaved.
"""

from __future__ import annotations

import asyncio
import contextlib
import mmap
import select
import time
from typing import Any

from .config import KIB
from .context import FigSpec, RunCtx, group, lat, rate
from .harness import Figure, TrialFn
from .native import MIB, UdsClient, build_c, c_trial, start_uds_server
from .procs import BenchError, Proc
from .sections import S_CHAN, S_FLOOR, S_IDLE, S_SYSCALL
from .shapes import check_echo, pattern, stamp_latency_us, stamp_request

__all__ = ["arrival_samples", "run"]

# The largest channel: KUP_MAX_PAGES pages per direction (kup_abi.h).
ECHO_PAGES_MAX = 1024
ECHO_CHANNELS = 4
PAGE = mmap.PAGESIZE
RECEIVE_TIMEOUT_S = 10.0


def _sizes(max_msg: int) -> list[tuple[str, int]]:
    return [("4k", 4 * KIB), ("64k", 64 * KIB), ("max", max_msg)]


class ChanEcho:
    """One channel-layer channel on the echo device, ready to send.

    ``rt`` is a round trip through the fastest public API,
    ``Channel.exchange`` (one call into the extension); ``rt_sr`` the
    two-call form, ``send`` then ``receive``.
    """

    def __init__(self, dev: Any) -> None:
        self.ch = dev.channel()
        if not self.ch.my_turn():
            self.ch.receive(timeout=RECEIVE_TIMEOUT_S)  # the kernel's first hand-over

    def rt(self, data: bytes) -> bytes:
        return self.ch.exchange(data, RECEIVE_TIMEOUT_S).data  # type: ignore[no-any-return]

    def rt_sr(self, data: bytes) -> bytes:
        self.ch.send(data)
        m = self.ch.receive(timeout=RECEIVE_TIMEOUT_S)
        return bytes(m.data)

    def latency(self, data: bytes, n: int) -> dict[str, list[float]]:
        lat: list[float] = []
        got = b""
        ex = self.ch.exchange
        for _ in range(n):
            t0 = time.perf_counter_ns()
            got = ex(data, RECEIVE_TIMEOUT_S).data
            lat.append((time.perf_counter_ns() - t0) / 1000.0)
        check_echo(data, got, "channel layer")
        return {"": lat}

    def latency_sr(self, data: bytes, n: int) -> dict[str, list[float]]:
        lat: list[float] = []
        got = b""
        for _ in range(n):
            t0 = time.perf_counter_ns()
            got = self.rt_sr(data)
            lat.append((time.perf_counter_ns() - t0) / 1000.0)
        check_echo(data, got, "channel layer (send+receive)")
        return {"": lat}

    def throughput(self, data: bytes, count: int) -> dict[str, list[float]]:
        t0 = time.perf_counter()
        got = b""
        for _ in range(count):
            got = self.rt(data)
        dt = time.perf_counter() - t0
        check_echo(data, got, "channel layer")
        return {"": [len(data) * count / MIB / dt]}

    def close(self) -> None:
        self.ch.close()


def arrival_samples(dev: Any, idle_ms: int, n: int) -> list[float]:
    """n messages each arriving on a channel idle for idle_ms: the receiver
    asleep in poll(2) on the channel's fd, then try_receive."""
    req = stamp_request(idle_ms)
    out: list[float] = []
    with dev.channel() as ch:
        if not ch.my_turn():
            ch.receive(timeout=RECEIVE_TIMEOUT_S)
        fd = ch.fileno()
        poller = select.poll()
        poller.register(fd, select.POLLIN)
        for _ in range(n):
            ch.send(req)
            m = None
            while m is None:
                if not poller.poll(idle_ms + RECEIVE_TIMEOUT_S * 1000):
                    raise BenchError("channel arrival: no stamped reply in time")
                m = ch.try_receive()
            out.append(stamp_latency_us(m.data, time.monotonic_ns()))
    return out


def arrival_samples_blocking(dev: Any, idle_ms: int, n: int) -> list[float]:
    """The same, the receiver asleep inside ``Channel.receive`` (libkup's
    blocking receive, the GIL released): one thread per channel, the way a
    program with a single channel would wait."""
    req = stamp_request(idle_ms)
    out: list[float] = []
    with dev.channel() as ch:
        if not ch.my_turn():
            ch.receive(timeout=RECEIVE_TIMEOUT_S)
        receive = ch.receive
        for _ in range(n):
            ch.send(req)
            m = receive(idle_ms / 1000 + RECEIVE_TIMEOUT_S)
            out.append(stamp_latency_us(m.data, time.monotonic_ns()))
    return out


def _why(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}"


def _chan_rt(chan: ChanEcho, data: bytes, n: int) -> TrialFn:
    async def trial() -> dict[str, list[float]]:
        return chan.latency(data, n)
    return trial


def _chan_rt_sr(chan: ChanEcho, data: bytes, n: int) -> TrialFn:
    async def trial() -> dict[str, list[float]]:
        return chan.latency_sr(data, n)
    return trial


def _c_floor(argv: list[str], env: dict[str, str]) -> TrialFn:
    async def trial() -> dict[str, list[float]]:
        return await c_trial(argv, env, "kup_floor")
    return trial


def _uds_tp(cli: UdsClient, data: bytes, count: int) -> TrialFn:
    async def trial() -> dict[str, list[float]]:
        return cli.throughput(data, count)
    return trial


def _chan_tp(chan: ChanEcho, data: bytes, count: int) -> TrialFn:
    async def trial() -> dict[str, list[float]]:
        return chan.throughput(data, count)
    return trial


async def run(ctx: RunCtx) -> None:
    cfg = ctx.cfg
    rt_specs = [
        lat("uds.c64", S_SYSCALL, "C unix-socket round trip, 64 B"),
        lat("floor.c64", S_FLOOR, "C libkup round trip, 64 B", baseline="uds.c64"),
        lat("uds.py64", S_SYSCALL, "Python unix-socket round trip, 64 B (C echo process)"),
        lat("chan.rt64", S_CHAN, "channel round trip (Channel.exchange), 64 B",
            baseline="uds.py64"),
        lat("chan.rt64_sr", S_CHAN, "channel round trip (send + receive), 64 B",
            baseline="uds.py64"),
    ]
    tp_specs = []
    for nm, pretty in (("4k", "4 KiB"), ("64k", "64 KiB"), ("max", "max")):
        tp_specs.append(rate(f"uds.py_tp_{nm}", S_SYSCALL,
                             f"Python unix-socket ping-pong throughput, {pretty}"))
        tp_specs.append(rate(f"chan.tp_{nm}", S_CHAN,
                             f"channel throughput (Channel.exchange), {pretty}",
                             baseline=f"uds.py_tp_{nm}"))
    wake_spec = lat("idle.wake_chan", S_IDLE,
                    f"channel round trip (Channel.exchange) after {cfg.wake_idle_s:g} s idle, 64 B",
                    baseline="chan.rt64")
    arrive_c_spec = lat("idle.arrive_c", S_IDLE,
                        f"message arriving on a channel idle for {cfg.wake_idle_s:g} s: "
                        "module's hand-over -> C libkup receive returns, 64 B")
    arrive_spec = lat("idle.arrive_chan", S_IDLE,
                      f"message arriving on a channel idle for {cfg.wake_idle_s:g} s: "
                      "module's hand-over -> Python receiver has it, 64 B",
                      baseline="idle.arrive_c")
    arrive_block_spec = lat("idle.arrive_chan_block", S_IDLE,
                            f"message arriving on a channel idle for {cfg.wake_idle_s:g} s: "
                            "module's hand-over -> Python blocking receive returns, 64 B",
                            baseline="idle.arrive_c")

    idle_specs = [wake_spec, arrive_c_spec, arrive_spec, arrive_block_spec]
    async with group(ctx, "native: floor, unix socket, channel layer",
                     rt_specs + tp_specs + idle_specs):
        uds_prog = build_c(ctx.root, "uds")
        payload = pattern(64)
        with contextlib.ExitStack() as stack:
            # -- baselines that need nobody else's code
            py_srv: Proc = stack.enter_context(start_uds_server(
                uds_prog, ctx.tmp / "uds64.sock", 64, ctx.logs / "uds64.log"))
            del py_srv
            uds = UdsClient(ctx.tmp / "uds64.sock", 64)
            stack.callback(uds.close)

            async def c_uds() -> dict[str, list[float]]:
                return await c_trial(
                    [str(uds_prog), "-d", str(ctx.tmp / "c-uds.sock"), "-n", str(cfg.c_rounds),
                     "-w", str(cfg.c_warmup_rounds), "-s", "64"], None, "uds_pingpong")

            async def py_uds() -> dict[str, list[float]]:
                return uds.latency(payload, cfg.py_rounds)

            workloads: dict[str, TrialFn] = {"uds.c64": c_uds, "uds.py64": py_uds}

            # -- kupsim echo: the floor and the channel layer
            sim_why = ""
            chan: ChanEcho | None = None
            try:
                from .kupsim_echo import echo_sim

                sim = stack.enter_context(echo_sim(ECHO_PAGES_MAX, ECHO_CHANNELS))
                from kupd.channel import Device

                dev = Device.open(sim.device_path("echo"))
                stack.callback(dev.close)
                chan = ChanEcho(dev)
                stack.callback(chan.close)
                workloads["chan.rt64"] = _chan_rt(chan, payload, cfg.py_rounds)
                workloads["chan.rt64_sr"] = _chan_rt_sr(chan, payload, cfg.py_rounds)
            except (BenchError, ImportError, OSError) as exc:
                sim_why = _why(exc)
                ctx.skip([rt_specs[1], rt_specs[3], rt_specs[4]], sim_why)
            floor_argv: list[str] | None = None
            if chan is not None:
                try:
                    floor_prog = build_c(ctx.root, "floor")
                    floor_argv = [str(floor_prog), "-d", "echo", "-s", "64"]
                    argv = [*floor_argv, "-n", str(cfg.c_rounds), "-w", str(cfg.c_warmup_rounds)]
                    workloads["floor.c64"] = _c_floor(argv, sim.env())
                except BenchError as exc:
                    ctx.skip([rt_specs[1]], _why(exc))

            await ctx.measure(workloads, rt_specs)

            # -- throughput: Python unix socket vs channel layer, same sizes
            max_msg = chan.ch.max_msg if chan is not None else ECHO_PAGES_MAX * PAGE
            tp_work: dict[str, TrialFn] = {}
            for nm, size in _sizes(max_msg):
                sock = ctx.tmp / f"uds-{nm}.sock"
                stack.enter_context(start_uds_server(uds_prog, sock, size,
                                                     ctx.logs / f"uds-{nm}.log"))
                cli = UdsClient(sock, size)
                stack.callback(cli.close)
                data = pattern(size)
                count = max(4, cfg.chan_pump_bytes // size)
                tp_work[f"uds.py_tp_{nm}"] = _uds_tp(cli, data, count)
                if chan is not None:
                    tp_work[f"chan.tp_{nm}"] = _chan_tp(chan, data, count)
            if chan is None:
                ctx.skip([s for s in tp_specs if s.workload.startswith("chan.")]
                         + idle_specs, sim_why)
            tp_specs = [FigSpec(s.workload, s.section,
                                s.label.replace(", max", f", max {max_msg // KIB} KiB"),
                                s.unit, s.better, s.sub, s.baseline) for s in tp_specs]
            await ctx.measure(tp_work, tp_specs)
            if chan is None:
                return

            # -- wake-up: a round trip on a channel idle for a second
            # (the API call itself between the clock reads: no bench helper
            # frame, each costs ~10 us cold after the idle second)
            samples: list[float] = []
            exchange = chan.ch.exchange
            for _ in range(cfg.wake_samples):
                await asyncio.sleep(cfg.wake_idle_s)
                t0 = time.perf_counter_ns()
                m = exchange(payload, RECEIVE_TIMEOUT_S)
                samples.append((time.perf_counter_ns() - t0) / 1000.0)
                check_echo(payload, m.data, "channel wake-up")
            s = wake_spec
            ctx.report.add(Figure(s.key, s.section, s.label, s.unit, s.better, samples,
                                  s.baseline, "both sides asleep on their wake-up fds"))

            # -- arrival: the module answers a second later; the receiver
            # sleeps in poll on the channel's fd (as kupd's event loop does)
            # and takes the message; latency = its clock minus the module's
            # stamp (echo's "!stamp", both CLOCK_MONOTONIC)
            idle_ms = int(cfg.wake_idle_s * 1000)
            s = arrive_c_spec
            if floor_argv is None:
                ctx.skip([s], "kup_floor not built")
            else:
                got = await c_trial(
                    [*floor_argv, "-n", str(cfg.wake_samples), "-i", str(idle_ms)],
                    sim.env(), "kup_floor -i",
                    timeout=cfg.wake_samples * (cfg.wake_idle_s + 10.0))
                ctx.report.add(Figure(s.key, s.section, s.label, s.unit, s.better, got[""],
                                      s.baseline, "receiver asleep in libkup's receive"))
            s = arrive_spec
            arrivals = arrival_samples(dev, idle_ms, cfg.wake_samples)
            ctx.report.add(Figure(s.key, s.section, s.label, s.unit, s.better, arrivals,
                                  s.baseline, "receiver asleep in poll on the channel's fd"))
            s = arrive_block_spec
            arrivals = arrival_samples_blocking(dev, idle_ms, cfg.wake_samples)
            ctx.report.add(Figure(s.key, s.section, s.label, s.unit, s.better, arrivals,
                                  s.baseline, "receiver asleep in Channel.receive"))

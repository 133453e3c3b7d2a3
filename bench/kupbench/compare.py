"""Two kupd trees in ONE run: before/after figures of a change to kupd.

Usage (``bench/`` and the client on ``PYTHONPATH``, as for ``-m kupbench``)::

    git archive OLD kupd clients protos | tar -x -C /tmp/before
    cp kupd/_kupchan*.so /tmp/before/kupd/
    (cd /tmp/before && scripts/gen-proto.sh ...)   # or copy clients/python/kupapi
    python -m kupbench.compare --before /tmp/before [--trials 8] [--out x.json] [--seed N]

The bare grpc.aio echo server, kupd from ``--before`` and kupd from this
tree run at once (each kupd in front of its own kupsim echo hosts, started
from its own tree); every workload's trials are interleaved
(:func:`kupbench.harness.run_interleaved`) and every figure is printed as a
ratio to the bare server measured in the same run.  The client library is
this tree's for both kupds, so only the server differs: each kupd is
driven with send + receive (``_sr``) and with ``exchange`` (``_x``, the
Session / Send ``wait_reply`` shape; the old tree must have it), so that
``before.X`` vs ``after.X`` compares servers under the same protocol.
``--shapes x`` (or ``sr``) runs one shape only (shorter runs).

``--only`` picks workload groups: ``rt`` (round trips), ``call`` (Call through
kupclient and through the raw stub on both kupds, each with the client's own
CPU per round trip, "ccpu", and 256 raw-stub Call clients), ``scale``,
``pump``.  Default: rt, scale, pump.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import secrets
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from . import kupd_sut
from .bare import BareBidi, BareUnary, bare_channel, start_bare_server
from .config import KIB, MIB, Config
from .context import ROOT, RunCtx, log
from .harness import Report, TrialFn, run_interleaved
from .procs import run_ns
from .shapes import Echoer, concurrent_trial, latency_trial, pattern, pump_trial

__all__ = ["main"]

P64 = pattern(64)
Samples = dict[str, dict[str, list[float]]]


def _lat(e: Echoer, n: int, pid: int) -> TrialFn:
    """Latencies; "cpu" = the server's CPU per round trip, "ccpu" = this
    (client) process's CPU per round trip, all its threads."""
    async def trial() -> dict[str, list[float]]:
        c0, cc0 = run_ns(pid), time.process_time()
        out = await latency_trial(e, P64, n, "compare")
        out["cpu"] = [(run_ns(pid) - c0) / 1000.0 / n]
        out["ccpu"] = [(time.process_time() - cc0) * 1e6 / n]
        return out

    return trial


def _conc(echoers: list[Any], n_each: int, pid: int) -> TrialFn:
    async def trial() -> dict[str, list[float]]:
        c0 = run_ns(pid)
        out = await concurrent_trial([e.rt for e in echoers], P64, n_each, "compare")
        out["cpu"] = [(run_ns(pid) - c0) / 1000.0 / (n_each * len(echoers))]
        return out

    return trial


def _pump(e: Echoer, size: int, total: int) -> TrialFn:
    data = pattern(size)
    count = max(4, total // size)

    async def trial() -> dict[str, list[float]]:
        return await pump_trial(e, data, count, "compare")

    return trial


def _on_error(name: str, exc: BaseException) -> None:
    log(f"  ! {name}: {type(exc).__name__}: {exc}")


async def _run(before: Path, trials: int, tmp: Path, only: frozenset[str],
               shapes: frozenset[str], seed: int) -> Samples:
    cfg = Config(seed=seed)
    res: Samples = {}
    async with contextlib.AsyncExitStack() as stack:
        bare = start_bare_server(tmp / "bare.sock", tmp / "bare.log")
        stack.callback(bare.stop)
        bch = bare_channel(tmp / "bare.sock")
        stack.push_async_callback(bch.close)
        ctx_b = RunCtx(cfg, tmp / "before", Report({}))
        ctx_b.root = before
        old = await kupd_sut.KupdSut.start(ctx_b, stack)
        new = await kupd_sut.KupdSut.start(RunCtx(cfg, tmp / "after", Report({})), stack)
        log(f"pids: bare {bare.pid}, before {old.pid}, after {new.pid}")
        cs, le, ce = kupd_sut.ClientSession, kupd_sut.LeaseEcho, kupd_sut.CallEcho
        rce = kupd_sut.RawCallEcho
        n = cfg.grpc_rounds
        bb = BareBidi(bch)
        stack.push_async_callback(bb.close)
        work: dict[str, TrialFn] = {"bare.unary": _lat(BareUnary(bch), n, bare.pid)}
        if "rt" in only:
            work.update({
                "bare.bidi": _lat(bb, n, bare.pid),
            })
            for shape in sorted(shapes):
                x = shape == "x"
                work.update({
                    f"before.session_{shape}": _lat(await cs.open(old.client, "echo", x), n,
                                                    old.pid),
                    f"after.session_{shape}": _lat(await cs.open(new.client, "echo", x), n,
                                                   new.pid),
                    f"before.unary_{shape}": _lat(await le.open(old.client, "echo", x), n,
                                                  old.pid),
                    f"after.unary_{shape}": _lat(await le.open(new.client, "echo", x), n,
                                                 new.pid),
                })
        if "rt" in only or "call" in only:
            work.update({
                "before.call": _lat(ce(old.client, "echo"), n, old.pid),
                "after.call": _lat(ce(new.client, "echo"), n, new.pid),
            })
        if "call" in only:
            work.update({
                "before.call_raw": _lat(rce(old.stub, old.pb, "echo"), n, old.pid),
                "after.call_raw": _lat(rce(new.stub, new.pb, "echo"), n, new.pid),
            })
        log("round trips ...")
        res.update(await run_interleaved(work, trials, cfg.warmup, _on_error, cfg.seed))
        if "call" in only:
            c = cfg.call_clients
            n_each = max(1, cfg.scale_total // c)
            work = {
                "bare.unary_x256": _conc([BareUnary(bch)] * c, n_each, bare.pid),
                "before.call_x256": _conc(
                    [rce(old.stub, old.pb, "echo", f"c{i}") for i in range(c)], n_each, old.pid),
                "after.call_x256": _conc(
                    [rce(new.stub, new.pb, "echo", f"c{i}") for i in range(c)], n_each, new.pid),
            }
            log(f"{c} Call clients ...")
            res.update(await run_interleaved(work, trials, cfg.warmup, _on_error, cfg.seed))
        if "scale" not in only and "pump" not in only:
            return res

        k = cfg.scale_clients[-1]
        n_each = max(1, cfg.scale_total // k)
        sessions = {}
        for shape in sorted(shapes):
            sessions[f"before.sessions_{shape}"] = await old.sessions(k)
            sessions[f"after.sessions_{shape}"] = await new.sessions(k)
        for name, ss in sessions.items():
            for s in ss:
                s.exchange = name.endswith("_x")
        work = {f"bare.streams{k}": _conc([BareBidi(bch) for _ in range(k)], n_each, bare.pid)}
        for name, ss in sessions.items():
            work[f"{name}{k}"] = _conc(list(ss), n_each, old.pid if "before" in name else new.pid)
        log(f"{k} clients ...")
        if "scale" in only:
            res.update(await run_interleaved(work, trials, cfg.warmup, _on_error, cfg.seed))
        for name, ss in sessions.items():
            await (old if name.startswith("before.") else new).close_sessions(ss)
        if "pump" not in only:
            return res

        rs = kupd_sut.RawSession
        pumps = {}
        for shape in sorted(shapes):
            x = shape == "x"
            pumps[f"before.pump_{shape}"] = await rs(old.stub, old.pb, old.big_device, x).open()
            pumps[f"after.pump_{shape}"] = await rs(new.stub, new.pb, new.big_device, x).open()
        work = {}
        for label, size in (("64k", 64 * KIB), ("1m", MIB)):
            work[f"bare.pump_{label}"] = _pump(bb, size, cfg.pump_bytes)
            for name, p in pumps.items():
                work[f"{name}_{label}"] = _pump(p, size, cfg.pump_bytes)
        log("stream throughput ...")
        res.update(await run_interleaved(work, trials, cfg.warmup, _on_error, cfg.seed))
        for p in pumps.values():
            await p.close()
    return res


def _baseline(name: str) -> str:
    if name.endswith("_x256"):
        return "bare.unary_x256"
    if ".sessions" in name:
        return "bare.streams" + "".join(c for c in name if c.isdigit())
    if ".session" in name:
        return "bare.bidi"
    if ".unary" in name or ".call" in name:
        return "bare.unary"
    return "bare.pump_" + name.rsplit("_", 1)[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    ap.add_argument("--before", type=Path, required=True,
                    help="a kupd tree (kupd/ with _kupchan built, clients/python/kupapi)")
    ap.add_argument("--trials", type=int, default=8, help="kept trials per workload")
    ap.add_argument("--only", default="rt,scale,pump",
                    help="comma-separated workload groups: rt, call (Call through kupclient "
                         "and raw stubs, with client CPU, and 256 Call clients), scale, pump")
    ap.add_argument("--shapes", default="sr,x",
                    help="comma-separated client shapes for both kupds: sr (send + receive), "
                         "x (exchange)")
    ap.add_argument("--out", type=Path, help="also write every sample and median as JSON")
    ap.add_argument("--seed", type=int, default=None,
                    help="seed of the trials' shuffled order (default: random, printed)")
    args = ap.parse_args()
    before = args.before.resolve()
    if before == ROOT:
        raise SystemExit("--before must be another tree than this one")
    tmp = Path(tempfile.mkdtemp(prefix="kupbench-compare-"))
    only = frozenset(args.only.split(","))
    unknown = only - {"rt", "call", "scale", "pump"}
    if unknown:
        raise SystemExit(f"--only: unknown group(s) {', '.join(sorted(unknown))}")
    shapes = frozenset(args.shapes.split(","))
    if not shapes or shapes - {"sr", "x"}:
        raise SystemExit(f"--shapes: expected sr and/or x, got {args.shapes!r}")
    seed = args.seed if args.seed is not None else secrets.randbelow(1 << 31)
    log(f"trial order seed {seed} (repeat with --seed {seed})")
    res = asyncio.run(_run(before, args.trials, tmp, only, shapes, seed))
    med = {w: {s: statistics.median(v) for s, v in subs.items()} for w, subs in res.items()}
    if args.out is not None:
        args.out.write_text(json.dumps({"samples": res, "median": med}, indent=1))
    print(f"{'workload':24s} {'figure':5s} {'median':>10s}  {'baseline':16s} {'median':>10s}"
          "  ratio")
    for w, subs in med.items():
        if w.startswith("bare."):
            continue
        base = _baseline(w)
        for s, v in subs.items():
            b = med.get(base, {}).get(s)
            ratio = f"{v / b:.2f}" if b else "-"
            fig = s or ("MiB/s" if ".pump" in w else "us")
            print(f"{w:24s} {fig:5s} {v:10.1f}  {base:16s} {b or 0:10.1f}  {ratio}")


if __name__ == "__main__":
    main()

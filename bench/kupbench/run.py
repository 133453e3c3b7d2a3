"""``make bench``: every benchmark in one run, one table, latest.json / latest.md.

Usage: ``python -m kupbench [--quick] [--out DIR] [--only GROUP ...] [--seed N]``
(with ``bench/`` on ``PYTHONPATH``; the Makefile does this).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import platform
import secrets
import shutil
import subprocess
import tempfile
import time
from collections.abc import Awaitable, Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

from .config import Config
from .context import ROOT, RunCtx, log
from .harness import Report, Target

__all__ = ["main"]


def machine() -> dict[str, Any]:
    model = "?"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    load = "?"
    with contextlib.suppress(OSError):
        load = " ".join(Path("/proc/loadavg").read_text().split()[:3])
    commit = "?"
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        commit = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"],
                                capture_output=True, text=True, check=False).stdout.strip()
    return {
        "nproc": os.cpu_count(),
        "cpu": model,
        "kernel": platform.release(),
        "python": platform.python_version(),
        "loadavg_at_start": load,
        "git": commit,
    }


def targets() -> list[Target]:
    return [
        # floor: the bare server plus one channel hop and nothing of kupd
        # (kupbench.grpc_hop), in kup.v1's messages where the row's client
        # speaks kup.v1; for the channel rows, C on libkup
        Target("Session round trip / bare gRPC bidi round trip", "kupd.session_rt", "<=", 1.2,
               floor="hop.kup_session", twin="hop.kup_session_twin"),
        Target("Call round trip / bare gRPC unary round trip", "kupd.call_rt", "<=", 1.2,
               floor="hop.kup_call", twin="hop.kup_call_twin"),
        Target("stream throughput 64 KiB / bare gRPC", "kupd.pump_64k", ">=", 0.8,
               floor="hop.pump_64k"),
        Target("stream throughput 1 MiB / bare gRPC", "kupd.pump_1m", ">=", 0.8,
               floor="hop.pump_1m"),
        Target("64-client aggregate / bare gRPC 64-stream aggregate",
               "scale.kupd_64.rate", ">=", 0.8, floor="scale.hopkup_64.rate"),
        Target("channel layer round trip / unix-socket round trip", "chan.rt64", "<=", 0.05,
               floor="floor.c64"),
        Target("kupd idle CPU (% of one core)", "idle.kupd_cpu", "<=", 1.0, on_ratio=False),
        Target("wake-up: message arriving on a channel idle 1 s, median (us)",
               "idle.arrive_chan", "<=", 50.0, on_ratio=False, floor="idle.arrive_c"),
    ]


GroupFn = Callable[[RunCtx], Awaitable[None]]


def groups() -> dict[str, GroupFn]:
    from . import groups_grpc, groups_native

    return {
        "native": groups_native.run,
        "grpc": groups_grpc.run,
    }


async def run_all(cfg: Config, only: list[str], outdir: Path) -> Report:
    started = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())
    report = Report(meta={"started": started, "machine": machine(), "config": cfg.as_dict()})
    report.targets = targets()
    t0 = time.monotonic()
    tmp = Path(tempfile.mkdtemp(prefix="kupbench-"))
    try:
        ctx = RunCtx(cfg, tmp, report)
        for name, fn in groups().items():
            if only and name not in only:
                continue
            await fn(ctx)
    finally:
        keep = os.environ.get("KUPBENCH_KEEP_TMP")
        if keep:
            log(f"scratch kept in {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)
    with contextlib.suppress(OSError):
        report.meta["machine"]["loadavg_at_end"] = " ".join(
            Path("/proc/loadavg").read_text().split()[:3])
    report.meta["elapsed_s"] = time.monotonic() - t0
    return report


def reference_md(report: Report, note: str) -> str:
    """REFERENCE.md: the machine, the circumstances, then the run's table."""
    m = report.meta.get("machine", {})
    lines = [
        "# Reference benchmark run",
        "",
        "A representative `make bench` run, kept for comparison "
        "(see docs/performance.md for how to read it).",
        "",
        f"* CPU: {m.get('cpu', '?')}, {m.get('nproc', '?')} logical CPUs (nproc)",
        f"* kernel: {m.get('kernel', '?')}",
        f"* Python: {m.get('python', '?')}",
        f"* git: {m.get('git', '?')} (HEAD of the working tree the run used)",
        f"* load average (1/5/15 min) at start: {m.get('loadavg_at_start', '?')}; "
        f"at end: {m.get('loadavg_at_end', '?')}",
    ]
    if note:
        lines += ["", note]
    body = report.markdown().split("\n", 1)[1]  # drop the latest.md title
    return "\n".join(lines) + "\n" + body


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="kupbench", description="kupd benchmarks (make bench)")
    ap.add_argument("--quick", action="store_true",
                    help="smoke run with few trials (development only, not a result)")
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results",
                    help="where latest.json and latest.md go (default bench/results)")
    ap.add_argument("--reference", metavar="NOTE", default=None,
                    help="also write REFERENCE.md in --out: this run's table headed by the "
                         "machine description and NOTE (e.g. how loaded the machine was)")
    ap.add_argument("--only", action="append", default=[], metavar="GROUP",
                    help="run only this group (repeatable): " + ", ".join(
                        ["native", "grpc"]))
    ap.add_argument("--seed", type=int, default=None,
                    help="seed of the trials' shuffled order (default: a random one; every "
                         "run prints and records its seed, so a run's orders can be repeated)")
    args = ap.parse_args(argv)
    cfg = Config.quick() if args.quick else Config()
    seed = args.seed if args.seed is not None else secrets.randbelow(1 << 31)
    cfg = replace(cfg, seed=seed)
    log(f"trial order seed {seed} (repeat with --seed {seed})")
    unknown = [g for g in args.only if g not in ("native", "grpc")]
    if unknown:
        ap.error(f"unknown group(s): {', '.join(unknown)}")
    report = asyncio.run(run_all(cfg, args.only, args.out))
    if args.quick:
        report.notes.append("quick run (--quick): too few trials to be a result")
    print(report.text_table())
    jpath, mpath = report.write(args.out)
    log(f"wrote {jpath} and {mpath} ({report.meta['elapsed_s']:.0f} s)")
    if args.reference is not None:
        ref = args.out / "REFERENCE.md"
        ref.write_text(reference_md(report, args.reference))
        log(f"wrote {ref}")
    return 0

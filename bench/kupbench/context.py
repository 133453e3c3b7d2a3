"""What every benchmark group gets: the run context, figure specs, logging."""

from __future__ import annotations

import contextlib
import os
import sys
import time
import traceback
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

from .config import Config
from .harness import Better, Figure, Report, TrialFn, run_interleaved
from .procs import BenchError

__all__ = ["ROOT", "FigSpec", "RunCtx", "cost", "group", "lat", "log", "rate"]

ROOT = Path(__file__).resolve().parents[2]


@dataclass(frozen=True)
class FigSpec:
    """How one workload's samples become a figure."""

    workload: str
    section: str
    label: str
    unit: str
    better: Better
    sub: str = ""
    baseline: str | None = None  # key of the baseline figure
    note: str = ""

    @property
    def key(self) -> str:
        return f"{self.workload}.{self.sub}" if self.sub else self.workload


class RunCtx:
    """What every benchmark group gets: config, scratch space, the report."""

    def __init__(self, cfg: Config, tmp: Path, report: Report) -> None:
        self.cfg = cfg
        self.tmp = tmp
        self.logs = tmp / "logs"
        self.logs.mkdir(parents=True, exist_ok=True)
        self.report = report
        self.root = ROOT

    def skip(self, specs: list[FigSpec], why: str) -> None:
        for s in specs:
            self.report.skip(s.key, s.section, s.label, why)

    async def measure(self, workloads: dict[str, TrialFn], specs: list[FigSpec],
                      trials: int | None = None) -> None:
        """Run ``workloads`` interleaved and turn their samples into figures."""
        errors: dict[str, str] = {}

        def on_error(name: str, exc: BaseException) -> None:
            errors[name] = _why(exc)
            log(f"  ! {name}: {errors[name]}")

        t0 = time.monotonic()
        res = await run_interleaved(workloads, trials or self.cfg.trials, self.cfg.warmup,
                                    on_error, seed=self.cfg.seed)
        log(f"  measured {', '.join(workloads)} in {time.monotonic() - t0:.1f} s")
        for s in specs:
            samples = res.get(s.workload, {}).get(s.sub)
            if samples:
                self.report.add(Figure(s.key, s.section, s.label, s.unit, s.better,
                                       samples, s.baseline, s.note))
            else:
                self.report.skip(s.key, s.section, s.label,
                                 errors.get(s.workload, "no samples"))


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _why(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    first = text[0] if text else ""
    return f"{type(exc).__name__}: {first}"[:200]


@contextlib.asynccontextmanager
async def group(ctx: RunCtx, name: str, specs: list[FigSpec]) -> AsyncIterator[None]:
    """Run a group's body; a setup failure skips its figures with the reason."""
    log(f"== {name}")
    t0 = time.monotonic()
    try:
        yield
    except Exception as exc:
        why = _why(exc)
        log(f"  ! {name} not run: {why}")
        if os.environ.get("KUPBENCH_DEBUG") or not isinstance(exc, BenchError | OSError):
            traceback.print_exc()
        ctx.skip(specs, why)
    log(f"  ({time.monotonic() - t0:.1f} s)")




def lat(workload: str, section: str, label: str, baseline: str | None = None,
        sub: str = "", note: str = "") -> FigSpec:
    """A latency figure in microseconds (lower is better)."""
    return FigSpec(workload, section, label, "us", Better.LOWER, sub, baseline, note)


def rate(workload: str, section: str, label: str, baseline: str | None = None,
         sub: str = "", unit: str = "MiB/s", note: str = "") -> FigSpec:
    """A rate figure (higher is better)."""
    return FigSpec(workload, section, label, unit, Better.HIGHER, sub, baseline, note)


def cost(workload: str, section: str, label: str, unit: str, baseline: str | None = None,
         sub: str = "", note: str = "") -> FigSpec:
    """A cost figure (CPU, memory: lower is better) in ``unit``."""
    return FigSpec(workload, section, label, unit, Better.LOWER, sub, baseline, note)

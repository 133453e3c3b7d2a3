"""The benchmark harness: interleaved trials, figures, ratios, targets, writers.

Every figure is a list of samples turned into a median and a p99, and a
ratio to a *baseline figure measured in the same run*.  Figures that are
compared with each other are measured with their trials interleaved (trial
1 of A, trial 1 of B, trial 2 of A, ...; the order rotates every trial), so
that a burst of load from another process on this shared machine hits both
sides of a ratio rather than one.

Samples:
  * latency figures pool every individual operation of every trial
    (e.g. 10 trials x 2000 round trips = 20000 samples);
  * throughput / rate figures take one sample per trial (bytes or
    operations divided by the trial's wall time).
p99 is always the *bad* tail: the 99th percentile for latencies (lower is
better), the 1st percentile for rates (higher is better: 99% of trials did
at least this well).  Nearest rank, no interpolation.

Targets are printed as met / missed and never asserted.
"""

from __future__ import annotations

import enum
import json
import random
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .stats import median, percentile

__all__ = [
    "Better",
    "Figure",
    "Report",
    "Target",
    "TrialFn",
    "run_interleaved",
]

# A trial returns its samples by sub-figure (most workloads use one, ""; a
# concurrency trial returns e.g. {"rate": [...], "lat": [...]}).
TrialFn = Callable[[], Awaitable[dict[str, list[float]]]]


class Better(enum.Enum):
    """Which direction of a figure is good."""

    LOWER = "lower"
    HIGHER = "higher"


@dataclass
class Figure:
    """One measured quantity: its samples and what it is compared against."""

    key: str
    section: str
    label: str
    unit: str
    better: Better
    samples: list[float]
    baseline: str | None = None
    note: str = ""

    @property
    def median(self) -> float:
        return median(self.samples)

    @property
    def p99(self) -> float:
        """The bad tail: p99 for lower-is-better, p1 for higher-is-better."""
        if self.better is Better.LOWER:
            return percentile(self.samples, 99.0)
        return percentile(self.samples, 1.0)


@dataclass
class Target:
    """A goal, evaluated on a ratio (figure/baseline) or on a figure's median."""

    label: str
    figure: str
    op: str  # "<=" or ">="
    limit: float
    on_ratio: bool = True
    baseline: str | None = None  # None: the figure's own baseline
    #: the figure that measures the least any implementation of this shape
    #: costs on this machine (e.g. the bare server plus one channel hop, no
    #: kupd), judged the same way (ratio to the same baseline, or median):
    #: printed next to the value so a miss can be read against what is
    #: reachable at all.  Reported only, never part of the verdict.
    floor: str | None = None
    #: the same floor measured on a second, identical copy of its server (its
    #: own process and kupsim), the same way: how far two servers that run
    #: the very same code land apart in this run (where each one's threads
    #: were placed on the 2 cores, what the trial before left behind).  A gap
    #: between the value and the floor no wider than the one between the
    #: floor and its twin is not kupd's code.  Reported only.
    twin: str | None = None

    def __post_init__(self) -> None:
        if self.op not in ("<=", ">="):
            raise ValueError(f"Target {self.label!r}: op must be '<=' or '>=', got {self.op!r}")


@dataclass
class Report:
    """Everything one run measured, skipped and judged."""

    meta: dict[str, Any]
    figures: dict[str, Figure] = field(default_factory=dict)
    # key -> (section, label, why it was not measured)
    skipped: dict[str, tuple[str, str, str]] = field(default_factory=dict)
    targets: list[Target] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    order: list[str] = field(default_factory=list)  # keys, first time seen

    # -- building -----------------------------------------------------------

    def add(self, fig: Figure) -> None:
        if fig.key in self.figures:
            raise ValueError(f"figure {fig.key!r} reported twice")
        if not fig.samples:
            raise ValueError(f"figure {fig.key!r} has no samples")
        self.figures[fig.key] = fig
        self.skipped.pop(fig.key, None)
        if fig.key not in self.order:
            self.order.append(fig.key)

    def skip(self, key: str, section: str, label: str, why: str) -> None:
        """Record a figure that could not be measured, and why (shown in the table).
        The first reason given for a key is kept."""
        if key not in self.figures and key not in self.skipped:
            self.skipped[key] = (section, label, why)
        if key not in self.order:
            self.order.append(key)

    # -- evaluating ---------------------------------------------------------

    def ratio(self, key: str, baseline: str | None = None) -> float | None:
        fig = self.figures.get(key)
        if fig is None:
            return None
        base_key = baseline if baseline is not None else fig.baseline
        if base_key is None:
            return None
        base = self.figures.get(base_key)
        if base is None or base.median == 0:
            return None
        return fig.median / base.median

    def judge(self, t: Target) -> tuple[float | None, str]:
        """(value, 'met' | 'missed' | 'not measured: ...')."""
        if t.on_ratio:
            value = self.ratio(t.figure, t.baseline)
        else:
            fig = self.figures.get(t.figure)
            value = fig.median if fig is not None else None
        if value is None:
            missing = [
                k for k in (t.figure, t.baseline or self._baseline_of(t.figure))
                if k is not None and k not in self.figures
            ]
            return None, "not measured" + (f" ({', '.join(missing)})" if missing else "")
        ok = value <= t.limit if t.op == "<=" else value >= t.limit
        return value, "met" if ok else "missed"

    def floor_of(self, t: Target) -> float | None:
        """The target's floor figure judged as the target is (None: none or
        not measured)."""
        return self._judged_as(t, t.floor)

    def twin_of(self, t: Target) -> float | None:
        """The floor's twin (:attr:`Target.twin`) judged as the target is."""
        return self._judged_as(t, t.twin)

    def _judged_as(self, t: Target, key: str | None) -> float | None:
        if key is None:
            return None
        if t.on_ratio:
            return self.ratio(key, t.baseline or self._baseline_of(t.figure))
        fig = self.figures.get(key)
        return fig.median if fig is not None else None

    def _floor_cell(self, t: Target) -> str:
        floor = self.floor_of(t)
        if floor is None:
            return "-"
        cell = f"{_fmt(floor)} ({t.floor})"
        twin = self.twin_of(t)
        if twin is not None:
            cell += f"; A/A twin {_fmt(twin)}, spread {abs(twin - floor):.2f}"
        return cell

    def _baseline_of(self, key: str) -> str | None:
        fig = self.figures.get(key)
        return fig.baseline if fig is not None else None

    # -- rendering ----------------------------------------------------------

    def _rows(self, why_width: int = 0) -> list[tuple[str, str, str, str, str, str, str]]:
        """(section, figure, median, p99, unit, vs, ratio) in section order."""
        order: list[tuple[str, str]] = []
        for key in self.order:
            if key in self.figures:
                order.append((self.figures[key].section, key))
            elif key in self.skipped:
                order.append((self.skipped[key][0], key))
        order.sort(key=lambda sk: sk[0])  # stable: first-seen order inside a section
        rows: list[tuple[str, str, str, str, str, str, str]] = []
        for section, key in order:
            fig = self.figures.get(key)
            if fig is None:
                _s, label, why = self.skipped[key]
                if why_width and len(why) > why_width:
                    why = why[: why_width - 3] + "..."
                rows.append((section, label, "-", "-", "", "", f"not run: {why}"))
                continue
            r = self.ratio(key)
            vs = self.figures[fig.baseline].label if fig.baseline in self.figures else (
                fig.baseline or "")
            rows.append((
                section,
                fig.label,
                _fmt(fig.median),
                _fmt(fig.p99),
                fig.unit,
                vs,
                f"{r:.3f}" if r is not None else "",
            ))
        return rows

    def _target_rows(self) -> list[tuple[str, str, str, str, str]]:
        out = []
        for t in self.targets:
            value, verdict = self.judge(t)
            what = "ratio" if t.on_ratio else "median"
            out.append((
                t.label,
                f"{what} {_fmt(value)}" if value is not None else "-",
                f"{t.op} {_fmt(t.limit)}",
                verdict,
                self._floor_cell(t),
            ))
        return out

    def text_table(self) -> str:
        rows = self._rows(why_width=60)
        head = ("section", "figure", "median", "p99", "unit", "baseline", "ratio")
        lines = [_text_grid(head, rows)]
        lines.append("")
        lines.append(_text_grid(("target", "value", "limit", "verdict", "floor"),
                                self._target_rows()))
        return "\n".join(lines)

    def markdown(self) -> str:
        m = self.meta
        out = ["# kupd benchmark results", ""]
        out.append(f"Run started {m.get('started', '?')}, took {m.get('elapsed_s', 0):.0f} s.")
        mach = m.get("machine", {})
        if mach:
            out.append("")
            out.append("Machine: " + "; ".join(f"{k}: {v}" for k, v in mach.items()))
        cfg = m.get("config", {})
        if cfg:
            out.append("")
            out.append("Trial counts: " + ", ".join(f"{k}={v}" for k, v in cfg.items()))
        out.append("")
        out.append("Median and p99 over repeated trials (p99 is the bad tail: 99th percentile "
                   "of latencies, 1st percentile of rates). Ratio = median / the baseline's "
                   "median, both measured in this run with interleaved trials.")
        out.append("")
        out.append("| section | figure | median | p99 | unit | baseline | ratio |")
        out.append("|---|---|---:|---:|---|---|---:|")
        for row in self._rows():
            out.append("| " + " | ".join(c.replace("|", "/") for c in row) + " |")
        out.append("")
        out.append("## Targets (reported, not asserted)")
        out.append("")
        out.append("The floor column: the same ratio (or median) for the least that shape "
                   "costs on this machine without kupd's own code (see each row's figure). "
                   "An A/A twin is the same floor measured on a second, identical copy of "
                   "its server: a gap between two servers no wider than its spread is "
                   "noise of the run, not code.")
        out.append("")
        out.append("| target | value | limit | verdict | floor |")
        out.append("|---|---:|---|---|---|")
        for trow in self._target_rows():
            out.append("| " + " | ".join(trow) + " |")
        if self.notes:
            out.append("")
            out.append("## Notes")
            out.append("")
            out.extend(f"- {n}" for n in self.notes)
        out.append("")
        return "\n".join(out)

    def to_json(self) -> dict[str, Any]:
        figs = []
        for key, fig in self.figures.items():
            figs.append({
                "key": key,
                "section": fig.section,
                "label": fig.label,
                "unit": fig.unit,
                "better": fig.better.value,
                "n": len(fig.samples),
                "median": fig.median,
                "p99": fig.p99,
                "min": min(fig.samples),
                "max": max(fig.samples),
                "baseline": fig.baseline,
                "ratio": self.ratio(key),
                "note": fig.note,
            })
        targets = []
        for t in self.targets:
            value, verdict = self.judge(t)
            targets.append({
                "label": t.label,
                "figure": t.figure,
                "baseline": t.baseline or self._baseline_of(t.figure),
                "on": "ratio" if t.on_ratio else "median",
                "op": t.op,
                "limit": t.limit,
                "value": value,
                "verdict": verdict,
                "floor_figure": t.floor,
                "floor": self.floor_of(t),
                "twin_figure": t.twin,
                "twin": self.twin_of(t),
            })
        return {
            "meta": self.meta,
            "figures": figs,
            "skipped": [
                {"key": k, "section": s, "label": lab, "reason": why}
                for k, (s, lab, why) in self.skipped.items()
            ],
            "targets": targets,
            "notes": self.notes,
        }

    def write(self, outdir: Path) -> tuple[Path, Path]:
        outdir.mkdir(parents=True, exist_ok=True)
        jpath = outdir / "latest.json"
        mpath = outdir / "latest.md"
        jpath.write_text(json.dumps(self.to_json(), indent=2) + "\n")
        mpath.write_text(self.markdown())
        return jpath, mpath


def _fmt(v: float | None) -> str:
    if v is None:
        return "-"
    a = abs(v)
    if a >= 1000:
        return f"{v:,.0f}"
    if a >= 100:
        return f"{v:.1f}"
    if a >= 1:
        return f"{v:.2f}"
    return f"{v:.3g}"


def _text_grid(head: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    widths = [len(h) for h in head]
    for row in rows:
        for i, c in enumerate(row):
            widths[i] = max(widths[i], len(c))
    def line(cells: Sequence[str]) -> str:
        return "  ".join(c.ljust(widths[i]) for i, c in enumerate(cells)).rstrip()
    out = [line(head), line(["-" * w for w in widths])]
    out.extend(line(r) for r in rows)
    return "\n".join(out)


async def run_interleaved(
    workloads: dict[str, TrialFn],
    trials: int,
    warmup: int = 1,
    on_error: Callable[[str, BaseException], None] | None = None,
    seed: int = 0,
) -> dict[str, dict[str, list[float]]]:
    """Run ``warmup`` discarded trials then ``trials`` kept ones of each workload,
    interleaved, in a new order every round (shuffled from ``seed`` and the
    round number, so a run is repeatable with its seed).  Shuffled, not rotated: a rotation keeps
    each workload's predecessor fixed, and what the previous trial left behind
    (a sleeping kupsim thread woken onto the client's CPU, warm or cold
    caches) then biases the same workload every round -- Channel.exchange,
    always run right after the Python unix-socket trial (which leaves the
    kupsim thread asleep), measured 2-3x slower than send + receive, which
    always ran right after it, that way.  The seed matters for the same
    reason: one fixed sequence of orders repeats the same predecessors in
    every run -- of two identical hop-floor servers, one sequence made the
    same one the slower in three runs of three, another sequence the other
    one, by up to 0.1 of bare (bench/results/FINDINGS.md, session 7).  A
    run's own seed (kupbench --seed, random by default) spreads that bias
    across runs instead of repeating it.
    A workload that raises is dropped from the remaining
    rounds and reported through ``on_error``."""
    if trials < 1 or warmup < 0:
        raise ValueError(f"run_interleaved: trials must be >= 1 and warmup >= 0 "
                         f"(got trials={trials}, warmup={warmup})")
    names = list(workloads)
    alive = set(names)
    out: dict[str, dict[str, list[float]]] = {n: {} for n in names}
    for rnd in range(warmup + trials):
        order = list(names)
        random.Random(f"{seed}/{rnd}").shuffle(order)
        for name in order:
            if name not in alive:
                continue
            try:
                samples = await workloads[name]()
            except Exception as exc:
                alive.discard(name)
                out.pop(name, None)
                if on_error is not None:
                    on_error(name, exc)
                continue
            if rnd >= warmup:
                for sub, vals in samples.items():
                    out[name].setdefault(sub, []).extend(vals)
    return {n: s for n, s in out.items() if n in alive}


def now_ns() -> int:
    return time.perf_counter_ns()

"""Order statistics used by every figure: median and nearest-rank percentiles.

No interpolation: a reported percentile is always a value that was actually
measured.  With fewer than 100 samples the p99 by nearest rank is the worst
sample, which is what a reader of a tail figure should expect.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

__all__ = ["median", "percentile"]


def percentile(samples: Sequence[float], pct: float) -> float:
    """The nearest-rank ``pct`` percentile (0 < pct <= 100) of ``samples``."""
    if not samples:
        raise ValueError("percentile: no samples")
    if not 0.0 < pct <= 100.0:
        raise ValueError(f"percentile: pct must be in (0, 100], got {pct}")
    ordered = sorted(samples)
    rank = max(1, math.ceil(pct / 100.0 * len(ordered)))
    return ordered[rank - 1]


def median(samples: Sequence[float]) -> float:
    """The median of ``samples`` (mean of the two middle values when even)."""
    if not samples:
        raise ValueError("median: no samples")
    ordered = sorted(samples)
    mid = len(ordered) // 2
    if len(ordered) % 2:
        return ordered[mid]
    return (ordered[mid - 1] + ordered[mid]) / 2.0

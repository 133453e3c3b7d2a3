"""kupd benchmarks: ``make bench`` (see bench/kupbench/run.py and docs/performance.md)."""

from __future__ import annotations

__all__: list[str] = []

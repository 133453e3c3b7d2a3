"""ruff and mypy --strict over the whole tree are part of `make test`.

The configuration (which files, which rules) lives in pyproject.toml, so
`make lint` and this test check exactly the same thing.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )


def test_ruff_clean() -> None:
    proc = _run("ruff", "check", ".")
    assert proc.returncode == 0, f"ruff check . failed:\n{proc.stdout}\n{proc.stderr}"


def test_mypy_strict_clean() -> None:
    proc = _run("mypy")
    assert proc.returncode == 0, f"mypy failed:\n{proc.stdout}\n{proc.stderr}"

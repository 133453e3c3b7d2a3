"""The load test reuses the kupd fixture of tests/faults (which reuses the
gateway tests' harness)."""

from __future__ import annotations

import importlib.util

from kupd.testing import REPO_ROOT

_spec = importlib.util.spec_from_file_location(
    "faults_conftest", REPO_ROOT / "tests" / "faults" / "conftest.py"
)
assert _spec is not None and _spec.loader is not None
_faults = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_faults)

start_kupd = _faults.start_kupd

__all__ = ["start_kupd"]

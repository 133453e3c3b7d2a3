"""The load test reuses the ``start_kupd`` fixture of tests/gateway (the
same kupd harness the fault tests use)."""

from __future__ import annotations

import sys

from kupd.testing import REPO_ROOT

sys.path.insert(0, str(REPO_ROOT / "tests" / "gateway"))

from gateway_helpers import start_kupd

__all__ = ["start_kupd"]

"""Fixtures for the kmod C tests: one sanitizer build per variant per session."""

from __future__ import annotations

from pathlib import Path

import pytest
from kmod_util import VARIANTS, build_variant


@pytest.fixture(scope="session", params=VARIANTS)
def variant_out(request: pytest.FixtureRequest) -> Path:
    """The output directory of ``make -C kmod asan`` / ``tsan`` (built once)."""
    variant = str(request.param)
    return build_variant(variant)

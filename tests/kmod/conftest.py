"""Fixtures for the kmod C tests: one sanitizer build per variant per
session, started in the background when collection is done (when a selected
test needs one), as tests/cpp starts clients/cpp's build and tests/vm the VM
runs; the tests that need a variant wait for it, the session's other tests
run beside it meanwhile.  What still builds when the session ends is
stopped."""

from __future__ import annotations

from pathlib import Path

import pytest
from kmod_util import VARIANTS, VariantBuilds

_BUILDS = pytest.StashKey[VariantBuilds]()


def _builds(config: pytest.Config) -> VariantBuilds:
    builds = config.stash.get(_BUILDS, None)
    if builds is None:
        builds = config.stash[_BUILDS] = VariantBuilds()
    return builds


def pytest_collection_finish(session: pytest.Session) -> None:
    if session.config.option.collectonly:
        return
    if any("variant_out" in getattr(item, "fixturenames", ()) for item in session.items):
        _builds(session.config)


def pytest_sessionfinish(session: pytest.Session) -> None:
    builds = session.config.stash.get(_BUILDS, None)
    if builds is not None:
        builds.close()


@pytest.fixture(scope="session", params=VARIANTS)
def variant_out(request: pytest.FixtureRequest) -> Path:
    """The output directory of ``make -C kmod asan`` / ``tsan`` (built once)."""
    return _builds(request.config).wait(str(request.param))

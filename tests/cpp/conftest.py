"""tests/cpp's session hooks: clients/cpp's build (``make all asan``, a
minute or more in a fresh clone) starts in the background as soon as pytest
knows which tests run, when one of them needs it (the ``cpp_build``
fixture), and stops with the session -- as tests/vm/conftest.py starts the
VM runs.  The tests that need it wait for it; the rest of the session's
tests run beside it meanwhile.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest

_CLOSE = pytest.StashKey[Callable[[], None]]()


def pytest_collection_finish(session: pytest.Session) -> None:
    if session.config.option.collectonly:
        return
    for item in session.items:
        if isinstance(item, pytest.Function) and "cpp_build" in item.fixturenames:
            # the builder is test_cpp_client.py's own (its fixture waits on it)
            build = item.module.start_cpp_build(session)
            session.config.stash[_CLOSE] = build.close
            return


def pytest_sessionfinish(session: pytest.Session) -> None:
    close = session.config.stash.get(_CLOSE, None)
    if close is not None:
        close()

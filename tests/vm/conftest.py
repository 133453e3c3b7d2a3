"""tests/vm's session hooks: the VM runs start in the background as soon
as pytest knows which tests run, and stop with the session.

Booting the guests is most of the VM tests' time and is mostly TCG vCPU
work, while the rest of the suite mostly sleeps on deadlines and restarts:
started at the end of collection (when some selected test uses the
``guest`` fixture; only its kernels), the VMs run while the other tests
do, and test_vm.py's tests just wait for their results.  Whatever still
runs when the session ends (Ctrl-C, -x, a VM test not reached) is killed
then.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest

_CLOSE = pytest.StashKey[Callable[[], None]]()


def pytest_collection_finish(session: pytest.Session) -> None:
    if session.config.option.collectonly:
        return
    for item in session.items:
        callspec = getattr(item, "callspec", None)
        if isinstance(item, pytest.Function) and callspec is not None:
            if "guest" in callspec.params:
                # the runner is test_vm.py's own (its fixtures wait on it)
                runs = item.module.start_vm_runs(session)
                session.config.stash[_CLOSE] = runs.close
                return


def pytest_sessionfinish(session: pytest.Session) -> None:
    close = session.config.stash.get(_CLOSE, None)
    if close is not None:
        close()

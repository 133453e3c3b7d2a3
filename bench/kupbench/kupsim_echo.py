"""Start kupsim with the echo module, sized for a benchmark.

The echo module (kmod/examples/echo) reads its geometry from module
parameters, which kupsim takes from the environment
(``KUP_PARAM_<MODULE>_<NAME>``, kmod/include/kup_module.h).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from .procs import BenchError

__all__ = ["echo_env", "echo_sim"]


def echo_env(pages: int, channels: int) -> dict[str, str]:
    """Module parameters for kmod/examples/echo: pages per direction, channel count."""
    return {
        "KUP_PARAM_ECHO_PAGES": str(pages),
        "KUP_PARAM_ECHO_CHANNELS": str(channels),
    }


@contextlib.contextmanager
def echo_sim(pages: int, channels: int, rundir: Path | None = None) -> Iterator[Any]:
    """A running kupsim with echo.so (kupd.testing.kupsim); BenchError if it cannot run."""
    try:
        from kupd.testing import KupSimError, kupsim
    except ImportError as exc:
        raise BenchError(f"kupd.testing not importable: {exc}") from exc
    env = dict(os.environ)
    env.update(echo_env(pages, channels))
    try:
        with kupsim("echo", env=env, rundir=rundir, check_exit=False) as sim:
            yield sim
    except KupSimError as exc:
        raise BenchError(f"kupsim echo: {str(exc).splitlines()[0]}") from exc

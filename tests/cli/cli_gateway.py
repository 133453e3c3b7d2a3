"""A real kupsim (echo module) + a real kupd for the kupctl, Node and C++ tests.

kupd runs as the installed ``kupd`` console script (``.venv/bin/kupd``) on
a unix socket in a temporary directory, optionally with its Prometheus
metrics on a free loopback port.  Everything is stopped on the way out and
kupd's clean SIGTERM exit (status 0) is checked.  tests/node/ and tests/cpp/
load this file by path, so it depends on nothing but the repository.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path

from kupd.testing import REPO_ROOT, Kupd, kupd, kupsim

__all__ = ["Gateway", "Kupctl", "console_script", "gateway", "spawn_kupctl"]

#: The kupctl fixture: kupctl(*args, input=None, env=None) -> CompletedProcess.
Kupctl = Callable[..., "subprocess.CompletedProcess[str]"]

#: Bounded waits (generous: the machine is shared).
START_TIMEOUT = 60.0
STOP_TIMEOUT = 30.0


def console_script(name: str) -> Path:
    """The installed console script ``name`` of this virtualenv.

    Raises AssertionError with the fix when it is not installed.
    """
    for bindir in (Path(sys.executable).parent, REPO_ROOT / ".venv" / "bin"):
        path = bindir / name
        if path.is_file() and os.access(path, os.X_OK):
            return path
    raise AssertionError(
        f"console script {name!r} is not installed in the virtualenv "
        "(run `make setup`, which does `pip install -e .`)"
    )


#: A running kupsim + kupd pair: ``gw.sim`` is the kupsim, ``gw.env()`` an
#: environment for kupctl, ``gw.metrics_url`` "" unless metrics are on.
Gateway = Kupd


@contextlib.contextmanager
def gateway(
    devices: Sequence[str] = ("echo:2",),
    *,
    metrics: bool = False,
    args: Sequence[str] = (),
    sim_env: Mapping[str, str] | None = None,
    check_exit: bool = True,
) -> Iterator[Gateway]:
    """kupsim with echo and kupd serving ``devices`` (NAME[:CALL_CHANNELS]),
    run as the installed console script with ``args`` (more kupd flags);
    its clean SIGTERM exit is checked (not with ``check_exit`` False: a test
    that kills kupd itself).  ``sim_env``: kupsim's environment (echo's
    parameters, ``KUP_PARAM_ECHO_PAGES`` ...)."""
    kupd_exe = console_script("kupd")
    with (
        kupsim("echo", check_exit=False, env=sim_env) as sim,
        kupd(
            "--pid-file",
            "-",
            *args,
            sim=sim,
            devices=devices,
            metrics=metrics,
            command=[str(kupd_exe)],
            env=sim.env(),
            check_exit=check_exit,
            start_timeout=START_TIMEOUT,
            stop_timeout=STOP_TIMEOUT,
        ) as gw,
    ):
        yield gw


_SIGINT_DEFAULT = (
    "import os, signal, sys; signal.signal(signal.SIGINT, signal.SIG_DFL); "
    "os.execv(sys.argv[1], sys.argv[1:])"
)


def spawn_kupctl(
    gw: Gateway, *args: str, stdin: bool = False, stdout: int = subprocess.PIPE
) -> subprocess.Popen[str]:
    """A long-running ``kupctl ARGS`` (watch, session) against ``gw``, its
    stdout (unless ``stdout`` says where: a file descriptor) and stderr
    piped as text; with ``stdin`` its input is a pipe too.  The caller
    reaps it."""
    # ^C must reach it as a terminal's would: a test runner started in the
    # background (nohup, "&") has SIGINT ignored, and an ignored SIGINT is
    # inherited across exec -- reset it on the way in
    return subprocess.Popen(
        [sys.executable, "-c", _SIGINT_DEFAULT, str(console_script("kupctl")), *args],
        stdin=subprocess.PIPE if stdin else subprocess.DEVNULL,
        stdout=stdout,
        stderr=subprocess.PIPE,
        text=True,
        env=gw.env(),
    )

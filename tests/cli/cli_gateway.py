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
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path

from kupd.testing import REPO_ROOT, Kupd, kupd, kupsim

__all__ = [
    "Gateway",
    "Kupctl",
    "console_script",
    "gateway",
    "rate_limited_gateway",
    "spawn_kupctl",
]

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


@contextlib.contextmanager
def rate_limited_gateway(
    calls_per_second: float, channel_ops_per_second: float = 0.0
) -> Iterator[tuple[Gateway, str]]:
    """kupsim with echo and kupd serving one tenant, "limited", whose Calls
    are held to ``calls_per_second`` (a burst of one second's worth, at
    least one) and its Session and lease operations to
    ``channel_ops_per_second`` (0: no limit): the gateway and the tenant's
    socket."""
    sockets = Path(tempfile.mkdtemp(prefix="kupd-rl-"))
    sockets.chmod(0o755)
    sock = str(sockets / "limited.sock")
    config = sockets / "kupd.toml"
    config.write_text(
        '[[device]]\nname = "echo"\ncall_channels = 2\n'
        f'[[tenant]]\nname = "limited"\nsocket = "{sock}"\n'
        f"calls_per_second = {calls_per_second!r}\n"
        f"channel_ops_per_second = {channel_ops_per_second!r}\n"
        "max_sessions = 4\nmax_message_bytes = 4096\n"
        '[[tenant.grant]]\ndevice = "echo"\n'
    )
    try:
        with (
            kupsim("echo", check_exit=False) as sim,
            kupd(
                "--pid-file",
                "-",
                sim=sim,
                config=config,
                health_socket=sock,
                command=[str(console_script("kupd"))],
                env=sim.env(),
                start_timeout=START_TIMEOUT,
                stop_timeout=STOP_TIMEOUT,
            ) as gw,
        ):
            yield gw, sock
    finally:
        shutil.rmtree(sockets, ignore_errors=True)


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

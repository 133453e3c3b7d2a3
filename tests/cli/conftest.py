"""Fixtures for the kupctl tests: one real kupsim + kupd per test module,
and a runner for the installed ``kupctl`` console script."""

from __future__ import annotations

import subprocess
from collections.abc import Iterator, Mapping

import pytest
from cli_gateway import Gateway, Kupctl, console_script, gateway

#: One kupctl run never takes long; this only bounds a hang.
RUN_TIMEOUT = 60.0


@pytest.fixture(scope="module")
def gw() -> Iterator[Gateway]:
    """kupd serving echo (2 Call-pool channels: 0 and 1) with metrics on."""
    with gateway(("echo:2",), metrics=True) as g:
        yield g


@pytest.fixture
def kupctl(gw: Gateway) -> Kupctl:
    """kupctl(*args, input=None, env=None) -> CompletedProcess (text).

    Runs the real console script with KUPD_SOCKET pointing at ``gw``.
    """
    exe = str(console_script("kupctl"))

    def run(
        *args: str, input: str | None = None, env: Mapping[str, str] | None = None
    ) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [exe, *args],
            input=input if input is not None else "",
            capture_output=True,
            text=True,
            env=dict(env) if env is not None else gw.env(),
            timeout=RUN_TIMEOUT,
            check=False,
        )

    return run

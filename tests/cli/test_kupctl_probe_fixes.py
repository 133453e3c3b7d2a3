"""kupctl's wording where an operator probe found it wrong: the STATE of a
device whose host stopped answering, the hint for a socket kupctl may not
connect to, the hint for a connection kupd's gRPC server cut."""

from __future__ import annotations

import json
import signal
import subprocess

from cli_gateway import console_script, gateway

from kupd.testing import wait_until

TIMEOUT = 60.0


def _kupctl(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(console_script("kupctl")), *args],
        capture_output=True, text=True, env=env, timeout=TIMEOUT, check=False,
    )  # fmt: skip


def test_devices_state_says_the_host_is_not_answering() -> None:
    """echo's kupsim stopped (SIGSTOP): kupd reports the device reachable
    (its last state) with an error saying its host has not answered; STATE
    says so instead of that last state's ``ok``."""
    with gateway(("echo:2",)) as gw:
        env = gw.env()
        p = _kupctl(env, "devices")
        assert p.returncode == 0, p.stderr
        assert p.stdout.splitlines()[1].split()[:2] == ["echo", "ok"], p.stdout
        gw.sim.signal(signal.SIGSTOP)
        try:
            p = _kupctl(env, "devices")
            j = _kupctl(env, "--json", "devices")
        finally:
            gw.sim.signal(signal.SIGCONT)
        why = f"{p.stdout!r} {p.stderr!r} {j.stdout!r}"
        assert p.returncode == 0 and j.returncode == 0, why
        dev = json.loads(j.stdout)["devices"][0]
        assert dev["reachable"] is True and "has not answered for" in dev["error"], why
        row = p.stdout.splitlines()[1]
        assert row.startswith("echo ") and " not answering " in row, why
        assert "echo: device echo has not answered for" in p.stdout, why
        # answering again: ok again
        wait_until(
            lambda: _kupctl(env, "devices").stdout.splitlines()[1].split()[:2] == ["echo", "ok"],
            what="echo answering again",
        )

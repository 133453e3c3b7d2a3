"""kupctl's wording where an operator probe found it wrong: the STATE of a
device whose host stopped answering, the hint for a socket kupctl may not
connect to, the hint for a connection kupd's gRPC server cut."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import tempfile
from pathlib import Path
from subprocess import CompletedProcess

import pytest
from cli_gateway import console_script, gateway

from kupd.testing import all_stopped, kupd, kupsim, wait_until

TIMEOUT = 60.0
EXIT_UNAVAILABLE = 17


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
            # every thread: one not stopped yet could still answer kupd's INFO
            wait_until(lambda: all_stopped(gw.sim.pid), what="kupsim stopped")
            p = _kupctl(env, "devices")
            j = _kupctl(env, "--json", "devices")
        finally:
            gw.sim.signal(signal.SIGCONT)
        why = f"{p.stdout!r} {p.stderr!r} {j.stdout!r}"
        assert p.returncode == 0 and j.returncode == 0, why
        dev = json.loads(j.stdout)["devices"][0]
        assert dev["reachable"] is True and "has not answered for" in dev["error"], why
        assert dev["not_answering_s"] >= 2.0, why  # at least PROBE_WAIT
        row = p.stdout.splitlines()[1]
        assert row.startswith("echo ") and " not answering " in row, why
        assert "echo: device echo has not answered for" in p.stdout, why
        # answering again: ok again
        wait_until(
            lambda: _kupctl(env, "devices").stdout.splitlines()[1].split()[:2] == ["echo", "ok"],
            what="echo answering again",
        )


def test_devices_state_says_a_removed_node_is_unattachable() -> None:
    """echo's kupsim socket removed while kupsim and its module run on, and
    nobody attaching: the health round's fresh open finds it, so kupctl
    shows the device ``unattachable`` (not ``ok`` until some attach meets
    the removal, nor ``not answering``: its host answers), the JSON says
    ``cannot_attach``, health says NOT_SERVING; back to ``ok`` once the
    socket is back."""
    with gateway(("echo:2",)) as gw:
        env = gw.env()
        sock = gw.sim.rundir / "echo.sock"
        keep = gw.sim.rundir / "echo.keep"
        os.link(sock, keep)  # the same socket under another name
        os.unlink(sock)
        try:
            wait_until(
                lambda: _kupctl(env, "devices").stdout.splitlines()[1].split()[:2]
                == ["echo", "unattachable"],
                what="echo seen unattachable",
            )
            p = _kupctl(env, "devices")
            j = _kupctl(env, "--json", "devices")
            h = _kupctl(env, "health", "--service", "kup.v1.Kup/echo")
        finally:
            os.rename(keep, sock)
        why = f"{p.stdout!r} {j.stdout!r} {h.stdout!r} {h.stderr!r}"
        dev = json.loads(j.stdout)["devices"][0]
        assert dev["reachable"] is True and dev["cannot_attach"] is True, why
        assert dev["not_answering_s"] == 0.0 and "cannot be attached" in dev["error"], why
        assert "echo: device echo cannot be attached" in p.stdout, why
        assert h.returncode == 18 and "NOT_SERVING" in h.stdout, why
        wait_until(
            lambda: _kupctl(env, "devices").stdout.splitlines()[1].split()[:2] == ["echo", "ok"],
            what="echo attachable again",
        )
        assert json.loads(_kupctl(env, "--json", "devices").stdout)["devices"][0][
            "cannot_attach"
        ] is False


def _kupctl_without_dac_override(sim_env: dict[str, str], sock: str) -> CompletedProcess:
    """``kupctl --socket SOCK health`` as root without CAP_DAC_OVERRIDE (and
    _READ_SEARCH): the kernel checks the socket's mode against uid 0 and
    its groups as for anyone.  (Another uid cannot run this virtualenv's
    interpreter when it lives under /root.)"""
    return subprocess.run(
        ["setpriv", "--bounding-set", "-dac_override,-dac_read_search", "--",
         str(console_script("kupctl")), "--socket", sock, "health"],
        capture_output=True, text=True, env=sim_env, timeout=TIMEOUT, check=False,
    )  # fmt: skip


@pytest.mark.skipif(
    os.geteuid() != 0 or os.getegid() != 0 or shutil.which("setpriv") is None,
    reason="needs root (kupd hands sockets to other users) and setpriv",
)
def test_permission_hint_names_the_socket_owner_and_group(tmp_path: Path) -> None:
    """kupctl refused connect(2) (EACCES) on tenant sockets: alice's is uid
    1001's, gid 0, mode 0600 (only that user), carol's uid 1001's and gid
    1003's, mode 0660 (that group too); kupctl runs as root (groups: 0)
    without the capabilities that bypass file modes.  The hint says which,
    from the socket's stat -- not "kupd's group, see socket_mode", which
    kupd does not use for tenant sockets."""
    d = Path(tempfile.mkdtemp(prefix="kupctl-perm-"))
    try:
        with kupsim("echo", check_exit=False) as sim:
            config = d / "kupd.toml"
            config.write_text(
                f'admin_socket = "{d}/admin.sock"\n'
                f'kupsim_dir = "{sim.rundir}"\n'
                'pid_file = "-"\n'
                '[[device]]\nname = "echo"\n'
                f'[[tenant]]\nname = "alice"\nsocket = "{d}/t/alice.sock"\n'
                'owner = 1001\nmode = "0600"\n[[tenant.grant]]\ndevice = "echo"\n'
                f'[[tenant]]\nname = "carol"\nsocket = "{d}/t/carol.sock"\n'
                'owner = 1001\ngroup = 1003\nmode = "0660"\n[[tenant.grant]]\ndevice = "echo"\n'
            )
            with kupd(
                config=config, health_socket=d / "admin.sock", log=tmp_path / "kupd.log",
                env=sim.env(), start_timeout=TIMEOUT,
            ):  # fmt: skip
                alice = _kupctl_without_dac_override(sim.env(), f"{d}/t/alice.sock")
                carol = _kupctl_without_dac_override(sim.env(), f"{d}/t/carol.sock")
    finally:
        shutil.rmtree(d, ignore_errors=True)
    why = f"alice: {alice.stderr!r}"
    assert alice.returncode == EXIT_UNAVAILABLE and "Permission denied" in alice.stderr, why
    assert "socket_mode" not in alice.stderr, why
    assert f"no permission to connect to {d}/t/alice.sock: owned by uid 1001, " in alice.stderr, why
    assert "mode 0600: only uid 1001 may connect: it is for a tenant you are not" in alice.stderr
    why = f"carol: {carol.stderr!r}"
    assert carol.returncode == EXIT_UNAVAILABLE and "Permission denied" in carol.stderr, why
    assert ", gid 1003, mode 0660: only uid 1001 and members of gid 1003 may " in carol.stderr, why
    assert "you are neither: be a member of gid 1003" in carol.stderr, why


def test_watch_cut_by_a_reload_that_moved_its_socket() -> None:
    """A reload moves tenant alice's socket: kupd stops the old socket's gRPC
    server, which cut the watch on it with gRPC's bare "Cancelling all
    calls" (and a hint that had to say kupd may be stopping).  kupd ends it
    itself now, saying where the socket went."""
    d = Path(tempfile.mkdtemp(prefix="kupctl-mv-"))
    try:
        with kupsim("echo", check_exit=False) as sim:
            config = d / "kupd.toml"
            body = (
                f'admin_socket = "{d}/admin.sock"\n'
                f'kupsim_dir = "{sim.rundir}"\n'
                'pid_file = "-"\n'
                '[[device]]\nname = "echo"\n'
                f'[[tenant]]\nname = "alice"\nsocket = "{d}/t/alice.sock"\n'
                '[[tenant.grant]]\ndevice = "echo"\n'
            )
            config.write_text(body)
            with kupd(
                config=config, health_socket=d / "admin.sock", log=d / "kupd.log",
                env=sim.env(), start_timeout=TIMEOUT,
            ) as k:  # fmt: skip
                watch = subprocess.Popen(
                    [str(console_script("kupctl")), "--socket", f"{d}/t/alice.sock",
                     "watch", "--initial"],
                    stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                    text=True, env=sim.env(),
                )  # fmt: skip
                try:
                    assert watch.stdout is not None
                    assert "(initial)" in watch.stdout.readline()
                    config.write_text(body.replace("alice.sock", "alice-new.sock"))
                    r = _kupctl(sim.env(), "reload", "--admin-socket", f"{d}/admin.sock")
                    assert r.returncode == 0, (r.stdout, r.stderr, k.log())
                    out, err = watch.communicate(timeout=TIMEOUT)
                finally:
                    if watch.poll() is None:
                        watch.kill()
                        watch.communicate()
    finally:
        shutil.rmtree(d, ignore_errors=True)
    why = f"rc={watch.returncode} stdout={out!r} stderr={err!r}"
    assert watch.returncode == EXIT_UNAVAILABLE, why
    assert err == (
        f"kupctl: Unavailable: tenant alice: a reload moved its socket from {d}/t/alice.sock "
        f"to {d}/t/alice-new.sock: connect there\n"
    ), why

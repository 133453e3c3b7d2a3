"""The stand-in for FreeBSD's daemon(8) (tests/deploy/daemon), which the
supervised rc.d tests run for real: a SIGTERM that reaches it just as its
program has ended is dropped, as FreeBSD's daemon(8) drops it, and never
becomes a signal to anything else.

It once became kill(-1, SIGTERM) -- every process the user may signal --
when it came in the same batch as, and after, the program's SIGCHLD: the
pid was -1 by then.  rc.d's start sends exactly such a SIGTERM when kupd
exits during start-up (kupd_poststart stops daemon(8) so that it does not
restart a kupd that cannot start), and a CI run died of it.

So the race is run inside a PID namespace of its own: there, kill(-1)
reaches only the namespace's processes, and a sentinel's death shows it.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

__all__: list[str] = []

DAEMON = Path(__file__).resolve().parent / "daemon"

#: Rounds of the race.  With the stand-in as it was, 6 runs of 80 rounds
#: all ended with the sentinel killed, in rounds 1 to 49; one round takes
#: about 0.1 s.
ROUNDS = 80

#: Run as pid 1 of the new namespace (which kill(-1) spares): each round
#: starts daemon(8) on a program that fails at once, as a kupd with a bad
#: config does, and sends daemon(8) SIGTERM the moment that program has
#: ended (a zombie, or reaped) -- what kupd_poststart does.  A sentinel
#: process lives through every round unless something signals it.
INNER = textwrap.dedent(
    """
    import os, signal, subprocess, sys, time

    daemon, workdir, rounds = sys.argv[1], sys.argv[2], int(sys.argv[3])
    sentinel = subprocess.Popen(["sleep", "600"])

    def ended(pid):
        try:
            with open(f"/proc/{pid}/stat") as f:
                return ") Z " in f.read()
        except OSError:
            return True

    sentinel_status = None

    def reap():
        # pid 1 inherits the detached daemon(8)s; the sentinel is reaped
        # here too, so its status is kept
        global sentinel_status
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            if pid == sentinel.pid:
                sentinel_status = status

    def read_pid(path):
        try:
            with open(path) as f:
                return int(f.read())
        except (OSError, ValueError):
            return 0

    for i in range(rounds):
        kid_file = os.path.join(workdir, f"kupd.{i}.pid")
        sup_file = os.path.join(workdir, f"daemon.{i}.pid")
        go = os.path.join(workdir, f"go.{i}")
        # the program fails once told to: its pid files are read first
        # (daemon(8) removes them when it exits)
        fail = f"while [ ! -e '{go}' ]; do sleep 0.01; done; echo 'bad config' >&2; exit 2"
        subprocess.run(
            [sys.executable, daemon, "-p", kid_file, "-P", sup_file,
             "-o", os.path.join(workdir, "log"), "sh", "-c", fail],
            check=True,
        )
        deadline = time.monotonic() + 60
        while not (read_pid(kid_file) and read_pid(sup_file)):
            assert time.monotonic() < deadline, "daemon(8) wrote no pid files"
            time.sleep(0.001)
        kid, sup = read_pid(kid_file), read_pid(sup_file)
        open(go, "w").close()
        while not ended(kid):
            assert time.monotonic() < deadline, "the program did not end"
        try:
            os.kill(sup, signal.SIGTERM)
        except ProcessLookupError:
            pass
        while not ended(sup):  # daemon(8) exits with its program (no -r)
            assert time.monotonic() < deadline, "daemon(8) did not exit"
            time.sleep(0.001)
            reap()
        reap()
        if sentinel_status is not None:
            how = os.WTERMSIG(sentinel_status) if os.WIFSIGNALED(sentinel_status) else 0
            print(f"round {i}: the sentinel was killed by signal {how}")
            sys.exit(1)
    sentinel.kill()
    print(f"{rounds} rounds, the sentinel alive")
    """
)


def _unshare() -> list[str]:
    """The command that runs a program as pid 1 of new user and PID
    namespaces with its own /proc, or skip where the kernel refuses."""
    tool = shutil.which("unshare")
    if tool is None:
        pytest.skip("no unshare(1) (util-linux)")
    argv = [tool, "--user", "--map-root-user", "--pid", "--fork", "--mount-proc"]
    probe = subprocess.run([*argv, "true"], capture_output=True, text=True, timeout=60)
    if probe.returncode != 0:
        pytest.skip(f"no PID namespace here: {probe.stderr.strip()}")
    return argv


def test_sigterm_after_the_program_ended_signals_nothing_else(tmp_path: Path) -> None:
    res = subprocess.run(
        [*_unshare(), sys.executable, "-c", INNER, str(DAEMON), str(tmp_path), str(ROUNDS)],
        capture_output=True, text=True, timeout=600,
    )
    assert res.returncode == 0, res.stdout + res.stderr
    assert f"{ROUNDS} rounds, the sentinel alive" in res.stdout, res.stdout

"""kupd's files under it: the pid file is only ever this kupd's, written
once it serves and removed only while it is still its own.  Real kupd
processes and kupsim."""

from __future__ import annotations

import os
from pathlib import Path

from gateway_helpers import StartKupd

from kupd.testing import KupSim


def test_a_second_kupd_that_cannot_serve_leaves_the_pid_file_alone(
    sim: KupSim, start_kupd: StartKupd
) -> None:
    """The lock file removed: a second kupd on the same socket gets a
    lock of its own, then finds the socket served and exits 1.  It wrote
    no pid file (written only once a kupd serves) and removed none: the
    first one's still names it."""
    first = start_kupd(sim)
    pid_file = Path(first.socket + ".pid")
    assert pid_file.read_text().strip() == str(first.pid)
    os.unlink(first.socket + ".lock")
    second = start_kupd(sim, socket=first.socket, wait=False)
    assert second.proc.wait(60) == 1
    assert pid_file.read_text().strip() == str(first.pid), second.log()
    with first.client() as c:
        assert c.call("echo", b"still", timeout=10).data.lower() == b"still"
    assert first.terminate() == 0
    assert not pid_file.exists()  # its own: removed


def test_a_pid_file_replaced_since_is_not_removed_at_exit(
    sim: KupSim, start_kupd: StartKupd
) -> None:
    """A pid file another process put at the path (another kupd's, a
    supervisor's) is not removed when this kupd stops: it removes only the
    file it wrote, still naming it."""
    k = start_kupd(sim)
    pid_file = Path(k.socket + ".pid")
    tmp = pid_file.with_suffix(".new")
    tmp.write_text("1\n")
    os.replace(tmp, pid_file)
    assert k.terminate() == 0
    assert pid_file.read_text() == "1\n"

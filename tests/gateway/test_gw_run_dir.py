"""kupd's files under it: the pid file is only ever this kupd's, written
once it serves and removed only while it is still its own; a run
directory (socket, lock, pid file) removed under a running kupd is
noticed -- kupd stops itself, exit status 1, for a supervisor to start it
afresh -- and a lock file removed alone is taken again.  Two kupds never
go on serving one config.  Real kupd processes and kupsim."""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
from pathlib import Path

from gateway_helpers import StartKupd, live_watch

from kupclient import EventType
from kupd import errors
from kupd.testing import KupSim, wait_until

#: bounds for what kupd's periodic look (every 5 s) must have found
NOTICE_TIMEOUT = 60.0


def _records(log: str, event: str) -> list[dict[str, object]]:
    out = []
    for line in log.splitlines():
        if line.startswith("{") and event in line:
            rec = json.loads(line)
            if rec.get("event") == event:
                out.append(rec)
    return out


def _locked(path: str) -> bool:
    """Someone holds the flock of the file at ``path``."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)
    return False


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


def test_run_dir_removed_kupd_stops_and_a_new_one_keeps_its_files(
    sim: KupSim, start_kupd: StartKupd, tmp_path: Path
) -> None:
    """The run directory removed under kupd#1 (an ``rm -rf``, tmpfiles):
    kupd#2, started on the same config at once, makes it again and serves.
    kupd#1 notices its socket gone, says so naming it, and stops itself
    with exit status 1, releasing its channels; its stop removes none of
    kupd#2's socket, pid file or lock.  Then one kupd serves the device."""
    run = tmp_path / "run"
    sock = str(run / "kupd.sock")
    first = start_kupd(sim, socket=sock)
    with first.client() as c:
        events = live_watch(c)
        ch = c.open("echo").channel()
        ch.receive()
        shutil.rmtree(run)
        second = start_kupd(sim, socket=sock)
        assert first.proc.wait(NOTICE_TIMEOUT) == 1, first.log()[-3000:]
        # a client still connected (its connection outlives the name) was
        # told why kupd stopped -- without the path (it may be another
        # tenant's socket)
        seen = []
        with contextlib.suppress(errors.KupError):
            seen.extend(events)
        stop = [e for e in seen if e.type == EventType.SERVER_SHUTTING_DOWN]
        assert stop and stop[0].reason == "kupd's socket was removed or replaced", seen
    gone = _records(first.log(), "socket removed or replaced under kupd: clients cannot reach "
                    "it there (another kupd may serve the path now); stopping, exit status 1, "
                    "for a supervisor to start kupd afresh")
    assert gone and gone[0]["sockets"] == [sock], first.log()[-3000:]
    assert "kupd stopped" in first.log()
    # kupd#2's files are where it made them
    assert os.path.exists(sock)
    assert Path(sock + ".pid").read_text().strip() == str(second.pid)
    assert _locked(sock + ".lock")
    with second.client() as c:
        assert c.call("echo", b"one kupd", timeout=10).data.lower() == b"one kupd"

        def states() -> list[str]:
            return [x.state for x in c.devices("echo")[0].channels]

        # every channel kupd#1 held is let go: none but kupd#2's pool in use
        wait_until(
            lambda: states().count("free") == 128 - 4, what="kupd#1's channels free again"
        )
        assert states().count("calls") == 4, states()
    assert second.terminate() == 0


def test_run_dir_removed_alone_kupd_stops_with_status_1(
    sim: KupSim, start_kupd: StartKupd, tmp_path: Path
) -> None:
    """No second kupd: kupd still notices its socket gone (it reported
    SERVING while no client could reach it) and exits 1, for systemd's
    Restart=on-failure."""
    run = tmp_path / "run"
    k = start_kupd(sim, socket=str(run / "kupd.sock"))
    shutil.rmtree(run)
    assert k.proc.wait(NOTICE_TIMEOUT) == 1, k.log()[-3000:]
    assert not run.exists() or not any(run.iterdir())


def test_lock_file_removed_alone_is_taken_again(sim: KupSim, start_kupd: StartKupd) -> None:
    """Only the lock file removed (the socket still served): kupd takes
    the lock again at its path and says so; a second kupd is then refused
    by the lock, naming the first."""
    k = start_kupd(sim)
    lock = k.socket + ".lock"
    os.unlink(lock)
    wait_until(lambda: _locked(lock), timeout=NOTICE_TIMEOUT, what="the lock taken again")
    # said right after it is taken: the line may be a moment behind the lock
    taken = "lock_file was removed or replaced under kupd: taken again"
    wait_until(lambda: bool(_records(k.log(), taken)), what="the retaking logged")
    second = start_kupd(sim, socket=k.socket, wait=False)
    assert second.proc.wait(60) == 1
    assert "is held" in second.log() and str(k.pid) in second.log(), second.log()
    assert Path(k.socket + ".pid").read_text().strip() == str(k.pid)
    with k.client() as c:
        assert c.call("echo", b"x", timeout=10).data.lower() == b"x"
    assert k.terminate() == 0

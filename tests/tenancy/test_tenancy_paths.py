"""The paths kupd makes files at: nothing planted on the way is followed.

kupd runs as root.  A directory someone else can write (/tmp, or one of
their own on a socket's path) let them plant a symbolic link, a hard link or
a FIFO where kupd creates its lock, pid file, audit log or a socket -- and
root then truncated, wrote, chown'ed or chmod'ed whatever it pointed at.
Now (kupd.tenants.check_path, open_regular, write_replacing, SocketSet):

* every directory and symbolic link on the way to a socket, the lock, the
  pid file or the audit log is checked as the path is written (not after
  resolving it): one another user could change refuses the start or the
  reload, naming it;
* the lock and the audit log are opened without following a link at their
  name and must be a file of their own; the pid file is a new file renamed
  into place;
* a reload changing a kept socket's owner/mode changes the socket kupd
  bound, or refuses: never another file now at its path."""

from __future__ import annotations

import os
import re
import socket
import stat
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from tenancy_helpers import AS_ROOT, DEVICES, NOBODY, StartTenants, child_env

from kupd import errors
from kupd.testing import start_kupd

#: seconds a kupd that should refuse to start gets to do so (one that
#: starts instead is killed then: the test fails, it does not hang)
REFUSE_TIMEOUT = 30.0
needs_root = pytest.mark.skipif(not AS_ROOT, reason="files of another user need root")


def _kupd_refuses(*args: str) -> tuple[int, str]:
    """Run kupd, expecting it to exit at start: (status, stderr)."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "kupd.daemon", *args],
        env=child_env(None),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        _, err = proc.communicate(timeout=REFUSE_TIMEOUT)
    except subprocess.TimeoutExpired:
        proc.kill()
        _, err = proc.communicate()
        pytest.fail(f"kupd did not refuse to start: {err}")
    return proc.returncode, err


def _victim(path: Path) -> Path:
    """A file of root's (the test's user) nobody else may read: what an
    attacker would point kupd at (/etc/shadow)."""
    path.write_text("root:SECRET-HASH:19000:0:99999:7:::\n")
    path.chmod(0o600)
    return path


def _state(path: Path) -> tuple[str, int, int, int]:
    st = path.stat()
    return path.read_text(), st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode)


def _shared(tmp_path: Path) -> Path:
    """A directory anyone may write, sticky: as /tmp."""
    d = tmp_path / "shared"
    d.mkdir()
    d.chmod(0o1777)
    return d


def _plant(at: Path, victim: Path, kind: str) -> None:
    if kind == "symlink":
        at.symlink_to(victim)
    elif kind == "hardlink":
        os.link(victim, at)
    elif kind == "theirs":  # made first, empty, by another user (who keeps it)
        at.write_text("")
        at.chmod(0o666)
        os.chown(at, 65534, 65534)
    else:
        os.mkfifo(at, 0o666)


def _plain(tmp_path: Path, sock: Path) -> list[str]:
    """kupd's arguments serving ``sock`` (echo, no kupsim behind it)."""
    return ["--socket", str(sock), "--device", "echo", "--kupsim-dir", str(tmp_path / "nosim")]


@pytest.mark.parametrize(
    ("kind", "said"),
    [
        ("symlink", "it is a symbolic link"),
        ("hardlink", "it is a regular file of 2 names (a hard link)"),
        ("fifo", "it is not a regular file"),
        pytest.param(
            "theirs",
            "it is a file of uid 65534, not root's or kupd's",
            marks=pytest.mark.skipif(os.geteuid() != 0, reason="chown to another uid"),
        ),
    ],
)
def test_a_file_planted_at_the_lock_is_refused(tmp_path: Path, kind: str, said: str) -> None:
    """<socket>.lock planted in a shared directory: kupd used to open it,
    following a link, and truncate it -- root emptied the file it named."""
    victim = _victim(tmp_path / "victim")
    before = _state(victim)
    sock = _shared(tmp_path) / "kupd.sock"
    _plant(Path(f"{sock}.lock"), victim, kind)
    rc, err = _kupd_refuses(*_plain(tmp_path, sock))
    assert rc == 1, err
    assert f"kupd: cannot open lock_file {sock}.lock: {said}" in err, err
    assert "Traceback" not in err
    assert _state(victim) == before
    assert not sock.exists() and not Path(f"{sock}.pid").exists()


@pytest.mark.parametrize("kind", ["symlink", "hardlink"])
def test_a_file_planted_at_the_pid_file_is_replaced_not_written(tmp_path: Path, kind: str) -> None:
    """<socket>.pid planted in a shared directory (sticky, as /tmp: kupd
    serves there): kupd used to write its pid through it.  The pid file is
    now a new file renamed over the name."""
    victim = _victim(tmp_path / "victim")
    before = _state(victim)
    sock = _shared(tmp_path) / "kupd.sock"
    pid_file = Path(f"{sock}.pid")
    _plant(pid_file, victim, kind)
    k = start_kupd(*_plain(tmp_path, sock)[2:], socket=sock, log=tmp_path / "kupd.log",
                   env=child_env(None), health_interval=None, wait=False)  # fmt: skip
    try:
        k.wait_up()
        assert _state(victim) == before
        st = pid_file.lstat()
        assert stat.S_ISREG(st.st_mode) and st.st_nlink == 1, st
        assert pid_file.read_text() == f"{k.proc.pid}\n"
        assert not [p for p in os.listdir(sock.parent) if p.startswith(".kupd.sock.pid.")]
    finally:
        k.stop()
    assert not pid_file.exists() and _state(victim) == before


@pytest.mark.parametrize(
    ("kind", "said"),
    [
        ("symlink", "it is a symbolic link"),
        ("hardlink", "it is a regular file of 2 names (a hard link)"),
        ("fifo", "it is not a regular file"),  # used to block kupd in open(2) for good
        pytest.param(
            "theirs",
            "it is a file of uid 65534, not root's or kupd's",  # it could forge the log
            marks=pytest.mark.skipif(os.geteuid() != 0, reason="chown to another uid"),
        ),
    ],
)
def test_a_file_planted_at_the_audit_log_is_refused(tmp_path: Path, kind: str, said: str) -> None:
    victim = _victim(tmp_path / "victim")
    before = _state(victim)
    audit = _shared(tmp_path) / "audit.log"
    _plant(audit, victim, kind)
    cfg = tmp_path / "kupd.toml"
    cfg.write_text(f'audit_log = "{audit}"\n[[device]]\nname = "echo"\n')
    rc, err = _kupd_refuses("--config", str(cfg), *_plain(tmp_path, tmp_path / "kupd.sock"))
    assert rc == 2, err
    assert f"config key 'audit_log': cannot open {audit}: {said}" in err, err
    assert _state(victim) == before


def test_the_plain_socket_in_a_directory_anyone_may_write_is_refused(tmp_path: Path) -> None:
    """The plain socket's directory was never checked (tenant and admin
    sockets' were): in a directory anyone may write without the sticky bit
    anyone can plant links at its lock and pid file, or replace the socket.
    A sticky one, as /tmp, is accepted (the other tests here serve there)."""
    d = tmp_path / "open"
    d.mkdir()
    d.chmod(0o777)
    rc, err = _kupd_refuses(*_plain(tmp_path, d / "kupd.sock"))
    assert rc == 1, err
    want = f"directory {d} of the socket {d}/kupd.sock must be owned by root (uid 0) and"
    assert want in err, err
    assert os.listdir(d) == []  # not even the lock


def _ways(tmp_path: Path) -> Iterator[tuple[str, Path, str]]:
    """(name, a socket path running through a directory or link another
    user could change, what kupd says): the socket's directory itself is
    kupd's and private -- only the way there is not, which the check of
    the resolved directory and its real parents never saw."""
    real = tmp_path / "real"
    real.mkdir(mode=0o755, exist_ok=True)
    # a directory anyone may write (no sticky bit) holding a link to it
    open_dir = tmp_path / "open"
    open_dir.mkdir(exist_ok=True)
    open_dir.chmod(0o777)
    if not (open_dir / "t").is_symlink():
        (open_dir / "t").symlink_to(real)
    yield "open", open_dir / "t" / "x.sock", f"directory {open_dir} above the socket"
    if not AS_ROOT:
        return
    # /tmp-like (sticky): another user's link there
    sticky = _shared(tmp_path) if not (tmp_path / "shared").exists() else tmp_path / "shared"
    if not (sticky / "t").is_symlink():
        (sticky / "t").symlink_to(real)
        os.chown(sticky / "t", NOBODY, NOBODY, follow_symlinks=False)
    yield (
        "sticky",
        sticky / "t" / "x.sock",
        f"{sticky}/t on the way to the socket {sticky}/t/x.sock is a symbolic link (uid {NOBODY})",
    )
    # a directory of another user's (the probe's demo B)
    theirs = tmp_path / "theirs"
    theirs.mkdir(exist_ok=True)
    os.chown(theirs, NOBODY, NOBODY)
    if not (theirs / "t").is_symlink():
        (theirs / "t").symlink_to(real)
    yield "theirs", theirs / "t" / "x.sock", f"directory {theirs} above the socket"


def test_a_tenant_socket_through_a_link_others_control_is_refused_at_start(
    tmp_path: Path,
) -> None:
    ways = list(_ways(tmp_path))
    for name, sock, said in ways:
        cfg = tmp_path / "kupd.toml"
        cfg.write_text(
            f'socket = "{tmp_path}/kupd.sock"\nkupsim_dir = "{tmp_path}/nosim"\n'
            '[[device]]\nname = "echo"\n'
            f'[[tenant]]\nname = "t"\nsocket = "{sock}"\n'
        )
        rc, err = _kupd_refuses("--config", str(cfg))
        assert rc == 1, (name, err)
        assert said in err, (name, err)
        assert os.listdir(tmp_path / "real") == [], name


def _two(a_mode: str = "0600") -> str:
    return (
        f'[[tenant]]\nname = "x"\nsocket = "@DIR@/a.sock"\nmode = "{a_mode}"\n'
        '[[tenant.grant]]\ndevice = "echo"\n'
        '[[tenant]]\nname = "y"\nsocket = "@DIR@/b.sock"\n[[tenant.grant]]\ndevice = "echo"\n'
    )


def test_a_tenant_socket_through_a_link_others_control_is_refused_at_reload(
    start_tenants: StartTenants, tmp_path: Path
) -> None:
    k = start_tenants(DEVICES + _two())
    with k.admin() as adm:
        for name, sock, said in _ways(tmp_path):
            dave = f'[[tenant]]\nname = "dave"\nsocket = "{sock}"\n'
            k.write_config(DEVICES + _two() + dave)
            with pytest.raises(errors.KupError, match=re.escape(said)):
                adm.reload()
            assert os.listdir(tmp_path / "real") == [], name
        k.write_config(DEVICES + _two())
        assert "dave" not in adm.reload().tenants


@pytest.mark.parametrize("kind", ["symlink", "socket"])
def test_a_reload_changes_only_the_socket_kupd_bound(
    start_tenants: StartTenants, kind: str
) -> None:
    """x's socket is replaced behind kupd's back (a link to a root file, or
    another socket), then a reload widens x's mode: kupd used to stat,
    chmod and chown whatever was at the path, following links.  Now the
    reload is refused and the file there keeps its owner and mode."""
    k = start_tenants(DEVICES + _two())
    a = k.dir / "a.sock"
    os.rename(a, k.dir / "a.moved")
    other = socket.socket(socket.AF_UNIX)
    try:
        if kind == "symlink":
            target = _victim(k.dir / "victim")
            a.symlink_to(target)
        else:
            target = a
            other.bind(str(a))
            a.chmod(0o600)
        before = _state(target) if kind == "symlink" else a.lstat()
        with k.admin() as adm:
            k.write_config(DEVICES + _two("0660"))
            with pytest.raises(errors.KupError, match="no longer the socket kupd bound"):
                adm.reload()
        if kind == "symlink":
            assert _state(target) == before
        else:
            st = a.lstat()
            assert (st.st_uid, st.st_gid, st.st_mode) == (
                before.st_uid,
                before.st_gid,
                before.st_mode,
            )
        refused = [x for x in k.audit_lines() if x.get("action") == "reload"]
        assert refused and refused[-1]["ok"] is False, refused
    finally:
        other.close()


@needs_root
def test_a_reload_does_not_follow_a_link_planted_on_a_kept_sockets_way(
    start_tenants: StartTenants,
) -> None:
    """The probe's demo B at reload: after kupd started, a directory on a
    kept tenant's socket path becomes one anyone may write (sticky), and
    another user points a link there at a directory of theirs whose
    "x.sock" is a link to a root file; a reload widens x's mode.  kupd used
    to chown that file to root and chmod it: now the reload is refused,
    naming the link, and the file is untouched."""
    body = DEVICES + _two().replace("@DIR@/a.sock", "@DIR@/way/sub/a.sock")
    k = start_tenants(body)
    way = k.dir / "way"
    assert (way / "sub" / "a.sock").is_socket()
    victim = _victim(k.dir / "victim")
    os.chown(victim, NOBODY, NOBODY)
    before = _state(victim)
    way.chmod(0o1777)
    os.rename(way / "sub", way / "sub.real")
    evil = way / "evil"
    evil.mkdir()
    (evil / "a.sock").symlink_to(victim)
    (way / "sub").symlink_to(evil)
    for p in (evil, evil / "a.sock", way / "sub"):
        os.chown(p, NOBODY, NOBODY, follow_symlinks=False)
    with k.admin() as adm:
        k.write_config(body.replace('mode = "0600"', 'mode = "0660"'))
        with pytest.raises(errors.KupError, match=f"{way}/sub on the way to the socket"):
            adm.reload()
    assert _state(victim) == before

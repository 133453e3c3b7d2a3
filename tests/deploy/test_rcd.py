"""deploy/freebsd/rc.d/kupd run against a stand-in for FreeBSD's rc.subr
(tests/deploy/rc.subr), which records what it would execute: the start
command line, module loads, the reload signal, and status.  The script's
own stop (kupd_stop) signals for real.

The stand-in follows rc.subr(8)'s rules (rcvar checks, ${name}_flags,
required_files / required_modules, precmd, pidfile + procname +
command_interpreter); a real process plays the running kupd so that the
pid lookup is exercised for real.  The supervised tests run start's
command line for real too, with a stand-in for daemon(8)
(tests/deploy/daemon: it supervises, restarts, forwards SIGTERM and keeps
SIGHUP as FreeBSD 14's daemon(8) does).
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

__all__: list[str] = []

REPO = Path(__file__).resolve().parents[2]
RC_SCRIPT = REPO / "deploy/freebsd/rc.d/kupd"
STAND_IN = REPO / "tests/deploy/rc.subr"
#: a stand-in for daemon(8) that supervises as FreeBSD's does (its docstring)
DAEMON = REPO / "tests/deploy/daemon"
SH = shutil.which("sh") or "/bin/sh"


@dataclass
class RcEnv:
    dir: Path
    script: Path
    rc_conf: Path
    record: Path
    config: Path
    binary: Path
    pidfile: Path
    rundir: Path
    #: "": daemon(8) is not run (RC_SPAWN plays it, or nothing); else the
    #: stand-in daemon(8) that start runs (the shim's $RC_DAEMON)
    daemon: str = ""

    def write_conf(self, **overrides: str) -> None:
        values = {
            "kupd_enable": "YES",
            "kupd_config": str(self.config),
            "kupd_binary": str(self.binary),
            "kupd_pidfile": str(self.pidfile),
            "kupd_supervisor_pidfile": str(self.dir / "kupd.daemon.pid"),
            "kupd_rundir": str(self.rundir),
            "kupd_logfile": str(self.dir / "kupd.log"),
            # no process to look at after start, unless a test spawns one
            "kupd_start_check": "0",
        }
        values.update(overrides)
        self.rc_conf.write_text(
            "".join(f'{k}="{v}"\n' for k, v in values.items() if v is not None)
        )

    def run(self, command: str, spawn: str = "") -> subprocess.CompletedProcess[str]:
        """``spawn``: the shell command start runs in daemon(8)'s place."""
        if self.record.exists():
            self.record.unlink()
        env = dict(os.environ, RC_RECORD=str(self.record), RC_CONF=str(self.rc_conf))
        if spawn:
            env["RC_SPAWN"] = spawn
        if self.daemon:
            env["RC_DAEMON"] = self.daemon
        return subprocess.run(
            [SH, str(self.script), command], env=env, capture_output=True, text=True,
            timeout=60,
        )

    def recorded(self) -> list[str]:
        if not self.record.exists():
            return []
        return self.record.read_text().splitlines()


@pytest.fixture
def rc(tmp_path: Path) -> RcEnv:
    text = RC_SCRIPT.read_text()
    assert text.count("\n. /etc/rc.subr\n") == 1, "rc.d/kupd must source /etc/rc.subr once"
    script = tmp_path / "kupd"
    script.write_text(text.replace("\n. /etc/rc.subr\n", f"\n. {STAND_IN}\n"))
    # a stand-in kupd: a Python console script like the installed one
    binary = tmp_path / "bin" / "kupd"
    binary.parent.mkdir()
    # (a SIGHUP -- reload without an admin socket -- is written down in
    # "hups", one line each, instead of ending it)
    binary.write_text(
        f"#!{sys.executable}\nimport os, signal, time\n"
        "def hup(*_):\n"
        f"    with open({str(tmp_path / 'hups')!r}, 'a') as f:\n"
        "        f.write('HUP\\n')\n"
        "signal.signal(signal.SIGHUP, hup)\n"
        f"with open({str(tmp_path / 'up')!r}, 'a') as f:\n"
        "    f.write(f'{os.getpid()}\\n')\n"
        "while True:\n    time.sleep(1)\n"
    )
    binary.chmod(0o755)
    config = tmp_path / "kupd.toml"
    config.write_text('socket = "/var/run/kupd/kupd.sock"\n')
    env = RcEnv(
        dir=tmp_path, script=script, rc_conf=tmp_path / "rc.conf",
        record=tmp_path / "record", config=config, binary=binary,
        pidfile=tmp_path / "kupd.pid", rundir=tmp_path / "run",
    )
    env.write_conf()
    return env


@pytest.fixture
def running_kupd(rc: RcEnv) -> Iterator[int]:
    """A live process that looks like kupd to rc.subr (interpreter + script),
    its pid in kupd_pidfile as daemon(8) -p would write it -- once it has
    its SIGHUP handler (it says so in "up")."""
    proc = subprocess.Popen([str(rc.binary), "--config", str(rc.config)])
    up = rc.dir / "up"
    try:
        deadline = time.monotonic() + 30
        while not (up.exists() and str(proc.pid) in up.read_text().split()):
            assert time.monotonic() < deadline, "stand-in kupd did not start"
            time.sleep(0.05)
        rc.pidfile.write_text(f"{proc.pid}\n")
        yield proc.pid
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)


def _start_line(rc: RcEnv, *extra: str, restart: tuple[str, ...] = ("-R", "2")) -> str:
    return " ".join(
        [
            "run: limits -C daemon /usr/sbin/daemon",
            "-f", "-H", "-o", str(rc.dir / "kupd.log"),
            "-p", str(rc.pidfile), "-P", str(rc.dir / "kupd.daemon.pid"), *restart,
            "-t", "kupd", str(rc.binary), "--config", str(rc.config),
            "--pid-file", "-", "--ready-file", str(rc.rundir / "kupd.ready"), *extra,
        ]
    )


def _normalise(line: str) -> str:
    return " ".join(line.split())


def test_start_runs_daemon_with_kupd_and_loads_modules(rc: RcEnv) -> None:
    rc.write_conf(kupd_flags="--log-level debug", kupd_modules="kup_echo")
    res = rc.run("start")
    assert res.returncode == 0, res.stderr
    assert "Starting kupd." in res.stdout
    rec = [_normalise(line) for line in rc.recorded()]
    assert rec == [
        f"install -d -o root -g wheel -m 0755 {rc.rundir}",
        "kldload kupdev",
        "kldload kup_echo",
        # kupd_flags land behind kupd, not in front of daemon(8)'s options
        _start_line(rc, "--log-level", "debug"),
    ]


def test_start_without_flags_or_extra_modules(rc: RcEnv) -> None:
    res = rc.run("start")
    assert res.returncode == 0, res.stderr
    rec = [_normalise(line) for line in rc.recorded()]
    assert rec[1:] == ["kldload kupdev", _start_line(rc)]


def test_start_refused_when_not_enabled(rc: RcEnv) -> None:
    rc.write_conf(kupd_enable="NO")
    res = rc.run("start")
    assert res.returncode == 0
    assert "Cannot 'start' kupd. Set kupd_enable to YES" in res.stdout
    assert rc.recorded() == []
    # onestart overrides kupd_enable, as on FreeBSD
    res = rc.run("onestart")
    assert res.returncode == 0, res.stderr
    assert _normalise(rc.recorded()[-1]) == _start_line(rc)


def test_start_refused_without_config_file(rc: RcEnv) -> None:
    rc.config.unlink()
    res = rc.run("start")
    assert res.returncode == 1
    assert f"{rc.config} is not readable" in res.stderr
    assert rc.recorded() == []


def test_status_stop_reload_when_not_running(rc: RcEnv) -> None:
    res = rc.run("status")
    assert res.returncode == 1
    assert "kupd is not running." in res.stdout
    res = rc.run("stop")
    assert res.returncode == 1
    assert f"kupd not running? (check {rc.pidfile})." in res.stderr
    res = rc.run("reload")
    assert res.returncode == 1
    assert rc.recorded() == []


def test_stale_pidfile_is_not_running(rc: RcEnv) -> None:
    proc = subprocess.Popen([str(rc.binary)])
    proc.kill()
    proc.wait(timeout=30)
    rc.pidfile.write_text(f"{proc.pid}\n")
    res = rc.run("status")
    assert res.returncode == 1
    assert "kupd is not running." in res.stdout


def test_status_stop_reload_of_running_kupd(rc: RcEnv, running_kupd: int) -> None:
    pid = running_kupd
    res = rc.run("status")
    assert res.returncode == 0, res.stderr
    assert f"kupd is running as pid {pid}." in res.stdout

    # no admin socket (kupd_admin_socket): reload is a SIGHUP, and says so
    res = rc.run("reload")
    assert res.returncode == 0, res.stderr
    assert "Reloading kupd: SIGHUP (no admin socket at" in res.stdout, res.stdout
    assert rc.recorded() == []
    _wait(lambda: _hups(rc) == 1, "the stand-in kupd to get the SIGHUP")

    res = rc.run("start")
    assert res.returncode == 1
    assert f"kupd already running? (pid={pid})." in res.stderr
    assert rc.recorded() == []

    # no daemon(8) supervises this kupd (its pid file names none): stop
    # sends kupd itself SIGTERM
    res = rc.run("stop")
    assert res.returncode == 0, res.stderr
    assert "Stopping kupd." in res.stdout
    assert rc.recorded() == [f"wait_for_pids {pid}"]
    assert _exited(pid)


def test_pid_of_another_program_is_not_kupd(rc: RcEnv) -> None:
    """A recycled pid running something else must not be signalled."""
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    try:
        rc.pidfile.write_text(f"{other.pid}\n")
        res = rc.run("stop")
        assert res.returncode == 1
        assert rc.recorded() == []
    finally:
        other.kill()
        other.wait(timeout=30)


def _status_finds(rc: RcEnv, argv: list[str], started: Callable[[bytes], bool]) -> None:
    """Run ``argv``; once its /proc cmdline satisfies ``started`` (the
    interpreter has taken over), ``status`` with its pid in the pid file
    must find it running."""
    proc = subprocess.Popen(argv)
    try:
        cmdline = Path(f"/proc/{proc.pid}/cmdline")
        deadline = time.monotonic() + 30
        while not started(cmdline.read_bytes()):
            assert time.monotonic() < deadline, cmdline.read_bytes()
            time.sleep(0.05)
        rc.pidfile.write_text(f"{proc.pid}\n")
        res = rc.run("status")
        assert res.returncode == 0, res.stdout + res.stderr
        assert f"running as pid {proc.pid}" in res.stdout
    finally:
        proc.kill()
        proc.wait(timeout=30)


def test_interpreter_from_env_shebang(rc: RcEnv) -> None:
    """`#!/usr/bin/env python3` scripts: rc.subr matches "python3 kupd"."""
    rc.binary.write_text("#!/usr/bin/env python3\nimport time\ntime.sleep(600)\n")
    assert shutil.which("python3") is not None
    # env(1) first, then python3 (possibly by its full path, through a
    # shim) once env has exec'd it
    _status_finds(
        rc, [str(rc.binary)], lambda cmd: cmd.split(b"\0")[0].rsplit(b"/", 1)[-1] == b"python3"
    )


def test_rc_script_declares_rc_subr_conventions() -> None:
    text = RC_SCRIPT.read_text()
    for line in (
        "# PROVIDE: kupd",
        "# REQUIRE: LOGIN kld",
        "# KEYWORD: shutdown",
        'name="kupd"',
        'rcvar="kupd_enable"',
        'load_rc_config "$name"',
        'extra_commands="reload"',
        'sig_reload="HUP"',
        'reload_cmd="kupd_reload"',
        'required_modules="kupdev ${kupd_modules}"',
        'run_rc_command "$1"',
        'start_postcmd="kupd_poststart"',
    ):
        assert line in text, line
    # LOGIN comes after DAEMON: "BEFORE: DAEMON" would make a cycle
    assert "# BEFORE:" not in text
    assert os.access(RC_SCRIPT, os.X_OK), "rc.d scripts must be executable"


def test_rcvar_lists_the_enable_knob(rc: RcEnv) -> None:
    res = rc.run("rcvar")
    assert res.returncode == 0
    assert 'kupd_enable="YES"' in res.stdout


def test_unknown_command_is_refused(rc: RcEnv) -> None:
    res = rc.run("frobnicate")
    assert res.returncode == 1
    assert "unknown directive 'frobnicate'" in res.stderr


# -- start checks that kupd came up --------------------------------------------
def _as_daemon(rc: RcEnv) -> str:
    """What daemon(8) does at start, as the stand-in's RC_SPAWN: kupd
    detached (with the arguments the script gives it), its output appended
    to the log, its pid in the pid file."""
    return (
        f"'{rc.binary}' --config '{rc.config}' --pid-file - "
        f"--ready-file '{rc.rundir / 'kupd.ready'}' >> '{rc.dir / 'kupd.log'}' 2>&1 "
        f"< /dev/null & echo $! > '{rc.pidfile}'"
    )


def _reap(rc: RcEnv) -> None:
    try:
        pid = int(rc.pidfile.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def test_start_fails_when_kupd_exits_during_start_up(rc: RcEnv) -> None:
    """daemon(8) returns at once; a kupd that then exits (here: a bad
    config, exit 2) must fail the start, with its last words."""
    rc.binary.write_text(
        f"#!{sys.executable}\nimport sys, time\ntime.sleep(0.3)\n"
        "print(\"kupd: config key 'call_timeout': must be > 0\", file=sys.stderr)\n"
        "sys.exit(2)\n"
    )
    rc.write_conf(kupd_start_check="5")
    try:
        t0 = time.monotonic()
        res = rc.run("start", spawn=_as_daemon(rc))
        took = time.monotonic() - t0
    finally:
        _reap(rc)
    assert res.returncode == 1, res.stdout + res.stderr
    assert "Starting kupd." in res.stdout
    assert "kupd exited during start-up" in res.stderr
    assert "config key 'call_timeout'" in res.stderr  # the end of its log
    assert took < 4.5, took  # not the whole kupd_start_check


def test_start_succeeds_once_kupd_is_ready(rc: RcEnv) -> None:
    rc.binary.write_text(
        f"#!{sys.executable}\nimport json, os, sys, time\ntime.sleep(0.3)\n"
        "print(json.dumps({'event': 'kupd ready', 'level': 'info', 'pid': os.getpid()},"
        " sort_keys=True), file=sys.stderr, flush=True)\n"
        "time.sleep(600)\n"
    )
    rc.write_conf(kupd_start_check="20")
    try:
        t0 = time.monotonic()
        res = rc.run("start", spawn=_as_daemon(rc))
        took = time.monotonic() - t0
        assert res.returncode == 0, res.stdout + res.stderr
        assert took < 10, took  # at the ready line, not after kupd_start_check
        res = rc.run("status")
        assert res.returncode == 0 and "kupd is running as pid" in res.stdout
    finally:
        _reap(rc)


def test_start_succeeds_while_kupd_still_starts(rc: RcEnv) -> None:
    """Not ready (yet) when kupd_start_check is up, but kupd runs: success,
    with a warning.  A ready file a crashed kupd left does not count: start
    removes it before kupd runs (the new kupd may have the old one's pid)."""
    rc.rundir.mkdir()
    stale = rc.rundir / "kupd.ready"
    stale.write_text("1 ready\n")
    rc.write_conf(kupd_start_check="1")
    try:
        res = rc.run("start", spawn=_as_daemon(rc))
        assert res.returncode == 0, res.stdout + res.stderr
        assert "exited" not in res.stderr
        pid = rc.pidfile.read_text().split()[0]
        assert f"kupd (pid {pid}) is not ready after 1 s" in res.stderr
        assert not stale.exists()
    finally:
        _reap(rc)


# -- the real kupd, quiet (log_level warning): no "kupd ready" line ----------
def _real_kupd(rc: RcEnv, config: str) -> None:
    """rc.binary runs this tree's kupd (a Python console script as pip makes
    it); rc.config is ``config`` plus a device it will not find (kupd serves
    all the same, the device unhealthy)."""
    rc.binary.write_text(
        f"#!{sys.executable}\nimport sys\nsys.path.insert(0, {str(REPO)!r})\n"
        "from kupd.daemon import main\nsys.exit(main())\n"
    )
    sim = rc.dir / "sim"
    sim.mkdir()
    rc.config.write_text(
        f'socket = "{rc.rundir / "kupd.sock"}"\nkupsim_dir = "{sim}"\n'
        f'log_level = "warning"\n{config}\n[[device]]\nname = "echo"\n'
    )
    rc.rundir.mkdir()  # install(1) is only recorded by the stand-in


def _stop_kupd(rc: RcEnv, pid: int) -> None:
    os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + 30
    while Path(f"/proc/{pid}").exists() and not _zombie(pid):
        assert time.monotonic() < deadline, "kupd did not stop"
        time.sleep(0.05)


def _exited(pid: int) -> bool:
    """``pid`` (a child of this test) ends within a generous bound."""
    deadline = time.monotonic() + 30
    while Path(f"/proc/{pid}").exists() and not _zombie(pid):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def _zombie(pid: int) -> bool:
    """Exited, not reaped yet (the stand-in's spawn does not wait for it)."""
    try:
        return b") Z " in Path(f"/proc/{pid}/stat").read_bytes()
    except OSError:
        return False


def test_start_waits_for_a_quiet_kupds_ready_file(rc: RcEnv) -> None:
    """log_level warning: kupd logs no "kupd ready" line, yet start returns
    as soon as it serves -- its ready file names its pid -- not after
    kupd_start_check; the file is gone once kupd stops."""
    _real_kupd(rc, "")
    rc.write_conf(kupd_start_check="30")
    ready = rc.rundir / "kupd.ready"
    try:
        t0 = time.monotonic()
        res = rc.run("start", spawn=_as_daemon(rc))
        took = time.monotonic() - t0
        assert res.returncode == 0, res.stdout + res.stderr
        assert "not ready" not in res.stderr
        pid = int(rc.pidfile.read_text().split()[0])
        assert ready.read_text() == f"{pid} ready\n"
        assert "kupd ready" not in (rc.dir / "kupd.log").read_text()
        assert took < 20, took  # at readiness, not after kupd_start_check
        assert (rc.rundir / "kupd.sock").exists()
        res = rc.run("status")
        assert f"kupd is running as pid {pid}." in res.stdout
        _stop_kupd(rc, pid)
        assert not ready.exists()
    finally:
        _reap(rc)


def test_start_fails_fast_when_a_quiet_kupd_exits(rc: RcEnv) -> None:
    """log_level warning, and kupd exits during start-up after taking its
    lock (metrics_port taken): start fails at once, with kupd's words --
    and the ready file a killed kupd left is gone (kupd removes it too,
    once it holds the lock)."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        _real_kupd(rc, f"metrics_port = {port}")
        rc.write_conf(kupd_start_check="30")
        rc.rundir.mkdir(parents=True, exist_ok=True)
        (rc.rundir / "kupd.ready").write_text("1 ready\n")  # a killed kupd's
        try:
            t0 = time.monotonic()
            res = rc.run("start", spawn=_as_daemon(rc))
            took = time.monotonic() - t0
        finally:
            _reap(rc)
    assert res.returncode == 1, res.stdout + res.stderr
    assert "kupd exited during start-up" in res.stderr
    assert "Address already in use" in res.stderr, res.stderr
    assert took < 20, took
    assert not (rc.rundir / "kupd.ready").exists()


def test_quiet_kupd_removes_a_stale_ready_file_at_start(rc: RcEnv) -> None:
    """kupd itself (started without rc.d's prestart) does not leave a ready
    file of a crashed kupd in place: one that fails after taking its lock
    removes it, so nothing reads it as this kupd's readiness."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        _real_kupd(rc, f"metrics_port = {port}")
        ready = rc.rundir / "kupd.ready"
        ready.write_text("1 ready\n")
        res = subprocess.run(
            [str(rc.binary), "--config", str(rc.config), "--ready-file", str(ready)],
            capture_output=True, text=True, timeout=60,
        )
    assert res.returncode == 1, res.stderr
    assert not ready.exists()


# -- reload over the admin socket (kupctl reload) ----------------------------
def _hups(rc: RcEnv) -> int:
    """SIGHUPs the stand-in kupd (the ``rc`` fixture's) has had."""
    hups = rc.dir / "hups"
    return len(hups.read_text().splitlines()) if hups.exists() else 0


def _kupctl(rc: RcEnv) -> Path:
    """This tree's kupctl, installed beside rc.binary as pip puts it (where
    kupd_kupctl looks by default)."""
    kupctl = rc.binary.parent / "kupctl"
    kupctl.write_text(
        f"#!{sys.executable}\nimport sys\n"
        f"sys.path[:0] = [{str(REPO / 'clients/python')!r}, {str(REPO)!r}]\n"
        "from kupclient._cli import main\nsys.exit(main())\n"
    )
    kupctl.chmod(0o755)
    return kupctl


def test_reload_asks_kupd_over_its_admin_socket(rc: RcEnv) -> None:
    """With admin_socket at kupd_admin_socket's default, reload runs
    "kupctl reload" on it: a good file is applied and said so (exit 0); a
    refused one fails the reload with kupd's words naming the key, and kupd
    runs on with the config it had.  No SIGHUP either time."""
    admin = rc.rundir / "admin.sock"
    _real_kupd(rc, f'admin_socket = "{admin}"')
    _kupctl(rc)
    rc.write_conf(kupd_start_check="30")
    try:
        res = rc.run("start", spawn=_as_daemon(rc))
        assert res.returncode == 0, res.stdout + res.stderr
        pid = int(rc.pidfile.read_text().split()[0])
        assert admin.is_socket()
        good = rc.config.read_text()

        rc.config.write_text("call_timeout = 7\n" + good)
        res = rc.run("reload")
        assert res.returncode == 0, res.stdout + res.stderr
        assert "Reloading kupd." in res.stdout, res.stdout
        assert "reloaded: tenants default" in res.stdout, res.stdout
        assert "applied: call_timeout" in res.stdout, res.stdout
        assert rc.recorded() == []

        rc.config.write_text("call_timeout = -1\n" + good)
        res = rc.run("reload")
        assert res.returncode == 1, res.stdout + res.stderr
        assert "'call_timeout'" in res.stderr, res.stderr  # kupd's refusal, via kupctl
        assert "kupd refused" in res.stderr and "the running config stays" in res.stderr
        assert str(rc.config) in res.stderr, res.stderr
        assert rc.recorded() == []
        assert f"kupd is running as pid {pid}." in rc.run("status").stdout
        _stop_kupd(rc, pid)
    finally:
        _reap(rc)


def test_reload_fails_when_the_admin_socket_does_not_answer(
    rc: RcEnv, running_kupd: int
) -> None:
    """A socket file at kupd_admin_socket that nothing serves (admin_socket
    moved, a kupd killed): the reload fails saying kupd did not confirm it,
    and sends no SIGHUP."""
    _kupctl(rc)
    rc.rundir.mkdir()
    stale = rc.rundir / "admin.sock"
    with socket.socket(socket.AF_UNIX) as s:
        s.bind(str(stale))
    res = rc.run("reload")
    assert res.returncode == 1, res.stdout + res.stderr
    assert "kupd did not confirm the reload (kupctl reload exit 17" in res.stderr, res.stderr
    assert str(stale) in res.stderr, res.stderr  # kupctl's own words name it
    assert _hups(rc) == 0


def test_reload_waits_kupd_reload_timeout_for_kupd(rc: RcEnv, running_kupd: int) -> None:
    """reload passes kupd_reload_timeout (default 10) to kupctl reload
    --timeout: a kupd that takes the connection but never answers (stopped,
    hung: a socket that listens and accepts nothing) fails the reload then,
    with kupctl's words and exit 9 -- not after kupctl's own 30 s."""
    # what reload runs, by default and as set
    args = rc.dir / "kupctl-args"
    fake = rc.dir / "fake-kupctl"
    fake.write_text(f'#!/bin/sh\necho "$@" >> {args}\n')
    fake.chmod(0o755)
    rc.rundir.mkdir()
    admin = rc.rundir / "admin.sock"
    with socket.socket(socket.AF_UNIX) as s:
        s.bind(str(admin))
        s.listen(8)  # takes connections into its backlog; nothing accepts them
        for conf, want in (({}, "10"), ({"kupd_reload_timeout": "2.5"}, "2.5")):
            rc.write_conf(kupd_kupctl=str(fake), **conf)
            res = rc.run("reload")
            assert res.returncode == 0, res.stdout + res.stderr
            assert args.read_text().splitlines()[-1] == (
                f"reload --admin-socket {admin} --timeout {want}"
            )
        # the real kupctl against it: past the timeout, kupd did not answer
        _kupctl(rc)
        rc.write_conf(kupd_reload_timeout="1")
        res = rc.run("reload")
    assert res.returncode == 1, res.stdout + res.stderr
    assert "kupctl: DeadlineExceeded: kupd did not answer the reload within 1 s" in res.stderr
    assert "kupd did not confirm the reload (kupctl reload exit 9" in res.stderr, res.stderr
    assert _hups(rc) == 0


def test_reload_with_a_bad_kupd_reload_timeout_names_it(rc: RcEnv, running_kupd: int) -> None:
    """kupd_reload_timeout that kupctl refuses (exit 2, its words naming
    --timeout): the reload fails naming the rc.conf variable, nothing sent."""
    _kupctl(rc)
    rc.rundir.mkdir()
    with socket.socket(socket.AF_UNIX) as s:
        s.bind(str(rc.rundir / "admin.sock"))
        for bad in ("soon", "0", "-3"):
            rc.write_conf(kupd_reload_timeout=bad)
            res = rc.run("reload")
            assert res.returncode == 1, res.stdout + res.stderr
            assert "argument --timeout" in res.stderr, res.stderr
            assert f"check kupd_reload_timeout ('{bad}': seconds > 0)" in res.stderr
    assert _hups(rc) == 0


def test_reload_without_kupctl_falls_back_to_sighup(rc: RcEnv, running_kupd: int) -> None:
    """An admin socket but no kupctl at kupd_kupctl: a warning saying the
    result will not be reported, and the SIGHUP (the reload is not lost)."""
    rc.rundir.mkdir()
    with socket.socket(socket.AF_UNIX) as s:
        s.bind(str(rc.rundir / "admin.sock"))
        res = rc.run("reload")
    assert res.returncode == 0, res.stdout + res.stderr
    assert f"no kupctl at {rc.binary.parent / 'kupctl'} (kupd_kupctl)" in res.stderr
    assert "a refused file shows only in" in res.stderr
    _wait(lambda: _hups(rc) == 1, "the stand-in kupd to get the SIGHUP")


def test_start_refused_without_kupd_or_its_interpreter(rc: RcEnv) -> None:
    interp = rc.dir / "no-such-python3.11"
    rc.binary.write_text(f"#!{interp}\n")
    res = rc.run("start")
    assert res.returncode == 1
    assert f"{interp} is not readable" in res.stderr
    assert rc.recorded() == []
    rc.binary.unlink()
    res = rc.run("start")
    assert res.returncode == 1
    assert f"{rc.binary} is not readable" in res.stderr
    assert rc.recorded() == []


def test_interpreter_from_pips_sh_trampoline(rc: RcEnv) -> None:
    """pip writes `#!/bin/sh` + `\'\'\'exec\' "PYTHON" "$0" "$@"` when the
    interpreter's path has a space (or is too long for #!): the running
    process is "PYTHON kupd", not "/bin/sh kupd"."""
    pydir = rc.dir / "kupd venv" / "bin"
    pydir.mkdir(parents=True)
    (pydir / "python3").symlink_to(sys.executable)
    rc.binary.write_text(
        f"#!/bin/sh\n\'\'\'exec\' \"{pydir}/python3\" \"$0\" \"$@\"\n\' \'\'\'\n"
        "import time\ntime.sleep(600)\n"
    )
    _status_finds(
        rc,
        [str(rc.binary), "--config", str(rc.config)],
        lambda cmd: cmd.startswith(os.fsencode(pydir)),
    )


# -- supervised: kupd_restart (daemon(8) -R), the stand-in daemon(8) ---------
@pytest.fixture
def supervised(rc: RcEnv) -> Iterator[RcEnv]:
    """``rc`` whose start runs the stand-in daemon(8) (tests/deploy/daemon)
    with the script's own arguments; whatever is left is killed at the end,
    daemon(8) first (it would restart kupd)."""
    rc.daemon = str(DAEMON)
    try:
        yield rc
    finally:
        for path in (rc.dir / "kupd.daemon.pid", rc.pidfile):
            pid = _pid_in(path)
            if pid:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)


def _pid_in(path: Path) -> int:
    try:
        return int(path.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 0


def _alive(pid: int) -> bool:
    return pid > 0 and Path(f"/proc/{pid}").exists() and not _zombie(pid)


def _supervisor(rc: RcEnv) -> int:
    return _pid_in(rc.dir / "kupd.daemon.pid")


def _running(rc: RcEnv) -> tuple[int, int]:
    """(kupd, daemon(8)) once both pid files name a live process, kupd's one
    that runs kupd already (start returns before, with kupd_start_check=0;
    daemon(8) writes the child's pid before the child has exec'd kupd, and
    rc.subr's status looks for kupd in that process)."""
    _wait(
        lambda: _alive(_supervisor(rc)) and _pid_in(rc.pidfile) in _kupds(rc), "kupd to run"
    )
    return _pid_in(rc.pidfile), _supervisor(rc)


def _log_has(rc: RcEnv, text: str) -> bool:
    log = rc.dir / "kupd.log"
    return log.exists() and text in log.read_text()


def _wait(cond: Callable[[], bool], what: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)


def _new_ready_kupd(rc: RcEnv, old: int) -> int:
    """The pid of the kupd daemon(8) started after ``old``, once it serves."""
    ready = rc.rundir / "kupd.ready"

    def up() -> bool:
        pid = _pid_in(rc.pidfile)
        return pid not in (0, old) and _alive(pid) and (
            ready.exists() and ready.read_text() == f"{pid} ready\n"
        )

    _wait(up, "daemon(8) to start kupd again, and that kupd to serve")
    return _pid_in(rc.pidfile)


def _gone(rc: RcEnv, *pids: int) -> None:
    """Stopped for good: the processes ended, daemon(8)'s pid files removed
    -- no daemon(8) is left to start kupd again."""
    for pid in pids:
        assert _exited(pid), pid
    assert not rc.pidfile.exists()
    assert not (rc.dir / "kupd.daemon.pid").exists()
    assert _kupds(rc) == []


def _kupds(rc: RcEnv) -> list[int]:
    """Every live process running this test's kupd (rc.binary)."""
    found = []
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            argv = (d / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if os.fsencode(rc.binary) in argv[:2] and _alive(int(d.name)):
            found.append(int(d.name))
    return found


def test_restart_defaults_match_the_systemd_unit() -> None:
    """rc.d restarts kupd by default, after the systemd unit's RestartSec."""
    unit = (REPO / "deploy/linux/kupd.service").read_text()
    (sec,) = re.findall(r"^RestartSec=(\d+)$", unit, re.M)
    text = RC_SCRIPT.read_text()
    assert ': "${kupd_restart:=YES}"' in text
    assert f': "${{kupd_restart_delay:={sec}}}"' in text


def test_start_line_restarts_by_default_and_not_with_kupd_restart_no(rc: RcEnv) -> None:
    rc.write_conf(kupd_restart_delay="7")
    assert rc.run("start").returncode == 0
    assert _normalise(rc.recorded()[-1]) == _start_line(rc, restart=("-R", "7"))
    rc.write_conf(kupd_restart="NO", kupd_restart_delay="junk")  # unused: not checked
    assert rc.run("start").returncode == 0
    assert _normalise(rc.recorded()[-1]) == _start_line(rc, restart=())


@pytest.mark.parametrize("delay", ["0", "1.5", "-1", "05", "31536001"])
def test_start_refuses_a_bad_kupd_restart_delay(rc: RcEnv, delay: str) -> None:
    rc.write_conf(kupd_restart_delay=delay)
    res = rc.run("start")
    assert res.returncode == 1, res.stdout + res.stderr
    assert "kupd_restart_delay must be" in res.stderr, res.stderr
    assert not [x for x in rc.recorded() if x.startswith("run:")]


def test_supervised_kupd_that_stops_itself_is_restarted(supervised: RcEnv) -> None:
    """The real kupd under daemon(8) -R: its run directory removed, it stops
    itself (exit 1) and daemon(8) starts it afresh, which makes the
    directory, socket and ready file again; reload reaches the new kupd;
    newsyslog's SIGHUP to daemon(8) re-opens the log and reaches no kupd;
    stop ends kupd and daemon(8) both, and nothing starts kupd again."""
    rc = supervised
    _real_kupd(rc, "")
    rc.write_conf(kupd_start_check="60", kupd_restart_delay="1")
    res = rc.run("start")
    assert res.returncode == 0, res.stdout + res.stderr
    first = _pid_in(rc.pidfile)
    sup = _supervisor(rc)
    assert _alive(first) and _alive(sup), (first, sup)
    shutil.rmtree(rc.rundir)
    pid = _new_ready_kupd(rc, first)
    assert (rc.rundir / "kupd.sock").exists()
    assert _exited(first)
    assert _supervisor(rc) == sup
    res = rc.run("status")
    assert f"kupd is running as pid {pid}." in res.stdout, res.stdout

    # reload signals the kupd running now (no admin socket), not daemon(8)
    # (which would only re-open its log)
    cfg = rc.config.read_text()
    # (a key only a restart applies: the reload logs it at log_level warning)
    rc.config.write_text("metrics_port = 9464\n" + cfg)
    res = rc.run("reload")
    assert res.returncode == 0, res.stderr
    assert "SIGHUP" in res.stdout, res.stdout
    _wait(lambda: _log_has(rc, '"keys": ["metrics_port"]'), "kupd to reload")

    # newsyslog: the log renamed, SIGHUP to daemon(8): a new file, the
    # same kupd (not signalled, not restarted)
    (rc.dir / "kupd.log").rename(rc.dir / "kupd.log.0")
    os.kill(sup, signal.SIGHUP)
    _wait(lambda: (rc.dir / "kupd.log").exists(), "daemon(8) to re-open its log")
    rc.config.write_text("metrics_port = 9465\n" + cfg)
    os.kill(pid, signal.SIGHUP)
    _wait(lambda: _log_has(rc, '"keys": ["metrics_port"]'), "the reload's line, new log")
    assert _pid_in(rc.pidfile) == pid and _alive(pid)

    res = rc.run("stop")
    assert res.returncode == 0, res.stdout + res.stderr
    assert "Stopping kupd." in res.stdout
    _gone(rc, pid, sup)
    assert not (rc.rundir / "kupd.ready").exists()
    assert "kupd is not running." in rc.run("status").stdout


def test_sigterm_to_kupd_alone_is_followed_by_a_restart(supervised: RcEnv) -> None:
    """daemon(8) -R restarts whatever the exit status -- also a kupd that
    drained on SIGTERM and exited 0 -- which is why stop signals daemon(8)
    instead."""
    rc = supervised
    rc.write_conf(kupd_restart_delay="1")
    assert rc.run("start").returncode == 0
    first, sup = _running(rc)
    os.kill(first, signal.SIGTERM)
    _wait(lambda: _pid_in(rc.pidfile) not in (0, first) and _alive(_pid_in(rc.pidfile)),
          "daemon(8) to start kupd again")  # fmt: skip
    again = _pid_in(rc.pidfile)
    assert _supervisor(rc) == sup
    assert rc.run("stop").returncode == 0
    _gone(rc, again, sup)


def test_stop_while_daemon_waits_to_restart_kupd(supervised: RcEnv) -> None:
    """kupd gone, daemon(8) sleeping before it restarts it (a SIGTERM then
    is lost): stop still ends daemon(8), and no kupd is left."""
    rc = supervised
    rc.write_conf(kupd_restart_delay="6")
    assert rc.run("start").returncode == 0
    first, sup = _running(rc)
    os.kill(first, signal.SIGKILL)
    _wait(lambda: not Path(f"/proc/{first}").exists(), "daemon(8) to reap kupd")
    # not a second daemon(8) (a loaded machine may have let daemon(8)
    # start kupd again already: then the usual refusal)
    res = rc.run("start")
    assert res.returncode == 1, res.stdout + res.stderr
    assert "is being restarted by daemon(8)" in res.stderr or (
        "kupd already running?" in res.stderr
    ), res.stderr
    res = rc.run("stop")
    assert res.returncode == 0, res.stdout + res.stderr
    assert "Stopping kupd." in res.stdout
    _gone(rc, sup)


def test_status_while_daemon_waits_to_restart_kupd(supervised: RcEnv) -> None:
    """kupd gone, daemon(8) waiting kupd_restart_delay to start it again:
    status tells the truth -- the service runs (exit 0, rc.subr's status of
    a running service) and kupd is restarting, naming daemon(8)'s pid --
    then names the new kupd once daemon(8) has started it."""
    rc = supervised
    # daemon(8) is held still (SIGSTOP) while status looks, so the status
    # falls into the wait however loaded the machine and however long it
    # takes; the delay only has to outlast noticing kupd's exit and
    # stopping daemon(8) -- and is then waited out, so it is short
    rc.write_conf(kupd_restart_delay="5")
    assert rc.run("start").returncode == 0
    first, sup = _running(rc)
    assert f"kupd is running as pid {first}." in rc.run("status").stdout
    os.kill(first, signal.SIGKILL)
    _wait(lambda: not Path(f"/proc/{first}").exists(), "daemon(8) to reap kupd")
    os.kill(sup, signal.SIGSTOP)
    try:
        assert not _alive(_pid_in(rc.pidfile)), "daemon(8) restarted kupd before the status"
        res = rc.run("status")
    finally:
        os.kill(sup, signal.SIGCONT)
    assert res.returncode == 0, res.stdout + res.stderr
    assert f"kupd is restarting (daemon pid {sup})" in res.stdout, res.stdout
    assert "5 s after it exited" in res.stdout, res.stdout
    assert "not running" not in res.stdout, res.stdout
    # until the pid file names a process that runs kupd -- what status (rc.subr's
    # check_pidfile) looks for: daemon(8) writes the child's pid before the
    # child has exec'd kupd, and a status in between still says restarting
    _wait(lambda: _pid_in(rc.pidfile) not in (0, first) and _pid_in(rc.pidfile) in _kupds(rc),
          "daemon(8) to start kupd again")  # fmt: skip
    again = _pid_in(rc.pidfile)
    res = rc.run("status")
    assert res.returncode == 0 and f"kupd is running as pid {again}." in res.stdout, res.stdout
    assert rc.run("stop").returncode == 0
    _gone(rc, again, sup)
    res = rc.run("status")
    assert res.returncode == 1 and "kupd is not running." in res.stdout, res.stdout


def test_start_failure_stops_the_restarts(supervised: RcEnv) -> None:
    """A kupd that cannot start (exit 2, a bad config) fails the start, and
    daemon(8) is stopped with it instead of starting it again and again."""
    rc = supervised
    rc.binary.write_text(
        f"#!{sys.executable}\nimport sys, time\ntime.sleep(0.3)\n"
        "print(\"kupd: config key 'call_timeout': must be > 0\", file=sys.stderr)\n"
        "sys.exit(2)\n"
    )
    rc.write_conf(kupd_start_check="30", kupd_restart_delay="1")
    res = rc.run("start")
    assert res.returncode == 1, res.stdout + res.stderr
    assert "kupd exited during start-up" in res.stderr
    assert "config key 'call_timeout'" in res.stderr
    assert not (rc.dir / "kupd.daemon.pid").exists()
    assert _kupds(rc) == []
    assert "kupd not running?" in rc.run("stop").stderr


def test_no_restart_when_kupd_restart_is_no(supervised: RcEnv) -> None:
    rc = supervised
    rc.write_conf(kupd_restart="NO")
    assert rc.run("start").returncode == 0
    first, sup = _running(rc)
    os.kill(first, signal.SIGTERM)
    _gone(rc, first, sup)  # daemon(8) exits with kupd

"""deploy/freebsd/rc.d/kupd run against a stand-in for FreeBSD's rc.subr
(tests/deploy/rc.subr), which records what it would execute: the start
command line, module loads, signals for stop / reload, and status.

The stand-in follows rc.subr(8)'s rules (rcvar checks, ${name}_flags,
required_files / required_modules, precmd, pidfile + procname +
command_interpreter); a real process plays the running kupd so that the
pid lookup is exercised for real.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

__all__: list[str] = []

REPO = Path(__file__).resolve().parents[2]
RC_SCRIPT = REPO / "deploy/freebsd/rc.d/kupd"
STAND_IN = REPO / "tests/deploy/rc.subr"
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

    def write_conf(self, **overrides: str) -> None:
        values = {
            "kupd_enable": "YES",
            "kupd_config": str(self.config),
            "kupd_binary": str(self.binary),
            "kupd_pidfile": str(self.pidfile),
            "kupd_supervisor_pidfile": str(self.dir / "kupd.daemon.pid"),
            "kupd_rundir": str(self.rundir),
            "kupd_logfile": str(self.dir / "kupd.log"),
        }
        values.update(overrides)
        self.rc_conf.write_text(
            "".join(f'{k}="{v}"\n' for k, v in values.items() if v is not None)
        )

    def run(self, command: str) -> subprocess.CompletedProcess[str]:
        if self.record.exists():
            self.record.unlink()
        env = dict(os.environ, RC_RECORD=str(self.record), RC_CONF=str(self.rc_conf))
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
    binary.write_text(
        f"#!{sys.executable}\nimport time\nwhile True:\n    time.sleep(1)\n"
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
    its pid in kupd_pidfile as daemon(8) -p would write it."""
    proc = subprocess.Popen([str(rc.binary), "--config", str(rc.config)])
    try:
        cmdline = Path(f"/proc/{proc.pid}/cmdline")
        deadline = time.monotonic() + 30
        while str(rc.binary) not in cmdline.read_bytes().decode(errors="replace"):
            assert time.monotonic() < deadline, "stand-in kupd did not start"
            time.sleep(0.05)
        rc.pidfile.write_text(f"{proc.pid}\n")
        yield proc.pid
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)


def _start_line(rc: RcEnv, *extra: str) -> str:
    return " ".join(
        [
            "run: limits -C daemon /usr/sbin/daemon",
            "-f", "-H", "-o", str(rc.dir / "kupd.log"),
            "-p", str(rc.pidfile), "-P", str(rc.dir / "kupd.daemon.pid"),
            "-t", "kupd", str(rc.binary), "--config", str(rc.config),
            "--pid-file", "-", *extra,
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

    res = rc.run("reload")
    assert res.returncode == 0, res.stderr
    assert rc.recorded() == [f"kill -HUP {pid}"]

    res = rc.run("stop")
    assert res.returncode == 0, res.stderr
    assert "Stopping kupd." in res.stdout
    assert rc.recorded() == [f"kill -TERM {pid}", f"wait_for_pids {pid}"]

    res = rc.run("start")
    assert res.returncode == 1
    assert f"kupd already running? (pid={pid})." in res.stderr
    assert rc.recorded() == []


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


def test_interpreter_from_env_shebang(rc: RcEnv) -> None:
    """`#!/usr/bin/env python3` scripts: rc.subr matches "python3 kupd"."""
    rc.binary.write_text("#!/usr/bin/env python3\nimport time\ntime.sleep(600)\n")
    assert shutil.which("python3") is not None
    proc = subprocess.Popen([str(rc.binary)])
    try:
        cmdline = Path(f"/proc/{proc.pid}/cmdline")
        deadline = time.monotonic() + 30
        # env(1) first, then python3 (possibly by its full path, through a
        # shim) once env has exec'd it
        while cmdline.read_bytes().split(b"\0")[0].rsplit(b"/", 1)[-1] != b"python3":
            assert time.monotonic() < deadline, cmdline.read_bytes()
            time.sleep(0.05)
        rc.pidfile.write_text(f"{proc.pid}\n")
        res = rc.run("status")
        assert res.returncode == 0, res.stdout + res.stderr
        assert f"running as pid {proc.pid}" in res.stdout
    finally:
        proc.kill()
        proc.wait(timeout=30)


def test_rc_script_declares_rc_subr_conventions() -> None:
    text = RC_SCRIPT.read_text()
    for line in (
        "# PROVIDE: kupd",
        "# REQUIRE: FILESYSTEMS kld syslogd",
        "# KEYWORD: shutdown",
        'name="kupd"',
        'rcvar="kupd_enable"',
        'load_rc_config "$name"',
        'extra_commands="reload"',
        'sig_reload="HUP"',
        'required_modules="kupdev ${kupd_modules}"',
        'run_rc_command "$1"',
    ):
        assert line in text, line
    assert os.access(RC_SCRIPT, os.X_OK), "rc.d scripts must be executable"


def test_rcvar_lists_the_enable_knob(rc: RcEnv) -> None:
    res = rc.run("rcvar")
    assert res.returncode == 0
    assert 'kupd_enable="YES"' in res.stdout


def test_unknown_command_is_refused(rc: RcEnv) -> None:
    res = rc.run("frobnicate")
    assert res.returncode == 1
    assert "unknown directive 'frobnicate'" in res.stderr

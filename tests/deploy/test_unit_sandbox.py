"""deploy/linux/kupd.service against what kupd does with the shipped sample
config (deploy/kupd.sample.toml): the capabilities it needs, the paths it
writes, the reload command and the exit status of a bad config.

Without systemd running, the sandbox is checked two ways: by reading the
unit (every path the sample writes lies in a directory the unit makes
writable), and, as root, by starting the real kupd with the sample under
the unit's capability bounding set and umask (setpriv), which is what
decides whether chown / chmod of the tenants' sockets succeed.
"""

from __future__ import annotations

import configparser
import os
import shlex
import shutil
import signal
import socket
import stat
import subprocess
import sys
import time
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:
    from kupd.config import Config

__all__: list[str] = []

REPO = Path(__file__).resolve().parents[2]
UNIT = REPO / "deploy/linux/kupd.service"
SAMPLE = REPO / "deploy/kupd.sample.toml"


def _service() -> configparser.SectionProxy:
    parser = configparser.RawConfigParser(strict=False, interpolation=None)
    parser.optionxform = str  # type: ignore[assignment,method-assign]
    parser.read_string(UNIT.read_text())
    return parser["Service"]


def _exec_start_args() -> list[str]:
    """kupd's arguments from ExecStart, with the sample as --config."""
    args = _service()["ExecStart"].split()[1:]
    args[args.index("--config") + 1] = str(SAMPLE)
    return args


def _sample_config() -> Config:
    """The sample as kupd loads it under the unit (ExecStart's flags on top)."""
    from kupd.daemon import config_from_args, parse_args

    return config_from_args(parse_args(_exec_start_args()))


def _writable_roots() -> list[PurePosixPath]:
    """What ProtectSystem=strict leaves writable for kupd (its sockets must
    also be reachable by clients, so PrivateTmp's /tmp does not count)."""
    svc = _service()
    assert svc["ProtectSystem"] == "strict"
    roots: list[PurePosixPath] = []
    for key, base in (
        ("RuntimeDirectory", "/run"),
        ("LogsDirectory", "/var/log"),
        ("StateDirectory", "/var/lib"),
        ("CacheDirectory", "/var/cache"),
    ):
        roots += [PurePosixPath(base) / d for d in svc.get(key, "").split()]
    roots += [PurePosixPath(p.lstrip("-")) for p in svc.get("ReadWritePaths", "").split()]
    return roots


def _written_paths(cfg: Config) -> dict[str, str]:
    """Every file kupd creates for this config (its directory too, when
    missing): sockets, lock, pid file, audit log."""
    paths = {
        "socket": cfg.socket,
        "lock_file": cfg.lock_path,
        "pid_file": cfg.pid_path,
        "admin_socket": cfg.admin_socket,
        "audit_log": cfg.audit_log,
    }
    for t in cfg.tenants:
        paths[f"tenant {t.name} socket"] = t.socket
    return {k: v for k, v in paths.items() if v}


def test_every_path_the_sample_writes_is_writable_under_the_unit() -> None:
    cfg = _sample_config()
    roots = _writable_roots()
    written = _written_paths(cfg)
    # the sample does write all of these (else this test checks too little)
    assert {"socket", "lock_file", "admin_socket", "audit_log"} <= set(written)
    assert any(k.startswith("tenant ") for k in written)
    assert "pid_file" not in written  # --pid-file -: systemd tracks the pid
    for what, path in written.items():
        p = PurePosixPath(path)
        assert p.is_absolute(), (what, path)
        assert any(p.is_relative_to(r) and p != r for r in roots), (
            f"{what} {path} is read-only under the unit (writable: {[str(r) for r in roots]})"
        )


def test_umask_lets_tenants_reach_their_socket_directories() -> None:
    """kupd creates a tenant's socket directory with mkdir(0755); under the
    unit's umask it must stay searchable by the tenant, or connect(2) fails.
    (The sockets' own modes do not depend on it: kupd sets its own umask.)"""
    svc = _service()
    umask = int(svc["UMask"], 8)
    assert 0o755 & ~umask == 0o755
    assert int(svc["RuntimeDirectoryMode"], 8) & 0o055 == 0o055
    cfg = _sample_config()
    runtime = PurePosixPath("/run") / svc["RuntimeDirectory"]
    dirs = {PurePosixPath(t.socket).parent for t in cfg.tenants}
    assert any(d != runtime for d in dirs), "the sample has no tenant socket directory"


def test_capabilities_are_those_the_sample_needs() -> None:
    """Owner / group on a tenant: kupd chowns the socket (CAP_CHOWN) and, at
    a reload that changes them or the mode, chmods a socket another user
    owns (CAP_FOWNER).  Nothing else is granted."""
    cfg = _sample_config()
    tenants = cfg.tenants
    assert any(t.owner is not None and t.owner != 0 for t in tenants)
    assert any(t.group is not None for t in tenants)
    svc = _service()
    assert sorted(svc["CapabilityBoundingSet"].split()) == ["CAP_CHOWN", "CAP_FOWNER"]
    assert svc["AmbientCapabilities"] == ""
    assert svc["NoNewPrivileges"] == "yes"


def test_a_bad_config_exits_2_and_the_unit_does_not_restart_it(tmp_path: Path) -> None:
    from kupd.daemon import main

    bad = tmp_path / "kupd.toml"
    bad.write_text('call_timeout = -1\n[[device]]\nname = "echo"\n')
    assert main(["--config", str(bad), "--socket", str(tmp_path / "k.sock")]) == 2
    svc = _service()
    assert svc["Restart"] == "on-failure"
    assert "2" in svc["RestartPreventExitStatus"].split()


def test_documentation_names_nothing_that_does_not_ship() -> None:
    svc_text = UNIT.read_text()
    docs = [
        uri
        for line in svc_text.splitlines()
        if line.startswith("Documentation=")
        for uri in line.split("=", 1)[1].split()
    ]
    for uri in docs:
        assert uri.startswith(("https://", "http://", "man:", "file:", "info:")), uri
        if uri.startswith("man:"):
            name, _, section = uri[4:].rstrip(")").partition("(")
            assert list(REPO.rglob(f"{name}.{section}")), f"{uri}: no such man page ships"


# -- ExecReload, run for real with stand-ins --------------------------------
def _reload_command(admin: Path, kupctl: Path, mainpid: int) -> list[str]:
    """ExecReload as systemd would run it, with the admin socket, kupctl and
    ${MAINPID} (systemd's own substitution) replaced."""
    line = _service()["ExecReload"]
    assert "/run/kupd/admin.sock" in line and "/usr/local/bin/kupctl" in line
    line = line.replace("/run/kupd/admin.sock", str(admin))
    line = line.replace("/usr/local/bin/kupctl", str(kupctl)).replace("${MAINPID}", str(mainpid))
    return shlex.split(line)


def test_exec_reload_uses_the_samples_admin_socket() -> None:
    cfg = _sample_config()
    assert cfg.admin_socket == "/run/kupd/admin.sock"
    assert cfg.admin_socket in _service()["ExecReload"]


def test_exec_reload_reports_kupctls_answer(tmp_path: Path) -> None:
    """With the admin socket: kupctl reload on it, waiting at most 10 s
    for kupd's answer (a stopped kupd fails it then), and its exit status
    (8: kupd refused the file) is the reload's."""
    record = tmp_path / "argv"
    kupctl = tmp_path / "kupctl"
    kupctl.write_text(f'#!/bin/sh\necho "$@" > {record}\nexit 8\n')
    kupctl.chmod(0o755)
    admin = tmp_path / "admin.sock"
    with socket.socket(socket.AF_UNIX) as s:
        s.bind(str(admin))
        res = subprocess.run(
            _reload_command(admin, kupctl, 1), capture_output=True, text=True, timeout=60
        )
    assert res.returncode == 8, res.stderr
    assert record.read_text().split() == [
        "reload", "--admin-socket", str(admin), "--timeout", "10",
    ]


def test_exec_reload_falls_back_to_sighup(tmp_path: Path) -> None:
    """Without the admin socket (a config with no admin_socket): SIGHUP to
    the main pid, as before."""
    got = tmp_path / "got"
    child = subprocess.Popen(
        [
            sys.executable, "-c",
            "import pathlib, signal, sys, time\n"
            f"got = pathlib.Path({str(got)!r})\n"
            "signal.signal(signal.SIGHUP, lambda *a: (got.write_text('HUP'), sys.exit(0)))\n"
            f"pathlib.Path({str(got)!r} + '.ready').touch()\n"
            "time.sleep(60)\n",
        ]
    )
    try:
        deadline = time.monotonic() + 30
        while not Path(str(got) + ".ready").exists():
            assert time.monotonic() < deadline
            time.sleep(0.05)
        res = subprocess.run(
            _reload_command(tmp_path / "absent.sock", tmp_path / "no-kupctl", child.pid),
            capture_output=True, text=True, timeout=60,
        )
        assert res.returncode == 0, res.stderr
        assert child.wait(timeout=30) == 0
        assert got.read_text() == "HUP"
    finally:
        if child.poll() is None:
            child.kill()
            child.wait(timeout=30)


# -- the real kupd under the unit's privileges --------------------------------
def _setpriv_caps() -> str:
    caps = _service()["CapabilityBoundingSet"].split()
    return ",".join(["-all", *(f"+{c.removeprefix('CAP_').lower()}" for c in caps)])


needs_root = pytest.mark.skipif(
    os.geteuid() != 0 or shutil.which("setpriv") is None,
    reason="needs root and setpriv to run kupd with the unit's capabilities",
)


class _Kupd:
    def __init__(self, tmp: Path, caps: str) -> None:
        self.tmp = tmp
        self.run_dir = tmp / "run"
        self.config = tmp / "kupd.toml"
        text = SAMPLE.read_text()
        text = text.replace("/run/kupd/", f"{self.run_dir}/")
        text = text.replace("/var/log/kupd/", f"{tmp / 'log'}/")
        self.config.write_text(text)
        (tmp / "log").mkdir()
        (tmp / "sim").mkdir()
        args = _exec_start_args()
        args[args.index("--config") + 1] = str(self.config)
        args[args.index("--socket") + 1] = str(self.run_dir / "kupd.sock")
        kupd = Path(sys.executable).parent / "kupd"
        umask = int(_service()["UMask"], 8)
        self.out = tmp / "kupd.out"
        with self.out.open("w") as out:
            self.proc = subprocess.Popen(
                ["setpriv", "--bounding-set", caps, "--no-new-privs", "--",
                 str(kupd), *args, "--kupsim-dir", str(tmp / "sim")],
                stdout=out, stderr=subprocess.STDOUT, umask=umask,
            )

    def wait_ready(self) -> None:
        deadline = time.monotonic() + 60
        while "kupd ready" not in self.out.read_text():
            assert self.proc.poll() is None, self.out.read_text()
            assert time.monotonic() < deadline, self.out.read_text()
            time.sleep(0.1)

    def kupctl_reload(self) -> subprocess.CompletedProcess[str]:
        kupctl = Path(sys.executable).parent / "kupctl"
        return subprocess.run(
            [str(kupctl), "reload", "--admin-socket", str(self.run_dir / "admin.sock")],
            capture_output=True, text=True, timeout=60,
        )

    def linux_md_health(self) -> subprocess.CompletedProcess[str]:
        """docs/linux.md's ``kupctl ... health`` after the install, run
        against this kupd (its /run/kupd/ being run_dir)."""
        lines = [
            ln.split("#", 1)[0].split()
            for ln in (REPO / "docs/linux.md").read_text().splitlines()
            if ln.startswith("kupctl ") and " health" in ln
        ]
        assert len(lines) == 1, lines
        args = [a.replace("/run/kupd/", f"{self.run_dir}/") for a in lines[0][1:]]
        kupctl = Path(sys.executable).parent / "kupctl"
        return subprocess.run(
            [str(kupctl), *args], capture_output=True, text=True, timeout=60
        )

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait(timeout=30)


@needs_root
def test_sample_starts_and_reloads_with_the_units_capabilities(tmp_path: Path) -> None:
    k = _Kupd(tmp_path, _setpriv_caps())
    try:
        k.wait_ready()
        cfg = _sample_config()
        for t in cfg.tenants:
            path = Path(str(t.socket).replace("/run/kupd/", f"{k.run_dir}/"))
            st = path.stat()
            assert stat.S_ISSOCK(st.st_mode)
            if t.owner is not None:
                assert st.st_uid == t.owner
            if t.group is not None:
                assert st.st_gid == t.group
            # the directory kupd made for it, under the unit's umask
            assert stat.S_IMODE(path.parent.stat().st_mode) == 0o755
        # linux.md's health check after the install names a socket this
        # config serves (the plain socket is not served with tenants):
        # kupd answers -- NOT_SERVING (18) here, with no device host --
        # rather than kupctl finding nothing there (17, Unavailable)
        res = k.linux_md_health()
        assert res.returncode in (0, 18), res.stdout + res.stderr
        # a reload that changes a tenant-owned socket's mode: chmod (CAP_FOWNER)
        text = k.config.read_text()
        assert text.count('mode = "0600"') == 1
        k.config.write_text(text.replace('mode = "0600"', 'mode = "0640"'))
        res = k.kupctl_reload()
        assert res.returncode == 0, res.stdout + res.stderr
        alice = next(k.run_dir.rglob("alice.sock"))
        assert stat.S_IMODE(alice.stat().st_mode) == 0o640
        # a refused file: the exit status ExecReload hands to systemctl
        text = k.config.read_text()
        assert text.count("\ncall_timeout = ") == 1
        k.config.write_text(text.replace("\ncall_timeout = ", "\ncall_timeout = -1\n#"))
        res = k.kupctl_reload()
        assert res.returncode == 8, res.stdout + res.stderr
        assert "call_timeout" in res.stderr
    finally:
        rc = k.stop()
    assert rc == 0, k.out.read_text()


@needs_root
def test_sample_does_not_start_without_cap_chown(tmp_path: Path) -> None:
    """Why the unit grants it: with no capabilities (the unit before),
    chown of alice's socket fails and kupd exits 1."""
    k = _Kupd(tmp_path, "-all")
    try:
        rc = k.proc.wait(timeout=60)
    finally:
        k.stop()
    assert rc == 1
    assert "Operation not permitted" in k.out.read_text()

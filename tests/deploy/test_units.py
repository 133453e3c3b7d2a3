"""The deploy files that are not the rc.d script: shellcheck over every
shell script of this area, the systemd unit (systemd-analyze verify, plus
the sandboxing keys kupd relies on), modules-load.d, devfs.rules,
newsyslog, and the FreeBSD config sample (loaded with kupd's own parser).
"""

from __future__ import annotations

import configparser
import re
import shutil
import subprocess
from pathlib import Path

import pytest

__all__: list[str] = []

REPO = Path(__file__).resolve().parents[2]
UNIT = REPO / "deploy/linux/kupd.service"

# (path, shell dialect): rc.d scripts are /bin/sh on FreeBSD
SHELL_SCRIPTS = (
    ("deploy/freebsd/rc.d/kupd", "sh"),
    ("tests/deploy/rc.subr", "sh"),
    ("scripts/freebsd-check.sh", "bash"),
)


@pytest.mark.parametrize(("path", "dialect"), SHELL_SCRIPTS)
def test_shellcheck(path: str, dialect: str) -> None:
    tool = shutil.which("shellcheck")
    assert tool is not None, "shellcheck is required (scripts/setup-apt.sh installs it)"
    res = subprocess.run(
        [tool, "-s", dialect, "-S", "style", str(REPO / path)],
        capture_output=True, text=True, timeout=120,
    )
    assert res.returncode == 0, res.stdout + res.stderr


def _unit() -> configparser.RawConfigParser:
    parser = configparser.RawConfigParser(strict=False, interpolation=None)
    parser.optionxform = str  # type: ignore[assignment,method-assign]
    parser.read_string(UNIT.read_text())
    return parser


def test_unit_has_the_keys_kupd_relies_on() -> None:
    """Checked with a parser whether or not systemd is installed."""
    unit = _unit()
    assert unit.sections() == ["Unit", "Service", "Install"]
    svc = unit["Service"]
    exec_start = svc["ExecStart"].split()
    assert exec_start[0] == "/usr/local/bin/kupd"
    assert "--config" in exec_start and "/etc/kupd/kupd.toml" in exec_start
    # the socket lives in the RuntimeDirectory systemd creates
    assert svc["RuntimeDirectory"] == "kupd"
    assert exec_start[exec_start.index("--socket") + 1].startswith("/run/kupd/")
    # a synchronous reload over the admin socket, SIGHUP without it
    # (tests/deploy/test_unit_sandbox.py runs the command)
    assert "/usr/local/bin/kupctl reload --admin-socket /run/kupd/admin.sock" in svc["ExecReload"]
    assert svc["Restart"] == "on-failure"
    assert svc["RestartPreventExitStatus"].split() == ["2"]
    # rc.d/kupd's kupd_restart_delay defaults to the same (test_rcd.py)
    assert svc["RestartSec"] == "2"
    assert svc["KillSignal"] == "SIGTERM"
    # sandboxing that still lets kupd open /dev/kup/*: kup.ko's own major
    # ("kup" in /proc/devices), and no other character device
    assert svc["DevicePolicy"] == "closed"
    assert svc["DeviceAllow"] == "char-kup rw"
    # the parser keeps only the last of repeated keys: one allow line only
    assert re.findall(r"^\s*DeviceAllow\s*=\s*(.*)$", UNIT.read_text(), re.M) == ["char-kup rw"]
    assert svc["PrivateDevices"] == "no"
    assert svc["ProtectSystem"] == "strict"
    assert svc["ProtectKernelModules"] == "yes"
    assert svc["NoNewPrivileges"] == "yes"
    # exactly what the tenants' sockets need (test_unit_sandbox.py says why)
    assert sorted(svc["CapabilityBoundingSet"].split()) == ["CAP_CHOWN", "CAP_FOWNER"]
    assert svc["AmbientCapabilities"] == ""
    assert svc["LogsDirectory"] == "kupd"
    assert "AF_UNIX" in svc["RestrictAddressFamilies"].split()
    assert unit["Unit"]["After"].split()[0] == "systemd-modules-load.service"
    assert unit["Install"]["WantedBy"] == "multi-user.target"


def test_device_allow_names_the_major_kup_ko_registers() -> None:
    """char-kup is resolved from /proc/devices: the name must be the one
    kup.ko's alloc_chrdev_region registers (tests/vm checks the running
    module: /proc/devices lists it and /dev/kup/echo is of that major)."""
    src = (REPO / "kmod/linux/kup_linux.c").read_text()
    names = re.findall(r"alloc_chrdev_region\([^;]*?\"([^\"]+)\"\)", src)
    assert names == ["kup"]
    allow = _unit()["Service"]["DeviceAllow"].split()
    assert allow == [f"char-{names[0]}", "rw"]
    assert "misc_register" not in src


def test_systemd_analyze_verify(tmp_path: Path) -> None:
    tool = shutil.which("systemd-analyze")
    if tool is None:
        pytest.skip("systemd-analyze not installed; "
                    "test_unit_has_the_keys_kupd_relies_on checked the unit")
    # verify insists that ExecStart's program exists: point it at a stub
    stub = tmp_path / "kupd"
    stub.write_text("#!/bin/sh\nexit 0\n")
    stub.chmod(0o755)
    unit = tmp_path / "kupd.service"
    unit.write_text(UNIT.read_text().replace("/usr/local/bin/kupd", str(stub)))
    # with the man page check: a Documentation=man:... must name one that exists
    res = subprocess.run(
        [tool, "verify", str(unit)], capture_output=True, text=True,
        timeout=120, cwd=tmp_path,
    )
    # unknown keys are only warnings: any output at all is a failure
    assert res.returncode == 0 and not (res.stdout + res.stderr).strip(), (
        res.stdout + res.stderr
    )


def test_modules_load_d_loads_the_core_module() -> None:
    lines = (REPO / "deploy/linux/modules-load.d/kup.conf").read_text().splitlines()
    modules = [ln.strip() for ln in lines if ln.strip() and not ln.lstrip().startswith("#")]
    assert modules == ["kup"]
    # the module kmod/linux builds under that name
    assert "obj-m := kup.o" in (REPO / "kmod/linux/Kbuild").read_text()


def test_devfs_rules_keep_kup_nodes_root_only() -> None:
    text = (REPO / "deploy/freebsd/devfs.rules").read_text()
    rulesets = re.findall(r"^\[(\w+)=(\d+)\]$", text, re.M)
    assert [name for name, _ in rulesets] == ["kup_root_only", "devfsrules_jail_kupd"]
    assert len({num for _, num in rulesets}) == len(rulesets)
    perms = re.findall(r"^add path '([^']+)' mode (\d+) user (\w+) group (\w+)$", text, re.M)
    nodes = [p for p in perms if p[0] == "kup/*"]
    assert len(nodes) == 2 and all(p[1:] == ("0600", "root", "wheel") for p in nodes)
    # every rule line is one devfs(8) understands
    for line in text.splitlines():
        if line and not line.startswith("#") and not line.startswith("["):
            assert re.match(r"^add (include \$\w+|path '[^']+' (unhide|mode \d+ .*))$", line), line


def test_newsyslog_entry() -> None:
    lines = [
        ln for ln in (REPO / "deploy/freebsd/newsyslog.conf.d/kupd.conf").read_text().splitlines()
        if ln and not ln.startswith("#")
    ]
    assert len(lines) == 2
    fields = lines[0].split()
    # logfilename owner:group mode count size when flags pid_file sig
    assert fields[0] == "/var/log/kupd.log"
    assert fields[1] == "root:wheel" and fields[2] == "640"
    assert fields[7] == "/var/run/kupd.daemon.pid"   # daemon(8) reopens on HUP
    assert fields[8] == "1"
    # the audit log: kupd's own pid file, SIGUSR1 (30 on FreeBSD), no create
    audit = lines[1].split()
    assert audit[0] == "/var/log/kupd/audit.log" and audit[2] == "600", audit
    assert "C" not in audit[6] and audit[7:] == ["/var/run/kupd.pid", "30"], audit
    rc = (REPO / "deploy/freebsd/rc.d/kupd").read_text()
    assert ': "${kupd_logfile:=/var/log/kupd.log}"' in rc
    assert ': "${kupd_supervisor_pidfile:=/var/run/${name}.daemon.pid}"' in rc


def test_logrotate_entry_signals_kupd_to_reopen(tmp_path: Path) -> None:
    """deploy/linux/logrotate.d/kupd rotates the sample's audit_log and
    sends the unit's main process SIGUSR1 (kupd re-opens the file), not
    SIGHUP (a reload of whatever the config file holds); kupd creates
    the new file itself."""
    text = (REPO / "deploy/linux/logrotate.d/kupd").read_text()
    body = [ln.strip() for ln in text.splitlines() if ln.strip() and not ln.startswith("#")]
    from kupd.config import load_config

    cfg = load_config(REPO / "deploy/kupd.sample.toml")
    assert body[0] == f"{cfg.audit_log} {{", body
    assert "nocreate" in body and "create" not in body
    post = body[body.index("postrotate") + 1]
    assert "--signal=SIGUSR1" in post and "kupd.service" in post, post
    unit = (REPO / "deploy/linux/kupd.service").read_text()
    assert "LogsDirectory=kupd" in unit and cfg.audit_log.startswith("/var/log/kupd/")
    logrotate = shutil.which("logrotate")
    if logrotate is None:
        pytest.skip("logrotate is not installed (scripts/setup-apt.sh installs it)")
    conf = REPO / "deploy/linux/logrotate.d/kupd"
    state = tmp_path / "logrotate.state"
    p = subprocess.run(
        [logrotate, "--debug", "--state", str(state), str(conf)],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    assert p.returncode == 0 and "error" not in p.stderr.lower(), p.stderr


def test_freebsd_config_sample_is_valid_for_kupd() -> None:
    from kupd.config import load_config

    cfg = load_config(REPO / "deploy/freebsd/kupd.toml.sample")
    assert cfg.socket == "/var/run/kupd/kupd.sock"
    assert cfg.pid_path == ""            # rc.d/kupd's daemon(8) owns the pid file
    assert [d.name for d in cfg.devices] == ["echo"]
    # where rc.d/kupd's reload looks by default (kupd_rundir/admin.sock)
    assert cfg.admin_socket == "/var/run/kupd/admin.sock"
    rcd = (REPO / "deploy/freebsd/rc.d/kupd").read_text()
    assert ': "${kupd_rundir:=/var/run/kupd}"' in rcd
    assert ': "${kupd_admin_socket:=${kupd_rundir}/admin.sock}"' in rcd


def test_the_docs_the_unit_names_exist() -> None:
    """The unit's comments send the reader to "FILE.md (Section)": every such
    file ships and has that section (README.md had no Deploy section)."""
    refs = re.findall(r"([\w/.-]+\.md) \(([^)]+)\)", UNIT.read_text())
    assert ("README.md", "Deploy") in refs
    for name, section in refs:
        doc = REPO / name
        assert doc.is_file(), name
        headings = re.findall(r"^#+ (.*)$", doc.read_text(), re.M)
        assert any(h.startswith(section) for h in headings), f"{name} has no section {section!r}"


def test_linux_install_puts_the_programs_where_the_unit_runs_them() -> None:
    """docs/linux.md installs kupd and kupctl at the paths of ExecStart and
    ExecReload."""
    svc = _unit()["Service"]
    doc = (REPO / "docs/linux.md").read_text()
    progs = {svc["ExecStart"].split()[0]}
    progs |= set(re.findall(r"/usr/local/bin/kup\w+", svc["ExecReload"]))
    assert progs == {"/usr/local/bin/kupd", "/usr/local/bin/kupctl"}
    (line,) = [ln for ln in doc.splitlines() if ln.startswith("ln -sf ") and "/usr/local/bin" in ln]
    for prog in progs:
        assert f"/bin/{Path(prog).name} " in line + " ", line
    assert "pip install ." in doc


def test_secure_bits_are_not_a_lock_on_nothing() -> None:
    """noroot-locked only locks the noroot bit: alone it does nothing (and
    noroot would take CAP_CHOWN / CAP_FOWNER from root-run kupd)."""
    bits = _unit()["Service"].get("SecureBits", "").split()
    assert "noroot" not in bits
    assert "noroot-locked" not in bits


def test_stop_timeout_outlasts_the_longest_drain() -> None:
    """Server._drain_and_stop: drain_grace for Calls (+1 s), drain_grace for
    streams, 1 s for the sockets; the unit must wait longer before SIGKILL
    (with a margin for closing the devices) at the sample's drain_grace."""
    from kupd.config import load_config

    grace = load_config(REPO / "deploy/kupd.sample.toml").drain_grace
    stop = float(_unit()["Service"]["TimeoutStopSec"].removesuffix("s"))
    assert stop >= 2 * grace + 6, (stop, grace)
    src = (REPO / "kupd/server.py").read_text()
    drain = src[src.index("async def _drain_and_stop"):src.index("async def _cleanup")]
    # the bound the unit's comment states: two drain_grace waits, two of 1 s
    assert drain.count("asyncio.timeout(cfg.drain_grace)") == 2
    assert drain.count("asyncio.timeout(1.0)") == 1 and "sockets.stop(grace=1.0)" in drain
    assert "2 x drain_grace + 2 s" in UNIT.read_text()


def test_the_config_error_the_docs_show_is_the_samples_own(tmp_path: Path) -> None:
    """README, gateway.md and the sample show the error of the sample
    installed as /etc/kupd/kupd.toml with call_channels = -1: file, line,
    key and words as kupd prints them."""
    from kupd.config import ConfigError, load_config

    shown = "/etc/kupd/kupd.toml:130: config key 'device[0].call_channels': must be 0..1024, not -1"
    for doc in ("README.md", "docs/gateway.md", "deploy/kupd.sample.toml"):
        text = re.sub(r"\s*\n[#\s]*", " ", (REPO / doc).read_text())
        assert shown in text, doc  # as written, line breaks aside
    sample = (REPO / "deploy/kupd.sample.toml").read_text()
    assert sample.count("\ncall_channels = 4\n") == 1
    cfg = tmp_path / "kupd.toml"
    cfg.write_text(sample.replace("\ncall_channels = 4\n", "\ncall_channels = -1\n"))
    with pytest.raises(ConfigError) as ei:
        load_config(cfg)
    assert str(ei.value) == shown.replace("/etc/kupd/kupd.toml", str(cfg))

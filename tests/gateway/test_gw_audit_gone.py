"""The audit log's directory removed under kupd: lines written meanwhile
are counted as lost -- not written into a file nobody can read -- and the
file says how many once a re-open succeeds; a reload that leaves
audit_log as it is goes through meanwhile (and says the file was not
re-opened); one that names a new path it cannot open is refused as ever.
A real kupd and kupsim."""

from __future__ import annotations

import json
import os
import shutil
import signal
from pathlib import Path
from typing import Any

import pytest

from kupclient.admin import AdminClient
from kupd import errors
from kupd.testing import Kupd, KupSim, start_kupd, wait_until


def _config(tmp: Path, sim: KupSim, audit: Path, idle: float) -> Path:
    cfg = tmp / "kupd.toml"
    new = cfg.with_suffix(".tmp")
    new.write_text(
        f'socket = "{tmp}/kupd.sock"\n'
        f'admin_socket = "{tmp}/admin.sock"\n'
        f'audit_log = "{audit}"\n'
        f'kupsim_dir = "{sim.rundir}"\n'
        "health_interval = 0.2\n"
        f"lease_idle_timeout = {idle}\n"
        '[[device]]\nname = "echo"\ncall_channels = 2\n'
    )
    os.replace(new, cfg)
    return cfg


def _lines(path: Path) -> list[dict[str, Any]]:
    return [json.loads(x) for x in path.read_text().splitlines() if x.strip()]


def _events(k: Kupd, event: str) -> list[dict[str, Any]]:
    out = []
    for line in k.log().splitlines():
        if line.startswith("{") and event in line:
            rec = json.loads(line)
            if rec.get("event") == event:
                out.append(rec)
    return out


def test_audit_dir_removed_lines_are_counted_lost_and_reload_goes_on(
    sim: KupSim, tmp_path: Path
) -> None:
    audit_dir = tmp_path / "audit"
    audit_dir.mkdir()
    audit = audit_dir / "audit.log"
    cfg = _config(tmp_path, sim, audit, 60)
    k = start_kupd(
        config=cfg, log=tmp_path / "kupd.log", health_socket=tmp_path / "admin.sock",
        health_interval=None, env=None, sim=None,
    )  # fmt: skip
    try:
        with AdminClient(tmp_path / "admin.sock") as adm:
            adm.drain("echo")
            adm.drain("echo", undo=True)
            assert [x["action"] for x in _lines(audit)] == ["drain", "undrain"]
            shutil.rmtree(audit_dir)
            # logrotate's re-open, with nowhere to open: said, not fatal
            k.proc.send_signal(signal.SIGUSR1)
            wait_until(
                lambda: bool(_events(k, "audit log not re-opened, and its old file was removed: "
                                     "lines are counted as lost until a re-open succeeds "
                                     "(then the file says how many)")),
                what="the failed re-open logged",
            )  # fmt: skip
            adm.drain("echo")  # lost 1
            adm.drain("echo", undo=True)  # lost 2
            # a reload that changes something else is applied all the same
            _config(tmp_path, sim, audit, 30)
            done = adm.reload()  # its own line: lost 3
            assert done.applied == ("lease_idle_timeout",), done
            assert _events(k, "reload: audit log not re-opened; the reload goes on with the "
                           "file kupd had (removed: its lines are counted as lost until a "
                           "re-open)"), k.log()[-3000:]  # fmt: skip
            # one that names an audit_log it cannot open is refused, as before
            _config(tmp_path, sim, tmp_path / "nodir" / "audit.log", 30)
            with pytest.raises(errors.KupError, match="audit_log"):
                adm.reload()  # its line: lost 4
            _config(tmp_path, sim, audit, 30)
            assert not audit_dir.exists()  # nothing was written anywhere
            audit_dir.mkdir()
            k.proc.send_signal(signal.SIGUSR1)
            wait_until(lambda: bool(_events(k, "audit log re-opened")), what="the re-open")
            adm.drain("echo")
        lines = _lines(audit)
        assert [x["event"] for x in lines] == ["lost", "admin"], lines
        assert lines[0]["lost"] == 4 and lines[1]["action"] == "drain", lines
        (said,) = _events(k, "audit log re-opened after lines were lost: the next line written "
                          "says how many")  # fmt: skip
        assert said["lost"] == 4, said
        assert k.terminate() == 0
    finally:
        k.kill()

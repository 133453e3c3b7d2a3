"""kupd.testing: the kupsim harness other test areas build on."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import pytest

from kupd.channel import Device
from kupd.testing import KupSim, KupSimError, kupsim


def test_runs_reports_devices_and_cleans_up() -> None:
    with kupsim("echo") as sim:
        assert sim.running()
        assert sim.devices == ("echo",)
        assert Path(sim.device_path("echo")).exists()
        rundir, proc = sim.rundir, sim.proc
    assert proc.returncode == 0  # stopped with SIGTERM, exited cleanly
    assert not rundir.exists()


def test_given_rundir_is_kept(tmp_path: Path) -> None:
    run = tmp_path / "run"
    with kupsim("echo", rundir=run) as sim:
        assert sim.rundir == run
        assert Path(sim.device_path("echo")).parent == run
    assert run.is_dir()


def test_env_reaches_modules() -> None:
    env = dict(os.environ, KUP_PARAM_ECHO_CHANNELS="4")
    with kupsim("echo", env=env) as sim, Device.open(sim.device_path("echo")) as dev:
        assert dev.info().chan_count == 4
    assert "4 channels" in sim.stderr()


def test_missing_module_is_named() -> None:
    with pytest.raises(KupSimError, match="no_such_module"), kupsim("no_such_module"):
        pass


def test_a_module_file_name_is_found_here_or_in_kmod_out(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The README's ``kupsim("echo.so")`` from any directory: a file of that
    name in the current directory, else kmod/out's; both named if neither."""
    monkeypatch.chdir(tmp_path)
    with kupsim("echo.so") as sim:
        assert "echo" in sim.devices
    with pytest.raises(KupSimError, match=r"'nope\.so' not found at nope\.so or .*/nope\.so"):
        with kupsim("nope.so"):
            pass


def test_broken_module_shows_kupsim_output(tmp_path: Path) -> None:
    bogus = tmp_path / "bogus.so"
    bogus.write_text("not an ELF file\n")
    with pytest.raises(KupSimError, match="before it was ready") as info, kupsim(bogus):
        pass
    assert "bogus.so" in info.value.output  # kupsim's own complaint is shown


def test_body_exception_propagates_and_kupsim_is_stopped() -> None:
    seen: list[KupSim] = []
    with pytest.raises(ZeroDivisionError), kupsim("echo") as sim:
        seen.append(sim)
        _ = 1 / 0
    assert not seen[0].running()


def test_unexpected_exit_is_reported() -> None:
    with pytest.raises(KupSimError, match="status"), kupsim("echo") as sim:
        sim.signal(signal.SIGKILL)
        sim.proc.wait(timeout=10)


def test_killed_on_purpose_with_check_exit_off() -> None:
    with kupsim("echo", check_exit=False) as sim:
        sim.signal(signal.SIGKILL)
        assert sim.proc.wait(timeout=10) == -signal.SIGKILL

"""Host-only checks of the VM runner's result parsing, kernel discovery and
settings (no VM is booted)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

import pytest

__all__: list[str] = []

REPO = Path(__file__).resolve().parents[2]


def _load(name: str, path: Path) -> ModuleType:
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod
    spec.loader.exec_module(mod)
    return mod


vmrun = _load("vmrun", REPO / "scripts" / "vm" / "vmrun.py")
test_vm = _load("tests_vm_test_vm", REPO / "tests" / "vm" / "test_vm.py")


def test_kernel_problems_finds_warnings_oopses_and_sanitizers() -> None:
    log = "\n".join(
        [
            "[    1.0] kup: loaded (ABI 1)",
            "[    2.0] kup: echo chan 3: protocol error from user: bad message kind (77, 3)",
            "[    3.0] WARNING: CPU: 1 PID: 99 at mm/vmalloc.c:123 foo+0x1/0x2",
            "[    3.1] Call Trace:",
            "[    4.0] BUG: KASAN: use-after-free in kup_fop_poll+0x10/0x20",
            "[    5.0] INFO: task kworker/0:1:42 blocked for more than 120 seconds.",
            "[    6.0] refcount_t: underflow; use-after-free.",
        ]
    )
    found = vmrun.kernel_problems(log)
    assert len(found) == 5
    assert not any("protocol error" in f or "loaded" in f for f in found)


def test_clean_kernel_log_has_no_problems() -> None:
    log = "[ 0.5] kup: loaded (ABI 1)\n[ 0.6] kup_echo: module verification failed\n"
    assert vmrun.kernel_problems(log) == []


def test_stage_parsing_reports_unfinished_stages() -> None:
    log = (
        "=== STAGE load\nok\nstage load took 1.0s\n=== RESULT load 0\n"
        "=== STAGE kfault_basic\nFAIL: basic: x\n=== RESULT kfault_basic 1\n"
        "=== STAGE unload\nhalf way\n"
    )
    st = test_vm._parse_stages(log)
    assert st["load"].rc == 0 and "ok" in st["load"].output
    assert st["kfault_basic"].rc == 1 and "FAIL: basic" in st["kfault_basic"].output
    assert st["unload"].rc is None and "half way" in st["unload"].output


def _kernel(root: Path, kver: str, *, image: bool = True, build: bool = True) -> None:
    (root / "boot").mkdir(exist_ok=True)
    if image:
        (root / "boot" / f"vmlinuz-{kver}").write_bytes(b"")
    mods = root / "lib" / "modules" / kver
    (mods / "kernel").mkdir(parents=True)
    if build:
        (mods / "build").mkdir()


def test_installed_kernels_picks_the_newest_usable_release_per_series(tmp_path: Path) -> None:
    _kernel(tmp_path, "6.1.0-56-amd64")
    _kernel(tmp_path, "6.1.0-9-amd64")  # older: 9 < 56 numerically, not as text
    _kernel(tmp_path, "6.12.117+deb12-amd64")
    _kernel(tmp_path, "6.12.200+deb12-amd64", build=False)  # no headers: unusable
    _kernel(tmp_path, "6.13.1-amd64", image=False)  # no image: unusable
    assert test_vm.installed_kernels(tmp_path) == {
        "6.1": "6.1.0-56-amd64",
        "6.12": "6.12.117+deb12-amd64",
    }


def test_installed_kernels_of_an_empty_root_is_empty(tmp_path: Path) -> None:
    assert test_vm.installed_kernels(tmp_path) == {}


def test_a_missing_kernel_skips_by_hand_and_fails_under_make_test() -> None:
    kernels = {"6.1": "6.1.0-56-amd64"}
    verdict, why = test_vm.missing_kernel("6.12", kernels, {})
    assert verdict == "skip"
    assert "no Linux 6.12 kernel installed" in why and "6.1.0-56-amd64" in why
    assert "setup-apt.sh" in why
    verdict, why = test_vm.missing_kernel("6.12", kernels, {"KUPD_REQUIRE_VM": "1"})
    assert verdict == "fail" and "KUPD_REQUIRE_VM=1" in why
    assert test_vm.missing_kernel("6.12", {}, {"KUPD_REQUIRE_VM": "0"})[0] == "skip"


def test_vm_jobs_defaults_to_both_kernels_and_names_a_bad_value() -> None:
    assert test_vm.vm_jobs({}) == 2
    assert test_vm.vm_jobs({"KUPD_VM_JOBS": "1"}) == 1
    for bad in ("0", "two", "-1", ""):
        with pytest.raises(ValueError, match="KUPD_VM_JOBS"):
            test_vm.vm_jobs({"KUPD_VM_JOBS": bad})

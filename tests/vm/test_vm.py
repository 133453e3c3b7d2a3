"""End-to-end tests of the Linux kernel module in a qemu VM (TCG).

One VM boot per pytest session runs every in-guest stage of
tests/vm/guest_tests.sh (module load, the device nodes on kup.ko's own
character major, kernel-side fault tests, libkup C scenarios, Python
channel scenarios, kupd with a client, unload while attached, kernel-log
check); each stage is one test here, failing with the
stage's own output, and the whole guest kernel log is checked for
warnings, oopses and sanitizer reports.

Needs (installed by scripts/setup-apt.sh, i.e. ``make setup``):
qemu-system-x86, linux-image-amd64, linux-headers-amd64, busybox-static,
cpio and gcc.  The modules are built against the Debian kernel's headers
(kmod/linux/Makefile picks the newest kernel with both an image in /boot and
headers), which need not be the running kernel.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

REPO = Path(__file__).resolve().parents[2]
OUT = REPO / "kmod" / "out" / "vm"
BIN = OUT / "bin"
STAGES = [
    "load",
    "devnode",
    "kfault_basic",
    "kfault_mmap",
    "kfault_sigkill",
    "kfault_hostile",
    "libkup_c",
    "python_channel",
    "kupd",
    "unload",
    "dmesg",
]
VM_TIMEOUT = 900.0  # host-side bound on the whole guest run (generous: shared, loaded hosts)

pytestmark = [
    pytest.mark.skipif(
        sys.platform != "linux" or platform.machine() != "x86_64",
        reason="the VM tests boot Debian's x86_64 Linux kernel",
    ),
    pytest.mark.timeout(VM_TIMEOUT + 300),
]


def _load_vmrun() -> ModuleType:
    spec = importlib.util.spec_from_file_location("vmrun", REPO / "scripts" / "vm" / "vmrun.py")
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    sys.modules["vmrun"] = mod
    spec.loader.exec_module(mod)
    return mod


vmrun = _load_vmrun()


def _run(cmd: list[str], what: str) -> None:
    p = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
    if p.returncode != 0:
        raise AssertionError(f"{what} failed ({' '.join(cmd)}):\n{p.stdout}\n{p.stderr}")


def _build(kver: str) -> Path:
    """Modules against the Debian headers, and the in-guest test programs."""
    _run(["make", "-s", "-C", "kmod/linux", f"KVER={kver}"], "building kup.ko/kup_echo.ko")
    moddir = REPO / "kmod" / "out" / "linux" / kver
    for ko in ("kup.ko", "kup_echo.ko"):
        assert (moddir / ko).is_file(), f"{ko} was not built in {moddir}"
    BIN.mkdir(parents=True, exist_ok=True)
    cc = shutil.which(os.environ.get("CC", "gcc")) or "gcc"
    flags = ["-std=gnu11", "-O1", "-g", "-Wall", "-Wextra", "-Werror",
             "-fsanitize=address,undefined", "-fno-omit-frame-pointer",
             "-Ikmod/include"]  # fmt: skip
    _run([cc, *flags, "tests/vm/kup_kfault.c", "-o", str(BIN / "kup_kfault")],
         "building tests/vm/kup_kfault.c")  # fmt: skip
    # libkup as kmod/Makefile builds it on Linux: every source (backend_kdev.c
    # is the Linux backend under -DKUP_HAVE_BACKEND_LINUX)
    libkup = sorted(str(p.relative_to(REPO)) for p in (REPO / "kmod" / "libkup").glob("*.c"))
    _run(
        [cc, *flags, "-pthread", "-Ikmod/core", "-Ikmod/kupsim", "-Ikmod/libkup", "-Itests/c",
         "-DKUP_HAVE_BACKEND_LINUX", "tests/c/test_kup.c", *libkup, "-o", str(BIN / "test_kup")],
        "building tests/c/test_kup.c with libkup's linux backend",
    )  # fmt: skip
    return moddir


@dataclass
class Stage:
    name: str
    rc: int | None
    output: str


@dataclass
class GuestRun:
    result: Any  # vmrun.VMResult
    stages: dict[str, Stage]
    build_seconds: float


def _parse_stages(log: str) -> dict[str, Stage]:
    stages: dict[str, Stage] = {}
    pat = re.compile(r"^=== STAGE (\S+)\n(.*?)^=== RESULT \1 (-?\d+)$", re.M | re.S)
    for m in pat.finditer(log):
        stages[m.group(1)] = Stage(m.group(1), int(m.group(3)), m.group(2))
    # a stage that started but never reported (guest died or timed out)
    for m in re.finditer(r"^=== STAGE (\S+)\n", log, re.M):
        if m.group(1) not in stages:
            stages[m.group(1)] = Stage(m.group(1), None, log[m.end() :])
    return stages


@pytest.fixture(scope="module")
def guest() -> GuestRun:
    t0 = time.monotonic()
    kver = vmrun.debian_kver()
    moddir = _build(kver)
    build_s = time.monotonic() - t0
    job = (
        f"export REPO={REPO} KMODDIR={moddir} BINDIR={BIN}\n"
        f"export STAGES='{' '.join(STAGES)}'\n"
        f"exec sh {REPO}/tests/vm/guest_tests.sh\n"
    )
    # a private output directory: two test sessions may run at once
    outdir = Path(tempfile.mkdtemp(prefix="run-", dir=OUT))
    res = vmrun.run_job(job, timeout=VM_TIMEOUT, kver=kver, keep_dir=outdir)
    print(
        f"\nvm: kernel {kver}, build {build_s:.1f}s, boot {res.boot_seconds}s (guest uptime), "
        f"guest run {res.wall_seconds:.1f}s wall, rc={res.rc}, timed_out={res.timed_out}, "
        f"files in {outdir}"
    )
    last = OUT / "last-run"
    with contextlib.suppress(OSError):
        if last.is_symlink() or last.exists():
            if last.is_dir() and not last.is_symlink():
                shutil.rmtree(last)
            else:
                last.unlink()
        last.symlink_to(outdir.name)
    # keep the files of failed runs only (and the newest run's)
    for old in OUT.glob("run-*"):
        if old != outdir and (old / "rc").exists() and _read_rc(old) == 0:
            shutil.rmtree(old, ignore_errors=True)
    return GuestRun(res, _parse_stages(res.log), build_s)


def _read_rc(d: Path) -> int | None:
    try:
        return int((d / "rc").read_text().strip())
    except (OSError, ValueError):
        return None


@pytest.mark.parametrize("name", STAGES)
def test_stage(guest: GuestRun, name: str) -> None:
    res = guest.result
    st = guest.stages.get(name)
    if st is None:
        pytest.fail(f"stage {name} never ran in the guest\n{res.report()}")
    if st.rc != 0:
        pytest.fail(
            f"guest stage {name} failed (rc={st.rc}):\n{st.output}\n"
            f"--- full guest report ---\n{res.report()}"
        )
    assert "=== RESULT" not in st.output


def test_guest_finished_cleanly(guest: GuestRun) -> None:
    res = guest.result
    assert not res.timed_out, f"the VM did not finish in {VM_TIMEOUT}s\n{res.report()}"
    assert res.rc == 0, f"guest job exit status {res.rc}\n{res.report()}"


def test_kernel_log_has_no_warnings(guest: GuestRun) -> None:
    res = guest.result
    problems = res.problems()
    assert problems == [], (
        "kernel reported problems:\n" + "\n".join(problems) + ("\n" + res.report())
    )

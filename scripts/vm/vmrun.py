#!/usr/bin/env python3
"""Boot the Debian kernel in qemu (TCG) and run one shell job inside it.

The guest (scripts/vm/init in a busybox initramfs) sees the host's root
read-only at / (over virtio-9p, with writable tmpfs /tmp, /run, /var/tmp)
and this run's output directory read-write at /run/vmout.  The job is
``/run/vmout/job.sh``; its output, exit status and the guest's dmesg come
back as files in the output directory.

Usage as a program:  vmrun.py [--timeout S] [--kver V] JOB.sh  (exit status =
the job's, 124 on timeout; kernel warnings/oopses in dmesg make it fail).
"""

from __future__ import annotations

import argparse
import dataclasses
import glob
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

__all__ = ["VMError", "VMResult", "build_initramfs", "debian_kver", "kernel_problems", "run_job"]

REPO = Path(__file__).resolve().parents[2]
OUT = REPO / "kmod" / "out" / "vm"

# Lines in dmesg that fail a run: warnings, oopses, BUGs, sanitizer reports, lockdep.
_PROBLEM = re.compile(
    r"(WARNING:|BUG:|Oops|Call Trace|general protection fault|kernel BUG|"
    r"KASAN|UBSAN|KFENCE|KCSAN|possible circular locking|INFO: task .* blocked|"
    r"Kernel panic|RCU stall|soft lockup|hard LOCKUP|refcount_t:|list_(add|del) corruption|"
    r"kup: .*leak)"
)


class VMError(RuntimeError):
    """The VM could not be set up or did not finish."""


@dataclasses.dataclass
class VMResult:
    rc: int | None  # the job's exit status; None if the guest never reported one
    log: str  # the job's stdout+stderr
    dmesg: str  # the guest kernel log at the end
    console: str  # the serial console (kernel messages while booting, init's notes)
    boot_seconds: float | None  # guest uptime when the job started
    wall_seconds: float  # host time from qemu start to exit
    timed_out: bool

    def problems(self) -> list[str]:
        return kernel_problems(self.dmesg + "\n" + self.console)

    def report(self) -> str:
        return (
            f"--- job log (rc={self.rc}, timed_out={self.timed_out}) ---\n{self.log}\n"
            f"--- guest dmesg ---\n{self.dmesg}\n--- serial console ---\n{self.console[-8000:]}"
        )


def kernel_problems(text: str) -> list[str]:
    """Lines of a kernel log that mean the kernel is unhappy."""
    return [ln for ln in text.splitlines() if _PROBLEM.search(ln)]


def debian_kver() -> str:
    """The newest installed kernel that has both an image in /boot and headers."""
    found = []
    for img in glob.glob("/boot/vmlinuz-*"):
        ver = img.removeprefix("/boot/vmlinuz-")
        if os.path.isdir(f"/lib/modules/{ver}/build") and os.path.isdir(
            f"/lib/modules/{ver}/kernel"
        ):
            found.append(ver)
    if not found:
        raise VMError(
            "no kernel with headers found (need /boot/vmlinuz-V, /lib/modules/V/build and "
            "/lib/modules/V/kernel: apt-get install linux-image-amd64 linux-headers-amd64)"
        )
    return sorted(found)[-1]


def build_initramfs(kver: str) -> Path:
    """(Re)build the initramfs when the builder or init changed."""
    out = OUT / f"initramfs-{kver}.cpio.gz"
    srcs = [REPO / "scripts/vm/init", REPO / "scripts/vm/mkinitramfs.sh"]
    if not out.exists() or any(s.stat().st_mtime > out.stat().st_mtime for s in srcs):
        subprocess.run(
            ["bash", str(REPO / "scripts/vm/mkinitramfs.sh"), kver, str(out)],
            check=True,
            stdout=subprocess.DEVNULL,
        )
    return out


def _read(p: Path) -> str:
    try:
        return p.read_text(errors="replace")
    except FileNotFoundError:
        return ""


def run_job(
    job: str,
    *,
    timeout: float = 240.0,
    kver: str | None = None,
    mem_mib: int = 1536,
    smp: int = 2,
    keep_dir: Path | None = None,
    keep_paths: list[Path] | None = None,
) -> VMResult:
    """Run the shell script text ``job`` in a fresh VM and collect the results."""
    qemu = shutil.which("qemu-system-x86_64")
    if qemu is None:
        raise VMError("qemu-system-x86_64 not found (apt-get install qemu-system-x86)")
    kver = kver or debian_kver()
    initrd = build_initramfs(kver)
    OUT.mkdir(parents=True, exist_ok=True)
    if keep_dir is not None:
        shutil.rmtree(keep_dir, ignore_errors=True)
        keep_dir.mkdir(parents=True)
        outdir = keep_dir
    else:
        outdir = Path(tempfile.mkdtemp(prefix="run-", dir=OUT))
    (outdir / "job.sh").write_text(job)
    # host paths the guest must see even where its tmpfs mounts cover them
    # (a checkout under /tmp): the repository, plus the caller's
    keep = [REPO, *(keep_paths or ())]
    (outdir / "keep_paths").write_text("".join(f"{Path(p).resolve()}\n" for p in keep))
    console = outdir / "console.log"
    cmd = [
        qemu,
        "-accel", "tcg",
        "-cpu", "max",
        "-m", str(mem_mib),
        "-smp", str(smp),
        "-nodefaults", "-no-reboot", "-display", "none",
        "-monitor", "none",
        "-serial", f"file:{console}",
        "-kernel", f"/boot/vmlinuz-{kver}",
        "-initrd", str(initrd),
        # no soft-lockup watchdog / RCU stall reports: under TCG on a loaded
        # host a vCPU can starve for seconds, which is not a kernel bug
        "-append", "console=ttyS0 panic=-1 oops=panic loglevel=4 rdinit=/init "
                   "nowatchdog rcupdate.rcu_cpu_stall_suppress=1",
        "-fsdev", "local,id=hostroot,path=/,security_model=none,readonly=on,multidevs=remap",
        "-device", "virtio-9p-pci,fsdev=hostroot,mount_tag=hostroot",
        "-fsdev", f"local,id=vmout,path={outdir},security_model=none",
        "-device", "virtio-9p-pci,fsdev=vmout,mount_tag=vmout",
    ]  # fmt: skip
    t0 = time.monotonic()
    timed_out = False
    proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT)  # fmt: skip
    try:
        qemu_out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        timed_out = True
        proc.kill()
        qemu_out, _ = proc.communicate()
    wall = time.monotonic() - t0
    rc_text = _read(outdir / "rc").strip()
    boot = _read(outdir / "boot_seconds").strip()
    res = VMResult(
        rc=int(rc_text) if rc_text.lstrip("-").isdigit() else None,
        log=_read(outdir / "log"),
        dmesg=_read(outdir / "dmesg"),
        console=_read(console) + qemu_out.decode(errors="replace"),
        boot_seconds=float(boot) if boot else None,
        wall_seconds=wall,
        timed_out=timed_out,
    )
    if keep_dir is None:
        shutil.rmtree(outdir, ignore_errors=True)
    return res


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("job", help="shell script to run inside the guest")
    ap.add_argument("--timeout", type=float, default=240.0)
    ap.add_argument("--kver", default=None)
    ap.add_argument("--keep", type=Path, default=None, help="keep the output directory here")
    a = ap.parse_args()
    res = run_job(Path(a.job).read_text(), timeout=a.timeout, kver=a.kver, keep_dir=a.keep)
    sys.stdout.write(res.log)
    probs = res.problems()
    print(
        f"vmrun: rc={res.rc} boot={res.boot_seconds}s wall={res.wall_seconds:.1f}s "
        f"timed_out={res.timed_out} kernel_problems={len(probs)}",
        file=sys.stderr,
    )
    if res.rc is None or probs:
        sys.stderr.write(res.report())
    if res.timed_out:
        return 124
    if res.rc is None:
        return 125
    return res.rc if res.rc != 0 else (1 if probs else 0)


if __name__ == "__main__":
    sys.exit(main())

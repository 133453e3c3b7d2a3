#!/usr/bin/env python3
"""Boot a Debian kernel in qemu (TCG) and run one shell job inside it.

The kernel is an installed one (/boot/vmlinuz-V with /lib/modules/V, headers
in /lib/modules/V/build or /usr/src/linux-headers-V) or one unpacked, not
installed, into the kernel cache (KUPD_KERNEL_CACHE, default
.cache/kernels: V/boot/vmlinuz-V, V/lib/modules/V and the headers
V/usr/src/linux-headers-V, which scripts/setup-apt.sh puts there for
bookworm-backports' 6.12).

The guest (scripts/vm/init in a busybox initramfs) sees the host's root
read-only at / (over virtio-9p, with writable tmpfs /tmp, /run, /var/tmp)
and this run's output directory read-write at /run/vmout.  The job is
``/run/vmout/job.sh``; its output, exit status and the guest's dmesg come
back as files in the output directory.

Usage as a program:  vmrun.py [--timeout S] [--kver V] JOB.sh  (exit status =
the job's, 124 on timeout, 2 when no kernel or VM could be set up; kernel
warnings/oopses in dmesg make it fail).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Mapping
from pathlib import Path

__all__ = [
    "CACHE_ENV",
    "Kernel",
    "VMError",
    "VMResult",
    "build_initramfs",
    "debian_kver",
    "find_kernel",
    "find_kernels",
    "kernel_cache",
    "kernel_problems",
    "run_job",
    "start_qemu",
    "version_key",
]

REPO = Path(__file__).resolve().parents[2]
OUT = REPO / "kmod" / "out" / "vm"
CACHE_ENV = "KUPD_KERNEL_CACHE"  # where kernels are unpacked (scripts/setup-apt.sh)

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
    image: str = ""  # the vmlinuz qemu booted
    #: the serial consoles of earlier boots of this run that died before the
    #: guest's init started the job (see died_before_job); reported, not hidden
    failed_boots: tuple[str, ...] = ()

    def problems(self) -> list[str]:
        return kernel_problems(self.dmesg + "\n" + self.console)

    def report(self) -> str:
        earlier = "".join(
            f"--- boot {i + 1} died before the job started (retried) ---\n{c[-3000:]}\n"
            for i, c in enumerate(self.failed_boots)
        )
        return (
            f"{earlier}"
            f"--- job log (kernel {self.image}, rc={self.rc}, timed_out={self.timed_out}) ---\n"
            f"{self.log}\n"
            f"--- guest dmesg ---\n{self.dmesg}\n--- serial console ---\n{self.console[-8000:]}"
        )


def died_before_job(res: VMResult) -> bool:
    """The guest kernel panicked or oopsed before init started the job: no
    job output, no start time, a problem on the console.  Nothing of the
    project has run then (modules are loaded by the job), so it is the
    emulator's or the distribution kernel's failure -- seen under TCG with
    2 vCPUs: an "Oops: int3" in early boot while the kernel patches its
    own code (static keys), a known multi-threaded TCG race -- and worth one
    more boot rather than a failed test run."""
    return (
        res.rc is None
        and res.boot_seconds is None
        and not res.timed_out
        and not res.log.strip()
        and bool(kernel_problems(res.console))
    )


def kernel_problems(text: str) -> list[str]:
    """Lines of a kernel log that mean the kernel is unhappy."""
    return [ln for ln in text.splitlines() if _PROBLEM.search(ln)]


@dataclasses.dataclass(frozen=True)
class Kernel:
    """A kernel the VM can boot and the module can be built against."""

    kver: str  # its release, `uname -r` in the guest
    image: Path  # vmlinuz
    modules: Path  # its module tree (kernel/, modules.dep): the initramfs takes virtio/9p from here
    headers: Path  # its build tree, for out-of-tree modules
    cached: bool  # unpacked in the kernel cache (True) or installed in /boot (False)


def kernel_cache(env: Mapping[str, str] = os.environ) -> Path:
    """The kernel cache: $KUPD_KERNEL_CACHE (absolute), else .cache/kernels
    in the repository."""
    text = env.get(CACHE_ENV, "")
    if not text:
        return REPO / ".cache" / "kernels"
    path = Path(text)
    if not path.is_absolute():
        raise VMError(f"{CACHE_ENV}={text!r}: want an absolute path")
    return path


def version_key(kver: str) -> tuple[tuple[int, ...], str]:
    """Sort key of a kernel release by its numbers, not as text:
    6.12.117+deb12-amd64 -> (6, 12, 117, 12), so 6.12 ranks above 6.9 and
    6.1.0-56 above 6.1.0-9 (the text breaks ties between flavours)."""
    return tuple(int(n) for n in re.findall(r"\d+", kver)), kver


def _headers(root: Path, kver: str) -> Path | None:
    for d in (
        root / "lib" / "modules" / kver / "build",
        root / "usr" / "src" / f"linux-headers-{kver}",
    ):
        if d.is_dir():
            return d
    return None


def find_kernels(root: Path = Path("/"), cache: Path | None = None) -> list[Kernel]:
    """Every usable kernel, newest first.  Installed: ROOT/boot/vmlinuz-V
    with modules in ROOT/lib/modules/V/kernel and headers in
    ROOT/lib/modules/V/build or ROOT/usr/src/linux-headers-V.  Cached:
    CACHE/V/boot/vmlinuz-V with CACHE/V/lib/modules/V/modules.dep (a
    complete unpack) and headers unpacked next to it,
    CACHE/V/usr/src/linux-headers-V (else installed ones, as above: Debian's
    6.12 headers package cannot be installed without the image, but other
    kernels' can).  A release that is both
    installed and cached is the cache copy: that is what a fresh machine
    gets, so every machine tests the same thing."""
    cache = kernel_cache() if cache is None else cache
    found: dict[str, Kernel] = {}
    for img in sorted((root / "boot").glob("vmlinuz-*")):
        kver = img.name.removeprefix("vmlinuz-")
        mods = root / "lib" / "modules" / kver
        hdr = _headers(root, kver)
        if img.is_file() and hdr is not None and (mods / "kernel").is_dir():
            found[kver] = Kernel(kver, img, mods, hdr, cached=False)
    if cache.is_dir():
        for d in sorted(cache.iterdir()):
            kver = d.name
            if kver.startswith("."):  # a fetch in progress (setup-apt.sh)
                continue
            img = d / "boot" / f"vmlinuz-{kver}"
            mods = d / "lib" / "modules" / kver
            hdr = d / "usr" / "src" / f"linux-headers-{kver}"
            if not (hdr / "Makefile").is_file():
                hdr = _headers(root, kver)
            if img.is_file() and hdr is not None and (mods / "modules.dep").is_file():
                found[kver] = Kernel(kver, img, mods, hdr, cached=True)
    return sorted(found.values(), key=lambda k: version_key(k.kver), reverse=True)


def _no_kernel_hint(cache: Path) -> str:
    return (
        "need an image /boot/vmlinuz-V with /lib/modules/V/kernel, or one unpacked in "
        f"{cache}/V (boot/vmlinuz-V, lib/modules/V/modules.dep), and headers in "
        "/lib/modules/V/build, /usr/src/linux-headers-V or the cache's "
        "V/usr/src/linux-headers-V: run scripts/setup-apt.sh"
    )


def find_kernel(kver: str, root: Path = Path("/"), cache: Path | None = None) -> Kernel:
    """The usable kernel of release ``kver`` (the cache copy if both)."""
    cache = kernel_cache() if cache is None else cache
    kernels = find_kernels(root, cache)
    for k in kernels:
        if k.kver == kver:
            return k
    have = ", ".join(k.kver for k in kernels) or "none"
    raise VMError(f"kernel {kver!r} not found (usable: {have}; {_no_kernel_hint(cache)})")


def debian_kver(root: Path = Path("/"), cache: Path | None = None) -> str:
    """The newest usable kernel release (numerically: 6.12 above 6.9)."""
    cache = kernel_cache() if cache is None else cache
    kernels = find_kernels(root, cache)
    if not kernels:
        raise VMError(f"no usable kernel found ({_no_kernel_hint(cache)})")
    return kernels[0].kver


def build_initramfs(kernel: Kernel) -> Path:
    """(Re)build the kernel's initramfs when the builder, init or the
    kernel's module index changed."""
    tag = "-cache" if kernel.cached else ""
    out = OUT / f"initramfs-{kernel.kver}{tag}.cpio.gz"
    srcs = [
        REPO / "scripts/vm/init",
        REPO / "scripts/vm/mkinitramfs.sh",
        kernel.modules / "modules.dep",
    ]
    if not out.exists() or any(s.stat().st_mtime > out.stat().st_mtime for s in srcs):
        subprocess.run(
            [
                "bash",
                str(REPO / "scripts/vm/mkinitramfs.sh"),
                kernel.kver,
                str(out),
                str(kernel.modules),
            ],
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
    kernel: Kernel | None = None,
    mem_mib: int = 1536,
    smp: int = 2,
    keep_dir: Path | None = None,
    keep_paths: list[Path] | None = None,
    boot_retries: int = 1,
    nice: int = 0,
    on_start: Callable[[subprocess.Popen[bytes]], None] | None = None,
) -> VMResult:
    """Run the shell script text ``job`` in a fresh VM and collect the results.
    The kernel is ``kernel``, else release ``kver``, else the newest usable one.
    A boot that dies before the job starts (:func:`died_before_job`) is tried
    again, up to ``boot_retries`` times; the failed consoles stay in the
    result (``failed_boots``).  ``nice``: qemu runs at that niceness (a
    VM booted next to other work should not take its CPU).  ``on_start``
    is given each qemu process as it starts, for a caller that may have to
    stop it (a killed qemu ends the run as one that never finished)."""
    failed: list[str] = []
    while True:
        res = _run_job_once(
            job, timeout, kver, kernel, mem_mib, smp, keep_dir, keep_paths, nice, on_start
        )
        if len(failed) >= boot_retries or not died_before_job(res):
            return dataclasses.replace(res, failed_boots=tuple(failed))
        print(f"vmrun: the guest kernel died before the job started; booting again\n"
              f"{res.console[-2000:]}", file=sys.stderr)  # fmt: skip
        failed.append(res.console)


def start_qemu(cmd: list[str], nice: int = 0) -> subprocess.Popen[bytes]:
    """Start ``cmd`` (qemu) at niceness ``nice``, its output piped, to be
    killed when the thread that started it dies -- the process killed, by
    SIGKILL or by a SIGTERM that skips its clean-up (pytest's session-end
    hooks, which stop the VMs, do not run then): a qemu left behind keeps
    a vCPU busy until its own timeout.  (setpriv(1), util-linux, sets the
    parent-death signal; nice(1) and setpriv exec: the process returned is
    qemu itself.)"""
    cmd = ["nice", "-n", str(nice), *cmd] if nice else cmd
    setpriv = shutil.which("setpriv")
    if setpriv is not None:
        cmd = [setpriv, "--pdeathsig", "KILL", "--", *cmd]
    return subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT)  # fmt: skip


def _run_job_once(
    job: str,
    timeout: float,
    kver: str | None,
    kernel: Kernel | None,
    mem_mib: int,
    smp: int,
    keep_dir: Path | None,
    keep_paths: list[Path] | None,
    nice: int,
    on_start: Callable[[subprocess.Popen[bytes]], None] | None,
) -> VMResult:
    qemu = shutil.which("qemu-system-x86_64")
    if qemu is None:
        raise VMError("qemu-system-x86_64 not found (apt-get install qemu-system-x86)")
    if kernel is None:
        kernel = find_kernel(kver or debian_kver())
    initrd = build_initramfs(kernel)
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
        "-kernel", str(kernel.image),
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
    (outdir / "qemu-cmd").write_text(" ".join(cmd) + "\n")  # which kernel this run booted
    t0 = time.monotonic()
    timed_out = False
    proc = start_qemu(cmd, nice)
    if on_start is not None:
        on_start(proc)
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
        image=str(kernel.image),
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
    try:
        res = run_job(Path(a.job).read_text(), timeout=a.timeout, kver=a.kver, keep_dir=a.keep)
    except VMError as e:
        print(f"vmrun: {e}", file=sys.stderr)
        return 2
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

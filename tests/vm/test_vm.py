"""End-to-end tests of the Linux kernel module in a qemu VM (TCG), on every
kernel series in KERNELS: Debian bookworm's 6.1 and bookworm-backports' 6.12.

Per kernel, one VM boot runs every in-guest stage of tests/vm/guest_tests.sh
(module load, the device nodes on kup.ko's own character major, kernel-side
fault tests, a module thread that exits holding a kup_mutex or a channel
(tests/vm/kup_holdtest.c), libkup C scenarios, receive_any threads on
disjoint sets that must not wake each other (tests/vm/kup_anyherd.c),
Python channel scenarios,
kupd with a client (serving the tally example module too), unload while attached,
kernel-log check) against kup.ko/kup_echo.ko/kup_tally.ko
built for that kernel; each stage is one test here (``test_stage[6.12-load]``),
failing with the stage's own output, and the whole guest kernel log is
checked for warnings, oopses and sanitizer reports.  The kernels' VMs run
at the same time (KUPD_VM_JOBS, default 2; 1 runs them one after the other).

The builds and VMs start in the background as soon as pytest has collected
the session's tests and some selected test here needs a guest
(tests/vm/conftest.py): under ``make test`` they run while the rest of the
suite does, which mostly sleeps on deadlines and restarts, and the tests
here only wait for their results.  Every build and qemu runs at niceness
VM_NICE, so the other tests keep the CPU their deadlines count on; what is
still running when the session ends (Ctrl-C, -x) is killed.

Needs (from scripts/setup-apt.sh, i.e. ``make setup``): qemu-system-x86,
linux-image-amd64, linux-headers-amd64, bookworm-backports' 6.12 image and
headers -- unpacked into the kernel cache (KUPD_KERNEL_CACHE, default
.cache/kernels), not installed, so the tests never change what the host
boots -- busybox-static, cpio and gcc.
Kernels are found in /boot + /lib/modules or in the cache (the cache copy
when both; scripts/vm/vmrun.py find_kernels).  The modules are built
against each kernel's headers, which need not be the running kernel.  A
kernel series that is not found is skipped, with the reason -- unless
KUPD_REQUIRE_VM=1 (``make test`` and ``make vm-test`` set it, after
setup-apt.sh provided both), where it fails.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import importlib.util
import os
import platform
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

__all__ = ["KERNELS", "available_kernels", "missing_kernel", "start_vm_runs", "vm_jobs"]

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
    "kfault_release",
    "kfault_abuse",
    "kfault_siege",
    "kfault_reload",
    "kfault_compat",
    "kmutex",
    "kholder",
    "libkup_c",
    "receive_any",
    "anyherd",
    "python_channel",
    "kupd",
    "unload",
    "dmesg",
]
# Kernel series the module must build and pass on: bookworm's own and the
# newer longterm kernel from bookworm-backports (scripts/setup-apt.sh),
# which compiles kmod/linux's branches for kernels after 6.1.
KERNELS = ("6.1", "6.12")
REQUIRE_ENV = "KUPD_REQUIRE_VM"  # "1": a missing kernel fails instead of skipping
JOBS_ENV = "KUPD_VM_JOBS"  # VMs booted at once (default 2)
VM_TIMEOUT = 900.0  # host-side bound on the whole guest run (generous: shared, loaded hosts)
# niceness of the VMs and their builds: they run while the rest of the suite
# does, whose tests wait on deadlines and must get the CPU first; not 19,
# since the guests have deadlines of their own (a starved TCG guest sees its
# clock run on while it makes no progress)
VM_NICE = 10

pytestmark = [
    pytest.mark.skipif(
        sys.platform != "linux" or platform.machine() != "x86_64",
        reason="the VM tests boot Debian's x86_64 Linux kernel",
    ),
    # the second kernel's tests may wait for both VMs to finish
    pytest.mark.timeout(2 * VM_TIMEOUT + 300),
]


def _load_vmrun() -> ModuleType:
    spec = importlib.util.spec_from_file_location("vmrun", REPO / "scripts" / "vm" / "vmrun.py")
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    sys.modules["vmrun"] = mod
    spec.loader.exec_module(mod)
    return mod


vmrun = _load_vmrun()


class _Stopped(Exception):
    """The session ended before this VM work could start."""


class _Children:
    """The child processes of the session's VM work (builds, qemu), so that
    the session's end can stop what is still running: a pytest that exits
    early (Ctrl-C, -x, a failure elsewhere) leaves no build or VM behind."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.procs: set[subprocess.Popen[Any]] = set()
        self.stopped = False

    def started(self, p: subprocess.Popen[Any]) -> None:
        with self.lock:
            if not self.stopped:
                self.procs.add(p)
                return
        _kill(p)

    def run(self, cmd: list[str], what: str) -> None:
        """Run a build step at niceness VM_NICE, in a process group of its
        own (make's compilers go with it); AssertionError with its output
        if it fails."""
        with self.lock:
            if self.stopped:
                raise _Stopped(f"{what}: the test session ended first")
            p = subprocess.Popen(
                ["nice", "-n", str(VM_NICE), *cmd], cwd=REPO, stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                start_new_session=True,
            )  # fmt: skip
            self.procs.add(p)
        try:
            out, err = p.communicate()
        finally:
            with self.lock:
                self.procs.discard(p)
        if p.returncode != 0:
            raise AssertionError(f"{what} failed ({' '.join(cmd)}):\n{out}\n{err}")

    def stop(self) -> None:
        """Kill what runs now and refuse what would start later."""
        with self.lock:
            self.stopped = True
            procs = list(self.procs)
        for p in procs:
            _kill(p)


def _kill(p: subprocess.Popen[Any]) -> None:
    if p.poll() is not None:
        return
    try:  # a build's whole group (its own session); qemu alone
        if os.getpgid(p.pid) == p.pid:
            os.killpg(p.pid, signal.SIGKILL)
        else:
            p.kill()
    except ProcessLookupError:
        pass


def available_kernels(root: Path = Path("/"), cache: Path | None = None) -> dict[str, Any]:
    """The newest usable kernel (a vmrun.Kernel) of every series ("6.1",
    "6.12"), installed under ``root`` or unpacked in ``cache`` (default: the
    kernel cache); see vmrun.find_kernels for what usable means."""
    found: dict[str, Any] = {}
    for k in vmrun.find_kernels(root, cache):  # newest first
        m = re.match(r"(\d+\.\d+)[.-]", k.kver)
        if m is not None and m.group(1) not in found:
            found[m.group(1)] = k
    return found


def missing_kernel(
    series: str, kernels: Mapping[str, str], env: Mapping[str, str], cache: Path | None = None
) -> tuple[str, str]:
    """What a kernel series that is not found means: ("skip", why) when
    someone runs pytest by hand, ("fail", why) under KUPD_REQUIRE_VM=1 (make
    test / make vm-test, after setup-apt.sh should have provided it).
    ``kernels``: series -> release of what was found."""
    cache = vmrun.kernel_cache(env) if cache is None else cache
    why = (
        f"no Linux {series} kernel found (need an image /boot/vmlinuz-{series}.* with "
        f"/lib/modules/<it>/kernel and headers in /lib/modules/<it>/build, or one "
        f"unpacked with its headers in {cache}/<it>; found: "
        f"{', '.join(sorted(kernels.values())) or 'none'}): run scripts/setup-apt.sh"
    )
    if env.get(REQUIRE_ENV) == "1":
        return "fail", f"{why} ({REQUIRE_ENV}=1: every kernel in KERNELS must be tested)"
    return "skip", why


def vm_jobs(env: Mapping[str, str]) -> int:
    """KUPD_VM_JOBS: how many VMs boot at once (default 2: both kernels)."""
    text = env.get(JOBS_ENV, "2")
    if not text.isdigit() or int(text) < 1:
        raise ValueError(f"{JOBS_ENV}={text!r}: want a whole number of VMs, 1 or more")
    return int(text)


def _build_modules(kernel: Any, children: _Children) -> Path:
    """kup.ko/kup_echo.ko/kup_rot13.ko/kup_tally.ko against that kernel's headers."""
    kver: str = kernel.kver
    children.run(
        ["make", "-s", "-C", "kmod/linux", f"KVER={kver}", f"KDIR={kernel.headers}"],
        f"building kup.ko/kup_echo.ko for {kver}",
    )
    moddir = REPO / "kmod" / "out" / "linux" / kver
    for ko in ("kup.ko", "kup_echo.ko", "kup_rot13.ko", "kup_tally.ko"):
        assert (moddir / ko).is_file(), f"{ko} was not built in {moddir}"
    _build_test_module(kernel, moddir, children)
    return moddir


def _test_module_dir(kver: str) -> Path:
    return OUT / f"testmod-{kver}"


TEST_MODULES = ("kup_holdtest", "kup_anyherd")


def _build_test_module(kernel: Any, moddir: Path, children: _Children) -> None:
    """tests/vm/kup_holdtest.c (the kmutex and kholder stages' module) and
    tests/vm/kup_anyherd.c (the anyherd stage's), built as a module of
    one's own is (docs/linux.md): out of tree, against that kernel's
    headers and kup.ko's Module.symvers, in a directory of symlinks.
    kup_anyherd reads a statistic of the core's private structures, so the
    core's and the Linux host's headers are on the path too."""
    kver: str = kernel.kver
    d = _test_module_dir(kver)
    d.mkdir(parents=True, exist_ok=True)
    for name in TEST_MODULES:
        src = d / f"{name}.c"
        if src.is_symlink() or src.exists():
            src.unlink()
        src.symlink_to(REPO / "tests" / "vm" / f"{name}.c")
    incs = " ".join(f"-I{REPO / 'kmod' / sub}" for sub in ("include", "core", "linux"))
    objs = " ".join(f"{name}.o" for name in TEST_MODULES)
    (d / "Kbuild").write_text(f"obj-m := {objs}\nccflags-y := -Werror {incs}\n")
    children.run(
        ["make", "-s", "-C", str(kernel.headers), f"M={d}",
         f"KBUILD_EXTRA_SYMBOLS={moddir / 'Module.symvers'}", "modules"],
        f"building tests/vm/{', '.join(TEST_MODULES)} for {kver}",
    )  # fmt: skip
    for name in TEST_MODULES:
        assert (d / f"{name}.ko").is_file(), f"{name}.ko was not built in {d}"


def _build_programs(children: _Children) -> None:
    """The in-guest test programs (user space: the same for every kernel)."""
    BIN.mkdir(parents=True, exist_ok=True)
    cc = shutil.which(os.environ.get("CC", "gcc")) or "gcc"
    flags = ["-std=gnu11", "-O1", "-g", "-Wall", "-Wextra", "-Werror",
             "-fsanitize=address,undefined", "-fno-omit-frame-pointer",
             "-Ikmod/include"]  # fmt: skip
    # each under a private name, then renamed: another session's guest may
    # be running the previous binary right now
    tmp = f".tmp.{os.getpid()}"
    children.run([cc, *flags, "tests/vm/kup_kfault.c", "-o", str(BIN / f"kup_kfault{tmp}")],
                 "building tests/vm/kup_kfault.c")  # fmt: skip
    os.replace(BIN / f"kup_kfault{tmp}", BIN / "kup_kfault")
    # an i386 user of the device (kup.ko's compat ioctl and mmap2 paths),
    # with no C library: the host has no 32-bit one
    children.run(
        [cc, "-m32", "-static", "-nostdlib", "-ffreestanding", "-fno-pic", "-no-pie",
         "-fno-stack-protector", "-fno-builtin", "-march=i686", "-O1", "-Wall", "-Wextra",
         "-Werror", "-Itests/vm/compat32", "-Ikmod/include", "tests/vm/kup_compat32.c",
         "-o", str(BIN / f"kup_compat32{tmp}")],
        "building tests/vm/kup_compat32.c (i386, freestanding)",
    )  # fmt: skip
    os.replace(BIN / f"kup_compat32{tmp}", BIN / "kup_compat32")
    # libkup as kmod/Makefile builds it on Linux: every source (backend_kdev.c
    # is the Linux backend under -DKUP_HAVE_BACKEND_LINUX)
    libkup = sorted(str(p.relative_to(REPO)) for p in (REPO / "kmod" / "libkup").glob("*.c"))
    children.run(
        [cc, *flags, "-pthread", "-Ikmod/core", "-Ikmod/kupsim", "-Ikmod/libkup", "-Itests/c",
         "-DKUP_HAVE_BACKEND_LINUX", "tests/c/test_kup.c", *libkup,
         "-o", str(BIN / f"test_kup{tmp}")],
        "building tests/c/test_kup.c with libkup's linux backend",
    )  # fmt: skip
    os.replace(BIN / f"test_kup{tmp}", BIN / "test_kup")


@dataclass
class Stage:
    name: str
    rc: int | None
    output: str


@dataclass
class GuestRun:
    kver: str
    cached: bool  # booted the kernel cache's copy (not an installed image)
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


def _keep_newest(series: str, outdir: Path) -> None:
    """Point last-run-SERIES at this run; drop that kernel's older runs that
    passed (failed runs stay for a look)."""
    last = OUT / f"last-run-{series}"
    with contextlib.suppress(OSError):
        if last.is_symlink() or last.exists():
            if last.is_dir() and not last.is_symlink():
                shutil.rmtree(last)
            else:
                last.unlink()
        last.symlink_to(outdir.name)
    for old in OUT.glob(f"run-{series}-*"):
        if old != outdir and (old / "rc").exists() and _read_rc(old) == 0:
            shutil.rmtree(old, ignore_errors=True)


def _run_guest(series: str, kernel: Any, moddir: Path, children: _Children) -> GuestRun:
    kver: str = kernel.kver
    job = (
        f"export REPO={REPO} KMODDIR={moddir} BINDIR={BIN} KVER={kver}\n"
        f"export TESTKMODDIR={_test_module_dir(kver)}\n"
        f"export STAGES='{' '.join(STAGES)}'\n"
        f"exec sh {REPO}/tests/vm/guest_tests.sh\n"
    )
    # a private output directory: two test sessions may run at once
    OUT.mkdir(parents=True, exist_ok=True)
    outdir = Path(tempfile.mkdtemp(prefix=f"run-{series}-", dir=OUT))
    res = vmrun.run_job(
        job, timeout=VM_TIMEOUT, kernel=kernel, keep_dir=outdir, nice=VM_NICE,
        on_start=children.started,
    )  # fmt: skip
    _keep_newest(series, outdir)
    return GuestRun(kver, kernel.cached, res, _parse_stages(res.log), 0.0)


class _Runs:
    """The session's VMs: builds what the guests need and boots one VM per
    requested kernel series, up to KUPD_VM_JOBS at a time, so the kernels'
    runs overlap (each is mostly one busy TCG vCPU) -- all in the
    background, from :meth:`start` on; :meth:`get` waits for a kernel's
    result, :meth:`close` kills what still runs."""

    def __init__(self, wanted: list[str]) -> None:
        self.wanted = wanted
        # a bad KUPD_KERNEL_CACHE fails the VM tests, not the session's collection
        self.setup_error: Exception | None = None
        try:
            self.kernels = available_kernels()
        except vmrun.VMError as e:
            self.kernels, self.setup_error = {}, e
        self.children = _Children()
        self.lock = threading.Lock()
        self.thread: threading.Thread | None = None
        self.ready = threading.Event()  # set once the VMs are submitted, or failed to be
        self.pool: concurrent.futures.ThreadPoolExecutor | None = None
        self.futures: dict[str, concurrent.futures.Future[GuestRun]] = {}
        self.build_error: BaseException | None = None
        self.build_seconds = 0.0

    def start(self) -> None:
        """Begin building and booting in a background thread (once)."""
        with self.lock:
            if self.thread is None:
                self.thread = threading.Thread(target=self._start, name="vm-runs", daemon=True)
                self.thread.start()

    def _start(self) -> None:
        try:
            t0 = time.monotonic()
            todo = [s for s in self.wanted if s in self.kernels]
            if not todo:
                return
            jobs = vm_jobs(os.environ)
            moddirs = {s: _build_modules(self.kernels[s], self.children) for s in todo}
            _build_programs(self.children)
            self.build_seconds = time.monotonic() - t0
            with self.lock:
                if self.children.stopped:
                    raise _Stopped("the test session ended before the VMs started")
                self.pool = concurrent.futures.ThreadPoolExecutor(
                    max_workers=jobs, thread_name_prefix="vm"
                )
                for s in todo:
                    self.futures[s] = self.pool.submit(
                        _run_guest, s, self.kernels[s], moddirs[s], self.children
                    )
        except BaseException as e:  # reported by every kernel's tests
            self.build_error = e
        finally:
            self.ready.set()

    def get(self, series: str) -> GuestRun:
        if self.setup_error is not None:
            raise self.setup_error
        if series not in self.kernels:
            found = {s: k.kver for s, k in self.kernels.items()}
            verdict, why = missing_kernel(series, found, os.environ)
            if verdict == "fail":
                pytest.fail(why)
            pytest.skip(why)
        self.start()  # already started at collection, unless tests/vm/conftest.py was not seen
        self.ready.wait()
        if self.build_error is not None:
            raise self.build_error
        run = self.futures[series].result()
        run.build_seconds = self.build_seconds
        return run

    def close(self) -> None:
        """Kill the builds and VMs still running (nothing is left when the
        VM tests have had their results), then wait for their threads."""
        self.children.stop()
        with self.lock:
            thread, pool = self.thread, self.pool
        if thread is not None:
            thread.join()
        if pool is not None:
            pool.shutdown(wait=True, cancel_futures=True)


_RUNS = pytest.StashKey[_Runs]()


def start_vm_runs(session: pytest.Session) -> _Runs:
    """The session's VM runs, started in the background (once): for the
    kernels some selected test asks for (-k 6.12 boots one VM).  Called by
    tests/vm/conftest.py when collection is done; the caller closes them."""
    runs = session.config.stash.get(_RUNS, None)
    if runs is None:
        wanted = {
            item.callspec.params["guest"]
            for item in session.items
            if isinstance(item, pytest.Function)
            and hasattr(item, "callspec")
            and "guest" in item.callspec.params
        }
        runs = _Runs([k for k in KERNELS if k in wanted])
        session.config.stash[_RUNS] = runs
    runs.start()
    return runs


@pytest.fixture(scope="session")
def vm_runs(request: pytest.FixtureRequest) -> Iterator[_Runs]:
    runs = start_vm_runs(request.session)
    yield runs
    runs.close()


@pytest.fixture(scope="module", params=KERNELS)
def guest(request: pytest.FixtureRequest, vm_runs: _Runs) -> GuestRun:
    series: str = request.param
    run = vm_runs.get(series)
    res = run.result
    print(
        f"\nvm: Linux {series} = {run.kver} from {res.image} "
        f"({'unpacked in the kernel cache' if run.cached else 'installed'}), "
        f"build {run.build_seconds:.1f}s (all kernels), "
        f"boot {res.boot_seconds}s (guest uptime), guest run {res.wall_seconds:.1f}s wall "
        f"(at niceness {VM_NICE}, next to the rest of the session), "
        f"rc={res.rc}, timed_out={res.timed_out}, files in {OUT / f'last-run-{series}'}"
    )
    return run


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

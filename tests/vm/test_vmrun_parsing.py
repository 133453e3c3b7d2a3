"""Host-only checks of the VM runner's result parsing, kernel discovery and
settings (no VM is booted)."""

from __future__ import annotations

import gzip
import importlib.util
import lzma
import os
import shutil
import subprocess
import sys
import threading
from pathlib import Path
from types import ModuleType

import pytest

from kupd.testing import wait_until

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


EARLY_OOPS = (
    "[    2.492450] Oops: int3: 0000 [#1] PREEMPT SMP NOPTI\n"
    "[    2.493400] RIP: 0010:sched_clock_cpu+0x9/0x190\n"
    "[    2.501834] Kernel panic - not syncing: Fatal exception in interrupt\n"
)


def _result(**kw: object) -> object:
    fields: dict[str, object] = dict(
        rc=None, log="", dmesg="", console=EARLY_OOPS, boot_seconds=None,
        wall_seconds=5.0, timed_out=False,
    )  # fmt: skip
    fields.update(kw)
    return vmrun.VMResult(**fields)


def test_a_kernel_dying_before_the_job_is_a_boot_to_retry_and_nothing_else_is() -> None:
    # the 6.12 guest once died like this in its first 3 s, before init ran
    assert vmrun.died_before_job(_result())
    # the job had started: whatever happened next is the test's to report
    assert not vmrun.died_before_job(_result(boot_seconds=3.2))
    assert not vmrun.died_before_job(_result(log="=== STAGE load\n"))
    assert not vmrun.died_before_job(_result(rc=0, console=""))
    # no kernel problem on the console, or the VM hung: not this case either
    assert not vmrun.died_before_job(_result(console="[ 1.0] Run /init as init process\n"))
    assert not vmrun.died_before_job(_result(timed_out=True))


def test_a_retried_boot_is_reported_with_the_result() -> None:
    res = _result(rc=0, console="", boot_seconds=3.0, failed_boots=(EARLY_OOPS,))
    report = res.report()  # type: ignore[attr-defined]
    assert "boot 1 died before the job started (retried)" in report
    assert "sched_clock_cpu" in report


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
    """An installed kernel under ``root``: /boot/vmlinuz-V, /lib/modules/V/kernel
    and (``build``) its headers' /lib/modules/V/build."""
    (root / "boot").mkdir(parents=True, exist_ok=True)
    if image:
        (root / "boot" / f"vmlinuz-{kver}").write_bytes(b"")
    mods = root / "lib" / "modules" / kver
    (mods / "kernel").mkdir(parents=True, exist_ok=True)
    if build:
        (mods / "build").mkdir()


def _headers_only(root: Path, kver: str, *, usr_src: bool = False) -> None:
    """Only the headers package of ``kver`` installed: its build link in
    /lib/modules/V (Debian's linux-headers-V ships it), or (``usr_src``)
    just /usr/src/linux-headers-V."""
    if usr_src:
        (root / "usr" / "src" / f"linux-headers-{kver}").mkdir(parents=True)
    else:
        (root / "lib" / "modules" / kver / "build").mkdir(parents=True)


def _cached(cache: Path, kver: str, *, complete: bool = True, headers: bool = True) -> None:
    """A kernel unpacked in the kernel cache as setup-apt.sh leaves it:
    image, modules and (``headers``) its build tree;  ``complete=False``: no
    modules.dep (depmod never ran)."""
    (cache / kver / "boot").mkdir(parents=True)
    (cache / kver / "boot" / f"vmlinuz-{kver}").write_bytes(b"")
    mods = cache / kver / "lib" / "modules" / kver
    (mods / "kernel").mkdir(parents=True)
    if complete:
        (mods / "modules.dep").write_text("")
    if headers:
        hdr = cache / kver / "usr" / "src" / f"linux-headers-{kver}"
        hdr.mkdir(parents=True)
        (hdr / "Makefile").write_text("include $(dir $(lastword $(MAKEFILE_LIST)))../x/Makefile\n")


def test_available_kernels_picks_the_newest_usable_release_per_series(tmp_path: Path) -> None:
    root, cache = tmp_path / "root", tmp_path / "cache"
    _kernel(root, "6.1.0-56-amd64")
    _kernel(root, "6.1.0-9-amd64")  # older: 9 < 56 numerically, not as text
    _kernel(root, "6.12.117+deb12-amd64")
    _kernel(root, "6.12.200+deb12-amd64", build=False)  # no headers: unusable
    _kernel(root, "6.13.1-amd64", image=False)  # no image: unusable
    found = test_vm.available_kernels(root, cache)
    assert {s: k.kver for s, k in found.items()} == {
        "6.1": "6.1.0-56-amd64",
        "6.12": "6.12.117+deb12-amd64",
    }
    k = found["6.12"]
    assert not k.cached
    assert k.image == root / "boot" / "vmlinuz-6.12.117+deb12-amd64"
    assert k.modules == root / "lib" / "modules" / "6.12.117+deb12-amd64"
    assert k.headers == k.modules / "build"


def test_available_kernels_of_an_empty_root_is_empty(tmp_path: Path) -> None:
    assert test_vm.available_kernels(tmp_path, tmp_path / "no-cache") == {}


def test_a_kernel_unpacked_in_the_cache_is_found_with_its_own_headers(tmp_path: Path) -> None:
    # a fresh machine after setup-apt.sh: 6.1 installed; nothing of 6.12 is
    # installed, its image and headers are unpacked in the cache
    root, cache = tmp_path / "root", tmp_path / "cache"
    _kernel(root, "6.1.0-56-amd64")
    _cached(cache, "6.12.117+deb12-amd64")
    found = test_vm.available_kernels(root, cache)
    assert {s: k.kver for s, k in found.items()} == {
        "6.1": "6.1.0-56-amd64",
        "6.12": "6.12.117+deb12-amd64",
    }
    k = found["6.12"]
    base = cache / "6.12.117+deb12-amd64"
    assert k.cached
    assert k.image == base / "boot" / "vmlinuz-6.12.117+deb12-amd64"
    # the initramfs takes virtio/9p from the kernel's own module tree
    assert k.modules == base / "lib" / "modules" / "6.12.117+deb12-amd64"
    assert k.headers == base / "usr" / "src" / "linux-headers-6.12.117+deb12-amd64"
    assert not found["6.1"].cached


def test_a_cached_image_without_headers_uses_installed_ones(tmp_path: Path) -> None:
    root, cache = tmp_path / "root", tmp_path / "cache"
    _headers_only(root, "6.12.117+deb12-amd64", usr_src=True)  # /usr/src alone is enough
    _cached(cache, "6.12.117+deb12-amd64", headers=False)
    (k,) = vmrun.find_kernels(root, cache)
    assert k.cached
    assert k.headers == root / "usr" / "src" / "linux-headers-6.12.117+deb12-amd64"
    _headers_only(root, "6.12.117+deb12-amd64")  # the build link comes first
    (k,) = vmrun.find_kernels(root, cache)
    assert k.headers == root / "lib" / "modules" / "6.12.117+deb12-amd64" / "build"


def test_the_cache_copy_wins_over_the_same_installed_release(tmp_path: Path) -> None:
    # what a fresh machine boots is what every machine tests
    root, cache = tmp_path / "root", tmp_path / "cache"
    _kernel(root, "6.12.117+deb12-amd64")
    _cached(cache, "6.12.117+deb12-amd64")
    (k,) = vmrun.find_kernels(root, cache)
    assert k.cached and k.image.is_relative_to(cache)
    assert vmrun.find_kernel("6.12.117+deb12-amd64", root, cache) == k
    # but a newer installed release of the series is newer
    _kernel(root, "6.12.200+deb12-amd64")
    newest = test_vm.available_kernels(root, cache)["6.12"]
    assert newest.kver == "6.12.200+deb12-amd64" and not newest.cached


def test_unusable_cache_entries_are_ignored(tmp_path: Path) -> None:
    root, cache = tmp_path / "root", tmp_path / "cache"
    _cached(cache, "6.12.117+deb12-amd64", complete=False)  # no modules.dep yet
    _cached(cache, "6.12.300+deb12-amd64", headers=False)  # no headers anywhere
    (cache / ".fetch-6.12.117+deb12-amd64.abc123").mkdir()  # a fetch in progress
    (cache / "stray-file").write_text("")
    assert vmrun.find_kernels(root, cache) == []
    with pytest.raises(vmrun.VMError, match=r"no usable kernel found .*setup-apt\.sh"):
        vmrun.debian_kver(root, cache)
    with pytest.raises(vmrun.VMError, match=r"kernel '6\.12\.117\+deb12-amd64' not found"):
        vmrun.find_kernel("6.12.117+deb12-amd64", root, cache)


def test_newest_kernel_is_chosen_numerically_not_as_text(tmp_path: Path) -> None:
    root, cache = tmp_path / "root", tmp_path / "cache"
    _kernel(root, "6.9.12-amd64")
    _kernel(root, "6.12.117+deb12-amd64")
    _kernel(root, "6.1.0-56-amd64")
    assert sorted(["6.9.12-amd64", "6.12.117+deb12-amd64"])[-1] == "6.9.12-amd64"  # text order
    assert vmrun.debian_kver(root, cache) == "6.12.117+deb12-amd64"
    assert [k.kver for k in vmrun.find_kernels(root, cache)] == [
        "6.12.117+deb12-amd64",
        "6.9.12-amd64",
        "6.1.0-56-amd64",
    ]
    assert vmrun.version_key("6.1.0-56-amd64") > vmrun.version_key("6.1.0-9-amd64")
    assert vmrun.version_key("6.12.1-amd64") > vmrun.version_key("6.9.12-amd64")


def test_kernel_cache_location_comes_from_the_environment() -> None:
    assert vmrun.kernel_cache({}) == REPO / ".cache" / "kernels"
    assert vmrun.kernel_cache({"KUPD_KERNEL_CACHE": ""}) == REPO / ".cache" / "kernels"
    assert vmrun.kernel_cache({"KUPD_KERNEL_CACHE": "/var/tmp/k"}) == Path("/var/tmp/k")
    with pytest.raises(vmrun.VMError, match=r"KUPD_KERNEL_CACHE='kernels': want an absolute"):
        vmrun.kernel_cache({"KUPD_KERNEL_CACHE": "kernels"})


def test_a_missing_kernel_skips_by_hand_and_fails_under_make_test() -> None:
    kernels = {"6.1": "6.1.0-56-amd64"}
    verdict, why = test_vm.missing_kernel("6.12", kernels, {})
    assert verdict == "skip"
    assert "no Linux 6.12 kernel found" in why and "6.1.0-56-amd64" in why
    assert "setup-apt.sh" in why and str(REPO / ".cache" / "kernels") in why
    verdict, why = test_vm.missing_kernel("6.12", kernels, {"KUPD_REQUIRE_VM": "1"})
    assert verdict == "fail" and "KUPD_REQUIRE_VM=1" in why
    assert test_vm.missing_kernel("6.12", {}, {"KUPD_REQUIRE_VM": "0"})[0] == "skip"


def test_vm_jobs_defaults_to_both_kernels_and_names_a_bad_value() -> None:
    assert test_vm.vm_jobs({}) == 2
    assert test_vm.vm_jobs({"KUPD_VM_JOBS": "1"}) == 1
    for bad in ("0", "two", "-1", ""):
        with pytest.raises(ValueError, match="KUPD_VM_JOBS"):
            test_vm.vm_jobs({"KUPD_VM_JOBS": bad})


def _fake_moddir(moddir: Path) -> dict[str, bytes]:
    """A module tree with modules.dep like a Debian kernel's (some modules
    xz-compressed); the .ko files are marker bytes, never loaded."""
    mods = {
        "kernel/drivers/virtio/virtio_pci.ko.xz": (
            "kernel/drivers/virtio/virtio_pci_modern_dev.ko.xz kernel/drivers/virtio/virtio_ring.ko"
        ),
        "kernel/drivers/virtio/virtio_pci_modern_dev.ko.xz": "",
        "kernel/drivers/virtio/virtio_ring.ko": "",
        "kernel/net/9p/9pnet_virtio.ko": (
            "kernel/net/9p/9pnet.ko kernel/drivers/virtio/virtio_ring.ko"
        ),
        "kernel/net/9p/9pnet.ko": "",
        "kernel/fs/9p/9p.ko.xz": "kernel/net/9p/9pnet.ko kernel/fs/netfs/netfs.ko",
        "kernel/fs/netfs/netfs.ko": "",
    }
    contents: dict[str, bytes] = {}
    for rel in mods:
        name = Path(rel).name.removesuffix(".xz")
        data = f"module {name}\n".encode()
        contents[name] = data
        f = moddir / rel
        f.parent.mkdir(parents=True, exist_ok=True)
        f.write_bytes(lzma.compress(data, format=lzma.FORMAT_XZ) if rel.endswith(".xz") else data)
    (moddir / "modules.dep").write_text("".join(f"{m}: {d}\n" for m, d in mods.items()))
    return contents


@pytest.mark.skipif(
    shutil.which("busybox") is None or shutil.which("cpio") is None,
    reason="needs busybox-static and cpio (scripts/setup-apt.sh)",
)
def _gone(pid: int) -> bool:
    """No such process, or only its zombie is left (killed, not yet reaped)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except FileNotFoundError:
        return True


def test_the_session_end_kills_a_vm_build_with_its_whole_group(tmp_path: Path) -> None:
    """The VM runs' builds run in the background during the session; its
    end (Ctrl-C, -x) kills one still going, with what it started (make's
    compilers), and the build fails naming itself instead of hanging."""
    children = test_vm._Children()
    pidfile = tmp_path / "grandchild"
    out: list[BaseException] = []

    def build() -> None:
        try:
            script = f"sleep 300 & echo $! > {pidfile}.tmp; mv {pidfile}.tmp {pidfile}; wait"
            children.run(["sh", "-c", script], "building a test thing")
        except BaseException as e:
            out.append(e)

    t = threading.Thread(target=build)
    t.start()
    wait_until(pidfile.exists, timeout=30, what="the build's child started")
    grandchild = int(pidfile.read_text())
    assert not _gone(grandchild)
    children.stop()
    t.join(30)
    assert not t.is_alive(), "the build still runs after the session's end"
    assert len(out) == 1 and isinstance(out[0], AssertionError), out
    assert "building a test thing failed" in str(out[0])
    wait_until(lambda: _gone(grandchild), timeout=30, what="the build's own child killed")


def test_after_the_session_end_no_build_or_vm_starts() -> None:
    """A build asked for after the end is refused; a qemu that started just
    then (vmrun's on_start) is killed at once."""
    children = test_vm._Children()
    children.stop()
    with pytest.raises(test_vm._Stopped, match="building x: the test session ended first"):
        children.run(["true"], "building x")
    p = subprocess.Popen(["sleep", "300"])
    try:
        children.started(p)
        assert p.wait(30) == -9
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()


def test_vm_work_runs_at_low_priority() -> None:
    """Builds (and qemu: vmrun's nice) run at VM_NICE, below the tests
    they run next to."""
    assert test_vm.VM_NICE > 0
    children = test_vm._Children()
    # the build step's own niceness, relative to ours
    children.run(["sh", "-c", f"test $(nice) -eq {min(19, os.nice(0) + test_vm.VM_NICE)}"], "nice")


def test_a_qemu_dies_with_the_process_that_started_it(tmp_path: Path) -> None:
    """A pytest killed outright (SIGKILL, or a SIGTERM that skips its
    session-end hooks) leaves no qemu behind: vmrun starts it with a
    parent-death signal.  A process standing in for pytest starts a
    stand-in qemu the way vmrun starts qemu, and is killed."""
    pidfile = tmp_path / "qemu.pid"
    starter = subprocess.Popen(
        [sys.executable, "-c",
         "import importlib.util, sys, time\n"
         "spec = importlib.util.spec_from_file_location('vmrun', sys.argv[1])\n"
         "m = sys.modules['vmrun'] = importlib.util.module_from_spec(spec)\n"
         "spec.loader.exec_module(m)\n"
         "p = m.start_qemu(['sleep', '300'], nice=5)\n"
         "open(sys.argv[2] + '.tmp', 'w').write(str(p.pid))\n"
         "import os; os.rename(sys.argv[2] + '.tmp', sys.argv[2])\n"
         "time.sleep(300)\n",
         str(REPO / "scripts" / "vm" / "vmrun.py"), str(pidfile)],
    )  # fmt: skip
    try:
        wait_until(pidfile.exists, timeout=30, what="the stand-in qemu started")
        qemu = int(pidfile.read_text())
        # setpriv and nice exec it: the process becomes the command itself
        comm = Path(f"/proc/{qemu}/comm")
        wait_until(lambda: comm.read_text().strip() == "sleep", timeout=30, what="the exec")
    finally:
        starter.kill()
        starter.wait()
    wait_until(lambda: _gone(qemu), timeout=30, what="the stand-in qemu killed with its starter")


def test_initramfs_takes_the_modules_from_the_kernels_own_tree(tmp_path: Path) -> None:
    # a kernel unpacked in the cache has no /lib/modules/V: the builder reads
    # the tree it is given, dependencies first
    kver = "6.12.999+test-amd64"
    moddir = tmp_path / "cache" / kver / "lib" / "modules" / kver
    contents = _fake_moddir(moddir)
    out = tmp_path / "initramfs.cpio.gz"
    subprocess.run(
        ["bash", str(REPO / "scripts/vm/mkinitramfs.sh"), kver, str(out), str(moddir)],
        check=True,
        capture_output=True,
    )
    unpacked = tmp_path / "unpacked"
    unpacked.mkdir()
    with gzip.open(out) as cpio_in:
        subprocess.run(
            ["cpio", "-i", "-d", "--quiet"], input=cpio_in.read(), cwd=unpacked, check=True
        )
    order = (unpacked / "modules.order").read_text().split()
    assert set(order) == set(contents)
    for mod, dep in [
        ("virtio_pci.ko", "virtio_pci_modern_dev.ko"),
        ("virtio_pci.ko", "virtio_ring.ko"),
        ("9pnet_virtio.ko", "9pnet.ko"),
        ("9p.ko", "netfs.ko"),
        ("9p.ko", "9pnet.ko"),
    ]:
        assert order.index(dep) < order.index(mod), order
    for name, data in contents.items():  # decompressed for plain insmod
        assert (unpacked / "lib" / "modules" / name).read_bytes() == data
    assert (unpacked / "init").is_file() and (unpacked / "bin" / "busybox").is_file()


def test_initramfs_builder_names_a_module_tree_without_an_index(tmp_path: Path) -> None:
    moddir = tmp_path / "lib" / "modules" / "6.12.1-amd64"
    (moddir / "kernel").mkdir(parents=True)
    p = subprocess.run(
        ["bash", str(REPO / "scripts/vm/mkinitramfs.sh"), "6.12.1-amd64",
         str(tmp_path / "out.cpio.gz"), str(moddir)],
        capture_output=True, text=True,
    )  # fmt: skip
    assert p.returncode != 0
    assert f"no {moddir}/modules.dep" in p.stderr and "depmod" in p.stderr


@pytest.mark.parametrize("script", ["scripts/setup-apt.sh", "scripts/vm/mkinitramfs.sh"])
def test_vm_scripts_pass_shellcheck(script: str) -> None:
    tool = shutil.which("shellcheck")
    assert tool is not None, "shellcheck is required (scripts/setup-apt.sh installs it)"
    p = subprocess.run([tool, "-s", "bash", "-S", "style", str(REPO / script)],
                       capture_output=True, text=True, timeout=120)  # fmt: skip
    assert p.returncode == 0, p.stdout + p.stderr

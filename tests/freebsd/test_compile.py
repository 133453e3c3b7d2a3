"""`make kmod-freebsd-check`: every FreeBSD source compiles against FreeBSD's
own headers for amd64 and arm64, and the objects carry what a FreeBSD
kernel module needs (module metadata, the dependency on kupdev, the
exported kernel API).

We cannot boot FreeBSD here; these checks are what keeps kmod/freebsd and
libkup's FreeBSD backend honest.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from kupd.testing import doc_block

__all__: list[str] = []

REPO = Path(__file__).resolve().parents[2]
ARCHS = ("x86_64", "aarch64")
KERNEL_SOURCES = (
    "kmod/freebsd/kup_freebsd.c",
    "kmod/core/kup_core.c",
    "kmod/examples/echo/echo.c",
    "kmod/freebsd/kup_client_mod.c",
)
USER_SOURCES = ("kmod/libkup/backend_kdev.c", "kmod/libkup/kup.c")
# zig's first compilation for a target builds nothing big for -c, but the
# machine is shared: be generous.
CHECK_TIMEOUT = 1200


def _nm_tool() -> str:
    for tool in ("llvm-nm", "nm"):
        path = shutil.which(tool)
        if path is not None:
            return path
    pytest.fail("neither llvm-nm nor nm is installed (binutils / llvm)")


def _symbols(obj: Path) -> dict[str, str]:
    """name -> nm type letter (T defined text, U undefined, d local data...)."""
    out = subprocess.run(
        [_nm_tool(), str(obj)], check=True, capture_output=True, text=True
    ).stdout
    syms: dict[str, str] = {}
    for line in out.splitlines():
        parts = line.split()
        if len(parts) == 3:
            syms[parts[2]] = parts[1]
        elif len(parts) == 2:
            syms[parts[1]] = parts[0]
    return syms


def _export_syms() -> set[str]:
    """EXPORT_SYMS of kmod/freebsd/kupdev/Makefile (bsd.kmod.mk syntax)."""
    text = (REPO / "kmod/freebsd/kupdev/Makefile").read_text()
    m = re.search(r"^EXPORT_SYMS=((?:[^\n]*\\\n)*[^\n]*)$", text, re.M)
    assert m is not None, "kupdev/Makefile has no EXPORT_SYMS"
    return set(m.group(1).replace("\\\n", " ").split())


def _declared_functions(header: Path) -> set[str]:
    """Names of the functions a header declares (prototypes at file scope)."""
    text = re.sub(r"/\*.*?\*/", " ", header.read_text(), flags=re.S)
    # preprocessor lines, with their continuations (a function-like macro
    # such as kup_log_limited is not a function the module links against)
    text = re.sub(r"^\s*#(?:[^\n]*\\\n)*[^\n]*$", " ", text, flags=re.M)
    names = set()
    for m in re.finditer(r"\b([A-Za-z_]\w*)\s*\([^;{}]*\)\s*(?:__attribute__\s*\(\(.*?\)\))?\s*;",
                         text):
        names.add(m.group(1))
    return names


def _readelf(obj: Path, *flags: str) -> str:
    readelf = shutil.which("readelf") or shutil.which("llvm-readelf")
    assert readelf is not None, "readelf is needed to inspect the objects"
    return subprocess.run(
        [readelf, "-W", *flags, str(obj)], check=True, capture_output=True, text=True
    ).stdout


def _functions_in_table(obj: Path, table: str) -> dict[int, str]:
    """Offset within the data object `table` -> name of the function whose
    address is stored there, read from the object's relocations (a struct
    of function pointers: a cdevsw, an ops table).  Static functions are
    referenced as "<section> + <offset>", so offsets are mapped back to the
    FUNC symbols of that section."""
    sections: dict[int, str] = {}
    for m in re.finditer(r"^\s*\[\s*(\d+)\]\s+(\S+)", _readelf(obj, "-S"), re.M):
        sections[int(m.group(1))] = m.group(2)
    funcs: dict[tuple[str, int], str] = {}
    where: tuple[str, int, int] | None = None
    for line in _readelf(obj, "-s").splitlines():
        parts = line.split()
        if len(parts) != 8 or not parts[0].endswith(":") or not parts[6].isdigit():
            continue
        value, size, kind = int(parts[1], 16), int(parts[2]), parts[3]
        ndx, name = int(parts[6]), parts[7]
        if kind == "FUNC":
            funcs[(sections[ndx], value)] = name
        elif kind == "OBJECT" and name == table:
            where = (sections[ndx], value, size)
    assert where is not None, f"{obj.name} defines no object {table}"
    sec, start, size = where
    table_funcs: dict[int, str] = {}
    current: str | None = None
    for line in _readelf(obj, "-r").splitlines():
        head = re.match(r"Relocation section '\.rela(\S+)'", line)
        if head is not None:
            current = head.group(1)
            continue
        parts = line.split()
        if current != sec or len(parts) != 7 or parts[5] != "+":
            continue
        offset, target, addend = int(parts[0], 16), parts[4], int(parts[6], 16)
        if not start <= offset < start + size:
            continue
        if (target, addend) in funcs:
            table_funcs[offset - start] = funcs[(target, addend)]
        elif addend == 0:
            table_funcs[offset - start] = target
    return table_funcs


@pytest.fixture(scope="module")
def objdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Run `make kmod-freebsd-check`, keeping the objects for inspection."""
    out = tmp_path_factory.mktemp("freebsd-objs")
    env = dict(os.environ)
    env.setdefault("ZIG_GLOBAL_CACHE_DIR", str(REPO / ".stamp" / "zig-cache"))
    proc = subprocess.run(
        ["nice", "make", "-s", "kmod-freebsd-check", f"FREEBSD_CHECK_OUT={out}"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=CHECK_TIMEOUT,
    )
    assert proc.returncode == 0, (
        f"make kmod-freebsd-check failed (rc {proc.returncode}):\n"
        f"{proc.stdout}\n{proc.stderr}"
    )
    assert "compilations and links passed" in proc.stdout, proc.stdout
    for arch in ARCHS:
        for src in KERNEL_SOURCES:
            assert f"ok    {arch} kernel {src}" in proc.stdout, proc.stdout
        for src in ("kmod/examples/echo/echo.c", "kmod/freebsd/kup_client_mod.c"):
            assert f"ok    {arch} kernel {src} (rot13)" in proc.stdout, proc.stdout
        for src in ("kmod/examples/tally/tally.c", "kmod/freebsd/kup_client_mod.c"):
            assert f"ok    {arch} kernel {src} (tally)" in proc.stdout, proc.stdout
        for mod in ("kupdev", "kup_echo", "kup_rot13", "kup_tally"):
            assert f"ok    {arch} {mod}.ko (ld -r)" in proc.stdout, proc.stdout
        for src in USER_SOURCES:
            assert f"ok    {arch} user {src}" in proc.stdout, proc.stdout
    return out


def _obj(objdir: Path, arch: str, kind: str, src: str) -> Path:
    path = objdir / f"{arch}-{kind}-{Path(src).stem}.o"
    assert path.is_file(), f"missing object {path.name}"
    return path


@pytest.mark.parametrize("arch", ARCHS)
def test_objects_are_elf_for_the_architecture(objdir: Path, arch: str) -> None:
    machine = {"x86_64": "X86-64", "aarch64": "AArch64"}[arch]
    readelf = shutil.which("readelf") or shutil.which("llvm-readelf")
    assert readelf is not None, "readelf is needed to inspect the objects"
    for kind, sources in (("kern", KERNEL_SOURCES), ("user", USER_SOURCES)):
        for src in sources:
            hdr = subprocess.run(
                [readelf, "-h", str(_obj(objdir, arch, kind, src))],
                check=True, capture_output=True, text=True,
            ).stdout
            assert "REL (Relocatable file)" in hdr, hdr
            assert machine in hdr, f"{src} for {arch}: {hdr}"


def test_export_list_is_exactly_the_kernel_api() -> None:
    """kupdev.ko exports what kupdev.h and kup_module.h declare for modules
    (minus the entry points a module itself defines), nothing else."""
    api = _declared_functions(REPO / "kmod/include/kupdev.h")
    api |= _declared_functions(REPO / "kmod/include/kup_module.h")
    api -= {"kup_module_init", "kup_module_fini"}
    assert "kupdev_create" in api and "kup_os_thread_start" in api, api
    assert _export_syms() == api


@pytest.mark.parametrize("arch", ARCHS)
def test_kupdev_defines_every_export_and_its_module(objdir: Path, arch: str) -> None:
    # kupdev.kld: glue + core after bsd.kmod.mk's first link step (ld -r)
    kld = objdir / f"{arch}-kupdev.kld"
    assert kld.is_file(), "kmod-freebsd-check did not link kupdev"
    syms = _symbols(kld)
    defined = {n for n, t in syms.items() if t == "T"}
    missing = _export_syms() - defined
    assert not missing, f"exported but not defined in kupdev.ko: {sorted(missing)}"
    # every kup_os.h hook the core calls is provided by the glue
    unresolved = sorted(n for n, t in syms.items() if t == "U" and n.startswith("kup"))
    assert not unresolved, f"kupdev.ko leaves these to the kernel: {unresolved}"
    # MODULE_VERSION(kupdev, 1) and DECLARE_MODULE(kupdev, ...)
    assert "_kupdev_version" in syms
    assert "kupdevmodule_sys_init" in syms


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize(
    ("module", "kind", "src"),
    [
        ("kup_echo", "kern", "kmod/examples/echo/echo.c"),
        ("kup_rot13", "kern-rot13", "kmod/examples/echo/echo.c"),
        ("kup_tally", "kern-tally", "kmod/examples/tally/tally.c"),
    ],
)
def test_client_module_depends_on_kupdev_and_uses_only_its_api(
    objdir: Path, arch: str, module: str, kind: str, src: str
) -> None:
    echo = _symbols(_obj(objdir, arch, kind, src))
    wrap = _symbols(_obj(objdir, arch, kind, "kmod/freebsd/kup_client_mod.c"))
    assert echo.get("kup_module_init") == "T"
    assert echo.get("kup_module_fini") == "T"
    # MODULE_DEPEND(<module>, kupdev, 1, 1, 1) and MODULE_VERSION(<module>, 1)
    assert f"_{module}_depend_on_kupdev" in wrap, sorted(wrap)
    assert f"_{module}_version" in wrap
    assert f"{module}module_sys_init" in wrap
    kld = objdir / f"{arch}-{module}.kld"
    assert kld.is_file(), f"kmod-freebsd-check did not link {module}"
    used = {n for n, t in _symbols(kld).items() if t == "U" and n.startswith("kup")}
    assert used, "the module calls no kupdev API?"
    assert not used - _export_syms(), sorted(used - _export_syms())


def test_check_fails_on_a_warning(tmp_path: Path) -> None:
    """The check is only worth something if a warning fails it: compile a
    deliberately sloppy kernel file with the script's own compiler setup."""
    bad = tmp_path / "bad.c"
    bad.write_text("#include <sys/param.h>\nint kup_bad(int x) { int unused; return x; }\n")
    env = dict(os.environ, KUP_FREEBSD_CHECK_EXTRA=str(bad), ARCHS="x86_64")
    env.setdefault("ZIG_GLOBAL_CACHE_DIR", str(REPO / ".stamp" / "zig-cache"))
    proc = subprocess.run(
        ["nice", "bash", "scripts/freebsd-check.sh"], cwd=REPO, env=env,
        capture_output=True, text=True, timeout=CHECK_TIMEOUT,
    )
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert f"FAIL  x86_64 kernel {bad}" in proc.stderr
    # -Wmissing-prototypes and -Wunused-variable are both errors here
    assert "-Werror" in proc.stderr


def test_readme_module_passes_the_documented_check(tmp_path: Path) -> None:
    """README's whole module (mymod.c), compile-checked for FreeBSD as
    docs/freebsd.md tells a module author to: KUP_FREEBSD_CHECK_EXTRA."""
    mod = tmp_path / "mymod.c"
    mod.write_text(doc_block("README.md", "c", "int kup_module_init(void)"))
    env = dict(os.environ, KUP_FREEBSD_CHECK_EXTRA=str(mod))
    env.setdefault("ZIG_GLOBAL_CACHE_DIR", str(REPO / ".stamp" / "zig-cache"))
    proc = subprocess.run(
        ["nice", "bash", "scripts/freebsd-check.sh"], cwd=REPO, env=env,
        capture_output=True, text=True, timeout=CHECK_TIMEOUT,
    )  # fmt: skip
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out
    for arch in ("x86_64", "aarch64"):
        assert f"ok    {arch} kernel {mod}" in out, out


@pytest.mark.parametrize("arch", ARCHS)
def test_kupdev_cdevsw_makes_the_fd_an_event_counter(objdir: Path, arch: str) -> None:
    """kup_ioctl.h: the channel fd is eventfd-like -- read(2) consumes the
    pending wake-up, write(2) is libkup's self-wake, poll/kqueue report it.
    The cdevsw must route all of them to the glue (a missing d_read would be
    ENODEV from devfs, and libkup's drain would silently never drain)."""
    table = _functions_in_table(_obj(objdir, arch, "kern", "kmod/freebsd/kup_freebsd.c"),
                                "kup_fb_cdevsw")
    wired = set(table.values())
    for fn in ("kup_fb_open", "kup_fb_read", "kup_fb_write", "kup_fb_ioctl",
               "kup_fb_poll", "kup_fb_kqfilter", "kup_fb_mmap_single"):
        assert fn in wired, f"{fn} is not in kup_fb_cdevsw ({arch}): {table}"
    # struct cdevsw: d_version, d_flags, d_name, d_open, d_fdopen, d_close,
    # d_read, d_write (pointers are 8 bytes on both architectures)
    assert table.get(0x28) == "kup_fb_read", table
    assert table.get(0x30) == "kup_fb_write", table


@pytest.mark.parametrize("arch", ARCHS)
def test_freebsd_backend_drains_and_self_wakes(objdir: Path, arch: str) -> None:
    """libkup's FreeBSD backend fills the optional self_wake hook (kup.c
    kicks the fd with it when poll mode starts while the turn is already
    ours), and drain/self_wake really talk to the fd with read/write."""
    obj = _obj(objdir, arch, "user", "kmod/libkup/backend_kdev.c")
    table = set(_functions_in_table(obj, "kup_backend_freebsd").values())
    assert {"kd_drain", "kd_self_wake", "kd_wake", "kd_attach"} <= table, table
    syms = _symbols(obj)
    assert syms.get("read") == "U" and syms.get("write") == "U", sorted(syms)

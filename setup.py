"""Build of kupd's C extension ``kupd._kupchan`` and of the generated gRPC stubs.

Project metadata lives in pyproject.toml; this file only adds the extension
and the step that generates ``kupapi.kup.v1`` (scripts/gen_proto.py, the same
generator ``make proto`` runs): the stubs are not in git, and a ``pip
install .`` or wheel without them gives a kupd that cannot start.
libkup's sources (kmod/libkup, chosen as kmod/Makefile does) are compiled
into the extension -- see the comment at the top of kupd/_kupchan.c for why
they are not linked from kmod/out/libkup.a.  ``make python`` runs ``setup.py build_ext --inplace``;
``pip install -e .`` builds the same extension.
"""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path
from typing import Any

from setuptools import Extension, setup
from setuptools.command.build_py import build_py

ROOT = Path(__file__).resolve().parent
LIBKUP = ROOT / "kmod" / "libkup"


def _rel(p: Path) -> str:
    return str(p.relative_to(ROOT))


def _gen_proto() -> Any:
    spec = importlib.util.spec_from_file_location("gen_proto", ROOT / "scripts" / "gen_proto.py")
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


#: the generated packages: not there when pyproject.toml's package search ran
#: on a fresh checkout, so build_py adds them once generated
STUB_PACKAGES = ("kupapi.kup", "kupapi.kup.v1")


class BuildPyWithStubs(build_py):
    """build_py that first generates kupapi.kup.v1 from protos/ (grpcio-tools
    is a build requirement in pyproject.toml; the .pyi stubs are made when
    mypy-protobuf is there too)."""

    def run(self) -> None:
        _gen_proto().generate(mypy="auto")
        for pkg in STUB_PACKAGES:
            if pkg not in (self.packages or []):
                self.packages = [*(self.packages or []), pkg]  # dir: kupapi's
        # data files are computed lazily from self.packages: forget any
        # computed before the generated packages were added
        self.__dict__.pop("data_files", None)
        super().run()



def _libkup_sources() -> tuple[list[Path], list[tuple[str, str | None]]]:
    """The same selection as kmod/Makefile: the protocol and the kupsim
    backend always, the OS backend of this system when its source exists
    (KUP_OS_BACKEND=none leaves it out)."""
    srcs = [LIBKUP / "kup.c", LIBKUP / "backend_sim.c"]
    defs: list[tuple[str, str | None]] = []
    # one source for both kernel hosts (/dev/kup/<name>, kup_ioctl.h)
    os_backend = {"linux": ("backend_kdev.c", "KUP_HAVE_BACKEND_LINUX"),
                  "freebsd": ("backend_kdev.c", "KUP_HAVE_BACKEND_FREEBSD")}
    plat = "freebsd" if sys.platform.startswith("freebsd") else sys.platform
    if plat in os_backend and os.environ.get("KUP_OS_BACKEND", "auto") != "none":
        name, define = os_backend[plat]
        if (LIBKUP / name).is_file():
            srcs.append(LIBKUP / name)
            defs.append((define, None))
    return [p for p in srcs if p.is_file()], defs


libkup_sources, libkup_defines = _libkup_sources()

kupchan = Extension(
    "kupd._kupchan",
    sources=["kupd/_kupchan.c", *(_rel(p) for p in libkup_sources)],
    include_dirs=[
        _rel(ROOT / "kmod" / "include"),
        _rel(LIBKUP),
        _rel(ROOT / "kmod" / "core"),
        _rel(ROOT / "kmod" / "kupsim"),  # kupsim_proto.h: the sim backend's wire protocol
    ],
    depends=[
        *(_rel(p) for p in sorted((ROOT / "kmod" / "include").glob("*.h"))),
        *(_rel(p) for p in sorted(LIBKUP.glob("*.h"))),
        *(_rel(p) for p in sorted((ROOT / "kmod" / "kupsim").glob("*.h"))),
    ],
    define_macros=libkup_defines,
    extra_compile_args=["-std=gnu11", "-Wall", "-Wextra", "-Werror", "-fvisibility=hidden"],
    libraries=["pthread"],
)

cmdclass = {"build_py": BuildPyWithStubs}

#: KUPD_CLIENT_ONLY=1: leave the C extension out -- an install for client
#: programs (kupclient, kupctl, the stubs kupapi and the pure-Python kupd
#: modules kupclient imports) on a machine without a C compiler; kupd itself
#: cannot run from it (kupd._kupchan is missing), and all of kupd's
#: dependencies come with it: clients/python/pyproject.toml builds the
#: client-only distribution "kupclient", with the client's alone.
#: docs/gateway.md.
CLIENT_ONLY = os.environ.get("KUPD_CLIENT_ONLY", "") not in ("", "0")

if CLIENT_ONLY:
    setup(cmdclass=cmdclass)
elif libkup_sources:
    setup(ext_modules=[kupchan], cmdclass=cmdclass)
else:
    # Only while the native tree is being written: metadata-only installs
    # (pip install -e .) keep working; importing kupd.channel then fails
    # with ModuleNotFoundError for kupd._kupchan.
    print(f"setup.py: WARNING: no libkup sources in {LIBKUP}: kupd._kupchan not built",
          file=sys.stderr)
    setup(cmdclass=cmdclass)

"""Build of kupd's C extension ``kupd._kupchan``.

Project metadata lives in pyproject.toml; this file only adds the extension.
The distribution holds the package kupd alone: the gRPC stubs and the rest
of the API (kupapi) and the client come with the kupclient distribution
(clients/python, which generates the stubs as it is built), which kupd
requires.
libkup's sources (kmod/libkup, chosen as kmod/Makefile does) are compiled
into the extension -- see the comment at the top of kupd/_kupchan.c for why
they are not linked from kmod/out/libkup.a.  ``make python`` runs ``setup.py build_ext --inplace``;
``pip install -e .`` builds the same extension.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from setuptools import Extension, setup

ROOT = Path(__file__).resolve().parent
LIBKUP = ROOT / "kmod" / "libkup"


def _rel(p: Path) -> str:
    return str(p.relative_to(ROOT))


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

if libkup_sources:
    setup(ext_modules=[kupchan])
else:
    # Only while the native tree is being written: metadata-only installs
    # (pip install -e .) keep working; importing kupd.channel then fails
    # with ModuleNotFoundError for kupd._kupchan.
    print(f"setup.py: WARNING: no libkup sources in {LIBKUP}: kupd._kupchan not built",
          file=sys.stderr)
    setup()

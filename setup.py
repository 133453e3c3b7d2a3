"""Build of kupd's C extension ``kupd._kupchan``.

Project metadata lives in pyproject.toml; this file only adds the extension.
libkup's sources (kmod/libkup/*.c) are compiled into the extension -- see the
comment at the top of kupd/_kupchan.c for why they are not linked from
kmod/out/libkup.a.  ``make python`` runs ``setup.py build_ext --inplace``;
``pip install -e .`` builds the same extension.
"""

from __future__ import annotations

import sys
from pathlib import Path

from setuptools import Extension, setup

ROOT = Path(__file__).resolve().parent
LIBKUP = ROOT / "kmod" / "libkup"


def _rel(p: Path) -> str:
    return str(p.relative_to(ROOT))


libkup_sources = sorted(LIBKUP.glob("*.c"))

kupchan = Extension(
    "kupd._kupchan",
    sources=["kupd/_kupchan.c", *(_rel(p) for p in libkup_sources)],
    include_dirs=[
        _rel(ROOT / "kmod" / "include"),
        _rel(LIBKUP),
        _rel(ROOT / "kmod" / "kupsim"),  # kupsim_proto.h: the sim backend's wire protocol
    ],
    depends=[
        *(_rel(p) for p in sorted((ROOT / "kmod" / "include").glob("*.h"))),
        *(_rel(p) for p in sorted(LIBKUP.glob("*.h"))),
        *(_rel(p) for p in sorted((ROOT / "kmod" / "kupsim").glob("*.h"))),
    ],
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

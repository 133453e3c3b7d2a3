"""Build of the ``kupclient`` distribution (metadata: pyproject.toml here).

It holds kupclient (the client and kupctl) and kupapi, the API kupd and its
clients share (the error taxonomy, the ABI constants, the wire codec, the
defaults, and the gRPC stubs ``kupapi.kup.v1``); the kupd distribution
holds kupd alone and requires this one.

The stubs are not in git: the build generates them from protos/ with
scripts/gen_proto.py (the generator ``make proto`` runs) when this directory
is a kupd checkout's clients/python.  An sdist made here carries them, so
that a wheel built from the sdist alone is the same.
"""

from __future__ import annotations

import importlib.util
import re
import shutil
from pathlib import Path
from typing import Any

from setuptools import setup
from setuptools.command.build_py import build_py
from setuptools.command.sdist import sdist

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent.parent  # a kupd checkout, when this is one's clients/python

#: the generated packages: not there when the package list was read on a
#: fresh checkout, so build_py adds them once generated
STUB_PACKAGES = ("kupapi.kup", "kupapi.kup.v1")


def _in_checkout() -> bool:
    return (ROOT / "scripts" / "gen_proto.py").is_file() and (
        ROOT / "protos" / "kup" / "v1" / "kup.proto"
    ).is_file()


def _generate_stubs() -> None:
    """kupapi.kup.v1 from protos/ (in a checkout; an sdist has them)."""
    if not _in_checkout():
        if not (HERE / "kupapi" / "kup" / "v1" / "kup_pb2.py").is_file():
            raise RuntimeError(
                f"{HERE}: no kupapi/kup/v1 stubs and no protos/ to make them: build "
                "kupclient from a kupd checkout (pip install ./clients/python) or its sdist"
            )
        return
    spec = importlib.util.spec_from_file_location("gen_proto", ROOT / "scripts" / "gen_proto.py")
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    mod.generate(mypy="auto")


def _version() -> str:
    """kupapi's ``__version__`` (kupd's too: ``import kupd`` takes it from there)."""
    text = (HERE / "kupapi" / "__init__.py").read_text()
    m = re.search(r'^__version__ = "([^"]+)"', text, re.M)
    if m is None:
        raise RuntimeError(f"{HERE}/kupapi/__init__.py: no __version__")
    return m.group(1)


class BuildPy(build_py):
    """build_py that generates the stubs first."""

    def run(self) -> None:
        _generate_stubs()
        for pkg in STUB_PACKAGES:
            if pkg not in (self.packages or []):
                self.packages = [*(self.packages or []), pkg]
        # data files are computed lazily from self.packages: forget any
        # computed before the generated packages were added
        self.__dict__.pop("data_files", None)
        super().run()


class Sdist(sdist):
    """An sdist that builds without the kupd tree: the stubs in it."""

    def run(self) -> None:
        _generate_stubs()
        super().run()

    def make_release_tree(self, base_dir: str, files: Any) -> None:
        super().make_release_tree(base_dir, files)
        stubs = HERE / "kupapi" / "kup"
        shutil.copytree(stubs, Path(base_dir) / "kupapi" / "kup", dirs_exist_ok=True,
                        ignore=shutil.ignore_patterns("__pycache__"))


setup(version=_version(), cmdclass={"build_py": BuildPy, "sdist": Sdist})

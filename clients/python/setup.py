"""Build of the ``kupclient`` distribution (metadata: pyproject.toml here).

Two things are not in this directory as git has it, and the build adds
them: the gRPC stubs ``kupapi.kup.v1`` (generated from protos/ by
scripts/gen_proto.py, the generator ``make proto`` and kupd's own setup.py
run), and the pure-Python kupd modules kupclient imports (:data:`SHARED`,
copied from the kupd tree: kupclient raises kupd.errors' own classes, so
that ``except kupd.errors.NotYourTurn`` works in either installation).

From a kupd checkout both come from the tree around this directory.  An
sdist made here carries them (the stubs generated, the modules copied into
``_kupd/``), so that a wheel built from the sdist alone is the same.
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

#: kupd's modules the client imports (and kupd/__init__.py, which imports
#: nothing); none imports anything beyond the standard library, grpc and
#: kupapi (tests/packaging checks the installed client against that)
SHARED = ("__init__.py", "abi.py", "config.py", "errors.py", "py.typed", "wire.py")

#: where an sdist keeps its copies of SHARED
VENDORED = HERE / "_kupd"

#: the generated packages: not there when the package list was read on a
#: fresh checkout, so build_py adds them once generated
STUB_PACKAGES = ("kupapi.kup", "kupapi.kup.v1")


def _in_checkout() -> bool:
    return (ROOT / "scripts" / "gen_proto.py").is_file() and (ROOT / "kupd" / "errors.py").is_file()


def _shared_dir() -> Path:
    if _in_checkout():
        return ROOT / "kupd"
    if VENDORED.is_dir():
        return VENDORED
    raise RuntimeError(
        f"{HERE}: neither in a kupd checkout ({ROOT}/kupd) nor an sdist with _kupd/: "
        "build kupclient from a kupd checkout (pip install ./clients/python)"
    )


def _generate_stubs() -> None:
    """kupapi.kup.v1 from protos/ (in a checkout; an sdist has them)."""
    if not _in_checkout():
        if not (HERE / "kupapi" / "kup" / "v1" / "kup_pb2.py").is_file():
            raise RuntimeError(f"{HERE}: no kupapi/kup/v1 stubs and no protos/ to make them")
        return
    spec = importlib.util.spec_from_file_location("gen_proto", ROOT / "scripts" / "gen_proto.py")
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    mod.generate(mypy="auto")


def _version() -> str:
    text = (_shared_dir() / "__init__.py").read_text()
    m = re.search(r'^__version__ = "([^"]+)"', text, re.M)
    if m is None:
        raise RuntimeError("kupd/__init__.py: no __version__")
    return m.group(1)


class BuildPy(build_py):
    """build_py that generates the stubs first and adds kupd's part."""

    def run(self) -> None:
        _generate_stubs()
        for pkg in STUB_PACKAGES:
            if pkg not in (self.packages or []):
                self.packages = [*(self.packages or []), pkg]
        # data files are computed lazily from self.packages: forget any
        # computed before the generated packages were added
        self.__dict__.pop("data_files", None)
        super().run()
        dest = Path(self.build_lib) / "kupd"
        dest.mkdir(parents=True, exist_ok=True)
        src = _shared_dir()
        for name in SHARED:
            shutil.copyfile(src / name, dest / name)


class Sdist(sdist):
    """An sdist that builds without the kupd tree: the stubs and SHARED in it."""

    def run(self) -> None:
        _generate_stubs()
        super().run()

    def make_release_tree(self, base_dir: str, files: Any) -> None:
        super().make_release_tree(base_dir, files)
        dest = Path(base_dir) / "_kupd"
        dest.mkdir(exist_ok=True)
        for name in SHARED:
            shutil.copyfile(_shared_dir() / name, dest / name)
        stubs = HERE / "kupapi" / "kup"
        shutil.copytree(stubs, Path(base_dir) / "kupapi" / "kup", dirs_exist_ok=True,
                        ignore=shutil.ignore_patterns("__pycache__"))


setup(version=_version(), cmdclass={"build_py": BuildPy, "sdist": Sdist})

"""Generate the Python gRPC stubs (and mypy stubs) for protos/kup/v1/kup.proto
into the package clients/python/kupapi/ (files ignored by git).

One generator for both ways the stubs get made: ``make proto`` / ``make
build`` (scripts/gen-proto.sh runs this with the venv's Python) and every
``pip install ./clients/python`` / wheel build of the kupclient
distribution, which ships kupapi (clients/python/setup.py's build_py runs
:func:`generate` before it copies the packages), so that an installed
kupclient, and so kupd, never lacks ``kupapi.kup.v1``.  Needs grpcio-tools
(``python -m grpc_tools.protoc``); the mypy stubs (.pyi) need
mypy-protobuf's protoc-gen-mypy on PATH or next to the interpreter --
required for development (mypy checks kupd against them), optional for an
install (the running daemon does not read them).

Plain Python, no bash or GNU sed: it runs on FreeBSD's base system too.

    python scripts/gen_proto.py [--mypy required|auto|no]
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PROTO = Path("kup/v1/kup.proto")  # relative to the proto path (ROOT/protos)
OUT = ROOT / "clients" / "python" / "kupapi"

# protoc writes absolute imports rooted at the proto path ("from kup.v1 import
# kup_pb2"); the stubs live inside the kupapi package.
_IMPORTS = (
    (re.compile(r"^from kup\.v1 import", re.M), "from kupapi.kup.v1 import"),
    (re.compile(r"^import kup\.v1\.kup_pb2", re.M), "import kupapi.kup.v1.kup_pb2"),
)


def _plugin_path() -> str:
    """PATH for protoc's plugins: the interpreter's own scripts directories
    first (a venv's bin, not activated), then the caller's PATH (pip puts
    an isolated build environment's scripts there)."""
    dirs = [os.path.dirname(sys.executable), sysconfig.get_path("scripts")]
    return os.pathsep.join([*dict.fromkeys(d for d in dirs if d), os.environ.get("PATH", "")])


def generate(mypy: str = "required", out: Path = OUT) -> list[Path]:
    """Write kup_pb2{,_grpc}.py (and their .pyi unless ``mypy`` is "no", or
    "auto" without protoc-gen-mypy) plus a copy of kup.proto into
    ``out``/kup/v1; the files written.  RuntimeError if protoc fails or a
    required tool is missing."""
    path = _plugin_path()
    have_mypy = shutil.which("protoc-gen-mypy", path=path) is not None
    if mypy == "required" and not have_mypy:
        raise RuntimeError(
            "protoc-gen-mypy not found (pip install mypy-protobuf): needed for the .pyi stubs"
        )
    use_mypy = mypy != "no" and have_mypy
    if mypy == "auto" and not have_mypy:
        print("gen_proto: protoc-gen-mypy not found: no .pyi stubs (mypy-protobuf)",
              file=sys.stderr)
    pkg = out / "kup" / "v1"
    pkg.mkdir(parents=True, exist_ok=True)
    argv = [
        sys.executable, "-m", "grpc_tools.protoc",
        f"-I{ROOT / 'protos'}",
        f"--python_out={out}",
        f"--grpc_python_out={out}",
    ]  # fmt: skip
    if use_mypy:
        argv += [f"--mypy_out={out}", f"--mypy_grpc_out={out}"]
    argv.append(str(ROOT / "protos" / PROTO))
    try:
        res = subprocess.run(argv, env={**os.environ, "PATH": path}, check=False)
    except OSError as exc:
        raise RuntimeError(f"cannot run {sys.executable} -m grpc_tools.protoc: {exc}") from None
    if res.returncode != 0:
        raise RuntimeError(
            f"grpc_tools.protoc failed (exit {res.returncode}) on {PROTO}: is grpcio-tools "
            f"installed for {sys.executable}?"
        )
    written = [pkg / "kup_pb2.py", pkg / "kup_pb2_grpc.py"]
    if use_mypy:
        written += [pkg / "kup_pb2.pyi", pkg / "kup_pb2_grpc.pyi"]
    for f in written:
        text = f.read_text()
        for pat, repl in _IMPORTS:
            text = pat.sub(repl, text)
        f.write_text(text)
    for init in (out / "kup" / "__init__.py", pkg / "__init__.py"):
        init.touch()
        written.append(init)
    # The .proto travels with the package so tools (and reflection users) can load it.
    shutil.copyfile(ROOT / "protos" / PROTO, pkg / PROTO.name)
    written.append(pkg / PROTO.name)
    return written


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--mypy", choices=("required", "auto", "no"), default="required",
                    help="the .pyi stubs (mypy-protobuf): required (default), if found, or none")
    args = ap.parse_args(argv)
    try:
        generate(args.mypy)
    except RuntimeError as exc:
        print(f"gen_proto: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The client-only distribution ``kupclient`` (clients/python/pyproject.toml).

Built from a fresh checkout (this tree's files as git sees them: no
generated stubs), offline (no build isolation, this venv's setuptools and
grpcio-tools), as a wheel and as an sdist turned into a wheel.  The wheel
declares the client's dependencies only (not structlog and the daemon's
others), holds kupclient, the generated kupapi stubs and the few pure
kupd modules the client imports -- nothing of the daemon -- and its
kupctl runs, and talks to a real kupd, from a fresh venv that sees only
those declared dependencies: no kupd installed, no structlog.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tarfile
import venv
import zipfile
from collections.abc import Iterator
from importlib.metadata import PackageNotFoundError, distribution
from pathlib import Path

import pytest
from packaging.requirements import Requirement

from kupd.testing import fresh_checkout

__all__: list[str] = []


#: What the client needs, and nothing more (clients/python/pyproject.toml).
DEPENDENCIES = {"grpcio", "grpcio-health-checking", "protobuf", "prometheus-client"}

#: kupd's modules in the client distribution (clients/python/setup.py SHARED).
KUPD_PART = {"__init__.py", "abi.py", "config.py", "errors.py", "py.typed", "wire.py"}


def _build_env() -> dict[str, str]:
    # the venv's scripts (protoc-gen-mypy) on PATH, nothing of the tree imported
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    env.pop("PYTHONPATH", None)
    return env


def _pip_wheel(what: Path, out: Path, cwd: Path) -> Path:
    res = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
         "--no-index", "-w", str(out), str(what)],
        capture_output=True, text=True, timeout=240, env=_build_env(), cwd=cwd,
    )  # fmt: skip
    assert res.returncode == 0, res.stdout + res.stderr
    (wheel,) = out.glob("kupclient-*.whl")
    return wheel


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Path, Path]]:
    """(the wheel built from a fresh checkout, the one built from its sdist)."""
    tmp = tmp_path_factory.mktemp("client-dist")
    src = tmp / "src"
    fresh_checkout(src)
    assert not (src / "clients/python/kupapi/kup").exists()  # as git has it
    wheel = _pip_wheel(src / "clients/python", tmp / "wheel", tmp)
    res = subprocess.run(
        [sys.executable, "setup.py", "-q", "sdist", "-d", str(tmp / "sdist")],
        capture_output=True, text=True, timeout=240, env=_build_env(), cwd=src / "clients/python",
    )  # fmt: skip
    assert res.returncode == 0, res.stdout + res.stderr
    (sdist,) = (tmp / "sdist").glob("kupclient-*.tar.gz")
    # the sdist alone, away from the checkout: it carries the stubs and kupd's part
    away = tmp / "away"
    with tarfile.open(sdist) as tf:
        tf.extractall(away, filter="data")
    (unpacked,) = away.iterdir()
    yield wheel, _pip_wheel(unpacked, tmp / "from-sdist", tmp)


def _names(wheel: Path) -> set[str]:
    with zipfile.ZipFile(wheel) as z:
        return {n for n in z.namelist() if ".dist-info/" not in n}


def _dist_info(wheel: Path, name: str) -> str:
    with zipfile.ZipFile(wheel) as z:
        (path,) = [n for n in z.namelist() if n.endswith(f".dist-info/{name}")]
        return z.read(path).decode()


def test_the_wheel_declares_only_the_clients_dependencies(built: tuple[Path, Path]) -> None:
    wheel, _ = built
    meta = _dist_info(wheel, "METADATA")
    assert "Name: kupclient\n" in meta
    requires = {Requirement(line.split(":", 1)[1]).name for line in meta.splitlines()
                if line.startswith("Requires-Dist:")}  # fmt: skip
    assert requires == DEPENDENCIES, requires
    # the one program: kupctl (kupd could not run from it)
    scripts = _dist_info(wheel, "entry_points.txt")
    assert "kupctl = kupclient._cli:main" in scripts and "kupd " not in scripts, scripts


def test_the_wheel_holds_the_client_the_stubs_and_no_daemon(built: tuple[Path, Path]) -> None:
    wheel, from_sdist = built
    names = _names(wheel)
    for stub in ("kup_pb2.py", "kup_pb2_grpc.py", "kup_pb2.pyi", "kup.proto"):
        assert f"kupapi/kup/v1/{stub}" in names, stub
    for mod in ("__init__.py", "client.py", "aio.py", "admin.py", "kupctl.py", "py.typed"):
        assert f"kupclient/{mod}" in names, mod
    assert {n.split("/", 1)[1] for n in names if n.startswith("kupd/")} == KUPD_PART
    assert {n.split("/", 1)[0] for n in names} == {"kupapi", "kupclient", "kupd"}
    # an sdist builds the same wheel, away from the checkout
    assert _names(from_sdist) == names


def _deps_dir(dest: Path) -> Path:
    """This venv's installs of DEPENDENCIES and what they require, and
    nothing else, linked into ``dest``: the fresh venv's only packages."""
    dest.mkdir()
    todo, seen = list(DEPENDENCIES), set()
    while todo:
        name = todo.pop()
        try:
            dist = distribution(name)
        except PackageNotFoundError:
            continue
        if dist.metadata["Name"].lower() in seen:
            continue
        seen.add(dist.metadata["Name"].lower())
        todo += [Requirement(r).name for r in dist.requires or [] if "extra ==" not in r]
        for f in dist.files or []:
            top = f.parts[0]
            if top == ".." or top.endswith((".dist-info", ".pth")) or top == "__pycache__":
                continue
            target = Path(str(dist.locate_file(top)))
            if not (dest / top).exists() and target.exists():
                (dest / top).symlink_to(target)
    return dest


@pytest.fixture(scope="module")
def installed(built: tuple[Path, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A fresh venv with the wheel and only its declared dependencies."""
    wheel, _ = built
    tmp = tmp_path_factory.mktemp("client-venv")
    env_dir = tmp / "venv"
    venv.create(env_dir, with_pip=False)
    py = env_dir / "bin" / "python"
    site = subprocess.run(
        [py, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        capture_output=True, text=True, check=True, timeout=60,
    ).stdout.strip()  # fmt: skip
    Path(site, "deps.pth").write_text(f"{_deps_dir(tmp / 'deps')}\n")
    res = subprocess.run(
        [sys.executable, "-m", "pip", "--python", str(py), "install", "-q", "--no-deps",
         "--no-index", str(wheel)],
        capture_output=True, text=True, timeout=120, env=_build_env(), cwd=tmp,
    )  # fmt: skip
    assert res.returncode == 0, res.stdout + res.stderr
    return env_dir


def _run_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "KUPD_SOCKET")}
    env["PYTHONNOUSERSITE"] = "1"
    return env


def test_the_installed_client_runs_without_kupd(installed: Path, tmp_path: Path) -> None:
    res = subprocess.run(
        [installed / "bin" / "kupctl", "--help"],
        capture_output=True, text=True, timeout=60, cwd=tmp_path, env=_run_env(),
    )  # fmt: skip
    assert res.returncode == 0 and "kupctl" in res.stdout, res.stdout + res.stderr
    probe = (
        "import importlib.util, sys\n"
        "import kupclient, kupclient.aio, kupclient.admin, kupclient.kupctl\n"
        "from kupclient.errors import NotYourTurn\n"
        "import kupd.errors\n"
        "assert NotYourTurn is kupd.errors.NotYourTurn\n"
        "from kupd.config import Config\n"
        "assert Config().socket\n"
        "for name in ('structlog', 'grpc_reflection', 'kupd.service', 'kupd._kupchan'):\n"
        "    assert importlib.util.find_spec(name) is None, name\n"
        "print(kupclient.__file__)\n"
    )
    res = subprocess.run(
        [installed / "bin" / "python", "-c", probe],
        capture_output=True, text=True, timeout=60, cwd=tmp_path, env=_run_env(),
    )  # fmt: skip
    assert res.returncode == 0, res.stdout + res.stderr
    assert res.stdout.startswith(str(installed)), res.stdout


def test_the_installed_kupctl_talks_to_kupd(installed: Path, tmp_path: Path) -> None:
    from kupd.testing import kupd, kupsim

    with kupsim("echo", check_exit=False, ready_timeout=60.0) as sim, kupd(
        sim=sim, devices=("echo:2",), start_timeout=60.0
    ) as gw:
        for argv in (["call", "echo", "hi"], ["attach", "echo", "--channel", "5"]):
            res = subprocess.run(
                [installed / "bin" / "kupctl", "--socket", gw.socket, *argv],
                capture_output=True, text=True, timeout=60, cwd=tmp_path, env=_run_env(),
            )  # fmt: skip
            assert res.returncode == 0, f"kupctl {argv}: {res.stdout}{res.stderr}"
        assert "hi" in subprocess.run(
            [installed / "bin" / "python", "-c",
             "import sys; from kupclient import Client\n"
             "with Client(sys.argv[1]) as c: print(c.call('echo', b'hi', timeout=10).data)",
             gw.socket],
            capture_output=True, text=True, timeout=60, cwd=tmp_path, env=_run_env(),
        ).stdout.lower()  # fmt: skip

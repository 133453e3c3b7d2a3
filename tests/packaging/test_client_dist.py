"""The two distributions: ``kupclient`` (clients/python/pyproject.toml) and
``kupd`` (the top-level pyproject.toml).

Built from a fresh checkout (this tree's files as git sees them: no
generated stubs), offline (no build isolation, this venv's setuptools and
grpcio-tools): kupclient as a wheel and as an sdist turned into a wheel,
kupd as a wheel (with its C extension).  The kupclient wheel declares the
client's dependencies only (not structlog and the daemon's others), holds
kupclient and kupapi (the generated stubs, the error taxonomy, the rest of
the shared API) -- nothing of the daemon -- and its kupctl runs, and talks
to a real kupd, from a fresh venv that sees only those declared
dependencies: no kupd installed, no structlog.  The kupd wheel holds kupd
alone and requires kupclient at its version; the two share no file, so
both install into one venv (where kupd's and kupclient's errors are the same
classes), and either can be uninstalled without breaking the other.
"""

from __future__ import annotations

import json
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

#: The two distributions (never taken from this venv, where they are editable).
OURS = {"kupd", "kupclient"}

#: kupapi's modules (besides the generated kup.v1): the API kupd shares.
KUPAPI = {"__init__.py", "abi.py", "defaults.py", "errors.py", "py.typed", "wire.py"}

#: The test's module fixtures build wheels (kupd's compiles its C extension).
pytestmark = pytest.mark.timeout(600)


def _build_env() -> dict[str, str]:
    # the venv's scripts (protoc-gen-mypy) on PATH, nothing of the tree imported
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    env.pop("PYTHONPATH", None)
    return env


def _pip_wheel(what: Path, out: Path, cwd: Path, dist: str = "kupclient") -> Path:
    res = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
         "--no-index", "-w", str(out), str(what)],
        capture_output=True, text=True, timeout=400, env=_build_env(), cwd=cwd,
    )  # fmt: skip
    assert res.returncode == 0, res.stdout + res.stderr
    (wheel,) = out.glob(f"{dist}-*.whl")
    return wheel


@pytest.fixture(scope="module")
def checkout(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A fresh checkout of this tree (no stubs, no built extension)."""
    src = tmp_path_factory.mktemp("checkout") / "src"
    fresh_checkout(src)
    assert not (src / "clients/python/kupapi/kup").exists()  # as git has it
    return src


@pytest.fixture(scope="module")
def built(checkout: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Path, Path]]:
    """(the wheel built from a fresh checkout, the one built from its sdist)."""
    tmp = tmp_path_factory.mktemp("client-dist")
    src = checkout
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


@pytest.fixture(scope="module")
def kupd_wheel(checkout: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """kupd's wheel, built from the same fresh checkout (it compiles the C
    extension; the checkout's kmod/ has nothing built)."""
    tmp = tmp_path_factory.mktemp("kupd-dist")
    return _pip_wheel(checkout, tmp / "wheel", tmp, dist="kupd")


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
    api = {n.split("/", 1)[1] for n in names if n.startswith("kupapi/") and n.count("/") == 1}
    assert api == KUPAPI, api
    assert {n.split("/", 1)[0] for n in names} == {"kupapi", "kupclient"}
    # an sdist builds the same wheel, away from the checkout
    assert _names(from_sdist) == names


def _requires(wheel: Path) -> list[Requirement]:
    meta = _dist_info(wheel, "METADATA")
    return [Requirement(line.split(":", 1)[1]) for line in meta.splitlines()
            if line.startswith("Requires-Dist:")]  # fmt: skip


def _version(wheel: Path) -> str:
    (line,) = [ln for ln in _dist_info(wheel, "METADATA").splitlines()
               if ln.startswith("Version:")]  # fmt: skip
    return line.split(":", 1)[1].strip()


def test_the_kupd_wheel_holds_kupd_alone_and_requires_kupclient(
    built: tuple[Path, Path], kupd_wheel: Path
) -> None:
    client, _ = built
    names = _names(kupd_wheel)
    assert {n.split("/", 1)[0] for n in names} == {"kupd"}, names
    assert any(n.startswith("kupd/_kupchan.") and n.endswith(".so") for n in names), names
    # kupapi's errors and abi re-exported; wire, the service's codec on
    # kupapi.wire's primitives
    for mod in ("errors.py", "abi.py", "wire.py"):
        assert f"kupd/{mod}" in names, mod
    # the same version, and the client at exactly that one
    version = _version(kupd_wheel)
    assert _version(client) == version
    pins = [r for r in _requires(kupd_wheel) if r.name == "kupclient"]
    assert [str(r.specifier) for r in pins] == [f"=={version}"], pins
    # kupctl is the client's program: kupd's wheel has kupd's only
    scripts = _dist_info(kupd_wheel, "entry_points.txt")
    assert "kupd = kupd.daemon:main" in scripts and "kupctl" not in scripts, scripts


def _deps_dir(dest: Path, roots: set[str] = DEPENDENCIES, metadata: bool = False) -> Path:
    """This venv's installs of ``roots`` and what they require, and nothing
    else, linked into ``dest``: the fresh venv's only packages (with their
    .dist-info when ``metadata``: pip then sees them installed)."""
    dest.mkdir()
    todo, seen = list(roots), set(OURS)
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
            if top == ".." or top.endswith(".pth") or top == "__pycache__":
                continue
            if top.endswith(".dist-info") and not metadata:
                continue
            target = Path(str(dist.locate_file(top)))
            if not (dest / top).exists() and target.exists():
                (dest / top).symlink_to(target)
    return dest


def _new_venv(tmp: Path, deps: Path) -> Path:
    """A fresh venv (no pip) whose only packages besides its own are ``deps``."""
    env_dir = tmp / "venv"
    venv.create(env_dir, with_pip=False)
    py = env_dir / "bin" / "python"
    site = subprocess.run(
        [py, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        capture_output=True, text=True, check=True, timeout=60,
    ).stdout.strip()  # fmt: skip
    Path(site, "deps.pth").write_text(f"{deps}\n")
    return env_dir


def _pip(env_dir: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """This venv's pip run on ``env_dir``'s interpreter, offline."""
    return subprocess.run(
        [sys.executable, "-m", "pip", "--python", str(env_dir / "bin" / "python"), *args],
        capture_output=True, text=True, timeout=180, env=_build_env(), cwd=env_dir.parent,
    )  # fmt: skip


@pytest.fixture(scope="module")
def installed(built: tuple[Path, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A fresh venv with the wheel and only its declared dependencies."""
    wheel, _ = built
    tmp = tmp_path_factory.mktemp("client-venv")
    env_dir = _new_venv(tmp, _deps_dir(tmp / "deps"))
    res = _pip(env_dir, "install", "-q", "--no-deps", "--no-index", str(wheel))
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
        "import kupapi.errors\n"
        "assert NotYourTurn is kupapi.errors.NotYourTurn\n"
        "from kupapi.defaults import DEFAULT_SOCKET\n"
        "assert kupclient.kupctl.default_socket() == DEFAULT_SOCKET\n"
        "for name in ('structlog', 'grpc_reflection', 'kupd'):\n"
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


def _both(tmp: Path, built: tuple[Path, Path], kupd_wheel: Path) -> Path:
    """A fresh venv with both wheels, installed as a user would: ``kupd``
    from a directory of the two wheels (kupclient comes as its requirement),
    every other dependency seen installed (this venv's, linked)."""
    wheels = tmp / "wheels"
    wheels.mkdir()
    for w in (built[0], kupd_wheel):
        (wheels / w.name).symlink_to(w)
    roots = {r.name for w in (built[0], kupd_wheel) for r in _requires(w)} - OURS
    env_dir = _new_venv(tmp, _deps_dir(tmp / "deps", roots, metadata=True))
    res = _pip(env_dir, "install", "-q", "--no-index", "--find-links", str(wheels),
               "kupd", "kupclient")  # fmt: skip
    assert res.returncode == 0, res.stdout + res.stderr
    return env_dir


@pytest.fixture(scope="module")
def both(
    built: tuple[Path, Path], kupd_wheel: Path, tmp_path_factory: pytest.TempPathFactory
) -> Path:
    return _both(tmp_path_factory.mktemp("both-venv"), built, kupd_wheel)


#: Every file each distribution owns, resolved, keyed by distribution; and
#: the ones missing on disk.
OWNED = (
    "import json\n"
    "from importlib.metadata import distribution\n"
    "out = {}\n"
    "for name in ('kupd', 'kupclient'):\n"
    "    try:\n"
    "        d = distribution(name)\n"
    "    except Exception:\n"
    "        continue\n"
    "    paths = [d.locate_file(f).resolve() for f in d.files or []]\n"
    "    out[name] = {'files': [str(p) for p in paths],\n"
    "                 'missing': [str(p) for p in paths if not p.exists()]}\n"
    "print(json.dumps(out))\n"
)


def _owned(env_dir: Path, cwd: Path) -> dict[str, dict[str, list[str]]]:
    res = subprocess.run(
        [env_dir / "bin" / "python", "-c", OWNED],
        capture_output=True, text=True, timeout=60, cwd=cwd, env=_run_env(),
    )  # fmt: skip
    assert res.returncode == 0, res.stdout + res.stderr
    owned: dict[str, dict[str, list[str]]] = json.loads(res.stdout)
    return owned


def test_both_installed_share_no_file(both: Path, tmp_path: Path) -> None:
    owned = _owned(both, tmp_path)
    assert set(owned) == OURS, owned.keys()
    shared = set(owned["kupd"]["files"]) & set(owned["kupclient"]["files"])
    assert not shared, sorted(shared)
    assert not owned["kupd"]["missing"] and not owned["kupclient"]["missing"], owned
    res = _pip(both, "check")
    assert res.returncode == 0, res.stdout + res.stderr


def test_both_installed_raise_the_same_errors(both: Path, tmp_path: Path) -> None:
    """kupd's public modules are kupapi's objects, not copies."""
    probe = (
        "import kupd, kupd.errors, kupd.abi, kupd.wire, kupd.config, kupd.server\n"
        "import kupapi, kupapi.abi, kupapi.defaults, kupapi.wire, kupclient\n"
        "import kupclient.errors\n"
        "assert kupd.errors.NotYourTurn is kupclient.errors.NotYourTurn\n"
        "assert kupd.errors.KupError is kupclient.errors.KupError\n"
        "assert kupd.errors.error_for_code is kupapi.errors.error_for_code\n"
        "assert kupd.abi.Kind is kupapi.abi.Kind\n"
        "assert kupd.wire.varint is kupapi.wire.varint\n"
        "assert kupd.__version__ == kupapi.__version__\n"
        "assert kupd.config.Config().socket == kupapi.defaults.DEFAULT_SOCKET\n"
        "for mod in (kupd.errors, kupd.abi):\n"
        "    api = getattr(kupapi, mod.__name__.split('.')[1])\n"
        "    assert mod.__all__ == api.__all__, mod\n"
        "    assert all(getattr(mod, n) is getattr(api, n) for n in mod.__all__), mod\n"
        # kupd.wire: the service's codec, on kupapi.wire's primitives (all
        # of them, the same objects)
        "assert set(kupapi.wire.__all__) <= set(kupd.wire.__all__)\n"
        "for n in kupapi.wire.__all__:\n"
        "    assert getattr(kupd.wire, n) is getattr(kupapi.wire, n), n\n"
        "print(kupd.__file__)\n"
    )
    res = subprocess.run(
        [both / "bin" / "python", "-c", probe],
        capture_output=True, text=True, timeout=60, cwd=tmp_path, env=_run_env(),
    )  # fmt: skip
    assert res.returncode == 0, res.stdout + res.stderr
    assert res.stdout.startswith(str(both)), res.stdout
    for prog in ("kupd", "kupctl"):
        res = subprocess.run(
            [both / "bin" / prog, "--help"],
            capture_output=True, text=True, timeout=60, cwd=tmp_path, env=_run_env(),
        )  # fmt: skip
        assert res.returncode == 0, f"{prog} --help: {res.stdout}{res.stderr}"


def test_importing_kupd_or_the_client_loads_no_grpc(both: Path, tmp_path: Path) -> None:
    """kupapi loads its stubs when first used: ``import kupd`` (the version),
    kupd.errors (the C extension imports it) and kupclient (kupctl sets
    gRPC's logging up before anything imports grpc) load neither grpc nor
    protobuf."""
    probe = (
        "import sys\n"
        "import kupd, kupd.errors, kupd.abi, kupapi.defaults, kupclient, kupclient.errors\n"
        "loaded = sorted(m for m in sys.modules if m.split('.')[0] in ('grpc', 'google'))\n"
        "assert not loaded, loaded\n"
        "from kupapi import kup_pb2, kup_pb2_grpc\n"
        "import kupapi\n"
        "assert kupapi.kup_pb2 is kup_pb2 and kup_pb2_grpc.KupStub and 'grpc' in sys.modules\n"
    )
    res = subprocess.run(
        [both / "bin" / "python", "-c", probe],
        capture_output=True, text=True, timeout=60, cwd=tmp_path, env=_run_env(),
    )  # fmt: skip
    assert res.returncode == 0, res.stdout + res.stderr


def test_uninstalling_kupclient_leaves_kupds_files(
    built: tuple[Path, Path], kupd_wheel: Path, tmp_path: Path
) -> None:
    """pip takes only kupclient's files away, and then reports kupd's
    requirement as broken."""
    env_dir = _both(tmp_path, built, kupd_wheel)
    res = _pip(env_dir, "uninstall", "-y", "-q", "kupclient")
    assert res.returncode == 0, res.stdout + res.stderr
    owned = _owned(env_dir, tmp_path)
    assert set(owned) == {"kupd"}, owned.keys()
    assert not owned["kupd"]["missing"], owned["kupd"]["missing"]
    res = _pip(env_dir, "check")
    assert res.returncode != 0 and "kupd" in res.stdout and "kupclient" in res.stdout, (
        res.stdout + res.stderr
    )


def test_uninstalling_kupd_leaves_a_working_client(
    built: tuple[Path, Path], kupd_wheel: Path, tmp_path: Path
) -> None:
    from kupd.testing import kupd, kupsim

    env_dir = _both(tmp_path, built, kupd_wheel)
    res = _pip(env_dir, "uninstall", "-y", "-q", "kupd")
    assert res.returncode == 0, res.stdout + res.stderr
    owned = _owned(env_dir, tmp_path)
    assert set(owned) == {"kupclient"} and not owned["kupclient"]["missing"], owned
    assert not (env_dir / "bin" / "kupd").exists()
    with kupsim("echo", check_exit=False, ready_timeout=60.0) as sim, kupd(
        sim=sim, devices=("echo:2",), start_timeout=60.0
    ) as gw:
        res = subprocess.run(
            [env_dir / "bin" / "kupctl", "--socket", gw.socket, "call", "echo", "hi"],
            capture_output=True, text=True, timeout=60, cwd=tmp_path, env=_run_env(),
        )  # fmt: skip
        assert res.returncode == 0 and "hi" in res.stdout.lower(), res.stdout + res.stderr
        res = subprocess.run(
            [env_dir / "bin" / "python", "-c",
             "import importlib.util, sys\n"
             "from kupclient import Client\n"
             "from kupclient.errors import NotFound\n"
             "assert importlib.util.find_spec('kupd') is None\n"
             "with Client(sys.argv[1]) as c:\n"
             "    print(c.call('echo', b'hi', timeout=10).data)\n"
             "    try:\n"
             "        c.call('no-such-device', b'x', timeout=10)\n"
             "    except NotFound as exc:\n"
             "        print(type(exc).__module__)\n",
             gw.socket],
            capture_output=True, text=True, timeout=60, cwd=tmp_path, env=_run_env(),
        )  # fmt: skip
        assert res.returncode == 0, res.stdout + res.stderr
        assert res.stdout.lower().splitlines() == ["b'hi'", "kupapi.errors"], res.stdout

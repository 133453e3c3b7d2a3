"""Test helpers: run a real ``kupsim`` kernel host in a private directory,
and a real ``kupd`` gateway serving it (:func:`kupd` / :func:`start_kupd`,
described further down, with :func:`wait_until` for bounded waits).

``kupsim`` (built by ``make -C kmod`` into ``kmod/out/kupsim``) is the KUP
kernel core hosted in a user process: it loads module shared objects and
publishes each device as a unix socket ``RUNDIR/<name>.sock``.  Tests and the
demo use it instead of a real kernel::

    from kupd.testing import kupsim

    with kupsim("echo") as sim:                 # kmod/out/echo.so
        with Device.open(sim.device_path("echo")) as dev:
            ...
        sim.stop()                              # optional: SIGTERM, reap, check

The context manager

* creates a fresh temporary RUNDIR (or uses the one given) and removes it
  afterwards if it created it;
* starts ``kupsim -d RUNDIR module.so ...`` with stdout and stderr captured
  to files (never pipes: a chatty host can never block on a full pipe);
* waits, with a timeout, until kupsim prints its ``kupsim: ready <devices>`` line, and fails
  with kupsim's captured output if it exits or stays silent instead;
* always stops the process on the way out (SIGTERM, then SIGKILL after a
  grace period) and reaps it, whether the body raised or not.

:class:`KupSimError` carries the captured output, so a failing test shows
why kupsim died.  Nothing here depends on pytest.
"""

from __future__ import annotations

import contextlib
import gc
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from types import FrameType
from typing import Any, Generic, TypeVar

__all__ = [
    "REPO_ROOT",
    "KupSim",
    "KupSimError",
    "Kupd",
    "KupdError",
    "all_stopped",
    "channel_when_free",
    "doc_block",
    "echo_lock_holds",
    "fresh_checkout",
    "in_background",
    "kmod_out",
    "kupd",
    "kupd_env",
    "kupsim",
    "module_path",
    "start_kupd",
    "thread_frame",
    "wait_until",
    "with_metrics_port",
]

T = TypeVar("T")

#: The source tree this module lives in (kupd/ is one level below the root).
REPO_ROOT = Path(__file__).resolve().parents[1]

_DEFAULT_READY_TIMEOUT = 20.0
_READY = "kupsim: ready"  # kupsim's stdout line once every device is published
_DEFAULT_STOP_TIMEOUT = 10.0


class KupSimError(RuntimeError):
    """kupsim could not be started, did not become ready, or exited badly."""

    def __init__(self, message: str, output: str = "") -> None:
        super().__init__(f"{message}\n--- kupsim output ---\n{output}" if output else message)
        self.output = output


def fresh_checkout(dest: Path) -> None:
    """Copy this tree's files into ``dest`` as a fresh clone has them: the
    tracked ones and new ones git does not ignore, as they are in the work
    tree (so uncommitted changes are tested), without build products or the
    virtualenv -- what a test of building or installing from a checkout
    starts from."""
    files = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=REPO_ROOT,
        capture_output=True,
        check=True,
        timeout=60,
    ).stdout.split(b"\0")
    for name in filter(None, files):
        src = REPO_ROOT / os.fsdecode(name)
        if not src.is_file():  # deleted in the work tree
            continue
        dst = dest / os.fsdecode(name)
        dst.parent.mkdir(parents=True, exist_ok=True)
        dst.write_bytes(src.read_bytes())
        dst.chmod(src.stat().st_mode & 0o777)


def doc_block(doc: str, lang: str, marker: str) -> str:
    """The one fenced ```lang block of the document ``doc`` (a path under
    the repository's root) that holds ``marker``: a sample the tests run as
    the document shows it."""
    text = (REPO_ROOT / doc).read_text()
    blocks = re.findall(rf"^```{re.escape(lang)}\n(.*?)^```", text, re.S | re.M)
    found = [b for b in blocks if marker in b]
    if len(found) != 1:
        raise AssertionError(f"{doc}: {len(found)} ```{lang} blocks hold {marker!r}, not 1")
    return str(found[0])


def kmod_out() -> Path:
    """The directory the native build puts kupsim, libkup and modules in.

    ``$KUP_KMOD_OUT`` overrides the default ``<repo>/kmod/out``.
    """
    env = os.environ.get("KUP_KMOD_OUT")
    return Path(env) if env else REPO_ROOT / "kmod" / "out"


def module_path(module: str | os.PathLike[str]) -> Path:
    """Resolve a module: a bare name ``echo`` means ``kmod/out/echo.so``;
    anything containing a ``/`` is a path; ``echo.so`` is a file of the
    current directory if there is one, else ``kmod/out/echo.so``."""
    text = os.fspath(module)
    if "/" in text:
        tried = [Path(text)]
    elif text.endswith(".so"):
        tried = [Path(text), kmod_out() / text]
    else:
        tried = [kmod_out() / f"{text}.so"]
    for path in tried:
        if path.is_file():
            return path
    where = " or ".join(str(p) for p in tried)
    hint = " (run `make -C kmod`)" if any(p.parent == kmod_out() for p in tried) else ""
    raise KupSimError(f"kupsim module {text!r} not found at {where}{hint}")


class KupSim:
    """A running kupsim process.  Made by :func:`kupsim`; not started by hand."""

    def __init__(
        self,
        proc: subprocess.Popen[bytes],
        rundir: Path,
        stdout_path: Path,
        stderr_path: Path,
        modules: Sequence[Path],
    ) -> None:
        self.proc = proc
        self.rundir = rundir
        self.modules = tuple(modules)
        self._stdout_path = stdout_path
        self._stderr_path = stderr_path
        self._stopped = False  # stop() ran (and checked the status itself)
        self._final: tuple[str, str] | None = None  # output once the log files are gone
        #: device names from kupsim's ready line
        self.devices: tuple[str, ...] = ()

    # -- facts ------------------------------------------------------------
    @property
    def pid(self) -> int:
        return self.proc.pid

    def device_path(self, name: str) -> str:
        """The socket path of device ``name``; pass it to ``Device.open``."""
        return str(self.rundir / f"{name}.sock")

    def env(self, base: Mapping[str, str] | None = None) -> dict[str, str]:
        """An environment for a child process that should find this kupsim's
        devices by bare name (libkup reads ``$KUPSIM_DIR``)."""
        env = dict(os.environ if base is None else base)
        env["KUPSIM_DIR"] = str(self.rundir)
        return env

    def stdout(self) -> str:
        """kupsim's stdout so far (kept after the context manager exits)."""
        return self._final[0] if self._final is not None else _read(self._stdout_path)

    def stderr(self) -> str:
        """kupsim's stderr so far: module log lines (kept after exit)."""
        return self._final[1] if self._final is not None else _read(self._stderr_path)

    def _freeze_output(self) -> None:
        self._final = (_read(self._stdout_path), _read(self._stderr_path))

    def output(self) -> str:
        """stdout and stderr so far, labelled, for error messages."""
        return f"[stdout]\n{self.stdout()}[stderr]\n{self.stderr()}"

    def running(self) -> bool:
        return self.proc.poll() is None

    # -- control ----------------------------------------------------------
    def signal(self, sig: int) -> None:
        """Send ``sig`` to kupsim (no-op once it has exited)."""
        if self.proc.poll() is None:
            self.proc.send_signal(sig)

    def wait(self, timeout: float = _DEFAULT_STOP_TIMEOUT) -> int:
        """Wait for kupsim to exit; :class:`KupSimError` after ``timeout``."""
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            raise KupSimError(
                f"kupsim (pid {self.pid}) still running after {timeout:.1f}s", self.output()
            ) from None

    def stop(self, timeout: float = _DEFAULT_STOP_TIMEOUT, check: bool = True) -> int:
        """Unload every module (SIGTERM) and reap kupsim.

        Returns the exit status.  With ``check`` a non-zero status (or having
        to fall back to SIGKILL) raises :class:`KupSimError` with the output.
        """
        self._stopped = True
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
                if check:
                    raise KupSimError(
                        f"kupsim (pid {self.pid}) ignored SIGTERM for {timeout:.1f}s; killed",
                        self.output(),
                    ) from None
        rc = self.proc.returncode
        if check and rc != 0:
            raise KupSimError(f"kupsim exited with status {rc}", self.output())
        return rc

    def kill(self) -> None:
        """SIGKILL and reap (cleanup path; never raises)."""
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                self.proc.kill()
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(timeout=_DEFAULT_STOP_TIMEOUT)


def _read(path: Path) -> str:
    try:
        return path.read_text(errors="replace")
    except FileNotFoundError:
        return ""


def _wait_ready(sim: KupSim, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    delay = 0.005
    while True:
        for line in sim.stdout().splitlines():
            if line.startswith(_READY):
                sim.devices = tuple(line[len(_READY):].split())
                return
        rc = sim.proc.poll()
        if rc is not None:
            raise KupSimError(f"kupsim exited with status {rc} before it was ready", sim.output())
        if time.monotonic() >= deadline:
            raise KupSimError(f"kupsim printed no ready line within {timeout:.1f}s", sim.output())
        time.sleep(delay)
        delay = min(delay * 2, 0.1)


@contextlib.contextmanager
def kupsim(
    *modules: str | os.PathLike[str],
    rundir: str | os.PathLike[str] | None = None,
    binary: str | os.PathLike[str] | None = None,
    args: Sequence[str] = (),
    env: Mapping[str, str] | None = None,
    ready_timeout: float = _DEFAULT_READY_TIMEOUT,
    stop_timeout: float = _DEFAULT_STOP_TIMEOUT,
    check_exit: bool = True,
) -> Iterator[KupSim]:
    """Run kupsim with ``modules`` loaded for the duration of the block.

    ``modules`` are names (``"echo"`` = ``kmod/out/echo.so``) or paths.
    ``rundir`` defaults to a fresh temporary directory, removed afterwards.
    ``binary`` defaults to ``kmod/out/kupsim``; ``args`` are extra options.
    On leaving the block kupsim is stopped with SIGTERM (if still running);
    with ``check_exit`` a non-zero exit status then raises
    :class:`KupSimError` (unless the block itself raised).
    """
    if not modules:
        raise KupSimError("kupsim needs at least one module")
    exe = Path(binary) if binary is not None else kmod_out() / "kupsim"
    if not exe.is_file() or not os.access(exe, os.X_OK):
        raise KupSimError(f"kupsim binary missing or not executable: {exe} (run `make -C kmod`)")
    mods = [module_path(m) for m in modules]

    owned_dir: str | None = None
    if rundir is None:
        owned_dir = tempfile.mkdtemp(prefix="kupsim-")
        run = Path(owned_dir)
    else:
        run = Path(rundir)
        run.mkdir(parents=True, exist_ok=True)
    logs = Path(tempfile.mkdtemp(prefix="kupsim-log-"))
    stdout_path, stderr_path = logs / "stdout", logs / "stderr"
    sim: KupSim | None = None
    try:
        child_env = dict(os.environ if env is None else env)
        child_env["KUPSIM_DIR"] = str(run)
        with open(stdout_path, "wb") as out, open(stderr_path, "wb") as err:
            proc = subprocess.Popen(
                [str(exe), *args, "-d", str(run), *(str(m) for m in mods)],
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=err,
                env=child_env,
                start_new_session=True,  # a ^C at the terminal is not sent to it twice
            )
        sim = KupSim(proc, run, stdout_path, stderr_path, mods)
        _wait_ready(sim, ready_timeout)
        yield sim
        # Only reached when the block did not raise.
        if sim.running():
            sim.stop(timeout=stop_timeout, check=check_exit)
        elif check_exit and not sim._stopped and sim.proc.returncode != 0:
            raise KupSimError(f"kupsim exited with status {sim.proc.returncode}", sim.output())
    finally:
        if sim is not None:
            sim.kill()
            sim._freeze_output()
        if owned_dir is not None:
            shutil.rmtree(owned_dir, ignore_errors=True)
        shutil.rmtree(logs, ignore_errors=True)


# ---------------------------------------------------------------------------
# kupd: the gateway daemon as a real subprocess
# ---------------------------------------------------------------------------
#
#     from kupd.testing import kupd, kupsim
#
#     with kupsim("echo") as sim, kupd(sim=sim, devices=("echo:2",)) as k:
#         with k.client() as c:
#             ...
#
# kupd's stdout and stderr go to one log file (never a pipe); start-up waits
# until the health check answers SERVING; the context manager stops kupd
# with SIGTERM, checks its clean exit (status 0) and always reaps it.

_KUPD_START_TIMEOUT = 60.0
_KUPD_STOP_TIMEOUT = 30.0
#: The Python client library lives outside the ``kupd`` package.
_CLIENTS = REPO_ROOT / "clients" / "python"


class KupdError(RuntimeError):
    """kupd did not start serving, exited early, or did not stop cleanly."""

    def __init__(self, message: str, log: str = "") -> None:
        super().__init__(f"{message}\n--- kupd log ---\n{log}" if log else message)
        self.log = log


def kupd_env(sim: KupSim | None = None, base: Mapping[str, str] | None = None) -> dict[str, str]:
    """An environment for a kupd (or kupctl) child run from this tree: the
    repository and the Python client are on ``PYTHONPATH``; with ``sim``,
    ``$KUPSIM_DIR`` points at its devices."""
    env = sim.env(base) if sim is not None else dict(os.environ if base is None else base)
    # a test run under a service manager: its kupd children are not the
    # service, and must not tell the manager they are (kupd.notify)
    for var in ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID"):
        env.pop(var, None)
    parts = [str(REPO_ROOT), str(_CLIENTS), env.get("PYTHONPATH", "")]
    env["PYTHONPATH"] = os.pathsep.join(p for p in parts if p)
    return env


class Kupd:
    """A running kupd subprocess.  Made by :func:`start_kupd` / :func:`kupd`."""

    def __init__(
        self,
        proc: subprocess.Popen[bytes],
        socket: str,
        log_path: Path,
        *,
        health_socket: str | None = None,
        sim: KupSim | None = None,
        metrics_url: str = "",
    ) -> None:
        self.proc = proc
        #: the (default) client socket; "" when the config names it
        self.socket = socket
        self.log_path = log_path
        #: the socket the health check is asked on (admin socket for tenants)
        self.health_socket = health_socket or socket
        self.sim = sim
        #: "http://127.0.0.1:PORT/metrics", or "" when metrics are off
        self.metrics_url = metrics_url

    @property
    def pid(self) -> int:
        return self.proc.pid

    def log(self) -> str:
        """kupd's output so far (stdout and stderr, interleaved)."""
        return _read(self.log_path)

    def client(self, **kw: Any) -> Any:
        """A ``kupclient.Client`` on :attr:`socket` (close it, or use ``with``)."""
        from kupclient import Client  # the client library is not part of kupd

        return Client(self.socket, **kw)

    def env(self) -> dict[str, str]:
        """An environment for kupctl: ``$KUPD_SOCKET`` points at this kupd."""
        env = dict(os.environ)
        env["KUPD_SOCKET"] = self.socket
        env.pop("KUPD_METRICS", None)
        return env

    def _health(self) -> str:
        from kupclient import Client

        with Client(self.health_socket) as c:
            status: str = c.health()
            return status

    def _wait_health(self, want: str | None, timeout: float) -> str:
        from kupd import errors

        deadline = time.monotonic() + timeout
        last: Exception | None = None
        status = ""
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise KupdError(f"kupd exited with {self.proc.returncode}", self.log())
            if os.path.exists(self.health_socket):
                try:
                    status = self._health()
                    if want is None or status == want:
                        return status
                except errors.KupError as exc:
                    last = exc
            time.sleep(0.05)
        what = f"{want} (last status {status or None}, {last})" if want else f"answering ({last})"
        raise KupdError(f"kupd not {what} within {timeout:.0f}s", self.log())

    def wait_up(self, timeout: float = _KUPD_START_TIMEOUT) -> str:
        """Wait until kupd answers health checks, whatever the status; return it."""
        return self._wait_health(None, timeout)

    def wait_serving(self, timeout: float = _KUPD_START_TIMEOUT) -> None:
        """Wait until kupd's health check says SERVING."""
        self._wait_health("SERVING", timeout)

    def threads(self) -> int:
        """kupd's current number of threads (Linux ``/proc``)."""
        with open(f"/proc/{self.pid}/status") as f:
            for line in f:
                if line.startswith("Threads:"):
                    return int(line.split()[1])
        raise KupdError(f"no Threads: line in /proc/{self.pid}/status")

    def terminate(self, timeout: float = _KUPD_STOP_TIMEOUT) -> int:
        """SIGTERM (if still running) and reap; the exit status.  Raises
        :class:`KupdError` (after SIGKILL) if kupd ignores SIGTERM."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise KupdError(f"kupd ignored SIGTERM for {timeout:.0f}s", self.log()) from None

    def stop(self, timeout: float = _KUPD_STOP_TIMEOUT) -> None:
        """Cleanup path: SIGTERM, then SIGKILL after ``timeout``; never raises."""
        with contextlib.suppress(KupdError):
            self.terminate(timeout)

    def kill(self) -> None:
        """SIGKILL and reap (no-op once kupd has exited)."""
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                self.proc.kill()
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(timeout=_KUPD_STOP_TIMEOUT)


def _free_loopback_port() -> int:
    import socket as _socket

    with _socket.socket(_socket.AF_INET, _socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


#: How many ports :func:`with_metrics_port` tries before it gives up.
_METRICS_PORT_TRIES = 5


def with_metrics_port(start: Callable[[int], T], tries: int = _METRICS_PORT_TRIES) -> T:
    """``start(port)`` with a free loopback port for kupd's ``metrics_port``.

    The port is free when it is chosen, but kupd binds it later: another
    process on the machine may take it in between.  kupd then refuses to
    start ("cannot serve metrics on ... (metrics_port): Address already in
    use") and ``start`` raises :class:`KupdError` with that log; this tries
    again with another port, up to ``tries`` times.  Any other failure is
    raised as it is.
    """
    for attempt in range(tries):
        try:
            return start(_free_loopback_port())
        except KupdError as exc:
            if "(metrics_port): Address already in use" not in str(exc) or attempt + 1 == tries:
                raise
    raise AssertionError("unreachable")  # the last try returned or raised


def start_kupd(
    *args: str,
    log: str | os.PathLike[str],
    socket: str | os.PathLike[str] | None = None,
    sim: KupSim | None = None,
    devices: Sequence[str] = (),
    config: str | os.PathLike[str] | None = None,
    health_socket: str | os.PathLike[str] | None = None,
    health_interval: float | None = 0.2,
    metrics: bool = False,
    command: Sequence[str] | None = None,
    env: Mapping[str, str] | None = None,
    wait: bool = True,
    start_timeout: float = _KUPD_START_TIMEOUT,
) -> Kupd:
    """Start kupd; the caller stops it (:meth:`Kupd.terminate` / :meth:`Kupd.stop`).

    ``command`` is how kupd is run (default ``python -m kupd.daemon``; pass
    the ``kupd`` console script to test that).  ``socket``, ``config``,
    ``sim`` (``--kupsim-dir``), ``devices`` (``--device NAME[:CALLS]`` each),
    ``health_interval`` and ``metrics`` (a free loopback ``--metrics-port``,
    chosen again if it is taken before kupd binds it: :func:`with_metrics_port`)
    become options; ``args`` are appended as given (a ``--metrics-port`` among
    them sets :attr:`Kupd.metrics_url` too).  The environment defaults
    to :func:`kupd_env` of ``sim``.  With ``wait`` this returns once the
    health check on ``health_socket`` (default ``socket``) says SERVING; if kupd
    exits or stays unready it is killed and :class:`KupdError` carries its log.
    """
    argv = list(command) if command is not None else [sys.executable, "-m", "kupd.daemon"]
    if config is not None:
        argv += ["--config", os.fspath(config)]
    if socket is not None:
        argv += ["--socket", os.fspath(socket)]
    if sim is not None:
        argv += ["--kupsim-dir", str(sim.rundir)]
    if health_interval is not None:
        argv += ["--health-interval", str(health_interval)]
    for d in devices:
        argv += ["--device", d]
    if metrics:
        # a port taken by someone else between choice and bind: another port
        def start(port: int) -> Kupd:
            return start_kupd(
                "--metrics-port", str(port), *args, log=log, socket=socket, sim=sim,
                devices=devices, config=config, health_socket=health_socket,
                health_interval=health_interval, command=command, env=env, wait=wait,
                start_timeout=start_timeout,
            )  # fmt: skip

        return with_metrics_port(start)
    metrics_url = ""
    for i, a in enumerate(args[:-1]):
        if a == "--metrics-port":
            metrics_url = f"http://127.0.0.1:{args[i + 1]}/metrics"
    argv += args
    sock = os.fspath(socket) if socket is not None else ""
    health = os.fspath(health_socket) if health_socket is not None else sock
    if wait and not health:
        raise KupdError("start_kupd(wait=True) needs socket= or health_socket= to ask")
    log_path = Path(log)
    with open(log_path, "wb") as out:
        proc = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            env=dict(env) if env is not None else kupd_env(sim),
            start_new_session=True,  # a ^C at the terminal is not sent to it twice
        )
    k = Kupd(proc, sock, log_path, health_socket=health, sim=sim, metrics_url=metrics_url)
    if wait:
        try:
            k.wait_serving(start_timeout)
        except BaseException:
            k.kill()
            raise
    return k


@contextlib.contextmanager
def kupd(
    *args: str,
    sim: KupSim | None = None,
    devices: Sequence[str] = (),
    socket: str | os.PathLike[str] | None = None,
    log: str | os.PathLike[str] | None = None,
    check_exit: bool = True,
    stop_timeout: float = _KUPD_STOP_TIMEOUT,
    **options: Any,
) -> Iterator[Kupd]:
    """Run kupd for the duration of the block (see :func:`start_kupd` for
    ``args`` and ``options``).

    Without ``socket`` / ``log`` they go to a fresh temporary directory,
    removed afterwards.  Leaving the block normally sends SIGTERM and, with
    ``check_exit``, raises :class:`KupdError` unless kupd exits 0 in
    ``stop_timeout``; kupd is always reaped, whether the block raised or not.
    """
    tmp = Path(tempfile.mkdtemp(prefix="kupd-"))
    sock = socket if socket is not None or options.get("config") else tmp / "kupd.sock"
    k: Kupd | None = None
    try:
        k = start_kupd(
            *args,
            log=log if log is not None else tmp / "kupd.log",
            socket=sock,
            sim=sim,
            devices=devices,
            **options,
        )
        yield k
        rc = k.terminate(stop_timeout)
        if check_exit and rc != 0:
            raise KupdError(f"kupd exited with {rc} after SIGTERM", k.log())
    finally:
        if k is not None:
            k.kill()
        shutil.rmtree(tmp, ignore_errors=True)


def all_stopped(pid: int) -> bool:
    """Whether every thread of process ``pid`` is in the stopped state (T).
    A SIGSTOP takes effect as each thread next runs (the thread that takes
    the signal first tells the others): until then a thread of the process
    may still serve a request sent after the kill() returned."""
    states = []
    for stat in Path(f"/proc/{pid}/task").glob("*/stat"):
        with contextlib.suppress(OSError):
            states.append(stat.read_text().rsplit(")", 1)[1].split()[0])
    return bool(states) and all(st == "T" for st in states)



def thread_frame(thread: threading.Thread) -> FrameType | None:
    """The frame ``thread`` runs now (None when it is not running), for a
    test that waits until a thread is inside some function.

    ``sys._current_frames()`` with the garbage collector off: CPython builds
    its answer while it holds the interpreter's list of threads, and a
    collection that starts there runs finalizers under that lock -- gRPC's
    asyncio layer, when its last object goes, joins its poller thread, which
    needs that very lock to take the GIL back: a deadlock (a CI run hung in
    test_gw_client_edges that way, inside ``_current_frames``)."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        return sys._current_frames().get(thread.ident or 0)
    finally:
        if enabled:
            gc.enable()

def wait_until(cond: Callable[[], bool], timeout: float = 20.0, what: str = "condition") -> None:
    """Poll ``cond`` until it is true; :class:`TimeoutError` naming ``what``
    after ``timeout`` seconds (a bounded wait, never a timing assertion)."""
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what} not reached within {timeout}s")
        time.sleep(0.02)


def echo_lock_holds(sim: KupSim, chan: int | None = None) -> int:
    """How many lock holds the example echo module has started so far, on
    channel ``chan`` or on any (a "!lockhold" message: echo keeps the
    channel locked until a "!lockfree" on another channel; it logs the start
    of each hold, kmod/examples/echo/echo.c).  A "!lockfree" sent before a
    hold has started does not end it, so tests wait for this count first."""
    where = "" if chan is None else f"echo: chan {chan}: "
    return sim.stderr().count(f"{where}holding the channel locked")


class Background(Generic[T]):
    """``fn()`` running in a thread (see :func:`in_background`)."""

    def __init__(self, fn: Callable[[], T]) -> None:
        self._got: list[T | BaseException] = []

        def run() -> None:
            try:
                self._got.append(fn())
            except Exception as exc:  # kept for the test to look at
                self._got.append(exc)

        self.thread = threading.Thread(target=run, daemon=True)
        self.thread.start()

    @property
    def done(self) -> bool:
        return bool(self._got)

    def outcome(self, timeout: float = 30.0) -> T | BaseException:
        """What ``fn`` returned, or the exception it raised; AssertionError
        if it is still running after ``timeout`` seconds."""
        self.thread.join(timeout)
        if self.thread.is_alive():
            raise AssertionError(f"still running after {timeout}s")
        return self._got[0]


def in_background(fn: Callable[[], T]) -> Background[T]:
    """Start ``fn()`` in a thread: for a test that does something while a
    call waits (a Call held in flight, an attach waiting for its channel),
    then looks at how it ended with :meth:`Background.outcome`."""
    return Background(fn)


def channel_when_free(dev: Any, chan_id: int, timeout: float = 20.0) -> Any:
    """``dev.channel(chan_id)`` on a :class:`kupd.channel.Device`, retried
    while the channel is Busy: its previous user's detach (a closed or dead
    holder) may still be on its way to the kernel side.  TimeoutError
    naming the channel after ``timeout`` seconds (a bounded wait)."""
    from kupd.errors import Busy

    deadline = time.monotonic() + timeout
    while True:
        try:
            return dev.channel(chan_id)
        except Busy:
            if time.monotonic() > deadline:
                raise TimeoutError(f"channel {chan_id} still busy after {timeout}s") from None
            time.sleep(0.02)

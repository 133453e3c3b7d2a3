"""Helpers for the C tests of kmod/: build a sanitizer variant of kupsim,
libkup, the modules and the C test programs (``make -C kmod asan|tsan``),
run kupsim from that variant, and check sanitizer reports.  Also kupsim's
wire protocol (kmod/kupsim/kupsim_proto.h) spoken by hand, for the tests
that talk to kupsim without libkup."""

from __future__ import annotations

import array
import contextlib
import os
import signal
import socket
import struct
import subprocess
import threading
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path

from kupd.testing import REPO_ROOT, KupSim, kupsim

__all__ = [
    "ABI",
    "ANY",
    "ATTACH_REPLY",
    "E_BUSY",
    "E_INVAL",
    "E_NOENT",
    "E_OK",
    "E_RELEASING",
    "E_SYS",
    "E_VERSION",
    "HDR",
    "INFO_SIZE",
    "KMOD",
    "OP_ATTACH",
    "OP_INFO",
    "OP_WATCH",
    "PROTO",
    "REQ",
    "SANITIZER_MARKERS",
    "VARIANTS",
    "VariantBuilds",
    "assert_clean",
    "build_variant",
    "sanitizer_env",
    "variant_kupsim",
    "wire_attach",
    "wire_connect",
    "wire_info",
    "wire_req",
    "wire_status",
]

KMOD = REPO_ROOT / "kmod"
VARIANTS = ("asan", "tsan")

#: text a sanitizer prints when it found something
SANITIZER_MARKERS = (
    "ERROR: AddressSanitizer",
    "ERROR: LeakSanitizer",
    "WARNING: ThreadSanitizer",
    "ThreadSanitizer: reported",
    "runtime error:",
)


#: Bound on one variant's build.
BUILD_TIMEOUT = 600.0


def build_variant(
    variant: str, started: Callable[[subprocess.Popen[str]], object] | None = None
) -> Path:
    """``make -C kmod <variant>``; returns the variant's output directory
    (``kmod/out/<variant>``, or ``$KUP_KMOD_OUT/<variant>`` when set).
    ``started(proc)`` sees make once it runs (in a process group of its
    own), for whoever may have to stop it."""
    if variant not in VARIANTS:
        raise ValueError(f"unknown sanitizer variant {variant!r}; expected one of {VARIANTS}")
    base = Path(os.environ.get("KUP_KMOD_OUT") or KMOD / "out").resolve()
    with subprocess.Popen(
        ["nice", "make", "-s", "-C", str(KMOD), variant, f"VARIANT_BASE={base}"],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    ) as proc:
        if started is not None:
            started(proc)
        try:
            out, err = proc.communicate(timeout=BUILD_TIMEOUT)
        except subprocess.TimeoutExpired:
            stop_group(proc)
            raise AssertionError(
                f"make -C kmod {variant}: not done in {BUILD_TIMEOUT:.0f} s"
            ) from None
    if proc.returncode != 0:
        raise AssertionError(f"make -C kmod {variant} failed:\n{out}\n{err}")
    return base / variant


def stop_group(proc: subprocess.Popen[str]) -> None:
    """SIGTERM to a build's process group (make deletes the target it was
    writing), SIGKILL to what is left after 10 s; reaps make."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(10)
    except subprocess.TimeoutExpired:
        pass
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


class VariantBuilds:
    """The session's sanitizer builds, every variant in turn (asan first, as
    the tests use them), in a thread of their own from the moment this is
    made: tests/kmod/conftest.py starts them when collection ends, so they
    run beside the tests before tests/kmod's, which mostly wait on
    deadlines, instead of in the first kmod test's setup."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._proc: subprocess.Popen[str] | None = None
        self._stopped = False
        self._done = {v: threading.Event() for v in VARIANTS}
        self._result: dict[str, Path | str] = {}
        self._thread = threading.Thread(target=self._run, name="kmod-variants", daemon=True)
        self._thread.start()

    def _started(self, proc: subprocess.Popen[str]) -> None:
        with self._lock:
            self._proc = proc
            stopped = self._stopped
        if stopped:
            stop_group(proc)

    def _run(self) -> None:
        for v in VARIANTS:
            try:
                with self._lock:
                    if self._stopped:
                        raise RuntimeError("the test session ended before it started")
                self._result[v] = build_variant(v, self._started)
            except Exception as exc:  # reported by each test that needs the build
                self._result[v] = f"building the {v} variant failed: {exc}"
            finally:
                self._done[v].set()

    def wait(self, variant: str) -> Path:
        """The variant's output directory, once built; AssertionError with
        make's output if the build failed."""
        self._done[variant].wait()
        got = self._result[variant]
        if isinstance(got, str):
            raise AssertionError(got)
        return got

    def close(self) -> None:
        """Stop what still builds (the session's end) and refuse the rest."""
        with self._lock:
            self._stopped = True
            proc = self._proc
        if proc is not None and proc.poll() is None:
            stop_group(proc)
        self._thread.join()


def sanitizer_env(base: Mapping[str, str] | None = None) -> dict[str, str]:
    """Environment that makes every sanitizer report fatal and verbose."""
    env = dict(os.environ if base is None else base)
    env["ASAN_OPTIONS"] = "detect_leaks=1:halt_on_error=1:abort_on_error=0:exitcode=86"
    env["UBSAN_OPTIONS"] = "halt_on_error=1:print_stacktrace=1:exitcode=87"
    env["TSAN_OPTIONS"] = "halt_on_error=1:second_deadlock_stack=1:exitcode=88"
    env["KUP_BACKEND"] = "sim"
    return env


def assert_clean(what: str, text: str) -> None:
    """Fail if ``text`` (a program's stderr) contains a sanitizer report."""
    for marker in SANITIZER_MARKERS:
        if marker in text:
            raise AssertionError(f"{what}: sanitizer report ({marker!r}):\n{text}")


@contextlib.contextmanager
def variant_kupsim(
    out: Path, *modules: str, env: Mapping[str, str] | None = None
) -> Iterator[KupSim]:
    """kupsim of one sanitizer build with that build's modules; on a normal
    exit of the block it is stopped with SIGTERM, must exit 0 and must not
    have printed a sanitizer report."""
    with kupsim(
        *(str(out / f"{m}.so") for m in modules),
        binary=out / "kupsim",
        env=sanitizer_env(env),
        ready_timeout=60.0,
        stop_timeout=60.0,
    ) as sim:
        yield sim
        sim.stop(timeout=60.0)
        assert_clean("kupsim", sim.stderr())


# ---- kupsim's wire protocol, by hand (kmod/kupsim/kupsim_proto.h) ---------

OP_INFO, OP_ATTACH, OP_WATCH = 1, 2, 3
PROTO = 1
ABI = 1
ANY = 0xFFFFFFFF
E_OK, E_VERSION, E_NOENT, E_INVAL, E_BUSY, E_SYS = 0, 1007, 1009, 1011, 1008, 1012
E_RELEASING = 1013
REQ = struct.Struct("<8I")
HDR = struct.Struct("<Ii")
INFO_SIZE = 8 + 32 + 4 * 6 + 4 + 4 + 8 + 1024
ATTACH_REPLY = struct.Struct("<IiIIIIQ")


def wire_req(op: int, chan: int = 0, abi: int = ABI, pages: int = 0, proto: int = PROTO) -> bytes:
    """One request packet."""
    return REQ.pack(op, proto, chan, abi, pages, 0, 0, 0)


def wire_connect(path: str) -> socket.socket:
    """A new connection to a device socket (30 s timeout on every call)."""
    s = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    s.settimeout(30)
    s.connect(path)
    return s


def wire_status(s: socket.socket, packet: bytes) -> tuple[int, int]:
    """Send packet; the reply's (op, status)."""
    s.send(packet)
    op, st = HDR.unpack_from(s.recv(4096))
    return op, st


def wire_info(s: socket.socket) -> tuple[str, bytes]:
    """INFO: the device name and its attached[] bytes."""
    s.send(wire_req(OP_INFO))
    data = s.recv(4096)
    assert len(data) == INFO_SIZE
    op, st = HDR.unpack_from(data)
    assert (op, st) == (OP_INFO, E_OK)
    name = data[8:40].split(b"\0", 1)[0].decode()
    attached = data[80 : 80 + 1024]
    return name, attached


def wire_attach(s: socket.socket, chan: int, **kw: int) -> tuple[int, list[int], bytes]:
    """ATTACH: (status, the fds that came with the reply, the reply)."""
    s.send(wire_req(OP_ATTACH, chan, **kw))
    fds = array.array("i")
    msg, anc, _flags, _addr = s.recvmsg(4096, socket.CMSG_SPACE(8 * fds.itemsize))
    for level, kind, payload in anc:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            fds.frombytes(payload[: len(payload) - (len(payload) % fds.itemsize)])
    _op, st = HDR.unpack_from(msg)
    return st, list(fds), msg

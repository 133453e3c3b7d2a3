"""``make demo``: a short, readable tour of KUP on this machine.

Steps (each a function, so later steps -- kupd and a gRPC client -- can be
added to :data:`STEPS` without touching the earlier ones):

1. start kupsim (the kernel core hosted in a process) with the echo module
   in a private temporary directory;
2. show the device as libkup reports it;
3. talk to echo from C: build ``kmod/examples/client/kup_client.c`` against
   ``kmod/out/libkup.a`` and run it;
4. talk to echo from Python through :mod:`kupd.channel`, and show its
   errors (TooBig, NotYourTurn, NotReady);
5. unload the module (SIGTERM kupsim) and show that a waiting receiver sees
   EKU_SHUTDOWN.

Run: ``.venv/bin/python -m kupd.demo`` (after ``make build``).  Exit status
0 when every step worked.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from kupd.demo_gateway import step_gateway
from kupd.errors import KupError
from kupd.testing import REPO_ROOT, KupSim, kmod_out, kupsim

__all__ = ["STEPS", "DemoContext", "main"]


@dataclass
class DemoContext:
    """What the steps share."""

    stack: contextlib.ExitStack
    workdir: Path
    sim: KupSim | None = None
    device: str = "echo"
    notes: dict[str, object] = field(default_factory=dict)

    def need_sim(self) -> KupSim:
        if self.sim is None:
            raise RuntimeError("kupsim is not running (the start step did not run)")
        return self.sim


def say(text: str = "") -> None:
    print(text, flush=True)


def heading(text: str) -> None:
    say()
    say(f"== {text}")


def _show(data: bytes) -> str:
    text = data[:40].decode("ascii", "backslashreplace")
    return repr(text) + (f"...({len(data)} bytes)" if len(data) > 40 else "")


# --- steps -------------------------------------------------------------------


def step_start_kupsim(ctx: DemoContext) -> None:
    heading("1. start kupsim with the echo module")
    ctx.sim = ctx.stack.enter_context(kupsim("echo", rundir=ctx.workdir / "run"))
    say(f"kupsim pid {ctx.sim.pid}, devices in {ctx.sim.rundir}:")
    for sock in sorted(ctx.sim.rundir.glob("*.sock")):
        say(f"  {sock.name}")


def step_device_info(ctx: DemoContext) -> None:
    from kupd.channel import Device

    heading("2. the device, as libkup sees it")
    sim = ctx.need_sim()
    with Device.open(sim.device_path(ctx.device)) as dev:
        info = dev.info()
    say(
        f"  name={info.name} abi_version={info.abi_version} channels={info.chan_count}"
        f" announced={info.announced}"
    )
    say(
        f"  page_size={info.page_size} pages/direction={info.pages} max_msg={info.max_msg}"
        f" attached={list(info.attached)}"
    )


def build_c_client(workdir: Path) -> Path:
    """Compile kup_client.c against kmod/out/libkup.a; return the binary."""
    cc = shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        raise RuntimeError("no C compiler (cc/gcc) on PATH")
    lib = kmod_out() / "libkup.a"
    if not lib.is_file():
        raise RuntimeError(f"{lib} missing: run `make -C kmod`")
    src = REPO_ROOT / "kmod" / "examples" / "client" / "kup_client.c"
    exe = workdir / "kup_client"
    cmd = [
        cc,
        "-std=gnu11",
        "-Wall",
        "-Wextra",
        "-Werror",
        "-O2",
        "-I",
        str(REPO_ROOT / "kmod" / "include"),
        "-o",
        str(exe),
        str(src),
        str(lib),
        "-lpthread",
    ]
    build = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    if build.returncode != 0:
        raise RuntimeError(f"building the C client failed:\n{' '.join(cmd)}\n{build.stderr}")
    return exe


def step_c_client(ctx: DemoContext) -> None:
    heading("3. a C program talks to echo through libkup")
    sim = ctx.need_sim()
    exe = build_c_client(ctx.workdir)
    say(f"  built {exe.name} from kmod/examples/client/kup_client.c + kmod/out/libkup.a")
    args = [str(exe), "-t", "10000", ctx.device, "hello from C", "kernel, are you there?"]
    run = subprocess.run(args, capture_output=True, text=True, timeout=60, env=sim.env())
    for line in run.stdout.splitlines():
        say(f"  {line}")
    if run.returncode != 0:
        raise RuntimeError(f"kup_client failed ({run.returncode}): {run.stderr.strip()}")


def step_python_channel(ctx: DemoContext) -> None:
    from kupd.channel import Channel, Device

    heading("4. Python talks to echo through kupd.channel")
    sim = ctx.need_sim()

    def exchange(ch: Channel, data: bytes) -> None:
        ch.send(data)
        say(f"  [chan {ch.id}] -> DATA {_show(data)}")
        reply = ch.receive(timeout=10)
        say(f"  [chan {ch.id}] <- {reply.kind.name} seq {reply.seq} {_show(reply.data)}")

    with Device.open(sim.device_path(ctx.device)) as dev, dev.channel(0) as even, \
            dev.channel(1) as odd:
        for ch in (even, odd):
            first = ch.receive(timeout=10)
            say(f"  [chan {ch.id}] attached (max_msg {ch.max_msg});"
                f" the kernel opens with {first.kind.name} seq {first.seq}")
        say("  echo answers unchanged on even channels, upper-cased on odd ones:")
        for ch in (even, odd):
            exchange(ch, b"hello from Python")
        exchange(even, bytes(range(32, 127)) * 40)  # 3800 bytes
        exchange(even, b"")
        even.pass_()
        say(f"  [chan {even.id}] -> PASS")
        reply = even.receive(timeout=10)
        say(f"  [chan {even.id}] <- {reply.kind.name} seq {reply.seq}")


def step_errors(ctx: DemoContext) -> None:
    from kupd.channel import Device

    sim = ctx.need_sim()

    def show(what: str, call: Callable[[], object]) -> None:
        try:
            result = call()
        except KupError as e:
            say(f"  {what:<28} -> {type(e).__name__} ({e.seed_name})")
        else:
            say(f"  {what:<28} -> {result!r}")

    say()
    say("  errors are kupd.errors exceptions, one class per KUP_E_* code:")
    with Device.open(sim.device_path(ctx.device)) as dev, dev.channel(0) as ch:
        ch.receive(timeout=10)
        show(f"send({ch.max_msg + 1} bytes)", lambda: ch.send(bytes(ch.max_msg + 1)))
        show("send('!hold'): kernel keeps", lambda: ch.send(b"!hold"))
        show("send('again')", lambda: ch.send(b"again"))
        show("receive(timeout=0)", lambda: ch.receive(timeout=0))
        show("try_receive()", ch.try_receive)


def step_shutdown(ctx: DemoContext) -> None:
    from kupd.channel import Device

    heading("5. unload the module while a receiver waits")
    sim = ctx.need_sim()
    outcome: list[str] = []
    raised_at: list[float] = []
    waiting = threading.Event()
    with Device.open(sim.device_path(ctx.device)) as dev, dev.channel(0) as ch:
        ch.receive(timeout=10)  # the kernel's opening hand-over

        def wait() -> None:
            try:
                ch.send(b"!hold")  # echo keeps the turn: nothing will answer
                waiting.set()
                ch.receive(timeout=30)
            except KupError as e:
                raised_at.append(time.monotonic())
                outcome.append(f"{type(e).__name__}: {e}")

        t = threading.Thread(target=wait)
        t.start()
        waiting.wait(10)
        say(f"  a thread sent '!hold' on channel {ch.id} and waits in receive();"
            " sending SIGTERM to kupsim")
        start = time.monotonic()
        sim.signal(signal.SIGTERM)
        t.join(30)
    if not outcome:
        raise RuntimeError("the waiting receive did not return within 30 s of SIGTERM")
    say(f"  -> the waiting receive raised {outcome[0]}")
    say(f"     {(raised_at[0] - start) * 1000:.1f} ms after SIGTERM")
    rc = sim.wait()
    say(f"  kupsim exited with status {rc}")
    if not outcome[0].startswith("Shutdown"):
        raise RuntimeError(f"expected Shutdown, got {outcome[0]}")
    if rc != 0:
        raise RuntimeError(f"kupsim exited with status {rc}")


STEPS: list[Callable[[DemoContext], None]] = [
    step_start_kupsim,
    step_device_info,
    step_c_client,
    step_python_channel,
    step_errors,
    step_shutdown,
    step_gateway,  # kupd + a gRPC client conversation (kupd/demo_gateway.py)
]


def main(argv: list[str] | None = None) -> int:
    del argv
    with contextlib.ExitStack() as stack:
        workdir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="kup-demo-")))
        ctx = DemoContext(stack=stack, workdir=workdir)
        for step in STEPS:
            try:
                step(ctx)
            except Exception as e:  # a demo reports, it does not traceback
                say(f"\nFAILED in {step.__name__}: {type(e).__name__}: {e}")
                if ctx.sim is not None:
                    say(ctx.sim.output())
                return 1
        say("\ndemo finished: every step worked")
    return 0


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main())

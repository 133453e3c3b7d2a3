"""The gateway step of ``make demo`` (:func:`step_gateway`, listed in
:data:`kupd.demo.STEPS`).

It starts its own kupsim with the echo module and a kupd serving it on a
unix socket in the demo's temporary directory, then has a short client
conversation through kupd -- a Session (receive, send, receive, pass,
receive) and a few Calls with the Python client, one Call with ``kupctl`` --
printing each exchange, and finally shuts both down (kupd by SIGTERM: it
drains and exits 0; then kupsim unloads the module).
"""

from __future__ import annotations

import subprocess
import sys
from typing import TYPE_CHECKING

from kupd.testing import KupdError, kupd_env, kupsim, start_kupd

if TYPE_CHECKING:
    from kupd.demo import DemoContext

__all__ = ["step_gateway"]

_START_TIMEOUT = 30.0
_STOP_TIMEOUT = 30.0


def _say(text: str = "") -> None:
    print(text, flush=True)


def _show(data: bytes) -> str:
    text = data[:40].decode("ascii", "backslashreplace")
    return repr(text) + (f"...({len(data)} bytes)" if len(data) > 40 else "")


def step_gateway(ctx: DemoContext) -> None:
    from kupclient import Client

    _say()
    _say("== 6. kupd: the gateway on a unix socket, and a client conversation over gRPC")
    workdir = ctx.workdir / "gateway"
    workdir.mkdir()
    sim = ctx.stack.enter_context(kupsim("echo", rundir=workdir / "run"))
    ctx.sim = sim  # a failure report shows this kupsim's output
    _say(f"  kupsim pid {sim.pid} with echo, devices in {sim.rundir}")

    sock = str(workdir / "kupd.sock")
    k = start_kupd(
        "--pid-file",
        "-",
        socket=sock,
        log=workdir / "kupd.log",
        sim=sim,
        devices=(f"{ctx.device}:2",),
        health_interval=None,
        start_timeout=_START_TIMEOUT,
    )
    ctx.stack.callback(k.kill)  # cleanup path, if the step does not stop kupd itself
    _say(f"  kupd pid {k.pid} serving {ctx.device} on {sock} (Call pool: 2 channels)")

    with Client(sock) as client:
        (dev,) = client.devices(ctx.device)
        _say(
            f"  ListDevices: {dev.name} abi {dev.abi_version}, {dev.channel_count} channels,"
            f" max {dev.max_message_bytes} bytes/message, {dev.call_channels} in the Call pool"
        )

        _say("  Session (an exclusive lease on one channel for the stream's life):")
        with client.open(ctx.device).channel() as ch:
            _say(f"    attached channel {ch.id}, lease {ch.lease.lease_id}")
            first = ch.receive(timeout=10)
            _say(f"    <- {first.kind.name} seq {first.seq} (the kernel hands over the turn)")
            for data in (b"hello through kupd", b"second message"):
                ch.send(data)
                _say(f"    -> DATA {_show(data)}")
                reply = ch.receive(timeout=10)
                _say(f"    <- {reply.kind.name} seq {reply.seq} {_show(reply.data)}")
                if reply.data.lower() != data.lower():
                    raise RuntimeError(f"echo answered {reply.data!r} to {data!r}")
            data = b"request/reply in one request"
            reply = ch.exchange(data, timeout=10)  # send + receive, one message each way
            _say(f"    -> DATA {_show(data)}  (exchange: send + wait for the reply)")
            _say(f"    <- {reply.kind.name} seq {reply.seq} {_show(reply.data)}")
            if reply.data.lower() != data.lower():
                raise RuntimeError(f"echo answered {reply.data!r} to {data!r}")
            ch.pass_()
            _say("    -> PASS")
            back = ch.receive(timeout=10)
            _say(f"    <- {back.kind.name} seq {back.seq}")
        _say("    session closed: kupd released the channel")

        _say("  Calls (request/reply on the device's pooled channels, no lease):")
        for data in (b"ping 1", b"ping 2", b"Mixed Case 3"):
            reply = client.call(ctx.device, data, timeout=10)
            _say(f"    call {_show(data)} -> {reply.kind.name} {_show(reply.data)}")
            if reply.data.lower() != data.lower():
                raise RuntimeError(f"echo answered {reply.data!r} to {data!r}")

    kupctl = [sys.executable, "-m", "kupclient.kupctl", "--socket", sock]
    cmd = [*kupctl, "call", ctx.device, "hello from kupctl"]
    _say("  $ kupctl call echo 'hello from kupctl'")
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=60, env=kupd_env(sim))
    for line in (run.stdout + run.stderr).splitlines():
        _say(f"    {line}")
    if run.returncode != 0:
        raise RuntimeError(f"kupctl call failed with exit status {run.returncode}")

    _say("  SIGTERM to kupd: health goes NOT_SERVING, sessions end, calls drain")
    rc = k.terminate(_STOP_TIMEOUT)
    _say(f"  kupd exited with status {rc}")
    if rc != 0:
        raise KupdError(f"kupd exited with status {rc}", k.log())
    rc = sim.stop()
    _say(f"  kupsim exited with status {rc}")

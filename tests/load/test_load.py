"""Load without loss: 64 clients, each a Session and Calls, every message
sequenced and checked end to end -- zero lost, duplicated or reordered.

Messages per client: env KUPD_LOAD_MESSAGES (default 500, which `make
test` runs: 64 x 500 = 32,000 round trips); `make load-test` runs the full
64 x 10,000 = 640,000.  Each client alternates a Session round trip
(send, receive; the kernel's reply carries the per-direction sequence
number, which must advance by exactly one) and a Call; every reply must
be the request's own payload ("<client>:<n>", digits only so the echo
module's odd-channel upper-casing leaves it alone), in order."""

from __future__ import annotations

import os
import sys
import threading

from kupd.testing import REPO_ROOT, KupSim

sys.path.insert(0, str(REPO_ROOT / "tests" / "gateway"))

from gateway_helpers import Kupd, StartKupd, echo_sim

CLIENTS = 64
MESSAGES = int(os.environ.get("KUPD_LOAD_MESSAGES", "500"))


def _client(k: Kupd, i: int, n: int, problems: list[str]) -> None:
    try:
        with k.client(caller=f"load-{i}") as c, c.open("echo").channel() as ch:
            first = ch.receive(timeout=60)
            seq = first.seq
            for j in range(n):
                payload = f"{i:02d}:{j:08d}".encode()
                if j % 2 == 0:
                    ch.send(payload)
                    m = ch.receive(timeout=60)
                    if m.data != payload or m.seq != seq + 1:
                        problems.append(f"client {i} session msg {j}: {m.data!r} seq {m.seq}")
                        return
                    seq = m.seq
                else:
                    r = c.call("echo", payload, timeout=60)
                    if r.data != payload:
                        problems.append(f"client {i} call {j}: {r.data!r}")
                        return
    except Exception as exc:  # reported, not lost in a thread
        problems.append(f"client {i}: {type(exc).__name__}: {exc}")


def test_64_clients_sequenced_without_loss(start_kupd: StartKupd) -> None:
    sim: KupSim
    with echo_sim() as sim:
        k = start_kupd(sim, devices=("echo:8",))
        problems: list[str] = []
        threads = [
            threading.Thread(target=_client, args=(k, i, MESSAGES, problems))
            for i in range(CLIENTS)
        ]
        for t in threads:
            t.start()
        for t in threads:
            t.join(3600)
        assert not any(t.is_alive() for t in threads), "a client hung"
        assert not problems, problems[:10]
        with k.client() as c:
            (dev,) = c.devices("echo")
            assert all(ch.state != "session" for ch in dev.channels)  # every lease ended
        assert k.terminate() == 0

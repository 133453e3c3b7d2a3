"""Fairness across tenants: queued Calls are dispatched round-robin by
TENANT, so a tenant flooding a device (even under many caller names)
cannot push another tenant's Calls behind its whole queue.  Positions are
counted, not time."""

from __future__ import annotations

import threading

import grpc
from tenancy_helpers import StartTenants

from kupapi import kup_pb2, kup_pb2_grpc
from kupclient import Client
from kupd.testing import wait_until

CONFIG = """
[[device]]
name = "echo"
call_channels = 2

[[tenant]]
name = "flood"
socket = "@DIR@/flood.sock"
[[tenant.grant]]
device = "echo"

[[tenant]]
name = "meek"
socket = "@DIR@/meek.sock"
[[tenant.grant]]
device = "echo"
"""

FLOOD = 24
MEEK = 4
POOL = 2
#: Each meek call waits for at most one flood dispatch (round-robin), plus
#: the calls on the pool's channels when meek queued, plus slack for a flood
#: call finishing between our count and meek's submission.
BOUND = MEEK + 2 * POOL + 1


class Completions:
    """Calls submitted as gRPC futures; records each one's tag in the order
    the calls complete (and any that failed)."""

    def __init__(self) -> None:
        self.done: list[str] = []
        self.failures: list[BaseException] = []
        self._lock = threading.Lock()

    def submit(self, stub: kup_pb2_grpc.KupStub, tag: str, data: bytes, caller: str) -> None:
        f = stub.Call.future(
            kup_pb2.CallRequest(device="echo", data=data, caller=caller), timeout=120
        )
        f.add_done_callback(lambda fut: self._finished(tag, fut))

    def _finished(self, tag: str, fut: grpc.Future) -> None:
        with self._lock:
            exc = fut.exception()
            if exc is not None:
                self.failures.append(exc)
            self.done.append(tag)

    def count(self, tag: str) -> int:
        with self._lock:
            return self.done.count(tag)

    def ahead(self, big: str, small: str, before: int) -> int:
        """How many ``big`` calls completed before the last ``small`` one,
        not counting the ``before`` that had completed when ``small`` queued."""
        last_small = max(i for i, tag in enumerate(self.done) if tag == small)
        return self.done[: last_small + 1].count(big) - before


def wait_queued(fc: Client, what: str) -> None:
    """Until the flood fills the queue (all but the pool and some slack)."""
    wait_until(lambda: fc.devices("echo")[0].calls_queued >= FLOOD - POOL - 2, what=what)


def test_a_flooding_tenant_cannot_starve_another(start_tenants: StartTenants) -> None:
    k = start_tenants(CONFIG)
    calls = Completions()
    flood_ch = grpc.insecure_channel("unix:" + k.sock("flood"))
    meek_ch = grpc.insecure_channel("unix:" + k.sock("meek"))
    flood = kup_pb2_grpc.KupStub(flood_ch)
    meek = kup_pb2_grpc.KupStub(meek_ch)
    try:
        for i in range(FLOOD):
            # A new caller name per call: per-caller fairness alone would
            # give the flooding tenant FLOOD turns for meek's one.
            calls.submit(flood, "flood", b"!delay", caller=f"f{i}")
        with k.client("flood") as fc:
            wait_queued(fc, "the flood queued")
        before = calls.count("flood")
        for i in range(MEEK):
            calls.submit(meek, "meek", f"meek {i}".encode(), caller="m")
        wait_until(lambda: len(calls.done) == FLOOD + MEEK, timeout=120, what="every call answered")
    finally:
        flood_ch.close()
        meek_ch.close()
    assert not calls.failures, calls.failures
    flood_ahead = calls.ahead("flood", "meek", before)
    # FIFO would put all of meek's calls behind >= FLOOD - POOL - 2 - before
    # flood calls.
    print(f"fairness: {flood_ahead} flood calls ahead (bound {BOUND})")
    assert flood_ahead <= BOUND, (flood_ahead, calls.done)
    assert FLOOD - POOL - 2 - before > BOUND  # the bound discriminates


def test_callers_within_a_tenant_are_served_round_robin(start_tenants: StartTenants) -> None:
    """Inside one tenant the pool still goes round-robin across callers
    (issue 3's guarantee), under the round-robin across tenants."""
    k = start_tenants(CONFIG)
    calls = Completions()
    ch = grpc.insecure_channel("unix:" + k.sock("flood"))
    stub = kup_pb2_grpc.KupStub(ch)
    try:
        for _ in range(FLOOD):
            calls.submit(stub, "big", b"!delay", caller="big")
        with k.client("flood") as fc:
            wait_queued(fc, "the big caller queued")
        before = calls.count("big")
        for i in range(MEEK):
            calls.submit(stub, "small", f"small {i}".encode(), caller="small")
        wait_until(lambda: len(calls.done) == FLOOD + MEEK, timeout=120, what="every call answered")
    finally:
        ch.close()
    assert not calls.failures, calls.failures
    big_ahead = calls.ahead("big", "small", before)
    print(f"fairness: {big_ahead} big-caller calls ahead (bound {BOUND})")
    assert big_ahead <= BOUND, (big_ahead, calls.done)
    assert FLOOD - POOL - 2 - before > BOUND

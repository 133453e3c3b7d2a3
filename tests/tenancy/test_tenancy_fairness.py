"""Fairness across tenants: queued Calls are dispatched round-robin by
TENANT, so a tenant flooding a device (even under many caller names)
cannot push another tenant's Calls behind its whole queue.  Positions are
counted, not time."""

from __future__ import annotations

import threading

import grpc
from tenancy_helpers import StartTenants

from kupapi import kup_pb2, kup_pb2_grpc
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


def test_a_flooding_tenant_cannot_starve_another(start_tenants: StartTenants) -> None:
    k = start_tenants(CONFIG)
    done: list[str] = []
    lock = threading.Lock()
    failures: list[BaseException] = []

    def finished(tag: str, fut: grpc.Future) -> None:
        with lock:
            if fut.exception() is not None:
                failures.append(fut.exception())
            done.append(tag)

    flood_ch = grpc.insecure_channel("unix:" + k.sock("flood"))
    meek_ch = grpc.insecure_channel("unix:" + k.sock("meek"))
    flood = kup_pb2_grpc.KupStub(flood_ch)
    meek = kup_pb2_grpc.KupStub(meek_ch)
    try:
        for i in range(FLOOD):
            # A new caller name per call: per-caller fairness alone would
            # give the flooding tenant FLOOD turns for meek's one.
            f = flood.Call.future(
                kup_pb2.CallRequest(device="echo", data=b"!delay", caller=f"f{i}"), timeout=120
            )
            f.add_done_callback(lambda fut: finished("flood", fut))
        with k.admin() as adm, k.client("flood") as fc:
            del adm
            wait_until(
                lambda: fc.devices("echo")[0].calls_queued >= FLOOD - POOL - 2,
                what="the flood queued",
            )
        with lock:
            before = done.count("flood")
        for i in range(MEEK):
            f = meek.Call.future(
                kup_pb2.CallRequest(device="echo", data=f"meek {i}".encode(), caller="m"),
                timeout=120,
            )
            f.add_done_callback(lambda fut: finished("meek", fut))
        wait_until(lambda: len(done) == FLOOD + MEEK, timeout=120, what="every call answered")
    finally:
        flood_ch.close()
        meek_ch.close()
    assert not failures, failures
    last_meek = max(i for i, tag in enumerate(done) if tag == "meek")
    flood_ahead = done[: last_meek + 1].count("flood") - before
    # FIFO would put all of meek's calls behind >= FLOOD - POOL - 2 - before
    # flood calls.
    print(f"fairness: {flood_ahead} flood calls ahead (bound {BOUND})")
    assert flood_ahead <= BOUND, (flood_ahead, done)
    assert FLOOD - POOL - 2 - before > BOUND  # the bound discriminates


def test_callers_within_a_tenant_are_served_round_robin(start_tenants: StartTenants) -> None:
    """Inside one tenant the pool still goes round-robin across callers
    (issue 3's guarantee), under the round-robin across tenants."""
    k = start_tenants(CONFIG)
    done: list[str] = []
    lock = threading.Lock()

    def finished(tag: str) -> None:
        with lock:
            done.append(tag)

    ch = grpc.insecure_channel("unix:" + k.sock("flood"))
    stub = kup_pb2_grpc.KupStub(ch)
    try:
        for _ in range(FLOOD):
            f = stub.Call.future(
                kup_pb2.CallRequest(device="echo", data=b"!delay", caller="big"), timeout=120
            )
            f.add_done_callback(lambda _f: finished("big"))
        with k.client("flood") as fc:
            wait_until(
                lambda: fc.devices("echo")[0].calls_queued >= FLOOD - POOL - 2,
                what="the big caller queued",
            )
        with lock:
            before = done.count("big")
        for i in range(MEEK):
            f = stub.Call.future(
                kup_pb2.CallRequest(device="echo", data=f"small {i}".encode(), caller="small"),
                timeout=120,
            )
            f.add_done_callback(lambda _f: finished("small"))
        wait_until(lambda: len(done) == FLOOD + MEEK, timeout=120, what="every call answered")
    finally:
        ch.close()
    last_small = max(i for i, tag in enumerate(done) if tag == "small")
    big_ahead = done[: last_small + 1].count("big") - before
    print(f"fairness: {big_ahead} big-caller calls ahead (bound {BOUND})")
    assert big_ahead <= BOUND, (big_ahead, done)
    assert FLOOD - POOL - 2 - before > BOUND

"""Multiplexing: many concurrent Calls over a small pool, fairness across
callers, and a thousand idle sessions held open while calls still succeed
with a bounded number of daemon threads."""

from __future__ import annotations

import asyncio
import os
from collections import defaultdict

import grpc
import grpc.aio
from gateway_helpers import Kupd, StartKupd, echo_sim

from kupapi import MAX_GRPC_MESSAGE, kup_pb2, kup_pb2_grpc
from kupclient import AsyncChannel, AsyncClient, Kind, Message

#: kupd's own threads: grpc's poller/executor, the device-host pool, the
#: metrics server (off here) -- a constant, not a function of clients.
MAX_DAEMON_THREADS = 40


async def _raw_calls(
    socket: str, callers: int, per_caller: int
) -> list[tuple[str, int, bytes, kup_pb2.CallResponse]]:
    opts = [("grpc.max_receive_message_length", MAX_GRPC_MESSAGE)]
    async with grpc.aio.insecure_channel("unix:" + socket, options=opts) as ch:
        stub = kup_pb2_grpc.KupStub(ch)

        async def one(caller: str, i: int) -> tuple[str, int, bytes, kup_pb2.CallResponse]:
            data = f"{caller}:{i}:{'7' * (i % 50)}".encode()
            req = kup_pb2.CallRequest(device="echo", data=data, caller=caller, timeout_ms=60000)
            return caller, i, data, await stub.Call(req, timeout=90)

        return await asyncio.gather(
            *(one(f"c{c}", i) for c in range(callers) for i in range(per_caller))
        )


def test_100_concurrent_calls_over_4_channels(kupd: Kupd) -> None:
    results = asyncio.run(_raw_calls(kupd.socket, callers=10, per_caller=10))
    assert len(results) == 100
    by_channel: dict[int, list[int]] = defaultdict(list)
    for _caller, _i, data, resp in results:
        assert resp.reply.kind == kup_pb2.MESSAGE_KIND_DATA
        # its own reply (odd channels of the echo module upper-case letters)
        assert resp.reply.data == (data if resp.channel % 2 == 0 else data.upper())
        by_channel[resp.channel].append(resp.reply.seq)
    assert set(by_channel) <= {0, 1, 2, 3}
    # Sequence check: on every pool channel the replies are hand-overs
    # 2, 3, ... n+1 (1 was the kernel's opening PASS): none lost, none repeated.
    for chan, seqs in by_channel.items():
        assert sorted(seqs) == list(range(2, len(seqs) + 2)), (chan, sorted(seqs))


def test_a_burst_of_thousands_of_calls_on_one_connection_is_served(kupd: Kupd) -> None:
    """4000 Calls sent at once on one connection: every one answered.
    gRPC's core cancels (CANCELLED, no reason given) new RPCs waiting for
    the application beyond 1000 at random and beyond 3000 all; kupd raises
    that bound above its own queue limits, which refuse with a reason."""
    results = asyncio.run(_raw_calls(kupd.socket, callers=40, per_caller=100))
    assert len(results) == 4000
    for _caller, _i, data, resp in results:
        assert resp.reply.data == (data if resp.channel % 2 == 0 else data.upper())


def test_calls_are_fair_across_callers(sim: object, start_kupd: StartKupd) -> None:
    """One pool channel, held by a gating Call (echo "!lockhold": the module
    keeps the channel locked until a "!lockfree" arrives on another channel)
    while a greedy caller queues 8 Calls and then a modest one 3; once the
    gate opens, the order the pool serves them is read from the replies'
    sequence numbers on that one channel -- positions, not time, so neither
    how fast this process submits nor the order replies reach it matters."""
    k = start_kupd(sim, devices=("echo:1",))  # one pool channel: strict queueing

    async def main() -> list[str]:
        async with (
            AsyncClient(k.socket, caller="greedy") as greedy,
            AsyncClient(k.socket, caller="modest") as modest,
            AsyncClient(k.socket, caller="gate") as gate,
            AsyncClient(k.socket) as probe,
        ):

            async def wait_counted(in_flight: int, queued: int) -> None:
                for _ in range(6000):  # bounded: 60 s at most
                    (dev,) = await probe.devices("echo")
                    if (dev.calls_in_flight, dev.calls_queued) == (in_flight, queued):
                        return
                    await asyncio.sleep(0.01)
                raise AssertionError(f"kupd never counted {in_flight} calls, {queued} queued")

            held = asyncio.ensure_future(gate.call("echo", b"!lockhold60000", timeout=120))
            await wait_counted(1, 0)  # the gate holds the only pool channel

            tasks: list[tuple[str, asyncio.Future[Message]]] = []

            async def submit(c: AsyncClient, tag: str) -> None:
                # submit, then wait until kupd has it queued, so the server's
                # arrival order is the order of these submits
                fut = asyncio.ensure_future(c.call("echo", tag.encode(), timeout=120))
                tasks.append((tag, fut))
                await wait_counted(1 + len(tasks), len(tasks))

            for i in range(8):
                await submit(greedy, f"g{i}")
            for i in range(3):
                await submit(modest, f"m{i}")
            # open the gate from a Session on another channel
            ch = await (await probe.open("echo")).channel()
            async with ch:
                assert (await ch.receive(timeout=30)).kind == Kind.PASS
                await ch.send(b"!lockfree")
                assert (await ch.receive(timeout=30)).data.lower() == b"!lockfree"
            gate_reply = await held
            replies = [(tag, await fut) for tag, fut in tasks]
        # every queued Call went through the gate's channel after the gate:
        # its hand-over numbers are the order the pool dispatched them in
        assert all(m.data.lower() == tag.encode() for tag, m in replies), replies
        seqs = sorted(m.seq for _tag, m in replies)
        assert seqs == list(range(gate_reply.seq + 1, gate_reply.seq + 1 + len(replies))), (
            gate_reply,
            replies,
        )
        return [tag for tag, _m in sorted(replies, key=lambda r: r[1].seq)]

    order = asyncio.run(main())
    # FIFO within each caller, round-robin across callers: the modest caller
    # is not stuck behind the greedy caller's whole backlog.
    assert order[0] == "g0"
    assert [t for t in order if t[0] == "g"] == [f"g{i}" for i in range(8)]
    assert [t for t in order if t[0] == "m"] == ["m0", "m1", "m2"]
    assert order.index("m2") < order.index("g5"), order


def test_1000_idle_sessions_and_calls_still_succeed(start_kupd: StartKupd) -> None:
    env = dict(os.environ, KUP_PARAM_ECHO_CHANNELS="1024")
    with echo_sim(env=env) as sim:
        k = start_kupd(sim)
        base_threads = k.threads()

        async def main() -> None:
            async with AsyncClient(k.socket) as c:
                h = await c.open("echo")
                sessions: list[AsyncChannel] = []
                for batch in range(10):
                    sessions += await asyncio.gather(*(h.channel() for _ in range(100)))
                    del batch
                assert len({s.id for s in sessions}) == 1000
                # Half of them idle in a blocking receive (the kernel holds the
                # turn: "!hold" is never answered), half simply idle.
                for s in sessions:
                    assert (await s.receive(timeout=30)).kind == Kind.PASS
                await asyncio.gather(*(s.send(b"!hold") for s in sessions[:500]))
                blocked = [asyncio.ensure_future(s.receive()) for s in sessions[:500]]
                (dev,) = await c.devices("echo")
                assert sum(ch.state == "session" for ch in dev.channels) == 1000
                replies = await asyncio.gather(
                    *(c.call("echo", f"{i}".encode(), timeout=60) for i in range(40))
                )
                assert [r.data for r in replies] == [f"{i}".encode() for i in range(40)]
                threads = k.threads()
                print("kupd threads", base_threads, threads)
                assert threads <= max(MAX_DAEMON_THREADS, base_threads + 8), threads
                assert not any(b.done() for b in blocked)
                for b in blocked:
                    b.cancel()
                await asyncio.gather(*blocked, return_exceptions=True)
                await asyncio.gather(*(s.close() for s in sessions))

        asyncio.run(main())
        assert k.terminate() == 0

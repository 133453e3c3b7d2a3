"""The benchmark harness (bench/kupbench): statistics, ratios, target verdicts,
interleaving, writers, and the C ping-pong programs run for a few rounds
against real processes.  No timing assertions: only that the machinery
measures what it claims and reports it honestly."""

from __future__ import annotations

import asyncio
import json
import sys
from pathlib import Path

import pytest

from kupd.testing import REPO_ROOT, KupSim

sys.path.insert(0, str(REPO_ROOT / "bench"))

from kupbench.harness import (
    Better,
    Figure,
    Report,
    Target,
    run_interleaved,
)
from kupbench.native import UdsClient, build_c, c_trial, start_uds_server
from kupbench.shapes import pattern
from kupbench.stats import median, percentile


def test_percentile_is_nearest_rank_and_a_measured_value() -> None:
    xs = [float(i) for i in range(1, 101)]  # 1..100
    assert percentile(xs, 99) == 99.0
    assert percentile(xs, 100) == 100.0
    assert percentile(xs, 1) == 1.0
    assert percentile([5.0, 1.0, 3.0], 99) == 5.0  # < 100 samples: the worst one
    assert median([3.0, 1.0, 2.0]) == 2.0
    assert median([4.0, 1.0, 2.0, 3.0]) == 2.5


@pytest.mark.parametrize("bad", [0.0, -1.0, 100.5])
def test_percentile_rejects_bad_pct(bad: float) -> None:
    with pytest.raises(ValueError, match="pct"):
        percentile([1.0], bad)


def test_empty_samples_are_refused() -> None:
    with pytest.raises(ValueError, match="no samples"):
        median([])
    r = Report(meta={})
    with pytest.raises(ValueError, match="no samples"):
        r.add(Figure("x", "s", "x", "us", Better.LOWER, []))


def test_p99_is_the_bad_tail_for_both_directions() -> None:
    xs = [float(i) for i in range(1, 201)]
    lat = Figure("l", "s", "l", "us", Better.LOWER, xs)
    rate = Figure("r", "s", "r", "MiB/s", Better.HIGHER, xs)
    assert lat.p99 == 198.0
    assert rate.p99 == 2.0


def _report() -> Report:
    r = Report(meta={"started": "now", "machine": {"nproc": 2}, "config": {"trials": 3}})
    r.add(Figure("base", "1 a", "baseline", "us", Better.LOWER, [10.0, 10.0, 10.0]))
    r.add(Figure("fig", "1 a", "figure", "us", Better.LOWER, [11.0, 12.0, 13.0],
                 baseline="base"))
    r.add(Figure("tp", "2 b", "throughput", "MiB/s", Better.HIGHER, [50.0]))
    r.add(Figure("least", "1 a", "the floor of fig", "us", Better.LOWER, [11.0],
                 baseline="base"))
    r.add(Figure("least2", "1 a", "the floor's A/A twin", "us", Better.LOWER, [11.5],
                 baseline="base"))
    r.skip("gone", "2 b", "not measurable", "BenchError: helper missing")
    r.targets = [
        Target("fig/base <= 1.3", "fig", "<=", 1.3),
        Target("fig/base <= 1.1", "fig", "<=", 1.1, floor="least", twin="least2"),
        Target("tp >= 40", "tp", ">=", 40.0, on_ratio=False, floor="least"),
        Target("gone <= 1", "gone", "<=", 1.0),
    ]
    return r


def test_ratios_and_verdicts() -> None:
    r = _report()
    assert r.ratio("fig") == pytest.approx(1.2)
    assert r.ratio("base") is None
    verdicts = [r.judge(t)[1] for t in r.targets]
    assert verdicts[:3] == ["met", "missed", "met"]
    assert verdicts[3].startswith("not measured")
    # the floor is judged as its target is, and never changes the verdict
    floors = [r.floor_of(t) for t in r.targets]
    assert floors[0] is None and floors[3] is None
    assert floors[1] == pytest.approx(1.1) and floors[2] == 11.0
    # so is the floor's A/A twin, where there is one
    twins = [r.twin_of(t) for t in r.targets]
    assert twins[1] == pytest.approx(1.15) and twins[0] is None and twins[2] is None


def test_writers_emit_every_figure_skip_and_target(tmp_path: Path) -> None:
    r = _report()
    jpath, mpath = r.write(tmp_path)
    doc = json.loads(jpath.read_text())
    assert [f["key"] for f in doc["figures"]] == ["base", "fig", "tp", "least", "least2"]
    fig = next(f for f in doc["figures"] if f["key"] == "fig")
    assert fig["median"] == 12.0 and fig["ratio"] == pytest.approx(1.2)
    assert doc["skipped"][0]["reason"] == "BenchError: helper missing"
    assert [t["verdict"] for t in doc["targets"]][:3] == ["met", "missed", "met"]
    assert doc["targets"][1]["floor_figure"] == "least"
    assert doc["targets"][1]["floor"] == pytest.approx(1.1)
    assert doc["targets"][1]["twin_figure"] == "least2"
    assert doc["targets"][1]["twin"] == pytest.approx(1.15)
    assert doc["targets"][2]["twin"] is None
    md = mpath.read_text()
    assert "| 1 a | figure | 12.00 |" in md
    assert "not run: BenchError: helper missing" in md
    assert "missed" in md
    assert ("| fig/base <= 1.1 | ratio 1.20 | <= 1.10 | missed | "
            "1.10 (least); A/A twin 1.15, spread 0.05 |") in md
    assert "| tp >= 40 | median 50.00 | >= 40.00 | met | 11.00 (least) |" in md
    text = r.text_table()
    assert "throughput" in text and "not run" in text


def test_interleaving_shuffles_discards_warmup_and_drops_failures() -> None:
    calls: list[str] = []

    def wl(name: str, fail_at: int | None = None) -> object:
        n = 0

        async def trial() -> dict[str, list[float]]:
            nonlocal n
            n += 1
            calls.append(name)
            if fail_at is not None and n >= fail_at:
                raise RuntimeError(f"{name} broke")
            return {"": [float(n)]}
        return trial

    errors: dict[str, str] = {}
    res = asyncio.run(run_interleaved(
        {"a": wl("a"), "b": wl("b"), "c": wl("c", fail_at=2)},  # type: ignore[dict-item]
        trials=3, warmup=1, on_error=lambda n, e: errors.update({n: str(e)})))
    assert res["a"][""] == [2.0, 3.0, 4.0]  # trial 1 was the warm-up
    assert "c" not in res and errors == {"c": "c broke"}
    # every round runs each live workload once, in an order of its own
    # (repeatable: shuffled with the round number as seed)
    assert sorted(calls[:3]) == ["a", "b", "c"] and sorted(calls[3:6]) == ["a", "b", "c"]
    assert len(calls) == 10 and sorted(calls[6:8]) == sorted(calls[8:]) == ["a", "b"]
    calls2: list[str] = []
    names = [f"w{i}" for i in range(6)]

    def rec(name: str) -> object:
        async def trial() -> dict[str, list[float]]:
            calls2.append(name)
            return {"": [1.0]}
        return trial

    asyncio.run(run_interleaved({n: rec(n) for n in names}, trials=8, warmup=0))  # type: ignore[misc]
    rounds = [calls2[i:i + 6] for i in range(0, len(calls2), 6)]
    # a run's seed picks its orders: the same seed repeats them, another one
    # gives other orders (so runs do not all share one order's bias)

    def orders(seed: int) -> list[str]:
        got: list[str] = []

        def rec2(name: str) -> object:
            async def trial() -> dict[str, list[float]]:
                got.append(name)
                return {"": [1.0]}
            return trial

        asyncio.run(run_interleaved({n: rec2(n) for n in names}, trials=8,  # type: ignore[misc]
                                    warmup=0, seed=seed))
        return got

    assert orders(0) == calls2 and orders(7) == orders(7) != calls2
    assert all(sorted(r) == names for r in rounds)
    # no workload always follows the same one (what rotation did)
    preds = {n: {r[r.index(n) - 1] for r in rounds if r.index(n) > 0} for n in names}
    assert all(len(p) > 1 for p in preds.values()), preds


def test_uds_programs_measure_real_round_trips(tmp_path: Path) -> None:
    prog = build_c(REPO_ROOT, "uds")
    out = asyncio.run(c_trial([str(prog), "-d", str(tmp_path / "c.sock"), "-n", "50",
                               "-w", "5", "-s", "64"], None, "uds_pingpong"))
    assert len(out[""]) == 50 and all(v > 0 for v in out[""])
    with start_uds_server(prog, tmp_path / "py.sock", 64, tmp_path / "srv.log") as srv:
        cli = UdsClient(tmp_path / "py.sock", 64)
        try:
            lat = cli.latency(pattern(64), 20)[""]
        finally:
            cli.close()
        assert len(lat) == 20
        assert srv.proc is not None
        srv.proc.wait(timeout=10)  # one connection served: it exits by itself
        assert srv.proc.returncode == 0


def test_uds_program_rejects_bad_arguments(tmp_path: Path) -> None:
    prog = build_c(REPO_ROOT, "uds")
    with pytest.raises(Exception, match="-n"):
        asyncio.run(c_trial([str(prog), "-d", str(tmp_path / "x.sock"), "-n", "zero"],
                            None, "uds_pingpong"))


def test_floor_program_against_kupsim_echo(echo_sim: KupSim) -> None:
    prog = build_c(REPO_ROOT, "floor")
    out = asyncio.run(c_trial([str(prog), "-d", "echo", "-n", "100", "-w", "10", "-s", "64"],
                              echo_sim.env(), "kup_floor"))
    assert len(out[""]) == 100 and all(v > 0 for v in out[""])

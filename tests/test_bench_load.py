"""benches/bench_load.py's own bookkeeping on the CPU (the loads themselves run on a GPU):
rounds that would pass the deadline are skipped and recorded, and the results file is
written from whatever rows a run has."""

import json
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benches"))
try:
    import bench_load
finally:
    sys.path.pop(0)


def _run(gbps: float) -> dict:
    return {"seconds": 1.0, "gbps": gbps, "peak_gpu_bytes": 3 << 30, "device_peak_bytes": 3 << 30,
            "host_rss_growth_bytes": 100 << 20, "final_bytes": 2 << 30,
            "stats": {"memory_budget": 64 << 20, "chunk_bytes": 4 << 20}}


@pytest.mark.parametrize(("deadline", "rounds"), [(None, 3), (1000.0, 3), (2.5, 2), (0.5, 1)])
def test_round_robin_deadline(monkeypatch, deadline, rounds):
    clock = [0.0]
    monkeypatch.setattr(time, "monotonic", lambda: clock[0])

    def fake_worker(ckpt, loader, cond, n, *rest):
        clock[0] += 0.5  # each load half a second: a round of two loaders one second
        return {"loader": loader, "cond": cond, "runs": [_run(10.0)] * n}

    monkeypatch.setattr(bench_load, "run_worker", fake_worker)
    args = SimpleNamespace(ckpt="c", budget=None, threads=None, timeout=1, settle_s=0.0, round_robin=True,
                           deadline_s=deadline, t0=0.0)
    got = dict(bench_load.measure(args, ["fastfp8", "runai"], "cold", 3))
    assert [len(got[n]["runs"]) for n in ("fastfp8", "runai")] == [rounds, rounds]
    assert all(r.get("rounds_skipped", 0) == 3 - rounds for r in got.values())


def test_write_results_from_partial_rows(tmp_path, monkeypatch):
    monkeypatch.setattr(bench_load, "host_cpu", lambda: "test cpu")
    rows = [{"loader": "fastfp8", "cond": "warm", "runs": [_run(50.0)] * 3},
            {"loader": "instanttensor_buffered", "cond": "warm", "runs": [_run(40.0)] * 3},
            {"loader": "runai", "cond": "cold", "runs": [_run(1.5)] * 2, "rounds_skipped": 1}]
    for r in rows:
        r["summary"] = bench_load.summarize(r)
    doc = {"gpu": "test", "date": "2026-12-01", "checkpoint": "c", "checkpoint_bytes": 4 << 30, "repeat": 3,
           "largest_tensor_bytes": 1 << 30, "rows": rows, "h2d_pinned_gbps": 55.0}
    out = tmp_path / "load_test.json"
    bench_load.write_results(doc, str(out))
    got = json.loads(out.read_text())
    assert got["fastfp8_warm_gbps"] == 50.0 and got["best_peer"] == "instanttensor_buffered"
    assert got["targets"]["warm_ge_1.25x_best_peer"]["met"] is True
    assert got["targets"]["cold_ge_best_peer"]["met"] is None  # no cold fastfp8 row: not judged
    assert got["targets"]["warm_gbps_ge_55"]["met"] is False
    assert "rounds cut by the deadline" in out.with_suffix(".md").read_text()

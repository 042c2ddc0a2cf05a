"""Kept tensors in the background: on a GPU, with every weight quantized by the reader
threads, the large tensors kept as they are (embeddings, lm_head) come spread between the
other jobs' chunks (``engine.background_items``); the result is byte for byte the same."""

from __future__ import annotations

import fastfp8
import pytest
import torch
from fastfp8 import engine
from fastfp8.engine import background_items
from fastfp8.host_quant import host_quant_specs, resolve_quantize_on
from fastfp8.options import LoadOptions
from fastfp8.plan import make_plan
from test_host_quant import llama, load, same_state

CUDA = torch.device("cuda", 0)


def plan_and_specs(root, options: LoadOptions, device: torch.device):
    ckpt = fastfp8.open_checkpoint(root)
    plan = make_plan(ckpt, options, None)
    options = resolve_quantize_on(options, device, 1).staged()
    return plan, host_quant_specs(plan.jobs, options, "fp32", device), options


def test_the_large_kept_tensors_go_in_the_background_on_a_gpu_with_the_host_quantizing(tmp_path, monkeypatch):
    llama(tmp_path / "m")
    monkeypatch.setattr(engine, "BACKGROUND_MIN", 96 * 128 * 2)  # the embedding's and lm_head's bytes
    plan, specs, options = plan_and_specs(tmp_path / "m", LoadOptions.make(quantize_on="host"), CUDA)
    names = [plan.jobs[i].target.source.name for i in background_items(plan, specs, options, CUDA)]
    assert sorted(names) == ["lm_head.weight", "model.embed_tokens.weight"]  # not the norms, no weight
    monkeypatch.setattr(engine, "BACKGROUND_MIN", 1 << 30)
    assert background_items(plan, specs, options, CUDA) == []


@pytest.mark.parametrize("where", [{"quantize_on": "device"}, {"quantize_on": "adaptive"},
                                   {"quantize_on": "host", "read_ahead": 4096}])
def test_nothing_goes_in_the_background_elsewhere(tmp_path, monkeypatch, where):
    """The device quantizing (every byte crosses the bus: nothing to gain), or a read-ahead
    window (it walks the plan in order), or a CPU device, or the switch off: plan order."""
    llama(tmp_path / "m")
    monkeypatch.setattr(engine, "BACKGROUND_MIN", 1)
    plan, specs, options = plan_and_specs(tmp_path / "m", LoadOptions.make(**where), CUDA)
    assert background_items(plan, specs, options, CUDA) == []
    plan, specs, options = plan_and_specs(tmp_path / "m", LoadOptions.make(quantize_on="host"), torch.device("cpu"))
    assert background_items(plan, specs, options, torch.device("cpu")) == []
    monkeypatch.setattr(engine, "BACKGROUND", False)
    plan, specs, options = plan_and_specs(tmp_path / "m", LoadOptions.make(quantize_on="host"), CUDA)
    assert background_items(plan, specs, options, CUDA) == []


@pytest.mark.cuda
@pytest.mark.parametrize("budget", [None, ("64KiB", "8KiB"), ("1MiB", "1000")])
def test_a_load_with_kept_tensors_in_the_background_gives_the_same_bytes(tmp_path, monkeypatch, budget):
    llama(tmp_path / "m")
    kw = {"quantize_on": "host"} | ({} if budget is None else {"memory_budget": budget[0], "chunk_bytes": budget[1]})
    ref, _ = load(tmp_path / "m", "cuda", quantize_on="device")
    monkeypatch.setattr(engine, "BACKGROUND", False)
    plain, _ = load(tmp_path / "m", "cuda", **kw)
    monkeypatch.setattr(engine, "BACKGROUND", True)
    monkeypatch.setattr(engine, "BACKGROUND_MIN", 1024)  # the embedding and lm_head, 24 KiB each
    used: list[list[int]] = []
    real = engine.background_items

    def spy(*a, **k):
        used.append(real(*a, **k))
        return used[-1]

    monkeypatch.setattr(engine, "background_items", spy)
    got, stats = load(tmp_path / "m", "cuda", **kw)
    assert len(used) == 1 and len(used[0]) == 2
    assert stats.host_quantized == stats.quantized
    same_state(got, plain)
    same_state(got, ref)

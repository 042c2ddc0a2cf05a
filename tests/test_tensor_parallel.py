"""Tensor-parallel loading on the CPU with gloo: every rank's bytes equal the matching slice
of the one-process result, and each rank reads about 1/tp of the model; row-parallel slices
quantized on the host (their amax all-reduced ahead of the read) as on the device."""

from __future__ import annotations

import fastfp8
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from ct_oracle import same_bytes
from fastfp8.tensor_parallel import TensorParallel, rank_slice
from safetensors.torch import save_file
from test_load import save, tiny

PR27280 = ["re:.*self_attn", "re:.*lm_head", "re:.*router", "re:.*shared_expert"]


def _rank_main(rank: int, size: int, path: str, init: str, out: str, ignore, device: str,
               quantize_on: str = "auto") -> None:
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=size)
    try:
        state = fastfp8.load_quantized(path, device=device, ignore=ignore)  # sanity: no TP, no collectives
        state = fastfp8.load_quantized(path, device=device, ignore=ignore, tp_size=size, tp_rank=rank,
                                       quantize_on=quantize_on)
        cpu = {k: v.cpu() for k, v in state.items()}
        st = state.stats
        torch.save({"state": cpu, "bytes_read": st.bytes_read, "host_quantized": st.host_quantized,
                    "quantized": st.quantized}, f"{out}.{rank}")
    finally:
        dist.destroy_process_group()


def splits_of(path) -> dict:
    """Source tensor name -> its :class:`fastfp8.layouts.Split` (None: replicated)."""
    from fastfp8.layouts import layout_for

    return {t.source.name: t.split for t in layout_for(path).targets(fastfp8.open_checkpoint(path))}


def source_of(name: str, src: dict[str, torch.Tensor]) -> str:
    base = name[: -len("_scale")] if name.endswith("_scale") else name
    if base in src:
        return base
    for fused, out in (("gate_up_proj", "w13_weight"), ("down_proj", "w2_weight")):
        if base.endswith("experts." + out):
            return base[: -len(out)] + fused
    raise KeyError(name)


# (arch, ranks, ignore, device, quantize_on): "auto" is the host on the CPU (row-parallel
# slices included) and the device on a GPU
CASES = [("llama", 2, None, "cpu", "auto"), ("llama", 4, None, "cpu", "auto"), ("llama", 2, PR27280, "cpu", "auto"),
         ("llama4", 2, None, "cpu", "auto"), ("llama4", 4, PR27280, "cpu", "auto"),
         ("llama", 2, None, "cpu", "device"), ("llama", 4, None, "cpu", "split"),
         ("llama", 2, None, "cpu", "adaptive"), ("llama4", 2, PR27280, "cpu", "adaptive"),
         # two ranks sharing one GPU, gloo all-reducing CUDA tensors: the CUDA pipeline with TP
         pytest.param("llama4", 2, None, "cuda", "auto", marks=pytest.mark.cuda),
         pytest.param("llama", 2, None, "cuda", "auto", marks=pytest.mark.cuda),
         pytest.param("llama", 2, None, "cuda", "host", marks=pytest.mark.cuda),
         pytest.param("llama4", 2, None, "cuda", "split", marks=pytest.mark.cuda)]


def spawn(size: int, tmp_path, ckpt_dir, ignore, device: str, quantize_on: str, out: str) -> None:
    mp.start_processes(_rank_main, args=(size, str(ckpt_dir), f"file://{tmp_path}/pg", out, ignore, device,
                                         quantize_on), nprocs=size, start_method="spawn")


@pytest.mark.parametrize(("arch", "size", "ignore", "device", "quantize_on"), CASES)
def test_ranks_hold_slices_of_the_single_process_result(tmp_path, arch, size, ignore, device, quantize_on):
    ckpt_dir = tmp_path / "ckpt"
    src = save(tiny(arch), ckpt_dir)
    full = {k: v.cpu() for k, v in fastfp8.load_quantized(ckpt_dir, device=device, ignore=ignore).items()}
    out = str(tmp_path / "rank")
    spawn(size, tmp_path, ckpt_dir, ignore, device, quantize_on, out)
    splits = splits_of(ckpt_dir)
    on_host = quantize_on == "host" or (quantize_on == "auto" and device == "cpu")
    for rank in range(size):
        got = torch.load(f"{out}.{rank}", weights_only=False)
        tp = TensorParallel(rank, size)
        assert set(got["state"]) == set(full)
        if on_host:  # every quantized weight but fused experts stored [in, out]: row-parallel slices too
            fused = sum(n.endswith(("experts.gate_up_proj", "experts.down_proj")) for n in src)
            assert got["host_quantized"] == got["quantized"] - fused, (rank, got["host_quantized"])
        elif quantize_on in ("device", "auto"):  # "auto" on a GPU: the device
            assert got["host_quantized"] == 0
        elif quantize_on == "adaptive":  # the threads decide as they go
            assert 0 <= got["host_quantized"] <= got["quantized"]
        else:  # a split
            assert 0 < got["host_quantized"] < got["quantized"]
        for name, t in got["state"].items():
            want = rank_slice(splits[source_of(name, src)], name, full[name], tp)
            assert same_bytes(t, want), (rank, name)
        # the rank reads exactly its slice of every source tensor, nothing more
        want_read = sum(rank_slice(splits[n], n, t, tp).nbytes for n, t in src.items())
        assert got["bytes_read"] == want_read, (rank, got["bytes_read"], want_read)


def _rank_load(rank: int, size: int, path: str, init: str, out: str, quantize_on: str, device: str = "cpu",
               backend: str = "gloo", method: str = "auto") -> None:
    """Loads rank ``rank``'s slice; saves the state, or the error's type and message. With
    ``backend="nccl"`` each rank has its own GPU; with gloo on ``"cuda"`` they share one."""
    if backend == "nccl":
        torch.cuda.set_device(rank)
        device = f"cuda:{rank}"
    dist.init_process_group(backend, init_method=init, rank=rank, world_size=size)
    try:
        try:
            state = fastfp8.load_quantized(path, device=device, tp_size=size, tp_rank=rank, quantize_on=quantize_on,
                                           method=method)
            res = {"state": {k: v.cpu() for k, v in state.items()}, "host_quantized": state.stats.host_quantized}
        except fastfp8.NonFiniteWeightError as e:
            res = {"error": str(e)}
        torch.save(res, f"{out}.{rank}")
    finally:
        dist.destroy_process_group()


def test_row_parallel_on_the_host_empty_slices_zero_and_non_finite_rows(tmp_path):
    """4 ranks over a down_proj of 3 columns (ranks 2 and 3 hold empty slices), with zero rows
    (whole, and zero in one rank's part only): the host path's bytes equal the device path's
    and the one-process result; a NaN in one rank's part is reported on every rank."""
    from test_host_quant import llama

    t = llama(tmp_path / "m", inter=3)
    for i in range(2):
        for n in ("mlp.down_proj", "self_attn.o_proj"):
            w = t[f"model.layers.{i}.{n}.weight"]
            w[0] = 0  # a zero row
            w[5, : w.shape[1] // 4 + 1] = 0  # zero in rank 0's part only
            w[7, 0] = 1e-37  # a tiny row: a subnormal bf16 scale; zero in every part but rank 0's
            w[7, 1:] = 0
    save_file(t, str(tmp_path / "m" / "model.safetensors"))
    full = dict(fastfp8.load_quantized(tmp_path / "m", device="cpu", quantize_on="device"))
    splits = splits_of(tmp_path / "m")
    src = dict(t)
    states = {}
    for quantize_on in ("host", "device"):
        out = str(tmp_path / quantize_on)
        mp.start_processes(_rank_load, args=(4, str(tmp_path / "m"), f"file://{tmp_path}/pg-{quantize_on}", out,
                                             quantize_on), nprocs=4, start_method="spawn")
        states[quantize_on] = [torch.load(f"{out}.{r}", weights_only=False) for r in range(4)]
    for rank in range(4):
        host, dev = states["host"][rank], states["device"][rank]
        # rank 3 holds no rows of gate_proj and up_proj (3 rows), which no one quantizes
        assert host["host_quantized"] == (14 if rank < 3 else 10) and dev["host_quantized"] == 0
        tp = TensorParallel(rank, 4)
        for name, v in host["state"].items():
            assert same_bytes(v, dev["state"][name]), (rank, name)
            assert same_bytes(v, rank_slice(splits[source_of(name, src)], name, full[name], tp)), (rank, name)
    # a NaN in rank 0's part of a row of a row-parallel weight: every rank reports it
    w = t["model.layers.1.mlp.down_proj.weight"]
    w[4, 0] = float("nan")
    save_file(t, str(tmp_path / "m" / "model.safetensors"))
    out = str(tmp_path / "nan")
    mp.start_processes(_rank_load, args=(4, str(tmp_path / "m"), f"file://{tmp_path}/pg-nan", out, "host"),
                       nprocs=4, start_method="spawn")
    for rank in range(4):
        got = torch.load(f"{out}.{rank}", weights_only=False)
        assert "model.layers.1.mlp.down_proj.weight" in got.get("error", ""), rank


@pytest.mark.parametrize(("device", "backend", "quantize_on"), [
    ("cpu", "gloo", "device"),
    pytest.param("cuda", "gloo", "device", marks=pytest.mark.cuda),
    pytest.param("cuda", "nccl", "device", marks=pytest.mark.cuda),
    pytest.param("cuda", "nccl", "host", marks=pytest.mark.cuda)])
def test_a_nan_in_one_ranks_part_of_a_row_is_reported_on_every_rank(tmp_path, device, backend, quantize_on):
    """A NaN in rank 0's part of one row of a row-parallel weight: the all-reduced row maximum
    is NaN on both ranks (their int32 patterns reduced, which a float MAX, NCCL's, does not
    promise), so each rank's load reports that weight. On the device path through NCCL too."""
    from test_host_quant import llama

    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    if backend == "nccl" and torch.cuda.device_count() < 2:
        pytest.skip("needs two GPUs (nvidia-h200-x2)")
    t = llama(tmp_path / "m")
    w = t["model.layers.1.mlp.down_proj.weight"]
    w[4, 0] = float("nan")  # rank 0's part; rank 1's part of the row is finite
    save_file(t, str(tmp_path / "m" / "model.safetensors"))
    out = str(tmp_path / "nan")
    mp.start_processes(_rank_load, args=(2, str(tmp_path / "m"), f"file://{tmp_path}/pg", out, quantize_on, device,
                                         backend), nprocs=2, start_method="spawn")
    for rank in range(2):
        got = torch.load(f"{out}.{rank}", weights_only=False)
        assert "model.layers.1.mlp.down_proj.weight" in got.get("error", ""), (rank, sorted(got))


@pytest.mark.parametrize("method", ["mmap", "pread"])
def test_row_slices_quantized_on_the_host_a_piece_of_many_rows_at_a_time(tmp_path, method):
    """A row-parallel slice is one short segment a row; the reader joins a piece's worth of
    rows into one read (out of a mapping: one populate and one drop of their span, not one
    a row). Small pieces (``piece_bytes``) so that a tensor takes several, each of several
    rows, some ending mid-tensor: every rank's bytes equal its slice of the one-process load."""
    from test_host_quant import llama

    llama(tmp_path / "m")
    full = dict(fastfp8.load_quantized(tmp_path / "m", device="cpu", quantize_on="device"))
    splits = splits_of(tmp_path / "m")
    out = str(tmp_path / "r")
    mp.start_processes(_rank_piece_load, args=(2, str(tmp_path / "m"), f"file://{tmp_path}/pg", out, method),
                       nprocs=2, start_method="spawn")
    for rank in range(2):
        got = torch.load(f"{out}.{rank}", weights_only=False)
        assert got["host_quantized"] > 0
        tp = TensorParallel(rank, 2)
        for name, v in got["state"].items():
            base = name[: -len("_scale")] if name.endswith("_scale") else name
            assert same_bytes(v, rank_slice(splits[base], name, full[name], tp)), (rank, name)


def _rank_piece_load(rank: int, size: int, path: str, init: str, out: str, method: str) -> None:
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=size)
    try:
        state = fastfp8.load_quantized(path, device="cpu", tp_size=size, tp_rank=rank, quantize_on="host",
                                       method=method, piece_bytes="2KiB", memory_budget="1MiB", chunk_bytes="64KiB")
        torch.save({"state": dict(state), "host_quantized": state.stats.host_quantized}, f"{out}.{rank}")
    finally:
        dist.destroy_process_group()


def test_split_rules(tmp_path):
    save(tiny("llama"), tmp_path / "llama")
    sp = splits_of(tmp_path / "llama")
    kind = {n: (v.kind if v else None) for n, v in sp.items()}
    assert kind["model.layers.0.self_attn.q_proj.weight"] == "column"
    assert sp["model.layers.0.self_attn.k_proj.weight"].heads == 2  # num_key_value_heads
    assert kind["model.layers.0.self_attn.o_proj.weight"] == "row"
    assert kind["model.layers.0.mlp.down_proj.weight"] == "row"
    assert kind["model.embed_tokens.weight"] == "vocab" and kind["lm_head.weight"] == "vocab"
    assert kind["model.norm.weight"] is None
    save(tiny("llama4"), tmp_path / "llama4")
    kind = {n: (v.kind if v else None) for n, v in splits_of(tmp_path / "llama4").items()}
    assert kind["model.layers.0.feed_forward.experts.gate_up_proj"] == "experts_column"
    assert kind["model.layers.0.feed_forward.experts.down_proj"] == "experts_row"
    assert kind["model.layers.0.feed_forward.router.weight"] is None
    tp = TensorParallel(3, 4)
    assert tp.span(10) == (9, 10) and TensorParallel(0, 4).span(10) == (0, 3)
    with pytest.raises(ValueError):
        TensorParallel(4, 4)
    with pytest.raises(ValueError, match="tp_rank and tp_size"):
        fastfp8.load_quantized("nowhere", device="cpu", tp_size=2)


def test_the_tensor_parallel_benchmark_runs_on_the_cpu(tmp_path):
    """benches/bench_load_tp.py end to end over gloo (what the GPU machine runs with NCCL):
    round-robin variants, the page cache evicted before each load, each rank's bytes
    checked against the one-process load, JSON and markdown written."""
    import importlib.util
    import json
    import sys
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "benches" / "bench_load_tp.py"
    spec = importlib.util.spec_from_file_location("bench_load_tp", path)
    bench_load_tp = importlib.util.module_from_spec(spec)
    sys.modules["bench_load_tp"] = bench_load_tp  # the spawned ranks unpickle its _rank by this name
    spec.loader.exec_module(bench_load_tp)
    save(tiny("llama"), tmp_path / "ckpt")
    out = tmp_path / "tp.json"
    assert bench_load_tp.main([str(tmp_path / "ckpt"), "--tp", "1,2", "--device", "cpu", "--repeat", "1", "--cold",
                               "--variants", "default,quantize_on=device", "--out", str(out)]) == 0
    doc = json.loads(out.read_text())
    assert doc["cold"] and doc["variants"] == ["default", "quantize_on=device"]
    rows = {(r["tp"], r["variant"]): r for r in doc["rows"]}
    assert set(rows) == {(t, v) for t in (1, 2) for v in doc["variants"]}
    assert rows[2, "default"]["mismatched"] == [] and rows[2, "quantize_on=device"]["mismatched"] is None
    assert rows[2, "quantize_on=device"]["host_quantized_per_rank"] == [0, 0]
    assert len(rows[2, "default"]["phases_per_rank"]) == 2 and doc["tp2_gbps"] > 0
    assert "| 2 | quantize_on=device |" in out.with_suffix(".md").read_text()

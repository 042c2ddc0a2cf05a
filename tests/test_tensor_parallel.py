"""Tensor-parallel loading on the CPU with gloo: every rank's bytes equal the matching slice
of the one-process result, and each rank reads about 1/tp of the model."""

from __future__ import annotations

import fastfp8
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from ct_oracle import same_bytes
from fastfp8.tensor_parallel import TensorParallel, rank_slice
from test_load import save, tiny

PR27280 = ["re:.*self_attn", "re:.*lm_head", "re:.*router", "re:.*shared_expert"]


def _rank_main(rank: int, size: int, path: str, init: str, out: str, ignore, device: str) -> None:
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=size)
    try:
        state = fastfp8.load_quantized(path, device=device, ignore=ignore)  # sanity: no TP, no collectives
        state = fastfp8.load_quantized(path, device=device, ignore=ignore, tp_size=size, tp_rank=rank)
        cpu = {k: v.cpu() for k, v in state.items()}
        torch.save({"state": cpu, "bytes_read": state.stats.bytes_read}, f"{out}.{rank}")
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


CASES = [("llama", 2, None, "cpu"), ("llama", 4, None, "cpu"), ("llama", 2, PR27280, "cpu"),
         ("llama4", 2, None, "cpu"), ("llama4", 4, PR27280, "cpu"),
         # two ranks sharing one GPU, gloo all-reducing CUDA tensors: the CUDA pipeline with TP
         pytest.param("llama4", 2, None, "cuda", marks=pytest.mark.cuda),
         pytest.param("llama", 2, None, "cuda", marks=pytest.mark.cuda)]


@pytest.mark.parametrize(("arch", "size", "ignore", "device"), CASES)
def test_ranks_hold_slices_of_the_single_process_result(tmp_path, arch, size, ignore, device):
    ckpt_dir = tmp_path / "ckpt"
    src = save(tiny(arch), ckpt_dir)
    full = {k: v.cpu() for k, v in fastfp8.load_quantized(ckpt_dir, device=device, ignore=ignore).items()}
    out = str(tmp_path / "rank")
    mp.start_processes(_rank_main, args=(size, str(ckpt_dir), f"file://{tmp_path}/pg", out, ignore, device),
                       nprocs=size, start_method="spawn")
    splits = splits_of(ckpt_dir)
    for rank in range(size):
        got = torch.load(f"{out}.{rank}", weights_only=False)
        tp = TensorParallel(rank, size)
        assert set(got["state"]) == set(full)
        for name, t in got["state"].items():
            want = rank_slice(splits[source_of(name, src)], name, full[name], tp)
            assert same_bytes(t, want), (rank, name)
        # the rank reads exactly its slice of every source tensor, nothing more
        want_read = sum(rank_slice(splits[n], n, t, tp).nbytes for n, t in src.items())
        assert got["bytes_read"] == want_read, (rank, got["bytes_read"], want_read)


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

"""Tensor-parallel loading on the CPU with gloo: every rank's bytes equal the matching slice
of the one-process result, and each rank reads about 1/tp of the model."""

from __future__ import annotations

import fastfp8
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from ct_oracle import same_bytes
from fastfp8.tensor_parallel import TensorParallel, split_of
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


def expected_slice(name: str, full: torch.Tensor, src_name: str, ndim: int, tp: TensorParallel) -> torch.Tensor:
    """The rank's part of one output tensor of the unsharded load."""
    split = split_of(src_name, ndim)
    is_scale = name.endswith("_scale")
    if split in ("column", "vocab"):
        a, b = tp.span(full.shape[0])
        return full[a:b]
    if split == "row":
        if is_scale:
            return full
        a, b = tp.span(full.shape[1])
        return full[:, a:b]
    if split == "fused_column":  # [E, 2I, H]: gate rows then up rows, each split
        half = full.shape[1] // 2
        a, b = tp.span(half)
        return torch.cat([full[:, a:b], full[:, half + a : half + b]], dim=1)
    if split == "fused_row":  # [E, H, I]: split the input dim; scales are whole
        if is_scale:
            return full
        a, b = tp.span(full.shape[2])
        return full[:, :, a:b]
    return full


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
    total = sum(t.numel() * t.element_size() for t in src.values())
    replicated = sum(t.numel() * t.element_size() for n, t in src.items() if split_of(n, t.dim()) is None)
    read = []
    for rank in range(size):
        got = torch.load(f"{out}.{rank}", weights_only=False)
        tp = TensorParallel(rank, size)
        assert set(got["state"]) == set(full)
        for name, t in got["state"].items():
            sname = source_of(name, src)
            want = expected_slice(name, full[name], sname, src[sname].dim(), tp)
            assert same_bytes(t, want), (rank, name)
        read.append(got["bytes_read"])
        assert got["bytes_read"] <= total / size + replicated + 4096, (rank, got["bytes_read"], total)
    assert sum(read) == total + (size - 1) * replicated


def test_split_rules():
    assert split_of("model.layers.0.self_attn.q_proj.weight", 2) == "column"
    assert split_of("model.layers.0.self_attn.q_proj.bias", 1) == "column"
    assert split_of("model.layers.0.self_attn.o_proj.weight", 2) == "row"
    assert split_of("model.layers.0.self_attn.o_proj.bias", 1) is None
    assert split_of("model.layers.0.block_sparse_moe.experts.3.w2.weight", 2) == "row"
    assert split_of("model.layers.0.feed_forward.experts.gate_up_proj", 3) == "fused_column"
    assert split_of("model.layers.0.feed_forward.experts.down_proj", 3) == "fused_row"
    assert split_of("model.embed_tokens.weight", 2) == "vocab"
    assert split_of("lm_head.weight", 2) == "vocab"
    assert split_of("model.norm.weight", 1) is None
    assert split_of("model.layers.0.mlp.gate.weight", 2) is None
    tp = TensorParallel(3, 4)
    assert tp.span(10) == (9, 10) and TensorParallel(0, 4).span(10) == (0, 3)
    with pytest.raises(ValueError):
        TensorParallel(4, 4)
    with pytest.raises(ValueError, match="tp_rank and tp_size"):
        fastfp8.load_quantized("nowhere", device="cpu", tp_size=2)

"""The vLLM plugin under tensor parallelism (size 2, gloo, CPU): vLLM's real model classes,
each rank reading only its slice, against vLLM's default loader on the compressed-tensors
checkpoint that ``fastfp8 convert`` writes for the same model.

Compared just before vLLM's ``process_weights_after_loading`` (stubbed on both sides: the
compressed-tensors W8A8 FP8 scheme's step rearranges weights for GPU kernels, which vLLM's
CPU platform does not have), parameter by parameter, byte for byte.
"""

from __future__ import annotations

import json
import os
import socket

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("VLLM_TARGET_DEVICE", "cpu")
pytest.importorskip("vllm.model_executor.model_loader", reason="vLLM is not installed (see make test-vllm)")

import torch.multiprocessing as mp
from fastfp8.convert import convert
from test_load import save, tiny


def _configs(path: str, load_format: str, size: int):
    from vllm.config import DeviceConfig, ModelConfig, ParallelConfig, VllmConfig
    from vllm.config.load import LoadConfig

    mc = ModelConfig(model=path, dtype="bfloat16", skip_tokenizer_init=True)
    lc = LoadConfig(load_format=load_format)
    vc = VllmConfig(model_config=mc, load_config=lc, device_config=DeviceConfig(device="cpu"),
                    parallel_config=ParallelConfig(tensor_parallel_size=size))
    return vc, mc, lc


def _rank(rank: int, size: int, src: str, dst: str, port: int, out: str) -> None:
    import vllm.model_executor.model_loader.base_loader as bl
    from fastfp8 import vllm_plugin as vp
    from vllm.config import set_current_vllm_config
    from vllm.distributed import init_distributed_environment, initialize_model_parallel
    from vllm.model_executor.model_loader import get_model_loader

    bl.process_weights_after_loading = lambda *a, **k: None  # the GPU-kernel layout step (see above)
    vp.register()
    vc, mc, lc = _configs(src, "fastfp8", size)
    with set_current_vllm_config(vc):
        init_distributed_environment(world_size=size, rank=rank, local_rank=rank, backend="gloo",
                                     distributed_init_method=f"tcp://127.0.0.1:{port}")
        initialize_model_parallel(size, 1)
        loader = get_model_loader(lc)
        ours = dict(loader.load_model(vc, mc).named_parameters())
    bytes_read = loader.stats.bytes_read
    vc, mc, lc = _configs(dst, "safetensors", size)
    with set_current_vllm_config(vc):
        ref = dict(get_model_loader(lc).load_model(vc, mc).named_parameters())
    mismatched = sorted(set(ours) ^ set(ref))
    for name, p in ours.items():
        r = ref.get(name)
        if r is None:
            continue
        a, b = p.detach().contiguous(), r.detach().contiguous()
        if a.dtype != b.dtype or a.shape != b.shape or not torch.equal(a.view(-1).view(torch.uint8),
                                                                       b.view(-1).view(torch.uint8)):
            mismatched.append(name)
    with open(f"{out}.{rank}", "w") as f:
        json.dump({"mismatched": mismatched, "bytes_read": bytes_read, "params": len(ours)}, f)


@pytest.mark.parametrize("arch", ["llama", "qwen3_moe", "mixtral", "llama4"])
def test_ranks_read_their_slices_and_match_vllms_own_loading(tmp_path, arch):
    import fastfp8
    from fastfp8.layouts import layout_for

    src = save(tiny(arch), tmp_path / "src")
    convert(tmp_path / "src", tmp_path / "dst", progress=False)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = str(tmp_path / "rank")
    mp.start_processes(_rank, args=(2, str(tmp_path / "src"), str(tmp_path / "dst"), port, out), nprocs=2,
                       start_method="spawn")
    # what one rank must read: half of every split tensor, all of the replicated ones
    # (embeddings and lm_head too: vLLM pads the vocabulary before it splits it)
    targets = layout_for(tmp_path / "src").targets(fastfp8.open_checkpoint(tmp_path / "src"))
    whole = sum(t.source.nbytes for t in targets if t.split is None or t.split.kind == "vocab")
    split = sum(t.source.nbytes for t in targets) - whole
    for rank in range(2):
        got = json.loads((tmp_path / f"rank.{rank}").read_text())
        assert got["params"] > 0 and got["mismatched"] == [], (rank, got["mismatched"][:10])
        assert got["bytes_read"] == whole + split // 2, (rank, got["bytes_read"], whole, split)
    assert sum(t.nbytes for t in src.values()) == whole + split

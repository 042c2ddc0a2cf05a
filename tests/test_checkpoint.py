"""Round trips against the safetensors library's own writer, and model directories."""

from __future__ import annotations

import json

import fastfp8
import pytest
import torch
from conftest import rand_tensor
from fastfp8.checkpoint import TORCH_DTYPES
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import save, save_file


def _writable_dtypes() -> list[torch.dtype]:
    """Every torch dtype that both this safetensors writer and fastfp8 support."""
    out = []
    for dt in dict.fromkeys(TORCH_DTYPES.values()):
        try:
            save({"t": torch.zeros(1, dtype=dt)})  # to bytes: never write to a system path
        except Exception:
            continue
        out.append(dt)
    return out


DTYPES = _writable_dtypes()


def test_the_dtypes_that_matter_are_covered():
    for dt in (torch.bfloat16, torch.float16, torch.float32, torch.float8_e4m3fn,
               torch.float8_e5m2, torch.int64, torch.bool, torch.uint8):
        assert dt in DTYPES


def same_bytes(a: torch.Tensor, b: torch.Tensor) -> bool:
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    if a.numel() == 0:
        return True
    return torch.equal(a.contiguous().view(-1).view(torch.uint8), b.contiguous().view(-1).view(torch.uint8))


shapes = st.lists(st.integers(0, 7), min_size=0, max_size=4).map(tuple)
tensor_specs = st.dictionaries(
    st.text(st.characters(codec="utf-8", exclude_characters="\x00"), min_size=1, max_size=12)
    .filter(lambda s: s != "__metadata__"),
    st.tuples(st.sampled_from(DTYPES), shapes),
    min_size=1,
    max_size=12,
)
metadata = st.none() | st.dictionaries(st.text(max_size=8), st.text(max_size=16), max_size=4)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(specs=tensor_specs, meta=metadata, seed=st.integers(0, 2**31 - 1),
       budget=st.sampled_from([4096, 65536, "1MiB"]), threads=st.sampled_from([1, 2, 5]))
def test_round_trip_against_safetensors_writer(tmp_path, specs, meta, seed, budget, threads):
    gen = torch.Generator().manual_seed(seed)
    tensors = {name: rand_tensor(shape, dt, gen) for name, (dt, shape) in specs.items()}
    path = tmp_path / f"rt{seed}.safetensors"
    save_file(tensors, str(path), metadata=meta)

    ckpt = fastfp8.open_checkpoint(path)
    assert set(ckpt.tensors) == set(tensors)
    assert ckpt.metadata == (meta or {})
    for name, t in tensors.items():
        info = ckpt.info(name)
        assert info.shape == tuple(t.shape) and info.torch_dtype == t.dtype
        assert same_bytes(ckpt.get(name), t), name

    seen = set()
    big = max(ckpt.info(n).nbytes for n in tensors)
    budget = max(big, fastfp8.units.parse_bytes(budget) if isinstance(budget, str) else budget)
    with ckpt.stream(memory_budget=budget, threads=threads) as stream:
        for name, t in stream:
            assert same_bytes(t, tensors[name]), name
            seen.add(name)
        assert stream.stats()["peak_in_flight"] <= budget
    assert seen == set(tensors)


def test_large_tensors_stream_and_view(tmp_path):
    gen = torch.Generator().manual_seed(1)
    tensors = {
        "big": rand_tensor((4096, 4099), torch.bfloat16, gen),  # ~32 MiB
        "f32": rand_tensor((1000, 1001), torch.float32, gen),
        "fp8": rand_tensor((3, 5000, 7), torch.float8_e4m3fn, gen),
    }
    path = tmp_path / "big.safetensors"
    save_file(tensors, str(path))
    ckpt = fastfp8.open_checkpoint(path)
    for name, t in ckpt.stream(memory_budget="40MiB", threads=4):
        assert same_bytes(t, tensors[name])
    for name, t in tensors.items():
        assert same_bytes(ckpt.get(name), t)


def test_stream_order_and_names(tmp_path):
    gen = torch.Generator().manual_seed(2)
    tensors = {f"t{i}": rand_tensor((i + 1, 3), torch.float16, gen) for i in range(10)}
    path = tmp_path / "o.safetensors"
    save_file(tensors, str(path))
    ckpt = fastfp8.open_checkpoint(path)
    wanted = ["t7", "t1", "t9"]
    assert [n for n, _ in ckpt.stream(wanted)] == wanted
    offsets = [ckpt.info(n).begin for n, _ in ckpt.stream()]
    assert offsets == sorted(offsets)
    with pytest.raises(fastfp8.CheckpointError, match="nope"):
        ckpt.stream(["nope"])


def _sharded(tmp_path, n_shards=3):
    gen = torch.Generator().manual_seed(3)
    weight_map, all_tensors = {}, {}
    for s in range(n_shards):
        shard = {f"layer{s}.w{i}": rand_tensor((8, 16), torch.bfloat16, gen) for i in range(3)}
        fname = f"model-{s + 1:05d}-of-{n_shards:05d}.safetensors"
        save_file(shard, str(tmp_path / fname), metadata={"format": "pt"})
        weight_map.update({k: fname for k in shard})
        all_tensors.update(shard)
    (tmp_path / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": 0}, "weight_map": weight_map}))
    return all_tensors


def test_sharded_directory(tmp_path):
    tensors = _sharded(tmp_path)
    ckpt = fastfp8.open_checkpoint(tmp_path)
    assert len(ckpt.shards) == 3 and len(ckpt) == len(tensors)
    got = {n: t.clone() for n, t in ckpt.stream(memory_budget="1MiB")}
    assert all(same_bytes(got[n], t) for n, t in tensors.items())


def test_single_file_directory(tmp_path):
    save_file({"a": torch.ones(2)}, str(tmp_path / "model.safetensors"))
    assert list(fastfp8.open_checkpoint(tmp_path).tensors) == ["a"]


def test_transformers_sharded_checkpoint(tmp_path):
    """A real sharded checkpoint written by transformers' save_pretrained."""
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, vocab_size=256)
    model = LlamaForCausalLM(cfg).to(torch.bfloat16)
    model.save_pretrained(tmp_path, max_shard_size="50KB")
    ckpt = fastfp8.open_checkpoint(tmp_path)
    assert len(ckpt.shards) > 1
    state = model.state_dict()
    for name, t in ckpt.stream():
        assert torch.equal(t, state[name]), name


def test_errors_are_fastfp8_errors(tmp_path):
    with pytest.raises(fastfp8.CheckpointNotFoundError):
        fastfp8.open_checkpoint(tmp_path / "missing")
    with pytest.raises(FileNotFoundError):
        fastfp8.open_checkpoint(tmp_path / "missing")
    with pytest.raises(fastfp8.CheckpointError, match="not a safetensors checkpoint"):
        fastfp8.open_checkpoint(tmp_path)

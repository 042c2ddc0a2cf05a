"""load_quantized end to end on real (tiny, random) transformers checkpoints: every
quantized byte and scale against compressed-tensors, every other tensor unchanged."""

from __future__ import annotations

import json

import fastfp8
import pytest
import torch
from ct_oracle import ct_quantize, same_bytes
from safetensors.torch import save_file

FP8 = torch.float8_e4m3fn
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)]


def tiny(arch: str, dtype=torch.bfloat16):
    import transformers as tf

    torch.manual_seed(0)
    common = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                  vocab_size=128, tie_word_embeddings=False)
    if arch == "llama":
        model = tf.LlamaForCausalLM(tf.LlamaConfig(intermediate_size=96, **common))
    elif arch == "qwen3_moe":
        model = tf.Qwen3MoeForCausalLM(tf.Qwen3MoeConfig(
            intermediate_size=96, moe_intermediate_size=32, num_experts=4, num_experts_per_tok=2,
            head_dim=16, **common))
    elif arch == "mixtral":
        model = tf.MixtralForCausalLM(tf.MixtralConfig(
            intermediate_size=48, num_local_experts=4, num_experts_per_tok=2, **common))
    elif arch == "llama4":
        model = tf.Llama4ForCausalLM(tf.Llama4TextConfig(
            intermediate_size=32, intermediate_size_mlp=96, num_local_experts=4, num_experts_per_tok=1,
            head_dim=16, interleave_moe_layer_step=1, **common))
    else:
        raise ValueError(arch)
    return model.to(dtype)


def save(model, path, shard="40KB"):
    model.save_pretrained(path, max_shard_size=shard)
    from safetensors import safe_open

    state = {}
    for f in sorted(path.glob("*.safetensors")):
        with safe_open(f, "pt") as g:
            state.update({k: g.get_tensor(k) for k in g.keys()})  # noqa: SIM118
    return state


def ct_quantize_experts(w: torch.Tensor):
    """compressed-tensors on a stack of experts, one 2-D weight at a time (as llm-compressor
    sees them, and as its 2-D-only Triton path on CUDA requires)."""
    qs, ss = zip(*(ct_quantize(w[e]) for e in range(w.shape[0])), strict=True)
    return torch.stack(qs), torch.stack(ss)


def check_linear(state, src, name, device):
    q, s = ct_quantize(src[name].to(device))
    assert state[name].dtype == FP8 and state[name].device.type == device
    assert same_bytes(state[name], q), name
    assert same_bytes(state[name + "_scale"], s), name


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("arch", ["llama", "qwen3_moe", "mixtral"])
def test_models_against_compressed_tensors(tmp_path, arch, device):
    src = save(tiny(arch), tmp_path)
    state = fastfp8.load_quantized(tmp_path, device=device, memory_budget="256KiB", chunk_bytes="16KiB")
    quantized = {n for n in src if n + "_scale" in state}
    for name in quantized:
        check_linear(state, src, name, device)
    for name in set(src) - quantized:
        assert same_bytes(state[name], src[name]), name
    # what must and must not be quantized
    assert all(".mlp.gate.weight" not in n and "block_sparse_moe.gate.weight" not in n for n in quantized)
    assert not any("embed_tokens" in n or "lm_head" in n or "norm" in n for n in quantized)
    assert any("self_attn.q_proj" in n for n in quantized)
    if arch != "llama":
        assert any(".experts.1." in n for n in quantized)
    assert set(state) == set(src) | {n + "_scale" for n in quantized}
    st = state.stats
    assert st.bytes_read == sum(t.numel() * t.element_size() for t in src.values())
    assert 0 < st.peak_in_flight <= 256 << 10
    ph = st.phases  # the setup's parts
    assert {"setup", "plan", "resolve", "reader", "pin"} <= set(ph)
    assert ph["pin"] <= ph["reader"] and ph["plan"] + ph["resolve"] + ph["reader"] <= ph["setup"] + 1e-6
    if device == "cuda":  # where the consumer thread's time went
        assert {"read_wait", "copy_wait", "issue", "job_end", "launch", "alloc", "release", "caller",
                "drain"} <= set(st.phases)
        assert st.phases["launch"] <= st.phases["job_end"] and st.phases["alloc"] <= st.phases["issue"]
        assert st.phases["reserve"] <= st.phases["alloc"] and st.phases["copy_wait"] <= st.phases["release"]
        assert all(v >= 0 for v in st.phases.values()), st.phases


@pytest.mark.parametrize("device", DEVICES)
def test_llama4_fused_experts(tmp_path, device):
    src = save(tiny("llama4"), tmp_path)
    state = fastfp8.load_quantized(tmp_path, device=device, memory_budget="1MiB", chunk_bytes="8KiB")
    fused = [n for n in src if n.endswith("experts.gate_up_proj")]
    assert fused
    for gu in fused:
        prefix = gu[: -len("gate_up_proj")]
        for src_name, out in [(gu, "w13_weight"), (prefix + "down_proj", "w2_weight")]:
            w = src[src_name]  # [E, in, out]
            q, s = ct_quantize_experts(w.transpose(1, 2).contiguous().to(device))  # [E, out, in]
            assert state[prefix + out].shape == (w.shape[0], w.shape[2], w.shape[1])
            assert same_bytes(state[prefix + out], q), src_name
            assert same_bytes(state[prefix + out + "_scale"], s), src_name
            assert src_name not in state
        # gate rows first, then up: rows [0, I) of w13 come from gate_up_proj[..., :I]
        inter = src[gu].shape[2] // 2
        gate_q, _ = ct_quantize_experts(src[gu][..., :inter].transpose(1, 2).contiguous().to(device))
        assert same_bytes(state[prefix + "w13_weight"][:, :inter], gate_q)
    assert not any(n.endswith("router.weight_scale") for n in state)
    assert any(n.endswith("shared_expert.gate_proj.weight_scale") for n in state)


def test_pr27280_ignore_list(tmp_path):
    src = save(tiny("llama4"), tmp_path)
    ignore = ["re:.*self_attn", "re:.*lm_head", "re:.*router", "re:.*vision_model",
              "re:.*multi_modal_projector", "re:.*shared_expert"]
    state = fastfp8.load_quantized(tmp_path, device="cpu", ignore=ignore)
    quantized = {n[: -len("_scale")] for n in state if n.endswith("_scale")}
    assert not any("self_attn" in n or "shared_expert" in n for n in quantized)
    assert any(n.endswith("experts.w13_weight") for n in quantized)
    for n in src:
        if "self_attn" in n:
            assert same_bytes(state[n], src[n])


def test_exact_names_and_default_ignore_off(tmp_path):
    src = save(tiny("llama"), tmp_path)
    state = fastfp8.load_quantized(tmp_path, device="cpu", ignore=["model.layers.0.mlp.down_proj"],
                                   default_ignore=False)
    assert state["model.layers.0.mlp.down_proj.weight"].dtype == torch.bfloat16
    assert state["model.layers.1.mlp.down_proj.weight"].dtype == FP8
    check_linear(state, src, "lm_head.weight", "cpu")
    with pytest.raises(ValueError, match=r"bad ignore pattern"):
        fastfp8.load_quantized(tmp_path, device="cpu", ignore=["re:("])


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32, torch.bfloat16])
def test_source_dtypes_and_odd_shapes(tmp_path, dtype):
    gen = torch.Generator().manual_seed(5)
    shapes = [(1, 1), (1, 37), (37, 1), (17, 33), (129, 250), (3, 4096)]
    tensors = {}
    for i, shape in enumerate(shapes):
        w = torch.randn(*shape, generator=gen).to(dtype)
        if i == 3:
            w[2] = 0  # a zero row
            w[4] = 1e-6  # tiny values: subnormal after scaling
            w[5, 3] = 3e4  # a huge value
        tensors[f"m{i}.proj.weight"] = w
    tensors["m0.proj.bias"] = torch.randn(5, generator=gen).to(dtype)
    tensors["ints.weight"] = torch.arange(6, dtype=torch.int64).reshape(2, 3)
    path = tmp_path / "model.safetensors"
    save_file(tensors, str(path))
    state = fastfp8.load_quantized(path, device="cpu")
    for name, w in tensors.items():
        if w.dtype == dtype and w.ndim == 2:
            q, s = ct_quantize(w)
            assert s.dtype == dtype
            assert same_bytes(state[name], q) and same_bytes(state[name + "_scale"], s), name
        else:
            assert same_bytes(state[name], w)


@pytest.mark.parametrize("device", DEVICES)
def test_non_finite_weights_are_named(tmp_path, device):
    """Every weight's scales are checked once at the end, grouped by dtype (bf16, fp16 here)."""
    w = torch.randn(8, 16, dtype=torch.bfloat16)
    bad = w.clone()
    bad[3, 4] = float("nan")
    inf = w.clone()
    inf[0, 0] = float("inf")
    half = w.to(torch.float16)
    half_inf = half.clone()
    half_inf[7, 15] = float("-inf")
    save_file({"a.weight": w, "b.weight": bad, "c.weight": inf, "d.weight": half, "e.weight": half_inf},
              str(tmp_path / "model.safetensors"))
    with pytest.raises(fastfp8.NonFiniteWeightError, match=r"b\.weight.*c\.weight.*e\.weight"):
        fastfp8.load_quantized(tmp_path, device=device)
    state = fastfp8.load_quantized(tmp_path, device=device, allow_non_finite=True)
    assert state.stats.non_finite == ["b.weight", "c.weight", "e.weight"]
    assert same_bytes(state["a.weight"], ct_quantize(w.to(device))[0])  # as compressed-tensors on that device


def test_errors_name_file_and_tensor(tmp_path):
    with pytest.raises(fastfp8.CheckpointNotFoundError):
        fastfp8.load_quantized(tmp_path / "nope", device="cpu")
    save_file({"w.weight": torch.randn(64, 64)}, str(tmp_path / "model.safetensors"))
    with pytest.raises(ValueError, match="byte size"):
        fastfp8.load_quantized(tmp_path, device="cpu", memory_budget="much")
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"w.weight": "gone.safetensors"}}))
    with pytest.raises(fastfp8.CheckpointError, match=r"gone\.safetensors"):
        fastfp8.load_quantized(tmp_path, device="cpu")


@pytest.mark.parametrize("shape", [[1 << 29, 0], [1 << 45, 0], [0, 1 << 40], [3_000_000, 0, 0]])
@pytest.mark.parametrize("name", ["m.layers.0.mlp.up_proj.weight", "m.layers.0.feed_forward.experts.gate_up_proj"])
def test_empty_tensors_cost_nothing_whatever_their_other_dimensions(raw_file, shape, name):
    """A zero-size tensor may declare any other dimension (the header is a few bytes): it
    is passed through as an empty tensor, with no work or memory by its dimensions."""
    import time

    if len(shape) != 3 and "experts" in name:
        shape = [*shape, 8]
    path = raw_file({name: {"dtype": "BF16", "shape": shape, "data_offsets": [0, 0]},
                     "b.weight": {"dtype": "BF16", "shape": [2, 4], "data_offsets": [0, 16]}}, bytes(range(16)))
    t0 = time.perf_counter()
    state = fastfp8.load_quantized(path, device="cpu")
    assert time.perf_counter() - t0 < 10
    assert state[name].shape == tuple(shape) and state[name].numel() == 0 and state[name].dtype == torch.bfloat16
    assert name + "_scale" not in state and state["b.weight"].dtype == FP8


def test_no_gpu_is_a_clear_error(tmp_path):
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    save_file({"w.weight": torch.randn(8, 8)}, str(tmp_path / "model.safetensors"))
    with pytest.raises(fastfp8.Error, match=r"no CUDA GPU.*device='cpu'"):
        fastfp8.load_quantized(tmp_path)  # device="cuda" by default


@pytest.mark.cuda
def test_cuda_peak_memory_is_bounded(tmp_path):
    gen = torch.Generator().manual_seed(9)
    tensors = {f"l{i}.proj.weight": torch.randn(1024, 2048, generator=gen).to(torch.bfloat16) for i in range(12)}
    tensors["embed_tokens.weight"] = torch.randn(4096, 1024, generator=gen).to(torch.bfloat16)
    save_file(tensors, str(tmp_path / "model.safetensors"))
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    state = fastfp8.load_quantized(tmp_path, device="cuda", memory_budget="16MiB", chunk_bytes="1MiB")
    peak = torch.cuda.max_memory_allocated() - base
    final = sum(t.numel() * t.element_size() for t in state.values())
    largest = 1024 * 2048 * 2
    assert peak <= final + 2 * largest + (1 << 20), (peak, final, largest)
    for name in tensors:
        if name.startswith("l"):
            check_linear(state, tensors, name, "cuda")


@pytest.mark.cuda
def test_reserve_device_memory_serves_large_outputs_from_one_segment(monkeypatch):
    """``reserve_device_memory``: one cached segment that the large-pool tensors of the given
    sizes then come from (no segment added while they are allocated); nothing to do when
    none is large, when the cache already holds that much free memory, or when the device
    lacks the headroom beside it. (The headroom is set to nothing for the rest: the suite's
    other workers on the same GPU may leave less than the default 1 GiB free. The largest
    size grows by the free memory this process's cache still holds after ``empty_cache``:
    a segment that an earlier test's tensor keeps, whose free rest already serves a small
    reservation.)"""
    from fastfp8 import engine
    from fastfp8.engine import reserve_device_memory

    dev = torch.device("cuda", torch.cuda.current_device())
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    cached_free = torch.cuda.memory_reserved(dev) - torch.cuda.memory_allocated(dev)
    sizes = [3 << 20, (5 << 20) + 7, 100, 1 << 20, (64 << 20) + 513 + cached_free]
    assert not reserve_device_memory(dev, [100, 1 << 20])
    monkeypatch.setattr(engine, "RESERVE_HEADROOM", torch.cuda.mem_get_info(dev)[1])
    assert not reserve_device_memory(dev, sizes)  # never that much free beside it
    monkeypatch.setattr(engine, "RESERVE_HEADROOM", 0)
    assert reserve_device_memory(dev, sizes)
    segments = torch.cuda.memory_stats(dev)["segment.large_pool.current"]
    reserved = torch.cuda.memory_reserved(dev)
    kept = [torch.empty(n, dtype=torch.uint8, device=dev) for n in sizes if n > 1 << 20]
    assert torch.cuda.memory_stats(dev)["segment.large_pool.current"] == segments
    assert torch.cuda.memory_reserved(dev) == reserved
    del kept
    assert not reserve_device_memory(dev, sizes)  # cached and free already


@pytest.mark.cuda
@pytest.mark.parametrize(("reserve", "driver_copy", "merge"), [(True, True, 0), (False, False, 0), (True, False, 4),
                                                               (False, True, 4)])
@pytest.mark.parametrize("quantize_on", ["device", "host", "split", "adaptive"])
def test_cuda_consumer_variants_give_the_same_bytes(tmp_path, monkeypatch, reserve, driver_copy, merge, quantize_on):
    """The consumer's variants (outputs reserved up front or not; copies queued through the
    driver or by torch; ready chunks merged or not) load the same bytes, whichever side
    quantizes."""
    from fastfp8 import engine

    monkeypatch.setattr(engine, "RESERVE_OUTPUTS", reserve)
    monkeypatch.setattr(engine, "DRIVER_COPY", driver_copy)
    monkeypatch.setattr(engine, "MERGE_SHARE", merge)
    gen = torch.Generator().manual_seed(3)
    tensors = {f"l{i}.proj.weight": torch.randn(768, 1536, generator=gen).to(torch.bfloat16) for i in range(6)}
    tensors["embed_tokens.weight"] = torch.randn(2048, 768, generator=gen).to(torch.bfloat16)
    save_file(tensors, str(tmp_path / "model.safetensors"))
    torch.cuda.empty_cache()
    state = fastfp8.load_quantized(tmp_path, device="cuda", memory_budget="4MiB", chunk_bytes="512KiB",
                                   quantize_on=quantize_on)
    for name in tensors:
        if name.startswith("l"):
            check_linear(state, tensors, name, "cuda")
    assert same_bytes(state["embed_tokens.weight"], tensors["embed_tokens.weight"])
    assert state.stats.phases["room_wait"] >= 0
    if quantize_on != "adaptive":  # adaptive: the threads decide, either way
        assert (state.stats.host_quantized > 0) == (quantize_on != "device")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_the_finiteness_check_of_scales_agrees_with_torch_on_every_bit_pattern(dtype):
    """The load's check of its scales reads their bit patterns in numpy (torch's own ops ran
    on its intra-op thread pool): the same answer as ``torch.isfinite`` for every 16-bit
    pattern, and for fp32's specials, subnormals and extremes."""
    from fastfp8.engine import _finite

    if dtype == torch.float32:
        x = torch.tensor([0.0, -0.0, 1e-45, -1e-40, 3.0, 3.4e38, -3.4e38, float("inf"), float("-inf"),
                          float("nan"), -float("nan")])
        x = torch.cat([x, torch.randn(10000) * 1e30])
    else:
        x = torch.arange(-32768, 32768, dtype=torch.int32).to(torch.int16).view(dtype)
    assert (_finite(x.to(dtype)) == torch.isfinite(x.to(dtype)).numpy()).all()

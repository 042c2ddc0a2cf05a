"""fastfp8's vLLM plugin against the real ``vllm`` package, on the CPU.

Runs only where vLLM is installed (its own venv: ``make test-vllm``); skipped elsewhere.
With no GPU, vLLM's CPU platform is selected (``VLLM_TARGET_DEVICE=cpu``): vLLM then
builds its real model classes with the compressed-tensors W8A8 FP8 scheme and our loader
fills them. What cannot run here: vLLM's FP8 kernels (the weight post-processing into
kernel layout is skipped, no forward pass), and an engine (``vllm serve``).
"""

from __future__ import annotations

import os
import socket

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("VLLM_TARGET_DEVICE", "cpu")
# (a submodule: in a venv without vLLM this very folder, tests/vllm, imports as "vllm")
pytest.importorskip("vllm.model_executor.model_loader", reason="vLLM is not installed (see make test-vllm)")

from ct_oracle import ct_quantize, same_bytes
from fastfp8 import vllm_plugin as vp
from test_load import save, tiny

FP8 = torch.float8_e4m3fn


def test_entry_point_loads_and_registering_twice_is_harmless(monkeypatch):
    from importlib.metadata import entry_points

    import vllm.model_executor.model_loader as ml
    from vllm.plugins import load_plugins_by_group

    eps = [ep for ep in entry_points(group="vllm.general_plugins") if ep.name == "fastfp8"]
    assert len(eps) == 1 and eps[0].value == "fastfp8.vllm_plugin:register"
    assert eps[0].load() is vp.register
    plugins = load_plugins_by_group("vllm.general_plugins")  # what vLLM runs in every process
    assert plugins["fastfp8"] is vp.register

    calls = []
    real = ml.register_model_loader
    monkeypatch.setattr(ml, "register_model_loader", lambda fmt: calls.append(fmt) or real(fmt))
    monkeypatch.setattr(vp, "_registered", False)
    ml._LOAD_FORMAT_TO_MODEL_LOADER.pop("fastfp8", None)
    for _ in range(3):
        plugins["fastfp8"]()
    assert calls == ["fastfp8"]  # registered once: no "already registered" warning
    assert ml._LOAD_FORMAT_TO_MODEL_LOADER["fastfp8"] is vp.Fastfp8ModelLoader
    monkeypatch.setattr(vp, "_registered", False)  # a fresh module state, the table already holding us
    vp.register()
    assert calls == ["fastfp8"]


def test_get_model_loader_returns_ours_with_options():
    from vllm.config.load import LoadConfig
    from vllm.model_executor.model_loader import BaseModelLoader, get_model_loader

    vp.register()
    loader = get_model_loader(LoadConfig(load_format="fastfp8", model_loader_extra_config={
        "ignore": ["re:.*self_attn"], "memory_budget": "256MiB", "threads": 2}))
    assert type(loader).__name__ == "Fastfp8ModelLoader" and isinstance(loader, BaseModelLoader)
    assert loader.options.ignore == ("re:.*self_attn",) and loader.options.threads == 2
    with pytest.raises(ValueError, match="unknown"):
        get_model_loader(LoadConfig(load_format="fastfp8", model_loader_extra_config={"enable_multithread_load": 1}))


# ---------------------------------------------------------------------------------------
# building and loading real vLLM models on the CPU


@pytest.fixture(scope="module")
def dist():
    """vLLM's distributed state, world size 1 (once per process)."""
    from vllm.distributed import init_distributed_environment, initialize_model_parallel
    from vllm.distributed.parallel_state import model_parallel_is_initialized

    if not model_parallel_is_initialized():
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        from vllm.config import VllmConfig, set_current_vllm_config

        with set_current_vllm_config(VllmConfig()):
            init_distributed_environment(world_size=1, rank=0, local_rank=0, backend="gloo",
                                         distributed_init_method=f"tcp://127.0.0.1:{port}")
            initialize_model_parallel(1, 1)
    yield


def row_set(w: torch.Tensor, s: torch.Tensor) -> list[bytes]:
    """The rows of an fp8 weight, each with its scale, as a sorted list of bytes."""
    w, s = w.detach().cpu().contiguous(), s.detach().cpu().float().contiguous()
    return sorted(bytes(w[i].view(torch.uint8).numpy()) + bytes(s[i].view(torch.uint8).numpy())
                  for i in range(w.shape[0]))


def configs(path, extra=None, **model_kwargs):
    from vllm.config import DeviceConfig, ModelConfig, VllmConfig
    from vllm.config.load import LoadConfig

    mc = ModelConfig(model=str(path), dtype="bfloat16", skip_tokenizer_init=True, **model_kwargs)
    lc = LoadConfig(load_format="fastfp8", model_loader_extra_config=extra or {})
    device = "cuda" if torch.cuda.is_available() else "cpu"
    return VllmConfig(model_config=mc, load_config=lc, device_config=DeviceConfig(device=device)), mc, lc


def load(monkeypatch, path, extra=None, **model_kwargs):
    """vLLM's own ``loader.load_model`` with our loader; returns (model, vllm_config,
    model_config, [(name, dtype, shape)] streamed into ``model.load_weights``)."""
    import vllm.model_executor.model_loader.base_loader as bl
    from vllm.config import set_current_vllm_config
    from vllm.model_executor.model_loader import get_model_loader

    if not torch.cuda.is_available():
        # the FP8 kernels' weight post-processing needs a GPU kernel backend: keep the
        # parameters as loaded (checkpoint layout) instead
        monkeypatch.setattr(bl, "process_weights_after_loading", lambda *a, **k: None)
    vp.register()
    vc, mc, lc = configs(path, extra, **model_kwargs)
    streamed: list[tuple[str, torch.dtype, tuple]] = []
    loader = get_model_loader(lc)
    real_weights = type(loader).get_all_weights

    def spy(self, model_config, model=None):
        for name, t in real_weights(self, model_config, model):
            streamed.append((name, t.dtype, tuple(t.shape)))
            yield name, t

    monkeypatch.setattr(type(loader), "get_all_weights", spy)
    with set_current_vllm_config(vc):
        model = loader.load_model(vc, mc)
    return model, vc, mc, streamed


@pytest.mark.parametrize("arch", ["llama", "qwen3_moe", "llama4"])
def test_load_model_allocates_fp8_and_fills_it(tmp_path, monkeypatch, dist, arch):
    from vllm.model_executor.layers.linear import LinearBase
    from vllm.model_executor.layers.quantization.compressed_tensors.compressed_tensors import (
        CompressedTensorsConfig,
        CompressedTensorsLinearMethod,
    )
    from vllm.model_executor.layers.quantization.compressed_tensors.schemes import CompressedTensorsW8A8Fp8

    src = save(tiny(arch), tmp_path)
    model, vc, mc, streamed = load(monkeypatch, tmp_path)

    # the injected config: compressed-tensors, FP8 channel weights, dynamic per-token activations
    assert mc.quantization == "compressed-tensors"
    assert isinstance(vc.quant_config, CompressedTensorsConfig)
    qc = mc.hf_config.quantization_config
    assert vp.is_fp8_channel_config(qc) and "lm_head" in qc["ignore"]
    assert any(e.startswith("model.embed_tokens") for e in qc["ignore"])

    # every linear but the ignored ones runs vLLM's W8A8 FP8 scheme, channel weights, dynamic input
    linears = {n: m for n, m in model.named_modules() if isinstance(m, LinearBase)}
    assert linears
    for name, m in linears.items():
        ignored = name.endswith(("lm_head", ".gate", ".router"))
        if ignored:
            assert not isinstance(m.quant_method, CompressedTensorsLinearMethod), name
            assert m.weight.dtype == torch.bfloat16, name
            continue
        assert isinstance(m.scheme, CompressedTensorsW8A8Fp8), name
        assert m.scheme.strategy == "channel" and not m.scheme.is_static_input_scheme, name
        assert m.weight.dtype == FP8 and m.weight_scale.shape == (m.weight.shape[0], 1), name

    # vLLM allocated FP8 for every quantized weight: no bf16 2-D/3-D weight but the ignored
    params = dict(model.named_parameters())
    for name, p in params.items():
        if p.dim() >= 2 and p.dtype != FP8 and not name.endswith("_scale"):
            assert any(k in name for k in ("embed_tokens", "lm_head", ".gate.", ".router.")), name

    # the stream: compressed-tensors names, FP8 [out, in] weights, [out, 1] scales in bf16
    for name, dtype, shape in streamed:
        if name.endswith("_scale"):
            assert dtype == torch.bfloat16 and shape[-1] == 1, name
            w = next(s for s in streamed if s[0] == name[: -len("_scale")])
            assert w[1] == FP8 and w[2][0] == shape[0] and len(w[2]) == 2, name
    assert {n for n, *_ in streamed} >= {n for n in src if not n.endswith(("gate_up_proj", "experts.down_proj"))}

    # ... and the bytes vLLM holds are compressed-tensors' own
    def rows(*names):
        qs, ss = zip(*(ct_quantize(w) for w in names), strict=True)
        return torch.cat(qs), torch.cat(ss)

    for layer in range(2):
        p = f"model.layers.{layer}"
        attn = [src[f"{p}.self_attn.{x}_proj.weight"] for x in "qkv"]
        q, s = rows(*attn)
        got_q, got_s = params[f"{p}.self_attn.qkv_proj.weight"], params[f"{p}.self_attn.qkv_proj.weight_scale"]
        if arch == "llama4":  # vLLM permutes Llama4's q/k rows for its rotary layout: compare row sets
            assert row_set(got_q, got_s) == row_set(q, s.float())
        else:
            assert same_bytes(got_q, q)
            assert torch.equal(got_s, s.float())
        if arch == "llama":
            q, s = rows(src[f"{p}.mlp.gate_proj.weight"], src[f"{p}.mlp.up_proj.weight"])
            assert same_bytes(params[f"{p}.mlp.gate_up_proj.weight"], q)
            assert torch.equal(params[f"{p}.mlp.gate_up_proj.weight_scale"], s.float())
        else:
            moe = f"{p}.mlp.experts" if arch == "qwen3_moe" else f"{p}.feed_forward.experts"
            w13 = next(v for k, v in params.items() if k.startswith(moe) and k.endswith("w13_weight"))
            w13_s = next(v for k, v in params.items() if k.startswith(moe) and k.endswith("w13_weight_scale"))
            w2 = next(v for k, v in params.items() if k.startswith(moe) and k.endswith("w2_weight"))
            for e in range(w13.shape[0]):
                if arch == "qwen3_moe":
                    gate, up = (src[f"{moe}.{e}.{x}_proj.weight"] for x in ("gate", "up"))
                    down = src[f"{moe}.{e}.down_proj.weight"]
                else:  # fused [E, in, out] in the bf16 checkpoint
                    gu = src[f"{moe}.gate_up_proj"][e]
                    inter = gu.shape[1] // 2
                    gate, up = gu[:, :inter].t().contiguous(), gu[:, inter:].t().contiguous()
                    down = src[f"{moe}.down_proj"][e].t().contiguous()
                q, s = rows(gate, up)
                assert same_bytes(w13[e], q), (moe, e)
                assert torch.equal(w13_s[e], s.float()), (moe, e)
                assert same_bytes(w2[e], ct_quantize(down)[0]), (moe, e)
    assert torch.equal(params["lm_head.weight"], src["lm_head.weight"])
    assert torch.equal(params["model.embed_tokens.weight"], src["model.embed_tokens.weight"])


def test_ignore_option_reaches_vllm(tmp_path, monkeypatch, dist):
    src = save(tiny("llama"), tmp_path)
    model, _, mc, _ = load(monkeypatch, tmp_path, {"ignore": ["re:.*self_attn"]})
    params = dict(model.named_parameters())
    qkv = params["model.layers.0.self_attn.qkv_proj.weight"]
    assert qkv.dtype == torch.bfloat16
    assert torch.equal(qkv, torch.cat([src[f"model.layers.0.self_attn.{x}_proj.weight"] for x in "qkv"]))
    assert params["model.layers.0.self_attn.o_proj.weight"].dtype == torch.bfloat16
    assert params["model.layers.0.mlp.down_proj.weight"].dtype == FP8
    assert "model.layers.1.self_attn.k_proj" in mc.hf_config.quantization_config["ignore"]


def test_existing_quantization_configs(tmp_path, monkeypatch, dist):
    save(tiny("llama"), tmp_path)
    # the same FP8 config passed by hand (PR 27280 style --hf-overrides) is used as it is
    _, _, qc = vp.plan(tmp_path, vp.parse_options(None))
    qc = dict(qc, ignore=["lm_head", "model.embed_tokens", "model.layers.0.mlp.down_proj"])
    model, _, mc, _ = load(monkeypatch, tmp_path, hf_overrides={"quantization_config": qc})
    params = dict(model.named_parameters())
    assert params["model.layers.0.mlp.down_proj.weight"].dtype == torch.bfloat16
    assert params["model.layers.1.mlp.down_proj.weight"].dtype == FP8
    # anything else is refused, with a message that says why
    from vllm.config import set_current_vllm_config

    vc, mc, _ = configs(tmp_path)
    mc.hf_config.quantization_config = {"quant_method": "gptq", "bits": 4}
    with set_current_vllm_config(vc), pytest.raises(ValueError, match="already quantized"):
        vp.inject_quantization_config(vc, mc, qc)

"""Whole quantized models: tiny random transformers checkpoints (Llama, Qwen3-MoE, Mixtral,
Llama4 text) saved in bf16, rebuilt by ``build_quantized_model`` with Fp8Linear / Fp8MoE,
compared with the bf16 model (logits SQNR and top-1 agreement, with floors), and
``generate()`` run. A ``cuda`` variant does the same on the GPU (W8A8 compute)."""

from __future__ import annotations

import copy
import os
import zlib

import pytest
import torch
from fastfp8.model import Fp8Llama4TextMoe, Fp8SparseMoeBlock, build_quantized_model, quantize_model
from fastfp8.modules import Fp8Linear, Fp8MoE

FP8 = torch.float8_e4m3fn
SEED = int(os.environ.get("FASTFP8_TEST_SEED", "0"))
ARCHS = ["llama", "qwen3_moe", "mixtral", "llama4"]
#: floors on random-init tiny models (measured on the CPU, W8A16, 3 seeds x 4 archs:
#: logits SQNR 24.8-26.8 dB, top-1 agreement 0.90-0.94 over 192 positions)
CPU_FLOORS = dict(sqnr=22.0, top1=0.85)
CUDA_FLOORS = dict(sqnr=18.0, top1=0.75)


def tiny(arch: str, *, tie: bool = False, seed: int = 0):
    """A small random model (transformers' default init, std 0.02)."""
    import transformers as tf

    torch.manual_seed(zlib.crc32(repr((SEED, arch, tie, seed)).encode()))
    common = dict(hidden_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                  vocab_size=512, tie_word_embeddings=tie, max_position_embeddings=256)
    if arch == "llama":
        model = tf.LlamaForCausalLM(tf.LlamaConfig(intermediate_size=256, **common))
    elif arch == "qwen3_moe":
        model = tf.Qwen3MoeForCausalLM(tf.Qwen3MoeConfig(
            intermediate_size=256, moe_intermediate_size=64, num_experts=8, num_experts_per_tok=2, head_dim=32,
            norm_topk_prob=True, **common))
    elif arch == "mixtral":
        model = tf.MixtralForCausalLM(tf.MixtralConfig(
            intermediate_size=96, num_local_experts=8, num_experts_per_tok=2, **common))
    elif arch == "llama4":
        model = tf.Llama4ForCausalLM(tf.Llama4TextConfig(
            intermediate_size=64, intermediate_size_mlp=256, num_local_experts=4, num_experts_per_tok=1,
            head_dim=32, interleave_moe_layer_step=1, **common))
    else:
        raise ValueError(arch)
    return model.to(torch.bfloat16).eval()


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """arch -> (directory, bf16 reference model loaded back by transformers)."""
    import transformers as tf

    out = {}
    for arch in ARCHS:
        d = tmp_path_factory.mktemp(arch)
        tiny(arch).save_pretrained(d, max_shard_size="200KB")
        ref = tf.AutoModelForCausalLM.from_pretrained(d, dtype=torch.bfloat16).eval()
        out[arch] = (d, ref)
    return out


def sqnr(out: torch.Tensor, ref: torch.Tensor) -> float:
    out, ref = out.double(), ref.double()
    assert torch.isfinite(out).all()
    return float(10 * torch.log10(ref.pow(2).sum() / (out - ref).pow(2).sum()))


def inputs(vocab: int, device) -> torch.Tensor:
    g = torch.Generator().manual_seed(zlib.crc32(repr((SEED, "ids")).encode()))
    return torch.randint(0, vocab, (4, 48), generator=g).to(device)


def compare(model, ref, device, floors) -> dict[str, float]:
    ids = inputs(model.config.vocab_size, device)
    if device != "cpu":
        ref = copy.deepcopy(ref).to(device)
    with torch.no_grad():
        lq = model(ids).logits.float()
        lr = ref(ids).logits.float()
    res = dict(sqnr=sqnr(lq, lr), top1=float((lq.argmax(-1) == lr.argmax(-1)).float().mean()))
    assert res["sqnr"] >= floors["sqnr"], res
    assert res["top1"] >= floors["top1"], res
    return res


def check_structure(model, arch):
    assert not any(p.is_meta for p in model.parameters())
    assert not any(b.is_meta for b in model.buffers())
    lins = [m for m in model.modules() if isinstance(m, Fp8Linear)]
    assert len(lins) >= 2 * 4  # q/k/v/o of both layers at least
    assert all(m.weight.dtype == FP8 for m in lins)
    # nothing quantized stayed behind in bf16 (the ignored ones: embeddings, lm_head, routers)
    plain = [n for n, m in model.named_modules() if type(m) is torch.nn.Linear]
    assert all(n == "lm_head" or n.endswith((".gate", ".router")) for n in plain), plain
    moes = [m for m in model.modules() if isinstance(m, Fp8MoE)]
    if arch == "llama":
        assert not moes
    else:
        assert len(moes) == 2
        wrapper = Fp8Llama4TextMoe if arch == "llama4" else Fp8SparseMoeBlock
        assert sum(isinstance(m, wrapper) for m in model.modules()) == 2
        e = model.config.num_local_experts if arch != "qwen3_moe" else model.config.num_experts
        assert all(m.w13_weight.shape[0] == e and m.w13_weight.dtype == FP8 for m in moes)


@pytest.mark.parametrize("arch", ARCHS)
def test_model_cpu(checkpoints, arch):
    path, ref = checkpoints[arch]
    model = build_quantized_model(path, device="cpu", memory_budget="1MiB", chunk_bytes="64KiB")
    check_structure(model, arch)
    assert model.load_stats.quantized > 0
    compare(model, ref, "cpu", CPU_FLOORS)
    ids = inputs(model.config.vocab_size, "cpu")[:2, :6]
    out = model.generate(ids, max_new_tokens=6, do_sample=False)
    assert out.shape == (2, 12) and torch.equal(out[:, :6], ids)
    assert int(out.max()) < model.config.vocab_size


def test_ignored_layers_stay_bf16(checkpoints):
    path, ref = checkpoints["qwen3_moe"]
    model = build_quantized_model(path, device="cpu", ignore=["re:.*self_attn", "re:.*experts"])
    assert not any(isinstance(m, (Fp8MoE, Fp8Linear)) for m in model.modules())
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())
    ids = inputs(model.config.vocab_size, "cpu")
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, ref(ids).logits, rtol=0, atol=0)


def test_tied_embeddings_and_quantize_model(tmp_path):
    import transformers as tf
    from fastfp8 import load_quantized

    tiny("llama", tie=True).save_pretrained(tmp_path)
    ref = tf.AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.bfloat16).eval()
    model = build_quantized_model(tmp_path, device="cpu")
    assert model.lm_head.weight is model.model.embed_tokens.weight
    compare(model, ref, "cpu", CPU_FLOORS)
    # quantize_model on a model built by hand, with a state whose tensors it must not copy
    state = load_quantized(tmp_path, device="cpu")
    with torch.device("meta"):
        meta = tf.AutoModelForCausalLM.from_config(tf.AutoConfig.from_pretrained(tmp_path), dtype=torch.bfloat16)
    quantize_model(meta, state)
    name = "model.layers.0.self_attn.q_proj"
    assert meta.get_submodule(name).weight.data_ptr() == state[name + ".weight"].data_ptr()
    assert meta.model.embed_tokens.weight.data_ptr() == state["model.embed_tokens.weight"].data_ptr()


def test_missing_weights_are_named(tmp_path):
    from safetensors.torch import load_file, save_file

    tiny("llama").save_pretrained(tmp_path)
    f = next(tmp_path.glob("*.safetensors"))
    tensors = load_file(f)
    del tensors["model.norm.weight"]
    save_file(tensors, str(f), metadata={"format": "pt"})
    with pytest.raises(KeyError, match=r"model\.norm\.weight"):
        build_quantized_model(tmp_path, device="cpu")


@pytest.mark.cuda
@pytest.mark.parametrize("arch", ARCHS)
def test_model_cuda(checkpoints, arch):
    if torch.cuda.get_device_capability() < (8, 9):
        pytest.skip("needs fp8 (sm89+)")
    path, ref = checkpoints[arch]
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    model = build_quantized_model(path, device="cuda")
    check_structure(model, arch)
    assert all(p.device.type == "cuda" for p in model.parameters())
    assert all(b.device.type == "cuda" for b in model.buffers())
    final = torch.cuda.memory_allocated() - base
    res = compare(model, ref, "cuda", CUDA_FLOORS)
    print(f"{arch}: logits SQNR {res['sqnr']:.1f} dB, top-1 {res['top1']:.3f}, {final / 2**20:.2f} MiB on the GPU")
    ids = inputs(model.config.vocab_size, "cuda")[:2, :6]
    out = model.generate(ids, max_new_tokens=8, do_sample=False)
    assert out.shape == (2, 14) and torch.equal(out[:, :6], ids)
    # decode steps (2 rows: GEMV, Triton W8A16 MoE) agree with a prefill of the same tokens
    # (98 rows: act-quant + _scaled_mm, grouped / W8A8 MoE)
    ids = inputs(model.config.vocab_size, "cuda")[:2]
    gen = model.generate(ids, max_new_tokens=2, do_sample=False, output_logits=True, return_dict_in_generate=True)
    with torch.no_grad():
        prefill = model(gen.sequences[:, :-1]).logits[:, -1].float()
    decode = gen.logits[1].float()
    print(f"{arch}: decode vs prefill logits SQNR {sqnr(decode, prefill):.1f} dB")
    assert sqnr(decode, prefill) > 15


def test_bench_decode_smoke_cpu(tmp_path):
    """benches/bench_decode.py end to end on tiny models on the CPU (no compilation): the
    checkpoint it writes, build_quantized_model, logits SQNR, prefill, generate() timings
    and the keys it merges into the benchmark JSON."""
    import importlib.util
    import json
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "benches" / "bench_decode.py"
    spec = importlib.util.spec_from_file_location("bench_decode", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    out = tmp_path / "modules.json"
    out.write_text(json.dumps({"gpu": "x", "targets": {"decode_speedup_b1": 1.5},
                               "e2e": {"models": {"older": {"layers": 2}, "llama8b": {"stale": True}}}}))
    rc = mod.main(["--device", "cpu", "--tiny", "--layers", "1", "--moe-layers", "1", "--backend", "none",
                   "--n1", "2", "--n2", "4", "--prefill", "16", "--prompt", "4", "--batches", "1,2",
                   "--no-compiled-prefill", "--decode-host", "gc_frozen,skip_guards,deferred_stop+gc_frozen",
                   "--order", "fp8,bf16", "--out", str(out)])
    rep = json.loads(out.read_text())
    assert rep["gpu"] == "x" and not rep["e2e"]["errors"], rep["e2e"]["errors"]
    # a model of an earlier run stays, marked; one measured again is replaced
    assert set(rep["e2e"]["models"]) == {"llama8b", "qwen3moe", "older"}
    assert rep["e2e"]["models"]["older"] == {"layers": 2, "earlier_run": True}
    assert "stale" not in rep["e2e"]["models"]["llama8b"]
    for key in ("prefill_speedup_16", "moe_prefill_speedup_16", "logits_sqnr_8b", "logits_sqnr_moe"):
        assert rep[key] is not None and rep[key] > 0, key
    assert rep["logits_sqnr_8b"] > 20 and rep["logits_sqnr_moe"] > 15
    assert "decode_speedup_b1" in rep["targets_met"]
    llama = rep["e2e"]["models"]["llama8b"]
    assert all(f"decode_b{b}_{t}" in llama or f"decode_b{b}_{t}_error" in llama for b in (1, 2)
               for t in ("bf16", "fp8"))
    for b, t in ((1, "bf16"), (1, "fp8"), (2, "bf16"), (2, "fp8")):
        if f"decode_b{b}_{t}" in llama:  # each step also timed with the host's share trimmed
            assert set(llama[f"decode_b{b}_{t}"]["step_ms_by_host_mode"]) == {"gc_frozen", "skip_guards",
                                                                                "deferred_stop+gc_frozen"}
    for mode in ("gc_frozen", "deferred_stop+gc_frozen"):  # a ratio per host mode (absent: CPU timing noise)
        assert llama.get(f"decode_speedup_b1_{mode}", 1.0) > 0
    assert rc in (0, 1)
    # a run without decode (--batches ""): prefill measured again, the earlier decode kept, marked
    rc = mod.main(["--device", "cpu", "--tiny", "--models", "qwen3moe", "--moe-layers", "1", "--backend", "none",
                   "--prefill", "16", "--prompt", "4", "--batches", "", "--no-compiled-prefill", "--out", str(out)])
    again = json.loads(out.read_text())
    moe = again["e2e"]["models"]["qwen3moe"]
    old = rep["e2e"]["models"]["qwen3moe"]
    assert moe["decode_earlier_run"] and all(moe[k] == v for k, v in old.items() if k.startswith("decode_"))
    assert again["moe_decode_speedup_b1"] == rep["moe_decode_speedup_b1"]
    assert rc in (0, 1)

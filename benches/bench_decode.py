"""End-to-end benchmark: a transformers model built by ``build_quantized_model`` (FP8) against
the same model in bf16: greedy decode tokens/s (CUDA graphs) and prefill time.

On the GPU machine (from the repo root), after ``bench_modules.py`` wrote its JSON::

    python benches/bench_decode.py --out benches/results/modules_h200.json

The bf16 model is built with random weights directly on the GPU (``from_config``), written
as a bf16 checkpoint (``save_pretrained``, under ``/dev/shm`` when it has room), and
``build_quantized_model`` builds the FP8 model from that checkpoint (meta device, weights
streamed and quantized by ``load_quantized``). Both models then run:

- logits SQNR of FP8 against bf16 on a 128-token prompt (last position and all positions),
- prefill: one forward of ``--prefill`` tokens (batch 1, ``logits_to_keep=1``), eager,
  median of 3 after a warm-up; then (last, as it compiles the models' layers in place) the
  same with every decoder layer compiled (``torch.compile``, inductor: the norms, RoPE and
  SiLU fused, as a serving engine runs prefill): ``prefill_speedup_4096_compiled``, and then
  with each compiled layer replayed from CUDA graphs (``mode="reduce-overhead"``, as vLLM's
  piecewise graphs run prefill: no host time per kernel launch): ``prefill_speedup_4096_graphs``,
- decode: ``generate()`` greedy with a static cache, which transformers compiles
  (``CompileConfig(backend=--backend, mode="reduce-overhead")``: CUDA graphs). Time per
  step = (time of ``generate(n2)`` - time of ``generate(n1)``) / (n2 - n1), so that the
  prompt and the first call's compilation drop out; tokens/s = batch / time per step.

Models: ``llama8b`` (Llama-3-8B shapes, 32 layers) and ``qwen3moe`` (Qwen3-30B-A3B shapes,
``--moe-layers`` of its 48 layers so that both copies and the checkpoint fit). Merges
``decode_speedup_b1``, ``decode_speedup_b32``, ``prefill_speedup_4096``,
``logits_sqnr_8b`` (and ``moe_*`` counterparts) and an ``e2e`` section into ``--out``.
``decode_gpu_speedup_b*`` is the same ratio of the profiler's GPU kernel time per step
(``gpu_ms_per_step``): what the model's own work gains, without the host time that
``generate()`` spends between the CUDA graphs (a serving engine's loop is not measured here);
beside it ``top_kernels``, the kernels that take most of a step (printed too).
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any

import torch

try:
    import fastfp8  # noqa: F401
except ImportError:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "python"))

from fastfp8.kernels.common import sqnr

BF16 = torch.bfloat16


def llama8b_config(layers: int, tiny: bool = False):
    from transformers import LlamaConfig

    h, i, heads, kv, vocab = (256, 512, 4, 2, 1000) if tiny else (4096, 14336, 32, 8, 128256)
    return LlamaConfig(hidden_size=h, intermediate_size=i, num_hidden_layers=layers, num_attention_heads=heads,
                       num_key_value_heads=kv, vocab_size=vocab, max_position_embeddings=8192, rope_theta=500000.0,
                       rms_norm_eps=1e-5, tie_word_embeddings=False, bos_token_id=0, eos_token_id=None,
                       pad_token_id=0)


def qwen3moe_config(layers: int, tiny: bool = False):
    from transformers import Qwen3MoeConfig

    h, i, e, heads, kv, vocab = (256, 128, 8, 4, 2, 1000) if tiny else (2048, 768, 128, 32, 4, 151936)
    cfg = Qwen3MoeConfig(hidden_size=h, intermediate_size=3 * h, moe_intermediate_size=i, num_experts=e,
                         num_experts_per_tok=2 if tiny else 8, num_hidden_layers=layers, num_attention_heads=heads,
                         num_key_value_heads=kv, head_dim=128 if not tiny else 64, vocab_size=vocab,
                         max_position_embeddings=8192,
                         rope_theta=1000000.0, tie_word_embeddings=False, norm_topk_prob=True, decoder_sparse_step=1,
                         mlp_only_layers=[], bos_token_id=0, eos_token_id=None, pad_token_id=0)
    if hasattr(cfg, "_experts_implementation"):  # the bf16 baseline: grouped GEMMs, not a loop over experts
        with contextlib.suppress(Exception):
            cfg._experts_implementation = "grouped_mm"
    return cfg


DEVICE = torch.device("cuda")


def _sync() -> None:
    if DEVICE.type == "cuda":
        torch.cuda.synchronize()


def _sync_time(fn) -> float:
    _sync()
    t = time.perf_counter()
    fn()
    _sync()
    return time.perf_counter() - t


def _prep_generation(model) -> None:
    from transformers import GenerationConfig

    gc_ = GenerationConfig(do_sample=False, eos_token_id=None, pad_token_id=0, bos_token_id=0,
                           cache_implementation="static")
    model.generation_config = gc_


#: reset dynamo and the cudagraph trees before each decode measurement (``--fresh-compile``)
FRESH_COMPILE = False

#: decode steps also timed with the host's share trimmed (``--decode-host``), each beside the
#: plain timing in the same call: ``gc_frozen`` (Python's cyclic GC frozen and paused, as vLLM
#: freezes it after capturing its graphs), ``skip_guards`` (dynamo checks only the guards that
#: tell its cache entries apart, ``torch.compiler.set_stance(skip_guard_eval_unsafe=True)``;
#: vLLM calls its compiled code without dynamo's guards), ``deferred_stop`` (transformers'
#: own ``DeferredStopCheck``, which it enables on "mps" only, let on CUDA too: ``generate()``
#: reads each step's stop flag one step late, so the host queues the next step while the GPU
#: runs this one instead of waiting for it, as a serving engine's loop does; one extra step
#: at the end, undone, which the difference of two lengths cancels); modes joined by ``+``
#: apply together: where FP8's extra host time per step goes (benches/NOTES.md, sessions 12
#: and 17)
HOST_MODES: tuple[str, ...] = ()
MODES = ("gc_frozen", "skip_guards", "deferred_stop")


@contextlib.contextmanager
def host_mode(mode: str):
    """The decode loop's host settings ``mode`` (:data:`HOST_MODES`: one of :data:`MODES`, or
    several joined by ``+``) while in the block."""
    with contextlib.ExitStack() as stack:
        for one in mode.split("+"):
            stack.enter_context(_host_mode(one))
        yield


@contextlib.contextmanager
def _host_mode(mode: str):
    if mode == "gc_frozen":
        gc.collect()
        gc.freeze()
        gc.disable()
        try:
            yield
        finally:
            gc.enable()
            gc.unfreeze()
    elif mode == "skip_guards":
        with torch.compiler.set_stance("default", skip_guard_eval_unsafe=True):
            yield
    elif mode == "deferred_stop":
        from transformers.generation.utils import DeferredStopCheck

        gate = DeferredStopCheck.__dict__["is_supported"]

        def is_supported(device, cache, cache_is_returned, is_assistant):
            if device.type == "cuda" and not is_assistant:  # transformers' own rule, "mps" read as "cuda"
                return cache is None or cache.is_croppable or not cache_is_returned
            return gate.__func__(device, cache, cache_is_returned, is_assistant)

        DeferredStopCheck.is_supported = staticmethod(is_supported)
        try:
            yield
        finally:
            DeferredStopCheck.is_supported = gate
    else:
        raise ValueError(f"unknown decode host mode {mode!r} ({', '.join(MODES)}, or several joined by '+')")


def decode_step_s(model, batch: int, prompt: int, n1: int, n2: int, backend: str, vocab: int) -> dict[str, float]:
    """Seconds per greedy decode step (CUDA graphs via transformers' auto-compile)."""
    from transformers import CompileConfig

    g = torch.Generator(device=DEVICE).manual_seed(batch)
    ids = torch.randint(1, vocab, (batch, prompt), device=DEVICE, generator=g)
    mask = torch.ones_like(ids)
    kw: dict[str, Any] = {}
    if backend == "none":
        kw["disable_compile"] = True
    else:
        kw["compile_config"] = CompileConfig(backend=backend, fullgraph=False,
                                             mode="reduce-overhead" if backend == "inductor" else None)

    def gen(n):
        return model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=n, min_new_tokens=n,
                              cache_implementation="static", do_sample=False, **kw)

    if backend != "none" and FRESH_COMPILE:
        # each model compiled and captured as if alone in its process: the two models share
        # their classes' code, so dynamo's cache for it holds the bf16 model's entry when the
        # FP8 one runs second, one cudagraph tree holds both models' graphs, and batch 32
        # compiles with a dynamic batch after batch 1 (--fresh-compile; benches/NOTES.md, session 17)
        torch._dynamo.reset()
        from torch._inductor.cudagraph_trees import reset_cudagraph_trees

        reset_cudagraph_trees()
    t0 = time.perf_counter()
    out = gen(n2)  # compiles (and captures the graphs of) the decode step
    _sync()
    first = time.perf_counter() - t0
    assert out.shape[1] == prompt + n2, out.shape
    gen(n1)
    t1 = statistics.median(_sync_time(lambda: gen(n1)) for _ in range(3))
    t2 = statistics.median(_sync_time(lambda: gen(n2)) for _ in range(3))
    step = (t2 - t1) / (n2 - n1)
    if step <= 0:
        raise RuntimeError(f"timing noise: generate({n2}) took {t2:.4f} s, generate({n1}) {t1:.4f} s")
    host_modes = {}
    for mode in HOST_MODES:
        with host_mode(mode):
            m1 = statistics.median(_sync_time(lambda: gen(n1)) for _ in range(3))
            m2 = statistics.median(_sync_time(lambda: gen(n2)) for _ in range(3))
        host_modes[mode] = (m2 - m1) / (n2 - n1) * 1e3 if m2 > m1 else None  # None: timing noise
    from torch._dynamo.utils import counters

    gpu_ms, top = gpu_ms_per_step(gen, n1, n2)
    return {"step_ms": step * 1e3, "tokens_per_s": batch / step, "first_call_s": first, "t_n1_s": t1, "t_n2_s": t2,
            # of step_ms, the GPU's kernel time: the rest is the host's (generate()'s loop)
            "gpu_ms_per_step": gpu_ms,
            # the kernels that take most of it: [name, us a step, calls a step]
            "top_kernels": top,
            # step_ms with the host's share trimmed each way (HOST_MODES)
            "step_ms_by_host_mode": host_modes,
            # > 0: a compiled graph ran without CUDA graphs (launch-bound steps)
            "cudagraph_skips_so_far": int(counters["inductor"].get("cudagraph_skips", 0))}


def gpu_speedup(bf16: dict, fp8: dict) -> float | None:
    """bf16's GPU kernel time per decode step over FP8's (the model's own work, without
    ``generate()``'s host time between the graphs); None where the profiler gave nothing."""
    if not bf16.get("gpu_ms_per_step") or not fp8.get("gpu_ms_per_step"):
        return None
    return bf16["gpu_ms_per_step"] / fp8["gpu_ms_per_step"]


#: kernels listed per decode step in ``top_kernels`` (the rest summed as "other")
TOP_KERNELS = 12


def gpu_ms_per_step(gen, n1: int, n2: int) -> tuple[float | None, list]:
    """Kernel time per decode step, from the profiler's CUDA activity (kernels inside CUDA
    graphs included): generate(n2) less generate(n1), per step; beside it the kernels that
    take most of it (``[name, us a step, calls a step]``, name cut to 120 characters). None
    and [] off CUDA or if the profiler fails (a diagnostic, never the benchmark's figure)."""
    if DEVICE.type != "cuda":
        return None, []
    from torch.profiler import ProfilerActivity, profile

    try:
        per: dict[int, dict[str, tuple[float, int]]] = {}
        for n in (n1, n2):
            with profile(activities=[ProfilerActivity.CUDA]) as p:
                gen(n)
                _sync()
            per[n] = {e.key: (e.self_device_time_total, e.count) for e in p.key_averages() if e.self_device_time_total}
        total = {n: sum(t for t, _ in per[n].values()) / 1e3 for n in per}  # us -> ms
        # no kernels seen in the CUDA graphs (a profiler that does not trace graph launches)
        if total[n2] <= total[n1]:
            return None, []
        steps = n2 - n1
        diff = {k: ((t - per[n1].get(k, (0.0, 0))[0]) / steps, (c - per[n1].get(k, (0.0, 0))[1]) / steps)
                for k, (t, c) in per[n2].items()}
        ranked = sorted(diff.items(), key=lambda kv: -kv[1][0])
        top = [[k[:120], round(us, 2), round(c, 2)] for k, (us, c) in ranked[:TOP_KERNELS]]
        top.append(["other", round(sum(us for _, (us, _) in ranked[TOP_KERNELS:]), 2), None])
        return (total[n2] - total[n1]) / steps, top
    except Exception as e:
        print(f"gpu_ms_per_step: profiler failed: {type(e).__name__}: {e}", flush=True)
        return None, []


def prefill_s(model, tokens: int, vocab: int) -> float:
    g = torch.Generator(device=DEVICE).manual_seed(7)
    ids = torch.randint(1, vocab, (1, tokens), device=DEVICE, generator=g)

    def run():
        with torch.no_grad():
            model(input_ids=ids, use_cache=False, logits_to_keep=1)

    run()
    return statistics.median(_sync_time(run) for _ in range(3))


def prefill_compiled_s(model, tokens: int, vocab: int, mode: str | None = None) -> tuple[float, float]:
    """:func:`prefill_s` with every decoder layer compiled (``torch.compile``, inductor: the
    norms, RoPE and SiLU fused as a serving engine's prefill runs them; the layers share the
    compiled code); ``mode="reduce-overhead"``: and each layer's kernels replayed from a CUDA
    graph (as vLLM's piecewise graphs run prefill: no host time per launch). Returns
    ``(seconds per forward, first call's seconds)``. Compiles the model's layers in place:
    measured last."""
    layers = model.model.layers
    limit = torch._dynamo.config.cache_size_limit
    torch._dynamo.config.cache_size_limit = max(limit, 4 * len(layers))  # a layer may recompile once a mode
    for layer in layers:
        if mode == "reduce-overhead":
            _graphed(layer)
        else:
            layer.compile(mode=mode)
    g = torch.Generator(device=DEVICE).manual_seed(7)
    ids = torch.randint(1, vocab, (1, tokens), device=DEVICE, generator=g)

    def run():
        with torch.no_grad():
            model(input_ids=ids, use_cache=False, logits_to_keep=1)

    try:
        first = _sync_time(run)
        for _ in range(2):  # CUDA graphs: recorded on the second call, replayed from the third
            run()
        return statistics.median(_sync_time(run) for _ in range(3)), first
    finally:
        torch._dynamo.config.cache_size_limit = limit


def _graphed(layer) -> None:
    """``layer`` compiled with CUDA graphs (cudagraph trees), called as its own step and its
    output cloned: the layers share one compiled graph, so each replay would overwrite the
    previous layer's output, which the next layer still reads as its residual."""
    layer._compiled_call_impl = None  # an earlier .compile() of the module
    fn = torch.compile(layer.forward, mode="reduce-overhead")

    def forward(*args, **kwargs):
        torch.compiler.cudagraph_mark_step_begin()
        out = fn(*args, **kwargs)
        if isinstance(out, torch.Tensor):
            return out.clone()
        return type(out)(o.clone() if isinstance(o, torch.Tensor) else o for o in out)

    layer.forward = forward


def logits_sqnr(fp8, bf16, vocab: int) -> dict[str, float]:
    g = torch.Generator(device=DEVICE).manual_seed(3)
    ids = torch.randint(1, vocab, (2, 128), device=DEVICE, generator=g)
    with torch.no_grad():
        a = fp8(input_ids=ids, use_cache=False).logits.float()
        b = bf16(input_ids=ids, use_cache=False).logits.float()
    return {"all": sqnr(a, b), "last": sqnr(a[:, -1], b[:, -1]),
            "top1_agree": float((a[:, -1].argmax(-1) == b[:, -1].argmax(-1)).float().mean())}


@torch.no_grad()
def weight_only_control_sqnr(bf16, vocab: int) -> float:
    """Logits SQNR of the bf16 model against itself with every decoder linear's weight
    quantized and dequantized in place (compressed-tensors math, bf16 activations): the error
    the FP8 weights alone cause. A random-init model amplifies small errors through its
    layers; when this control is as low as the FP8 model's SQNR, the loss is the model's,
    not the kernels'. Run last: it overwrites the bf16 weights."""
    from fastfp8.quant import quantize_channelwise

    g = torch.Generator(device=DEVICE).manual_seed(3)
    ids = torch.randint(1, vocab, (2, 128), device=DEVICE, generator=g)
    ref = bf16(input_ids=ids, use_cache=False).logits.float()
    for name, mod in bf16.named_modules():
        if isinstance(mod, torch.nn.Linear) and ".layers." in f".{name}":
            q, s = quantize_channelwise(mod.weight, rounding="fp32")
            mod.weight.copy_((q.float() * s.float().reshape(-1, 1)).to(mod.weight.dtype))
    return sqnr(bf16(input_ids=ids, use_cache=False).logits.float(), ref)


def _workdir(need_bytes: int) -> Path:
    for base in ("/dev/shm", tempfile.gettempdir()):
        try:
            if shutil.disk_usage(base).free > need_bytes * 1.2:
                return Path(tempfile.mkdtemp(prefix="fastfp8_e2e_", dir=base))
        except OSError:
            continue
    return Path(tempfile.mkdtemp(prefix="fastfp8_e2e_"))


def run_model(name: str, config, args) -> dict[str, Any]:
    from fastfp8.model import build_quantized_model
    from transformers import AutoModelForCausalLM

    res: dict[str, Any] = {"model": name, "layers": config.num_hidden_layers,
                           "bf16_experts_implementation": getattr(config, "_experts_implementation", None)}
    torch.manual_seed(0)
    t = time.perf_counter()
    with DEVICE:
        bf16 = AutoModelForCausalLM.from_config(config, dtype=BF16)
    bf16.eval().requires_grad_(False)
    nbytes = sum(p.numel() * p.element_size() for p in bf16.parameters())
    res["bf16_gb"] = nbytes / 1e9
    work = _workdir(nbytes)
    try:
        bf16.save_pretrained(work, max_shard_size="4GB")
        res["write_checkpoint_s"] = time.perf_counter() - t
        t = time.perf_counter()
        fp8 = build_quantized_model(work, device=DEVICE)
        _sync()
        res["build_quantized_model_s"] = time.perf_counter() - t
    finally:
        shutil.rmtree(work, ignore_errors=True)
    res["fp8_gb"] = sum(p.numel() * p.element_size() for p in fp8.parameters()) / 1e9
    vocab = config.vocab_size
    res["logits_sqnr"] = logits_sqnr(fp8, bf16, vocab)
    print(f"[{name}] built: bf16 {res['bf16_gb']:.1f} GB, fp8 {res['fp8_gb']:.1f} GB, logits SQNR "
          f"{res['logits_sqnr']}", flush=True)
    for tag, model in (("bf16", bf16), ("fp8", fp8)):
        res[f"prefill_{args.prefill}_ms_{tag}"] = prefill_s(model, args.prefill, vocab) * 1e3
    pf = f"prefill_{args.prefill}_ms_"
    res[f"prefill_speedup_{args.prefill}"] = res[pf + "bf16"] / res[pf + "fp8"]
    print(f"[{name}] prefill {args.prefill}: bf16 {res[f'prefill_{args.prefill}_ms_bf16']:.1f} ms, fp8 "
          f"{res[f'prefill_{args.prefill}_ms_fp8']:.1f} ms", flush=True)
    for model in (bf16, fp8):
        _prep_generation(model)
    for batch in args.batches:
        for tag in args.order:
            model = bf16 if tag == "bf16" else fp8
            if time.perf_counter() - args.t0 > args.budget_s:
                res[f"decode_b{batch}_{tag}_error"] = f"skipped: past --budget-s {args.budget_s}"
                continue
            try:
                d = decode_step_s(model, batch, args.prompt, args.n1, args.n2, args.backend, vocab)
            except Exception as e:
                traceback.print_exc()
                res[f"decode_b{batch}_{tag}_error"] = f"{type(e).__name__}: {str(e)[:300]}"
                continue
            res[f"decode_b{batch}_{tag}"] = d
            gpu = f", GPU kernels {d['gpu_ms_per_step']:.2f} ms/step" if d["gpu_ms_per_step"] is not None else ""
            modes = "".join(f", {m} {ms:.2f}" if ms else f", {m} (noise)"
                            for m, ms in d["step_ms_by_host_mode"].items())
            print(f"[{name}] decode b={batch} {tag}: {d['step_ms']:.2f} ms/step, {d['tokens_per_s']:.0f} tok/s "
                  f"(first call {d['first_call_s']:.0f} s{gpu}{modes})", flush=True)
            for kname, us, calls in d["top_kernels"]:
                print(f"    {us:9.1f} us {'' if calls is None else f'{calls:6.1f}x'}  {kname}", flush=True)
        if f"decode_b{batch}_bf16" in res and f"decode_b{batch}_fp8" in res:
            bf, fp = res[f"decode_b{batch}_bf16"], res[f"decode_b{batch}_fp8"]
            res[f"decode_speedup_b{batch}"] = bf["step_ms"] / fp["step_ms"]
            res[f"decode_gpu_speedup_b{batch}"] = gpu_speedup(bf, fp)
            for mode in HOST_MODES:  # the same with the host's share trimmed that way
                if bf["step_ms_by_host_mode"].get(mode) and fp["step_ms_by_host_mode"].get(mode):
                    res[f"decode_speedup_b{batch}_{mode}"] = (bf["step_ms_by_host_mode"][mode]
                                                              / fp["step_ms_by_host_mode"][mode])
    res["logits_sqnr_weight_only_control"] = weight_only_control_sqnr(bf16, vocab)
    print(f"[{name}] control: bf16 with fake-quantized weights, logits SQNR "
          f"{res['logits_sqnr_weight_only_control']:.2f} dB", flush=True)
    modes = (("compiled", None), ("graphs", "reduce-overhead")) if args.compiled_prefill else ()
    for label, mode in modes:
        if time.perf_counter() - args.t0 > args.budget_s:
            res[f"prefill_{args.prefill}_{label}_error"] = f"skipped: past --budget-s {args.budget_s}"
            continue
        pc = f"prefill_{args.prefill}_{label}_ms_"
        try:
            for tag, model in (("bf16", bf16), ("fp8", fp8)):
                s, first = prefill_compiled_s(model, args.prefill, vocab, mode)
                res[pc + tag] = s * 1e3
                res[pc + tag + "_first_call_s"] = first
            res[f"prefill_speedup_{args.prefill}_{label}"] = res[pc + "bf16"] / res[pc + "fp8"]
            print(f"[{name}] prefill {args.prefill}, layers {label}: bf16 {res[pc + 'bf16']:.1f} ms, fp8 "
                  f"{res[pc + 'fp8']:.1f} ms", flush=True)
        except Exception as e:
            traceback.print_exc()
            res[f"prefill_{args.prefill}_{label}_error"] = f"{type(e).__name__}: {str(e)[:300]}"
    del bf16, fp8
    gc.collect()
    torch._dynamo.reset()
    if DEVICE.type == "cuda":
        torch.cuda.empty_cache()
    return res


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="benches/results/modules_h200.json", help="JSON to merge the figures into")
    ap.add_argument("--models", default="llama8b,qwen3moe")
    ap.add_argument("--layers", type=int, default=32, help="llama8b layers (32 = Llama-3-8B)")
    ap.add_argument("--moe-layers", type=int, default=12, help="qwen3moe layers (Qwen3-30B-A3B has 48)")
    ap.add_argument("--batches", default="1,32", help='decode batch sizes ("": no decode; an earlier run\'s stays)')
    ap.add_argument("--prompt", type=int, default=128)
    ap.add_argument("--n1", type=int, default=16)
    ap.add_argument("--n2", type=int, default=144,
                    help="steps of the longer generate(); 128 steps between n1 and n2 (64 varied by 20%% run to run)")
    ap.add_argument("--prefill", type=int, default=4096)
    ap.add_argument("--no-compiled-prefill", dest="compiled_prefill", action="store_false",
                    help="skip the prefill with compiled decoder layers, without and with CUDA graphs "
                    "(measured last, after the eager one)")
    ap.add_argument("--backend", default="inductor",
                    help="torch.compile backend of generate(): inductor, cudagraphs; none: no compilation")
    ap.add_argument("--fresh-compile", action="store_true",
                    help="reset dynamo and the cudagraph trees before each model's decode (as if alone in its "
                    "process); measured once: decode b1 1.27x, but the compiled prefill after it ran at 1.01x")
    ap.add_argument("--decode-host", default="", help="comma list: also time each decode step with gc_frozen, "
                    "skip_guards, deferred_stop (or several joined by +), beside the plain timing "
                    "(step_ms_by_host_mode)")
    ap.add_argument("--order", default="bf16,fp8", help="the order of the two models' decode measurements: the "
                    "second runs with the first's compiled code and graphs alive in the process (fp8,bf16: "
                    "whether FP8's extra host time a step follows the order)")
    ap.add_argument("--device", default="cuda", help="cpu: a smoke test of the script (use with --tiny)")
    ap.add_argument("--tiny", action="store_true", help="tiny configs of the same architectures (smoke test)")
    ap.add_argument("--budget-s", type=float, default=540,
                    help="start no new model or decode measurement after this many seconds")
    args = ap.parse_args(argv)
    global FRESH_COMPILE, HOST_MODES
    FRESH_COMPILE = args.fresh_compile
    HOST_MODES = tuple(m for m in args.decode_host.split(",") if m)
    for m in HOST_MODES:
        if any(one not in MODES for one in m.split("+")):
            ap.error(f"--decode-host: unknown mode {m!r} ({', '.join(MODES)}, or several joined by '+')")
    args.t0 = time.perf_counter()
    args.batches = [int(b) for b in args.batches.split(",") if b]
    args.order = [t.strip() for t in args.order.split(",")]
    if sorted(args.order) != ["bf16", "fp8"]:
        ap.error(f"--order: bf16 and fp8, each once, got {args.order}")
    global DEVICE
    DEVICE = torch.device(args.device)
    if DEVICE.type == "cuda" and not torch.cuda.is_available():
        print("needs a CUDA GPU", file=sys.stderr)
        return 2
    import transformers

    out = Path(args.out)
    report = json.loads(out.read_text()) if out.is_file() else {}
    e2e: dict[str, Any] = {"transformers": transformers.__version__, "backend": args.backend, "prompt": args.prompt,
                           "device": str(DEVICE), "tiny": args.tiny,
                           "n1": args.n1, "n2": args.n2, "models": {}, "errors": []}
    # a model measured by an earlier run into the same JSON stays, marked as such (one
    # device call may not hold both models)
    earlier = {k: {**v, "earlier_run": True} for k, v in (report.get("e2e") or {}).get("models", {}).items()
               if k not in args.models.split(",")}
    e2e["models"].update(earlier)
    t0 = args.t0
    for name in args.models.split(","):
        if time.perf_counter() - t0 > args.budget_s:
            e2e["errors"].append(f"{name}: skipped, past --budget-s {args.budget_s}")
            continue
        if name == "llama8b":
            cfg = llama8b_config(args.layers, args.tiny)
        else:
            cfg = qwen3moe_config(args.moe_layers, args.tiny)
        try:
            r = run_model(name, cfg, args)
        except Exception as e:
            traceback.print_exc()
            e2e["errors"].append(f"{name}: {type(e).__name__}: {str(e)[:500]}")
            continue
        prev = (report.get("e2e") or {}).get("models", {}).get(name)
        if not args.batches and prev:  # no decode this run: the earlier run's decode stays, marked
            r = {**{k: v for k, v in prev.items() if k.startswith("decode_")}, **r, "decode_earlier_run": True}
        e2e["models"][name] = r
        prefix = "" if name == "llama8b" else "moe_"
        for b in args.batches:
            report[f"{prefix}decode_speedup_b{b}"] = r.get(f"decode_speedup_b{b}")
            report[f"{prefix}decode_gpu_speedup_b{b}"] = r.get(f"decode_gpu_speedup_b{b}")
        report[f"{prefix}prefill_speedup_{args.prefill}"] = r.get(f"prefill_speedup_{args.prefill}")
        for label in ("compiled", "graphs"):
            report[f"{prefix}prefill_speedup_{args.prefill}_{label}"] = r.get(f"prefill_speedup_{args.prefill}_{label}")
        report["logits_sqnr_8b" if name == "llama8b" else "logits_sqnr_moe"] = r["logits_sqnr"]["all"]
        report[("logits_sqnr_8b" if name == "llama8b" else "logits_sqnr_moe") + "_weight_only_control"] = \
            r["logits_sqnr_weight_only_control"]
    e2e["wall_s"] = time.perf_counter() - t0
    report["e2e"] = e2e
    targets = report.get("targets") or {"decode_speedup_b1": 1.5, "prefill_speedup_4096": 1.5}
    met = report.setdefault("targets_met", {})
    for k, v in targets.items():
        if k in report:
            met[k] = report[k] is not None and report[k] >= v
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1, default=str))
    print(json.dumps({k: v for k, v in report.items() if "speedup" in k or "sqnr" in k}, indent=1, default=str))
    print(f"e2e wall {e2e['wall_s']:.0f} s; merged into {out}", flush=True)
    return 1 if e2e["errors"] else 0


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sys.exit(main())

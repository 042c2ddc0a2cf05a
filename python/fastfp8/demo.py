"""``make demo``: make a small Llama-shaped bf16 checkpoint, then show fastfp8 at work.

Run as ``python -m fastfp8.demo [--dir .demo] [--layers 8]``. Uses the GPU if there is one.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

import fastfp8
from fastfp8.units import format_bytes, format_rate


def make_checkpoint(path: Path, *, layers: int, hidden: int, seed: int = 0) -> Path:
    """A real transformers Llama, random init, saved bf16 and sharded by save_pretrained."""
    from transformers import LlamaConfig, LlamaForCausalLM

    marker = path / "config.json"
    if marker.exists() and json.loads(marker.read_text()).get("num_hidden_layers") == layers:
        return path
    torch.manual_seed(seed)
    cfg = LlamaConfig(
        hidden_size=hidden, intermediate_size=hidden * 11 // 4, num_hidden_layers=layers,
        num_attention_heads=hidden // 64, num_key_value_heads=max(1, hidden // 256),
        vocab_size=32000, tie_word_embeddings=False, torch_dtype="bfloat16",
    )
    with torch.device("cpu"):
        model = LlamaForCausalLM(cfg).to(torch.bfloat16)
    model.save_pretrained(path, max_shard_size="64MB")
    return path


def _timed(fn) -> tuple[float, object]:
    t0 = time.perf_counter()
    out = fn()
    return time.perf_counter() - t0, out


def stream_all(ckpt: fastfp8.Checkpoint) -> int:
    n = 0
    for _, t in ckpt.stream(memory_budget="256MiB"):
        n += t.numel()
    return n


def safetensors_copy(ckpt: fastfp8.Checkpoint) -> int:
    """The usual way: safe_open + get_tensor, copied into a host staging buffer."""
    from safetensors import safe_open

    n = 0
    for shard in ckpt.shards:
        with safe_open(shard, framework="pt", device="cpu") as f:
            for k in f.keys():  # noqa: SIM118 - safe_open has no __iter__
                t = f.get_tensor(k)
                torch.empty_like(t).copy_(t)
                n += t.numel()
    return n


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dir", type=Path, default=Path(".demo/llama-bf16"))
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--hidden", type=int, default=1024)
    args = ap.parse_args(argv)

    device = "cuda" if torch.cuda.is_available() else "cpu"
    print(f"fastfp8 {fastfp8.__version__} | torch {torch.__version__} | device: {device}")
    t, path = _timed(lambda: make_checkpoint(args.dir, layers=args.layers, hidden=args.hidden))
    ckpt = fastfp8.open_checkpoint(path)
    print(f"checkpoint: {path} ({len(ckpt.shards)} shards, {len(ckpt)} tensors, "
          f"{format_bytes(ckpt.nbytes)}; ready in {t:.1f} s)")

    rows = []
    for name, fn in [("fastfp8 stream (pinned slots)", stream_all),
                     ("safetensors safe_open + copy", safetensors_copy)]:
        fn(ckpt)  # warm the page cache and the pools
        secs = min(_timed(lambda fn=fn: fn(ckpt))[0] for _ in range(3))
        rows.append((name, secs, format_rate(ckpt.nbytes / secs)))
    print()
    print(f"| {'read path':<32} | {'tensors':>7} | {'bytes':>10} | {'seconds':>7} | {'rate':>12} |")
    print(f"|{'-' * 34}|{'-' * 9}|{'-' * 12}|{'-' * 9}|{'-' * 14}|")
    for name, secs, rate in rows:
        print(f"| {name:<32} | {len(ckpt):>7} | {format_bytes(ckpt.nbytes):>10} | {secs:>7.3f} | {rate:>12} |")
    print("\n(warm page cache, best of 3; this machine's cores and memory bound the figures)")

    quantize_demo(ckpt, device)
    run_demo(path, device)


def quantize_demo(ckpt: fastfp8.Checkpoint, device: str) -> None:
    """load_quantized: the main job, with its figures and a numerical check."""
    print(f"\nload_quantized -> FP8 e4m3 per-channel on {device}")
    fastfp8.load_quantized(ckpt, device=device, progress=False)  # warm: kernels, pools
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    state = fastfp8.load_quantized(ckpt, device=device, progress=False)
    st = state.stats
    out_bytes = sum(t.numel() * t.element_size() for t in state.values())
    print(f"  {st.quantized} of {st.tensors} tensors quantized ({st.host_quantized} by the reader threads on the "
          f"host, quantize_on={st.quantize_on!r}); {format_bytes(st.bytes_read)} bf16 in -> "
          f"{format_bytes(out_bytes)} out")
    rate = format_rate(st.bytes_read / st.seconds) if st.seconds > 0 else "-"
    print(f"  {st.seconds:.3f} s, {rate} of bf16 input ({st.threads} reader threads reading with {st.method}, "
          f"{format_bytes(st.memory_budget)} budget, peak {format_bytes(st.peak_in_flight)} in flight)")
    if device == "cuda":
        peak = torch.cuda.max_memory_allocated() - base
        print(f"  peak GPU memory {format_bytes(peak)} for a {format_bytes(out_bytes)} result")
    name = next(n for n in state if n.endswith("mlp.down_proj.weight"))
    w = ckpt.get(name).float()
    deq = state[name].float().cpu() * state[name + "_scale"].float().cpu()
    sqnr = 10 * torch.log10(w.pow(2).sum() / (w - deq).pow(2).sum()).item()
    print(f"  {name}: SQNR of the FP8 weight against bf16 {sqnr:.1f} dB")


def run_demo(path: Path, device: str) -> None:
    """build_quantized_model: the FP8 model runs; its logits against the bf16 model's."""
    from transformers import AutoModelForCausalLM

    new_tokens = 32 if device == "cuda" else 8
    print(f"\nbuild_quantized_model -> a transformers Llama with Fp8Linear layers on {device}")
    t, model = _timed(lambda: fastfp8.build_quantized_model(path, device=device, progress=False))
    n_fp8 = sum(isinstance(m, fastfp8.Fp8Linear) for m in model.modules())
    print(f"  built in {t:.2f} s (meta-device init + streamed FP8 weights): {n_fp8} Fp8Linear layers")
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, model.config.vocab_size, (1, 32), generator=gen)
    with torch.no_grad():
        logits = model(ids.to(device)).logits.float().cpu()
        ref_model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16)
        ref = ref_model(ids).logits.float()
        del ref_model
        sqnr = 10 * torch.log10(ref.pow(2).sum() / (ref - logits).pow(2).sum()).item()
        agree = (ref.argmax(-1) == logits.argmax(-1)).float().mean().item()
        print(f"  logits against the bf16 model: SQNR {sqnr:.1f} dB, top-1 agreement {agree:.0%} (32 positions)")
        model.generate(ids.to(device), max_new_tokens=2, do_sample=False)  # warm
        if device == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        out = model.generate(ids.to(device), max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False)
        if device == "cuda":
            torch.cuda.synchronize()
        secs = time.perf_counter() - t0
    print(f"  generate(): {new_tokens} tokens in {secs:.2f} s ({new_tokens / secs:.1f} tokens/s, greedy, "
          f"random prompt): {out[0, -new_tokens:].tolist()}")


if __name__ == "__main__":
    main()

"""Where a prefill's GPU time goes, bf16 against FP8: the models of ``bench_decode.py``
(random weights, FP8 built by ``build_quantized_model`` from a bf16 checkpoint), one
forward of ``--tokens`` tokens with every decoder layer compiled (as ``bench_decode.py``'s
``prefill_speedup_*_compiled``), kernel by kernel (``torch.profiler``, CUDA activity).

On the GPU machine (from the repo root)::

    python benches/probe_prefill.py --model qwen3moe --out $OUT/probe_prefill.json

A diagnostic beside ``bench_decode.py`` (which times the same forward, median of 3).
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import shutil
import sys
import time
from pathlib import Path

import bench_decode as bd
import torch

BF16 = torch.bfloat16


def profile_forward(model, ids) -> dict:
    from torch.profiler import ProfilerActivity, profile

    def run():
        with torch.no_grad():
            model(input_ids=ids, use_cache=False, logits_to_keep=1)

    for _ in range(2):
        run()
    torch.cuda.synchronize()
    t = time.perf_counter()
    run()
    torch.cuda.synchronize()
    wall = time.perf_counter() - t
    with profile(activities=[ProfilerActivity.CUDA]) as p:
        run()
        torch.cuda.synchronize()
    rows = [{"kernel": e.key[:120], "launches": e.count, "us": e.self_device_time_total}
            for e in p.key_averages() if e.self_device_time_total > 0]
    rows.sort(key=lambda r: -r["us"])
    return {"wall_ms": wall * 1e3, "kernel_ms": sum(r["us"] for r in rows) / 1e3, "kernels": rows}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", choices=["qwen3moe", "llama8b"], default="qwen3moe")
    ap.add_argument("--layers", type=int, default=12)
    ap.add_argument("--tokens", type=int, default=4096)
    ap.add_argument("--top", type=int, default=15)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("probe_prefill needs a GPU", file=sys.stderr)
        return 2
    from fastfp8.model import build_quantized_model
    from transformers import AutoModelForCausalLM

    cfg = bd.qwen3moe_config(args.layers) if args.model == "qwen3moe" else bd.llama8b_config(args.layers)
    torch.manual_seed(0)
    with torch.device("cuda"):
        bf16 = AutoModelForCausalLM.from_config(cfg, dtype=BF16)
    bf16.eval().requires_grad_(False)
    work = bd._workdir(sum(p.numel() * p.element_size() for p in bf16.parameters()))
    try:
        bf16.save_pretrained(work, max_shard_size="4GB")
        fp8 = build_quantized_model(work, device="cuda")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    ids = torch.randint(1, cfg.vocab_size, (1, args.tokens), device="cuda",
                        generator=torch.Generator(device="cuda").manual_seed(7))
    torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 2 * args.layers)
    report = {"gpu": torch.cuda.get_device_name(), "date": _dt.datetime.now(_dt.timezone.utc).isoformat(),
              "torch": torch.__version__, "model": args.model, "layers": args.layers, "tokens": args.tokens}
    for tag, model in (("bf16", bf16), ("fp8", fp8)):
        for layer in model.model.layers:
            layer.compile()
        r = profile_forward(model, ids)
        report[tag] = r
        print(f"{tag}: {r['wall_ms']:.1f} ms wall, {r['kernel_ms']:.1f} ms of kernels", flush=True)
        for k in r["kernels"][: args.top]:
            print(f"    {k['us'] / 1e3:8.2f} ms  x{k['launches']:<5d} {k['kernel']}", flush=True)
    if args.out:
        args.out.write_text(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

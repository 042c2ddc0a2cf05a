"""Where a decode step's GPU time goes, FP8 against bf16: a Llama-3-8B-shaped model with
``--layers`` layers (random weights), every decoder linear replaced by ``Fp8Linear``; one
eager decode step after a 128-token prompt (static cache), profiled with ``torch.profiler``;
prints the kernels by GPU time per step, batch 1 and 32.

On the GPU machine (from the repo root)::

    python benches/probe_decode.py --out $OUT/decode_profile.json
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
try:
    import fastfp8  # noqa: F401
except ImportError:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "python"))

import bench_decode as bd
from fastfp8.modules import Fp8Linear


def fp8_copy(model):
    """A deep copy of ``model`` with every decoder ``nn.Linear`` an ``Fp8Linear``."""
    q = copy.deepcopy(model)
    for name, mod in list(q.named_modules()):
        for child_name, child in list(mod.named_children()):
            if isinstance(child, torch.nn.Linear) and "layers." in f"{name}.{child_name}":
                setattr(mod, child_name, Fp8Linear.from_linear(child))
    return q


def profile_step(model, cfg, batch: int, steps: int = 5) -> list[tuple[float, float, str]]:
    """``(us per step, calls per step, kernel)`` of ``steps`` decode steps, largest first."""
    from torch.profiler import ProfilerActivity, profile
    from transformers import StaticCache

    ids = torch.randint(1, 1000, (batch, 128), device="cuda")
    cache = StaticCache(config=cfg, max_cache_len=256)
    pos = torch.tensor([128], device="cuda")
    with torch.no_grad():
        model(input_ids=ids, past_key_values=cache, use_cache=True)
        for _ in range(3):
            model(input_ids=ids[:, -1:], past_key_values=cache, use_cache=True, cache_position=pos)
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as p:
            for i in range(steps):
                model(input_ids=ids[:, -1:], past_key_values=cache, use_cache=True, cache_position=pos + 1 + i)
            torch.cuda.synchronize()
    rows = [(e.self_device_time_total / steps, e.count / steps, e.key[:110])
            for e in p.key_averages() if getattr(e, "self_device_time_total", 0) > 0]
    return sorted(rows, reverse=True)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="decode_profile.json")
    ap.add_argument("--layers", type=int, default=4)
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("needs a CUDA GPU", file=sys.stderr)
        return 2
    from transformers import AutoModelForCausalLM

    bd.DEVICE = torch.device("cuda")
    cfg = bd.llama8b_config(args.layers)
    torch.manual_seed(0)
    with torch.device("cuda"):
        bf16 = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16).eval().requires_grad_(False)
    models = {"bf16": bf16, "fp8": fp8_copy(bf16)}
    out = {}
    for tag, model in models.items():
        for batch in (1, 32):
            rows = profile_step(model, cfg, batch)
            print(f"== {tag} batch {batch}: GPU time per step {sum(r[0] for r in rows):.0f} us "
                  f"({args.layers} layers + lm_head)")
            for us, calls, name in rows[:25]:
                print(f"  {us:9.1f} us  x{calls:5.1f}  {name}")
            out[f"{tag}_b{batch}"] = rows[:40]
    Path(args.out).write_text(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())

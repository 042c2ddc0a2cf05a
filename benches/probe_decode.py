"""Where a decode step's GPU time goes, FP8 against bf16: a Llama-3-8B-shaped model with
``--layers`` layers (random weights), every decoder linear replaced by ``Fp8Linear``; one
eager decode step after a 128-token prompt (static cache), profiled with ``torch.profiler``;
prints the kernels by GPU time per step, batch 1 and 32.

``--generate``: where a step of ``generate()`` (static cache, compiled with CUDA graphs, as
``bench_decode.py`` runs it) spends its time, FP8 against bf16: ``generate(n)`` timed for
several ``n`` (is the time per step constant?), the profiler's host ops per step (the
difference of two ``generate()`` lengths) and the kernels' time per step.

On the GPU machine (from the repo root)::

    python benches/probe_decode.py --out $OUT/decode_profile.json
    python benches/probe_decode.py --generate --layers 32 --out $OUT/decode_host.json
    python benches/probe_decode.py --generate --no-prefill --python-profile --layers 32 --out $OUT/decode_py.json
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


def host_per_step(gen, n1: int, n2: int) -> dict:
    """The profiler's host ops (self CPU time) and kernels (self device time) per decode step:
    ``generate(n2)`` less ``generate(n1)``, divided by the steps between them."""
    from torch.profiler import ProfilerActivity, profile

    tot = {}
    for n in (n1, n2):
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as p:
            gen(n)
            torch.cuda.synchronize()
        tot[n] = {e.key: (e.self_cpu_time_total, e.count, getattr(e, "self_device_time_total", 0))
                  for e in p.key_averages()}
    steps = n2 - n1
    rows = []
    for key, (cpu2, cnt2, dev2) in tot[n2].items():
        cpu1, cnt1, dev1 = tot[n1].get(key, (0, 0, 0))
        rows.append(((cpu2 - cpu1) / steps, (cnt2 - cnt1) / steps, (dev2 - dev1) / steps, key[:100]))
    rows.sort(reverse=True)
    return {"cpu_us_per_step": sum(r[0] for r in rows), "device_us_per_step": sum(r[2] for r in rows),
            "ops": rows[:40]}


def prefill_probe(models: dict, cfg, tokens: int = 128) -> dict:
    """An eager forward of a ``tokens``-token prompt (what ``generate()`` runs before its
    compiled steps): wall time, and the profiler's top host ops and kernels."""
    import statistics
    import time

    from torch.profiler import ProfilerActivity, profile

    ids = torch.randint(1, cfg.vocab_size, (1, tokens), device="cuda")
    out = {}
    for tag, model in models.items():
        with torch.no_grad():
            for _ in range(2):
                model(input_ids=ids, use_cache=False, logits_to_keep=1)
            runs = []
            for _ in range(5):
                torch.cuda.synchronize()
                t = time.perf_counter()
                model(input_ids=ids, use_cache=False, logits_to_keep=1)
                torch.cuda.synchronize()
                runs.append(time.perf_counter() - t)
            with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as p:
                model(input_ids=ids, use_cache=False, logits_to_keep=1)
                torch.cuda.synchronize()
        rows = sorted(((e.self_cpu_time_total, e.count, getattr(e, "self_device_time_total", 0), e.key[:100])
                       for e in p.key_averages()), reverse=True)
        r = {"wall_ms": statistics.median(runs) * 1e3, "cpu_us": sum(x[0] for x in rows),
             "device_us": sum(x[2] for x in rows), "ops": rows[:40]}
        out[f"{tag}_prefill{tokens}"] = r
        print(f"== {tag} eager prefill {tokens}: {r['wall_ms']:.1f} ms; profiler host {r['cpu_us'] / 1e3:.1f} ms, "
              f"kernels {r['device_us'] / 1e3:.1f} ms", flush=True)
        for cpu, cnt, dev, key in rows[:25]:
            print(f"  cpu {cpu:9.1f} us  x{cnt:6d}  dev {dev:8.1f} us  {key}")
    return out


def generate_probe(models: dict, cfg, args) -> dict:
    """``generate()`` as ``bench_decode.decode_step_s`` runs it, timed at several lengths and
    profiled (host ops per step)."""
    import statistics
    import time

    from transformers import CompileConfig

    out = {}
    for batch in (1,):
        g = torch.Generator(device="cuda").manual_seed(batch)
        ids = torch.randint(1, cfg.vocab_size, (batch, 128), device="cuda", generator=g)
        mask = torch.ones_like(ids)
        for tag, model in models.items():
            bd._prep_generation(model)
            kw = {"compile_config": CompileConfig(backend="inductor", fullgraph=False, mode="reduce-overhead")}

            def gen(n, model=model, kw=kw, ids=ids, mask=mask):
                return model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=n, min_new_tokens=n,
                                      cache_implementation="static", do_sample=False, **kw)

            t = time.perf_counter()
            gen(80)
            torch.cuda.synchronize()
            first = time.perf_counter() - t
            times = {}
            for n in (2, 16, 48, 80):
                gen(n)
                runs = []
                for _ in range(3):
                    torch.cuda.synchronize()
                    t = time.perf_counter()
                    gen(n)
                    torch.cuda.synchronize()
                    runs.append(time.perf_counter() - t)
                times[n] = statistics.median(runs)
            graphs = graph_counts()  # after the plain runs, before any profiler
            print(f"  graphs after the timed runs: {graphs}", flush=True)
            prof = host_per_step(gen, 16, 48)
            prof["graphs_before_profiling"] = graphs
            if args.python_profile:
                prof.update(python_per_step(gen, 16, 48))
            r = {"first_call_s": first, "generate_s": times,
                 "step_ms_16_80": (times[80] - times[16]) / 64 * 1e3,
                 "step_ms_2_16": (times[16] - times[2]) / 14 * 1e3,
                 "step_ms_48_80": (times[80] - times[48]) / 32 * 1e3, **prof}
            out[f"{tag}_b{batch}"] = r
            print(f"== {tag} b{batch}: generate(n) s {times}; ms/step 2-16 {r['step_ms_2_16']:.2f}, 16-80 "
                  f"{r['step_ms_16_80']:.2f}, 48-80 {r['step_ms_48_80']:.2f}; profiler per step: host "
                  f"{prof['cpu_us_per_step']:.0f} us, kernels {prof['device_us_per_step']:.0f} us", flush=True)
            for cpu, cnt, dev, key in prof["ops"][:30]:
                print(f"  cpu {cpu:8.1f} us  x{cnt:6.1f}  dev {dev:8.1f} us  {key}")
            if args.python_profile:
                print(f"  Python (cProfile) self time per step {prof['py_self_us_per_step']:.0f} us:")
                for self_us, cum_us, calls, key in prof["py_funcs"][:30]:
                    print(f"  py self {self_us:8.1f} us  cum {cum_us:8.1f} us  x{calls:7.1f}  {key}")
    return out


def graph_counts() -> dict:
    """How many CUDA graphs torch.compile's cudagraph trees hold on this device (recorded
    nodes, by function), and dynamo's compile counters: more recordings or compiles for one
    model than the other is host time its steps pay."""
    from torch._dynamo.utils import counters
    from torch._inductor import cudagraph_trees as ct

    mgr = ct.get_container(torch.cuda.current_device()).tree_manager
    by_fn: dict = {}  # the recorded nodes of each compiled function, the tree walked once
    stack = [n for roots in mgr.roots.values() for n in roots] if mgr is not None else []
    while stack:
        node = stack.pop()
        by_fn.setdefault(node.wrapped_function.id, []).append(node)
        stack += [c for cs in node.children.values() for c in cs]
    changed = {}  # the static inputs whose addresses differ between a function's first two recordings
    for fid, ns in by_fn.items():
        if len(ns) > 1:
            a, b = ns[0], ns[1]
            names = [getattr(p, "name", "?") for p in a.wrapped_function.placeholders]
            pa, pb = a.static_input_data_ptrs, b.static_input_data_ptrs
            idx = [i for i in range(min(len(pa), len(pb))) if pa[i] != pb[i]]
            changed[str(fid)] = [names[i] if i < len(names) else i for i in idx][:20]
    nodes = sum(len(ns) for ns in by_fn.values())
    per_fn = {str(fid): len(ns) for fid, ns in by_fn.items()}
    return {"cudagraph_nodes": nodes, "nodes_per_function": per_fn, "changed_static_inputs": changed,
            "dynamo_stats": dict(counters["stats"]), "dynamo_frames": dict(counters["frames"])}


def python_per_step(gen, n1: int, n2: int) -> dict:
    """cProfile's Python functions per decode step (self and cumulative time, calls):
    ``generate(n2)`` less ``generate(n1)``, divided by the steps between them. The profiler
    slows every Python call, so the totals are above the real host time; the difference
    between two models' rows says where one spends more."""
    import cProfile
    import pstats

    tot = {}
    for n in (n1, n2):
        pr = cProfile.Profile()
        pr.enable()
        gen(n)
        torch.cuda.synchronize()
        pr.disable()
        tot[n] = {f"{'/'.join(Path(k[0]).parts[-2:])}:{k[1]}:{k[2]}": (v[1], v[2], v[3])
                  for k, v in pstats.Stats(pr).stats.items()}
    steps = n2 - n1
    rows = []
    for key, (nc2, tt2, ct2) in tot[n2].items():
        nc1, tt1, ct1 = tot[n1].get(key, (0, 0.0, 0.0))
        rows.append(((tt2 - tt1) / steps * 1e6, (ct2 - ct1) / steps * 1e6, (nc2 - nc1) / steps, key))
    rows.sort(reverse=True)
    return {"py_self_us_per_step": sum(r[0] for r in rows), "py_funcs": rows[:80],
            "py_cumulative": sorted(rows, key=lambda r: r[1], reverse=True)[:40]}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="decode_profile.json")
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--generate", action="store_true",
                    help="profile an eager prefill and generate()'s steps instead (host time)")
    ap.add_argument("--prefill-only", action="store_true", help="with --generate: the eager prefill only")
    ap.add_argument("--python-profile", action="store_true",
                    help="with --generate: also cProfile's Python functions per step (where the host time goes)")
    ap.add_argument("--no-prefill", dest="prefill", action="store_false",
                    help="with --generate: skip the prefill probe")
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
    if args.generate:
        res = prefill_probe(models, cfg) if args.prefill else {}
        Path(args.out).write_text(json.dumps(res, indent=1, default=str))
        if not args.prefill_only:
            res.update(generate_probe(models, cfg, args))
        Path(args.out).write_text(json.dumps(res, indent=1, default=str))
        return 0
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

"""Tensor-parallel load benchmark: ``load_quantized`` with ``tp_size`` in {1, 2, ...} on one
host, NCCL, one process per GPU, all in one run.

    python benches/bench_load_tp.py CKPT_DIR --tp 1,2 --out benches/results/load_tp_h200.json

For each tp size: every rank loads its slice (after a warm-up collective, so NCCL's lazy
set-up is not timed: a serving engine has it up before it loads), ``repeat`` times; the
time of a run is the slowest rank's, from a barrier before to a barrier after. Reported:
checkpoint bytes / that time (GB/s), bytes read per rank, peak GPU memory per rank, and a
check that every rank's bytes equal the matching slice of the one-GPU result (each rank
loads the whole checkpoint once more, untimed, and compares on its GPU). The page cache is
warmed first. NCCL's NVLink multicast stays off (``NCCL_NVLS_ENABLE=0``).

``--variants "default,quantize_on=host,quantize_on=split host_share=0.3"`` (the syntax of
``probe_pipeline.py``: ``load_quantized`` keywords and ``engine.NAME=value``) loads each
variant in turn in the same process group, round robin (drift falls on all alike); the
first one is the headline row, the only one verified.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:  # probe_pipeline, here and in the spawned ranks
    sys.path.insert(0, str(HERE))


def _rank(rank: int, size: int, ckpt: str, port: int, repeat: int, out: str, verify: bool, opts: dict,
          device: str, engine: dict, variants: dict, cold: bool = False) -> None:
    import fastfp8
    import fastfp8.engine
    import peers
    import torch
    import torch.distributed as dist
    from fastfp8.layouts import layout_for
    from fastfp8.tensor_parallel import TensorParallel, rank_slice
    from probe_pipeline import engine_constants

    for key, value in engine.items():  # fastfp8.engine constants under test (--engine)
        setattr(fastfp8.engine, key, value)
    cuda = device == "cuda"
    if cuda:
        torch.cuda.set_device(rank)
    dev = torch.device("cuda", rank) if cuda else torch.device("cpu")
    dist.init_process_group("nccl" if cuda else "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=size, device_id=dev if cuda else None)
    sync = torch.cuda.synchronize if cuda else (lambda d: None)
    try:
        x = torch.ones(1024, device=dev)
        dist.all_reduce(x)  # NCCL's communicator, outside the timed region
        from fastfp8.quant import quantize_channelwise

        quantize_channelwise(torch.randn(256, 4096, device=dev).to(torch.bfloat16), check_finite=False)
        sync(dev)
        h2d = _h2d_ceilings(dev, rank, size) if cuda else {}
        runs: dict[str, list[dict]] = {name: [] for name in variants}
        last = None
        for _ in range(repeat):
            for name, kw in variants.items():  # round robin
                base = 0
                if cuda:
                    torch.cuda.empty_cache()
                    time.sleep(peers.SETTLE_S)
                    torch.cuda.reset_peak_memory_stats(dev)
                    base = torch.cuda.memory_allocated(dev)
                if cold and rank == 0:  # every rank's first read comes from the disk
                    from fastfp8.bench import evict_page_cache

                    evict_page_cache([str(p) for p in fastfp8.open_checkpoint(ckpt).shards])
                dist.barrier()
                t0 = time.perf_counter()
                with engine_constants(kw) as load_kw:
                    state = fastfp8.load_quantized(ckpt, device=dev, tp_rank=rank, tp_size=size, progress=False,
                                                   **{**opts, **load_kw})
                sync(dev)
                own = time.perf_counter() - t0
                dist.barrier()
                secs = time.perf_counter() - t0
                runs[name].append({"seconds": secs, "own_seconds": own, "bytes_read": state.stats.bytes_read,
                                   "peak_gpu_bytes": torch.cuda.max_memory_allocated(dev) - base if cuda else 0,
                                   "final_bytes": sum(t.numel() * t.element_size() for t in state.values()),
                                   "phases": state.stats.phases, "memory_budget": state.stats.memory_budget,
                                   "chunk_bytes": state.stats.chunk_bytes, "threads": state.stats.threads,
                                   "host_quantized": state.stats.host_quantized})
                if last is None:  # the first variant's: the one verified
                    last = state
                del state
        mismatched = None
        if verify:
            full = fastfp8.load_quantized(ckpt, device=dev, progress=False, **opts)
            splits = {t.source.name: t.split for t in layout_for(ckpt).targets(fastfp8.open_checkpoint(ckpt))}
            tp = TensorParallel(rank, size)
            mismatched = []
            for name, t in last.items():
                base = name[: -len("_scale")] if name.endswith("_scale") else name
                src = base if base in splits else next(
                    base[: -len(o)] + f for f, o in (("gate_up_proj", "w13_weight"), ("down_proj", "w2_weight"))
                    if base.endswith("experts." + o))
                want = rank_slice(splits[src], name, full[name], tp) if size > 1 else full[name]
                if t.shape != want.shape or not torch.equal(t.contiguous().view(torch.uint8),
                                                            want.contiguous().view(torch.uint8)):
                    mismatched.append(name)
            del full
        Path(f"{out}.{rank}").write_text(json.dumps({"rank": rank, "runs": runs, "mismatched": mismatched,
                                                     "h2d": h2d}))
    finally:
        dist.destroy_process_group()


def _h2d_ceilings(dev, rank: int, size: int, total: int = 4 << 30, chunk: int = 64 << 20) -> dict[str, float]:
    """Pinned host -> GPU in 64 MiB copies: rank 0's GPU alone, then every rank's at once
    (GPUs behind one PCIe switch share its link to the host). GB/s, best of 3; the
    concurrent figure is this rank's, the caller sums them."""
    import torch
    import torch.distributed as dist

    src = torch.empty(total, dtype=torch.uint8, pin_memory=True)
    src.random_()
    dst = torch.empty(total, dtype=torch.uint8, device=dev)

    def copy_s() -> float:
        torch.cuda.synchronize(dev)
        t0 = time.perf_counter()
        for off in range(0, total, chunk):
            dst[off : off + chunk].copy_(src[off : off + chunk], non_blocking=True)
        torch.cuda.synchronize(dev)
        return time.perf_counter() - t0

    alone = together = 0.0
    for _ in range(3):
        dist.barrier()
        if rank == 0:
            alone = max(alone, total / copy_s() / 1e9)
        dist.barrier()
        together = max(together, total / copy_s() / 1e9)
    return {"alone_gbps": alone, "concurrent_gbps": together}


def run_tp(ckpt: str, size: int, repeat: int, verify: bool, opts: dict, tmp: Path, device: str,
           engine: dict | None = None, variants: dict | None = None, cold: bool = False) -> list[dict]:
    """One row per variant (``{"default": {}}`` when none are given), the first verified."""
    import torch.multiprocessing as mp

    variants = variants or {"default": {}}
    out = str(tmp / f"tp{size}")
    port = 29500 + size + int(time.time()) % 1000
    mp.start_processes(_rank, args=(size, ckpt, port, repeat, out, verify, opts, device, engine or {}, variants,
                                    cold),
                       nprocs=size, start_method="spawn")
    ranks = [json.loads(Path(f"{out}.{r}").read_text()) for r in range(size)]
    h2d = {"h2d_rank0_alone_gbps": ranks[0]["h2d"].get("alone_gbps"),
           "h2d_all_ranks_gbps": sum(rk["h2d"].get("concurrent_gbps", 0.0) for rk in ranks)} if ranks[0]["h2d"] else {}
    rows = []
    for k, name in enumerate(variants):
        runs = [rk["runs"][name] for rk in ranks]
        times = [max(r[i]["seconds"] for r in runs) for i in range(repeat)]
        med = times.index(statistics.median(times)) if repeat % 2 else -1
        rows.append({"tp": size, "variant": name, "seconds": statistics.median(times), "runs_seconds": times,
                     "bytes_read_per_rank": [r[-1]["bytes_read"] for r in runs],
                     "peak_gpu_bytes_per_rank": [max(x["peak_gpu_bytes"] for x in r) for r in runs],
                     "final_bytes_per_rank": [r[-1]["final_bytes"] for r in runs],
                     "phases_rank0": runs[0][med]["phases"], "phases_per_rank": [r[med]["phases"] for r in runs],
                     "host_quantized_per_rank": [r[-1]["host_quantized"] for r in runs],
                     "memory_budget": runs[0][-1]["memory_budget"],
                     "chunk_bytes": runs[0][-1]["chunk_bytes"], "threads": runs[0][-1]["threads"],
                     "mismatched": None if not verify or k else sorted({n for rk in ranks for n in rk["mismatched"]}),
                     **h2d})
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("ckpt")
    ap.add_argument("--tp", default="1,2")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--no-verify", action="store_true")
    ap.add_argument("--budget", default=None)
    ap.add_argument("--threads", type=int, default=None, help="reader threads per rank (default: fastfp8's)")
    ap.add_argument("--out", default=str(HERE / "results" / "load_tp_h200.json"))
    ap.add_argument("--device", choices=["cuda", "cpu"], default="cuda", help="cpu: gloo, for a smoke test")
    ap.add_argument("--engine", nargs="*", default=[], metavar="NAME=INT",
                    help="fastfp8.engine constants set in every rank (DRIVER_COPY=0 MERGE_SHARE=4)")
    ap.add_argument("--cold", action="store_true",
                    help="evict the checkpoint from the page cache before every load (rank 0, then a barrier)")
    ap.add_argument("--variants", default="default",
                    help="comma-separated load variants, round robin: \"default\" or load_quantized keywords and "
                    "engine.NAME=value (\"quantize_on=split host_share=0.3\"); the first is the headline")
    args = ap.parse_args(argv)
    engine = {k: int(v) for k, v in (kv.split("=", 1) for kv in args.engine)}
    from probe_pipeline import parse_variant

    variants = {v: {} if v == "default" else parse_variant(v) for v in args.variants.split(",")}
    os.environ.setdefault("NCCL_NVLS_ENABLE", "0")
    import tempfile

    import fastfp8
    import torch

    ckpt = fastfp8.open_checkpoint(args.ckpt)
    for p in ckpt.shards if not args.cold else ():  # warm the page cache
        with open(p, "rb") as f:
            while f.read(64 << 20):
                pass
    opts = {k: v for k, v in {"memory_budget": args.budget, "threads": args.threads}.items() if v is not None}
    cuda = args.device == "cuda"
    n_dev = torch.cuda.device_count() if cuda else 64
    doc = {"gpu": torch.cuda.get_device_name(0) if cuda else "cpu (gloo)", "gpus": n_dev if cuda else 0,
           "date": datetime.date.today().isoformat(), "checkpoint": args.ckpt, "checkpoint_bytes": ckpt.nbytes,
           "cpu_cores": os.cpu_count(), "repeat": args.repeat, "engine": engine, "cold": args.cold, "rows": []}
    with tempfile.TemporaryDirectory() as tmp:
        for size in [int(x) for x in args.tp.split(",")]:
            if size > n_dev:
                print(f"tp {size}: only {n_dev} GPUs, skipped", flush=True)
                continue
            for row in run_tp(args.ckpt, size, args.repeat, not args.no_verify, opts, Path(tmp), args.device,
                              engine, variants, args.cold):
                row["gbps"] = ckpt.nbytes / row["seconds"] / 1e9
                doc["rows"].append(row)
                if "h2d_all_ranks_gbps" in row and row["variant"] == next(iter(variants)):
                    print(f"tp {size}: pinned H2D, rank 0 alone {row['h2d_rank0_alone_gbps']:.1f} GB/s, every rank "
                          f"at once {row['h2d_all_ranks_gbps']:.1f} GB/s in all", flush=True)
                print(f"tp {size} [{row['variant']}]: {row['seconds']:.3f} s  {row['gbps']:.1f} GB/s  read/rank "
                      f"{[round(b / 1e9, 2) for b in row['bytes_read_per_rank']]} GB  peak GPU/rank "
                      f"{[round(b / 2**30, 2) for b in row['peak_gpu_bytes_per_rank']]} GiB  "
                      f"host-quantized {row['host_quantized_per_rank']}  mismatched {row['mismatched']}  "
                      f"phases(rank0) { {k: round(v, 3) for k, v in row['phases_rank0'].items()} }", flush=True)
    headline = next(iter(variants))
    doc["variants"] = list(variants)
    by = {r["tp"]: r for r in doc["rows"] if r["variant"] == headline}
    if 1 in by:
        doc["single_gbps"] = by[1]["gbps"]
    for size, r in by.items():
        if size > 1:
            doc[f"tp{size}_gbps"] = r["gbps"]
            doc[f"tp{size}_bytes_read_per_rank"] = r["bytes_read_per_rank"]
            doc[f"tp{size}_peak_gpu_bytes_per_rank"] = r["peak_gpu_bytes_per_rank"]
        if "h2d_all_ranks_gbps" in r:
            doc[f"tp{size}_h2d_all_ranks_gbps"] = r["h2d_all_ranks_gbps"]
            doc["h2d_one_gpu_gbps"] = r["h2d_rank0_alone_gbps"]
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(doc, indent=1) + "\n")
    out.with_suffix(".md").write_text(markdown(doc))
    print(markdown(doc))
    return 0


def markdown(doc: dict) -> str:
    lines = [f"Tensor-parallel `load_quantized` of `{doc['checkpoint']}` ({doc['checkpoint_bytes'] / 1e9:.1f} GB "
             f"bf16), {doc['gpus']} x {doc['gpu']}, {doc['cpu_cores']} cores, {doc['date']}; NCCL, one process per "
             f"GPU, {'cold (evicted before every load)' if doc.get('cold') else 'warm'} page cache, median of "
             f"{doc['repeat']} (slowest rank).", "",
             "| tp | variant | s | GB/s (checkpoint / slowest rank) | read per rank GB | peak GPU per rank GiB "
             "| bytes = slice of 1-GPU |",
             "| ---: | --- | ---: | ---: | --- | --- | --- |"]
    for r in doc["rows"]:
        bad = r["mismatched"]
        ok = "not checked" if bad is None else ("yes" if not bad else f"NO: {bad[:3]}")
        lines.append(f"| {r['tp']} | {r.get('variant', 'default')} | {r['seconds']:.3f} | {r['gbps']:.1f} | "
                     f"{', '.join(f'{b / 1e9:.2f}' for b in r['bytes_read_per_rank'])} | "
                     f"{', '.join(f'{b / 2**30:.2f}' for b in r['peak_gpu_bytes_per_rank'])} | {ok} |")
    extra = [f"Pinned host -> GPU (64 MiB copies): one GPU {doc['h2d_one_gpu_gbps']:.1f} GB/s, "
             f"{size} GPUs at once {doc[f'tp{size}_h2d_all_ranks_gbps']:.1f} GB/s in all."
             for size in (2, 4, 8) if f"tp{size}_h2d_all_ranks_gbps" in doc and "h2d_one_gpu_gbps" in doc]
    if doc.get("code"):
        extra.append(f"Code: {doc['code']}.")
    return "\n".join(lines + (["", *extra] if extra else [])) + "\n"


if __name__ == "__main__":
    raise SystemExit(main())

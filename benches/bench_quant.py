"""GPU benchmark: fused Triton FP8 channelwise quantization vs eager torch.

Run by hand on a CUDA machine (H100 target: >= 2 TB/s effective on large weights):

    python benches/bench_quant.py                       # default shapes, bf16
    python benches/bench_quant.py --dtype float16 --out benches/results/quant_fp16.json
    python benches/bench_quant.py --shapes 4096x4096 28672x8192 8192x28672:T

A shape ``AxB`` is a contiguous ``[out=A, in=B]`` weight, ``ExAxB`` a 3-D expert stack,
and a ``:T`` suffix means the same logical shape as a transposed view of a contiguous
tensor (columns not contiguous: the Llama4 fused-expert layout).

Every shape is first checked byte-for-byte (kernel vs the torch reference on the same
GPU). Times are ``triton.testing.do_bench`` medians; each call uses the next of several
input/output buffers (together > 4x the L2 size) so the input is read from HBM, not L2.
Effective bandwidth counts weight bytes read + fp8 bytes written + scale bytes written.
Columns: ``triton`` (the kernel), ``reference`` (fastfp8's torch reference, which mirrors
compressed-tensors op for op), ``eager_min`` (the least eager torch: abs-amax, divide,
clamp, cast), and ``dispatch`` (``quantize_channelwise`` with ``check_finite=True``, i.e.
kernel + finiteness check + one host sync per call). ``--sweep`` also times other
launch configs (BLOCK_M, BLOCK_N, SINGLE_PASS, num_warps) per shape, to tune
``pick_config``.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import functools
import json
import math
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # timing, also when loaded by path
try:  # run from a source checkout without installing
    import fastfp8.quant  # noqa: F401
except ImportError:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "python"))

from timing import per_call_us, timeit

DEFAULT_SHAPES = [
    "4096x4096",
    "14336x4096",
    "4096x14336",
    "28672x8192",
    "8192x28672",
    "128x768x2048",
    "4096x14336:T",
    "16x2048x5120:T",
]
DEVICE = "cuda"  # a constant so the script can be smoke-tested elsewhere
DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def parse_shape(spec: str) -> tuple[tuple[int, ...], bool]:
    """``"AxB"`` / ``"ExAxB"`` with optional ``":T"`` -> (logical shape, transposed)."""
    dims, _, flag = spec.partition(":")
    shape = tuple(int(d) for d in dims.lower().split("x"))
    if len(shape) not in (2, 3) or flag not in ("", "T", "t"):
        raise argparse.ArgumentTypeError(f"bad shape {spec!r}")
    return shape, bool(flag)


def make_input(shape: tuple[int, ...], transposed: bool, dtype: torch.dtype, seed: int) -> torch.Tensor:
    g = torch.Generator(device=DEVICE).manual_seed(seed)
    if not transposed:
        return torch.randn(shape, generator=g, device=DEVICE, dtype=dtype) * 0.02
    stored = (*shape[:-2], shape[-1], shape[-2])
    return (torch.randn(stored, generator=g, device=DEVICE, dtype=dtype) * 0.02).transpose(-1, -2)


def eager_min(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The least eager torch FP8 channelwise quantization (no exactness guarantees)."""
    scale = w.abs().amax(dim=-1, keepdim=True) / 448.0
    return (w / scale).clamp(-448.0, 448.0).to(torch.float8_e4m3fn), scale


def bench(fn: Callable[[int], Any], n_buffers: int, rep_ms: int) -> float:
    """Median milliseconds of ``fn(i)``, ``i`` rotating over the ``n_buffers`` buffers, eager."""
    return timeit([functools.partial(fn, i) for i in range(n_buffers)], graph=False, rep_ms=rep_ms, warmup_ms=10) / 1e3


def sweep_configs(w: torch.Tensor) -> list[tuple[int, int, bool, int]]:
    """Candidate launch configs for ``--sweep`` (the default pick is always included)."""
    from fastfp8.quant.triton_kernel import launch_config

    rows, cols = launch_config(w)["rows"], w.shape[-1]
    p2 = 1 << max(0, (cols - 1).bit_length())
    cands: set[tuple[int, int, bool, int]] = set()
    if w.stride(-1) == 1:
        if p2 <= 32768:
            for nw in (4, 8, 16, 32):
                for bm in (1, 2, 4):
                    if bm * p2 <= 32768 and bm <= rows:
                        cands.add((bm, max(16, p2), True, nw))
        for bn in (1024, 2048, 4096, 8192):
            for nw in (4, 8, 16):
                if bn < cols:
                    cands.add((1, bn, False, nw))
    else:
        for bm in (32, 64, 128):
            for bn in (32, 64, 128):
                for nw in (4, 8):
                    cands.add((bm, bn, cols <= bn, nw))
    return sorted(cands)


def run_case(spec: str, dtype: torch.dtype, args: argparse.Namespace, l2: int, free: int) -> dict[str, Any]:
    """Check and time one shape; returns its JSON row."""
    from fastfp8.quant import quantize_channelwise, quantize_channelwise_reference
    from fastfp8.quant.triton_kernel import launch_config, quantize_channelwise_triton

    shape, transposed = parse_shape(spec)
    numel = math.prod(shape)
    n_rows = numel // shape[-1]
    in_bytes = numel * dtype.itemsize
    moved = in_bytes + numel + n_rows * dtype.itemsize
    n_buf = max(2, min(16, math.ceil(4 * l2 / in_bytes)))
    while n_buf > 2 and n_buf * (in_bytes + numel) > free * 0.4:
        n_buf -= 1
    ws = [make_input(shape, transposed, dtype, seed=i) for i in range(n_buf)]
    outs = [torch.empty(shape, dtype=torch.float8_e4m3fn, device=DEVICE) for _ in range(n_buf)]
    scales = [torch.empty((*shape[:-1], 1), dtype=dtype, device=DEVICE) for _ in range(n_buf)]

    # correctness first: poisoned outputs, bytes vs the reference on the same GPU
    outs[0].view(torch.uint8).fill_(0x7F)
    scales[0].fill_(float("nan"))
    quantize_channelwise_triton(ws[0], out=outs[0], scale_out=scales[0], rounding=args.rounding)
    q_ref, s_ref = quantize_channelwise_reference(ws[0], rounding=args.rounding)
    iv = torch.int32 if dtype == torch.float32 else torch.int16
    equal = torch.equal(outs[0].view(torch.uint8), q_ref.view(torch.uint8)) and torch.equal(
        scales[0].view(iv), s_ref.view(iv)
    )
    del q_ref, s_ref
    if not equal:
        print(f"!! {spec}: kernel output differs from the reference")

    def run_triton(i: int) -> None:
        quantize_channelwise_triton(ws[i], out=outs[i], scale_out=scales[i], rounding=args.rounding)

    t_triton = bench(run_triton, n_buf, args.rep_ms)
    row: dict[str, Any] = {
        "shape": list(shape),
        "transposed": transposed,
        "dtype": args.dtype,
        "rounding": args.rounding,
        "bytes_moved": moved,
        "buffers": n_buf,
        "config": launch_config(ws[0]),
        "equal": equal,
        "triton_ms": t_triton,
        "triton_tbps": moved / t_triton / 1e9,
    }
    if args.sweep:
        from fastfp8.quant import triton_kernel as tk

        sweep = []
        for cfg in sweep_configs(ws[0]):
            t = bench(lambda i, c=cfg: tk._launch(ws[i], outs[i], scales[i], args.rounding, c), n_buf, args.rep_ms)
            sweep.append({"config": list(cfg), "ms": t, "tbps": moved / t / 1e9})
        sweep.sort(key=lambda r: r["ms"])
        row["sweep"] = sweep
        best = sweep[0]
        print(f"{spec}: best {best['config']} {best['ms']:.3f} ms {best['tbps']:.2f} TB/s (default {t_triton:.3f} ms)")
    if not args.no_baselines:
        torch.cuda.empty_cache()
        t_ref = bench(lambda i: quantize_channelwise_reference(ws[i], rounding=args.rounding), n_buf, args.rep_ms)
        t_min = bench(lambda i: eager_min(ws[i]), n_buf, args.rep_ms)
        t_disp = bench(
            lambda i: quantize_channelwise(ws[i], out=outs[i], scale_out=scales[i], rounding=args.rounding),
            n_buf,
            args.rep_ms,
        )
        row.update(
            reference_ms=t_ref,
            reference_tbps=moved / t_ref / 1e9,
            eager_min_ms=t_min,
            eager_min_tbps=moved / t_min / 1e9,
            dispatch_ms=t_disp,
            dispatch_tbps=moved / t_disp / 1e9,
        )
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", nargs="+", default=DEFAULT_SHAPES)
    ap.add_argument("--dtype", choices=sorted(DTYPES), default="bfloat16")
    ap.add_argument("--rounding", choices=["eager", "fp32"], default="eager")
    ap.add_argument("--rep-ms", type=int, default=200, help="do_bench measuring time per case")
    ap.add_argument("--no-baselines", action="store_true", help="time only the kernel")
    ap.add_argument("--sweep", action="store_true", help="also time alternative launch configs")
    ap.add_argument("--out", default="benches/results/quant_h100.json")
    args = ap.parse_args()

    if not torch.cuda.is_available():
        raise SystemExit("needs a CUDA GPU")
    import triton
    from fastfp8.quant import triton_supported
    from fastfp8.quant.triton_kernel import quantize_channelwise_triton

    if not triton_supported(torch.device(DEVICE)):
        raise SystemExit("the Triton kernel needs compute capability >= 8.9 and triton")
    dtype = DTYPES[args.dtype]
    props = torch.cuda.get_device_properties(0)
    l2 = int(getattr(props, "L2_cache_size", 50 * 2**20) or 50 * 2**20)
    free, _ = torch.cuda.mem_get_info()

    rows_out: list[dict[str, Any]] = []
    for spec in args.shapes:
        rows_out.append(run_case(spec, dtype, args, l2, free))
        torch.cuda.empty_cache()

    # launch overhead on a small weight (host side, async)
    w_small = make_input((1024, 1024), False, dtype, seed=0)
    o_small = torch.empty_like(w_small, dtype=torch.float8_e4m3fn)
    s_small = torch.empty((1024, 1), dtype=dtype, device=DEVICE)
    launch_us = per_call_us(
        lambda: quantize_channelwise_triton(w_small, out=o_small, scale_out=s_small, rounding=args.rounding)
    )[0]

    versions = f"torch {torch.__version__}, triton {triton.__version__}"
    print(f"\n{props.name}, {versions}, {args.dtype}, rounding={args.rounding}")
    print(f"host-side launch overhead (1024x1024, no sync): {launch_us:.1f} us/call\n")
    head = "| shape | layout | equal | triton ms | triton TB/s |"
    sep = "| --- | --- | --- | ---: | ---: |"
    if not args.no_baselines:
        head += " reference ms | reference TB/s | eager_min ms | eager_min TB/s | dispatch ms | speedup vs reference |"
        sep += " ---: | ---: | ---: | ---: | ---: | ---: |"
    md = [f"FP8 channelwise quantization, {props.name}, {versions}, {args.dtype}, rounding={args.rounding}; "
          "TB/s = (weight read + fp8 written + scales) / median time", "", head, sep]
    print(head)
    print(sep)
    for r in rows_out:
        line = (
            f"| {'x'.join(map(str, r['shape']))} | {'transposed' if r['transposed'] else 'contiguous'} "
            f"| {'yes' if r['equal'] else 'NO'} | {r['triton_ms']:.3f} | {r['triton_tbps']:.2f} |"
        )
        if not args.no_baselines:
            line += (
                f" {r['reference_ms']:.3f} | {r['reference_tbps']:.3f} | {r['eager_min_ms']:.3f} "
                f"| {r['eager_min_tbps']:.3f} | {r['dispatch_ms']:.3f} | {r['reference_ms'] / r['triton_ms']:.1f}x |"
            )
        print(line)
        md.append(line)

    result = {
        "gpu": props.name,
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "torch": torch.__version__,
        "triton": triton.__version__,
        "cuda": torch.version.cuda,
        "dtype": args.dtype,
        "rounding": args.rounding,
        "l2_bytes": l2,
        "launch_overhead_us": launch_us,
        "rows": rows_out,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    out.with_suffix(".md").write_text("\n".join(md) + "\n")
    print(f"\nwrote {out}")
    if not all(r["equal"] for r in rows_out):
        raise SystemExit("some kernel outputs differ from the reference")


if __name__ == "__main__":
    main()

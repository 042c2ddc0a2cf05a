"""The ``fastfp8`` command: ``inspect``, ``convert`` and ``bench`` a bf16 checkpoint.

Exit codes: 0 success; 1 a failure while working (a read error, a full disk, a loader
that failed in ``bench``); 2 bad usage or bad input (unknown option, missing or invalid
checkpoint, existing destination, bad ignore pattern); 130 interrupted (Ctrl-C). Every
error is one line on stderr, ``fastfp8: error: ...``; set ``FASTFP8_DEBUG=1`` for the
traceback. Warnings are lines ``fastfp8: warning: ...`` on stderr.

MODEL is a local directory or ``.safetensors`` file, or a Hugging Face Hub id
(``meta-llama/Llama-3.2-1B``, resolved by :func:`fastfp8.hub.resolve`; ``--revision``).

Nothing here imports torch before the arguments are parsed: ``fastfp8 --help`` is instant.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from .bench import LOADERS, check_output_path
from .errors import (
    BudgetError,
    CheckpointError,
    Error,
    NonFiniteWeightError,
    UnsupportedDtypeError,
    one_line,
)
from .units import format_bytes, format_rate, parse_bytes

PROG = "fastfp8"

DESCRIPTION = """\
Load bf16 safetensors checkpoints as FP8 (e4m3, one scale per output channel:
compressed-tensors / llm-compressor FP8_DYNAMIC), fast.

  fastfp8 inspect MODEL            what would be quantized, and the size after
  fastfp8 convert MODEL OUT_DIR    write an FP8 checkpoint vLLM and transformers load
  fastfp8 bench MODEL              time loading to the GPU against other loaders

MODEL is a model directory, a .safetensors file, or a Hugging Face Hub id
(org/name; --revision picks a branch, tag or commit; HF_HOME, HF_HUB_OFFLINE apply).

By default lm_head, embeddings, MoE routers and vision towers stay in bf16; add modules
with --ignore NAME or --ignore 're:<regex>' (matched from the start of the module name).
Run 'fastfp8 COMMAND --help' for the options of a command.
"""

EPILOG = """\
exit codes: 0 ok, 1 failed while working, 2 bad usage or input, 130 interrupted.
Serve a bf16 model as FP8 in vLLM without converting: vllm serve MODEL_DIR --load-format fastfp8
"""


class _Parser(argparse.ArgumentParser):
    """argparse, with usage errors as one line and exit code 2."""

    def error(self, message: str):  # type: ignore[override]
        raise _UsageError(f"{message} (see '{self.prog} --help')")


class _UsageError(Exception):
    pass


def _ignore_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--ignore", action="append", default=[], metavar="MODULE",
                   help="keep this module in bf16: an exact module name (model.layers.0.mlp.down_proj) or "
                        "'re:<regex>' (re:.*self_attn); repeat it or separate entries with commas")
    p.add_argument("--no-default-ignore", action="store_true",
                   help="also quantize the linears kept in bf16 by default (lm_head, vision towers); embeddings "
                        "and MoE routers are never quantized")
    p.add_argument("--layout", choices=["auto", "names"], default="auto",
                   help="auto (default): the model layout from config.json (an architecture fastfp8 does not know "
                        "is refused); names: quantize every 2-D float *.weight that is not ignored")


def _model_args(p: argparse.ArgumentParser, name: str, help: str) -> None:
    p.add_argument(name, metavar="MODEL", help=help + ", or a Hugging Face Hub id (org/name)")
    p.add_argument("--revision", default=None,
                   help="branch, tag or commit of a Hub id (default: main); not for local paths")


def _resolve(path: str, revision: str | None) -> Path:
    from .hub import resolve

    return resolve(path, revision=revision)


def _warn(message: str) -> None:
    print(f"{PROG}: warning: {message}", file=sys.stderr)


def _warn_unmatched_ignores(ckpt, ignore: list[str]) -> list[str]:
    """Warns about each ``--ignore`` entry that matches no module (nor fused-expert tensor)
    of ``ckpt``: a typo would otherwise quantize what the user meant to keep. Returns them."""
    from .layouts import FUSED_SUFFIXES, IgnoreRules, module_of

    candidates: set[str] = set()
    for name in ckpt.tensors:
        candidates.add(module_of(name))
        for suffix in FUSED_SUFFIXES:
            if name.endswith(suffix):
                candidates.update((name, name[: -len(suffix)] + "experts"))
    unmatched = []
    for entry in ignore:
        rule = IgnoreRules([entry], default_ignore=False)
        if not any(rule(c) for c in candidates):
            unmatched.append(entry)
            _warn(f"--ignore {entry!r} matches no module of {ckpt.path} (module names look like "
                  f"{_example_module(candidates)}; patterns are 're:<regex>', matched from the start)")
    return unmatched


def _example_module(candidates: set[str]) -> str:
    linear = sorted(c for c in candidates if c.endswith("_proj")) or sorted(candidates) or ["?"]
    return linear[0]


def _ignore_list(args) -> list[str]:
    out: list[str] = []
    for entry in args.ignore:
        out += [e.strip() for e in entry.split(",") if e.strip()] if not entry.startswith("re:") else [entry]
    return out


def build_parser() -> argparse.ArgumentParser:
    from . import __version__

    parser = _Parser(prog=PROG, description=DESCRIPTION, epilog=EPILOG,
                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"{PROG} {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)

    p = sub.add_parser("inspect", help="list tensors, what would be quantized, and the resulting size",
                       description="List the tensors of a checkpoint (a model directory or a .safetensors file) "
                                   "with dtype, shape and size, what fastfp8 would do with each, and the size of "
                                   "the FP8 result. Reads only the headers.")
    _model_args(p, "path", "model directory or .safetensors file")
    _ignore_args(p)
    p.add_argument("--summary", action="store_true", help="print only the totals, not one line per tensor")
    p.add_argument("--json", action="store_true",
                   help="print one JSON document (every tensor, its action and sizes, the totals) instead")

    p = sub.add_parser("convert", help="write an FP8_DYNAMIC compressed-tensors checkpoint",
                       formatter_class=argparse.RawDescriptionHelpFormatter,
                       description="Stream a bf16/fp16/fp32 checkpoint into an FP8_DYNAMIC compressed-tensors "
                                   "checkpoint\n(what llm-compressor writes; vLLM and transformers load it): "
                                   "sharded safetensors + index,\nconfig.json with quantization_config, and "
                                   "the other files (tokenizer, ...) copied.\nHost memory stays at about "
                                   "--memory-budget plus the largest tensor. The output is\nwritten to "
                                   "OUT.tmp-<pid> and renamed to OUT only when complete.",
                       epilog="example:\n  fastfp8 convert ~/models/Llama-3.1-8B-Instruct "
                              "~/models/Llama-3.1-8B-Instruct-FP8 --device cuda")
    _model_args(p, "src", "bf16 model directory (or one .safetensors file)")
    p.add_argument("dst", metavar="OUT", help="output directory (must not exist, unless --force)")
    _ignore_args(p)
    p.add_argument("--dry-run", action="store_true",
                   help="write nothing: print what would be quantized, the sizes, the output shards and the "
                        "quantization_config that config.json would get")
    p.add_argument("--device", default=None,
                   help="where to quantize: cuda, cuda:N or cpu (default: cuda if available, else cpu)")
    p.add_argument("--max-shard-size", default="5GB", metavar="SIZE", help="largest output file (default 5GB)")
    p.add_argument("--memory-budget", default=None, metavar="SIZE",
                   help="host buffer for reading, e.g. 512MiB (default: sized from the host's last-level cache)")
    p.add_argument("--threads", type=int, default=None, help="reader threads (default: the cores but one, at most 16)")
    p.add_argument("--rounding", choices=["auto", "eager", "fp32"], default="auto",
                   help="auto (default): the bytes compressed-tensors itself produces on --device "
                        "(fp32 on H100-class GPUs, eager on CPU); pick one to force it")
    p.add_argument("--force", action="store_true", help="replace OUT if it exists (once the new one is complete)")
    p.add_argument("--allow-non-finite", action="store_true", help="quantize weights holding NaN/Inf anyway")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.epilog += "\n  fastfp8 convert meta-llama/Llama-3.2-1B Llama-3.2-1B-FP8 --dry-run"

    p = sub.add_parser("bench", help="time loading to FP8 on the GPU against the peer loaders installed",
                       formatter_class=argparse.RawDescriptionHelpFormatter,
                       description="Load MODEL with fastfp8 and with each peer loader that is installed "
                                   "(safetensors load_file,\nsafetensors safe_open + .to(device), "
                                   "runai-model-streamer, fastsafetensors, instanttensor),\nevery one followed "
                                   "by the same FP8 quantization, and print seconds, GB/s and peak GPU memory.\n"
                                   "The page cache is warmed first (or emptied before each run with --cold);\n"
                                   "each loader runs --warmup times untimed, then --repeat times timed.",
                       epilog="example:\n  fastfp8 bench ~/models/Llama-3.1-8B-Instruct --repeat 3 --plot load.png")
    _model_args(p, "path", "model directory or .safetensors file")
    _ignore_args(p)
    p.add_argument("--device", default=None, help="cuda, cuda:N or cpu (default: cuda if available, else cpu)")
    p.add_argument("--loaders", default="all",
                   help=f"comma-separated, from: {', '.join(LOADERS)} (default: all installed)")
    p.add_argument("--repeat", type=int, default=1, help="timed runs per loader; the median is reported (default 1)")
    p.add_argument("--warmup", type=int, default=1,
                   help="untimed runs per loader first (pinned buffers, kernel compilation; default 1)")
    p.add_argument("--cold", action="store_true", help="evict the checkpoint from the page cache before each run")
    p.add_argument("--memory-budget", default=None, metavar="SIZE",
                   help="fastfp8's pinned ring (default: sized from the host's last-level cache)")
    p.add_argument("--threads", type=int, default=None, help="fastfp8 reader threads")
    p.add_argument("--plot", metavar="FILE.png", help="draw GiB/s per loader and GPU memory over time (matplotlib)")
    p.add_argument("--json", metavar="FILE", help="also write the results as JSON")
    return parser


# ---------------------------------------------------------------------------------------
# inspect


def _shape(shape: Sequence[int]) -> str:
    return "[" + ", ".join(str(d) for d in shape) + "]"


_ACTIONS = {"copy": "keep", "quantize": "fp8", "experts": "fp8 per expert"}


def _options(args, **extra):
    from .options import LoadOptions

    return LoadOptions.make(ignore=_ignore_list(args), default_ignore=not args.no_default_ignore,
                            layout=args.layout, **extra)


def _plan(path: str, revision: str | None, args):
    """Opens the checkpoint and plans it with the loader's own planner (read-only):
    ``(ckpt, plan, bytes after per source tensor)``; warns about ignore entries that match
    nothing."""
    from .checkpoint import open_checkpoint
    from .plan import make_plan

    ckpt = open_checkpoint(_resolve(path, revision))
    plan = make_plan(ckpt, _options(args))
    _warn_unmatched_ignores(ckpt, _ignore_list(args))
    after: dict[str, int] = {}
    for j in plan.jobs:
        name = j.target.source.name
        after[name] = after.get(name, 0) + sum(o.nbytes for o in plan.checkpoint_outputs_of(j))
    return ckpt, plan, after


def _summary(ckpt, plan, after) -> dict:
    """The totals ``inspect`` prints, as data (the ``--json`` document without the tensors)."""
    targets = plan.targets
    before_total = sum(t.source.nbytes for t in targets)
    quantized = [t for t in targets if t.quantized]
    dtypes: dict[str, int] = {}
    for t in targets:
        dtypes[t.source.dtype] = dtypes.get(t.source.dtype, 0) + t.source.nbytes
    return {
        "path": str(ckpt.path),
        "files": [str(s) for s in ckpt.shards],
        "tensor_count": len(targets),
        "bytes": before_total,
        "bytes_after": sum(after.values()),
        "quantized_tensors": len(quantized),
        "quantized_bytes": sum(t.source.nbytes for t in quantized),
        "dtypes": dict(sorted(dtypes.items(), key=lambda x: -x[1])),
        "layout": plan.layout.name,
        "ignored_modules": list(plan.ignored),
    }


def _print_summary(summary: dict, out) -> None:
    before, after_total = summary["bytes"], summary["bytes_after"]
    print("dtypes: " + ", ".join(f"{k} {format_bytes(v)}" for k, v in summary["dtypes"].items()), file=out)
    print(f"quantized: {summary['quantized_tensors']} of {summary['tensor_count']} tensors "
          f"({format_bytes(summary['quantized_bytes'])}) -> FP8 e4m3, one scale per output channel", file=out)
    kept = summary["ignored_modules"]
    if kept:
        shown = ", ".join(kept[:8]) + (f", ... ({len(kept)} in all)" if len(kept) > 8 else "")
        print(f"kept as they are by the ignore rules: {shown}", file=out)
    pct = 100 * after_total / before if before else 100.0
    print(f"size: {format_bytes(before)} -> {format_bytes(after_total)} ({pct:.0f}%)", file=out)


def cmd_inspect(args) -> int:
    ckpt, plan, after = _plan(args.path, args.revision, args)
    targets = plan.targets
    summary = _summary(ckpt, plan, after)
    out = sys.stdout
    if args.json:
        summary["tensors"] = [
            {"name": t.source.name, "dtype": t.source.dtype, "shape": list(t.source.shape),
             "bytes": t.source.nbytes, "action": _ACTIONS[t.kind], "bytes_after": after[t.source.name]}
            for t in targets]
        json.dump(summary, out, indent=1)
        print(file=out)
        return 0
    rows = [(t.source.name, t.source.dtype, _shape(t.source.shape), format_bytes(t.source.nbytes),
             _ACTIONS[t.kind], format_bytes(after[t.source.name])) for t in targets]
    n_sh = len(ckpt.shards)
    print(f"{ckpt.path}: {len(targets)} tensors in {n_sh} file{'s' if n_sh != 1 else ''}, "
          f"{format_bytes(summary['bytes'])}", file=out)
    if not args.summary and rows:
        head = ("tensor", "dtype", "shape", "size", "action", "after")
        widths = [max(len(r[i]) for r in [head, *rows]) for i in range(len(head))]
        right = {3, 5}
        for r in [head, *rows]:
            cells = [c.rjust(w) if i in right else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths, strict=True))]
            print("  ".join(cells).rstrip(), file=out)
    _print_summary(summary, out)
    return 0


# ---------------------------------------------------------------------------------------
# convert


def _default_device(device: str | None) -> str:
    if device:
        return device
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def _check_device(device: str) -> None:
    import torch

    try:
        dev = torch.device(device)
    except RuntimeError as e:
        raise ValueError(f"not a device: {device!r} ({e})") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {device}: no CUDA GPU is available here (use --device cpu)")
    if dev.type not in ("cuda", "cpu"):
        raise ValueError(f"--device must be cuda, cuda:N or cpu, not {device!r}")


def cmd_convert(args) -> int:
    if args.dry_run:
        return _convert_dry_run(args)
    from .convert import convert

    device = _default_device(args.device)
    _check_device(device)
    parse_bytes(args.max_shard_size)
    options = _options(args, memory_budget=args.memory_budget, threads=args.threads, rounding=args.rounding,
                       allow_non_finite=args.allow_non_finite, progress=False if args.no_progress else None)
    src = _resolve(args.src, args.revision)
    if args.ignore:
        from .checkpoint import open_checkpoint

        _warn_unmatched_ignores(open_checkpoint(src), _ignore_list(args))
    res = convert(src, args.dst, device=device, max_shard_size=args.max_shard_size, overwrite=args.force,
                  options=options)
    rate = f" ({format_rate(res.bytes_in / res.seconds)})" if res.seconds > 0 else ""
    print(f"wrote {res.path}: {len(res.shards)} shard{'s' if len(res.shards) != 1 else ''}, {res.tensors} tensors "
          f"({res.quantized} FP8 weights), {format_bytes(res.bytes_in)} -> {format_bytes(res.bytes_out)} "
          f"in {res.seconds:.1f} s{rate}; {len(res.copied_files)} other files copied")
    if res.ignored:
        print(f"kept unquantized: {', '.join(res.ignored[:8])}{' ...' if len(res.ignored) > 8 else ''}")
    return 0


def _convert_dry_run(args) -> int:
    """``convert --dry-run``: the plan ``convert`` would carry out, from the headers alone."""
    from .convert import plan_shards
    from .ctconfig import quantization_config

    max_shard = parse_bytes(args.max_shard_size)
    _options(args, memory_budget=args.memory_budget)
    ckpt, plan, after = _plan(args.src, args.revision, args)
    summary = _summary(ckpt, plan, after)
    outputs = plan.checkpoint_outputs()
    shards = plan_shards(outputs, max_shard)
    dst = Path(args.dst)
    out = sys.stdout
    print(f"dry run: would convert {ckpt.path} -> {dst} (nothing is written)", file=out)
    if dst.exists() or dst.is_symlink():
        print(f"note: {dst} exists; convert would refuse it without --force", file=out)
    print(f"input: {summary['tensor_count']} tensors in {len(ckpt.shards)} file(s), "
          f"{format_bytes(summary['bytes'])}", file=out)
    _print_summary(summary, out)
    sizes = ", ".join(format_bytes(sum(o.nbytes for o in sh)) for sh in shards[:8])
    print(f"output: {len(outputs)} tensors in {len(shards)} shard{'s' if len(shards) != 1 else ''} "
          f"of at most {format_bytes(max_shard)} ({sizes}{', ...' if len(shards) > 8 else ''})", file=out)
    print("config.json would get this quantization_config:", file=out)
    print(json.dumps(quantization_config(summary["ignored_modules"]), indent=2, sort_keys=True), file=out)
    return 0


# ---------------------------------------------------------------------------------------
# bench


def cmd_bench(args) -> int:
    from . import bench

    # output paths first: a typo must not cost the minutes of timing before it
    if args.json:
        check_output_path(args.json, "--json")
    if args.plot:
        check_output_path(args.plot, "--plot")
    device = _default_device(args.device)
    _check_device(device)
    if args.memory_budget is not None:
        parse_bytes(args.memory_budget)
    loaders = None
    if args.loaders != "all":
        loaders = [n.strip() for n in args.loaders.split(",") if n.strip()]
    path = _resolve(args.path, args.revision)
    if args.ignore:
        from .checkpoint import open_checkpoint

        _warn_unmatched_ignores(open_checkpoint(path), _ignore_list(args))
    return bench.run(path, device=device, loaders=loaders, repeat=args.repeat, warmup=args.warmup,
                     cold=args.cold, ignore=_ignore_list(args), default_ignore=not args.no_default_ignore,
                     memory_budget=args.memory_budget, threads=args.threads, json_path=args.json,
                     plot_path=args.plot)


# ---------------------------------------------------------------------------------------
# main


_BAD_INPUT = (CheckpointError, BudgetError, UnsupportedDtypeError, NonFiniteWeightError, ValueError, TypeError,
              FileExistsError, FileNotFoundError, NotADirectoryError, IsADirectoryError, _UsageError)


def main(argv: Sequence[str] | None = None) -> int:
    """Runs the ``fastfp8`` command line; returns the exit code."""
    debug = os.environ.get("FASTFP8_DEBUG", "") not in ("", "0")
    try:
        parser = build_parser()
        try:
            args = parser.parse_args(list(argv) if argv is not None else None)
        except SystemExit as e:  # --help, --version
            return e.code if isinstance(e.code, int) else 0
        if args.command is None:
            parser.print_help()
            return 2
        return {"inspect": cmd_inspect, "convert": cmd_convert, "bench": cmd_bench}[args.command](args)
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # `fastfp8 inspect X | head`
        with contextlib.suppress(OSError):
            sys.stdout = open(os.devnull, "w")  # noqa: SIM115 - silence the flush at exit
        return 0
    except (Error, OSError, ValueError, TypeError, _UsageError) as e:
        if debug:
            raise
        print(f"{PROG}: error: {one_line(e)}", file=sys.stderr)
        return 2 if isinstance(e, _BAD_INPUT) else 1
    except Exception as e:
        if debug:
            raise
        print(f"{PROG}: error: unexpected {type(e).__name__}: {one_line(e)} (FASTFP8_DEBUG=1 shows the traceback)",
              file=sys.stderr)
        return 1


if __name__ == "__main__":
    raise SystemExit(main())

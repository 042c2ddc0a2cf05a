"""Sweep of the FP8 linear paths per shape, the source of ``fastfp8/kernels/linear_table.py``.

On the GPU machine (from the repo root)::

    python benches/tune_linear.py --out $OUT/tune_linear.json        # ~3 min on an H200
    python benches/tune_linear.py --table tune_linear.json            # here: JSON -> linear_table.py

    # some kinds only, against what the packaged table picks now (and _scaled_mm):
    python benches/tune_linear.py --kinds tile,tma --ms 256,1024,4096 --out $OUT/t.json
    python benches/tune_linear.py --table t.json --base-table python/fastfp8/kernels/linear_table.json

For every ``(N, K)`` of :data:`SHAPES` and every ``M`` of :data:`MS`, times (CUDA graphs,
weights rotated past L2, ``do_bench`` medians) bf16 ``F.linear`` and each fp8 candidate,
activation quantization included where the candidate needs it: the GEMV kernel (W8A16,
M <= 128, with and without split-K), the W8A16 tiled GEMM (``"w16"``), fused act-quant +
``torch._scaled_mm`` rowwise, fused act-quant + the Triton GEMM (``"tile"`` and ``"tma"``
configs). (A one-kernel GEMM that quantized the activations itself lost at all 144 shapes
and row counts of the session-14 sweep, 1.2 - 6.2x slower than the best path, and is gone;
so did one that quantized per token and 128 columns in its registers: no faster than the
best path at any of session 25's 128 cases, 2.7x slower at the median: benches/NOTES.md.) Each candidate's output
is first checked against an fp32 emulation (a failure drops it). The JSON is written after
every shape, so a run cut short keeps what it measured. ``--table`` picks the fastest
candidate per ``(N, K, M)`` and writes the table module.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import math
import sys
import time
import traceback
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # timing, also when loaded by path (tests do)
try:
    import fastfp8  # noqa: F401
except ImportError:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "python"))

from fastfp8.kernels.common import sqnr
from fastfp8.kernels.linear_table import GEMV_MAX_ROWS
from timing import ROTATE_BYTES, timeit

BF16 = torch.bfloat16
FP8 = torch.float8_e4m3fn
SHAPES = [  # (N, K), most used first: Llama-3-8B / Mixtral attention and MLP, Llama-3-70B, Qwen3 dense and MoE
    (14336, 4096), (4096, 4096), (1024, 4096), (4096, 14336), (6144, 4096),
    (28672, 8192), (8192, 28672), (8192, 8192), (10240, 8192), (1024, 8192),
    (12288, 4096), (4096, 12288), (4096, 2048), (512, 2048), (5120, 2048), (2048, 4096),
]
MS = [1, 16, 32, 64, 128, 256, 1024, 4096, 8192]
WARMUP_MS = 5  # do_bench warm-up of every timing here (bench_modules keeps timeit's default, 25)
# GEMV (BLOCK_N, BLOCK_K, num_warps, num_stages): M == 1 (elementwise), M <= 16 (dot, 16 rows),
# M <= 128 (dot, rows padded to 32/64/128: one W8A16 kernel, no activation quantization)
GEMV_M1 = [(bn, bk, w, s) for bn, bk in ((4, 2048), (8, 1024), (8, 2048), (16, 512), (16, 1024), (32, 256),
                                          (32, 512), (64, 256)) for w in (4, 8) for s in (2, 3)]
# M == 1 with the weight tiles through a ring of LOAD_STAGES asynchronous copies
# (..., SPLIT_K, LOAD_STAGES): more bytes in flight per SM than loads into registers
GEMV_M1_PIPE = [(bn, bk, w, s, 1, s) for bn, bk in ((4, 2048), (8, 1024), (8, 2048), (16, 512), (16, 1024), (32, 256),
                                                    (32, 512), (64, 256)) for w in (4, 8) for s in (3, 4)]
# (the weight tile is the dot's first operand: 64 and 128 rows fill Hopper's wgmma from registers)
WIDE = [(64, 128, 4, 4), (128, 128, 4, 3), (128, 128, 8, 3), (128, 64, 4, 4)]
GEMV_M16 = [(16, 128, 4, 4), (16, 256, 4, 3), (16, 512, 4, 3), (32, 256, 4, 3), (32, 512, 8, 3), (64, 256, 8, 3), *WIDE]
GEMV_M64 = [(16, 256, 4, 3), (32, 128, 4, 4), (32, 256, 4, 3), (64, 128, 4, 3), (64, 256, 8, 3), *WIDE]
GEMV_M128 = [(32, 128, 4, 3), (64, 64, 4, 4), (64, 128, 8, 3), (128, 64, 8, 3), *WIDE]
# split-K GEMV (..., SPLIT_K): more programs for narrow weights (N / BLOCK_N below the SM count)
GEMV_SPLIT_M1 = [(bn, bk, 4, 2, s) for bn, bk in ((4, 1024), (8, 512), (16, 256)) for s in (2, 4, 8)]
GEMV_SPLIT_M1 += [(bn, bk, 4, 3, s, 3) for bn, bk in ((4, 1024), (8, 512), (16, 256)) for s in (2, 4, 8)]
GEMV_SPLIT_DOT = [(bn, bk, 4, 3, s) for bn, bk in ((16, 256), (32, 128), (64, 128)) for s in (2, 4, 8)]
GEMV_SPLIT_DOT += [(128, 128, 4, 3, s) for s in (2, 4)] + [(64, 128, 4, 4, s) for s in (2, 4)]
# (kernel, BLOCK_M, BLOCK_N, BLOCK_K, GROUP_M, SPLIT_K, num_warps, num_stages)
TILE_SMALL = [("tile", 16, 64, 128, 8, s, 4, 4) for s in (1, 2, 4)] + [("tile", 16, 128, 128, 8, 2, 4, 4)]
TILE_MID = [("tile", bm, bn, 128, 8, s, 4, 4) for bm in (32, 64) for bn in (64, 128) for s in (1, 2)]
TILE_LARGE = [("tile", 128, 128, 128, 8, 1, 8, 3), ("tile", 128, 256, 128, 8, 1, 8, 3)]
# 256 - 4096 rows of a narrow weight (N 512 - 2048): small tiles and split-K, for a grid that
# fills the SMs (session 25; 512 x 2048 at M = 1024 had 64 programs of 64 x 128)
TILE_GRID = [("tile", 64, 64, 128, 8, s, 4, 4) for s in (1, 2, 4)] + \
    [("tile", 64, 128, 128, 8, s, 4, 4) for s in (2, 4)] + [("tile", 128, 64, 128, 8, s, 4, 4) for s in (1, 2)] + \
    [("tile", 64, 64, 256, 8, 1, 4, 3), ("tile", 128, 128, 128, 8, 2, 8, 3)]
# 64 - 256 rows of a narrow weight: short row blocks over all of K, many programs (the
# weight read from HBM once and again from L2 by each row block), no split-K's extra kernels
# (its zeroed fp32 buffer and the cast after: session 25's slowest rows, 1024 x 4096 at
# M = 128, took split-K 2 and 64 programs); session 26 (`--kinds tile,tma --ms 64,128,256`):
# never the fastest, the 64-row tiles kept winning (results/logs/tune_rows_h200_session26.log)
TILE_ROWS = [("tile", bm, bn, 128, 8, 1, 4, 4) for bm in (16, 32) for bn in (64, 128)] + \
    [("tile", 32, 64, 256, 8, 1, 4, 3)]
# split-K finished in the same launch (session 27: the last split to arrive adds the partials,
# no zeroed buffer before the GEMM and no cast after it): deeper splits of the small tiles,
# W8A8 and W8A16, for 16 - 1024 rows of the narrow weights
SPLIT_GRID = [("tile", 16, 64, 128, 8, 8, 4, 4), ("tile", 32, 64, 128, 8, 4, 4, 4), ("tile", 32, 64, 128, 8, 8, 4, 4),
              ("tile", 64, 64, 128, 8, 8, 4, 4), ("tile", 64, 64, 256, 8, 2, 4, 3), ("tile", 64, 64, 256, 8, 4, 4, 3),
              ("w16", 16, 64, 128, 8, 8, 4, 4), ("w16", 32, 64, 128, 8, 4, 4, 4), ("w16", 64, 64, 64, 8, 4, 4, 4),
              ("w16", 64, 64, 128, 8, 2, 4, 3), ("w16", 64, 64, 128, 8, 4, 4, 3)]
TMA_GRID = [("tma", 64, 64, 128, 8, 1, 4, 4), ("tma", 128, 64, 128, 8, 1, 4, 4), ("tma", 64, 128, 256, 8, 1, 4, 3)]
# W8A16 tiles (kernels/gemm.py "w16"): the tile kernel on the bf16 activations, no activation
# quantization kernel; for the mid-M shapes where that kernel's cost is what FP8 loses by
W16_SMALL = [("w16", 16, 64, 128, 8, s, 4, 4) for s in (1, 2, 4)] + [("w16", 32, 64, 128, 8, 1, 4, 4)]
W16_MID = [("w16", bm, bn, 64, 8, s, 4, 4) for bm in (32, 64) for bn in (64, 128) for s in (1, 2)]
W16_LARGE = [("w16", 128, 64, 64, 8, 1, 4, 4), ("w16", 128, 128, 64, 8, 1, 8, 3), ("w16", 64, 128, 128, 8, 1, 4, 3)]
W16 = W16_SMALL + W16_MID + W16_LARGE
TMA = [("tma", 128, 128, 128, 8, 1, 8, 3), ("tma", 128, 256, 128, 8, 1, 8, 3), ("tma", 128, 256, 64, 8, 1, 8, 4),
       ("tma", 64, 128, 128, 8, 1, 4, 4)]


#: what ``--kinds`` may name (``_scaled_mm`` and the table's pick are always timed beside them)
KINDS = frozenset({"gemv", "w16", "tile", "tma"})


def candidates(m: int, kinds: tuple[str, ...] | None = None, table_pick: tuple | None = None) -> list:
    """What is tried for ``M`` rows (no duplicates): every kind, or only ``kinds`` with
    ``_scaled_mm`` and ``table_pick`` (the packaged table's choice, as a candidate)."""
    out: list = [("scaled_mm",)]
    if kinds is not None:
        out += [table_pick] if table_pick is not None else []
        out += [c for c in _all_candidates(m) if c[0] in kinds]
        return list(dict.fromkeys(out))
    return list(dict.fromkeys(out + _all_candidates(m)))


def _all_candidates(m: int) -> list:
    out: list = []
    if m == 1:
        out += [("gemv", *c) for c in GEMV_M1 + GEMV_M1_PIPE + GEMV_SPLIT_M1]
    elif m <= 16:
        out += [("gemv", *c) for c in GEMV_M16 + GEMV_SPLIT_DOT]
    elif m <= 64:
        out += [("gemv", *c) for c in GEMV_M64 + GEMV_SPLIT_DOT]
    elif m <= 128:
        out += [("gemv", *c) for c in GEMV_M128 + GEMV_SPLIT_DOT]
    if m <= 32:
        out += TILE_SMALL
    if 1 < m <= 32:
        out += W16_SMALL
    if 16 < m <= 512:
        out += TILE_MID + W16_MID
    if 128 <= m <= 2048:
        out += W16_LARGE
    if m >= 128:
        out += TILE_LARGE + TMA
    if 64 <= m <= 256:
        out += TILE_ROWS
    if 128 <= m <= 4096:
        out += TILE_GRID + TMA_GRID
    if 16 <= m <= 1024:
        out += SPLIT_GRID
    return out


def table_candidate(m: int, n: int, k: int) -> tuple:
    """The packaged table's choice for ``(M, N, K)`` on this GPU, as a sweep candidate."""
    from fastfp8.kernels import linear_table as lt

    backend, cfg = lt.select(m, n, k, torch.cuda.get_device_capability())
    if cfg is None:
        return (backend,)
    return (backend, *cfg) if backend == "gemv" else tuple(cfg)


def run_case(n, k, m, ws, sws, wbs, rep_ms, kinds=None):
    from fastfp8.kernels import act_quant as aq
    from fastfp8.kernels import gemm as gm
    from fastfp8.kernels import gemv as gv

    copies = len(ws)
    xs = [torch.randn(m, k, device="cuda", dtype=BF16) for _ in range(copies)]
    q0, s0 = aq.triton_act_quant(xs[0])
    emu8 = gm.fp8_gemm_reference(q0, s0, ws[0], sws[0], out_dtype=torch.float32)
    emu16 = gv.fp8_gemv_reference(xs[0].float(), ws[0], sws[0])
    res = {"N": n, "K": k, "M": m, "copies": copies, "us": {}, "sqnr": {}, "err": {}}
    res["us"]["bf16"] = timeit([lambda i=i: torch.nn.functional.linear(xs[i], wbs[i]) for i in range(copies)],
                               rep_ms=rep_ms, warmup_ms=WARMUP_MS)
    # the per-token activation quantization alone, which every W8A8 candidate includes
    res["us_act_quant"] = timeit([lambda i=i: aq.triton_act_quant(xs[i]) for i in range(copies)], rep_ms=rep_ms,
                                 warmup_ms=WARMUP_MS)
    pick = table_candidate(m, n, k) if kinds is not None else None
    for cand in candidates(m, kinds, pick):
        name = "/".join(str(c) for c in cand)
        try:
            if cand[0] == "scaled_mm":
                def f(i):
                    q, s = aq.triton_act_quant(xs[i])
                    return torch._scaled_mm(q, ws[i].t(), scale_a=s, scale_b=sws[i].reshape(1, n),
                                            out_dtype=BF16, use_fast_accum=True)
                ref = emu8
            elif cand[0] == "gemv":
                cfg = gv.config_of(cand[1:], m) if len(cand) > 1 else None

                def f(i, cfg=cfg):
                    return gv.fp8_gemv(xs[i], ws[i], sws[i], config=cfg)
                ref = emu16
            elif cand[0] == "w16":
                cfg = cand if len(cand) > 1 else gm.default_config(m, n, k, "w16")

                def f(i, cfg=cfg):
                    return gm.w16_gemm(xs[i], ws[i], sws[i], config=cfg)
                ref = emu16
            else:
                cfg = cand if len(cand) > 1 else gm.default_config(m, n, k, cand[0])

                def f(i, cfg=cfg):
                    q, s = aq.triton_act_quant(xs[i])
                    return gm.fp8_gemm(q, s, ws[i], sws[i], config=cfg)
                ref = emu8
            db = sqnr(f(0)[: ref.shape[0]], ref)
            res["sqnr"][name] = db
            if not db >= 35:
                res["err"][name] = f"sqnr {db:.1f}"
                continue
            res["us"][name] = timeit([lambda i=i, f=f: f(i) for i in range(copies)], rep_ms=rep_ms,
                                     warmup_ms=WARMUP_MS)
        except Exception as e:  # a config that does not compile or fit: skip it
            res["err"][name] = f"{type(e).__name__}: {str(e)[:200]}"
    fp8 = {c: us for c, us in res["us"].items() if c != "bf16"}
    best = min(fp8, key=fp8.get) if fp8 else None
    res["best"] = best
    if pick is not None:
        res["table_pick"] = "/".join(str(c) for c in pick)
    res["speedup"] = res["us"]["bf16"] / fp8[best] if best else None
    res["speedup_scaled_mm"] = res["us"]["bf16"] / fp8["scaled_mm"] if "scaled_mm" in fp8 else None
    return res


def sweep(out_path: Path, rep_ms: int, shapes, ms, budget_s: float, kinds=None) -> None:
    from fastfp8.quant import quantize_channelwise

    t0 = time.monotonic()
    cap = torch.cuda.get_device_capability()
    report = {"gpu": torch.cuda.get_device_name(), "sm": f"{cap[0]}.{cap[1]}",
              "date": _dt.datetime.now(_dt.timezone.utc).isoformat(),
              "torch": torch.__version__, "kinds": list(kinds) if kinds else "all", "cases": [], "errors": []}
    for n, k in shapes:
        copies = max(2, min(8, math.ceil(ROTATE_BYTES / (n * k))))
        wbs = [torch.randn(n, k, device="cuda", dtype=BF16) / math.sqrt(k) for _ in range(copies)]
        qs = [quantize_channelwise(w, rounding="fp32") for w in wbs]
        ws = [q for q, _ in qs]
        sws = [s.float().reshape(n) for _, s in qs]
        for m in ms:
            if time.monotonic() - t0 > budget_s:
                report["errors"].append(f"budget: stopped before N={n} K={k} M={m}")
                break
            try:
                r = run_case(n, k, m, ws, sws, wbs, rep_ms, kinds)
            except Exception as e:
                traceback.print_exc()
                report["errors"].append(f"N={n} K={k} M={m}: {type(e).__name__}: {e}")
                continue
            report["cases"].append(r)
            print(f"N={n:6d} K={k:6d} M={m:5d} bf16 {r['us']['bf16']:8.1f}  act_quant {r['us_act_quant']:6.1f}  "
                  f"best {r['best']} "
                  f"{r['us'].get(r['best'], float('nan')):8.1f} x{r['speedup'] or 0:5.2f}  "
                  f"scaled_mm x{r['speedup_scaled_mm'] or 0:5.2f}  errs {len(r['err'])}  "
                  f"t={time.monotonic() - t0:.0f}s", flush=True)
        wbs = ws = qs = None
        torch.cuda.empty_cache()
        out_path.write_text(json.dumps(report, indent=1))
    out_path.write_text(json.dumps(report, indent=1))


# ---------------------------------------------------------------------------------------
# sweep JSON -> selection table
# ---------------------------------------------------------------------------------------

TABLE_OUT = Path(__file__).resolve().parents[1] / "python" / "fastfp8" / "kernels" / "linear_table.json"


def _row_of(name: str) -> tuple[str, list | None]:
    """A candidate's name in the sweep -> ``(backend, config)`` of the table."""
    parts = name.split("/")
    if parts[0] == "scaled_mm":
        return "scaled_mm", None
    if parts[0] == "gemv":
        return "gemv", [int(v) for v in parts[1:]] or None
    return parts[0], [parts[0], *(int(v) for v in parts[1:])] if len(parts) > 1 else None


def _name_of(backend: str, cfg) -> str:
    """A table row's ``(backend, config)`` -> the sweep's candidate name (:func:`_row_of`'s inverse)."""
    if cfg is None:
        return backend
    return "/".join(str(v) for v in ([backend, *cfg] if backend == "gemv" else cfg))


def _pick(case: dict, margin: float) -> str | None:
    """The fastest checked candidate; a Triton GEMM must beat the known paths (GEMV,
    ``_scaled_mm``, and in a sweep of some kinds the table's own pick) by ``margin`` to be
    chosen."""
    us = {c: v for c, v in case["us"].items() if c != "bf16"}
    if not us:
        return None
    known = {c: v for c, v in us.items() if c == "scaled_mm" or c.startswith("gemv/") or c == case.get("table_pick")}
    best = min(us, key=us.get)
    if known:
        best_known = min(known, key=known.get)
        if best not in known and us[best] * (1 + margin) > known[best_known]:
            return best_known
    return best


def _rows(picks: list[tuple[int, str]]) -> list[list]:
    """``[(M sample, candidate)]`` sorted by M -> table rows, equal neighbours merged; the
    last row is open. A GEMV row never serves more than ``GEMV_MAX_ROWS`` rows."""
    rows: list[list] = []
    for i, (m, cand) in enumerate(picks):
        backend, cfg = _row_of(cand)
        m_max = None if i == len(picks) - 1 else m
        if backend == "gemv" and (m_max is None or m_max > GEMV_MAX_ROWS):
            backend, cfg = "scaled_mm", None
        if rows and rows[-1][1:] == [backend, cfg]:
            rows[-1][0] = m_max
        else:
            rows.append([m_max, backend, cfg])
    return rows


def make_table(sweep_json: dict, *, margin: float = 0.03, base: dict | None = None) -> dict:
    """The selection table (``linear_table.json``) from a sweep: per measured ``(N, K)`` the
    picked candidate per ``M`` sample (it serves the rows above the previous sample up to
    its own M), and ``generic`` rows for other shapes: per ``M`` the candidate with the best
    worst-case speedup over the shapes where it was measured.

    ``base`` (a table as :func:`fastfp8.kernels.linear_table.load` reads it): a sweep of some
    kinds only (``--kinds``) updates it. The ``M`` samples of :data:`MS` the sweep did not
    measure keep the base table's choice, shapes it did not measure keep their rows, and
    the generic rows stay the base's."""
    by_shape: dict[tuple[int, int], list[dict]] = {}
    for c in sweep_json["cases"]:
        by_shape.setdefault((c["N"], c["K"]), []).append(c)
    entries = {}
    summary = []
    per_m: dict[int, dict[str, list[float]]] = {}
    for (n, k), cases in sorted(by_shape.items()):
        cases.sort(key=lambda c: c["M"])
        picks = []
        if base is not None:
            measured = {c["M"] for c in cases}
            rows = base["entries"].get((n, k), base["generic"])
            for m in MS:
                if m not in measured:
                    row = next(r for r in rows if r[0] is None or m <= r[0])
                    picks.append((m, _name_of(row[1], row[2])))
        for c in cases:
            best = _pick(c, margin)
            if best is None:
                continue
            picks.append((c["M"], best))
            summary.append(f"N={n} K={k} M={c['M']}: {best} x{c['us']['bf16'] / c['us'][best]:.2f} vs bf16")
            for cand, us in c["us"].items():
                if cand != "bf16":
                    per_m.setdefault(c["M"], {}).setdefault(cand, []).append(c["us"]["bf16"] / us)
        if picks:
            entries[f"{n},{k}"] = _rows(sorted(picks, key=lambda p: p[0]))
    if base is not None:
        for (n, k), rows in base["entries"].items():
            entries.setdefault(f"{n},{k}", rows)
    n_shapes = {m: max(len(v) for v in d.values()) for m, d in per_m.items()}
    generic_picks = []
    for m in sorted(per_m):
        full = {c: min(v) for c, v in per_m[m].items() if len(v) == n_shapes[m] and not c.startswith("tma")}
        if full:  # tma needs 16-byte aligned rows: an unknown shape gets the tile kernel or _scaled_mm
            generic_picks.append((m, max(full, key=full.get)))
    return {
        "sm": _sm(sweep_json),
        "gpu": sweep_json.get("gpu"),
        "date": sweep_json.get("date"),
        "source": f"benches/tune_linear.py sweep (torch {sweep_json.get('torch')}), margin {margin}" + (
            "" if base is None else f"; kinds {_kinds_of(sweep_json)} at M "
            f"{','.join(str(m) for m in sorted({c['M'] for c in sweep_json['cases']}))} ({sweep_json.get('date')}) "
            f"over the base table: {base.get('source')} ({base.get('date')})"),
        "entries": entries,
        "generic": base["generic"] if base is not None else
        _rows(generic_picks) if generic_picks else [[16, "gemv", None], [None, "scaled_mm", None]],
        "summary": summary,
    }


def _kinds_of(sweep_json: dict) -> str:
    kinds = sweep_json.get("kinds") or "all"
    return kinds if isinstance(kinds, str) else ",".join(kinds)


def _sm(sweep_json: dict) -> list[int]:
    sm = sweep_json.get("sm")
    if sm:
        return [int(v) for v in str(sm).split(".")][:2]
    return [9, 0]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="tune_linear.json")
    ap.add_argument("--rep-ms", type=int, default=10)
    ap.add_argument("--budget-s", type=float, default=200)
    ap.add_argument("--table", default=None, help="a sweep JSON: write the selection table from it (no GPU needed)")
    ap.add_argument("--table-out", default=str(TABLE_OUT), help="where --table writes (default: the packaged table)")
    ap.add_argument("--kinds", default=None,
                    help="comma list (e.g. tile,tma): try only these kinds, against the packaged table's choice "
                         "and _scaled_mm")
    ap.add_argument("--ms", default=None, help="comma list of M (default: all of MS)")
    ap.add_argument("--base-table", default=None,
                    help="with --table: a sweep of some kinds updates this table (the M samples and shapes "
                         "it did not measure keep their rows)")
    ap.add_argument("--margin", type=float, default=0.03,
                    help="a Triton GEMM replaces _scaled_mm / the GEMV only when this much faster")
    args = ap.parse_args(argv)
    kinds = tuple(args.kinds.split(",")) if args.kinds else None
    if kinds is not None and not set(kinds) <= KINDS:
        ap.error(f"--kinds: {', '.join(sorted(set(kinds) - KINDS))} not among {', '.join(sorted(KINDS))}")
    if args.base_table and not args.table:
        ap.error("--base-table goes with --table (it is the table a sweep's JSON updates)")
    if args.table:
        from fastfp8.kernels import linear_table as lt

        base = lt.load(args.base_table) if args.base_table else None
        t = make_table(json.loads(Path(args.table).read_text()), margin=args.margin, base=base)
        Path(args.table_out).write_text(json.dumps(t, indent=1) + "\n")
        print(f"wrote {args.table_out}: {len(t['entries'])} shapes; generic {t['generic']}")
        for line in t["summary"]:
            print(line)
        return 0
    if not torch.cuda.is_available():
        print("needs a CUDA GPU", file=sys.stderr)
        return 2
    ms = [int(v) for v in args.ms.split(",")] if args.ms else MS
    sweep(Path(args.out), args.rep_ms, SHAPES, ms, args.budget_s, kinds)
    return 0


if __name__ == "__main__":
    sys.exit(main())

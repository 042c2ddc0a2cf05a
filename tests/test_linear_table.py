"""The per-shape selection table of ``Fp8Linear`` (:mod:`fastfp8.kernels.linear_table`): its
rules on the CPU, and on the GPU every entry of the table in use, at both ends of the rows
it serves, against an fp32 emulation, outputs poisoned (NaN) before each run."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch
from fastfp8 import ops
from fastfp8.kernels import act_quant as aq
from fastfp8.kernels import common
from fastfp8.kernels import gemm as gm
from fastfp8.kernels import linear_table as lt
from fastfp8.modules import Fp8Linear

REPO = Path(__file__).resolve().parents[1]
BF16 = torch.bfloat16
FP8 = torch.float8_e4m3fn


@pytest.fixture
def table_file(tmp_path):
    """Writes a table, switches to it, switches back afterwards."""

    def write(t):
        p = tmp_path / "table.json"
        p.write_text(json.dumps(t))
        lt.use(p)
        return p

    yield write
    lt.use(None)


def test_packaged_table_loads_and_is_well_formed():
    t = lt.load(lt.TABLE_PATH)
    assert t["generic"][-1][0] is None
    for (n, k), rows in t["entries"].items():
        assert n > 0 and k > 0 and rows[-1][0] is None
        for m_max, backend, cfg in rows:
            assert backend in lt.BACKENDS
            if backend in ("tile", "tma"):
                assert cfg[0] == backend and len(cfg) == 8
            if backend == "gemv":
                # [BLOCK_N, BLOCK_K, num_warps, num_stages(, SPLIT_K(, LOAD_STAGES))]
                assert m_max is not None and m_max <= lt.GEMV_MAX_ROWS and len(cfg or [0] * 4) in (4, 5, 6)


def test_select_rows_and_capability(table_file):
    table_file({"sm": [9, 0], "entries": {"64,32": [[1, "gemv", [8, 32, 4, 2]], [16, "gemv", None],
                                                     [128, "tile", ["tile", 16, 64, 128, 8, 2, 4, 4]],
                                                     [None, "tma", ["tma", 128, 128, 128, 8, 1, 8, 3]]]},
                "generic": [[None, "scaled_mm", None]]})
    assert lt.select(1, 64, 32, (9, 0)) == ("gemv", (8, 32, 4, 2))
    assert lt.select(2, 64, 32, (9, 0)) == ("gemv", None)
    assert lt.select(16, 64, 32, (9, 0)) == ("gemv", None)
    assert lt.select(17, 64, 32, (9, 0))[0] == "tile"
    assert lt.select(128, 64, 32, (9, 0))[0] == "tile"
    assert lt.select(129, 64, 32, (9, 0))[0] == "tma"
    assert lt.select(10**6, 64, 32, (9, 0))[0] == "tma"
    assert lt.select(5, 64, 64, (9, 0)) == ("scaled_mm", None)  # not in the table: generic
    assert lt.select(1, 64, 32, (8, 9)) == ("gemv", None)  # another GPU: the default rule
    assert lt.select(17, 64, 32, (10, 0)) == ("scaled_mm", None)


def test_a_w16_row_takes_bf16_and_fp16_activations_only(table_file, monkeypatch):
    """The selection logic of ops.linear_choice (run on the CPU as if on an sm90 GPU): a
    "w16" row serves bf16/fp16 activations with its tile (or the default one); fp32 ones
    take _scaled_mm; forcing "w16" gives the default tile for the rows."""
    from fastfp8.kernels import gemm as gm

    table_file({"sm": [9, 0], "entries": {"64,32": [[16, "w16", None],
                                                     [None, "w16", ["w16", 64, 128, 64, 8, 1, 4, 4]]]},
                "generic": [[None, "scaled_mm", None]]})
    monkeypatch.setattr(ops, "_fast_path", lambda x: True)
    monkeypatch.setattr(ops, "capability", lambda d: (9, 0))
    w = torch.zeros(64, 32).to(FP8)
    assert ops.linear_choice(torch.zeros(8, 32, dtype=BF16), w) == ("w16", gm.default_config(8, 64, 32, "w16"))
    assert ops.linear_choice(torch.zeros(40, 32, dtype=torch.float16), w) == \
        ("w16", ("w16", 64, 128, 64, 8, 1, 4, 4))
    assert ops.linear_choice(torch.zeros(40, 32), w) == ("scaled_mm", None)  # fp32 activations
    monkeypatch.setenv("FASTFP8_LINEAR_BACKEND", "w16")
    assert ops.linear_choice(torch.zeros(300, 32, dtype=BF16), w) == ("w16", gm.default_config(300, 64, 32, "w16"))
    assert ops.linear_choice(torch.zeros(300, 32), w)[0] == "scaled_mm"  # fp32 cannot: the table's path


@pytest.mark.parametrize("bad", [
    {"entries": {"8,8": [[16, "gemv", None]]}},  # no open row
    {"entries": {"8,8": [[16, "nope", None], [None, "scaled_mm", None]]}},
    {"entries": {"8,8": [[16, "scaled_mm", None], [8, "scaled_mm", None], [None, "scaled_mm", None]]}},
    {"entries": {"8,8": [[256, "gemv", None], [None, "scaled_mm", None]]}},  # GEMV past its rows
    {"entries": {"8,8": [[16, "gemv", [16, 256, 4]], [None, "scaled_mm", None]]}},  # a short GEMV config
    {"entries": {"8,8": [[16, "gemv", [16, 256, 4, 3, 0]], [None, "scaled_mm", None]]}},  # SPLIT_K 0
    {"entries": {"8,8": [[None, "tile", ["w16", 16, 64, 64, 8, 1, 4, 4]]]}},  # another kernel's config
    {"entries": {"8,8": [[None, "tile", ["tile", 16, 64, 64, 8, 1, 4]]]}},  # a short config
])
def test_malformed_tables_are_rejected(tmp_path, bad):
    p = tmp_path / "t.json"
    p.write_text(json.dumps(bad))
    with pytest.raises(ValueError):
        lt.load(p)


def _tune_module():
    spec = importlib.util.spec_from_file_location("tune_linear", REPO / "benches" / "tune_linear.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_table_from_a_sweep(tmp_path):
    tune = _tune_module()

    sweep = {"sm": "9.0", "gpu": "x", "cases": [
        {"N": 64, "K": 32, "M": 1, "us": {"bf16": 10, "scaled_mm": 9, "gemv/8/1024/4/3": 5,
                                          "gemv/4/1024/4/2/8": 4.5}},  # split-K
        {"N": 64, "K": 32, "M": 16, "us": {"bf16": 10, "scaled_mm": 9, "gemv/16/256/4/3": 6,
                                           "tile/16/64/128/8/2/4/4": 5.9}},  # within the margin: the GEMV
        {"N": 64, "K": 32, "M": 64, "us": {"bf16": 10, "scaled_mm": 9, "tile/64/64/128/8/1/4/4": 4}},
        {"N": 64, "K": 32, "M": 256, "us": {"bf16": 10, "scaled_mm": 9, "tile/64/64/128/8/1/4/4": 4,
                                            "w16/64/128/64/8/1/4/4": 3.5}},  # W8A16 tiles
        {"N": 64, "K": 32, "M": 1024, "us": {"bf16": 10, "scaled_mm": 5, "tma/128/128/128/8/1/8/3": 4}},
        {"N": 64, "K": 32, "M": 4096, "us": {"bf16": 10, "scaled_mm": 5, "tma/128/128/128/8/1/8/3": 4}},
    ]}
    t = tune.make_table(sweep)
    assert t["sm"] == [9, 0]
    assert t["entries"]["64,32"] == [[1, "gemv", [4, 1024, 4, 2, 8]], [16, "gemv", [16, 256, 4, 3]],
                                     [64, "tile", ["tile", 64, 64, 128, 8, 1, 4, 4]],
                                     [256, "w16", ["w16", 64, 128, 64, 8, 1, 4, 4]],
                                     [None, "tma", ["tma", 128, 128, 128, 8, 1, 8, 3]]]
    assert all(r[1] != "tma" for r in t["generic"])  # unknown shapes: no TMA (alignment)
    p = tmp_path / "t.json"
    p.write_text(json.dumps(t))
    lt.load(p)  # what make_table writes passes the loader's checks


def test_a_sweep_of_one_kind_updates_the_base_table(tmp_path, table_file):
    """``--kinds tile`` times the tile kernel against the table's pick and _scaled_mm at some M; the
    table made from it keeps the base's choice at the M samples and shapes it did not
    measure, and its generic rows."""
    tune = _tune_module()

    base_p = table_file({"sm": [9, 0], "entries": {
        "64,32": [[1, "gemv", [4, 1024, 4, 2]], [128, "gemv", [16, 256, 4, 3]],
                  [1024, "tma", ["tma", 64, 128, 128, 8, 1, 4, 4]], [None, "scaled_mm", None]],
        "128,64": [[16, "gemv", None], [None, "scaled_mm", None]]},
        "generic": [[16, "gemv", None], [None, "tile", None]]})
    base = lt.load(base_p)
    tile = "tile/64/64/128/8/2/4/4"
    sweep = {"sm": "9.0", "gpu": "x", "kinds": ["tile"], "cases": [
        {"N": 64, "K": 32, "M": 128, "us": {"bf16": 10, "scaled_mm": 9, "gemv/16/256/4/3": 6, tile: 5}},
        {"N": 64, "K": 32, "M": 256, "us": {"bf16": 10, "scaled_mm": 9, "tma/64/128/128/8/1/4/4": 6, tile: 5}},
        {"N": 64, "K": 32, "M": 1024, "us": {"bf16": 10, "scaled_mm": 9, "tma/64/128/128/8/1/4/4": 4, tile: 5}},
        # the table's pick stays unless beaten by the margin
        {"N": 64, "K": 32, "M": 4096, "table_pick": "tma/64/128/128/8/1/4/4",
         "us": {"bf16": 10, "scaled_mm": 9, "tma/64/128/128/8/1/4/4": 4, "tile/128/128/128/8/1/8/3": 3.95}},
    ]}
    t = tune.make_table(sweep, base=base)
    cfg = ["tile", 64, 64, 128, 8, 2, 4, 4]
    assert t["entries"]["64,32"] == [[1, "gemv", [4, 1024, 4, 2]], [64, "gemv", [16, 256, 4, 3]],
                                     [256, "tile", cfg], [4096, "tma", ["tma", 64, 128, 128, 8, 1, 4, 4]],
                                     [None, "scaled_mm", None]]
    assert t["entries"]["128,64"] == [[16, "gemv", None], [None, "scaled_mm", None]]
    assert t["generic"] == [[16, "gemv", None], [None, "tile", None]]
    p = tmp_path / "t.json"
    p.write_text(json.dumps(t))
    lt.load(p)


def test_tune_refuses_unknown_kinds_and_a_lone_base_table(capsys):
    tune = _tune_module()
    with pytest.raises(SystemExit):
        tune.main(["--kinds", "tile,qtile"])  # a removed kind, or a typo: said, not an empty sweep
    assert "qtile" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        tune.main(["--base-table", str(lt.TABLE_PATH)])
    assert "--base-table goes with --table" in capsys.readouterr().err
    assert {c[0] for m in tune.MS for c in tune._all_candidates(m)} == tune.KINDS


def test_forced_backend_and_fallback_cpu(monkeypatch):
    x = torch.randn(3, 64, dtype=BF16)
    w = torch.randn(32, 64).to(FP8)
    assert ops.linear_choice(x, w) == ("fallback", None)
    for forced in ("tile", "w16", "gemv"):
        monkeypatch.setenv("FASTFP8_LINEAR_BACKEND", forced)
        assert ops.linear_choice(x, w) == ("fallback", None)  # no CUDA: nothing else runs
    for bad in ("fused", "Tile"):  # a removed backend, a typo: said, not silently ignored
        monkeypatch.setenv("FASTFP8_LINEAR_BACKEND", bad)
        with pytest.raises(ValueError, match="FASTFP8_LINEAR_BACKEND"):
            ops.linear_choice(x, w)


# ---------------------------------------------------------------------------------------
# CUDA: every entry of the table in use
# ---------------------------------------------------------------------------------------

cuda = pytest.mark.cuda


def _sm90() -> bool:
    return torch.cuda.is_available() and torch.cuda.get_device_capability() >= (8, 9)


def _cases():
    """``(N, K, M, backend)`` at both ends of every row of the table in use (``M`` capped at
    4097 for the open rows), and the generic rows on shapes outside the table."""
    t = lt.load()
    out = []
    shapes = [*(("{},{}".format(*nk), nk, rows) for nk, rows in t["entries"].items()),
              ("generic 1000x4096", (1000, 4096), t["generic"]), ("generic 2048x1024", (2048, 1024), t["generic"])]
    for name, (n, k), rows in shapes:
        lo = 1
        for m_max, backend, _cfg in rows:
            hi = m_max if m_max is not None else min(max(2 * lo, 64), 4097)
            for m in sorted({lo, hi}):
                out.append(pytest.param(n, k, m, backend, id=f"{name}-M{m}-{backend}"))
            lo = (m_max or hi) + 1
    return out


def _emulate(x, f: Fp8Linear, backend):
    if backend in ("gemv", "w16"):  # W8A16: bf16 activations times the dequantized weight, fp32
        return x.float() @ (f.weight.float() * f.weight_scale).t()
    # W8A8: activations quantized per token first
    q, s = aq.act_quant_reference(x)
    return gm.fp8_gemm_reference(q, s, f.weight, f.weight_scale, out_dtype=torch.float32)


@cuda
@pytest.mark.skipif(not _sm90(), reason="needs a GPU with fp8 (sm89+)")
@pytest.mark.parametrize(("n", "k", "m", "backend"), _cases())
def test_every_table_entry_cuda(monkeypatch, n, k, m, backend):
    monkeypatch.setattr(common, "POISON", True)
    g = torch.Generator(device="cuda").manual_seed(n * 7 + k * 3 + m)
    w = torch.randn(n, k, device="cuda", generator=g, dtype=BF16) / k**0.5
    lin = torch.nn.Linear(k, n, bias=False, device="cuda", dtype=BF16)
    lin.weight.data.copy_(w)
    f = Fp8Linear.from_linear(lin)
    x = torch.randn(m, k, device="cuda", generator=g, dtype=BF16)
    chosen = ops.linear_backend(x, f.weight)
    if torch.cuda.get_device_capability() == lt.table()["sm"] and n % 16 == 0 and k % 16 == 0:
        assert chosen == backend or (backend == "gemv" and chosen == "scaled_mm"), (chosen, backend)
    y = f(x)
    assert y.shape == (m, n) and y.dtype == BF16
    ref = _emulate(x, f, chosen)
    assert common.sqnr(y, ref) > 40, (n, k, m, chosen, common.sqnr(y, ref))

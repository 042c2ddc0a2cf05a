"""The Triton FP8 GEMM (:mod:`fastfp8.kernels.gemm`) against its fp32 reference, on fresh
random inputs, outputs poisoned (NaN) before each run. (The CPU run of the ``tile`` kernel
under ``TRITON_INTERPRET=1`` is part of ``test_modules.test_triton_kernels_under_interpreter``.)"""

from __future__ import annotations

import pytest
import torch
from fastfp8.kernels import act_quant as aq
from fastfp8.kernels import common, splitk
from fastfp8.kernels import gemm as gm

FP8 = torch.float8_e4m3fn
BF16 = torch.bfloat16


def gemm_case(m, n, k, *, bias, device, seed=0):
    g = torch.Generator(device=device).manual_seed(seed)
    x = torch.randn(m, k, generator=g, device=device, dtype=BF16)
    w = (torch.randn(n, k, generator=g, device=device) * 64).clamp(-448, 448).to(FP8)
    ws = torch.rand(n, generator=g, device=device) / 64 + 1e-3
    b = torch.randn(n, generator=g, device=device, dtype=BF16) if bias else None
    q, s = aq.act_quant(x)
    return q, s, w, ws, b


def check(m, n, k, cfg, *, bias, device, seed=0):
    q, s, w, ws, b = gemm_case(m, n, k, bias=bias, device=device, seed=seed)
    y = gm.fp8_gemm(q, s, w, ws, b, config=cfg)
    ref = gm.fp8_gemm_reference(q, s, w, ws, b, out_dtype=torch.float32)
    assert y.shape == (m, n) and y.dtype == BF16
    assert torch.isfinite(y).all(), (m, n, k, cfg)
    assert common.sqnr(y, ref) > 45, (m, n, k, cfg, common.sqnr(y, ref))
    check_split_k(lambda **kw: gm.fp8_gemm(q, s, w, ws, b, config=cfg, **kw), y, cfg)


def check_split_k(call, y, cfg):
    """A split-K launch (``cfg[5] > 1``) gives the same bits again, with the stream's
    counters and with fresh ones (the last split to arrive adds the partials in split order),
    and leaves the counters at zero."""
    if cfg[5] == 1:
        return
    assert torch.equal(call(), y)
    assert torch.equal(call(fresh_counters=True), y)
    assert not splitk.counters(y.device, 1).any()


def test_w16_rejects_bad_inputs():
    _, _, w, ws, _ = gemm_case(4, 32, 64, bias=False, device="cpu")
    x = torch.randn(4, 64, dtype=BF16)
    cfg = ("w16", 16, 32, 32, 1, 1, 4, 2)
    with pytest.raises(ValueError, match="bf16 or fp16"):
        gm.w16_gemm(x.float(), w, ws, config=cfg)
    with pytest.raises(ValueError, match="bf16 or fp16"):
        gm.w16_gemm(x.to(FP8), w, ws, config=cfg)
    with pytest.raises(ValueError, match="'w16'"):
        gm.w16_gemm(x, w, ws, config=("tile", *cfg[1:]))
    with pytest.raises(ValueError):
        gm.w16_gemm(x[:, :32], w, ws, config=cfg)  # K differs from the weight's
    assert gm.w16_gemm(x[:0], w, ws, config=cfg).shape == (0, 32)


def test_reference_matches_dequantized_matmul():
    q, s, w, ws, b = gemm_case(7, 48, 64, bias=True, device="cpu")
    ref = gm.fp8_gemm_reference(q, s, w, ws, b, out_dtype=torch.float32)
    emu = (q.float() * s) @ (w.float() * ws.reshape(-1, 1)).t() + b.float()
    torch.testing.assert_close(ref, emu, rtol=1e-5, atol=1e-4)


def test_gemm_rejects_bad_inputs():
    q, s, w, ws, _ = gemm_case(4, 32, 64, bias=False, device="cpu")
    with pytest.raises(ValueError):
        gm.fp8_gemm(q.float(), s, w, ws, config=("tile", 16, 32, 32, 1, 1, 4, 2))
    with pytest.raises(ValueError):
        gm.fp8_gemm(q, s[:2], w, ws, config=("tile", 16, 32, 32, 1, 1, 4, 2))


cuda = pytest.mark.cuda
needs_fp8 = pytest.mark.skipif(not (torch.cuda.is_available() and torch.cuda.get_device_capability() >= (8, 9)),
                               reason="needs a GPU with fp8 (sm89+)")
needs_tma = pytest.mark.skipif(not (torch.cuda.is_available() and gm.tma_supported(torch.device("cuda"))),
                               reason="needs sm90 and Triton tensor descriptors")

TILE_CONFIGS = [("tile", 16, 64, 128, 8, 1, 4, 4), ("tile", 16, 128, 128, 8, 4, 4, 4),
                ("tile", 64, 128, 128, 8, 2, 4, 4), ("tile", 128, 256, 128, 8, 1, 8, 3),
                ("tile", 32, 64, 128, 8, 1, 4, 4), ("tile", 64, 64, 256, 8, 4, 4, 3)]
TMA_CONFIGS = [("tma", 128, 128, 128, 8, 1, 8, 3), ("tma", 128, 256, 64, 8, 1, 8, 4), ("tma", 64, 128, 128, 8, 1, 4, 4)]
ODD = [(1, 4096, 4096), (17, 1000, 4096), (300, 4096, 1040), (1024, 6144, 4096), (2, 96, 80)]


@cuda
@needs_fp8
@pytest.mark.parametrize("cfg", TILE_CONFIGS)
@pytest.mark.parametrize(("m", "n", "k"), ODD)
@pytest.mark.parametrize("bias", [False, True])
def test_gemm_tile_cuda(monkeypatch, cfg, m, n, k, bias):
    monkeypatch.setattr(common, "POISON", True)
    check(m, n, k, cfg, bias=bias, device="cuda", seed=m + n)


if common.triton is not None:

    @common.triton.jit
    def _widen_kernel(w_ptr, like_ptr, out_ptr, BLOCK: common.tl.constexpr):
        r = common.tl.arange(0, BLOCK)
        common.tl.store(out_ptr + r, common.widen(common.tl.load(w_ptr + r), common.tl.load(like_ptr + r)))


@cuda
@needs_fp8
@pytest.mark.parametrize("dtype", [BF16, torch.float16])
def test_widen_every_e4m3_byte_cuda(dtype):
    """The W8A16 kernels' weight conversion (bf16: inline PTX) gives torch's value for every
    e4m3 byte but the two NaNs (which read as +-480 on the bf16 path): zeros with their sign,
    subnormals, 448. Outputs poisoned; the bytes in a shuffled order, so that each lane of
    the packed conversion sees every kind."""
    codes = torch.arange(256, dtype=torch.int32)
    codes = codes[(codes & 0x7F) != 0x7F]
    codes = codes[torch.randperm(codes.numel(), generator=torch.Generator().manual_seed(0))]
    codes = torch.cat([codes, codes[:256 - codes.numel()]]).to(torch.uint8).cuda()
    w = codes.view(FP8)
    out = torch.full((256,), float("nan"), dtype=dtype, device="cuda")
    _widen_kernel[(1,)](w, torch.zeros(256, dtype=dtype, device="cuda"), out, BLOCK=256)
    want = w.to(dtype)
    assert torch.equal(out.view(torch.int16), want.view(torch.int16))
    if dtype == BF16:
        nan = torch.tensor([0x7F, 0xFF] * 128, dtype=torch.uint8, device="cuda").view(FP8)
        _widen_kernel[(1,)](nan, torch.zeros(256, dtype=dtype, device="cuda"), out, BLOCK=256)
        assert out.float().abs().eq(480).all()


W16_CONFIGS = [("w16", 16, 64, 128, 8, 1, 4, 4), ("w16", 16, 64, 128, 8, 4, 4, 4), ("w16", 64, 128, 64, 8, 2, 4, 4),
               ("w16", 128, 128, 64, 8, 1, 8, 3), ("w16", 32, 64, 128, 8, 8, 4, 4)]


@cuda
@needs_fp8
@pytest.mark.parametrize("cfg", W16_CONFIGS)
@pytest.mark.parametrize(("m", "n", "k"), ODD)
@pytest.mark.parametrize("dtype", [BF16, torch.float16])
def test_gemm_w16_cuda(monkeypatch, cfg, m, n, k, dtype):
    """The W8A16 tiled GEMM against the fp32 product of the activations and the dequantized
    weight, outputs poisoned; bias with bf16, none with fp16."""
    from fastfp8.kernels import gemv as gv

    monkeypatch.setattr(common, "POISON", True)
    g = torch.Generator(device="cuda").manual_seed(m + n + k)
    x = torch.randn(m, k, generator=g, device="cuda").to(dtype)
    w = (torch.randn(n, k, generator=g, device="cuda") * 64).clamp(-448, 448).to(FP8)
    ws = torch.rand(n, generator=g, device="cuda") / 64 + 1e-3
    b = torch.randn(n, generator=g, device="cuda").to(dtype) if dtype == BF16 else None
    y = gm.w16_gemm(x, w, ws, b, config=cfg)
    ref = gv.fp8_gemv_reference(x.float(), w, ws.reshape(-1, 1), b)
    assert y.shape == (m, n) and y.dtype == dtype
    assert torch.isfinite(y).all(), (m, n, k, cfg)
    assert common.sqnr(y, ref) > 40, (m, n, k, cfg, common.sqnr(y, ref))
    check_split_k(lambda **kw: gm.w16_gemm(x, w, ws, b, config=cfg, **kw), y, cfg)


def test_w16_tune_candidates_compile_for_sm90_and_fit():
    """Every W8A16 tile and the small-tile / split-K W8A8 ones that benches/tune_linear.py
    tries compile for Hopper and fit."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benches"))
    try:
        import tune_linear
    finally:
        sys.path.pop(0)
    for cfg in tune_linear.W16 + tune_linear.TILE_GRID + tune_linear.TILE_ROWS + tune_linear.TMA_GRID + \
            tune_linear.SPLIT_GRID:
        smem = _shared_bytes_sm90(lambda cfg=cfg: _compile_sm90(cfg, bias=True))
        assert smem <= SM90_SHARED, (cfg, smem)


@cuda
@needs_fp8
@needs_tma
@pytest.mark.parametrize("cfg", TMA_CONFIGS)
@pytest.mark.parametrize(("m", "n", "k"), [(1, 4096, 4096), (300, 4096, 1040), (1024, 6144, 4096), (4100, 512, 2048)])
@pytest.mark.parametrize("bias", [False, True])
def test_gemm_tma_cuda(monkeypatch, cfg, m, n, k, bias):
    monkeypatch.setattr(common, "POISON", True)
    check(m, n, k, cfg, bias=bias, device="cuda", seed=m + 2 * n)


def test_every_fp8_kernel_checks_its_weight_operand_alike():
    """One check (``common.fp8_weight``) for the W8A16 GEMV and the W8A8 GEMM:
    a weight that is not fp8 ``[N, K]``, or a scale count other than ``N``, is a ValueError
    that says so."""
    from fastfp8.kernels import gemv as gv

    x = torch.randn(4, 64, dtype=BF16)
    q = torch.randn(4, 64).to(FP8)
    w = torch.randn(32, 64).to(FP8)
    calls = {
        "gemv": lambda w, s: gv.fp8_gemv(x, w, s),
        "gemm": lambda w, s: gm.fp8_gemm(q, torch.ones(4), w, s, config=("tile", 16, 32, 32, 1, 1, 4, 2)),
    }
    for call in calls.values():
        for bad_w in (w.float(), w[:, :32], w.reshape(1, 32, 64)):
            with pytest.raises(ValueError, match=r"float8_e4m3fn \[N, 64\]"):
                call(bad_w, torch.ones(32))
        with pytest.raises(ValueError, match="weight scale must hold 32 values"):
            call(w, torch.ones(31))


def _compile_sm90(cfg, bias):
    """Compiles one GEMM configuration for sm90 on the CPU (no GPU needed); returns its
    shared-memory bytes. Pointers and strides are declared 16-divisible, as the launcher
    specializes them at run time (without that Triton would not pipeline the loads)."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    kind, bm, bn, bk, g, sk, nw, ns = cfg
    if kind in ("tile", "w16"):  # w16: the tile kernel on bf16 activations
        sig = {"a_ptr": "*bf16" if kind == "w16" else "*fp8e4nv", "b_ptr": "*fp8e4nv",
               "c_ptr": "*bf16", "as_ptr": "*fp32", "bs_ptr": "*fp32", "bias_ptr": "*bf16", "p_ptr": "*fp32",
               "cnt_ptr": "*i32", "M": "i32", "N": "i32", "K": "i32", "s_am": "i32",
               "s_bn": "i32", "s_cm": "i32",
               **dict.fromkeys(("HAS_BIAS", "SPLIT_K", "EVEN_K", "EMULATE", "A16", "BLOCK_M", "BLOCK_N", "BLOCK_K",
                                "GROUP_M"), "constexpr")}
        consts = {"HAS_BIAS": bias, "SPLIT_K": sk, "EVEN_K": True, "EMULATE": False, "A16": kind == "w16",
                  "BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": g}
        attrs = {(i,): [["tt.divisibility", 16]] for i in (0, 1, 2, 3, 4, 5, 6, 7, 9, 10, 11, 12, 13)}
        fn = gm._fp8_gemm_tile_kernel
    else:
        sig = {"a_desc": f"tensordesc<fp8e4nv[{bm}, {bk}]>", "b_desc": f"tensordesc<fp8e4nv[{bn}, {bk}]>",
               "c_desc": f"tensordesc<bf16[{bm}, {bn}]>", "as_ptr": "*fp32", "bs_ptr": "*fp32", "bias_ptr": "*bf16",
               "M": "i32", "N": "i32", "K": "i32",
               **dict.fromkeys(("HAS_BIAS", "BLOCK_M", "BLOCK_N", "BLOCK_K", "GROUP_M", "NUM_SMS"), "constexpr")}
        consts = {"HAS_BIAS": bias, "BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": g, "NUM_SMS": 132}
        attrs = {}
        fn = gm._fp8_gemm_tma_kernel
    src = ASTSource(fn=fn, signature=sig, constexprs=consts, attrs=attrs)
    k = gm.triton.compile(src, target=GPUTarget("cuda", 90, 32), options=dict(num_warps=nw, num_stages=ns))
    return k.metadata.shared


def _table_gemm_configs():
    from fastfp8.kernels import linear_table as lt

    t = lt.load()
    cfgs = {tuple(r[2]) for rows in [*t["entries"].values(), t["generic"]] for r in rows
            if r[1] in ("tile", "tma", "w16")}
    for m in (1, 32, 200):
        cfgs.add(gm.default_config(m, 4096, 4096, "tile"))
        cfgs.add(gm.default_config(m, 4096, 4096, "tma"))
        cfgs.add(gm.default_config(m, 4096, 4096, "w16"))
    return sorted(cfgs)


def _shared_bytes_sm90(compile_one) -> int:
    """``compile_one()`` (an offline compile for sm90, returning its shared-memory bytes), or
    a skip where this Triton cannot compile offline (no API, another API, no ptxas)."""
    if gm.triton is None:
        pytest.skip("needs Triton")
    try:
        from triton.backends.compiler import GPUTarget  # noqa: F401
        from triton.compiler import ASTSource  # noqa: F401
        from triton.tools.tensor_descriptor import TensorDescriptor  # noqa: F401
    except ImportError:
        pytest.skip("this Triton has no offline compilation API or no tensor descriptors")
    try:
        return compile_one()
    except (TypeError, AttributeError, KeyError) as e:  # another Triton's compile API
        pytest.skip(f"offline compilation API differs: {type(e).__name__}: {e}")
    except Exception as e:
        if "ptxas" in str(e).lower():
            pytest.skip(f"no ptxas here: {e}")
        raise


#: Hopper's shared memory per block
SM90_SHARED = 232448


def test_table_configs_compile_for_sm90_and_fit():
    """Every GEMM configuration of the table in use (and the defaults) compiles for Hopper
    and fits its 227 KiB of shared memory: checked here, on the CPU, before a GPU run."""
    for cfg in _table_gemm_configs():
        smem = _shared_bytes_sm90(lambda cfg=cfg: _compile_sm90(cfg, bias=True))
        assert smem <= SM90_SHARED, (cfg, smem)


def _compile_gemv_sm90(cfg, m):
    """Compiles the GEMV kernel for ``M`` rows with a table config for sm90 on the CPU;
    returns its shared-memory bytes."""
    from fastfp8.kernels import gemv as gv
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    launch = gv.config_of(cfg, m)
    sig = {"x_ptr": "*bf16", "w_ptr": "*fp8e4nv", "s_ptr": "*fp32", "b_ptr": "*bf16", "y_ptr": "*bf16",
           "p_ptr": "*fp32", "c_ptr": "*i32", "M": "i32", "N": "i32", "K": "i32", "sx_m": "i32", "sw_n": "i32",
           "sy_m": "i32", **dict.fromkeys(("HAS_BIAS", "USE_DOT", "EMULATE", "EVEN_K", "INT64", "SPLIT_K",
                                           "LOAD_STAGES", "BLOCK_M", "BLOCK_N", "BLOCK_K"), "constexpr")}
    stages = launch["num_stages"] if launch["USE_DOT"] else launch.get("LOAD_STAGES", 1)
    consts = {"HAS_BIAS": True, "USE_DOT": launch["USE_DOT"], "EMULATE": False, "EVEN_K": True, "INT64": False,
              "SPLIT_K": launch.get("SPLIT_K", 1), "LOAD_STAGES": stages, "BLOCK_M": gv.block_m(m, launch["USE_DOT"]),
              "BLOCK_N": launch["BLOCK_N"], "BLOCK_K": launch["BLOCK_K"]}
    attrs = {(i,): [["tt.divisibility", 16]] for i in (0, 1, 2, 3, 4, 5, 6, 9, 10, 11, 12)}
    src = ASTSource(fn=gv._fp8_gemv_kernel, signature=sig, constexprs=consts, attrs=attrs)
    k = gm.triton.compile(src, target=GPUTarget("cuda", 90, 32),
                          options=dict(num_warps=launch["num_warps"], num_stages=launch["num_stages"]))
    return k.metadata.shared


def test_gemv_split_configs_compile_for_sm90_and_fit():
    """The split-K GEMV (counters, partials, the last split's epilogue) compiles for Hopper
    at both variants (elementwise M = 1, tl.dot M > 1) and fits its shared memory."""
    for cfg, m in [([4, 1024, 4, 2, 8], 1), ([8, 512, 4, 2, 2], 1), ([8, 1024, 4, 3, 1, 3], 1),
                   ([4, 1024, 4, 4, 8, 4], 1), ([16, 256, 4, 3, 4], 16),
                   ([64, 128, 4, 3, 8], 128), ([32, 256, 4, 3], 64)]:
        smem = _shared_bytes_sm90(lambda cfg=cfg, m=m: _compile_gemv_sm90(cfg, m))
        assert smem <= SM90_SHARED, (cfg, m, smem)


def test_launch_geometry_matches_tritons_own():
    """``cdiv`` / ``next_power_of_2`` (plain Python: Triton's are constexpr functions, ~8 us a
    call from the host) give Triton's results wherever the launches use them."""
    triton = pytest.importorskip("triton")
    for a in [*range(1, 300), 4095, 4096, 4097, 14336, 2**31 - 1, 2**31, 2**40 + 3]:
        assert common.next_power_of_2(a) == triton.next_power_of_2(a), a
        for b in (1, 2, 3, 16, 64, 128, 132, 1000):
            assert common.cdiv(a, b) == triton.cdiv(a, b), (a, b)
    assert common.cdiv(0, 7) == 0

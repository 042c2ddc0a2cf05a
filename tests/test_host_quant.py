"""Quantization on the host (the reader threads, ``quantize_on="host"``): every byte and
scale equal to the torch reference for the same rounding, on every bf16 and fp16 bit
pattern against a set of scales, on fp32 edge values, zero rows and non-finite rows; and
whole loads equal byte for byte to the device path."""

from __future__ import annotations

import json
import time

import fastfp8
import pytest
import torch
from fastfp8 import _native
from fastfp8.checkpoint import open_checkpoint
from fastfp8.host_quant import host_quant_specs
from fastfp8.plan import make_plan
from fastfp8.quant import quantize_channelwise
from fastfp8.quant.reference import quantize_channelwise_reference
from safetensors.torch import save_file

FP8 = torch.float8_e4m3fn
ROUNDINGS = ["fp32", "eager"]
NAMES = {torch.bfloat16: "BF16", torch.float16: "F16", torch.float32: "F32"}


def host(w: torch.Tensor, rounding: str) -> tuple[torch.Tensor, torch.Tensor]:
    w = w.contiguous()
    q, s = _native.quantize_rows(w.view(torch.uint8).numpy().tobytes(), NAMES[w.dtype], w.shape[-1], rounding)
    q = torch.frombuffer(bytearray(q), dtype=torch.uint8).view(w.shape)
    s = torch.frombuffer(bytearray(s), dtype=torch.uint8).view(w.dtype).view(w.shape[0], 1)
    return q, s


def check(w: torch.Tensor, rounding: str) -> None:
    q, s = host(w, rounding)
    rq, rs = quantize_channelwise_reference(w, rounding=rounding)
    assert torch.equal(s.view(torch.uint8), rs.view(torch.uint8)), "scales differ"
    bad = (q != rq.view(torch.uint8)).nonzero()
    if len(bad):
        r, c = bad[0].tolist()
        ref = rq.view(torch.uint8)[r, c].item()
        raise AssertionError(f"{len(bad)} bytes differ; first at row {r} col {c}: x={w[r, c].item()!r} "
                             f"scale={s[r, 0].item()!r} host={q[r, c].item():#04x} ref={ref:#04x}")


def all_patterns(dtype: torch.dtype) -> torch.Tensor:
    """Every finite value of a 16-bit dtype."""
    x = torch.arange(1 << 16, dtype=torch.int32).to(torch.int16).view(dtype)
    return x[torch.isfinite(x)]


def rows_at(x: torch.Tensor, amaxes: list[float]) -> torch.Tensor:
    """One row per amax: every value of ``x`` within it (the rest zeroed), and the amax."""
    rows = []
    for a in amaxes:
        a_t = torch.tensor(a, dtype=x.dtype)
        r = torch.where(x.abs() <= a_t, x, torch.zeros((), dtype=x.dtype))
        r[0] = a_t
        rows.append(r)
    return torch.stack(rows)


@pytest.mark.parametrize("rounding", ROUNDINGS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_every_16_bit_pattern_against_a_set_of_scales(dtype, rounding):
    x = all_patterns(dtype)
    big = torch.finfo(dtype).max
    tiny = torch.finfo(dtype).smallest_normal
    amaxes = [big, 65504.0 if dtype == torch.float16 else 3e38, 1e4, 448.0, 100.0, 3.0, 1.0, 0.7, 0.01, 1e-3,
              tiny * 1000, tiny, tiny / 8]
    check(rows_at(x, [a for a in amaxes if a <= big]), rounding)


@pytest.mark.parametrize("rounding", ROUNDINGS)
def test_every_bf16_pattern_as_its_own_rows_amax(rounding):
    # each bf16 value v sits in a row [v, 1.5 v, ...]: the quotients near every e4m3 boundary
    x = all_patterns(torch.bfloat16)
    x = x[(x != 0) & (x.abs() < 1e38)]
    w = torch.stack([x, x * 1.5, -x * 0.75, x / 3, x * 0.001, x * 0.333], dim=1).to(torch.bfloat16)
    check(w, rounding)


@pytest.mark.parametrize("rounding", ROUNDINGS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("shape", [(1, 1), (3, 7), (64, 4096), (17, 1000), (5, 14336)])
def test_random_rows(dtype, shape, rounding):
    gen = torch.Generator().manual_seed(hash((str(dtype), shape, rounding)) % 2**31)
    w = (torch.randn(shape, generator=gen) * torch.logspace(-6, 3, shape[0])[:, None]).to(dtype)
    check(w, rounding)


@pytest.mark.parametrize("rounding", ROUNDINGS)
def test_fp32_edges_and_zero_rows(rounding):
    f = torch.finfo(torch.float32)
    rows = torch.tensor([
        [0.0, -0.0, 0.0, 0.0],
        [f.tiny, -f.tiny / 4, 1e-45, 0.0],  # subnormals: the scale underflows to eps
        [f.max, -f.max / 3, 1.0, -0.0],
        [448.0, 447.9, -0.001, 2.0 ** -9],
        [1.0, 1.0 + 2 ** -23, 1.0625, -1.0625],
    ], dtype=torch.float32)
    check(rows, rounding)
    check(rows.clamp(-3e38, 3e38).to(torch.bfloat16), rounding)
    check(torch.zeros(3, 5, dtype=torch.bfloat16), rounding)


def test_non_finite_rows_get_a_nan_scale():
    w = torch.tensor([[1.0, float("nan")], [float("inf"), 1.0], [1.0, 2.0]], dtype=torch.bfloat16)
    q, s = host(w, "fp32")
    assert torch.isnan(s[:2]).all() and torch.isfinite(s[2]).all()
    assert (q[:2] == 0x7F).all()


def test_bad_specs_are_value_errors():
    with pytest.raises(ValueError, match="whole rows"):
        _native.quantize_rows(b"\0" * 6, "BF16", 2)
    with pytest.raises(ValueError, match="I8"):
        _native.quantize_rows(b"\0" * 4, "I8", 2)
    with pytest.raises(ValueError, match="rounding"):
        _native.quantize_rows(b"\0" * 4, "BF16", 2, "nearest")


# ---------------------------------------------------------------------------------------
# row-parallel slices: the rows' amax read ahead, all-reduced, then quantized with it


def read_quantized(ckpt, items, rows_cols) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Runs ``items`` (quantized on the way) through a ChunkReader: ``(q, scale bytes)`` each."""
    from fastfp8.checkpoint import ChunkReader

    out = [(torch.empty(r * c, dtype=torch.uint8), torch.empty(r * eb, dtype=torch.uint8))
           for r, c, eb in rows_cols]
    with ChunkReader(ckpt, items, memory_budget="64KiB", chunk_bytes=5000, threads=3) as reader:
        while (d := reader.next()) is not None:
            item, ioff, boff, n = d
            _, c, eb = rows_cols[item]
            k = n // (c + eb)
            r0 = ioff // (c * eb)
            out[item][0][r0 * c : (r0 + k) * c] = reader.view(boff, k * c)
            out[item][1][r0 * eb : (r0 + k) * eb] = reader.view(boff + k * c, k * eb)
            reader.release(boff, n)
    return out


def column_slices(info, spans):
    """Each ``(a, b)`` of ``spans``: columns ``[a, b)`` of every row, one strided segment (as
    :func:`fastfp8.plan._cols` plans a row-parallel slice)."""
    rows, cols = info.shape
    es = info.torch_dtype.itemsize
    return [[(info.shard, info.begin + a * es, (b - a) * es, rows, cols * es)] for a, b in spans]


@pytest.mark.parametrize("rounding", ROUNDINGS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("shape", [(1, 1), (5, 3), (64, 100), (33, 1000), (7, 4099)])
def test_row_slices_with_the_reduced_amax_match_the_reference(tmp_path, dtype, shape, rounding):
    from fastfp8.checkpoint import row_amax

    gen = torch.Generator().manual_seed(hash((str(dtype), shape, rounding)) % 2**31)
    w = (torch.randn(shape, generator=gen) * torch.logspace(-6, 3, shape[0])[:, None]).to(dtype)
    w[0] = 0  # a zero row
    if shape[0] > 2:
        w[2, : shape[1] // 2] = 0  # zero in the first slices only
    save_file({"w": w}, str(tmp_path / "w.safetensors"))
    ck = open_checkpoint(tmp_path / "w.safetensors")
    info = ck.info("w")
    rows, cols = shape
    spans = [(0, 0), (0, 1), (1, cols // 2), (cols // 2, cols), (0, cols)]
    spans = [(a, b) for a, b in spans if a <= b]
    spec = lambda a, b: (NAMES[dtype], b - a, rounding)  # noqa: E731
    items = [("w", segs, spec(a, b)) for (a, b), segs in zip(spans, column_slices(info, spans), strict=True)
             if b > a]
    local = row_amax(ck, items, threads=2)
    assert torch.equal(local, torch.cat([w[:, a:b].abs().amax(-1).float() for a, b in spans if b > a]))
    whole = w.abs().amax(-1).float()  # the all-reduced amax of every rank's slice
    items = [(*item, whole.tolist()) for item in items]
    got = read_quantized(ck, items, [(rows, b - a, w.element_size()) for a, b in spans if b > a])
    for (a, b), (q, s) in zip([sp for sp in spans if sp[1] > sp[0]], got, strict=True):
        rq, rs = quantize_channelwise(w[:, a:b].contiguous(), rounding=rounding,
                                      reduce_absmax=lambda m: m.copy_(whole.view(-1, 1)))
        assert torch.equal(s, rs.view(torch.uint8).reshape(-1)), (a, b, "scales")
        assert torch.equal(q, rq.view(torch.uint8).reshape(-1)), (a, b, "bytes")


def test_row_amax_and_given_amax_errors_name_the_tensor(tmp_path):
    from fastfp8.checkpoint import row_amax

    w = torch.ones(4, 8, dtype=torch.bfloat16)
    w[1, 3] = float("inf")
    w[2, 0] = float("nan")
    save_file({"w": w}, str(tmp_path / "w.safetensors"))
    ck = open_checkpoint(tmp_path / "w.safetensors")
    (segs,) = column_slices(ck.info("w"), [(2, 6)])
    got = row_amax(ck, [("w", segs, ("BF16", 4, "fp32"))])
    assert got.tolist() == [1.0, float("inf"), 1.0, 1.0]  # NaN at column 0: outside the slice
    assert row_amax(ck, []).numel() == 0
    with pytest.raises(ValueError, match=r"w: .*dtype and columns"):
        row_amax(ck, [("w", segs)])
    with pytest.raises(ValueError, match=r"w: .*I8"):
        row_amax(ck, [("w", segs, ("I8", 4, "fp32"))])
    with pytest.raises(ValueError, match=r"w: .*outside"):
        row_amax(ck, [("w", [(0, 1 << 30, 8)], ("BF16", 4, "fp32"))])
    with pytest.raises(ValueError, match="w: 3 given row amax values for 4 rows"):
        read_quantized(ck, [("w", segs, ("BF16", 4, "fp32"), [1.0] * 3)], [(4, 4, 2)])
    with pytest.raises(ValueError, match="w: the given amax of row 1 is negative"):
        read_quantized(ck, [("w", segs, ("BF16", 4, "fp32"), [1.0, -2.0, 1.0, 1.0])], [(4, 4, 2)])
    # a NaN or Inf given amax makes the row non-finite (a NaN scale), as a NaN in it would
    (_, s), = read_quantized(ck, [("w", segs, ("BF16", 4, "fp32"), [float("inf"), 1.0, 1.0, 1.0])], [(4, 4, 2)])
    scales = s.view(torch.bfloat16)
    assert scales[0].isnan() and scales[1].isnan() and scales[3].isfinite()


# ---------------------------------------------------------------------------------------
# whole loads: the host path against the device path


def llama(root, dtype=torch.bfloat16, seed=0, inter=352):
    gen = torch.Generator().manual_seed(seed)
    h, vocab = 128, 96
    t = {"model.embed_tokens.weight": torch.randn(vocab, h, generator=gen),
         "lm_head.weight": torch.randn(vocab, h, generator=gen), "model.norm.weight": torch.ones(h)}
    for i in range(2):
        p = f"model.layers.{i}."
        for n, shape in [("self_attn.q_proj", (h, h)), ("self_attn.k_proj", (64, h)), ("self_attn.v_proj", (64, h)),
                         ("self_attn.o_proj", (h, h)), ("mlp.gate_proj", (inter, h)), ("mlp.up_proj", (inter, h)),
                         ("mlp.down_proj", (h, inter))]:
            t[p + n + ".weight"] = torch.randn(shape, generator=gen) * (i + 1) * 0.02
        t[p + "input_layernorm.weight"] = torch.ones(h)
        t[p + "post_attention_layernorm.weight"] = torch.ones(h)
    t = {k: v.to(dtype) for k, v in t.items()}
    root.mkdir(exist_ok=True)
    save_file(t, str(root / "model.safetensors"))
    (root / "config.json").write_text(json.dumps({
        "model_type": "llama", "architectures": ["LlamaForCausalLM"], "hidden_size": h, "intermediate_size": inter,
        "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 32, "num_hidden_layers": 2,
        "vocab_size": vocab, "tie_word_embeddings": False}))
    return t


def same_state(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == b[k].dtype and a[k].shape == b[k].shape, k
        assert torch.equal(a[k].view(torch.uint8), b[k].view(torch.uint8)), k


def load(path, device, **kw):
    res = fastfp8.load_quantized(path, device=device, progress=False, **kw)
    return dict(res), res.stats


DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("budget", [None, ("64KiB", "8KiB"), ("1MiB", "1000")])
@pytest.mark.parametrize("method", ["pread", "mmap"])  # mmap: quantized in place in the mapping
def test_host_and_device_paths_give_the_same_bytes(tmp_path, device, dtype, budget, method):
    llama(tmp_path / "m", dtype)
    kw = {} if budget is None else {"memory_budget": budget[0], "chunk_bytes": budget[1]}
    host_state, host_stats = load(tmp_path / "m", device, quantize_on="host", method=method, **kw)
    dev_state, dev_stats = load(tmp_path / "m", device, quantize_on="device", **kw)
    assert host_stats.host_quantized == host_stats.quantized == 14
    assert dev_stats.host_quantized == 0
    assert (host_stats.quantize_on, dev_stats.quantize_on) == ("host", "device")  # as asked
    same_state(host_state, dev_state)
    assert host_stats.bytes_read == dev_stats.bytes_read


@pytest.mark.parametrize("device", DEVICES)
def test_split_quantizes_half_the_bytes_on_each_side(tmp_path, device):
    llama(tmp_path / "m")
    split_state, split_stats = load(tmp_path / "m", device, quantize_on="split", host_share=0.5,
                                    memory_budget="64KiB", chunk_bytes="8KiB")
    dev_state, _ = load(tmp_path / "m", device, quantize_on="device")
    assert 0 < split_stats.host_quantized < split_stats.quantized
    same_state(split_state, dev_state)
    opts = fastfp8.LoadOptions.make(quantize_on="split", host_share=0.5)
    plan = make_plan(open_checkpoint(tmp_path / "m"), opts)
    specs = host_quant_specs(plan.jobs, opts, "fp32", torch.device("cpu"))
    host = sum(j.nbytes for j, s in zip(plan.jobs, specs, strict=True) if s)
    device_side = sum(j.nbytes for j, s in zip(plan.jobs, specs, strict=True) if s is None and j.quantized)
    assert abs(host - device_side) <= max(j.nbytes for j in plan.jobs)  # balanced to within one tensor


def test_split_takes_the_host_share_asked_for(tmp_path):
    llama(tmp_path / "m")
    plan = make_plan(open_checkpoint(tmp_path / "m"), fastfp8.LoadOptions.make(quantize_on="split"))
    quantized = sum(j.nbytes for j in plan.jobs if j.quantized)
    host_only = host_quant_specs(plan.jobs, fastfp8.LoadOptions.make(quantize_on="host"), "fp32",
                                 torch.device("cpu"))
    for share in (0.0, 0.1, 0.25, 0.75, 1.0):
        opts = fastfp8.LoadOptions.make(quantize_on="split", host_share=share)
        specs = host_quant_specs(plan.jobs, opts, "fp32", torch.device("cpu"))
        host = sum(j.nbytes for j, s in zip(plan.jobs, specs, strict=True) if s)
        assert abs(host - share * quantized) <= max(j.nbytes for j in plan.jobs), share
        if share == 0:
            assert not any(specs)
        if share == 1:
            assert specs == host_only


def test_auto_resolves_by_device():
    from fastfp8.host_quant import resolve_quantize_on

    auto = fastfp8.LoadOptions.make()
    cpu, gpu = torch.device("cpu"), torch.device("cuda", 0)
    assert resolve_quantize_on(auto, cpu).quantize_on == "host"
    assert resolve_quantize_on(auto, gpu).quantize_on == "host"  # warm unless told
    assert resolve_quantize_on(auto, gpu, warm=False).quantize_on == "adaptive"
    assert resolve_quantize_on(auto, gpu, tp_size=2).quantize_on == "device"  # the same on every rank
    assert resolve_quantize_on(auto, gpu, tp_size=2, warm=False).quantize_on == "device"
    assert resolve_quantize_on(auto, cpu, warm=False).quantize_on == "host"
    assert resolve_quantize_on(auto, cpu, tp_size=2).quantize_on == "host"
    split = auto.replace(quantize_on="split", host_share=0.25)
    assert resolve_quantize_on(split, gpu) == split
    for chosen in ("host", "device", "split", "adaptive"):  # what the caller chose stands
        for dev in (cpu, gpu):
            assert resolve_quantize_on(auto.replace(quantize_on=chosen), dev).quantize_on == chosen


def test_specs_want_a_resolved_choice(tmp_path):
    auto = fastfp8.LoadOptions.make()
    llama(tmp_path / "m")
    plan = make_plan(open_checkpoint(tmp_path / "m"), auto)
    with pytest.raises(ValueError, match="resolve"):
        host_quant_specs(plan.jobs, auto, "fp32", torch.device("cpu"))


@pytest.mark.cuda
def test_defaults_on_a_gpu_match_the_device(tmp_path):
    """"auto" on a GPU (the host for a warm checkpoint, adaptive for a cold one), adaptive
    named, the host (read with mmap: in place in the page cache) and a split at
    DEFAULT_HOST_SHARE load the device's bytes."""
    llama(tmp_path / "m")
    dev_state, dev_stats = load(tmp_path / "m", "cuda", quantize_on="device")
    assert dev_stats.host_quantized == 0
    for chosen in ("auto", "adaptive"):
        state, stats = load(tmp_path / "m", "cuda", quantize_on=chosen)
        assert 0 <= stats.host_quantized <= stats.quantized
        same_state(state, dev_state)
    state, stats = load(tmp_path / "m", "cuda", quantize_on="host")
    assert (stats.method, stats.host_quantized) == ("mmap", stats.quantized)
    same_state(state, dev_state)
    state, stats = load(tmp_path / "m", "cuda", quantize_on="split")
    assert 0 < stats.host_quantized < stats.quantized
    same_state(state, dev_state)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_adaptive_takes_both_sides_and_matches_the_device(tmp_path, monkeypatch, device, dtype):
    """``quantize_on="adaptive"``: the reader threads quantize the weights they reach ahead
    of a slow consumer, and leave the others to the device kernel; the bytes are the
    device's either way, and ``host_quantized`` counts the ones the threads took."""
    from fastfp8 import engine
    from test_load import save, tiny

    save(tiny("llama", dtype), tmp_path / "m", shard="200KB")
    want, _ = load(tmp_path / "m", device, quantize_on="device")

    def slow(point, job):
        if point == "yield":
            time.sleep(0.01)  # the consumer falls behind: the threads get ahead of it

    monkeypatch.setattr(engine, "FAULT_HOOK", slow)
    monkeypatch.setattr(engine, "ADAPTIVE_BALANCE", False)  # the idle-time rule (the default)
    state, stats = load(tmp_path / "m", device, quantize_on="adaptive", memory_budget="128KiB",
                        chunk_bytes="16KiB")
    same_state(state, want)
    assert 0 < stats.host_quantized < stats.quantized, (stats.host_quantized, stats.quantized)


@pytest.mark.parametrize("bad", ["fast", "0", "-3", "inf", "nan"])
def test_bus_rate_override_is_checked(monkeypatch, bad):
    from fastfp8 import engine

    monkeypatch.setenv("FASTFP8_BUS_GBPS", bad)
    with pytest.raises(ValueError, match="FASTFP8_BUS_GBPS must be a positive number"):
        engine.bus_bytes_per_s(torch.device("cuda", 0))
    monkeypatch.setenv("FASTFP8_BUS_GBPS", "50")
    assert engine.bus_bytes_per_s(torch.device("cuda", 0)) == 50e9


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_adaptive_balances_the_threads_and_the_bus_cuda(tmp_path, monkeypatch):
    """``quantize_on="adaptive"`` on CUDA with ``ADAPTIVE_BALANCE`` weighs each weight by the balance of the reader
    threads' work and the bus's: over a bus all but stopped every weight the threads can
    quantize is quantized on the host, over one all but free none is; the bytes are the
    device's either way. The measured rate is plausible."""
    from fastfp8 import engine
    from test_load import save, tiny

    monkeypatch.setattr(engine, "ADAPTIVE_BALANCE", True)
    rate = engine.bus_bytes_per_s(torch.device("cuda"))
    assert 1e9 < rate < 1e12, rate
    save(tiny("llama"), tmp_path / "m", shard="200KB")
    want, _ = load(tmp_path / "m", "cuda", quantize_on="device")
    for gbps, host in (("0.000001", True), ("1000000", False)):
        monkeypatch.setenv("FASTFP8_BUS_GBPS", gbps)
        state, stats = load(tmp_path / "m", "cuda", quantize_on="adaptive")
        same_state(state, want)
        assert stats.host_quantized == (stats.quantized if host else 0), (gbps, stats.host_quantized)


@pytest.mark.parametrize("bad", [-0.1, 1.5, True, "half"])
def test_host_share_is_checked(bad):
    with pytest.raises(ValueError, match="host_share"):
        fastfp8.LoadOptions.make(quantize_on="split", host_share=bad)


def test_split_counts_the_weights_only_the_device_can_do(tmp_path):
    from test_load import save, tiny

    opts = fastfp8.LoadOptions.make(quantize_on="split", host_share=0.5)
    # llama4's fused experts are stored [in, out] (the device transposes them): more bytes than
    # all the rest, so the host takes every other weight
    save(tiny("llama4"), tmp_path / "l4")
    plan = make_plan(open_checkpoint(tmp_path / "l4"), opts)
    specs = host_quant_specs(plan.jobs, opts, "fp32", torch.device("cpu"))
    host_only = host_quant_specs(plan.jobs, opts.replace(quantize_on="host"), "fp32", torch.device("cpu"))
    assert specs == host_only and any(s is None and j.transpose for j, s in zip(plan.jobs, specs, strict=True))
    # llama with fewer device-only bytes than the rest: host ~ device overall
    save(tiny("llama"), tmp_path / "l")
    plan = make_plan(open_checkpoint(tmp_path / "l"), opts)
    jobs = plan.jobs
    fake = [j if j.target.source.name != "model.layers.0.mlp.up_proj.weight" else
            type(j)(**{**j.__dict__, "transpose": True}) for j in jobs]  # one device-only weight
    specs = host_quant_specs(fake, opts, "fp32", torch.device("cpu"))
    host = sum(j.nbytes for j, s in zip(fake, specs, strict=True) if s)
    dev = sum(j.nbytes for j, s in zip(fake, specs, strict=True) if s is None and j.quantized)
    assert abs(host - dev) <= max(j.nbytes for j in jobs)


def test_split_is_the_same_on_every_rank(tmp_path):
    """Row-parallel slices take part in collectives: the split sends each to the same side on
    every rank, whatever the rank's own slice sizes (uneven here: 3 rows over 4 ranks)."""
    from fastfp8.tensor_parallel import TensorParallel

    llama(tmp_path / "m", inter=3)
    opts = fastfp8.LoadOptions.make(quantize_on="split")
    ck = open_checkpoint(tmp_path / "m")
    sides = []
    for rank in range(4):
        plan = make_plan(ck, opts, TensorParallel(rank, 4))
        specs = host_quant_specs(plan.jobs, opts, "fp32", torch.device("cpu"), tp_size=4)
        sides.append([(j.item_name, s is not None) for j, s in zip(plan.jobs, specs, strict=True) if j.reduce])
    assert sides[0] and all(s == sides[0] for s in sides)
    assert {on for _, on in sides[0]} == {True, False}


@pytest.mark.parametrize("device", DEVICES)
def test_rounding_follows_the_option(tmp_path, device):
    llama(tmp_path / "m")
    for rounding in ("eager", "fp32"):
        a, _ = load(tmp_path / "m", device, quantize_on="host", rounding=rounding)
        b, _ = load(tmp_path / "m", device, quantize_on="device", rounding=rounding)
        same_state(a, b)


def test_non_finite_weights_are_reported_by_the_host_path(tmp_path):
    t = llama(tmp_path / "m")
    w = t["model.layers.1.mlp.up_proj.weight"].clone()
    w[3, 5] = float("nan")
    t["model.layers.1.mlp.up_proj.weight"] = w
    save_file(t, str(tmp_path / "m" / "model.safetensors"))
    with pytest.raises(fastfp8.NonFiniteWeightError, match="up_proj"):
        load(tmp_path / "m", "cpu", quantize_on="host")
    _, stats = load(tmp_path / "m", "cpu", allow_non_finite=True)  # the device path's exact bytes
    assert stats.host_quantized == 0 and stats.non_finite == ["model.layers.1.mlp.up_proj.weight"]


def test_a_budget_smaller_than_one_quantized_row_is_a_budget_error(tmp_path):
    llama(tmp_path / "m")
    with pytest.raises(fastfp8.BudgetError):
        load(tmp_path / "m", "cpu", quantize_on="host", memory_budget="200", chunk_bytes="100")


def test_quantize_on_is_validated():
    with pytest.raises(ValueError, match="quantize_on"):
        fastfp8.LoadOptions.make(quantize_on="gpu")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("quantize_on", ["host", "split"])
def test_row_parallel_world_of_one_on_the_host(tmp_path, device, quantize_on, monkeypatch):
    """tp_size=1: row-parallel jobs (whole rows) go through the reader threads with their own
    amax (no pass ahead, no collective) and give the one-process bytes."""
    from fastfp8 import host_quant

    def no_pass_ahead(*args, **kwargs):
        raise AssertionError("a group of one read the rows' amax ahead")

    llama(tmp_path / "m")
    want, _ = load(tmp_path / "m", device, quantize_on="device")
    monkeypatch.setattr(host_quant, "row_amax", no_pass_ahead)
    got, stats = load(tmp_path / "m", device, quantize_on=quantize_on, tp_size=1, tp_rank=0,
                      memory_budget="64KiB", chunk_bytes="8KiB")  # chunks of some rows each
    same_state(got, want)
    if quantize_on == "host":
        assert stats.host_quantized == stats.quantized == 14
    else:
        assert 0 < stats.host_quantized < stats.quantized


@pytest.mark.parametrize("quantize_on", ["device", "host", "split"])
@pytest.mark.parametrize("method", ["pread", "mmap"])
def test_the_engines_reader_alone_delivers_the_whole_plan(tmp_path, quantize_on, method):
    """engine.open_reader (what benches/bench_load.py drains for its readers-alone ceiling):
    every item comes whole and in order, host-quantized items as whole rows' e4m3 bytes plus
    their scales (their offsets count the source bytes)."""
    import sys
    from pathlib import Path

    from fastfp8 import engine

    llama(tmp_path / "m")
    ckpt = open_checkpoint(tmp_path / "m")
    opts = fastfp8.LoadOptions.make(quantize_on=quantize_on, method=method, memory_budget="64KiB",
                                    chunk_bytes="8KiB")
    plan = make_plan(ckpt, opts)
    reader, specs, amax = engine.open_reader(ckpt, plan, opts, torch.device("cpu"), "fp32")
    got = [0] * len(plan.jobs)  # source bytes delivered, per item
    out = [0] * len(plan.jobs)  # bytes delivered, per item
    try:
        while (d := reader.next()) is not None:
            item, ioff, boff, n = d
            assert ioff == got[item]
            job, spec = plan.jobs[item], specs[item]
            cols = job.shape[-1]
            if spec is not None:
                assert n % (cols + 2) == 0  # whole rows: e4m3 bytes, then a bf16 scale each
                got[item] += n // (cols + 2) * cols * job.dtype.itemsize
            else:
                got[item] += n
            out[item] += n
            if n:
                reader.release(boff, n)
        bytes_read = reader.stats()["bytes_read"]
    finally:
        reader.close()
    assert amax == {}
    assert (sum(s is not None for s in specs) > 0) == (quantize_on != "device")
    for job, spec, src, n in zip(plan.jobs, specs, got, out, strict=True):
        rows = job.nbytes // (job.shape[-1] * job.dtype.itemsize)
        assert src == job.nbytes, job.target.source.name
        assert n == (rows * (job.shape[-1] + 2) if spec else job.nbytes), job.target.source.name
    assert bytes_read == plan.nbytes

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benches"))
    try:
        import bench_load
    finally:
        sys.path.pop(0)
    assert bench_load.readers_gbps(str(tmp_path / "m"), repeat=1, quantize_on=quantize_on, method=method) > 0

"""Write a synthetic bf16 HF-style sharded safetensors checkpoint, fast.

Llama (default: Llama-3-8B shapes; ``--layers 32`` gives 8.0e9 parameters,
16.1 GB / 15.0 GiB)::

    python benches/make_checkpoint.py OUT_DIR --layers 32

Llama4 text with fused MoE experts (``feed_forward.experts.gate_up_proj``
``[E, hidden, 2*inter]``, ``down_proj`` ``[E, inter, hidden]``, router,
shared expert), Llama-4-Scout shapes by default::

    python benches/make_checkpoint.py OUT_DIR --moe llama4 --layers 2

Writes ``model-0000i-of-0000N.safetensors`` shards (greedy, like
``save_pretrained(max_shard_size=...)``; a single shard is written as
``model.safetensors`` without an index, as transformers does),
``model.safetensors.index.json`` (``metadata.total_size``, ``weight_map``)
and ``config.json`` (``LlamaForCausalLM`` / ``Llama4ForCausalLM``; built with
transformers' config class when transformers is installed).  Tensor names
are transformers' own (checked against ``model.state_dict().keys()`` of
transformers 5.17 and 5.24).

Data: one random bf16 pool (N(0, std), a prime number of elements, a few
hundred MiB, made once with torch) is read as an endless cyclic stream; each
tensor is the stream from its own random offset.  So no tensor is all zero,
tensors differ, and no two rows of a tensor are equal (a row of length C
starts C elements after the previous one; the pool length is a prime larger
than any row count, so equal rows would need equal offsets).  Shards are
written with ``os.pwrite`` from a thread pool (the GIL is released during
the write), straight from the pool's memory: no tensor is materialized.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import random
import re
import struct
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from fastfp8.convert import plan_shards  # greedy, in order, like save_pretrained

BF16 = 2  # bytes per element
_PIECE = 64 << 20  # bytes per pwrite


@dataclass(frozen=True)
class Spec:
    name: str
    shape: tuple[int, ...]

    @property
    def numel(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n

    @property
    def nbytes(self) -> int:
        return self.numel * BF16


# --------------------------------------------------------------------------
# model layouts


def attention_specs(p: str, hidden: int, heads: int, kv_heads: int, head_dim: int) -> list[Spec]:
    """``<p>self_attn.{q,k,v,o}_proj.weight`` of a Llama-style layer."""
    return [
        Spec(p + "self_attn.q_proj.weight", (heads * head_dim, hidden)),
        Spec(p + "self_attn.k_proj.weight", (kv_heads * head_dim, hidden)),
        Spec(p + "self_attn.v_proj.weight", (kv_heads * head_dim, hidden)),
        Spec(p + "self_attn.o_proj.weight", (hidden, heads * head_dim)),
    ]


def llama_specs(
    layers: int, hidden: int, inter: int, heads: int, kv_heads: int, head_dim: int, vocab: int
) -> list[Spec]:
    """transformers ``LlamaForCausalLM`` state-dict order and shapes."""
    s = [Spec("model.embed_tokens.weight", (vocab, hidden))]
    for i in range(layers):
        p = f"model.layers.{i}."
        s += attention_specs(p, hidden, heads, kv_heads, head_dim)
        s += [
            Spec(p + "mlp.gate_proj.weight", (inter, hidden)),
            Spec(p + "mlp.up_proj.weight", (inter, hidden)),
            Spec(p + "mlp.down_proj.weight", (hidden, inter)),
            Spec(p + "input_layernorm.weight", (hidden,)),
            Spec(p + "post_attention_layernorm.weight", (hidden,)),
        ]
    s += [Spec("model.norm.weight", (hidden,)), Spec("lm_head.weight", (vocab, hidden))]
    return s


def llama4_moe_layers(layers: int, step: int) -> list[int]:
    """Which layers are MoE: transformers' Llama4TextConfig default rule."""
    return list(range(step - 1, layers, step))


def llama4_specs(
    layers: int,
    hidden: int,
    inter: int,
    inter_mlp: int,
    heads: int,
    kv_heads: int,
    head_dim: int,
    vocab: int,
    experts: int,
    moe_layers: list[int],
) -> list[Spec]:
    """transformers ``Llama4ForCausalLM`` (text) state-dict order and shapes."""
    s = [Spec("model.embed_tokens.weight", (vocab, hidden))]
    moe = set(moe_layers)
    for i in range(layers):
        p = f"model.layers.{i}."
        s += attention_specs(p, hidden, heads, kv_heads, head_dim)
        f = p + "feed_forward."
        if i in moe:
            s += [
                Spec(f + "experts.gate_up_proj", (experts, hidden, 2 * inter)),
                Spec(f + "experts.down_proj", (experts, inter, hidden)),
                Spec(f + "router.weight", (experts, hidden)),
                Spec(f + "shared_expert.gate_proj.weight", (inter, hidden)),
                Spec(f + "shared_expert.up_proj.weight", (inter, hidden)),
                Spec(f + "shared_expert.down_proj.weight", (hidden, inter)),
            ]
        else:
            s += [
                Spec(f + "gate_proj.weight", (inter_mlp, hidden)),
                Spec(f + "up_proj.weight", (inter_mlp, hidden)),
                Spec(f + "down_proj.weight", (hidden, inter_mlp)),
            ]
        s += [
            Spec(p + "input_layernorm.weight", (hidden,)),
            Spec(p + "post_attention_layernorm.weight", (hidden,)),
        ]
    s += [Spec("model.norm.weight", (hidden,)), Spec("lm_head.weight", (vocab, hidden))]
    return s


def llama_config(a: argparse.Namespace) -> dict:
    kw = dict(
        architectures=["LlamaForCausalLM"],
        hidden_size=a.hidden,
        intermediate_size=a.intermediate,
        num_hidden_layers=a.layers,
        num_attention_heads=a.heads,
        num_key_value_heads=a.kv_heads,
        head_dim=a.head_dim,
        vocab_size=a.vocab,
        max_position_embeddings=8192,
        rms_norm_eps=1e-5,
        rope_theta=500000.0,
        tie_word_embeddings=False,
        bos_token_id=128000 if a.vocab > 128001 else 1,
        eos_token_id=128001 if a.vocab > 128001 else 2,
    )
    try:
        from transformers import LlamaConfig

        d = LlamaConfig(**kw).to_dict()
    except Exception:  # no or another transformers: a plain dict
        d = {"model_type": "llama", "hidden_act": "silu", **kw}
    d["architectures"] = ["LlamaForCausalLM"]
    d["torch_dtype"] = d["dtype"] = "bfloat16"
    return d


def llama4_config(a: argparse.Namespace) -> dict:
    kw = dict(
        hidden_size=a.hidden,
        intermediate_size=a.intermediate,
        intermediate_size_mlp=a.intermediate_mlp,
        num_hidden_layers=a.layers,
        num_attention_heads=a.heads,
        num_key_value_heads=a.kv_heads,
        head_dim=a.head_dim,
        vocab_size=a.vocab,
        num_local_experts=a.experts,
        num_experts_per_tok=1,
        interleave_moe_layer_step=a.moe_step,
        rms_norm_eps=1e-5,
        tie_word_embeddings=False,
    )
    try:
        from transformers import Llama4TextConfig

        d = Llama4TextConfig(**kw).to_dict()
    except Exception:
        d = {
            "model_type": "llama4_text",
            "hidden_act": "silu",
            "moe_layers": llama4_moe_layers(a.layers, a.moe_step),
            **kw,
        }
    d["architectures"] = ["Llama4ForCausalLM"]
    d["torch_dtype"] = d["dtype"] = "bfloat16"
    return d


# --------------------------------------------------------------------------
# data and writing


def _is_prime(n: int) -> bool:
    if n < 2 or n % 2 == 0:
        return n == 2
    f = 3
    while f * f <= n:
        if n % f == 0:
            return False
        f += 2
    return True


def make_pool(mib: int, seed: int, std: float):
    """Random bf16 pool as a uint8 numpy array; its length in elements is prime."""
    import torch

    n = max(mib << 20, 1 << 16) // BF16
    while not _is_prime(n):
        n -= 1
    g = torch.Generator().manual_seed(seed)
    pool = torch.empty(n, dtype=torch.float32)
    pool.normal_(0.0, std, generator=g)
    pool = pool.to(torch.bfloat16)
    # no exact zeros at all (bf16 rounding of tiny normals can give 0)
    pool[pool == 0] = std
    return pool.view(torch.uint8).numpy()


def _header(specs: list[Spec]) -> bytes:
    h: dict[str, object] = {"__metadata__": {"format": "pt"}}
    off = 0
    for s in specs:
        h[s.name] = {"dtype": "BF16", "shape": list(s.shape), "data_offsets": [off, off + s.nbytes]}
        off += s.nbytes
    b = json.dumps(h, separators=(",", ":")).encode()
    return b + b" " * (-len(b) % 8)  # data section 8-byte aligned, as safetensors pads


def write_checkpoint(
    out_dir: str,
    specs: list[Spec],
    config: dict,
    *,
    shard_bytes: int = 2 << 30,
    pool_mib: int = 256,
    seed: int = 0,
    std: float = 0.02,
    workers: int | None = None,
    fsync: bool = False,
) -> list[str]:
    """Write the shards, the index (if several shards) and config.json; return shard paths."""
    os.makedirs(out_dir, exist_ok=True)
    pool = make_pool(pool_mib, seed, std)
    pool_len = len(pool)  # bytes; an even number
    pool_mv = memoryview(pool)
    rng = random.Random(seed)

    shards = plan_shards(specs, shard_bytes)
    n = len(shards)
    names = ["model.safetensors"] if n == 1 else [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
    paths = [os.path.join(out_dir, nm) for nm in names]
    for p in paths:  # stale shards of an earlier run would confuse a glob
        if os.path.exists(p):
            os.unlink(p)

    fds: list[int] = []
    per_file: list[list[tuple[int, int, int, int]]] = []  # fd, file offset, pool start, length
    for path, shard in zip(paths, shards, strict=True):
        jobs: list[tuple[int, int, int, int]] = []
        per_file.append(jobs)
        header = _header(shard)
        data_len = sum(s.nbytes for s in shard)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        fds.append(fd)
        os.ftruncate(fd, 8 + len(header) + data_len)
        os.pwrite(fd, struct.pack("<Q", len(header)) + header, 0)
        pos = 8 + len(header)
        for s in shard:
            src = rng.randrange(pool_len // BF16) * BF16
            left = s.nbytes
            while left:
                k = min(left, pool_len - src, _PIECE)
                jobs.append((fd, pos, src, k))
                pos += k
                left -= k
                src = (src + k) % pool_len

    # Buffered writes to one file serialize on its inode lock (ext4, xfs):
    # interleave the files so that the threads write different files.
    jobs = [j for group in itertools.zip_longest(*per_file) for j in group if j is not None]

    def run(job: tuple[int, int, int, int]) -> None:
        fd, pos, src, k = job
        mv = pool_mv[src : src + k]
        while mv:
            w = os.pwrite(fd, mv, pos)
            mv = mv[w:]
            pos += w

    try:
        with ThreadPoolExecutor(workers or min(32, os.cpu_count() or 4)) as ex:
            for _ in ex.map(run, jobs):
                pass
            if fsync:
                list(ex.map(os.fsync, fds))
    finally:
        for fd in fds:
            os.close(fd)

    with open(os.path.join(out_dir, "config.json"), "w") as f:
        json.dump(config, f, indent=2, sort_keys=True)
    index_path = os.path.join(out_dir, "model.safetensors.index.json")
    if n > 1:
        weight_map = {s.name: nm for nm, shard in zip(names, shards, strict=True) for s in shard}
        index = {
            "metadata": {
                "total_size": sum(s.nbytes for s in specs),
                "total_parameters": sum(s.numel for s in specs),
            },
            "weight_map": dict(sorted(weight_map.items())),
        }
        with open(index_path, "w") as f:
            json.dump(index, f, indent=2)
    elif os.path.exists(index_path):
        os.unlink(index_path)
    return paths


def verify(paths: list[str], specs: list[Spec]) -> None:
    """Open every shard with safetensors.safe_open; check names, shapes,
    dtype, and that the first rows of each tensor are nonzero and differ."""
    import torch
    from safetensors import safe_open

    want = {s.name: s.shape for s in specs}
    seen: dict[str, tuple[int, ...]] = {}
    for p in paths:
        with safe_open(p, framework="pt", device="cpu") as f:
            for k in f.keys():  # noqa: SIM118
                sl = f.get_slice(k)
                seen[k] = tuple(sl.get_shape())
                if sl.get_dtype() != "BF16":
                    raise AssertionError(f"{k}: dtype {sl.get_dtype()}")
                rows = sl[:2] if len(seen[k]) > 1 else sl[:]
                if not bool((rows != 0).any()):
                    raise AssertionError(f"{k}: all zero")
                if len(seen[k]) > 1 and seen[k][0] > 1 and torch.equal(rows[0], rows[1]):
                    raise AssertionError(f"{k}: rows 0 and 1 equal")
    if seen != want:
        missing = sorted(set(want) - set(seen))[:5]
        extra = sorted(set(seen) - set(want))[:5]
        raise AssertionError(f"names/shapes differ: missing {missing}, extra {extra}")


# --------------------------------------------------------------------------
# CLI


def parse_size(text: str) -> int:
    """'2GiB', '2GB', '500MiB', '123' (bytes)."""
    m = re.fullmatch(r"\s*([0-9.]+)\s*([KMGT]?)(i?)B?\s*", text, re.IGNORECASE)
    if not m:
        raise argparse.ArgumentTypeError(f"bad size {text!r}")
    num, unit, binary = float(m.group(1)), m.group(2).upper(), bool(m.group(3))
    power = " KMGT".index(unit) if unit else 0
    return int(num * (1024 if binary else 1000) ** power)


def build(argv: list[str] | None = None) -> tuple[argparse.Namespace, list[Spec], dict]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("out_dir")
    ap.add_argument("--moe", choices=["none", "llama4"], default="none")
    ap.add_argument("--layers", type=int, help="default 32 (llama), 2 (llama4)")
    ap.add_argument("--hidden", type=int, help="default 4096 (llama), 5120 (llama4)")
    ap.add_argument("--intermediate", type=int, help="MLP / expert width; default 14336 (llama), 8192 (llama4)")
    ap.add_argument("--intermediate-mlp", type=int, default=16384, help="llama4 dense (non-MoE) layer width")
    ap.add_argument("--heads", type=int, help="default 32 (llama), 40 (llama4)")
    ap.add_argument("--kv-heads", type=int, default=8)
    ap.add_argument("--head-dim", type=int, help="default hidden/heads (llama), 128 (llama4)")
    ap.add_argument("--vocab", type=int, help="default 128256 (llama), 202048 (llama4)")
    ap.add_argument("--experts", type=int, default=16)
    ap.add_argument(
        "--moe-step",
        type=int,
        default=1,
        help="llama4 interleave_moe_layer_step (1: every layer MoE)",
    )
    ap.add_argument("--shard-size", type=parse_size, default=parse_size("2GiB"))
    ap.add_argument("--pool-mib", type=int, default=256)
    ap.add_argument("--std", type=float, default=0.02)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--workers", type=int, default=None)
    ap.add_argument("--fsync", action="store_true", help="fsync the shards before returning")
    ap.add_argument("--no-verify", action="store_true")
    a = ap.parse_args(argv)

    moe = a.moe == "llama4"
    a.layers = a.layers if a.layers is not None else (2 if moe else 32)
    a.hidden = a.hidden or (5120 if moe else 4096)
    a.intermediate = a.intermediate or (8192 if moe else 14336)
    a.heads = a.heads or (40 if moe else 32)
    a.head_dim = a.head_dim or (128 if moe else a.hidden // a.heads)
    a.vocab = a.vocab or (202048 if moe else 128256)
    if moe:
        config = llama4_config(a)
        moe_layers = config.get("moe_layers") or llama4_moe_layers(a.layers, a.moe_step)
        specs = llama4_specs(
            a.layers,
            a.hidden,
            a.intermediate,
            a.intermediate_mlp,
            a.heads,
            a.kv_heads,
            a.head_dim,
            a.vocab,
            a.experts,
            list(moe_layers),
        )
    else:
        config = llama_config(a)
        specs = llama_specs(a.layers, a.hidden, a.intermediate, a.heads, a.kv_heads, a.head_dim, a.vocab)
    return a, specs, config


def main(argv: list[str] | None = None) -> int:
    a, specs, config = build(argv)
    total = sum(s.nbytes for s in specs)
    t0 = time.perf_counter()
    paths = write_checkpoint(
        a.out_dir,
        specs,
        config,
        shard_bytes=a.shard_size,
        pool_mib=a.pool_mib,
        seed=a.seed,
        std=a.std,
        workers=a.workers,
        fsync=a.fsync,
    )
    dt = time.perf_counter() - t0
    print(
        f"wrote {len(paths)} shard(s), {len(specs)} tensors, {total / 2**30:.2f} GiB "
        f"({sum(s.numel for s in specs) / 1e9:.3f} B params) to {a.out_dir} "
        f"in {dt:.1f} s ({total / dt / 1e9:.2f} GB/s)"
    )
    if not a.no_verify:
        t0 = time.perf_counter()
        verify(paths, specs)
        print(f"verified with safetensors.safe_open in {time.perf_counter() - t0:.1f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

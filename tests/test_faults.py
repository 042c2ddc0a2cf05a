"""Faults during a load: shards deleted, truncated, grown or rewritten under the reader,
read errors from the disk (an LD_PRELOAD shim), KeyboardInterrupt at any point, CUDA out of
memory. Each must end with a clear exception (or, where what is on disk is still readable, a
correct result), with the reader's threads stopped, every staging buffer back in the pool or
freed, and no result handed back.

What each change to a shard during a load does (the tests pin it down):

- deleted (unlinked): the open file descriptor keeps the inode, so the load completes with
  the original bytes, whichever the method.
- replaced (a new file renamed over it, as most tools write): the same, the original bytes.
- truncated: ``ReadError`` naming the shard (``pread``: a short read; ``mmap``: the size
  check before each piece, or the SIGBUS guard during a copy).
- grown (bytes appended): ``pread`` reads the unchanged ranges, so the load completes;
  ``mmap`` checks the size before each piece, so ``ReadError``.
- rewritten in place with other bytes, same size: the reader reads whatever is on disk when
  it gets there, so bytes read after the rewrite are the new ones (nothing checks contents;
  safetensors has no checksums). The load completes, with a mix of old and new by position.
"""

from __future__ import annotations

import contextlib
import gc
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import fastfp8
import pytest
import torch
from conftest import make_model, native_threads, rss, shard_tensors, threads_back_to
from fastfp8 import engine
from fastfp8.checkpoint import ChunkReader
from fastfp8.pinned import POOL
from safetensors.torch import save_file

PKG = os.path.dirname(fastfp8.__file__)
METHODS = ["pread", "mmap", "direct"]
HERE = Path(__file__).parent


# ---------------------------------------------------------------------------------------
# helpers


def same_state(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for k in a:
        x, y = a[k].cpu().contiguous(), b[k].cpu().contiguous()
        assert x.dtype == y.dtype and x.shape == y.shape, k
        assert torch.equal(x.view(-1).view(torch.uint8), y.view(-1).view(torch.uint8)), k


class Baseline:
    """Native threads, staging buffers in use, RSS: taken before, compared after."""

    def __init__(self) -> None:
        from tqdm.auto import tqdm

        tqdm(disable=True).close()  # tqdm's monitor thread: one per process, started by the first bar
        gc.collect()
        self.threads = native_threads()
        self.in_use = POOL.stats()["in_use"]
        self.rss = rss()

    def check(self, what: str = "") -> None:
        gc.collect()
        assert threads_back_to(self.threads) == self.threads, f"{what}: reader threads left running"
        st = POOL.stats()
        assert st["in_use"] <= self.in_use, f"{what}: staging buffers neither returned nor freed: {st}"
        assert not POOL._lock._is_owned(), f"{what}: the pool's lock was left held"


class HookReader(ChunkReader):
    """load_quantized's reader, calling ``hook(reader, delivery)`` after each delivery."""

    hook = None

    def __init__(self, ckpt, items, **kw):
        self.items = items
        super().__init__(ckpt, items, **kw)

    def next(self):
        d = super().next()
        if d is not None and HookReader.hook is not None:
            HookReader.hook(self, d)
        return d


@pytest.fixture
def hooked(monkeypatch):
    monkeypatch.setattr(engine, "ChunkReader", HookReader)
    yield HookReader
    HookReader.hook = None


# ---------------------------------------------------------------------------------------
# shards changed during a load


def truncate(p: Path) -> None:
    os.truncate(p, p.stat().st_size // 2)


def delete(p: Path) -> None:
    p.unlink()


def grow(p: Path) -> None:
    with open(p, "ab") as f:
        f.write(b"\0" * 4096)


def rewrite_in_place(p: Path, new: bytes) -> None:
    with open(p, "r+b") as f:
        f.write(new)


def replace(p: Path, new: bytes) -> None:
    tmp = p.with_suffix(".new")
    tmp.write_bytes(new)
    os.replace(tmp, p)


FAULTS = ["truncate", "delete", "grow", "rewrite", "replace"]
APIS = ["stream", "chunks", "load"]


def expected_outcome(fault: str, method: str) -> str:
    if fault == "truncate" or (fault == "grow" and method == "mmap"):
        return "error"
    return "new" if fault == "rewrite" else "old"


def run_api(api: str, root: Path, method: str, on_shard1, hooked) -> dict[str, torch.Tensor]:
    """Loads ``root`` through ``api``, calling ``on_shard1()`` once, when the first bytes of
    shard 1 (of 3) reach the consumer. The budgets are far smaller than a shard, so nothing
    of shard 2 has been read by then."""
    fired = []

    def fire(shard: int) -> None:
        if shard >= 1 and not fired:
            fired.append(1)
            on_shard1()

    if api == "stream":
        ckpt = fastfp8.open_checkpoint(root)
        out = {}
        with ckpt.stream(memory_budget="512KiB", threads=2, method=method) as s:
            for slot in s:
                fire(slot.info.shard)
                out[slot.name] = slot.tensor.clone()
        return out
    if api == "chunks":
        ckpt = fastfp8.open_checkpoint(root)
        infos = ckpt.file_order()
        items = [(t.name, [(t.shard, t.begin, t.nbytes)]) for t in infos]
        raw = {t.name: bytearray(t.nbytes) for t in infos}
        with ChunkReader(ckpt, items, memory_budget="256KiB", chunk_bytes=64 << 10, threads=2, method=method,
                         piece_bytes=16 << 10) as r:
            while (d := r.next()) is not None:
                item, off, buf, n = d
                fire(infos[item].shard)
                raw[infos[item].name][off:off + n] = r.view(buf, n).numpy().tobytes()
                r.release(buf, n)
        return {t.name: torch.frombuffer(raw[t.name], dtype=torch.uint8).view(t.torch_dtype).reshape(t.shape)
                for t in infos}
    hooked.hook = lambda r, d: fire(r.items[d[0]][1][0][0] if r.items[d[0]][1] else 0)
    return dict(fastfp8.load_quantized(root, device="cpu", memory_budget="512KiB", chunk_bytes="64KiB",
                                       threads=2, method=method))


@pytest.mark.parametrize("fault", FAULTS)
@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("api", APIS)
def test_shard_changed_during_load(tmp_path, hooked, api, method, fault):
    _, paths = make_model(tmp_path / "m")
    # The "new" bytes of shard 2: same names, shapes and dtypes (the same header), other values.
    new_shard = shard_tensors(2, torch.Generator().manual_seed(99))
    save_file(new_shard, str(tmp_path / "new.safetensors"))
    new = (tmp_path / "new.safetensors").read_bytes()
    assert len(new) == paths[2].stat().st_size
    # What a correct load returns when it reads shard 2 before or after the change.
    ref_old, ref_new = tmp_path / "ref_old", tmp_path / "ref_new"
    shutil.copytree(tmp_path / "m", ref_old)
    shutil.copytree(tmp_path / "m", ref_new)
    (ref_new / paths[2].name).write_bytes(new)

    def reference(root: Path) -> dict[str, torch.Tensor]:
        HookReader.hook = None
        return run_api(api, root, method, lambda: None, hooked)

    want = {"old": reference(ref_old), "new": reference(ref_new)}
    action = {"truncate": truncate, "delete": delete, "grow": grow,
              "rewrite": lambda p: rewrite_in_place(p, new), "replace": lambda p: replace(p, new)}[fault]
    base = Baseline()
    outcome = expected_outcome(fault, method)
    if outcome == "error":
        with pytest.raises(fastfp8.ReadError) as info:
            run_api(api, tmp_path / "m", method, lambda: action(paths[2]), hooked)
        assert str(paths[2]) in str(info.value)
        del info
    else:
        got = run_api(api, tmp_path / "m", method, lambda: action(paths[2]), hooked)
        same_state(got, want[outcome])
        del got
    base.check(f"{api}/{method}/{fault}")


@pytest.mark.parametrize("method", METHODS)
def test_load_of_truncated_shard_returns_nothing(tmp_path, hooked, method):
    """A failed load hands back no partial result, and a following load of a good copy works."""
    _, paths = make_model(tmp_path / "m")
    shutil.copytree(tmp_path / "m", tmp_path / "good")
    good = fastfp8.load_quantized(tmp_path / "good", device="cpu", method=method)
    result = None
    hooked.hook = lambda r, d: truncate(paths[2]) if d[0] == 3 else None
    with pytest.raises(fastfp8.ReadError):
        result = fastfp8.load_quantized(tmp_path / "m", device="cpu", memory_budget="512KiB",
                                        chunk_bytes="64KiB", method=method)
    assert result is None
    hooked.hook = None
    same_state(fastfp8.load_quantized(tmp_path / "good", device="cpu", method=method), good)


def test_convert_fault_leaves_no_partial_output(tmp_path, hooked, monkeypatch):
    """A convert that fails midway (a shard truncated under it, or an interrupt) leaves
    neither the destination nor its temporary directory behind."""
    from fastfp8 import convert as conv

    _, paths = make_model(tmp_path / "m")
    (tmp_path / "m" / "config.json").write_text('{"model_type": "custom"}')
    dst = tmp_path / "out"
    HookReader.hook = lambda r, d: truncate(paths[2]) if d[0] == 3 else None
    base = Baseline()
    with pytest.raises(fastfp8.ReadError):
        conv.convert(tmp_path / "m", dst, memory_budget="512KiB", max_shard_size="1MB", layout="names")
    assert not dst.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]
    make_model(tmp_path / "m")

    def interrupt(r, d):
        if d[0] == 9:
            raise KeyboardInterrupt

    HookReader.hook = interrupt
    with pytest.raises(KeyboardInterrupt):
        conv.convert(tmp_path / "m", dst, memory_budget="512KiB", max_shard_size="1MB", layout="names")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]
    base.check("convert")


def test_rewrite_during_stream_reads_new_bytes_after_the_point(tmp_path):
    """Documents the rewrite case precisely, tensor by tensor, with one reader thread."""
    src, paths = make_model(tmp_path / "m", shards=1)
    ckpt = fastfp8.open_checkpoint(tmp_path / "m")
    new_vals = shard_tensors(0, torch.Generator().manual_seed(7))
    save_file(new_vals, str(tmp_path / "n.safetensors"))
    new = (tmp_path / "n.safetensors").read_bytes()
    names = [t.name for t in ckpt.file_order()]
    seen = {}
    with ckpt.stream(memory_budget="256KiB", threads=1, method="pread") as s:  # one tensor in flight
        for i, (name, t) in enumerate(s):
            seen[name] = t.clone()
            if i == 1:
                rewrite_in_place(paths[0], new)
    for i, name in enumerate(names):
        # The budget holds one tensor: tensor 2 is read only once tensor 1's slot is released.
        want = src[name] if i <= 1 else new_vals[name]
        assert torch.equal(seen[name].view(torch.int16), want.view(torch.int16)), (i, name)


@pytest.mark.parametrize("kind", ["fifo", "directory"])
def test_shard_that_is_not_a_file_is_a_checkpoint_error_promptly(tmp_path, kind):
    """A hostile index naming a FIFO (whose open() would wait for a writer forever) or a
    directory as a shard: a fastfp8.CheckpointError, at once."""
    make_model(tmp_path / "m", shards=1)
    target = tmp_path / "m" / "x.safetensors"
    if kind == "fifo":
        os.mkfifo(target)
    else:
        target.mkdir()
    index = tmp_path / "m" / "model.safetensors.index.json"
    weight_map = json.loads(index.read_text())["weight_map"]
    weight_map[next(iter(weight_map))] = "x.safetensors"
    index.write_text(json.dumps({"weight_map": weight_map}))
    code = textwrap.dedent(f"""
        import fastfp8
        try:
            fastfp8.open_checkpoint({str(tmp_path / "m")!r})
        except BaseException as e:
            print(type(e).__name__, isinstance(e, fastfp8.CheckpointError), e)
    """)
    try:
        r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=15)
    except subprocess.TimeoutExpired:
        pytest.fail(f"opening a checkpoint whose index names a {kind} hangs")
    assert r.stdout.startswith("CheckpointError True") and "x.safetensors" in r.stdout, (r.stdout, r.stderr)


@pytest.mark.xfail(strict=True, reason="Checkpoint.get returns a zero-copy view of a file mapping: touching it "
                   "after the file shrank raises SIGBUS in the process (a documented limitation; the "
                   "streamed paths are guarded)")
def test_get_view_of_a_truncated_file_does_not_kill_the_process(tmp_path):
    save_file({"w": torch.randn(1 << 20)}, str(tmp_path / "w.safetensors"))
    code = textwrap.dedent(f"""
        import os, fastfp8
        ckpt = fastfp8.open_checkpoint({str(tmp_path / "w.safetensors")!r})
        t = ckpt.get("w")
        os.truncate({str(tmp_path / "w.safetensors")!r}, 4096)
        print(float(t.sum()))
    """)
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, timeout=120)
    assert r.returncode == 0, (r.returncode, r.stderr.decode()[-500:])


# ---------------------------------------------------------------------------------------
# read errors from the disk: an LD_PRELOAD shim


@pytest.fixture(scope="module")
def shim(tmp_path_factory) -> Path:
    cc = shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")
    if cc is None:
        pytest.skip("no C compiler for the fault-injection shim")
    out = tmp_path_factory.mktemp("shim") / "shim.so"
    r = subprocess.run([cc, "-shared", "-fPIC", "-o", str(out), str(HERE / "fault_shim.c"), "-ldl"],
                       capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip(f"cannot build the shim: {r.stderr[-500:]}")
    return out


SHIM_SCRIPT = textwrap.dedent("""
    import collections, gc, json, os, sys
    import fastfp8
    from fastfp8.pinned import POOL
    root, api = sys.argv[1], sys.argv[2]
    threads = lambda: len(os.listdir("/proc/self/task"))
    import torch
    x = torch.randn(512, 512)
    (x @ x).clone().sum()  # start torch's own threads first, and tqdm's monitor
    from tqdm.auto import tqdm
    tqdm(disable=True).close()
    base = threads()
    names = lambda: sorted(open(f"/proc/self/task/{t}/comm").read().strip() for t in os.listdir("/proc/self/task"))
    before = names()
    out = {"error": None}
    try:
        if api == "open":
            fastfp8.open_checkpoint(root)
        elif api == "stream":
            for _, t in fastfp8.open_checkpoint(root).stream(memory_budget="512KiB", threads=2, method="pread"):
                t.clone()
        else:
            fastfp8.load_quantized(root, device="cpu", memory_budget="512KiB", chunk_bytes="64KiB", threads=2,
                                   method="pread")
    except BaseException as e:
        out["error"] = type(e).__name__
        out["fastfp8_error"] = isinstance(e, fastfp8.Error)
        out["message"] = str(e)
    gc.collect()
    out["threads_left"] = threads() - base
    out["new_threads"] = sorted((collections.Counter(names()) - collections.Counter(before)).elements())
    out["in_use"] = POOL.stats()["in_use"]
    print(json.dumps(out))
""")


def run_with_shim(shim: Path, root: Path, api: str, marker: str, after: int) -> dict:
    env = dict(os.environ, LD_PRELOAD=str(shim), FASTFP8_FAULT_MARKER=marker, FASTFP8_FAULT_AFTER=str(after))
    r = subprocess.run([sys.executable, "-c", SHIM_SCRIPT, str(root), api], env=env, capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    return json.loads(r.stdout.strip().splitlines()[-1])


def test_shim_works(shim, tmp_path):
    p = tmp_path / "marked.bin"
    p.write_bytes(b"0123456789")
    code = f"import os; fd = os.open({str(p)!r}, os.O_RDONLY); print(os.pread(fd, 10, 0)); os.pread(fd, 1, 6)"
    env = dict(os.environ, LD_PRELOAD=str(shim), FASTFP8_FAULT_MARKER="marked", FASTFP8_FAULT_AFTER="6")
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60)
    assert "b'012345'" in r.stdout and "Input/output error" in r.stderr, (r.stdout, r.stderr)


@pytest.mark.parametrize("api", ["stream", "load"])
def test_disk_read_error_is_a_read_error_naming_the_file(shim, tmp_path, api):
    _, paths = make_model(tmp_path / "m")
    target = paths[1]
    # Fail in the middle of shard 1's data: the header and the first tensors read fine.
    out = run_with_shim(shim, tmp_path / "m", api, target.name, target.stat().st_size // 2)
    assert out["error"] == "ReadError" and out["fastfp8_error"], out
    assert str(target) in out["message"] and "Input/output error" in out["message"], out
    assert out["threads_left"] == 0 and out["in_use"] == 0, out


@pytest.mark.parametrize("marker", ["model-00002-of-00003", "model.safetensors.index.json"])
def test_disk_read_error_while_opening(shim, tmp_path, marker):
    make_model(tmp_path / "m")
    out = run_with_shim(shim, tmp_path / "m", "open", marker, 0)
    assert out["error"] == "ReadError" and out["fastfp8_error"], out
    assert marker in out["message"] and "Input/output error" in out["message"], out


def test_no_fault_under_the_shim_loads_normally(shim, tmp_path):
    make_model(tmp_path / "m")
    out = run_with_shim(shim, tmp_path / "m", "load", "no-such-file", 0)
    assert out["error"] is None, out


# ---------------------------------------------------------------------------------------
# KeyboardInterrupt at any point


def small_model(root: Path) -> dict[str, torch.Tensor]:
    src, _ = make_model(root, shards=2, rows=128, cols=256, n=3)
    return src


def load_small(root: Path) -> dict[str, torch.Tensor]:
    return dict(fastfp8.load_quantized(root, device="cpu", memory_budget="256KiB", chunk_bytes="32KiB", threads=2))


def stream_small(root: Path) -> dict[str, torch.Tensor]:
    with fastfp8.open_checkpoint(root).stream(memory_budget="256KiB", threads=2) as s:
        return {n: t.clone() for n, t in s}


def with_config(root: Path) -> Path:
    """Gives ``root`` the config.json convert needs (an architecture fastfp8 does not know:
    converted with ``layout="names"``)."""
    (root / "config.json").write_text('{"model_type": "custom"}')
    return root


def load_converted(dst: Path) -> dict[str, torch.Tensor]:
    return dict(fastfp8.load_quantized(dst, device="cpu", default_ignore=False, ignore=["re:.*"], layout="names"))


def convert_small(root: Path) -> dict[str, torch.Tensor]:
    from fastfp8.convert import convert

    dst = root.parent / "converted"
    try:
        convert(with_config(root), dst, memory_budget="256KiB", max_shard_size="100KB", layout="names")
        return load_converted(dst)
    finally:
        shutil.rmtree(dst, ignore_errors=True)


def weights_small(root: Path) -> dict[str, torch.Tensor]:
    """The vLLM plugin's weight stream (what ``model.load_weights`` receives)."""
    from fastfp8 import vllm_plugin as vp

    return {n: t.clone() for n, t in vp.iter_weights(root, vp.parse_options({"memory_budget": "256KiB"}),
                                                     device="cpu")}


class Interrupted(KeyboardInterrupt):
    pass


@pytest.mark.parametrize("api", ["load", "convert", "weights"])
def test_interrupt_at_every_named_point(tmp_path, monkeypatch, api):
    """KeyboardInterrupt at the engine's named points (allocating a job's outputs, queueing a
    copy, quantizing, handing a job over, finishing), at the first, second, middle and last
    time each is reached, for every entry point: it propagates, and afterwards no reader
    thread runs, no staging buffer is stuck, the pool's lock is free, convert leaves nothing
    behind, memory does not grow, and the next run gives the same bytes."""
    root = tmp_path / "m"
    small_model(root)
    run = {"load": load_small, "convert": convert_small, "weights": weights_small}[api]
    want = run(root)
    seen: dict[str, int] = {}
    monkeypatch.setattr(engine, "FAULT_HOOK", lambda point, job: seen.__setitem__(point, seen.get(point, 0) + 1))
    run(root)
    assert set(seen) == set(engine.FAULT_POINTS), seen
    base = Baseline()
    tried = 0
    for point, count in seen.items():
        for at in sorted({1, 2, (count + 1) // 2, count} & set(range(1, count + 1))):
            hits = {"n": 0}

            def hook(p, job, point=point, at=at, hits=hits):
                if p == point:
                    hits["n"] += 1
                    if hits["n"] == at:
                        raise Interrupted(f"{point} #{at}")

            monkeypatch.setattr(engine, "FAULT_HOOK", hook)
            with pytest.raises(Interrupted):
                run(root)
            tried += 1
            base.check(f"{api}: interrupted at {point} #{at} of {count}")
            if api == "convert":
                assert sorted(p.name for p in tmp_path.iterdir()) == ["m"], (point, at)
    monkeypatch.setattr(engine, "FAULT_HOOK", None)
    growth = rss() - base.rss
    print(f"\n{api}: interrupted at {tried} points; RSS {growth / 2**20:+.1f} MiB")
    assert growth < 64 << 20
    same_state(run(root), want)


@pytest.mark.parametrize("api", ["load", "stream"])
def test_out_of_memory_at_every_allocation(tmp_path, monkeypatch, api):
    """Every ``torch.empty`` a load makes (staging, pooled buffers, outputs) fails in turn with
    torch.OutOfMemoryError, as an allocator that has run dry would: the error reaches the
    caller as it is, no reader thread, staging buffer or lock is left behind, and the next
    load gives the same bytes. (On CUDA the same, with queued work drained first:
    test_cuda_out_of_memory_mid_load.)"""
    root = tmp_path / "m"
    small_model(root)
    run = {"load": load_small, "stream": stream_small}[api]
    want = run(root)
    real_empty = torch.empty
    calls = {"n": 0, "fail_at": None}

    def empty(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == calls["fail_at"]:
            raise torch.OutOfMemoryError(f"injected: allocation {calls['n']} failed")
        return real_empty(*args, **kwargs)

    monkeypatch.setattr(torch, "empty", empty)
    POOL.clear()  # idle pooled buffers would be reused, not allocated
    run(root)
    total = calls["n"]
    assert total >= 1, total
    base = Baseline()
    for at in range(1, total + 1):
        calls.update(n=0, fail_at=at)
        POOL.clear()
        with pytest.raises(torch.OutOfMemoryError, match=f"allocation {at} failed"):
            run(root)
        base.check(f"{api}: allocation {at} of {total} failed")
    calls["fail_at"] = None
    same_state(run(root), want)


def sigint_loop(run, duration: float, *, seed: int, check, n: int = 30) -> int:
    """Runs ``run()`` ``n`` times with a SIGINT sent at a random moment of it (or just
    after), calling ``check()`` after each; returns how many were interrupted mid-load."""
    rng = random.Random(seed)
    interrupted = 0
    for _ in range(n):
        timer = threading.Timer(rng.uniform(0, duration * 1.2), os.kill, (os.getpid(), signal.SIGINT))
        got = None
        try:
            timer.start()
            got = run()
            timer.join()
            time.sleep(0.05)  # a late signal lands here, inside the try
        except KeyboardInterrupt:
            interrupted += got is None
            timer.join()
        del got
        check()
    return interrupted


def interrupt_after(monkeypatch, owner, name: str, when) -> list[str]:
    """Makes ``owner.name(...)`` raise KeyboardInterrupt right after it has done its work,
    the first time ``when(*args)`` holds: what a Ctrl-C does when it lands as that call
    returns. Returns a list that records the call it interrupted."""
    orig = getattr(owner, name)
    fired: list[str] = []

    def wrapper(*args, **kwargs):
        out = orig(*args, **kwargs)
        if not fired and when(*args):
            fired.append(f"{name}{tuple(str(a) for a in args)}")
            raise KeyboardInterrupt(fired[0])
        return out

    monkeypatch.setattr(owner, name, wrapper)
    return fired


class _Os:
    """The os module, with attributes that can be replaced for one module only."""

    def __getattr__(self, name):
        return getattr(os, name)


@pytest.mark.parametrize("where", ["after-mkdir", "after-moving-old-aside", "after-moving-new-in"])
def test_convert_interrupted_at_its_critical_points(tmp_path, monkeypatch, where):
    """Ctrl-C right after convert creates its temporary directory, or between the renames
    that swap the new checkpoint in (overwrite=True): afterwards the destination is the
    previous checkpoint or the new one, complete, and nothing else is left beside it."""
    from fastfp8 import convert as conv

    root = tmp_path / "m"
    small_model(root)
    with_config(root)
    dst = tmp_path / "out"
    conv.convert(root, dst, memory_budget="256KiB", max_shard_size="100KB", layout="names")
    old = load_converted(dst)
    monkeypatch.setattr(conv, "os", _Os())
    if where == "after-mkdir":
        fired = interrupt_after(monkeypatch, Path, "mkdir", lambda p, *a: ".tmp-" in p.name)
    elif where == "after-moving-old-aside":
        fired = interrupt_after(monkeypatch, conv.os, "rename", lambda a, b: ".old-" in Path(b).name)
    else:
        fired = interrupt_after(monkeypatch, conv.os, "rename", lambda a, b: ".tmp-" in Path(a).name)
    with contextlib.suppress(KeyboardInterrupt):
        conv.convert(root, dst, memory_budget="256KiB", max_shard_size="100KB", overwrite=True, layout="names")
    monkeypatch.undo()
    assert fired
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m", "out"], f"left behind by Ctrl-C {where}"
    got = load_converted(dst)
    same_state(got, old)  # the old and the new checkpoint hold the same tensors: either is complete


def big_model(root: Path) -> None:
    make_model(root, shards=2, rows=1024, cols=1024, n=8)  # 32 MiB


@pytest.mark.parametrize("api", ["load", "stream"])
def test_interrupt_signal_at_random_times(tmp_path, api):
    """SIGINT at random moments of a load (so also inside the native waits)."""
    root = tmp_path / "m"
    big_model(root)

    def run():
        if api == "load":
            return fastfp8.load_quantized(root, device="cpu", memory_budget="4MiB", chunk_bytes="1MiB", threads=2)
        with fastfp8.open_checkpoint(root).stream(memory_budget="4MiB", threads=2) as s:
            return {n: t.clone() for n, t in s}

    duration = float("inf")
    for _ in range(3):  # the fastest of three: a run slowed by a busy machine would send the
        t0 = time.perf_counter()  # signals after most loads have finished
        run()
        duration = min(duration, time.perf_counter() - t0)
    base = Baseline()
    interrupted = sigint_loop(run, duration, seed=1234, check=lambda: base.check(f"{api}: SIGINT"))
    assert interrupted >= 10
    growth = rss() - base.rss
    print(f"\n{api}: a load takes {duration * 1e3:.0f} ms; {interrupted}/30 interrupted mid-load, "
          f"RSS {growth / 2**20:+.1f} MiB")
    assert growth < 64 << 20


# ---------------------------------------------------------------------------------------
# CUDA


def cuda_model(root: Path, rows=1024, cols=2048, n=16) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(3)
    ts = {f"model.layers.{i}.mlp.down_proj.weight": torch.randn(rows, cols, generator=gen).to(torch.bfloat16)
          for i in range(n)}
    ts["model.norm.weight"] = torch.randn(cols, generator=gen).to(torch.bfloat16)
    root.mkdir(parents=True, exist_ok=True)
    save_file(ts, str(root / "model.safetensors"))
    return ts


@pytest.mark.cuda
def test_cuda_out_of_memory_mid_load(tmp_path, monkeypatch):
    """OOM partway through a CUDA load: torch.OutOfMemoryError, then GPU memory, threads and
    staging buffers back where they were, and a normal load afterwards gives the same bytes."""
    root = tmp_path / "m"
    cuda_model(root)  # 16 x 4 MiB bf16 -> 16 x 2 MiB fp8
    want = dict(fastfp8.load_quantized(root, device="cuda", memory_budget="16MiB", chunk_bytes="1MiB"))
    want = {k: v.cpu() for k, v in want.items()}
    torch.cuda.synchronize()
    gc.collect()
    torch.cuda.empty_cache()
    allocated = torch.cuda.memory_allocated()
    base = Baseline()
    made = []
    orig = engine.StateSink.outputs

    def counting(self, job):
        out = orig(self, job)
        made.append(job.target.weight_name)
        return out

    monkeypatch.setattr(engine.StateSink, "outputs", counting)
    total = torch.cuda.get_device_properties(0).total_memory
    # Room for what is allocated now, the two 4 MiB staging buffers and about half the output.
    allow = torch.cuda.memory_reserved() + 2 * (4 << 20) + 16 * (2 << 20) // 2
    torch.cuda.set_per_process_memory_fraction(allow / total)
    try:
        with pytest.raises(torch.OutOfMemoryError):
            fastfp8.load_quantized(root, device="cuda", memory_budget="16MiB", chunk_bytes="1MiB")
    finally:
        torch.cuda.set_per_process_memory_fraction(1.0)
    assert 0 < len(made) < 17, made  # it failed partway
    torch.cuda.synchronize()
    base.check("cuda OOM")
    assert torch.cuda.memory_allocated() == allocated
    monkeypatch.undo()
    same_state(fastfp8.load_quantized(root, device="cuda", memory_budget="16MiB", chunk_bytes="1MiB"), want)


@pytest.mark.cuda
def test_cuda_error_mid_load_leaves_no_copy_writing_into_freed_memory(tmp_path, monkeypatch):
    """An exception while a host-to-device copy is still queued on the loader's copy stream:
    the destination (allocated on the current stream) is freed as the exception unwinds, and
    the caching allocator hands it straight back to the next allocation on the current
    stream. Unless the loader waits for its streams on the way out, the queued copy then
    writes into that new tensor."""
    n = 1 << 30
    root = tmp_path / "m"
    root.mkdir()
    save_file({"model.embed_tokens.weight": torch.full((n // 2,), 1.0, dtype=torch.bfloat16)},
              str(root / "model.safetensors"))  # copied as it is: one 1 GiB copy into the output
    ptrs = []
    orig = engine.StateSink.outputs

    def recording(self, job):
        out = orig(self, job)
        ptrs.extend(t.data_ptr() for t in self.state.values())
        return out

    class Boom(Exception):
        pass

    class Bar:
        def update(self, n):
            raise Boom("injected right after the copy was queued")

        def close(self):
            pass

    monkeypatch.setattr(engine.StateSink, "outputs", recording)
    monkeypatch.setattr(engine, "progress_bar", lambda *a, **k: Bar())
    torch.cuda.synchronize()
    failures = 0
    for _ in range(3):
        with contextlib.suppress(Boom):
            fastfp8.load_quantized(root, device="cuda", memory_budget="4GiB", chunk_bytes="1GiB")
        x = torch.empty(n, dtype=torch.uint8, device="cuda")
        x.fill_(0x5A)
        torch.cuda.synchronize()
        if x.data_ptr() == ptrs[-1] and not bool((x == 0x5A).all()):
            failures += 1
        del x
    assert failures == 0, f"{failures}/3: a copy queued before the error overwrote a new tensor"


@pytest.mark.cuda
def test_cuda_interrupt_signal_at_random_times(tmp_path):
    root = tmp_path / "m"
    cuda_model(root, n=32)

    def run():
        return fastfp8.load_quantized(root, device="cuda", memory_budget="16MiB", chunk_bytes="1MiB")

    want = {k: v.cpu() for k, v in run().items()}
    duration = float("inf")
    for _ in range(3):  # the fastest of three, as on the CPU: one run slowed by the suite's
        t0 = time.perf_counter()  # other workers on the GPU sent most signals after the loads
        run()
        duration = min(duration, time.perf_counter() - t0)
    torch.cuda.synchronize()
    gc.collect()
    allocated = torch.cuda.memory_allocated()
    base = Baseline()

    def check():
        torch.cuda.synchronize()
        base.check("cuda SIGINT")
        assert torch.cuda.memory_allocated() == allocated

    assert sigint_loop(run, duration, seed=77, check=check) >= 5
    same_state(run(), want)

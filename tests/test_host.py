"""fastfp8.host: the host's cache, cores and NUMA nodes, read from (fake) sysfs, and the
reader threads placed on the GPU's node."""

from __future__ import annotations

import os
import time
import types
from pathlib import Path

import pytest
import torch
from fastfp8 import engine, host
from fastfp8.checkpoint import ChunkReader, open_checkpoint
from safetensors.torch import save_file

MiB = 1 << 20


def write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def test_last_level_cache_from_sysfs(tmp_path):
    cache = tmp_path / "cpu0" / "cache"
    for i, (level, kind, size) in enumerate([(1, "Data", "48K"), (1, "Instruction", "32K"), (2, "Unified", "2048K"),
                                             (3, "Unified", "307200K")]):
        write(cache / f"index{i}" / "level", f"{level}\n")
        write(cache / f"index{i}" / "type", f"{kind}\n")
        write(cache / f"index{i}" / "size", f"{size}\n")
    write(cache / "index9" / "level", "x\n")  # unreadable entries are skipped
    assert host.last_level_cache_bytes.__wrapped__(str(tmp_path)) == 300 * MiB
    assert host.last_level_cache_bytes.__wrapped__(str(tmp_path / "none")) is None


@pytest.mark.parametrize("llc, want", [(300 * MiB, (128 * MiB, 8 * MiB)), (32 * MiB, (64 * MiB, 4 * MiB)),
                                       (4 << 30, (512 * MiB, 32 * MiB)), (None, (256 * MiB, 16 * MiB))])
def test_default_staging_follows_the_cache(llc, want):
    assert host.default_staging(llc) == want


@pytest.mark.parametrize("llc, want", [(300 * MiB, (64 * MiB, 4 * MiB)), (32 * MiB, (64 * MiB, 4 * MiB)),
                                       (4 << 30, (256 * MiB, 16 * MiB)), (None, (128 * MiB, 8 * MiB))])
def test_an_fp8_ring_is_half_as_large_and_at_least_64_mib(llc, want):
    assert host.default_staging(llc, fp8=True) == want


def test_staged_options_size_the_ring_for_where_the_load_quantizes(monkeypatch):
    """Not given: the budget and chunks follow the cache and ``quantize_on`` (e4m3 in the
    ring: half the size); given ones are kept (a chunk at most a quarter of the budget)."""
    from fastfp8.options import LoadOptions

    monkeypatch.setattr(host, "last_level_cache_bytes", lambda: 300 * MiB)
    auto = LoadOptions.make()
    assert (auto.memory_budget, auto.chunk_bytes) == (None, None)
    for where, want in [("host", (64 * MiB, 4 * MiB)), ("device", (128 * MiB, 8 * MiB)),
                        ("adaptive", (128 * MiB, 8 * MiB)), ("split", (128 * MiB, 8 * MiB))]:
        staged = LoadOptions.make(quantize_on=where).staged()
        assert (staged.memory_budget, staged.chunk_bytes) == want, where
        assert staged.staged() is staged
    given = LoadOptions.make(quantize_on="host", memory_budget="1GiB").staged()
    assert (given.memory_budget, given.chunk_bytes) == (1 << 30, 64 * MiB)
    chunk_only = LoadOptions.make(quantize_on="host", chunk_bytes="32MiB").staged()
    assert (chunk_only.memory_budget, chunk_only.chunk_bytes) == (64 * MiB, 16 * MiB)
    small = LoadOptions.make(memory_budget="64KiB")
    assert (small.memory_budget, small.chunk_bytes) == (64 * 1024, 16 * 1024)


def test_cpulists():
    assert host.parse_cpulist("0-3,8,10-11\n") == {0, 1, 2, 3, 8, 10, 11}
    assert host.parse_cpulist("") == set()
    for bad in ("3-1", "a", "1-b"):
        with pytest.raises(ValueError):
            host.parse_cpulist(bad)


def test_node_cpus_and_the_gpus_node_from_sysfs(tmp_path, monkeypatch):
    write(tmp_path / "node" / "node1" / "cpulist", "16-31\n")
    write(tmp_path / "node" / "node2" / "cpulist", "junk\n")
    assert host.node_cpus(1, str(tmp_path / "node")) == set(range(16, 32))
    assert host.node_cpus(2, str(tmp_path / "node")) is None
    assert host.node_cpus(3, str(tmp_path / "node")) is None

    props = types.SimpleNamespace(pci_domain_id=0, pci_bus_id=0x1B, pci_device_id=0)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda d: props)
    write(tmp_path / "pci" / "0000:1b:00.0" / "numa_node", "1\n")
    assert host.gpu_numa_node(torch.device("cuda", 0), str(tmp_path / "pci")) == 1
    write(tmp_path / "pci" / "0000:1b:00.0" / "numa_node", "-1\n")  # a host of one node
    assert host.gpu_numa_node(torch.device("cuda", 0), str(tmp_path / "pci")) is None
    props.pci_bus_id = 0x2C  # no such device in sysfs
    assert host.gpu_numa_node(torch.device("cuda", 0), str(tmp_path / "pci")) is None

    def no_gpu(d):
        raise RuntimeError("no CUDA")

    monkeypatch.setattr(torch.cuda, "get_device_properties", no_gpu)
    assert host.gpu_numa_node(torch.device("cuda", 0), str(tmp_path / "pci")) is None


def test_reader_cpus_are_the_gpus_node_within_the_process_mask(monkeypatch):
    cuda = torch.device("cuda", 0)
    allowed = set(range(64))
    monkeypatch.setattr(host.os, "sched_getaffinity", lambda pid: set(allowed))
    monkeypatch.setattr(host, "gpu_numa_node", lambda d: 1)
    monkeypatch.setattr(host, "node_cpus", lambda n: set(range(32, 64)) if n == 1 else None)
    monkeypatch.delenv("FASTFP8_NUMA", raising=False)
    assert host.reader_cpus(cuda) == set(range(32, 64))
    assert host.reader_cpus(torch.device("cpu")) is None
    monkeypatch.setenv("FASTFP8_NUMA", "0")
    assert host.reader_cpus(cuda) is None
    monkeypatch.delenv("FASTFP8_NUMA")
    allowed = set(range(32, 64))  # already confined to the node (numactl): nothing to do
    assert host.reader_cpus(cuda) is None
    allowed = set(range(0, 32))  # confined elsewhere: the process's own choice stands
    assert host.reader_cpus(cuda) is None
    allowed = set(range(16, 48))  # half on the node: that half
    assert host.reader_cpus(cuda) == set(range(32, 48))
    allowed = set(range(0, 35))  # three of the node's CPUs: too few, the readers stay
    assert host.reader_cpus(cuda) is None
    monkeypatch.setattr(host, "gpu_numa_node", lambda d: None)
    assert host.reader_cpus(cuda) is None


def reader_thread_cpus(old: dict[str, str]) -> dict[str, str]:
    """Cpus_allowed_list of this process's fastfp8 reader threads not in ``old`` (those of
    earlier readers), by thread name; waits up to 5 s for threads that have just started to
    take their names."""
    deadline = time.monotonic() + 5
    while not (found := {k: v for k, v in _reader_thread_cpus().items() if k not in old}):
        if time.monotonic() > deadline:
            break
        time.sleep(0.01)
    return found


def _reader_thread_cpus() -> dict[str, str]:
    out = {}
    for task in Path("/proc/self/task").iterdir():
        try:
            name = (task / "comm").read_text().strip()
            status = (task / "status").read_text()
        except OSError:  # a thread that just ended
            continue
        if name.startswith("fastfp8-read"):
            out[f"{name}/{task.name}"] = next(line.split(":", 1)[1].strip() for line in status.splitlines()
                                             if line.startswith("Cpus_allowed_list"))
    return out


def test_the_reader_threads_start_on_the_given_cpus_and_the_caller_gets_its_own_back(tmp_path):
    save_file({"w": torch.randn(512, 512)}, str(tmp_path / "m.safetensors"))
    ckpt = open_checkpoint(tmp_path / "m.safetensors")
    before = os.sched_getaffinity(0)
    one = min(before)
    old = _reader_thread_cpus()
    with host.on_cpus({one}):
        assert os.sched_getaffinity(0) == {one}
        t = ckpt.info("w")
        # a ring of a quarter of the tensor: the threads wait for releases, alive until then
        reader = ChunkReader(ckpt, [("w", [(t.shard, t.begin, t.nbytes)])], memory_budget="256KiB",
                             chunk_bytes=64 << 10, threads=2)
    try:
        assert os.sched_getaffinity(0) == before
        cpus = reader_thread_cpus(old)
        assert cpus and set(cpus.values()) == {str(one)}, cpus
        while (d := reader.next()) is not None:
            reader.release(d[2], d[3])
    finally:
        reader.close()
    with host.on_cpus(None):
        assert os.sched_getaffinity(0) == before
    with pytest.raises(KeyError), host.on_cpus({one}):
        raise KeyError("the mask is restored on the way out of an error too")
    assert os.sched_getaffinity(0) == before


def test_a_load_reads_on_the_cpus_reader_cpus_names(tmp_path, monkeypatch):
    """engine.open_reader runs the reader (threads and ring) under on_cpus(reader_cpus(device))."""
    save_file({"model.layers.0.mlp.down_proj.weight": torch.randn(256, 256).to(torch.bfloat16)},
              str(tmp_path / "model.safetensors"))
    one = min(os.sched_getaffinity(0))
    seen = []

    def spy_cpus(device):
        seen.append(device)
        return {one}

    monkeypatch.setattr(host, "reader_cpus", spy_cpus)
    ckpt = open_checkpoint(tmp_path / "model.safetensors")
    # a ring smaller than the tensor: the threads wait for releases, alive until then
    opts = engine.LoadOptions.make(layout="names", threads=2, method="pread", memory_budget="64KiB",
                                   chunk_bytes="16KiB")
    from fastfp8.plan import make_plan

    plan = make_plan(ckpt, opts)
    old = _reader_thread_cpus()
    reader, _, _ = engine.open_reader(ckpt, plan, opts, torch.device("cpu"), "eager")
    try:
        assert seen == [torch.device("cpu")]
        cpus = reader_thread_cpus(old)
        assert cpus and set(cpus.values()) == {str(one)}, cpus
    finally:
        reader.close()


@pytest.mark.cuda
def test_the_gpus_node_on_this_machine():
    dev = torch.device("cuda", 0)
    node = host.gpu_numa_node(dev)
    assert node is None or node >= 0
    cpus = host.reader_cpus(dev)
    assert cpus is None or (cpus and cpus < os.sched_getaffinity(0)), (node, cpus)


def test_topology_from_sysfs(tmp_path, monkeypatch):
    """Two sockets of two cores of two threads: 8 CPUs, 4 cores; CPUs outside the process's
    mask do not count."""
    cpu, node = tmp_path / "cpu", tmp_path / "node"
    for c in range(8):
        write(cpu / f"cpu{c}" / "topology" / "physical_package_id", f"{c // 4}\n")
        write(cpu / f"cpu{c}" / "topology" / "core_id", f"{(c % 4) // 2}\n")
    for n in (0, 1):
        write(node / f"node{n}" / "cpulist", f"{4 * n}-{4 * n + 3}\n")
    monkeypatch.setattr(host.os, "sched_getaffinity", lambda pid: set(range(8)))
    t = host.topology(str(cpu), str(node))
    assert (t["cpus"], t["cores"], t["sockets"], t["numa_nodes"]) == (8, 4, 2, 2)
    monkeypatch.setattr(host.os, "sched_getaffinity", lambda pid: {0, 1, 2})
    t = host.topology(str(cpu), str(node))
    assert (t["cpus"], t["cores"], t["sockets"]) == (3, 2, 1)
    t = host.topology(str(tmp_path / "none"), str(tmp_path / "none"))
    assert (t["cores"], t["sockets"], t["numa_nodes"]) == (None, None, None)

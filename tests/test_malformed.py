"""Every rule a safetensors reader must enforce, truncated and hostile files, garbage."""

from __future__ import annotations

import contextlib
import json
import os
import struct

import fastfp8
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import save_file


def T(dtype="F32", shape=(1,), offsets=(0, 4)):
    return {"dtype": dtype, "shape": list(shape), "data_offsets": list(offsets)}


CASES = [
    # (id, header, data, length override, message fragment, tensor named)
    ("file-too-short", None, b"", None, "too short", None),
    ("header-too-large", {}, b"", 100_000_001, "exceeds the limit", None),
    ("header-beyond-file", {}, b"", 1000, "runs past the end", None),
    ("not-utf8", b"\xff\xfe{}", b"", None, "not valid UTF-8", None),
    ("not-json", b"{nope", b"", None, "not a valid JSON", None),
    ("not-object", b"[1, 2]", b"", None, "not a valid JSON", None),
    ("missing-field", {"w": {"dtype": "F32", "shape": [1]}}, b"\0" * 4, None, "data_offsets", "w"),
    ("metadata-not-strings", {"__metadata__": {"a": 1}}, b"", None, "not a valid JSON", None),
    ("duplicate", b'{"w":' + json.dumps(T()).encode() + b',"w":' + json.dumps(T(offsets=(4, 8))).encode() + b"}",
     b"\0" * 8, None, "appears twice", "w"),
    ("unknown-dtype", {"w": T(dtype="F12")}, b"\0" * 4, None, "unknown dtype", "w"),
    ("reversed", {"w": T(offsets=(4, 0))}, b"\0" * 4, None, "end before they begin", "w"),
    ("size-mismatch", {"w": T(shape=(2,))}, b"\0" * 4, None, "need 8", "w"),
    ("shape-overflow", {"w": T(shape=(2**62, 2**62))}, b"\0" * 4, None, "overflows", "w"),
    ("negative-dim", {"w": T(shape=(-1,))}, b"\0" * 4, None, "not a valid JSON", "w"),
    ("gap", {"w": T(offsets=(4, 8))}, b"\0" * 8, None, "gap", "w"),
    ("overlap", {"a": T(shape=(2,), offsets=(0, 8)), "b": T(offsets=(4, 8))}, b"\0" * 8, None, "overlaps", "b"),
    ("truncated-data", {"w": T(shape=(4,), offsets=(0, 16))}, b"\0" * 10, None, "truncated", "w"),
    ("trailing-bytes", {"w": T()}, b"\0" * 9, None, "unused bytes", None),
]


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_each_rule_has_a_clear_error(raw_file, tmp_path, case):
    _, header, data, length, fragment, tensor = case
    if header is None:
        path = tmp_path / "short.safetensors"
        path.write_bytes(b"\x01\x02\x03")
    else:
        path = raw_file(header, data, length=length)
    with pytest.raises(fastfp8.HeaderError) as info:
        fastfp8.open_checkpoint(path)
    msg = str(info.value)
    assert str(path) in msg
    assert fragment in msg
    if tensor:
        assert repr(tensor).replace("'", '"') in msg or tensor in msg


def test_header_with_padding_and_empty_file_is_valid(raw_file):
    path = raw_file(json.dumps({"w": T()}) + "    ", b"\x01\x02\x03\x04")
    assert fastfp8.open_checkpoint(path).get("w").view(torch.int32).item() == 0x04030201
    assert len(fastfp8.open_checkpoint(raw_file("{}"))) == 0


def test_huge_header_length_allocates_nothing(raw_file):
    # 2^63 would be fatal if anything were allocated from it before validation.
    path = raw_file({}, length=2**63)
    with pytest.raises(fastfp8.HeaderError, match="exceeds the limit"):
        fastfp8.open_checkpoint(path)


def test_truncated_copies_of_a_real_file(tmp_path):
    src = tmp_path / "good.safetensors"
    save_file({"a": torch.randn(100), "b": torch.randn(7, 3)}, str(src))
    data = src.read_bytes()
    for cut in [0, 4, 8, 20, len(data) // 2, len(data) - 1]:
        p = tmp_path / f"cut{cut}.safetensors"
        p.write_bytes(data[:cut])
        with pytest.raises(fastfp8.HeaderError):
            fastfp8.open_checkpoint(p)


@pytest.mark.parametrize("method", ["mmap", "pread", "direct"])
def test_file_truncated_after_open(tmp_path, method):
    path = tmp_path / "t.safetensors"
    tensors = {f"w{i}": torch.randn(256, 256) for i in range(8)}
    save_file(tensors, str(path))
    ckpt = fastfp8.open_checkpoint(path)
    os.truncate(path, os.path.getsize(path) // 2)
    with pytest.raises(fastfp8.ReadError, match=str(path)):
        for _ in ckpt.stream(memory_budget="1MiB", threads=2, method=method):
            pass
    with pytest.raises(fastfp8.ReadError):
        ckpt.get("w7")


@pytest.mark.parametrize("method", ["mmap", "pread", "direct"])
def test_file_rewritten_shorter_during_stream(tmp_path, method):
    path = tmp_path / "t.safetensors"
    save_file({f"w{i}": torch.randn(512, 512) for i in range(16)}, str(path))
    ckpt = fastfp8.open_checkpoint(path)
    with pytest.raises(fastfp8.ReadError), ckpt.stream(memory_budget="2MiB", threads=2, method=method) as s:
        for i, _ in enumerate(s):
            if i == 2:
                with open(path, "r+b") as f:
                    f.truncate(1000)


def test_sharded_index_errors(tmp_path):
    save_file({"a": torch.ones(2)}, str(tmp_path / "s1.safetensors"))
    save_file({"a": torch.ones(2), "b": torch.ones(1)}, str(tmp_path / "s2.safetensors"))
    index = tmp_path / "model.safetensors.index.json"

    def check(weight_map, match):
        index.write_text(json.dumps({"weight_map": weight_map}))
        with pytest.raises(fastfp8.CheckpointError, match=match):
            fastfp8.open_checkpoint(tmp_path)

    check({"a": "missing.safetensors"}, "does not exist")
    check({"a": "../s1.safetensors"}, "not a plain relative path")
    check({"a": "/etc/passwd"}, "not a plain relative path")
    check({"c": "s1.safetensors"}, "absent from this shard")
    check({"a": "s1.safetensors", "b": "s2.safetensors"}, "also stored in")
    index.write_text("{broken")
    with pytest.raises(fastfp8.CheckpointError, match="invalid index"):
        fastfp8.open_checkpoint(tmp_path)
    index.write_text(json.dumps({"no_weight_map": {}}))
    with pytest.raises(fastfp8.CheckpointError, match="weight_map"):
        fastfp8.open_checkpoint(tmp_path)


def test_symlinked_shards_work(tmp_path):
    """The Hugging Face cache layout: snapshots/ links into blobs/."""
    blobs, snap = tmp_path / "blobs", tmp_path / "snapshots" / "abc"
    blobs.mkdir()
    snap.mkdir(parents=True)
    save_file({"a": torch.arange(4.0)}, str(blobs / "1234"))
    (snap / "model-00001-of-00001.safetensors").symlink_to(blobs / "1234")
    (snap / "model.safetensors.index.json").write_text(
        json.dumps({"weight_map": {"a": "model-00001-of-00001.safetensors"}}))
    assert fastfp8.open_checkpoint(snap).get("a").tolist() == [0, 1, 2, 3]


def test_directory_as_shard_is_rejected(tmp_path):
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"a": "d"}}))
    (tmp_path / "d").mkdir()
    with pytest.raises((fastfp8.Error, ValueError)):
        fastfp8.open_checkpoint(tmp_path)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(blob=st.binary(max_size=300))
def test_random_garbage_is_an_error_never_a_crash(tmp_path, blob):
    path = tmp_path / "g.safetensors"
    path.write_bytes(blob)
    with pytest.raises(fastfp8.Error):
        fastfp8.open_checkpoint(path)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(header=st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.text(max_size=6),
    lambda c: st.lists(c, max_size=3) | st.dictionaries(st.sampled_from(
        ["dtype", "shape", "data_offsets", "__metadata__", "w", "BF16"]), c, max_size=4),
    max_leaves=12), data=st.binary(max_size=32))
def test_random_json_headers(tmp_path, header, data):
    path = tmp_path / "j.safetensors"
    text = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(text)) + text + data)
    try:
        ckpt = fastfp8.open_checkpoint(path)
    except fastfp8.Error:
        return
    for name in ckpt.tensors:  # a header that passed must be readable
        with contextlib.suppress(fastfp8.UnsupportedDtypeError):
            ckpt.get(name)

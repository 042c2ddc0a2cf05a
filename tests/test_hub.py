"""Hub ids: ``fastfp8.hub.resolve`` and the CLI on a Hugging Face cache built here, offline.

The cache has the layout huggingface_hub writes: ``models--org--name/blobs/<hash>``,
``snapshots/<commit>/<file>`` as relative symlinks into ``blobs``, ``refs/<branch>`` holding
the commit. Nothing here touches the network: ``HF_HUB_OFFLINE=1`` in every test but the
one that replaces ``snapshot_download``.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import huggingface_hub
import pytest
import torch
from fastfp8 import cli, hub, open_checkpoint
from fastfp8.errors import CheckpointNotFoundError
from test_load import save, tiny

COMMIT_MAIN = "a" * 40
COMMIT_V2 = "b" * 40


def add_snapshot(cache: Path, repo_id: str, src: Path, commit: str, refs: tuple[str, ...] = ("main",)) -> Path:
    """Puts the files of directory ``src`` into ``cache`` as huggingface_hub does."""
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    (repo / "blobs").mkdir(parents=True, exist_ok=True)
    snap = repo / "snapshots" / commit
    snap.mkdir(parents=True)
    for f in sorted(src.iterdir()):
        data = f.read_bytes()
        blob = repo / "blobs" / hashlib.sha256(data).hexdigest()
        blob.write_bytes(data)
        (snap / f.name).symlink_to(os.path.relpath(blob, snap))
    (repo / "refs").mkdir(exist_ok=True)
    for ref in refs:
        (repo / "refs" / ref).write_text(commit)
    return snap


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("hub")
    save(tiny("llama"), root / "main", shard="40KB")
    save(tiny("llama", dtype=torch.float16), root / "v2", shard="200KB")
    return root / "main", root / "v2"


@pytest.fixture
def hf_cache(tmp_path, monkeypatch, models) -> Path:
    home = tmp_path / "hf-home"
    cache = home / "hub"
    add_snapshot(cache, "org/tiny-llama", models[0], COMMIT_MAIN)
    add_snapshot(cache, "org/tiny-llama", models[1], COMMIT_V2, refs=("v2",))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.setenv("HF_HOME", str(home))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return cache


def test_hub_id_resolves_to_the_cached_snapshot(hf_cache, models):
    path = hub.resolve("org/tiny-llama")
    assert path == hf_cache / "models--org--tiny-llama" / "snapshots" / COMMIT_MAIN
    ckpt = open_checkpoint(path)
    assert all(Path(s).is_symlink() for s in ckpt.shards)  # read in place, through the symlinks
    ref = open_checkpoint(models[0])
    assert len(ckpt.shards) == len(ref.shards) > 1
    name = "model.layers.1.mlp.down_proj.weight"
    assert torch.equal(ckpt.get(name), ref.get(name))


def test_revision_branch_and_commit(hf_cache):
    for rev in ("v2", COMMIT_V2):
        path = hub.resolve("org/tiny-llama", revision=rev)
        assert path.name == COMMIT_V2
        assert {t.dtype for t in open_checkpoint(path).tensors.values()} == {"F16"}
    with pytest.raises(CheckpointNotFoundError, match="revision nope"):
        hub.resolve("org/tiny-llama", revision="nope")


def test_not_found_says_what_was_tried(hf_cache):
    with pytest.raises(CheckpointNotFoundError) as e:
        hub.resolve("org/absent")
    msg = str(e.value)
    for needle in ("org/absent", "no such file or directory", "revision main", str(hf_cache), "HF_HUB_OFFLINE=1"):
        assert needle in msg, (needle, msg)
    assert isinstance(e.value, FileNotFoundError)  # CheckpointNotFoundError is both
    with pytest.raises(CheckpointNotFoundError, match="not a Hugging Face Hub id"):
        hub.resolve("/no/such/model")
    with pytest.raises(CheckpointNotFoundError, match="not a Hugging Face Hub id"):
        hub.resolve("a/b/c")


def test_local_paths_are_returned_as_they_are(models):
    assert hub.resolve(models[0]) == models[0]
    assert hub.resolve(str(models[0])) == models[0]
    with pytest.raises(ValueError, match="local path"):
        hub.resolve(models[0], revision="main")


@pytest.mark.parametrize("name, ok", [
    ("meta-llama/Llama-3.2-1B", True), ("gpt2", True), ("org/name.v1", True),
    ("/abs/path", False), ("./rel", False), ("a/b/c", False), ("org/model.safetensors", False),
    ("org--x/y", False), ("-org/x", False), ("org/x.", False), ("", False),
])
def test_is_hub_id(name, ok):
    assert hub.is_hub_id(name) is ok


def test_online_call_fetches_only_what_fastfp8_reads(monkeypatch, tmp_path):
    """Online (no HF_HUB_OFFLINE), resolve asks snapshot_download for the safetensors,
    configs and tokenizer only, in the cache HF_HOME names now."""
    calls = []

    def fake(repo_id, **kw):
        calls.append((repo_id, kw))
        return str(tmp_path)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "home"))
    assert hub.resolve("org/m", revision="r1") == tmp_path
    (repo_id, kw), = calls
    assert repo_id == "org/m" and kw["revision"] == "r1" and kw["local_files_only"] is False
    assert Path(kw["cache_dir"]) == tmp_path / "home" / "hub"
    patterns = kw["allow_patterns"]
    assert "*.safetensors" in patterns and "*.safetensors.index.json" in patterns
    assert {"config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json"} <= set(patterns)
    import fnmatch

    for unwanted in ("pytorch_model.bin", "model.gguf", "original/consolidated.00.pth", "README.md"):
        assert not any(fnmatch.fnmatch(unwanted, p) for p in patterns), unwanted


def run(capsys, *argv):
    code = cli.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_cli_takes_hub_ids(capsys, hf_cache, tmp_path):
    code, out, err = run(capsys, "inspect", "org/tiny-llama", "--summary")
    assert code == 0, err
    assert out.startswith(str(hf_cache / "models--org--tiny-llama" / "snapshots" / COMMIT_MAIN))
    code, out, err = run(capsys, "inspect", "org/tiny-llama", "--revision", "v2", "--summary")
    assert code == 0 and "dtypes: F16" in out, err

    dst = tmp_path / "fp8"
    code, out, err = run(capsys, "convert", "org/tiny-llama", dst, "--device", "cpu")
    assert code == 0, err
    assert not any(p.is_symlink() for p in dst.iterdir())  # real files, not links into the cache
    assert (dst / "generation_config.json").is_file()

    code, out, err = run(capsys, "bench", "org/tiny-llama", "--device", "cpu", "--loaders", "fastfp8")
    assert code == 0, err

    code, _, err = run(capsys, "inspect", "org/absent")
    assert code == 2 and err.count("\n") == 1 and "org/absent" in err and "HF_HUB_OFFLINE=1" in err
    code, _, err = run(capsys, "inspect", tmp_path / "fp8", "--revision", "main")
    assert code == 2 and "local path" in err

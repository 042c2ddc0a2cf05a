"""side_files: the same selection as the converter's, without following links outside."""

from __future__ import annotations

import logging
import os
from pathlib import Path

from fastfp8.sidefiles import side_files


def _touch(p: Path, text: str = "x") -> Path:
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text(text)
    return p


def test_selection_rules_are_the_converters(tmp_path):
    m = tmp_path / "m"
    for name in ["config.json", "tokenizer.json", "generation_config.json", "model.safetensors",
                 "model.safetensors.index.json", "pytorch_model.bin", ".hidden",
                 "sub/config.json", "sub/notes.txt", ".git/HEAD", "w.gguf"]:
        _touch(m / name)
    assert side_files(m) == [Path("generation_config.json"), Path("tokenizer.json"),
                             Path("sub/config.json"), Path("sub/notes.txt")]
    assert side_files(tmp_path / "missing") == []


def test_links_outside_are_skipped_with_a_warning(tmp_path, caplog):
    secret = _touch(tmp_path / "secret.txt", "host secret")
    m = tmp_path / "m"
    _touch(m / "tokenizer.json")
    _touch(m / "real.txt")
    os.symlink(secret, m / "tokenizer_extra.txt")          # absolute, outside
    os.symlink("../secret.txt", m / "rel_extra.txt")        # relative, outside
    os.symlink("real.txt", m / "alias.txt")                 # inside: fine
    os.symlink("nowhere.txt", m / "dangling.txt")           # dangling
    os.symlink(tmp_path, m / "linkdir")                     # a linked directory: not entered
    with caplog.at_level(logging.WARNING, logger="fastfp8.sidefiles"):
        got = side_files(m)
    assert got == [Path("alias.txt"), Path("real.txt"), Path("tokenizer.json")]
    warned = caplog.text
    assert "tokenizer_extra.txt" in warned and "rel_extra.txt" in warned
    assert "dangling.txt" in warned and "alias.txt" not in warned


def test_the_hugging_face_cache_layout_keeps_working(tmp_path, caplog):
    repo = tmp_path / "hub" / "models--org--m"
    snap = repo / "snapshots" / "0123abc"
    _touch(repo / "blobs" / "aaa", "{}")
    _touch(repo / "blobs" / "bbb", "tok")
    _touch(repo / "blobs" / "ccc", "nested")
    snap.mkdir(parents=True)
    (snap / "sub").mkdir()
    os.symlink("../../blobs/aaa", snap / "config.json")
    os.symlink("../../blobs/bbb", snap / "tokenizer.json")
    os.symlink("../../../blobs/ccc", snap / "sub" / "extra.json")
    # a blob of another cached repository is still outside
    _touch(tmp_path / "hub" / "models--org--other" / "blobs" / "zzz")
    os.symlink("../../../models--org--other/blobs/zzz", snap / "stolen.json")
    with caplog.at_level(logging.WARNING, logger="fastfp8.sidefiles"):
        got = side_files(snap)
    assert got == [Path("tokenizer.json"), Path("sub/extra.json")]
    assert "stolen.json" in caplog.text
    # through a link to the snapshot directory too
    os.symlink(snap, tmp_path / "model-link")
    assert side_files(tmp_path / "model-link") == got

"""The non-weight files of a model directory to copy next to converted weights (tokenizer,
generation config, chat template, ...), without following links out of the directory.

A side file that is a symlink resolving outside the model directory would otherwise be
copied as a regular file holding whatever it points at (``tokenizer_extra.txt ->
/etc/hostname`` would publish the host's file with the converted model). Such files are
skipped with a warning. The one layout whose links leave the directory legitimately is the
Hugging Face cache: ``<repo>/snapshots/<rev>/<file> -> ../../blobs/<hash>``, where links
into that same repository's ``blobs/`` are followed. The same rule guards the index's shard
names in the native reader (``rust/core/src/checkpoint.rs``).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

log = logging.getLogger(__name__)

#: Weight files and their indexes: written by the converter, never copied.
SKIP_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack", ".gguf", ".onnx")
SKIP_NAMES = frozenset({"model.safetensors.index.json", "pytorch_model.bin.index.json",
                        "tf_model.h5.index.json", "flax_model.msgpack.index.json"})


def hf_cache_blobs(root: Path) -> Path | None:
    """``<repo>/blobs`` (resolved) if the resolved ``root`` lies in
    ``<repo>/snapshots/<rev>``, else None."""
    for rev in (root, *root.parents):
        if rev.parent != rev and rev.parent.name == "snapshots":
            blobs = rev.parent.parent / "blobs"
            return blobs.resolve() if blobs.is_dir() else None
    return None


def resolves_inside(path: Path, root: Path, blobs: Path | None) -> bool:
    """Whether ``path`` (following every link) stays inside the resolved ``root``, or is a
    blob of the Hugging Face cache repository ``root`` is a snapshot of."""
    try:
        target = path.resolve(strict=True)
    except (OSError, RuntimeError):  # dangling, or a loop
        return False
    if target == root or root in target.parents:
        return True
    return blobs is not None and target.parent == blobs


def side_files(src_dir: Path) -> list[Path]:
    """The files of model directory ``src_dir`` to copy, as paths relative to it, in the
    converter's order (a directory's files sorted, then its subdirectories, sorted).

    Every file except hidden ones, weights (``SKIP_SUFFIXES``), weight indexes
    (``SKIP_NAMES``) and the top-level ``config.json`` (the converter writes its own), in
    non-hidden subdirectories (symlinked directories are not entered). A file that
    resolves outside ``src_dir`` (see the module docs), or a dangling link, is skipped
    with a warning."""
    src_dir = Path(src_dir)
    if not src_dir.is_dir():
        return []
    root = src_dir.resolve()
    blobs = hf_cache_blobs(root)
    out = []
    for here, dirs, files in os.walk(src_dir):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for f in sorted(files):
            if f.startswith(".") or f in SKIP_NAMES or (f == "config.json" and Path(here) == src_dir):
                continue
            if f.endswith(SKIP_SUFFIXES):
                continue
            path = Path(here) / f
            rel = path.relative_to(src_dir)
            if not resolves_inside(path, root, blobs):
                log.warning("not copying %s: it links to %s, outside the model directory %s",
                            rel, os.path.realpath(path), src_dir)
                continue
            out.append(rel)
    return out

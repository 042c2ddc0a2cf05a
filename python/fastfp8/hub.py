"""Checkpoints named by a Hugging Face Hub id (``meta-llama/Llama-3.2-1B``) or a local path.

:func:`resolve` turns either into a local directory. A Hub id goes through
``huggingface_hub.snapshot_download``, which fetches only what fastfp8 reads or copies
(:data:`ALLOW_PATTERNS`: safetensors shards and their index, the model and generation
configs, tokenizer files) into the Hugging Face cache and returns the snapshot directory
``<cache>/models--<org>--<name>/snapshots/<commit>/``, whose files are symlinks into
``blobs/``; fastfp8 reads them in place, nothing is copied.

The usual Hugging Face variables apply, read at each call: ``HF_HUB_OFFLINE=1`` (only the
cache, no network), ``HF_HOME`` / ``HF_HUB_CACHE`` (where the cache is), ``HF_TOKEN``
(gated and private repositories; huggingface_hub reads it).
"""

from __future__ import annotations

import logging
import os
import re
from pathlib import Path

from .errors import CheckpointNotFoundError

__all__ = ["ALLOW_PATTERNS", "is_hub_id", "resolve"]

logger = logging.getLogger(__name__)

#: What :func:`resolve` downloads from a Hub repository: the weights in safetensors (no
#: ``.bin``/``.pth``/``.gguf`` duplicates), their index, the configs and the tokenizer.
ALLOW_PATTERNS: tuple[str, ...] = (
    "*.safetensors",
    "*.safetensors.index.json",
    "config.json",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "tokenizer.model",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "vocab.txt",
    "merges.txt",
    "chat_template.jinja",
    "chat_template.json",
)

# huggingface_hub's own rule (validate_repo_id): "name" or "namespace/name", letters,
# digits, "-", "_", "."; no "--" or "..", not starting or ending with "-" or ".".
_REPO_ID = re.compile(r"(?:[\w\-.]{1,96}/)?[\w\-.]{1,96}")


def is_hub_id(name: str) -> bool:
    """Whether ``name`` has the shape of a Hub repository id (``org/name`` or ``name``).
    Paths that say they are paths (``/...``, ``./...``, ``~/...``, a ``.safetensors``
    file) are not."""
    if not _REPO_ID.fullmatch(name) or name.startswith((".", "-")) or name.endswith((".", "-")):
        return False
    return not any(bad in name for bad in ("--", "..", "/.", "/-")) and not name.endswith(".safetensors")


def _cache_dir() -> Path:
    """The hub cache, from the environment at this moment (huggingface_hub reads it once,
    at import)."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"]).expanduser()
    home = os.environ.get("HF_HOME") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"), "huggingface")
    return Path(home).expanduser() / "hub"


def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().upper() in ("1", "ON", "YES", "TRUE")


def resolve(path_or_id: str | os.PathLike[str], *, revision: str | None = None) -> Path:
    """A checkpoint's local path: ``path_or_id`` itself when it exists on disk, else the
    snapshot directory of the Hugging Face Hub repository it names (downloaded, or taken
    from the cache; only :data:`ALLOW_PATTERNS`).

    Args:
        path_or_id: a model directory, a ``.safetensors`` file, or a Hub id.
        revision: a branch, tag or commit of the Hub repository (default ``main``); only
            for Hub ids.

    Raises:
        CheckpointNotFoundError: neither a local path nor a Hub repository that could be
            found (the message says what was tried: the path, the repository, revision,
            cache directory and whether the Hub was asked or only the cache).
        ValueError: ``revision`` given with a local path.
    """
    local = Path(os.fspath(path_or_id)).expanduser()
    name = os.fspath(path_or_id)
    if local.exists() or local.is_symlink():
        if revision is not None:
            raise ValueError(f"revision={revision!r} applies to Hugging Face Hub ids; {name} is a local path")
        return local
    if not isinstance(name, str) or not is_hub_id(name):
        raise CheckpointNotFoundError(f"{name}: no such file or directory (and not a Hugging Face Hub id)")
    return _snapshot(name, revision)


def _snapshot(repo_id: str, revision: str | None) -> Path:
    try:
        from huggingface_hub import snapshot_download
        from huggingface_hub.errors import HfHubHTTPError, HFValidationError, LocalEntryNotFoundError
    except ImportError:  # a dependency, but a broken install should still say what happened
        raise CheckpointNotFoundError(
            f"{repo_id}: no such file or directory, and huggingface_hub is not installed to look it up on the "
            "Hugging Face Hub (pip install huggingface_hub)") from None
    cache = _cache_dir()
    offline = _offline()
    tried = (f"{repo_id}: no such file or directory, and not found as a Hugging Face Hub id "
             f"(revision {revision or 'main'}, cache {cache}, "
             f"{'HF_HUB_OFFLINE=1: the cache only' if offline else 'the Hub, then the cache'})")
    logger.info("resolving %s (revision %s) with huggingface_hub, cache %s%s", repo_id, revision or "main", cache,
                ", offline" if offline else "")
    try:
        snap = snapshot_download(repo_id, revision=revision, cache_dir=cache, local_files_only=offline,
                                 allow_patterns=list(ALLOW_PATTERNS))
    except (HfHubHTTPError, HFValidationError, LocalEntryNotFoundError, OSError, ValueError) as e:
        reason = " ".join(str(e).split())
        raise CheckpointNotFoundError(f"{tried}: {type(e).__name__}: {reason}") from e
    return Path(snap)

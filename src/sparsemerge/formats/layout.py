"""Names shared by the packed-checkpoint writer (:mod:`.model`), reader (:mod:`.reader`) and
the compressed-tensors writer (:mod:`.ct`), so none of them imports another's internals."""
from __future__ import annotations

import logging
import os
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator

from sparsemerge.io.dtypes import DTYPE_NAMES
from sparsemerge.selection import DEFAULT_EXCLUDE, DEFAULT_INCLUDE, LayerFilter

log = logging.getLogger(__name__)

if TYPE_CHECKING:  # formats/model.py imports this module
    from sparsemerge.formats.model import PackConfig

MANIFEST_NAME = "sparsemerge_packed.json"
# --dtype of pack: "keep" the source dtype, or store floats in one of these
STORED_DTYPES = {"keep": None, **{n: DTYPE_NAMES[n] for n in ("float32", "float16", "bfloat16")}}
# Version 2 (2026-12): each tensor's sha256 covers its manifest entry, and the manifest carries
# a digest of itself (io/checksum.py). Version 1 files still read; only their bytes are checked.
LAYOUT, VERSION = "sparsemerge-packed", 2
READABLE_VERSIONS = (1, 2)
# Beside a compressed-tensors folder we write: the digests its own layout has no room for.
CT_CHECKSUMS_NAME = "sparsemerge_checksums.json"
WEIGHT_FILE = re.compile(r"(\.safetensors|\.bin|\.pt|\.pth|\.gguf|\.safetensors\.index\.json|\.bin\.index\.json)$")
SKIP_FILES = {"sparsemerge-cache.json", MANIFEST_NAME, CT_CHECKSUMS_NAME}  # describe a folder's weights: never copied
# Beside a bare .safetensors file only these belong to the model (the folder may hold anything).
HF_SIDE_FILES = {
    "config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
    "vocab.json", "merges.txt", "tokenizer.model", "added_tokens.json", "chat_template.jinja", "preprocessor_config.json",
}


def copy_side_files(folder: Path, dest: Path, only_known: bool = False) -> list[str]:
    """Copy config, tokenizer and other non-weight files (not sub-folders) of ``folder``;
    ``only_known``: just the usual Hugging Face side files (for a bare safetensors source).
    A symlinked file is copied only when it points inside the folder (or, for a Hugging Face
    cache snapshot, into that repository's ``blobs``): a link elsewhere is skipped with a
    warning, so no file outside the model is ever copied into an output."""
    copied = []
    for path in sorted(Path(folder).iterdir()):
        if only_known and path.name not in HF_SIDE_FILES:
            continue
        if path.is_file() and not WEIGHT_FILE.search(path.name) and path.name not in SKIP_FILES and not path.name.startswith("."):
            if path.is_symlink() and not _link_stays_inside(path, Path(folder)):
                log.warning("not copying %s: it is a symlink to %s, outside the model folder", path, os.path.realpath(path))
                continue
            shutil.copy2(path, dest / path.name)
            copied.append(path.name)
    return copied


def _link_stays_inside(path: Path, folder: Path) -> bool:
    target = path.resolve()
    roots = [folder.resolve()]
    if folder.resolve().parent.name == "snapshots":  # huggingface_hub cache: snapshots/<rev>/f -> ../../blobs/<hash>
        roots.append(folder.resolve().parent.parent / "blobs")
    return any(root == target.parent or root in target.parents for root in roots)


def _progress(items: list[str], enabled: bool, desc: str) -> Iterator[str]:
    if not enabled:
        yield from items
        return
    from tqdm import tqdm

    yield from tqdm(items, desc=desc, unit="tensor")


def _target_filter(config: "PackConfig") -> "LayerFilter":
    """Module name -> targeted (an empty or missing include/exclude list means the default)."""
    return LayerFilter(config.include or DEFAULT_INCLUDE, config.exclude or DEFAULT_EXCLUDE)


def _targets(config: "PackConfig") -> Callable[[str], bool]:
    """Tensor name -> packed in the sparse format (``NAME.weight`` of a targeted module)."""
    return _target_filter(config).weight


@dataclass
class PackReport:
    out: Path
    tensors: int = 0
    packed: list[str] = field(default_factory=list)  # names stored in a sparse format
    kept_dense: list[tuple[str, str]] = field(default_factory=list)  # (name, reason) targeted but stored dense
    nbytes: int = 0
    numel: int = 0
    seconds: float = 0.0

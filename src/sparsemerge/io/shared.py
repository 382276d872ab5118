"""On-disk form of a cross-layer shared model (:mod:`sparsemerge.merge.share` writes it):
``FOLDER/sharing/shared.safetensors`` and ``sharing.json``, whose ``tensors`` map every dense
tensor name to a recipe: ``{"copy": key}``, ``{"shared": key, "u": key, "v": key}`` (``S + U V``)
or ``{"shared": key, "index": key, "values": key}`` (``S`` plus values scattered at flat
indices). Lives in ``io`` because loading a model must rebuild it."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from sparsemerge.errors import SparsemergeError

SHARING_DIR = "sharing"
SHARING_JSON = "sharing.json"
SHARED_FILE = "shared.safetensors"
FORMAT = "sparsemerge-sharing/1"


def has_sharing(folder: "str | Path") -> bool:
    return (Path(folder) / SHARING_DIR / SHARING_JSON).is_file()


def load_shared_state(folder: "str | Path") -> dict[str, torch.Tensor]:
    """Rebuild every dense tensor of a shared model: ``S_g + U V``, ``S_g`` + scattered values, or a copy."""
    from sparsemerge.io.reader import load_safetensors

    folder = Path(folder) / SHARING_DIR
    try:
        manifest = json.loads((folder / SHARING_JSON).read_text())
        stored = load_safetensors(folder / SHARED_FILE)
    except (OSError, ValueError) as exc:
        raise SparsemergeError(f"cannot read the shared model in {str(folder)!r}: {exc}") from exc
    if manifest.get("format") != FORMAT:
        raise SparsemergeError(f"{folder / SHARING_JSON}: format {manifest.get('format')!r}, expected {FORMAT!r}")
    state = {}
    try:
        for name, recipe in manifest["tensors"].items():
            if "copy" in recipe:
                state[name] = stored[recipe["copy"]]
                continue
            shared = stored[recipe["shared"]]
            w = shared.float().clone()
            if "u" in recipe:
                w += stored[recipe["u"]].float() @ stored[recipe["v"]].float()
            elif "index" in recipe:
                w.view(-1).index_add_(0, stored[recipe["index"]].long(), stored[recipe["values"]].float())
            state[name] = w.to(shared.dtype)
    except KeyError as exc:
        raise SparsemergeError(f"{folder / SHARING_JSON} names tensor {exc} that {SHARED_FILE} does not hold") from None
    return state


def refuse_sharing(ref: Any, what: str) -> None:
    if isinstance(ref, (str, Path)) and Path(ref).is_dir() and has_sharing(ref):
        raise SparsemergeError(
            f"{str(ref)!r} is a cross-layer shared model ({SHARING_DIR}/); {what} reads dense weights - "
            "load it with sparsemerge.io.load_model, or save_model it to a dense folder first"
        )

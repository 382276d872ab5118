"""The pruning record that ``sparsemerge prune`` writes beside a pruned model
(``sparsemerge_prune.json``: method, options, and every pruned layer with its pattern and
measured sparsity; layers kept dense by the recipe are listed as skipped). ``check`` and
``pack`` read each layer's own pattern from it, so a mixed allocation (2:4 here, 1:4 or
dense there) is checked and packed layer by layer without repeating the recipe."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Optional

from sparsemerge.errors import SparsemergeError
from sparsemerge.patterns import NM, parse_pattern
from sparsemerge.selection import DENSE

PRUNE_RECORD = "sparsemerge_prune.json"
DENSE_BY_RECIPE = "dense by recipe (layer_patterns)"


def read_prune_record(model: "str | Path") -> Optional[dict[str, Any]]:
    """The record of the model folder ``model`` (None when there is none: not a folder, or
    pruned elsewhere); a record that is not valid JSON raises a clear error."""
    path = Path(model) / PRUNE_RECORD
    if not Path(model).is_dir() or not path.is_file():
        return None
    try:
        record = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise SparsemergeError(f"{path} is not a readable pruning record ({exc}); delete it or re-run prune") from None
    if not isinstance(record, dict) or not isinstance(record.get("layers", []), list):
        raise SparsemergeError(f"{path} is not a pruning record (no 'layers' list); delete it or re-run prune")
    return record


def recorded_patterns(record: dict[str, Any], nm_only: bool = False) -> dict[str, str]:
    """``{module name: pattern}`` of every pruned layer, plus ``"dense"`` for layers the
    recipe kept dense. ``nm_only``: leave out layers whose pattern is not N:M."""
    out: dict[str, str] = {}
    for layer in record.get("layers", []):
        try:
            name, pattern = str(layer["name"]), str(layer["pattern"])
            parsed = parse_pattern(pattern)
        except (KeyError, TypeError, SparsemergeError) as exc:
            raise SparsemergeError(f"pruning record: bad layer entry {layer!r} ({exc})") from None
        if nm_only and not isinstance(parsed, NM):
            continue
        out[name] = pattern
    for entry in record.get("skipped", []):
        if isinstance(entry, dict) and entry.get("reason") == DENSE_BY_RECIPE:
            out[str(entry.get("name"))] = DENSE
    return out

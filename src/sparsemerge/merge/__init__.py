"""Model merging (chapter 10.3): task vectors, TIES, DARE, SLERP, model stock, breadcrumbs,
DELLA, orthogonalized task arithmetic, soups, passthrough / layer stitching; a streaming,
mergekit-compatible engine; LoRA adapters in and out; sparsity-aware merging.

Python API:

* :func:`run_merge(config, out)` -- merge checkpoints as a mergekit-style config says
  (YAML path, mapping or :class:`MergeConfig`), streaming, into a Hugging Face folder.
* :func:`merge_tensors(method, tensors, base=..., weights=..., **params)` -- one tensor in memory.
* :func:`merge_state_dicts(method, state_dicts, base=..., ...)` -- whole in-memory models.
* :mod:`sparsemerge.merge.ops` -- building blocks (task vectors, trim, sign election,
  disjoint mean, drop-and-rescale, Gram-Schmidt); :func:`greedy_soup` -- the greedy soup.
* :func:`list_methods` -- the registered method names.
"""
import sparsemerge.merge.methods  # noqa: F401  (each method module registers itself)
from sparsemerge.merge.api import list_methods, merge_state_dicts, merge_tensors
from sparsemerge.merge.base import MERGE_METHODS, MergeInputs, MethodSpec, get_method
from sparsemerge.merge.config import MergeConfig, load_config
from sparsemerge.merge.engine import MergeReport, run_merge
from sparsemerge.merge.soups import greedy_soup

__all__ = [
    "MERGE_METHODS",
    "MergeConfig",
    "MergeInputs",
    "MergeReport",
    "MethodSpec",
    "get_method",
    "greedy_soup",
    "list_methods",
    "load_config",
    "merge_state_dicts",
    "merge_tensors",
    "run_merge",
]

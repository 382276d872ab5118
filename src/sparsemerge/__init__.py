"""sparsemerge: structured sparsity and parameter sharing for edge inference.

Public entry points are re-exported lazily so `import sparsemerge` stays cheap.
"""
from sparsemerge.errors import SparsemergeError
from sparsemerge.patterns import NM, Block, Unstructured, Pattern, parse_pattern

__version__ = "0.1.0"

__all__ = [
    "SparsemergeError",
    "NM",
    "Block",
    "Unstructured",
    "Pattern",
    "parse_pattern",
    "prune_",
    "PruneConfig",
]


def __getattr__(name: str):
    # Heavy imports (transformers) only when asked for.
    if name in ("prune_", "PruneConfig"):
        from sparsemerge.prune import api

        return getattr(api, name)
    raise AttributeError(f"module 'sparsemerge' has no attribute {name!r}")

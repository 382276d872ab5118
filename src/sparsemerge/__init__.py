"""sparsemerge: structured sparsity and parameter sharing for edge inference.

Public entry points are re-exported lazily so `import sparsemerge` stays cheap.
"""
import os as _os
import sys as _sys

# Weight buffers of hundreds of MiB are streamed once per decoded token: on 4 KiB pages a
# core reads them at ~20 GB/s, on 2 MiB transparent huge pages at ~31 GB/s (measured with
# benchmarks/bench_gemv.py's machine; the prefetchers stop at page boundaries). numpy
# already asks for huge pages; torch does when THP_MEM_ALLOC_ENABLE=1 is set before it is
# imported - so set it when sparsemerge comes first (the CLI always does) and the user
# has not chosen.
if "torch" not in _sys.modules:
    _os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")

from sparsemerge.errors import SparsemergeError  # noqa: E402
from sparsemerge.patterns import NM, Block, Unstructured, Pattern, parse_pattern  # noqa: E402

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

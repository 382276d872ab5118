"""Pruning: one module per method, registered in :data:`METHODS`.

Importing this package (or any module in it) imports every method module, so
:data:`METHODS` is complete as soon as ``sparsemerge.prune`` is imported.
"""
from sparsemerge.prune.base import METHODS, PruningMethod, Target
from sparsemerge.prune.config import PruneConfig
from sparsemerge.prune import gradient, magnitude, sparsegpt, wanda  # noqa: F401,I001  (each registers itself in METHODS)

__all__ = ["METHODS", "PruningMethod", "Target", "PruneConfig", "prune_", "PruneReport"]


def __getattr__(name: str):
    if name in ("prune_", "PruneReport"):
        from sparsemerge.prune import api

        return getattr(api, name)
    raise AttributeError(name)

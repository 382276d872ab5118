"""Pruning: one module per method, registered in :data:`METHODS`."""
from sparsemerge.prune.base import METHODS, PruningMethod, Target
from sparsemerge.prune.config import PruneConfig

__all__ = ["METHODS", "PruningMethod", "Target", "PruneConfig", "prune_", "PruneReport"]


def __getattr__(name: str):
    if name in ("prune_", "PruneReport"):
        from sparsemerge.prune import api

        return getattr(api, name)
    raise AttributeError(name)

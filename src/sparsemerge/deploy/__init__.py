"""Deployment of one sparse base with many tasks (chapter 10.3.4, 10.3.8, 10.3.9): the task
store (:mod:`.store`, task vectors in :mod:`.vectors`), in-memory task switching with an LRU
cache of combinations (:mod:`.switch`, :mod:`.cache`)."""
from sparsemerge.deploy.store import TaskStore

__all__ = ["TaskStore", "TaskSwitcher"]


def __getattr__(name: str):
    if name == "TaskSwitcher":  # imports the runtime pieces on first use
        from sparsemerge.deploy.switch import TaskSwitcher

        return TaskSwitcher
    raise AttributeError(name)

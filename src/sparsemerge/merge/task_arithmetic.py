"""Old import path: task arithmetic is a row of the generalized-task-arithmetic table in
:mod:`sparsemerge.merge.methods.gta`."""
from sparsemerge.merge.methods.gta import task_arithmetic

__all__ = ["task_arithmetic"]

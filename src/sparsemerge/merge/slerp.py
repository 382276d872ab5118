"""Old import path: SLERP lives in :mod:`sparsemerge.merge.methods.slerp`."""
from sparsemerge.merge.methods.slerp import slerp, slerp_method

__all__ = ["slerp", "slerp_method"]

"""Sparse execution: the row-blocked N:M layout, CPU (numba) and CUDA (semi-structured)
kernels with a pure-torch reference, and ``SparseLinear`` with the in-place swap."""
from sparsemerge.kernels.dispatch import KERNELS, KernelChoice, choose_kernel, force_kernel, select
from sparsemerge.kernels.features import cpu_level
from sparsemerge.kernels.layout import BlockedNM, pack_blocked, to_dense
from sparsemerge.kernels.sparse_linear import SparseLinear, SparsifyConfig, SparsifyReport, set_act_quant_, sparsify_

__all__ = [
    "KERNELS",
    "choose_kernel",
    "force_kernel",
    "select",
    "KernelChoice",
    "cpu_level",
    "BlockedNM",
    "pack_blocked",
    "to_dense",
    "SparseLinear",
    "SparsifyConfig",
    "SparsifyReport",
    "sparsify_",
    "set_act_quant_",
]

"""Kernels behind the adapters: Walsh–Hadamard/Fastfood projection and the masked low-rank product.

Each op is a ``torch.library.custom_op`` with a pure-PyTorch default (CPU and reference) and a
Triton implementation for CUDA. Nothing here imports Triton or touches CUDA at import time.
"""

from .fastfood import FastfoodInput, fastfood_project, fastfood_project_grouped, fastfood_reference
from .hadamard import fwht, fwht_reference, hadamard_matrix, is_power_of_two
from .masked_lowrank import masked_lowrank, masked_lowrank_reference

__all__ = [
    "FastfoodInput",
    "fastfood_project",
    "fastfood_project_grouped",
    "fastfood_reference",
    "fwht",
    "fwht_reference",
    "hadamard_matrix",
    "is_power_of_two",
    "masked_lowrank",
    "masked_lowrank_reference",
]

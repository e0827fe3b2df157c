"""MoSE dispatch: ``out + scale_m * sum_k gate * B[m, e] (A[m] x)`` over each token's selected experts."""

from .reference import mose_lora_reference
from .torch_backend import mose_lora_torch

__all__ = ["mose_lora_reference", "mose_lora_torch"]

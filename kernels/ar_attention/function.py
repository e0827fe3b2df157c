"""Entry point of the Triton backend of AR attention (``backend="triton"``).

The forward runs the kernels of ``triton_kernels.py``: for prefill, one pass per key class over that
class's key blocks with the finished classes' states merged at the end; for a few queries, one pass
with every class as rows of the block and an exact split-k merge. Every option of DESIGN 2.2 and
2.2b runs in the kernels: sliding window, softcap, balancing by mass or by contribution, one target
or one per query head.

Gradients: AR is an inference-time method and there is no Triton backward kernel. When autograd
is recording (``torch.is_grad_enabled()``) and any of q, k, v requires grad, the call is routed to
the PyTorch backend (``torch_backend.ar_attention_torch``), whose autograd computes the gradient
of the same function (DESIGN 2.2) exactly; the Triton-only options (``block_m``, ``block_n``,
``num_splits``) are then ignored. A result is never returned without its correct gradient.
"""

from __future__ import annotations

import torch

from .launch import ar_attention_fwd
from .torch_backend import ar_attention_torch


def needs_grad(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> bool:
    return torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad)


def ar_attention_triton(q, k, v, key_modality, *, num_modalities, balance, target, strength, threshold,
                        modality_bias, causal, scale, query_mask, return_masses, window=None, softcap=None,
                        balance_by="mass", block_m=None, block_n=None, num_splits=None):
    """AR attention for validated inputs (same arguments as ``ar_attention_torch``).

    Triton-only options, for tests and tuning: ``block_m`` / ``block_n`` (powers of two >= 16)
    override the query / key block sizes; ``num_splits`` forces the number of key-range splits
    (1: no split; otherwise the merge kernel combines the partial states).
    Returns ``o`` (q's dtype) or ``(o, masses)`` with the pre-reallocation masses in float32.
    """
    if needs_grad(q, k, v):
        return ar_attention_torch(q, k, v, key_modality, num_modalities=num_modalities, balance=balance,
                                  target=target, strength=strength, threshold=threshold,
                                  modality_bias=modality_bias, causal=causal, scale=scale, query_mask=query_mask,
                                  return_masses=return_masses, window=window, softcap=softcap,
                                  balance_by=balance_by)
    o, masses = ar_attention_fwd(q, k, v, key_modality, num_modalities=num_modalities, balance=balance,
                                 target=target, strength=strength, threshold=threshold, modality_bias=modality_bias,
                                 causal=causal, scale=scale, query_mask=query_mask, return_masses=return_masses,
                                 window=window, softcap=softcap, balance_by=balance_by, block_m=block_m,
                                 block_n=block_n, num_splits=num_splits)
    return (o, masses) if return_masses else o

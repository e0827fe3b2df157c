"""Entry point of the Triton backend of AR attention (``backend="triton"``).

The forward runs the fused kernels of ``triton_kernels.py`` (one pass over K and V, reallocation
at the end of it; split-k with an exact merge for decode).

Gradients: AR is an inference-time method and there is no Triton backward kernel. When autograd
is recording (``torch.is_grad_enabled()``) and any of q, k, v requires grad, the call is routed to
the PyTorch backend (``torch_backend.ar_attention_torch``), whose autograd computes the gradient
of the same function (DESIGN 2.2) exactly; the Triton-only options (``block_m``, ``block_n``,
``num_splits``) are then ignored. A result is never returned without its correct gradient.

The options of DESIGN 2.2b that the kernel does not implement yet (``window``, ``softcap``,
``balance_by="contribution"``, per-head targets) raise NotImplementedError naming the argument,
with or without gradients, rather than being dropped; ``backend="torch"`` implements them all.
"""

from __future__ import annotations

import torch

from .launch import ar_attention_fwd
from .torch_backend import ar_attention_torch, is_per_head


def needs_grad(*tensors: torch.Tensor) -> bool:
    return torch.is_grad_enabled() and any(t.requires_grad for t in tensors)


def _refuse_unsupported(*, target, window, softcap, balance_by):
    """Options of DESIGN 2.2b the Triton kernel does not implement yet: refused, never ignored."""
    unsupported = []
    if window is not None:
        unsupported.append(f"window={window}")
    if softcap is not None:
        unsupported.append(f"softcap={softcap}")
    if balance_by != "mass":
        unsupported.append(f"balance_by={balance_by!r}")
    if is_per_head(target):
        unsupported.append("target (one per query head)")
    if unsupported:
        raise NotImplementedError(f"{', '.join(unsupported)}: not implemented by the Triton backend of "
                                  "ar_attention yet; use backend='torch' (the CPU path) for these options")


def ar_attention_triton(q, k, v, key_modality, *, num_modalities, balance, target, strength, threshold,
                        modality_bias, causal, scale, query_mask, return_masses, window=None, softcap=None,
                        balance_by="mass", block_m=None, block_n=None, num_splits=None):
    """AR attention for validated inputs (same arguments as ``ar_attention_torch``).

    Triton-only options, for tests and tuning: ``block_m`` / ``block_n`` (powers of two >= 16)
    override the query / key block sizes; ``num_splits`` forces the number of key-range splits
    (1: no split; otherwise the merge kernel combines the partial states). ``window``, ``softcap``,
    ``balance_by="contribution"`` and per-head targets raise NotImplementedError for now.
    Returns ``o`` (q's dtype) or ``(o, masses)`` with the pre-reallocation masses in float32.
    """
    _refuse_unsupported(target=target, window=window, softcap=softcap, balance_by=balance_by)
    args = dict(num_modalities=num_modalities, balance=balance, target=target, strength=strength,
                threshold=threshold, modality_bias=modality_bias, causal=causal, scale=scale,
                query_mask=query_mask, return_masses=return_masses)
    if needs_grad(q, k, v):
        return ar_attention_torch(q, k, v, key_modality, **args)
    o, masses = ar_attention_fwd(q, k, v, key_modality, block_m=block_m, block_n=block_n,
                                 num_splits=num_splits, **args)
    return (o, masses) if return_masses else o

"""Naive MoSE reference: a Python loop over tokens and their selected experts, in float64.

Written for clarity, not speed; tests compare every backend against it (forward, and gradients
through float64 autograd). It follows DESIGN 2.1 literally:

    y_t = out_t + scale[mu(t)] * sum_j gate[t, j] * B[mu(t), expert[t, j]] @ (A[mu(t)] @ x_t)

with ``y_t = out_t`` for tokens of modality -1.
"""

from __future__ import annotations

import torch


def mose_lora_reference(x, modality, expert, gate, A, B, scale, out=None) -> torch.Tensor:
    """Returns the float64 result ``out + update`` of shape (N, d_out); differentiable in float64."""
    f64 = torch.float64
    n_tokens, top_k = expert.shape
    n_modalities, d_out = A.shape[0], B.shape[2]
    x, gate, A, B = x.to(f64), gate.to(f64), A.to(f64), B.to(f64)
    if isinstance(scale, torch.Tensor):
        scale = scale.to(f64)
    else:
        scale = torch.full((n_modalities,), float(scale), dtype=f64)
    base = out.to(f64) if out is not None else torch.zeros(n_tokens, d_out, dtype=f64)
    rows = []
    for t in range(n_tokens):
        m = int(modality[t])
        row = base[t]
        if m >= 0:
            h = A[m] @ x[t]  # [r]: shared down-projection, once per token
            update = sum(gate[t, j] * (B[m, int(expert[t, j])] @ h) for j in range(top_k))
            row = row + scale[m] * update
        rows.append(row)
    return torch.stack(rows) if rows else base

"""Static-shape MoSE dispatch: the form ``mose_lora`` takes while a model is being exported.

The PyTorch backend groups tokens by (modality, expert) with ``nonzero``, host-side group sizes
and ``index_add``; exported, that becomes NonZero, data-dependent shapes and ScatterND with a
reduction, which TensorRT's ONNX parser rejects. This form computes every modality's shrink and
every expert's expand for every token and zeroes what a token does not use, so each intermediate
has a shape known from N alone and the graph holds only MatMul, Equal/Where-style masks and
elementwise ops:

    h_all = x @ A.reshape(M*r, d_in)^T                           (N, M, r)  every modality's shrink
    w     = onehot(modality) (N, M, 1) * gates (N, 1, E) * s_m    (N, M, E)  zero for modality -1
    y     = out + (w[..., None] * h_all[:, :, None]).reshape(N, M*E*r) @ B_stack (M*E*r, d_out)

``gates`` is the (N, E) matrix of each token's top-k gates, built with one-hot compares (no
scatter). The expand costs ``M*E`` times the sparse one, which is small next to the base GEMM for
LoRA ranks; it is the price of one static matmul. Same contract as ``mose_lora_torch``.
"""

from __future__ import annotations

import torch


def dense_gates(expert: torch.Tensor, gate: torch.Tensor, n_experts: int) -> torch.Tensor:
    """(N, E) float32: ``gate[t, j]`` at column ``expert[t, j]``, zeros elsewhere (one-hot sum, no scatter)."""
    columns = torch.arange(n_experts, device=expert.device)
    chosen = expert.unsqueeze(-1) == columns  # [N, k, E]
    return (chosen.to(torch.float32) * gate.float().unsqueeze(-1)).sum(1)


def mose_lora_static(x, modality, expert, gate, A, B, scale, out=None, *, inplace=False, **_) -> torch.Tensor:
    """``out + MoSE update`` (N, d_out) for validated inputs; ``scale`` is an (M,) float32 tensor."""
    n_tokens, d_in = x.shape
    n_modalities, rank = A.shape[0], A.shape[1]
    n_experts, d_out = B.shape[1], B.shape[2]
    result_dtype = out.dtype if out is not None else x.dtype

    h_all = (x @ A.reshape(n_modalities * rank, d_in).t()).view(n_tokens, n_modalities, 1, rank)
    is_modality = (modality.unsqueeze(-1) == torch.arange(n_modalities, device=x.device)).to(torch.float32)
    # gate and scale are used in float32 (DESIGN 4); the product is cast once for the matmul
    weight = is_modality.unsqueeze(-1) * dense_gates(expert, gate, n_experts).unsqueeze(1) \
        * scale.view(1, n_modalities, 1)  # [N, M, E]
    spread = (weight.to(x.dtype).unsqueeze(-1) * h_all).reshape(n_tokens, n_modalities * n_experts * rank)
    b_stack = B.transpose(-1, -2).reshape(n_modalities * n_experts * rank, d_out)  # rows in (m, e, r) order
    update = (spread @ b_stack).float()
    result = (update if out is None else out.float() + update).to(result_dtype)
    if inplace:
        return out.copy_(result)
    return result


def mose_linear_static(x, weight, bias, modality, expert, gate, A, B, scale, *, return_update_norm=False, **_):
    """``F.linear(x, weight, bias)`` plus ``mose_lora_static``: ``mose_linear`` while a model is exported."""
    if return_update_norm:
        raise ValueError("return_update_norm: the update norm is a training measurement; export a model in eval "
                         "mode (return_update_norm=False)")
    return mose_lora_static(x, modality, expert, gate, A, B, scale, torch.nn.functional.linear(x, weight, bias))

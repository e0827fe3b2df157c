"""Static-shape AR attention: the form ``ar_attention`` takes while a model is being exported.

The PyTorch backend loops over query chunks (host-side sizes) and takes per-modality maxima with
``scatter_reduce``. This form materialises the (Lq, Lk) scores once and uses only standard ops, so
it exports to MatMul, Softmax-like Exp/ReduceMax/ReduceSum, Where and elementwise nodes that every
ONNX runtime and TensorRT build:

- key classes as a one-hot (B, Lk, M) matrix (padding keys: an all-zero row);
- each modality's own max over its visible keys (one masked ReduceMax per modality, M is static),
  brought back to the keys through a one-hot matmul (exact: one non-zero term per key);
- ``p = exp(s - max_{mu(j)})``, per-modality sums ``l_m = p @ onehot``, masses relative to the
  global max (the static bias shifts each modality's max, as in the PyTorch backend);
- the reallocation of DESIGN 2.2 step 3 (``reallocate_masses``, shared with the PyTorch backend);
- ``o = (p * (P'_{mu(j)} / l_{mu(j)})) @ v``: each modality's own softmax mean weighted by its new
  mass, so a modality whose mass underflows still receives its reallocated mass; a query without a
  visible key outputs zeros.

Memory is O(B * Hq * Lq * Lk) (no chunking: chunk bounds would be data of the graph). Same keyword
contract as ``ar_attention_torch``.
"""

from __future__ import annotations

import torch

from .torch_backend import reallocate_masses


def ar_attention_static(
    q, k, v, key_modality, *, num_modalities, balance, target, strength, threshold, modality_bias,
    causal, scale, query_mask, return_masses, **_,
):
    """AR attention for validated inputs; returns ``o`` or ``(o, masses float32 (B, Hq, Lq, M))``."""
    batch, n_q_heads, len_q, head_dim = q.shape
    n_kv_heads, len_k = k.shape[1], k.shape[2]
    group = n_q_heads // n_kv_heads
    n_mod = num_modalities
    device = q.device
    f32 = torch.float32

    # GQA: query heads as (Hkv, group) against their shared K/V head, never repeating K/V.
    # Kept 5-D with broadcasting matmuls: reshaping computed tensors would make torch.export guard on
    # symbolic strides and pin the sequence length.
    q32 = q.to(f32).reshape(batch, n_kv_heads, group, len_q, head_dim)
    k32, v32 = k.to(f32).unsqueeze(2), v.to(f32).unsqueeze(2)  # [B, Hkv, 1, Lk, D]
    scores = (q32 @ k32.transpose(-1, -2)) * scale  # [B, Hkv, G, Lq, Lk]

    one_hot = (key_modality.unsqueeze(-1) == torch.arange(n_mod, device=device))  # [B, Lk, M] bool
    one_hot_f = one_hot.to(f32)[:, None, None]  # [B, 1, 1, Lk, M]
    visible = (key_modality >= 0)[:, None, None, None, :]  # [B, 1, 1, 1, Lk]
    if causal:
        # bottom-right alignment: query i sits at absolute position Lk - Lq + i
        query_pos = torch.arange(len_q, device=device) + (len_k - len_q)
        visible = visible & (torch.arange(len_k, device=device) <= query_pos.unsqueeze(-1))  # [.., Lq, Lk]
    scores = torch.where(visible, scores, torch.full_like(scores, -float("inf")))

    # Each modality's own max over its visible keys (constant shifts: detached, gradients unchanged).
    class_max = torch.stack(
        [torch.where(one_hot[:, None, None, None, :, m], scores.detach(), -float("inf")).amax(-1)
         for m in range(n_mod)], dim=-1)  # [B, Hkv, G, Lq, M]
    has_key = torch.isfinite(class_max)
    class_max = torch.where(has_key, class_max, torch.zeros_like(class_max))
    key_shift = class_max @ one_hot_f.transpose(-1, -2)  # [.., Lq, Lk]: the max of each key's modality
    p = torch.exp(scores - key_shift)  # 0 where invisible; <= 1
    class_sum = p @ one_hot_f  # [.., Lq, M], >= 1 where has_key

    bias = torch.zeros(n_mod, dtype=f32, device=device)
    if modality_bias is not None:
        bias = torch.tensor(modality_bias, dtype=f32, device=device)
    shifted_max = class_max + bias  # the static bias shifts a modality's whole softmax
    global_max = torch.where(has_key, shifted_max, torch.full_like(shifted_max, -float("inf"))).amax(-1, True)
    global_max = torch.where(torch.isfinite(global_max), global_max, torch.zeros_like(global_max))
    z = torch.where(has_key, class_sum * torch.exp(shifted_max - global_max), torch.zeros_like(class_sum))
    mass = z / z.sum(-1, keepdim=True).clamp_min(1e-30)  # zeros for a query without visible keys

    # Built from Python values (graph constants), not by index assignment, which would export as ScatterND.
    raw_target = dict(zip(balance, target if target is not None else (1.0,) * len(balance)))
    in_balance = torch.tensor([m in raw_target for m in range(n_mod)], dtype=torch.bool, device=device)
    tau = torch.tensor([raw_target.get(m, 0.0) for m in range(n_mod)], dtype=f32, device=device)
    selected = torch.ones((), dtype=torch.bool, device=device) if query_mask is None \
        else query_mask[:, None, None, :]
    new_mass = reallocate_masses(mass, has_key, in_balance=in_balance, tau=tau, strength=strength,
                                 threshold=threshold, selected=selected)
    per_class = torch.where(has_key, new_mass / class_sum.clamp_min(1e-30), torch.zeros_like(new_mass))
    weights = p * (per_class @ one_hot_f.transpose(-1, -2))  # [.., Lq, Lk]
    o = weights @ v32  # [B, Hkv, G, Lq, D]
    o = o.reshape(batch, n_q_heads, len_q, head_dim).to(q.dtype)
    if return_masses:
        return o, mass.detach().reshape(batch, n_q_heads, len_q, n_mod)
    return o

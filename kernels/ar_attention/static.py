"""Static-shape AR attention: the form ``ar_attention`` takes while a model is being exported.

The PyTorch backend loops over query chunks (host-side sizes) and takes per-modality maxima with
``scatter_reduce``. This form materialises the (Lq, Lk) scores once and uses only standard ops, so
it exports to MatMul, Softmax-like Exp/ReduceMax/ReduceSum, Where and elementwise nodes that every
ONNX runtime and TensorRT build:

- visibility from position arithmetic: padding, bottom-right causal ``pos_i - j >= 0`` and the
  sliding ``window`` ``pos_i - j < window`` (comparisons of Range outputs, no slicing);
- ``softcap``: ``c * tanh(s / c)`` on the scaled scores (Tanh);
- key classes as a one-hot (B, Lk, M) matrix (padding keys: an all-zero row);
- each modality's own max over its visible keys (one masked ReduceMax per modality, M is static),
  brought back to the keys through a one-hot matmul (exact: one non-zero term per key);
- ``p = exp(s - max_{mu(j)})``, then ``reallocated_output`` shared with the PyTorch backend: masses
  relative to the global max (the static bias shifts each modality's max), the reallocation of
  DESIGN 2.2 step 3 (per-head targets as a constant (Hq, M) table), and
  ``o = (p * (P'_{mu(j)} / l_{mu(j)})) @ v``; balancing by contribution adds one matmul for the
  |S| + 1 means and a ReduceL2-style norm. A query without a visible key outputs zeros.

Memory is O(B * Hq * Lq * Lk) (no chunking: chunk bounds would be data of the graph). Same keyword
contract as ``ar_attention_torch``.
"""

from __future__ import annotations

import torch

from .torch_backend import balance_tables, reallocate_masses, reallocated_output, slot_table


def ar_attention_static(
    q, k, v, key_modality, *, num_modalities, balance, target, strength, threshold, modality_bias,
    causal, scale, query_mask, return_masses, window=None, softcap=None, balance_by="mass", **_,
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
    if softcap is not None:
        scores = softcap * torch.tanh(scores / softcap)

    one_hot = (key_modality.unsqueeze(-1) == torch.arange(n_mod, device=device))  # [B, Lk, M] bool
    one_hot_f = one_hot.to(f32)[:, None, None]  # [B, 1, 1, Lk, M]
    visible = (key_modality >= 0)[:, None, None, None, :]  # [B, 1, 1, 1, Lk]
    if causal:
        # bottom-right alignment: query i sits at absolute position Lk - Lq + i
        query_pos = torch.arange(len_q, device=device) + (len_k - len_q)
        distance = query_pos.unsqueeze(-1) - torch.arange(len_k, device=device)  # [Lq, Lk]: pos_i - j
        in_range = distance >= 0 if window is None else (distance >= 0) & (distance < window)
        visible = visible & in_range
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
    # Built from Python values (graph constants), not by index assignment, which would export as ScatterND.
    in_balance, tau = balance_tables(n_mod, balance, target, device)
    if tau.dim() == 2:  # per query head: [Hq, M] -> [Hkv, G, 1, M]
        tau = tau.reshape(n_kv_heads, group, 1, n_mod)
    to_slots = slot_table(n_mod, balance, device) if balance_by == "contribution" and strength > 0 else None
    selected = torch.ones((), dtype=torch.bool, device=device) if query_mask is None \
        else query_mask[:, None, None, :]

    def realloc(mass, has_key, vbar_norm=None):
        return reallocate_masses(mass, has_key, in_balance=in_balance, tau=tau, strength=strength,
                                 threshold=threshold, selected=selected, vbar_norm=vbar_norm)

    def times_v(weights):  # broadcasting matmul against the shared K/V head: [.., Lk] @ [B, Hkv, 1, (1,) Lk, D]
        return weights @ (v32.unsqueeze(2) if weights.dim() == 6 else v32)

    o, mass = reallocated_output(p, class_max, class_sum, has_key, one_hot_f, bias, realloc=realloc,
                                 to_slots=to_slots, in_balance=in_balance, times_v=times_v)
    o = o.reshape(batch, n_q_heads, len_q, head_dim).to(q.dtype)
    if return_masses:
        return o, mass.detach().reshape(batch, n_q_heads, len_q, n_mod)
    return o

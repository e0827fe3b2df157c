"""Eager baselines that the benchmarks compare against (imported by bench/providers).

They are the way research code computes the same math; tests/test_baselines.py checks each one
against the naive references, so a benchmark never times a wrong baseline.
"""

from __future__ import annotations

import torch


def mose_naive_group_loop(x, modality, expert, gate, A, B, scale, out=None):
    """Per (modality, expert) group: index_select the tokens, both matmuls, ``index_add_`` back.

    The shrink ``A[m] x`` is recomputed for every expert of a token (the PEFT-style per-expert loop).
    """
    n_mod, n_exp = A.shape[0], B.shape[1]
    y = out.float().clone() if out is not None else x.new_zeros(x.shape[0], B.shape[2], dtype=torch.float32)
    scale = scale if isinstance(scale, torch.Tensor) else torch.full((n_mod,), float(scale), device=x.device)
    for m in range(n_mod):
        for e in range(n_exp):
            hit = (modality[:, None] == m) & (expert == e)  # [N, k]
            tokens, choice = hit.nonzero(as_tuple=True)
            if tokens.numel() == 0:
                continue
            rows = x.index_select(0, tokens)
            update = (rows @ A[m].t()) @ B[m, e].t()
            weight = gate[tokens, choice].float() * scale[m].float()
            y.index_add_(0, tokens, update.float() * weight[:, None])
    return y.to(out.dtype if out is not None else x.dtype)


def mose_dense_masked(x, modality, expert, gate, A, B, scale, out=None):
    """Every expert of every modality on every token, weighted by a dense (N, M, E) gate matrix."""
    n_mod, n_exp = A.shape[0], B.shape[1]
    scale = scale if isinstance(scale, torch.Tensor) else torch.full((n_mod,), float(scale), device=x.device)
    dense_gate = torch.zeros(x.shape[0], n_mod * n_exp, device=x.device, dtype=torch.float32)
    adapted = (modality >= 0)[:, None]
    flat = (modality.clamp(min=0)[:, None] * n_exp + expert).long()
    dense_gate = dense_gate.scatter_add(1, flat, gate.float() * adapted * scale[modality.clamp(min=0)][:, None])
    h = x @ A.reshape(-1, A.shape[2]).t()  # [N, M*r]: all modalities' shrinks
    y = out.float() if out is not None else x.new_zeros(x.shape[0], B.shape[2], dtype=torch.float32)
    for m in range(n_mod):
        h_m = h[:, m * A.shape[1]:(m + 1) * A.shape[1]]
        for e in range(n_exp):
            y = y + (h_m @ B[m, e].t()).float() * dense_gate[:, m * n_exp + e, None]
    return y.to(out.dtype if out is not None else x.dtype)


def ar_eager_materialised(q, k, v, key_modality, *, num_modalities, balance=(1, 2), target=None, strength=0.5,
                          threshold=0.0, modality_bias=None, causal=True, scale=None, query_mask=None,
                          return_masses=False, **_options):
    """AR as eager steering code does it: the full (Lq, Lk) probabilities, masses by a one-hot matmul,
    per-modality factors P'/P applied to the probabilities, then P @ V. Takes ``ar_attention``'s
    backend arguments (so a model can run through it, bench/e2e_eager.py).

    Unlike DESIGN 2.2 it cannot give mass to a modality whose probabilities underflow to 0.
    """
    len_q, len_k, head_dim = q.shape[2], k.shape[2], q.shape[3]
    group = q.shape[1] // k.shape[1]
    scale = head_dim**-0.5 if scale is None else scale
    k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
    scores = (q.float() @ k.float().transpose(-1, -2)) * scale  # [B, H, Lq, Lk]
    if modality_bias is not None:
        bias = torch.tensor([float(b) for b in modality_bias], device=q.device)
        scores = scores + bias[key_modality.clamp(min=0)][:, None, None, :]
    visible = (key_modality >= 0)[:, None, None, :]
    if causal:
        pos = torch.arange(len_q, device=q.device)[:, None] + len_k - len_q
        visible = visible & (torch.arange(len_k, device=q.device) <= pos)
    p = torch.softmax(scores.masked_fill(~visible, -float("inf")), dim=-1).nan_to_num(0.0)
    onehot = torch.nn.functional.one_hot(key_modality.clamp(min=0), num_modalities).float()
    onehot = onehot * (key_modality >= 0)[..., None]  # [B, Lk, M]
    mass = p @ onehot[:, None]  # [B, H, Lq, M]
    present = (visible.float() @ onehot[:, None]) > 0
    bal = torch.zeros(num_modalities, dtype=torch.bool, device=q.device)
    tau = torch.zeros(num_modalities, device=q.device)
    for m, t in zip(balance, target or (1.0,) * len(balance)):
        bal[m], tau[m] = True, t
    in_s = present & bal
    mass_s = (mass * in_s).sum(-1, keepdim=True)
    tau_i = tau * in_s
    tau_i = tau_i / tau_i.sum(-1, keepdim=True).clamp_min(1e-30)
    sigma = mass / mass_s.clamp_min(1e-30)
    deviation = torch.where(in_s, sigma - tau_i, -torch.inf).amax(-1)
    apply = (in_s.sum(-1) >= 2) & (mass_s[..., 0] > 0) & (deviation > threshold)
    if query_mask is not None:
        apply = apply & query_mask[:, None, :]
    new_mass = torch.where(in_s & apply[..., None], (1 - strength) * mass + strength * mass_s * tau_i, mass)
    factor = torch.where(mass > 0, new_mass / mass.clamp_min(1e-30), torch.ones_like(mass))
    p = p * (factor @ onehot[:, None].transpose(-1, -2))  # [B, H, Lq, Lk]
    o = (p @ v.float()).to(q.dtype)
    return (o, mass) if return_masses else o

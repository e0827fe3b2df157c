"""Naive AR attention reference: loops over (batch, head, query), float64, written from DESIGN 2.2.

For every query: the visible keys (causal bottom-right, padding excluded), the softmax over them,
the mass per modality, each modality's own softmax-weighted mean of v, the reallocation of the
balance modalities' masses, and the output ``sum_m P'_m * vbar_m``. Differentiable in float64.
"""

from __future__ import annotations

import math

import torch


def ar_attention_reference(
    q, k, v, key_modality, *, num_modalities, balance=(1, 2), target=None, strength=0.5,
    threshold=0.0, modality_bias=None, causal=True, scale=None, query_mask=None,
):
    """Returns ``(o, masses)``: o (B, Hq, Lq, D) float64, pre-reallocation masses (B, Hq, Lq, M) float64."""
    f64 = torch.float64
    batch, n_q_heads, len_q, head_dim = q.shape
    n_kv_heads, len_k = k.shape[1], k.shape[2]
    group = n_q_heads // n_kv_heads
    scale = 1.0 / math.sqrt(head_dim) if scale is None else scale
    q, k, v = q.to(f64), k.to(f64), v.to(f64)
    balance = list(balance)
    target = [1.0] * len(balance) if target is None else [float(t) for t in target]
    bias = torch.zeros(num_modalities, dtype=f64)
    if modality_bias is not None:
        bias = torch.tensor([float(b) for b in modality_bias], dtype=f64)

    if batch * n_q_heads * len_q == 0:
        return (torch.zeros(batch, n_q_heads, len_q, head_dim, dtype=f64),
                torch.zeros(batch, n_q_heads, len_q, num_modalities, dtype=f64))
    outputs, masses = [], []
    for b in range(batch):
        mod = key_modality[b].long()
        for h in range(n_q_heads):
            kv = h // group
            for i in range(len_q):
                visible = mod >= 0
                if causal:
                    visible = visible & (torch.arange(len_k) <= len_k - len_q + i)
                if not bool(visible.any()):
                    outputs.append(torch.zeros(head_dim, dtype=f64))
                    masses.append(torch.zeros(num_modalities, dtype=f64))
                    continue
                scores = scale * (k[b, kv] @ q[b, h, i]) + bias[mod.clamp(min=0)]  # [Lk]
                p = torch.softmax(scores[visible], dim=0)
                vis_mod = mod[visible]
                present = [m for m in range(num_modalities) if bool((vis_mod == m).any())]
                mass = [p[vis_mod == m].sum() if m in present else torch.zeros((), dtype=f64)
                        for m in range(num_modalities)]
                new_mass = list(mass)

                selected = query_mask is None or bool(query_mask[b, i])
                in_s = [m for m in balance if m in present]
                mass_s = sum(mass[m] for m in in_s) if in_s else 0.0
                if selected and len(in_s) >= 2 and float(mass_s.detach()) > 0:
                    tau_raw = {m: t for m, t in zip(balance, target)}
                    tau_sum = sum(tau_raw[m] for m in in_s)
                    tau = {m: tau_raw[m] / tau_sum for m in in_s}
                    sigma = {m: mass[m] / mass_s for m in in_s}
                    if max(float(sigma[m].detach()) - tau[m] for m in in_s) > threshold:
                        for m in in_s:
                            new_mass[m] = mass_s * ((1 - strength) * sigma[m] + strength * tau[m])

                o = torch.zeros(head_dim, dtype=f64)
                for m in present:
                    keys_m = visible & (mod == m)
                    vbar = torch.softmax(scores[keys_m], dim=0) @ v[b, kv][keys_m]  # modality's own softmax
                    o = o + new_mass[m] * vbar
                outputs.append(o)
                masses.append(torch.stack(mass))
    o = torch.stack(outputs).view(batch, n_q_heads, len_q, head_dim)
    return o, torch.stack(masses).view(batch, n_q_heads, len_q, num_modalities)

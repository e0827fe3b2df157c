"""Naive AR attention reference: loops over (batch, head, query), float64, written from DESIGN 2.2 and 2.2b.

For every query: the visible keys (causal bottom-right, sliding window, padding excluded), the
(soft-capped) scores and their softmax, the mass per modality, each modality's own softmax-weighted
mean of v, the reallocation of the balance modalities' masses (by mass or by contribution
``P_m * ||vbar_m||``), and the output ``sum_m P'_m * vbar_m``. Differentiable in float64.
"""

from __future__ import annotations

import math

import torch


def _targets(target, n_balance, n_q_heads):
    """(Hq, |S|) float64 targets, each row divided by its sum (first by its largest entry)."""
    if target is None:
        rows = torch.ones(n_q_heads, n_balance, dtype=torch.float64)
    else:
        rows = torch.as_tensor(target, dtype=torch.float64).detach().cpu()
        rows = rows.expand(n_q_heads, n_balance) if rows.dim() == 1 else rows
    if n_balance == 0:
        return rows
    rows = rows / rows.amax(-1, keepdim=True)
    return rows / rows.sum(-1, keepdim=True)


def ar_attention_reference(
    q, k, v, key_modality, *, num_modalities, balance=(1, 2), target=None, strength=0.5,
    threshold=0.0, modality_bias=None, causal=True, scale=None, query_mask=None, window=None,
    softcap=None, balance_by="mass",
):
    """Returns ``(o, masses)``: o (B, Hq, Lq, D) float64, pre-reallocation masses (B, Hq, Lq, M) float64.

    ``target``: None, |S| floats, an (|S|,) or (Hq, |S|) tensor or nested sequence (one row per
    query head); raw (positive) or normalised, the reference normalises it itself.
    """
    f64 = torch.float64
    batch, n_q_heads, len_q, head_dim = q.shape
    n_kv_heads, len_k = k.shape[1], k.shape[2]
    group = n_q_heads // n_kv_heads
    scale = 1.0 / math.sqrt(head_dim) if scale is None else scale
    q, k, v = q.to(f64), k.to(f64), v.to(f64)
    balance = list(balance)
    head_targets = _targets(target, len(balance), n_q_heads)  # [Hq, |S|]
    bias = torch.zeros(num_modalities, dtype=f64)
    if modality_bias is not None:
        bias = torch.tensor([float(b) for b in modality_bias], dtype=f64)
    key_pos = torch.arange(len_k)

    if batch * n_q_heads * len_q == 0:
        return (torch.zeros(batch, n_q_heads, len_q, head_dim, dtype=f64),
                torch.zeros(batch, n_q_heads, len_q, num_modalities, dtype=f64))
    outputs, masses = [], []
    for b in range(batch):
        mod = key_modality[b].long().cpu()
        for h in range(n_q_heads):
            kv = h // group
            tau_raw = dict(zip(balance, head_targets[h].tolist()))
            for i in range(len_q):
                pos = len_k - len_q + i
                visible = mod >= 0
                if causal:
                    visible = visible & (key_pos <= pos)
                if window is not None:
                    visible = visible & (pos - key_pos >= 0) & (pos - key_pos < window)
                if not bool(visible.any()):
                    outputs.append(torch.zeros(head_dim, dtype=f64))
                    masses.append(torch.zeros(num_modalities, dtype=f64))
                    continue
                scores = scale * (k[b, kv] @ q[b, h, i])  # [Lk]
                if softcap is not None:
                    scores = softcap * torch.tanh(scores / softcap)
                scores = scores + bias[mod.clamp(min=0)]
                p = torch.softmax(scores[visible], dim=0)
                vis_mod = mod[visible]
                present = [m for m in range(num_modalities) if bool((vis_mod == m).any())]
                mass = [p[vis_mod == m].sum() if m in present else torch.zeros((), dtype=f64)
                        for m in range(num_modalities)]
                vbar = {}
                for m in present:
                    keys_m = visible & (mod == m)
                    vbar[m] = torch.softmax(scores[keys_m], dim=0) @ v[b, kv][keys_m]  # modality's own softmax

                selected = query_mask is None or bool(query_mask[b, i])
                new_mass = list(mass)
                if selected:
                    if balance_by == "contribution":
                        new_mass = _by_contribution(mass, vbar, balance, tau_raw, strength, threshold)
                    else:
                        new_mass = _by_mass(mass, present, balance, tau_raw, strength, threshold)
                o = torch.zeros(head_dim, dtype=f64)
                for m in present:
                    o = o + new_mass[m] * vbar[m]
                outputs.append(o)
                masses.append(torch.stack(mass))
    o = torch.stack(outputs).view(batch, n_q_heads, len_q, head_dim)
    return o, torch.stack(masses).view(batch, n_q_heads, len_q, num_modalities)


def _moved(amount, in_s, tau_raw, strength, threshold):
    """DESIGN 2.2 step 3 on ``amount`` (masses or contributions) of the modalities ``in_s``:
    the new amounts, or None when nothing changes."""
    total = sum(amount[m] for m in in_s) if in_s else 0.0
    tau_sum = sum(tau_raw[m] for m in in_s)
    if len(in_s) < 2 or float(total.detach()) <= 0 or tau_sum <= 0:
        return None
    tau = {m: tau_raw[m] / tau_sum for m in in_s}
    sigma = {m: amount[m] / total for m in in_s}
    if not max(float(sigma[m].detach()) - tau[m] for m in in_s) > threshold:
        return None
    return {m: total * ((1 - strength) * sigma[m] + strength * tau[m]) for m in in_s}


def _by_mass(mass, present, balance, tau_raw, strength, threshold):
    in_s = [m for m in balance if m in present]
    moved = _moved(mass, in_s, tau_raw, strength, threshold)
    return list(mass) if moved is None else [moved.get(m, mass[m]) for m in range(len(mass))]


def _by_contribution(mass, vbar, balance, tau_raw, strength, threshold):
    """Step 3 on ``c_m = P_m * ||vbar_m||``; then ``P'_m`` proportional to ``c'_m / ||vbar_m||`` with
    the mass of those modalities kept. A modality with ``||vbar_m|| = 0`` is left out (keeps its mass)."""
    norm = {m: torch.linalg.vector_norm(vbar[m]) for m in vbar}
    in_s = [m for m in balance if m in vbar and float(norm[m].detach()) > 0]
    contribution = {m: mass[m] * norm[m] for m in in_s}
    moved = _moved(contribution, in_s, tau_raw, strength, threshold)
    if moved is None:
        return list(mass)
    mass_s = sum(mass[m] for m in in_s)
    weight = {m: moved[m] / norm[m] for m in in_s}
    weight_sum = sum(weight.values())
    return [mass_s * weight[m] / weight_sum if m in in_s else mass[m] for m in range(len(mass))]

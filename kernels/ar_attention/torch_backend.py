"""PyTorch backend of AR attention: a real CPU path, exact, with bounded memory.

Queries are processed in chunks, so the largest temporary is (B, Hq, chunk, Lk), never (Lq, Lk);
with gradients, each chunk is checkpointed (recomputed in backward), so training keeps that bound.
Within a chunk, each modality keeps its own max: ``p_j = exp(s_j - max_{mu(j)})`` and
``l_m = sum_{mu(j) = m} p_j``. From these come the masses ``P_m`` (pre-reallocation), the
reallocated masses ``P'_m`` and the output in a single ``P @ V``:

    o = sum_j (P'_{mu(j)} / l_{mu(j)}) * p_j * v_j = sum_m P'_m * vbar_m

which is DESIGN 2.2's definition (each modality's mean under its own softmax), so a modality whose
mass underflows still receives its reallocated mass. The static ``modality_bias`` is constant within a
modality: it cancels in ``vbar_m`` and is applied to the per-modality maxima when the masses are
formed, which keeps a bias of -1e4 from eating the scores' float32 precision. GQA: query heads are viewed as
(Hkv, group) and multiply the shared K/V head directly; K/V are never repeated. With causal
masking, a chunk only reads the keys its last query can see.
"""

from __future__ import annotations

import functools

import torch
from torch.utils.checkpoint import checkpoint

from ..alloc import empty_output

# Query rows per chunk: the chunk's float32 scores (B * Hq * rows * Lk) should stay near the CPU's
# cache size (measured on 2 cores: 64-128 rows at Lk = 512 and 32 at Lk = 2048 beat larger chunks by
# 2-3x), and its temporaries (~4 live tensors of that shape) within a fixed memory bound.
_CHUNK_CACHE_BYTES = 2 * 2**20
_CHUNK_MAX_BYTES = 128 * 2**20
_BYTES_PER_SCORE = 16


def reallocate_masses(mass, has_key, *, in_balance, tau, strength, threshold, selected):
    """DESIGN 2.2 step 3 on a batch of queries.

    mass, has_key: (..., M) pre-reallocation masses and "modality has a visible key";
    in_balance: (M,) bool; tau: (M,) float32 raw targets (zero outside the balance set);
    selected: bool tensor broadcastable to mass[..., 0]. Returns the masses P' (..., M).
    """
    in_s = has_key & in_balance  # [.., M] S_i
    mass_s = (mass * in_s).sum(-1, keepdim=True)  # [.., 1]
    tau_i = tau * in_s
    tau_i = tau_i / tau_i.sum(-1, keepdim=True).clamp_min(1e-30)
    sigma = mass / mass_s.clamp_min(1e-30)
    deviation = torch.where(in_s, sigma - tau_i, torch.full_like(sigma, -float("inf"))).amax(-1)
    apply = (in_s.sum(-1) >= 2) & (mass_s.squeeze(-1) > 0) & (deviation > threshold) & selected
    moved = (1 - strength) * mass + strength * mass_s * tau_i  # = P_S * ((1 - a) sigma + a tau)
    return torch.where(in_s & apply.unsqueeze(-1), moved, mass)


def _chunk_size(batch, n_q_heads, len_k, len_q):
    row_bytes = max(1, batch * n_q_heads * len_k * 4)
    rows = min(128, max(16, _CHUNK_CACHE_BYTES // row_bytes))
    rows = min(rows, max(1, _CHUNK_MAX_BYTES // (row_bytes * _BYTES_PER_SCORE // 4)))
    return max(1, min(len_q, rows))


def ar_attention_torch(
    q, k, v, key_modality, *, num_modalities, balance, target, strength, threshold, modality_bias,
    causal, scale, query_mask, return_masses, chunk_size=None,
):
    """AR attention for validated inputs. ``balance``/``target`` are tuples (target raw, positive),
    ``modality_bias`` a tuple or None, ``scale`` a float. Returns ``o`` or ``(o, masses float32)``."""
    batch, n_q_heads, len_q, head_dim = q.shape
    n_kv_heads, len_k = k.shape[1], k.shape[2]
    group = n_q_heads // n_kv_heads
    n_mod = num_modalities
    device = q.device
    f32 = torch.float32

    q_grouped = q.view(batch, n_kv_heads, group, len_q, head_dim)  # no copy
    k32, v32 = k.to(f32), v.to(f32)  # one conversion per KV head, not per query head
    # Key class: its modality, padding -> the extra class n_mod (never visible).
    key_class = torch.where(key_modality >= 0, key_modality.long(), n_mod)  # [B, Lk]
    bias = torch.zeros(n_mod, dtype=f32, device=device)
    if modality_bias is not None:
        bias = torch.tensor(modality_bias, dtype=f32, device=device)
    key_valid = key_modality >= 0  # [B, Lk]
    in_balance = torch.zeros(n_mod, dtype=torch.bool, device=device)
    tau = torch.zeros(n_mod, dtype=f32, device=device)
    targets = target if target is not None else (1.0,) * len(balance)
    for m, t in zip(balance, targets):
        in_balance[m] = True
        tau[m] = t

    o = empty_output((batch, n_kv_heads, group, len_q, head_dim), dtype=q.dtype, device=device)
    masses = empty_output((batch, n_kv_heads, group, len_q, n_mod), dtype=f32, device=device)
    # Differentiable results are assembled from chunks; without grad they go straight into o/masses.
    needs_grad = torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v))
    o_chunks, mass_chunks = [], []

    chunk = chunk_size or _chunk_size(batch, n_q_heads, len_k, len_q)
    for start in range(0, len_q, chunk):
        stop = min(len_q, start + chunk)
        n_rows = stop - start
        # Keys visible to the chunk's last query (bottom-right causal alignment).
        k_stop = min(len_k, max(0, len_k - len_q + stop)) if causal else len_k
        if k_stop == 0:
            o_c = torch.zeros(batch, n_kv_heads, group, n_rows, head_dim, dtype=f32, device=device)
            m_c = torch.zeros(batch, n_kv_heads, group, n_rows, n_mod, dtype=f32, device=device)
        else:
            attend = functools.partial(
                _attend_chunk, first_query_pos=len_k - len_q + start, causal=causal, scale=scale, n_mod=n_mod,
                in_balance=in_balance, tau=tau, strength=strength, threshold=threshold,
                selected=None if query_mask is None else query_mask[:, None, None, start:stop],
            )
            chunk_args = (q_grouped[:, :, :, start:stop], k32[:, :, :k_stop], v32[:, :, :k_stop],
                          key_class[:, :k_stop], key_valid[:, :k_stop], bias)
            if needs_grad:  # recompute the chunk in backward: memory stays O(chunk * Lk) for training too
                o_c, m_c = checkpoint(attend, *chunk_args, use_reentrant=False)
            else:
                o_c, m_c = attend(*chunk_args)
        if needs_grad:
            o_chunks.append(o_c)
            mass_chunks.append(m_c)
        else:
            o[:, :, :, start:stop] = o_c
            masses[:, :, :, start:stop] = m_c
    if needs_grad:
        o = torch.cat(o_chunks, dim=3).to(q.dtype) if o_chunks else o
        masses = torch.cat(mass_chunks, dim=3) if mass_chunks else masses
    o = o.view(batch, n_q_heads, len_q, head_dim)
    if return_masses:
        return o, masses.detach().view(batch, n_q_heads, len_q, n_mod)
    return o


def _attend_chunk(q_c, k32, v32, key_class, key_valid, bias, *, first_query_pos, causal, scale,
                  n_mod, in_balance, tau, strength, threshold, selected):
    """One query chunk: returns (o float32 [B, Hkv, G, c, D], masses float32 [B, Hkv, G, c, M])."""
    batch, n_kv_heads, group, n_rows, head_dim = q_c.shape
    len_k = k32.shape[2]
    q32 = q_c.to(torch.float32).reshape(batch, n_kv_heads, group * n_rows, head_dim) * scale
    scores = (q32 @ k32.transpose(-1, -2)).view(batch, n_kv_heads, group, n_rows, len_k)  # [B,Hkv,G,c,Lk]
    visible = key_valid[:, None, None, None, :]  # [B,1,1,1,Lk]
    if causal:
        query_pos = first_query_pos + torch.arange(n_rows, device=q_c.device)
        visible = visible & (torch.arange(len_k, device=q_c.device) <= query_pos[:, None])  # [.., c, Lk]
    scores = scores.masked_fill(~visible, -float("inf"))
    one_hot = torch.nn.functional.one_hot(key_class, n_mod + 1)[..., :n_mod].to(torch.float32)  # [B,Lk,M]
    one_hot = one_hot[:, None, None]  # [B,1,1,Lk,M]; padding keys have no modality
    has_key = (visible.to(torch.float32) @ one_hot) > 0  # [B,1,1,c|1,M] modality has a visible key

    # Probabilities relative to one shift per row; each modality's own max only when a modality
    # with visible keys underflows against the row's max (then its mean would lose precision).
    p, class_max, class_sum = _row_max_probs(scores, one_hot, n_mod)
    if bool((has_key & (class_sum < _UNDERFLOW)).any()):
        p, class_max, class_sum = _modality_max_probs(scores, key_class, n_mod)

    # Pre-reallocation masses, all relative to the global max; the static bias shifts a whole modality.
    class_max = class_max + bias
    global_max = torch.where(has_key, class_max, torch.full_like(class_max, -float("inf"))).amax(-1, True)
    global_max = torch.where(torch.isfinite(global_max), global_max, torch.zeros_like(global_max))
    z = torch.where(has_key, class_sum * torch.exp(class_max - global_max), torch.zeros_like(class_sum))
    mass = z / z.sum(-1, keepdim=True).clamp_min(1e-30)  # zeros for a query without visible keys

    if selected is None:
        selected = torch.ones((), dtype=torch.bool, device=q_c.device)
    new_mass = reallocate_masses(mass, has_key, in_balance=in_balance, tau=tau, strength=strength,
                                 threshold=threshold, selected=selected)
    per_class = torch.where(has_key, new_mass / class_sum.clamp_min(1e-30), torch.zeros_like(new_mass))
    weights = p * (per_class @ one_hot.transpose(-1, -2))  # [B,Hkv,G,c,Lk]: P'_m / l_m on each key of m
    o = weights.view(batch, n_kv_heads, group * n_rows, len_k) @ v32  # [B,Hkv,G*c,D]
    return o.view(batch, n_kv_heads, group, n_rows, head_dim), mass


# A modality's probability sum below this (relative to its row's max) is recomputed under the
# modality's own max: its mean of v would otherwise be built from denormal probabilities.
_UNDERFLOW = 1e-30


def _row_max_probs(scores, one_hot, n_mod):
    """p = exp(s - row max) and, per modality, the shift used (the row max) and sum of p (matmuls)."""
    row_max = scores.detach().amax(-1, keepdim=True)  # a constant shift: the gradient is unchanged
    row_max = torch.where(torch.isfinite(row_max), row_max, torch.zeros_like(row_max))
    p = torch.exp(scores - row_max)  # 0 where invisible
    return p, row_max.expand(*row_max.shape[:-1], n_mod), p @ one_hot


def _modality_max_probs(scores, key_class, n_mod):
    """p_j = exp(s_j - max of j's modality): each modality's own shift and sum (the exact path)."""
    index = key_class[:, None, None, None, :].expand_as(scores)
    class_max = torch.full((*scores.shape[:-1], n_mod + 1), -float("inf"), device=scores.device)
    class_max = class_max.scatter_reduce(-1, index, scores.detach(), reduce="amax")  # [.., M+1]
    class_max = torch.where(torch.isfinite(class_max), class_max, torch.zeros_like(class_max))
    p = torch.exp(scores - class_max.gather(-1, index))  # 0 where invisible; <= 1
    class_sum = torch.zeros_like(class_max).scatter_add(-1, index, p)  # [.., M+1]
    return p, class_max[..., :n_mod], class_sum[..., :n_mod]

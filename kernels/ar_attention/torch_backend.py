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
masking, a chunk only reads the keys its last query can see; with a sliding ``window``, only those
its first query can still see too (about window + chunk keys, not Lk). ``softcap`` is applied to
the scaled scores before the bias (``c * tanh(s / c)``).

Balancing by contribution (DESIGN 2.2b) needs ``||vbar_m||`` before the output: then one batched
matmul gives the |S| + 1 means (each balance modality's ``vbar_m`` and the other modalities' fixed
part) and the output is their combination with the reallocated masses.
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


def is_per_head(target) -> bool:
    """Whether a validated target holds one row per query head (a tuple of tuples)."""
    return target is not None and len(target) > 0 and isinstance(target[0], tuple)


def balance_tables(num_modalities, balance, target, device):
    """``(in_balance, tau)`` for ``reallocate_masses``: in_balance (M,) bool; tau float32 targets
    (zero outside the balance set), (M,) for one target or (Hq, M) for per-head targets (``target`` a
    tuple of Hq rows). Built from Python values (graph constants when exported, no index writes)."""
    per_head = is_per_head(target)
    rows = target if per_head else [(1.0,) * len(balance) if target is None else target]
    tau = torch.tensor([[dict(zip(balance, row)).get(m, 0.0) for m in range(num_modalities)] for row in rows],
                       dtype=torch.float32, device=device)
    in_balance = torch.tensor([m in balance for m in range(num_modalities)], dtype=torch.bool, device=device)
    return in_balance, (tau if per_head else tau[0])


def slot_table(num_modalities, balance, device):
    """[|S|, M] float32 one-hot: balance slot s -> its modality (from Python values: a graph constant)."""
    table = [[float(m == b) for m in range(num_modalities)] for b in balance]
    return torch.tensor(table, dtype=torch.float32, device=device).reshape(len(balance), num_modalities)


def reallocate_masses(mass, has_key, *, in_balance, tau, strength, threshold, selected, vbar_norm=None):
    """DESIGN 2.2 step 3 (and 2.2b's contribution balancing) on a batch of queries.

    mass, has_key: (..., M) pre-reallocation masses and "modality has a visible key";
    in_balance: (M,) bool; tau: float32 targets broadcastable to mass (zero outside the balance set);
    selected: bool tensor broadcastable to mass[..., 0]. ``vbar_norm`` (..., M): None balances
    masses; given, it balances contributions ``c_m = P_m * ||vbar_m||`` (modalities with a zero norm
    are left out and keep their mass) and returns ``P'_m`` proportional to ``c'_m / ||vbar_m||``, the
    mass of the balanced modalities kept. Returns the masses P' (..., M).
    """
    if strength == 0:  # nothing moves: P' is P exactly (strength 0 is plain attention)
        return mass
    in_s = has_key & in_balance  # [.., M] S_i
    amount = mass
    if vbar_norm is not None:
        in_s = in_s & (vbar_norm > 0)
        # Norms relative to the largest one: the same shares, and c'/||vbar|| cannot overflow.
        norm_max = torch.where(in_s, vbar_norm, torch.zeros_like(vbar_norm)).amax(-1, keepdim=True)
        rel_norm = torch.where(in_s, vbar_norm / norm_max.clamp_min(1e-30), torch.ones_like(vbar_norm))
        rel_norm = rel_norm.clamp_min(1e-30)
        amount = mass * rel_norm  # c_m / max_n ||vbar_n||
    amount_s = (amount * in_s).sum(-1, keepdim=True)  # [.., 1]
    tau_i = tau * in_s
    tau_s = tau_i.sum(-1, keepdim=True)
    tau_i = tau_i / tau_s.clamp_min(1e-30)
    sigma = amount / amount_s.clamp_min(1e-30)
    deviation = torch.where(in_s, sigma - tau_i, torch.full_like(sigma, -float("inf"))).amax(-1)
    apply = (in_s.sum(-1) >= 2) & (amount_s.squeeze(-1) > 0) & (tau_s.squeeze(-1) > 0) & (deviation > threshold)
    apply = apply & selected
    moved = (1 - strength) * amount + strength * amount_s * tau_i  # = A_S * ((1 - a) sigma + a tau)
    if vbar_norm is not None:
        weight = torch.where(in_s, moved / rel_norm, torch.zeros_like(moved))  # c'_m / ||vbar_m||, scaled
        mass_s = (mass * in_s).sum(-1, keepdim=True)
        moved = mass_s * weight / weight.sum(-1, keepdim=True).clamp_min(1e-30)
    return torch.where(in_s & apply.unsqueeze(-1), moved, mass)


def _chunk_size(batch, n_q_heads, len_k, len_q, *, n_weight_rows=1):
    row_bytes = max(1, batch * n_q_heads * len_k * 4)
    rows = min(128, max(16, _CHUNK_CACHE_BYTES // row_bytes))
    rows = min(rows, max(1, _CHUNK_MAX_BYTES // (row_bytes * (_BYTES_PER_SCORE // 4 + n_weight_rows - 1))))
    return max(1, min(len_q, rows))


def ar_attention_torch(
    q, k, v, key_modality, *, num_modalities, balance, target, strength, threshold, modality_bias,
    causal, scale, query_mask, return_masses, window=None, softcap=None, balance_by="mass", chunk_size=None,
):
    """AR attention for validated inputs (``mosear_fast._validation.check_ar_args``): ``balance`` a
    tuple; ``target`` None, a tuple of |S| floats or a tuple of Hq such tuples; ``modality_bias`` a
    tuple or None; ``scale`` a float; ``window`` None or an int >= 1 (causal); ``softcap`` None or a
    float > 0; ``balance_by`` "mass" or "contribution". Returns ``o`` or ``(o, masses float32)``."""
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
    in_balance, tau = balance_tables(n_mod, balance, target, device)
    if tau.dim() == 2:  # per query head: [Hq, M] -> [Hkv, G, 1, M] against the chunk's [B, Hkv, G, c, M]
        tau = tau.view(n_kv_heads, group, 1, n_mod)
    # strength 0 moves nothing: plain attention through the single P @ V whatever balance_by says
    to_slots = slot_table(n_mod, balance, device) if balance_by == "contribution" and strength > 0 else None

    o = empty_output((batch, n_kv_heads, group, len_q, head_dim), dtype=q.dtype, device=device)
    masses = empty_output((batch, n_kv_heads, group, len_q, n_mod), dtype=f32, device=device)
    # Differentiable results are assembled from chunks; without grad they go straight into o/masses.
    needs_grad = torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v))
    o_chunks, mass_chunks = [], []

    # A chunk reads only the keys its queries may see: with a window, about window + chunk keys.
    keys_per_chunk = len_k if window is None else min(len_k, window)
    chunk = chunk_size or _chunk_size(batch, n_q_heads, keys_per_chunk, len_q,
                                      n_weight_rows=1 if to_slots is None else len(balance) + 1)
    for start in range(0, len_q, chunk):
        stop = min(len_q, start + chunk)
        n_rows = stop - start
        first_pos = len_k - len_q + start  # bottom-right alignment: query i sits at Lk - Lq + i
        # Keys visible to the chunk's last query (causal) and to its first query (window).
        k_stop = min(len_k, max(0, first_pos + n_rows)) if causal else len_k
        k_start = 0 if window is None else min(k_stop, max(0, first_pos - window + 1))
        if k_stop == k_start:
            o_c = torch.zeros(batch, n_kv_heads, group, n_rows, head_dim, dtype=f32, device=device)
            m_c = torch.zeros(batch, n_kv_heads, group, n_rows, n_mod, dtype=f32, device=device)
        else:
            attend = functools.partial(
                _attend_chunk, first_query_pos=first_pos - k_start, causal=causal, window=window,
                softcap=softcap, scale=scale, n_mod=n_mod, in_balance=in_balance, tau=tau, strength=strength,
                threshold=threshold, to_slots=to_slots,
                selected=None if query_mask is None else query_mask[:, None, None, start:stop],
            )
            chunk_args = (q_grouped[:, :, :, start:stop], k32[:, :, k_start:k_stop], v32[:, :, k_start:k_stop],
                          key_class[:, k_start:k_stop], key_valid[:, k_start:k_stop], bias)
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


def _attend_chunk(q_c, k32, v32, key_class, key_valid, bias, *, first_query_pos, causal, window, softcap, scale,
                  n_mod, in_balance, tau, strength, threshold, to_slots, selected):
    """One query chunk against a slice of keys (``first_query_pos``: the chunk's first query position
    relative to the slice's first key). Returns (o float32 [B, Hkv, G, c, D], masses float32 [B, Hkv, G, c, M])."""
    batch, n_kv_heads, group, n_rows, head_dim = q_c.shape
    len_k = k32.shape[2]
    q32 = q_c.to(torch.float32).reshape(batch, n_kv_heads, group * n_rows, head_dim) * scale
    scores = (q32 @ k32.transpose(-1, -2)).view(batch, n_kv_heads, group, n_rows, len_k)  # [B,Hkv,G,c,Lk]
    if softcap is not None:
        scores = softcap * torch.tanh(scores / softcap)
    visible = key_valid[:, None, None, None, :]  # [B,1,1,1,Lk]
    if causal:
        # distance pos_i - j of every (query, key) pair; the window keeps 0 <= distance < window
        distance = first_query_pos + torch.arange(n_rows, device=q_c.device)[:, None] \
            - torch.arange(len_k, device=q_c.device)  # [c, Lk]
        in_range = distance >= 0 if window is None else (distance >= 0) & (distance < window)
        visible = visible & in_range
    scores = scores.masked_fill(~visible, -float("inf"))
    one_hot = torch.nn.functional.one_hot(key_class, n_mod + 1)[..., :n_mod].to(torch.float32)  # [B,Lk,M]
    one_hot = one_hot[:, None, None]  # [B,1,1,Lk,M]; padding keys have no modality
    has_key = (visible.to(torch.float32) @ one_hot) > 0  # [B,1,1,c|1,M] modality has a visible key

    # Probabilities relative to one shift per row; each modality's own max only when a modality
    # with visible keys underflows against the row's max (then its mean would lose precision).
    p, class_max, class_sum = _row_max_probs(scores, one_hot, n_mod)
    if bool((has_key & (class_sum < _UNDERFLOW)).any()):
        p, class_max, class_sum = _modality_max_probs(scores, key_class, n_mod)

    if selected is None:
        selected = torch.ones((), dtype=torch.bool, device=q_c.device)
    realloc = functools.partial(reallocate_masses, in_balance=in_balance, tau=tau, strength=strength,
                                threshold=threshold, selected=selected)

    def times_v(weights):  # [B, Hkv, G, c, ..., Lk] @ v: one matmul per KV head, no copy of v
        return (weights.reshape(batch, n_kv_heads, -1, len_k) @ v32).view(*weights.shape[:-1], head_dim)

    return reallocated_output(p, class_max, class_sum, has_key, one_hot, bias, realloc=realloc,
                              to_slots=to_slots, in_balance=in_balance, times_v=times_v)


def reallocated_output(p, class_max, class_sum, has_key, one_hot, bias, *, realloc, to_slots, in_balance,
                       times_v):
    """From the probabilities to the output (shared with the static export form).

    p [.., c, Lk]: ``exp(s_j - class_max[mu(j)])`` (0 where invisible); class_max / class_sum /
    has_key [.., c, M]: each modality's shift, sum of p and "has a visible key"; one_hot [.., Lk, M]
    (broadcastable); bias (M,). ``realloc(mass, has_key, vbar_norm=None)`` is ``reallocate_masses``
    with the call's settings; ``to_slots`` [|S|, M] for balancing by contribution (None: by mass);
    ``times_v(w)`` multiplies weights [.., c, ..., Lk] by v. Returns (o [.., c, D], masses [.., c, M]).
    """
    # Pre-reallocation masses, all relative to the global max; the static bias shifts a whole modality.
    class_max = class_max + bias
    global_max = torch.where(has_key, class_max, torch.full_like(class_max, -float("inf"))).amax(-1, True)
    global_max = torch.where(torch.isfinite(global_max), global_max, torch.zeros_like(global_max))
    z = torch.where(has_key, class_sum * torch.exp(class_max - global_max), torch.zeros_like(class_sum))
    mass = z / z.sum(-1, keepdim=True).clamp_min(1e-30)  # zeros for a query without visible keys

    inv_sum = torch.where(has_key, 1 / class_sum.clamp_min(1e-30), torch.zeros_like(class_sum))  # 1 / l_m
    keys_of = one_hot.transpose(-1, -2)  # [.., M, Lk]
    if to_slots is None:  # balancing by mass: one P @ V
        per_class = realloc(mass, has_key) * inv_sum  # P'_m / l_m
        return times_v(p * (per_class @ keys_of)), mass  # weights P'_m / l_m on each key of m
    # Balancing by contribution: ||vbar_m|| comes first, so |S| + 1 means in one matmul: each balance
    # modality's vbar_m, and the output of the other modalities, whose masses never move.
    fixed = (mass * inv_sum * ~in_balance) @ keys_of  # [.., c, Lk]: P_m / l_m off S
    slot_keys = (to_slots @ keys_of).unsqueeze(-3)  # [.., 1, |S|, Lk]: key j belongs to slot s
    slot_scale = (inv_sum @ to_slots.T).unsqueeze(-1)  # [.., c, |S|, 1]: 1 / l_m of each slot
    means = times_v(torch.cat([p.unsqueeze(-2) * slot_keys * slot_scale, (p * fixed).unsqueeze(-2)], dim=-2))
    vbar, fixed_out = means[..., :-1, :], means[..., -1, :]  # [.., c, |S|, D], [.., c, D]
    new_mass = realloc(mass, has_key, vbar_norm=torch.linalg.vector_norm(vbar, dim=-1) @ to_slots)
    return fixed_out + ((new_mass @ to_slots.T).unsqueeze(-1) * vbar).sum(-2), mass  # + sum_S P'_m vbar_m


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

"""Triton kernels of AR attention (DESIGN 2.2): the fused forward and the split-k merge.

One pass over K and V keeps an online-softmax state (running max ``m``, running sum ``l``,
accumulator ``acc``) per *state slot*: slot ``c < NUM_BAL`` is the balance modality ``balance[c]``,
slot ``NUM_BAL`` ("rest") holds every other modality together. Each balance modality has its own
running max, so its mean ``vbar_m = acc_m / l_m`` stays exact even when its mass underflows
relative to the global max. For the masses of the rest modalities (reported, all M) the rest
state also keeps one running sum per modality, relative to the rest state's max (scalars per row).

Scores stay in natural units: ``p = exp2((s - m) * log2(e))``. Folding log2(e) into the scale
would round |s| ~ 1e4 logits by ~1e-3 before the max is subtracted; multiplying the difference
keeps extreme logits exact for one extra multiply.

A key block whose keys all belong to one slot updates that slot only (one ``P @ V``); a block on a
modality boundary updates each slot present in it, found with a min/max over the block's slot ids.
Blocks of padding only are skipped. Ids outside [0, NUM_MOD) are padding: never read through.

At the end of the pass the masses, the reallocation (step 3) and the output (step 4) are computed
in the same program, or, with split-k (decode), each program writes its partial states and
``ar_split_merge_kernel`` merges them exactly (flash-decoding) before reallocating.

The state slots are explicit variables (Triton has no arrays of tensors): up to 8 balance slots,
each guarded by ``NUM_BAL > c`` at compile time, so unused slots cost nothing.
"""

from __future__ import annotations

import triton
import triton.language as tl

LOG2E = 1.4426950408889634
MAX_BALANCE_SLOTS = 8


# --------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------


@triton.jit
def _empty_state(BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr):
    m = tl.full([BLOCK_M], float("-inf"), tl.float32)  # [BM]
    l = tl.zeros([BLOCK_M], tl.float32)  # [BM]
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)  # [BM, BD]
    return m, l, acc


@triton.jit
def _softmax_step(m_i, s):
    """New running max and the rescale factor / probabilities for the scores s [BM, BN]."""
    m_new = tl.maximum(m_i, tl.max(s, 1))  # [BM]
    # Rows with nothing seen yet keep m = -inf; shifting by 0 there gives alpha = p = 0, never NaN.
    m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)
    alpha = tl.exp2((m_i - m_ref) * 1.4426950408889634)  # [BM]
    p = tl.exp2((s - m_ref[:, None]) * 1.4426950408889634)  # [BM, BN]
    return m_new, alpha, p


@triton.jit
def _dot(a, b, DOT_PREC: tl.constexpr, DOT_UPCAST: tl.constexpr):
    """a @ b with fp32 accumulation. DOT_UPCAST (interpreter only): bf16 operands are widened
    exactly to fp32 first, because the Triton interpreter multiplies bf16 as raw uint16."""
    if DOT_UPCAST:
        a = a.to(tl.float32)
        b = b.to(tl.float32)
    return tl.dot(a, b, input_precision=DOT_PREC)


@triton.jit
def _update_state(m_i, l_i, acc, s, in_slot, v, active, DOT_PREC: tl.constexpr, DOT_UPCAST: tl.constexpr):
    """Online-softmax update of one slot with the keys of the block in that slot (in_slot [BM, BN])."""
    if active:
        s = tl.where(in_slot, s, float("-inf"))
        m_i, alpha, p = _softmax_step(m_i, s)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + _dot(p.to(v.dtype), v, DOT_PREC, DOT_UPCAST)  # [BM, BD]
    return m_i, l_i, acc


@triton.jit
def _update_rest(m_i, l_i, acc, lm, s, in_slot, v, mod, rest_key, active, MP: tl.constexpr,
                 DOT_PREC: tl.constexpr, DOT_UPCAST: tl.constexpr):
    """The rest slot: as ``_update_state`` plus the per-modality sums lm [BM, MP] for the masses."""
    if active:
        s = tl.where(in_slot, s, float("-inf"))
        m_i, alpha, p = _softmax_step(m_i, s)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + _dot(p.to(v.dtype), v, DOT_PREC, DOT_UPCAST)
        lm = lm * alpha[:, None]
        # Usually one modality per block: loop over the range of rest modalities present only.
        mod_lo = tl.min(tl.where(rest_key, mod, MP), 0)
        mod_hi = tl.max(tl.where(rest_key, mod, -1), 0)
        cols = tl.arange(0, MP)
        for mm in range(mod_lo, mod_hi + 1):
            part = tl.sum(tl.where((mod == mm)[None, :], p, 0.0), 1)  # [BM]
            lm += tl.where(cols[None, :] == mm, part[:, None], 0.0)
    return m_i, l_i, acc, lm


@triton.jit
def _put_col(x, value, c, N: tl.constexpr):
    """x[:, c] = value for x [BM, N], value [BM]."""
    return tl.where(tl.arange(0, N)[None, :] == c, value[:, None], x)


@triton.jit
def _sum_col(x, c, N: tl.constexpr):
    """x[:, c] for x [BM, N] (finite values)."""
    return tl.sum(tl.where(tl.arange(0, N)[None, :] == c, x, 0.0), 1)


@triton.jit
def _max_col(x, c, N: tl.constexpr):
    """x[:, c] for x [BM, N] that may hold -inf."""
    return tl.max(tl.where(tl.arange(0, N)[None, :] == c, x, float("-inf")), 1)


@triton.jit
def _reallocate(m_all, l_all, lm_rest, selected, tau_ptr, balmod_ptr, slot_bias_ptr, strength, threshold,
                NUM_BAL: tl.constexpr, NSP: tl.constexpr, MP: tl.constexpr):
    """DESIGN 2.2 steps 2-4 from the final states.

    m_all, l_all [BM, NSP]: per-slot max (-inf: slot has no visible key) and sum, without the
    slot's bias; column NUM_BAL is the rest slot. lm_rest [BM, MP]: per-modality sums of the rest
    slot, relative to its max.
    Returns the pre-reallocation masses [BM, MP] (by modality id) and the weights w [BM, NSP]
    such that o = sum_c w_c * acc_c (w_c = P'_c / l_c).
    """
    cols = tl.arange(0, NSP)
    present = m_all > float("-inf")
    m_all = m_all + tl.load(slot_bias_ptr + cols)[None, :]  # the static bias shifts a slot's whole softmax
    g = tl.max(m_all, 1)  # [BM] global max
    g = tl.where(g > float("-inf"), g, 0.0)
    z = tl.where(present, l_all * tl.exp2((m_all - g[:, None]) * 1.4426950408889634), 0.0)  # [BM, NSP]
    z_total = tl.sum(z, 1)
    inv_total = tl.where(z_total > 0, 1.0 / tl.where(z_total > 0, z_total, 1.0), 0.0)  # 0: no visible key
    mass = z * inv_total[:, None]  # [BM, NSP] P per slot

    tau = tl.load(tau_ptr + cols, mask=cols < NUM_BAL, other=0.0)  # [NSP]
    in_s = present & (cols < NUM_BAL)[None, :]  # S_i
    n_s = tl.sum(in_s.to(tl.int32), 1)
    mass_s = tl.sum(tl.where(in_s, mass, 0.0), 1)  # [BM] P_{i,S_i}
    tau_i = tl.where(in_s, tau[None, :], 0.0)
    tau_i = tau_i / tl.maximum(tl.sum(tau_i, 1), 1e-30)[:, None]  # renormalised over S_i
    sigma = mass / tl.maximum(mass_s, 1e-30)[:, None]
    deviation = tl.max(tl.where(in_s, sigma - tau_i, float("-inf")), 1)
    apply = (n_s >= 2) & (mass_s > 0) & (deviation > threshold) & selected
    moved = (1.0 - strength) * mass + strength * mass_s[:, None] * tau_i
    new_mass = tl.where(in_s & apply[:, None], moved, mass)
    w = tl.where(present, new_mass / tl.where(present, l_all, 1.0), 0.0)  # [BM, NSP]

    # Masses by modality id: the rest modalities from their sums, then each balance slot.
    m_rest = _max_col(m_all, NUM_BAL, NSP)
    rest_scale = tl.where(m_rest > float("-inf"),
                          tl.exp2((m_rest - g) * 1.4426950408889634) * inv_total, 0.0)  # [BM]
    masses = lm_rest * rest_scale[:, None]  # [BM, MP]
    mod_cols = tl.arange(0, MP)
    for c in tl.static_range(NUM_BAL):
        modality = tl.load(balmod_ptr + c)
        masses = tl.where(mod_cols[None, :] == modality, _sum_col(mass, c, NSP)[:, None], masses)
    return masses, w


@triton.jit
def _store_slot(part_m_ptr, part_l_ptr, part_acc_ptr, base, c, rows, row_ok, len_q, m_i, l_i, acc,
                NSP: tl.constexpr, BLOCK_D: tl.constexpr):
    """Partial state of slot c for the split-k merge. base = bh * num_splits + split."""
    off = (base.to(tl.int64) * NSP + c) * len_q + rows  # [BM]
    tl.store(part_m_ptr + off, m_i, mask=row_ok)
    tl.store(part_l_ptr + off, l_i, mask=row_ok)
    d = tl.arange(0, BLOCK_D)
    tl.store(part_acc_ptr + off[:, None] * BLOCK_D + d[None, :], acc, mask=row_ok[:, None])


# --------------------------------------------------------------------------------------------
# forward
# --------------------------------------------------------------------------------------------


@triton.jit
def ar_attention_fwd_kernel(
    q_ptr, k_ptr, v_ptr, mod_ptr, qmask_ptr, slot_ptr, key_bias_ptr, slot_bias_ptr, tau_ptr, balmod_ptr,
    o_ptr, masses_ptr, part_m_ptr, part_l_ptr, part_lm_ptr, part_acc_ptr,
    stride_qb, stride_qh, stride_ql, stride_qd,
    stride_kb, stride_kh, stride_kl, stride_kd,
    stride_vb, stride_vh, stride_vl, stride_vd,
    stride_modb, stride_modl, stride_qmb, stride_qml,
    stride_ob, stride_oh, stride_ol, stride_od,
    stride_mb, stride_mh, stride_ml, stride_mm,
    len_q, len_k, n_q_heads, group, keys_per_split, num_splits,
    scale, strength, threshold,
    HEAD_DIM: tl.constexpr, NUM_MOD: tl.constexpr, NUM_BAL: tl.constexpr, NSP: tl.constexpr,
    MP: tl.constexpr, HAS_REST: tl.constexpr, CAUSAL: tl.constexpr, HAS_KEY_BIAS: tl.constexpr,
    HAS_QMASK: tl.constexpr, RETURN_MASSES: tl.constexpr, SPLIT: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, DOT_PREC: tl.constexpr,
    DOT_UPCAST: tl.constexpr,
):
    """Grid (cdiv(Lq, BLOCK_M), B * Hq, num_splits). One program: BLOCK_M queries of one head
    against the keys of its split ([split * keys_per_split, ...), all keys without split)."""
    pid_m = tl.program_id(0)
    bh = tl.program_id(1)
    split = tl.program_id(2)
    b = (bh // n_q_heads).to(tl.int64)
    h = bh % n_q_heads
    kvh = (h // group).to(tl.int64)  # GQA: no repeat of K/V

    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)  # [BM]
    row_ok = rows < len_q
    d = tl.arange(0, BLOCK_D)
    d_ok = d < HEAD_DIM
    q = tl.load(q_ptr + b * stride_qb + h.to(tl.int64) * stride_qh + rows[:, None] * stride_ql
                + d[None, :] * stride_qd, mask=row_ok[:, None] & d_ok[None, :], other=0.0)  # [BM, BD]
    q_pos = len_k - len_q + rows  # bottom-right causal alignment; < 0: sees no key

    k_base = k_ptr + b * stride_kb + kvh * stride_kh
    v_base = v_ptr + b * stride_vb + kvh * stride_vh
    lo = split * keys_per_split
    hi = tl.minimum(lo + keys_per_split, len_k)
    if CAUSAL:  # keys after the block's last query are never visible
        hi = tl.minimum(hi, len_k - len_q + pid_m * BLOCK_M + BLOCK_M)

    m0, l0, acc0 = _empty_state(BLOCK_M, BLOCK_D)
    m1, l1, acc1 = _empty_state(BLOCK_M, BLOCK_D)
    m2, l2, acc2 = _empty_state(BLOCK_M, BLOCK_D)
    m3, l3, acc3 = _empty_state(BLOCK_M, BLOCK_D)
    m4, l4, acc4 = _empty_state(BLOCK_M, BLOCK_D)
    m5, l5, acc5 = _empty_state(BLOCK_M, BLOCK_D)
    m6, l6, acc6 = _empty_state(BLOCK_M, BLOCK_D)
    m7, l7, acc7 = _empty_state(BLOCK_M, BLOCK_D)
    m_r, l_r, acc_r = _empty_state(BLOCK_M, BLOCK_D)
    lm_r = tl.zeros([BLOCK_M, MP], tl.float32)  # rest slot: per-modality sums

    for start_n in range(lo, hi, BLOCK_N):
        cols = start_n + tl.arange(0, BLOCK_N)  # [BN]
        col_ok = cols < hi
        mod = tl.load(mod_ptr + b * stride_modb + cols * stride_modl, mask=col_ok, other=-1).to(tl.int32)
        valid = (mod >= 0) & (mod < NUM_MOD)  # out-of-range ids are padding
        mod = tl.where(valid, mod, 0)
        slot = tl.where(valid, tl.load(slot_ptr + mod), -1)  # [BN]
        slot_hi = tl.max(slot, 0)
        slot_lo = tl.min(tl.where(valid, slot, NSP), 0)
        if slot_hi >= 0:  # skip blocks of padding only
            kv_mask = col_ok[:, None] & d_ok[None, :]
            k = tl.load(k_base + cols[:, None] * stride_kl + d[None, :] * stride_kd, mask=kv_mask, other=0.0)
            v = tl.load(v_base + cols[:, None] * stride_vl + d[None, :] * stride_vd, mask=kv_mask, other=0.0)
            s = _dot(q, tl.trans(k), DOT_PREC, DOT_UPCAST) * scale  # [BM, BN]
            if HAS_KEY_BIAS:  # bias relative to the key's slot bias (added to the slot max at the end)
                s += tl.load(key_bias_ptr + mod)[None, :]
            visible = valid[None, :]  # [1, BN] or [BM, BN]
            if CAUSAL:
                visible = visible & (cols[None, :] <= q_pos[:, None])
            if NUM_BAL > 0:
                m0, l0, acc0 = _update_state(m0, l0, acc0, s, visible & (slot == 0)[None, :], v,
                                             slot_lo <= 0, DOT_PREC, DOT_UPCAST)
            if NUM_BAL > 1:
                m1, l1, acc1 = _update_state(m1, l1, acc1, s, visible & (slot == 1)[None, :], v,
                                             (slot_lo <= 1) & (slot_hi >= 1), DOT_PREC, DOT_UPCAST)
            if NUM_BAL > 2:
                m2, l2, acc2 = _update_state(m2, l2, acc2, s, visible & (slot == 2)[None, :], v,
                                             (slot_lo <= 2) & (slot_hi >= 2), DOT_PREC, DOT_UPCAST)
            if NUM_BAL > 3:
                m3, l3, acc3 = _update_state(m3, l3, acc3, s, visible & (slot == 3)[None, :], v,
                                             (slot_lo <= 3) & (slot_hi >= 3), DOT_PREC, DOT_UPCAST)
            if NUM_BAL > 4:
                m4, l4, acc4 = _update_state(m4, l4, acc4, s, visible & (slot == 4)[None, :], v,
                                             (slot_lo <= 4) & (slot_hi >= 4), DOT_PREC, DOT_UPCAST)
            if NUM_BAL > 5:
                m5, l5, acc5 = _update_state(m5, l5, acc5, s, visible & (slot == 5)[None, :], v,
                                             (slot_lo <= 5) & (slot_hi >= 5), DOT_PREC, DOT_UPCAST)
            if NUM_BAL > 6:
                m6, l6, acc6 = _update_state(m6, l6, acc6, s, visible & (slot == 6)[None, :], v,
                                             (slot_lo <= 6) & (slot_hi >= 6), DOT_PREC, DOT_UPCAST)
            if NUM_BAL > 7:
                m7, l7, acc7 = _update_state(m7, l7, acc7, s, visible & (slot == 7)[None, :], v,
                                             (slot_lo <= 7) & (slot_hi >= 7), DOT_PREC, DOT_UPCAST)
            if HAS_REST:
                rest_key = slot == NUM_BAL  # [BN]
                m_r, l_r, acc_r, lm_r = _update_rest(m_r, l_r, acc_r, lm_r, s, visible & rest_key[None, :], v,
                                                     mod, rest_key, slot_hi >= NUM_BAL, MP,
                                                     DOT_PREC, DOT_UPCAST)

    if SPLIT:
        # Partial states for ar_split_merge_kernel; every slot is written, seen or not.
        base = bh * num_splits + split
        if NUM_BAL > 0:
            _store_slot(part_m_ptr, part_l_ptr, part_acc_ptr, base, 0, rows, row_ok, len_q,
                        m0, l0, acc0, NSP, BLOCK_D)
        if NUM_BAL > 1:
            _store_slot(part_m_ptr, part_l_ptr, part_acc_ptr, base, 1, rows, row_ok, len_q,
                        m1, l1, acc1, NSP, BLOCK_D)
        if NUM_BAL > 2:
            _store_slot(part_m_ptr, part_l_ptr, part_acc_ptr, base, 2, rows, row_ok, len_q,
                        m2, l2, acc2, NSP, BLOCK_D)
        if NUM_BAL > 3:
            _store_slot(part_m_ptr, part_l_ptr, part_acc_ptr, base, 3, rows, row_ok, len_q,
                        m3, l3, acc3, NSP, BLOCK_D)
        if NUM_BAL > 4:
            _store_slot(part_m_ptr, part_l_ptr, part_acc_ptr, base, 4, rows, row_ok, len_q,
                        m4, l4, acc4, NSP, BLOCK_D)
        if NUM_BAL > 5:
            _store_slot(part_m_ptr, part_l_ptr, part_acc_ptr, base, 5, rows, row_ok, len_q,
                        m5, l5, acc5, NSP, BLOCK_D)
        if NUM_BAL > 6:
            _store_slot(part_m_ptr, part_l_ptr, part_acc_ptr, base, 6, rows, row_ok, len_q,
                        m6, l6, acc6, NSP, BLOCK_D)
        if NUM_BAL > 7:
            _store_slot(part_m_ptr, part_l_ptr, part_acc_ptr, base, 7, rows, row_ok, len_q,
                        m7, l7, acc7, NSP, BLOCK_D)
        if HAS_REST:
            _store_slot(part_m_ptr, part_l_ptr, part_acc_ptr, base, NUM_BAL, rows, row_ok, len_q,
                        m_r, l_r, acc_r, NSP, BLOCK_D)
            mod_cols = tl.arange(0, MP)
            lm_off = (base * MP + mod_cols[None, :]) * len_q + rows[:, None]  # [BM, MP]
            tl.store(part_lm_ptr + lm_off, lm_r, mask=row_ok[:, None])
    else:
        m_all = tl.full([BLOCK_M, NSP], float("-inf"), tl.float32)  # [BM, NSP]
        l_all = tl.zeros([BLOCK_M, NSP], tl.float32)
        if NUM_BAL > 0:
            m_all, l_all = _put_col(m_all, m0, 0, NSP), _put_col(l_all, l0, 0, NSP)
        if NUM_BAL > 1:
            m_all, l_all = _put_col(m_all, m1, 1, NSP), _put_col(l_all, l1, 1, NSP)
        if NUM_BAL > 2:
            m_all, l_all = _put_col(m_all, m2, 2, NSP), _put_col(l_all, l2, 2, NSP)
        if NUM_BAL > 3:
            m_all, l_all = _put_col(m_all, m3, 3, NSP), _put_col(l_all, l3, 3, NSP)
        if NUM_BAL > 4:
            m_all, l_all = _put_col(m_all, m4, 4, NSP), _put_col(l_all, l4, 4, NSP)
        if NUM_BAL > 5:
            m_all, l_all = _put_col(m_all, m5, 5, NSP), _put_col(l_all, l5, 5, NSP)
        if NUM_BAL > 6:
            m_all, l_all = _put_col(m_all, m6, 6, NSP), _put_col(l_all, l6, 6, NSP)
        if NUM_BAL > 7:
            m_all, l_all = _put_col(m_all, m7, 7, NSP), _put_col(l_all, l7, 7, NSP)
        if HAS_REST:
            m_all, l_all = _put_col(m_all, m_r, NUM_BAL, NSP), _put_col(l_all, l_r, NUM_BAL, NSP)
        selected = row_ok
        if HAS_QMASK:
            selected = tl.load(qmask_ptr + b * stride_qmb + rows * stride_qml, mask=row_ok, other=0) != 0
        masses, w = _reallocate(m_all, l_all, lm_r, selected, tau_ptr, balmod_ptr, slot_bias_ptr,
                                strength, threshold, NUM_BAL, NSP, MP)
        o = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)  # [BM, BD]
        if NUM_BAL > 0:
            o += _sum_col(w, 0, NSP)[:, None] * acc0
        if NUM_BAL > 1:
            o += _sum_col(w, 1, NSP)[:, None] * acc1
        if NUM_BAL > 2:
            o += _sum_col(w, 2, NSP)[:, None] * acc2
        if NUM_BAL > 3:
            o += _sum_col(w, 3, NSP)[:, None] * acc3
        if NUM_BAL > 4:
            o += _sum_col(w, 4, NSP)[:, None] * acc4
        if NUM_BAL > 5:
            o += _sum_col(w, 5, NSP)[:, None] * acc5
        if NUM_BAL > 6:
            o += _sum_col(w, 6, NSP)[:, None] * acc6
        if NUM_BAL > 7:
            o += _sum_col(w, 7, NSP)[:, None] * acc7
        if HAS_REST:
            o += _sum_col(w, NUM_BAL, NSP)[:, None] * acc_r
        _store_output(o_ptr, masses_ptr, o, masses, b, h, rows, row_ok, d, d_ok,
                      stride_ob, stride_oh, stride_ol, stride_od, stride_mb, stride_mh, stride_ml, stride_mm,
                      NUM_MOD, MP, RETURN_MASSES)


@triton.jit
def _store_output(o_ptr, masses_ptr, o, masses, b, h, rows, row_ok, d, d_ok,
                  stride_ob, stride_oh, stride_ol, stride_od, stride_mb, stride_mh, stride_ml, stride_mm,
                  NUM_MOD: tl.constexpr, MP: tl.constexpr, RETURN_MASSES: tl.constexpr):
    h = h.to(tl.int64)
    o_off = b * stride_ob + h * stride_oh + rows[:, None] * stride_ol + d[None, :] * stride_od
    tl.store(o_ptr + o_off, o.to(o_ptr.dtype.element_ty), mask=row_ok[:, None] & d_ok[None, :])
    if RETURN_MASSES:
        mod_cols = tl.arange(0, MP)
        m_off = b * stride_mb + h * stride_mh + rows[:, None] * stride_ml + mod_cols[None, :] * stride_mm
        tl.store(masses_ptr + m_off, masses, mask=row_ok[:, None] & (mod_cols < NUM_MOD)[None, :])


# --------------------------------------------------------------------------------------------
# split-k merge
# --------------------------------------------------------------------------------------------


@triton.jit
def ar_split_merge_kernel(
    part_m_ptr, part_l_ptr, part_lm_ptr, part_acc_ptr, qmask_ptr, tau_ptr, balmod_ptr, slot_bias_ptr,
    o_ptr, masses_ptr,
    stride_qmb, stride_qml,
    stride_ob, stride_oh, stride_ol, stride_od,
    stride_mb, stride_mh, stride_ml, stride_mm,
    len_q, n_q_heads, num_splits, strength, threshold,
    HEAD_DIM: tl.constexpr, NUM_MOD: tl.constexpr, NUM_BAL: tl.constexpr, NSP: tl.constexpr,
    MP: tl.constexpr, HAS_REST: tl.constexpr, HAS_QMASK: tl.constexpr, RETURN_MASSES: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """Grid (cdiv(Lq, BLOCK_M), B * Hq). Merges the num_splits partial states of every slot
    exactly (max, rescaled sums and accumulators), then reallocates and writes o and the masses."""
    pid_m = tl.program_id(0)
    bh = tl.program_id(1)
    b = (bh // n_q_heads).to(tl.int64)
    h = bh % n_q_heads
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)  # [BM]
    row_ok = rows < len_q
    d = tl.arange(0, BLOCK_D)
    n_slots = NUM_BAL + HAS_REST

    # Pass 1: merged max and sum per slot (scalars per row).
    m_all = tl.full([BLOCK_M, NSP], float("-inf"), tl.float32)  # [BM, NSP]
    l_all = tl.zeros([BLOCK_M, NSP], tl.float32)
    for c in range(n_slots):
        m_c = tl.full([BLOCK_M], float("-inf"), tl.float32)
        for sp in range(num_splits):
            off = ((bh * num_splits + sp) * NSP + c) * len_q + rows
            m_c = tl.maximum(m_c, tl.load(part_m_ptr + off, mask=row_ok, other=float("-inf")))
        m_ref = tl.where(m_c == float("-inf"), 0.0, m_c)
        l_c = tl.zeros([BLOCK_M], tl.float32)
        for sp in range(num_splits):
            off = ((bh * num_splits + sp) * NSP + c) * len_q + rows
            m_s = tl.load(part_m_ptr + off, mask=row_ok, other=float("-inf"))
            l_s = tl.load(part_l_ptr + off, mask=row_ok, other=0.0)
            l_c += l_s * tl.exp2((m_s - m_ref) * 1.4426950408889634)
        m_all = _put_col(m_all, m_c, c, NSP)
        l_all = _put_col(l_all, l_c, c, NSP)

    lm_r = tl.zeros([BLOCK_M, MP], tl.float32)  # [BM, MP]
    if HAS_REST:
        m_rest = _max_col(m_all, NUM_BAL, NSP)
        m_ref = tl.where(m_rest == float("-inf"), 0.0, m_rest)
        mod_cols = tl.arange(0, MP)
        for sp in range(num_splits):
            off = ((bh * num_splits + sp) * NSP + NUM_BAL) * len_q + rows
            rescale = tl.exp2((tl.load(part_m_ptr + off, mask=row_ok, other=float("-inf")) - m_ref)
                              * 1.4426950408889634)
            lm_off = ((bh * num_splits + sp) * MP + mod_cols[None, :]) * len_q + rows[:, None]
            lm_r += tl.load(part_lm_ptr + lm_off, mask=row_ok[:, None], other=0.0) * rescale[:, None]

    selected = row_ok
    if HAS_QMASK:
        selected = tl.load(qmask_ptr + b * stride_qmb + rows * stride_qml, mask=row_ok, other=0) != 0
    masses, w = _reallocate(m_all, l_all, lm_r, selected, tau_ptr, balmod_ptr, slot_bias_ptr,
                            strength, threshold, NUM_BAL, NSP, MP)

    # Pass 2: o = sum over slots and splits of w_c * exp2(m_cs - m_c) * acc_cs.
    o = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)  # [BM, BD]
    for c in range(n_slots):
        m_c = _max_col(m_all, c, NSP)
        m_ref = tl.where(m_c == float("-inf"), 0.0, m_c)
        w_c = _sum_col(w, c, NSP)
        for sp in range(num_splits):
            off = ((bh.to(tl.int64) * num_splits + sp) * NSP + c) * len_q + rows
            m_s = tl.load(part_m_ptr + off, mask=row_ok, other=float("-inf"))
            factor = w_c * tl.exp2((m_s - m_ref) * 1.4426950408889634)  # [BM]
            acc = tl.load(part_acc_ptr + off[:, None] * BLOCK_D + d[None, :], mask=row_ok[:, None], other=0.0)
            o += factor[:, None] * acc
    _store_output(o_ptr, masses_ptr, o, masses, b, h, rows, row_ok, d, d < HEAD_DIM,
                  stride_ob, stride_oh, stride_ol, stride_od, stride_mb, stride_mh, stride_ml, stride_mm,
                  NUM_MOD, MP, RETURN_MASSES)

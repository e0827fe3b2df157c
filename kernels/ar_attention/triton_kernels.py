"""Triton kernels of AR attention (DESIGN 2.2): key classification, prefill, decode, split-k merge.

Key classes. Every key belongs to one *class*: class ``c < NUM_BAL`` is the balance modality
``balance[c]``; the other modalities form the rest, one class for all of them or one class each
(the launcher splits the rest when its modalities have different biases or their masses are
reported). Padding, out-of-range ids and key positions past the end have class -1 and are never
attended. Each class keeps its own online-softmax state (running max ``m``, sum ``l``, accumulator
``acc``): its mean ``vbar_c = acc_c / l_c`` is exact even when its mass underflows next to another
class, and the class masses (steps 2-4) come from the states at the end of the pass. A class's
bias is constant over its keys, so scores stay bias-free during the pass and the bias shifts the
class's whole softmax at the end.

Prefill (``ar_prefill_kernel``): one query block against one class at a time, so only ONE
accumulator is live (register pressure of a plain flash kernel). ``ar_classify_kernel`` lists, per
batch row and class, the key blocks holding keys of that class (pure blocks: only that class;
mixed blocks: also other classes, padding or the tail) with prefix counts, so each class loop visits
exactly its blocks through an index (K/V loads unconditional, hence pipelined). Only mixed blocks
and blocks on the causal diagonal are masked. A finished class's accumulator is parked in a
per-program L2 scratch slot and merged at the end (flash-decoding merge); the last class stays in
registers. The grid is persistent (a few programs per SM, tiles heaviest first in snake order), so
the scratch is bounded by the number of programs, not by the problem size.

Decode (``ar_decode_kernel``, few queries): the rows of one block are (class, query head of the
KV group, query): K/V are read once per KV head, and every class state is a row, so a key block
updates all classes with one masked dot. Partial states of each key split go to
``ar_split_merge_kernel``, which merges them exactly and reallocates.

Units. Scores are kept raw (``q.k``, no scale) inside a pass: ``p = exp2((qk - m) * c_log2)`` with
``c_log2 = |scale| * log2(e)``. ``qk - m`` is exact for the keys that matter, so logits ~1e4 keep
their float32 precision; a negative scale negates q, so the running max stays a max. Class maxima
are compared through exact differences ``(m_c - m_top) * c_log2`` for the same reason. With a
softcap the scores are ``softcap * tanh(|scale| * qk / softcap)`` (natural units, c_log2 = log2(e)).

DESIGN 2.2b. A sliding window bounds the key blocks a pass visits (blocks before the window of the
block's first query are never loaded) and masks only the blocks on its edge. Contribution balancing
needs ``||vbar_c||``: each class's accumulator norm is kept with its max and sum. Per-head targets
are one row of the target table per query head.
"""

from __future__ import annotations

import triton
import triton.language as tl

LOG2E = 1.4426950408889634
MAX_CLASSES = 32


# --------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------


@triton.jit
def _dot(a, b, acc, DOT_PREC: tl.constexpr, DOT_UPCAST: tl.constexpr):
    """acc + a @ b in fp32. DOT_UPCAST (interpreter only): bf16 operands are widened exactly to
    fp32 first, because the Triton interpreter multiplies bf16 as raw uint16."""
    if DOT_UPCAST:
        a = a.to(tl.float32)
        b = b.to(tl.float32)
    return tl.dot(a, b, acc, input_precision=DOT_PREC)


@triton.jit
def _softcapped(qk, qk_scale, softcap):
    """softcap * tanh(qk * qk_scale / softcap) through exp2 (absolute error ~1e-7 * softcap; the
    interpreter has no tanh): tanh(x) = sign(x) * (1 - e) / (1 + e), e = exp(-2|x|)."""
    x = qk * (qk_scale / softcap)
    e = tl.exp2(tl.abs(x) * -2.8853900817779268)  # exp(-2|x|)
    t = (1.0 - e) / (1.0 + e)
    return softcap * tl.where(x < 0, -t, t)


@triton.jit
def _online_step(m_i, l_i, acc, qk, v, c_log2, DOT_PREC: tl.constexpr, DOT_UPCAST: tl.constexpr):
    """One key block of an online softmax. qk [BM, BN] raw scores, -inf where not visible."""
    m_new = tl.maximum(m_i, tl.max(qk, 1))  # [BM]
    # Rows with nothing seen yet keep m = -inf; shifting by 0 there gives alpha = p = 0, never NaN.
    m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)
    alpha = tl.exp2((m_i - m_ref) * c_log2)  # [BM]
    p = tl.exp2((qk - m_ref[:, None]) * c_log2)  # [BM, BN], the one exp per score
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = _dot(p.to(v.dtype), v, acc * alpha[:, None], DOT_PREC, DOT_UPCAST)  # [BM, BD]
    return m_new, l_i, acc


@triton.jit
def _load_kv(k_base, v_base, keys64, key_ok, d, stride_kl, stride_kd, stride_vl, stride_vd,
             HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr):
    """The [BN, BD] K and V tiles of the keys ``keys64`` (zeros past ``key_ok`` and past the head dim)."""
    kv_mask = key_ok[:, None]
    if HEAD_DIM != BLOCK_D:
        kv_mask = kv_mask & (d < HEAD_DIM)[None, :]
    k = tl.load(k_base + keys64[:, None] * stride_kl + d[None, :] * stride_kd, mask=kv_mask, other=0.0)
    v = tl.load(v_base + keys64[:, None] * stride_vl + d[None, :] * stride_vd, mask=kv_mask, other=0.0)
    return k, v


@triton.jit
def _in_reach(visible, keys, q_pos, window, CAUSAL: tl.constexpr, WINDOW: tl.constexpr):
    """``visible`` [BM, BN] narrowed to the keys each query may see by position: ``j <= pos_i`` when
    causal, ``pos_i - j < window`` with a sliding window (DESIGN 2.2b)."""
    if CAUSAL:
        visible = visible & (keys[None, :] <= q_pos[:, None])
    if WINDOW:
        visible = visible & (keys[None, :] > q_pos[:, None] - window)
    return visible


@triton.jit
def _put_col(x, value, c, N: tl.constexpr):
    """x[:, c] = value for x [BM, N], value [BM]."""
    return tl.where(tl.arange(0, N)[None, :] == c, value[:, None], x)


@triton.jit
def _col(x, c, N: tl.constexpr):
    """x[:, c] for x [BM, N] with finite values."""
    return tl.sum(tl.where(tl.arange(0, N)[None, :] == c, x, 0.0), 1)


@triton.jit
def _reallocate(m_all, l_all, n_all, selected, class_bias_ptr, tau_ptr, c_log2, strength, threshold,
                NUM_BAL: tl.constexpr, NSP: tl.constexpr, BY_CONTRIBUTION: tl.constexpr):
    """DESIGN 2.2 steps 2-4 and 2.2b (contribution balancing) from the final class states.

    m_all, l_all [BM, NSP]: per-class max (-inf: no visible key) and sum relative to it; n_all: the
    norm of each class's accumulator (read with BY_CONTRIBUTION only); tau_ptr: this head's targets.
    Returns the masses per class [BM, NSP] and the weights w [BM, NSP] with o = sum_c w_c * acc_c.
    """
    cols = tl.arange(0, NSP)
    present = m_all > float("-inf")
    bias2 = tl.load(class_bias_ptr + cols) * 1.4426950408889634  # [NSP] class bias, log2 units
    # The class with the largest shifted max, then exact differences to it: (m_c - m_top) is exact
    # for close maxima, so classes with comparable masses keep float32 precision at |s| ~ 1e4.
    top = tl.argmax(tl.where(present, m_all * c_log2 + bias2[None, :], float("-inf")), 1)  # [BM]
    is_top = cols[None, :] == top[:, None]
    m_top = tl.sum(tl.where(is_top, m_all, 0.0), 1)
    m_top = tl.where(m_top > float("-inf"), m_top, 0.0)  # no class present: every z is 0 anyway
    b_top = tl.sum(tl.where(is_top, bias2[None, :], 0.0), 1)
    shift = (m_all - m_top[:, None]) * c_log2 + (bias2[None, :] - b_top[:, None])
    z = tl.where(present, l_all * tl.exp2(shift), 0.0)  # [BM, NSP]
    z_total = tl.sum(z, 1)
    inv_total = tl.where(z_total > 0, 1.0 / tl.where(z_total > 0, z_total, 1.0), 0.0)  # 0: no visible key
    mass = z * inv_total[:, None]  # [BM, NSP] P per class

    tau = tl.load(tau_ptr + cols, mask=cols < NUM_BAL, other=0.0)  # [NSP]
    in_s = present & (cols < NUM_BAL)[None, :]  # S_i
    amount = mass  # what is balanced: P, or c = P * ||vbar||
    if BY_CONTRIBUTION:
        norm = tl.where(present, n_all / tl.where(present, l_all, 1.0), 0.0)  # ||vbar_c||
        in_s = in_s & (norm > 0)  # a class with ||vbar|| = 0 keeps its mass
        amount = mass * norm
    n_s = tl.sum(in_s.to(tl.int32), 1)
    total = tl.sum(tl.where(in_s, amount, 0.0), 1)  # [BM] over S_i
    tau_i = tl.where(in_s, tau[None, :], 0.0)
    tau_sum = tl.sum(tau_i, 1)
    tau_i = tau_i / tl.maximum(tau_sum, 1e-30)[:, None]  # renormalised over S_i
    sigma = amount / tl.maximum(total, 1e-30)[:, None]
    deviation = tl.max(tl.where(in_s, sigma - tau_i, float("-inf")), 1)
    apply = (n_s >= 2) & (total > 0) & (tau_sum > 0) & (deviation > threshold) & selected
    moved = (1.0 - strength) * amount + strength * total[:, None] * tau_i  # the new amounts in S_i
    if BY_CONTRIBUTION:  # back to masses: P'_c proportional to c'_c / ||vbar_c||, P_{S_i} kept
        weight = tl.where(in_s, moved / tl.where(in_s, norm, 1.0), 0.0)
        mass_s = tl.sum(tl.where(in_s, mass, 0.0), 1)
        moved = weight * (mass_s / tl.maximum(tl.sum(weight, 1), 1e-30))[:, None]
    new_mass = tl.where(in_s & apply[:, None], moved, mass)
    w = tl.where(present, new_mass / tl.where(present, l_all, 1.0), 0.0)  # [BM, NSP]
    return mass, w


@triton.jit
def _store_output(o_ptr, masses_ptr, class_mod_ptr, o, mass, o_base, m_base, rows, row_ok, d,
                  stride_ol, stride_od, stride_ml, stride_mm,
                  HEAD_DIM: tl.constexpr, NUM_MOD: tl.constexpr, NSP: tl.constexpr, MP: tl.constexpr,
                  RETURN_MASSES: tl.constexpr):
    """o [BM, BD] and, with RETURN_MASSES, the class masses [BM, NSP] scattered by modality id."""
    rows64 = rows.to(tl.int64)
    o_off = o_base + rows64[:, None] * stride_ol + d[None, :] * stride_od
    tl.store(o_ptr + o_off, o.to(o_ptr.dtype.element_ty), mask=row_ok[:, None] & (d < HEAD_DIM)[None, :])
    if RETURN_MASSES:
        mod_cols = tl.arange(0, MP)
        class_mod = tl.load(class_mod_ptr + tl.arange(0, NSP))  # [NSP] modality of each class
        one_hot = class_mod[:, None] == mod_cols[None, :]  # [NSP, MP]
        masses = tl.sum(tl.where(one_hot[None, :, :], mass[:, :, None], 0.0), 1)  # [BM, MP]
        m_off = m_base + rows64[:, None] * stride_ml + mod_cols[None, :] * stride_mm
        tl.store(masses_ptr + m_off, masses, mask=row_ok[:, None] & (mod_cols < NUM_MOD)[None, :])


@triton.jit
def _part_offsets(bhq, split, num_splits, c, queries, len_q, NSP: tl.constexpr):
    """Row offsets into the split-k partial states (B*Hq, splits, NSP, Lq[, BD]), int64."""
    return ((bhq.to(tl.int64) * num_splits + split) * NSP + c) * len_q + queries


# --------------------------------------------------------------------------------------------
# prefill: classification pre-pass
# --------------------------------------------------------------------------------------------


@triton.jit
def ar_classify_kernel(
    mod_ptr, class_of_mod_ptr, key_cls_ptr, list_ptr, pref_ptr,
    stride_mb, stride_ml, len_k, n_kblocks,
    NUM_MOD: tl.constexpr, NUM_CLS: tl.constexpr, NSP: tl.constexpr, BLOCK_N: tl.constexpr,
    CHUNK: tl.constexpr,
):
    """Grid (B,). Writes, for batch row b:

    key_cls (B, n_kblocks * BLOCK_N) int32: the class of each key, -1 for padding and the tail;
    list (B, NUM_CLS, n_kblocks): the key blocks holding keys of class c, ascending, as
    ``block * 2 + mixed`` (mixed: the block also holds other keys, so it is masked);
    pref (B, NUM_CLS, n_kblocks + 1): pref[b, c, j] = how many of them lie before block j.
    """
    b = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK_N)
    classes = tl.arange(0, NSP)
    counts = tl.zeros([NSP], tl.int32)  # blocks listed so far, per class
    for start in range(0, n_kblocks, CHUNK):
        blk = start + tl.arange(0, CHUNK)  # [CH]
        blk_ok = blk < n_kblocks
        keys = blk[:, None] * BLOCK_N + offs[None, :]  # [CH, BN]
        mod = tl.load(mod_ptr + b * stride_mb + keys.to(tl.int64) * stride_ml, mask=keys < len_k, other=-1)
        valid = (mod >= 0) & (mod < NUM_MOD)  # out-of-range ids are padding
        key_cls = tl.where(valid, tl.load(class_of_mod_ptr + tl.where(valid, mod, 0).to(tl.int32)), -1)
        tl.store(key_cls_ptr + b * n_kblocks * BLOCK_N + keys, key_cls, mask=blk_ok[:, None])
        for c in range(NUM_CLS):
            is_c = (key_cls == c).to(tl.int32)
            has = (tl.max(is_c, 1) > 0) & blk_ok  # [CH]
            mixed = tl.min(is_c, 1) == 0
            has_i = has.to(tl.int32)
            before = tl.sum(tl.where(classes == c, counts, 0))
            index = before + tl.cumsum(has_i, 0) - has_i  # [CH] exclusive prefix count
            row = b * NUM_CLS + c
            tl.store(pref_ptr + row * (n_kblocks + 1) + blk, index, mask=blk_ok)
            tl.store(list_ptr + row * n_kblocks + index, blk * 2 + mixed.to(tl.int32), mask=has)
            counts = tl.where(classes == c, before + tl.sum(has_i), counts)
    tl.store(pref_ptr + (b * NUM_CLS + classes) * (n_kblocks + 1) + n_kblocks, counts, mask=classes < NUM_CLS)


# --------------------------------------------------------------------------------------------
# prefill: one class pass, then the persistent kernel
# --------------------------------------------------------------------------------------------


@triton.jit
def _class_pass(q, k_base, v_base, stride_kl, stride_kd, stride_vl, stride_vd, key_cls_row, list_row,
                e_lo, e_hi, c, full_blk, window_blk, q_pos, len_k, window, qk_scale, softcap, c_log2, d,
                HEAD_DIM: tl.constexpr, CAUSAL: tl.constexpr, WINDOW: tl.constexpr, SOFTCAP: tl.constexpr,
                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, DOT_PREC: tl.constexpr,
                DOT_UPCAST: tl.constexpr):
    """Online softmax of the query block over the keys of class c: list entries [e_lo, e_hi).
    Blocks before full_blk are visible to every row (causal); with a window, blocks from window_blk
    on are inside every row's window."""
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)  # [BM]
    l_i = tl.zeros([BLOCK_M], tl.float32)  # [BM]
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)  # [BM, BD]
    offs_n = tl.arange(0, BLOCK_N)
    for e in range(e_lo, e_hi):
        entry = tl.load(list_row + e)
        blk = entry >> 1
        keys = blk * BLOCK_N + offs_n  # [BN]
        k, v = _load_kv(k_base, v_base, keys.to(tl.int64), keys < len_k, d, stride_kl, stride_kd, stride_vl,
                        stride_vd, HEAD_DIM, BLOCK_D)  # [BN, BD]
        key_cls = tl.load(key_cls_row + keys)  # [BN]; rows hold whole blocks
        qk = _dot(q, tl.trans(k), tl.zeros([BLOCK_M, BLOCK_N], tl.float32), DOT_PREC, DOT_UPCAST)  # [BM, BN]
        if SOFTCAP:
            qk = _softcapped(qk, qk_scale, softcap)
        masked = (entry & 1) != 0
        if CAUSAL:
            masked = masked | (blk >= full_blk)
        if WINDOW:
            masked = masked | (blk < window_blk)
        if masked:  # mixed, diagonal or window-edge block: other classes, padding, tail, future keys
            visible = _in_reach((key_cls == c)[None, :], keys, q_pos, window, CAUSAL, WINDOW)
            qk = tl.where(visible, qk, float("-inf"))
        m_i, l_i, acc = _online_step(m_i, l_i, acc, qk, v, c_log2, DOT_PREC, DOT_UPCAST)
    return m_i, l_i, acc


@triton.jit
def ar_prefill_kernel(
    q_ptr, k_ptr, v_ptr, qmask_ptr, key_cls_ptr, list_ptr, pref_ptr, class_bias_ptr, tau_ptr, class_mod_ptr,
    o_ptr, masses_ptr, park_ptr, part_m_ptr, part_l_ptr, part_acc_ptr,
    stride_qb, stride_qh, stride_ql, stride_qd,
    stride_kb, stride_kh, stride_kl, stride_kd,
    stride_vb, stride_vh, stride_vl, stride_vd,
    stride_qmb, stride_qml,
    stride_ob, stride_oh, stride_ol, stride_od,
    stride_mb, stride_mh, stride_ml, stride_mm, stride_tau_h,
    len_q, len_k, n_q_heads, group, n_kblocks, n_qblocks, n_bh, n_tiles, blocks_per_split, num_splits,
    window, qk_scale, softcap, c_log2, strength, threshold,
    HEAD_DIM: tl.constexpr, NUM_MOD: tl.constexpr, NUM_CLS: tl.constexpr, NUM_BAL: tl.constexpr,
    NSP: tl.constexpr, MP: tl.constexpr, CAUSAL: tl.constexpr, WINDOW: tl.constexpr, SOFTCAP: tl.constexpr,
    NEG_SCALE: tl.constexpr, BY_CONTRIBUTION: tl.constexpr, HAS_QMASK: tl.constexpr,
    RETURN_MASSES: tl.constexpr, SPLIT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr, DOT_PREC: tl.constexpr, DOT_UPCAST: tl.constexpr,
):
    """Persistent grid (programs,). Tile t = (query block, batch * head, split), query blocks from
    the last (most keys under causal masking) to the first; program p takes one tile per round,
    in snake order over the programs so that each program's total work evens out."""
    pid = tl.program_id(0)
    n_prog = tl.num_programs(0)
    d = tl.arange(0, BLOCK_D)
    # This program's scratch: parked accumulators of classes 0..C-2 [C-1, BM, BD], then the max, sum
    # and accumulator norm of every class [C, BM] each.
    park_acc = park_ptr + pid.to(tl.int64) * ((NUM_CLS - 1) * BLOCK_M * BLOCK_D + 3 * NUM_CLS * BLOCK_M)
    park_m = park_acc + (NUM_CLS - 1) * BLOCK_M * BLOCK_D
    park_l = park_m + NUM_CLS * BLOCK_M
    park_n = park_l + NUM_CLS * BLOCK_M
    n_rounds = (n_tiles + n_prog - 1) // n_prog
    for rnd in range(0, n_rounds):
        tile = rnd * n_prog + tl.where(rnd % 2 == 0, pid, n_prog - 1 - pid)
        if tile < n_tiles:
            per_block = n_bh * num_splits
            q_blk = n_qblocks - 1 - tile // per_block
            split = (tile % per_block) // n_bh
            bh = tile % n_bh
            b = (bh // n_q_heads).to(tl.int64)
            h = (bh % n_q_heads).to(tl.int64)
            kvh = h // group  # GQA: no repeat of K/V

            r = tl.arange(0, BLOCK_M)
            rows = q_blk * BLOCK_M + r  # [BM]
            row_ok = rows < len_q
            q_mask = row_ok[:, None]
            if HEAD_DIM != BLOCK_D:
                q_mask = q_mask & (d < HEAD_DIM)[None, :]
            q = tl.load(q_ptr + b * stride_qb + h * stride_qh + rows.to(tl.int64)[:, None] * stride_ql
                        + d[None, :] * stride_qd, mask=q_mask, other=0.0)  # [BM, BD]
            if NEG_SCALE:  # through float32: the interpreter holds bf16 as raw 16-bit integers
                q = (-q.to(tl.float32)).to(q.dtype)
            first_pos = len_k - len_q + q_blk * BLOCK_M  # bottom-right causal alignment
            q_pos = first_pos + r  # [BM]; < 0: sees no key
            lo_blk = split * blocks_per_split
            hi_blk = tl.minimum(n_kblocks, lo_blk + blocks_per_split)
            full_blk = n_kblocks  # blocks before it are visible to every row of the block
            if CAUSAL:
                hi_blk = tl.minimum(hi_blk, (tl.maximum(first_pos + BLOCK_M, 0) + BLOCK_N - 1) // BLOCK_N)
                full_blk = tl.maximum(first_pos + 1, 0) // BLOCK_N
            window_blk = 0  # blocks from it on lie inside every row's window
            if WINDOW:  # blocks before the first row's window are skipped, not masked
                lo_blk = tl.maximum(lo_blk, tl.maximum(first_pos - window + 1, 0) // BLOCK_N)
                window_blk = (tl.maximum(first_pos + BLOCK_M - window, 0) + BLOCK_N - 1) // BLOCK_N
            hi_blk = tl.maximum(hi_blk, lo_blk)

            # Classes with key blocks in range; the last of them stays live, the others are parked.
            seen = 0
            last = -1
            for c in range(NUM_CLS):
                pref_row = pref_ptr + (b * NUM_CLS + c) * (n_kblocks + 1)
                if tl.load(pref_row + hi_blk) > tl.load(pref_row + lo_blk):
                    seen = seen | (1 << c)
                    last = c

            k_base = k_ptr + b * stride_kb + kvh * stride_kh
            v_base = v_ptr + b * stride_vb + kvh * stride_vh
            key_cls_row = key_cls_ptr + b * n_kblocks * BLOCK_N
            acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)  # the live class accumulator
            for c in range(NUM_CLS):
                if ((seen >> c) & 1) != 0:
                    table = b * NUM_CLS + c
                    pref_row = pref_ptr + table * (n_kblocks + 1)
                    m_i, l_i, acc = _class_pass(
                        q, k_base, v_base, stride_kl, stride_kd, stride_vl, stride_vd, key_cls_row,
                        list_ptr + table * n_kblocks, tl.load(pref_row + lo_blk), tl.load(pref_row + hi_blk), c,
                        full_blk, window_blk, q_pos, len_k, window, qk_scale, softcap, c_log2, d, HEAD_DIM, CAUSAL,
                        WINDOW, SOFTCAP, BLOCK_M, BLOCK_N, BLOCK_D, DOT_PREC, DOT_UPCAST)
                    if SPLIT:
                        off = _part_offsets(bh, split, num_splits, c, rows, len_q, NSP)
                        tl.store(part_m_ptr + off, m_i, mask=row_ok)
                        tl.store(part_l_ptr + off, l_i, mask=row_ok)
                        tl.store(part_acc_ptr + off[:, None] * BLOCK_D + d[None, :], acc, mask=row_ok[:, None])
                    else:
                        tl.store(park_m + c * BLOCK_M + r, m_i)
                        tl.store(park_l + c * BLOCK_M + r, l_i)
                        if BY_CONTRIBUTION:
                            tl.store(park_n + c * BLOCK_M + r, tl.sqrt(tl.sum(acc * acc, 1)))
                        if c != last:  # parked until the end of the tile
                            tl.store(park_acc + c * (BLOCK_M * BLOCK_D) + r[:, None] * BLOCK_D + d[None, :], acc)
                elif SPLIT:  # the merge reads every class of every split: no key here
                    off = _part_offsets(bh, split, num_splits, c, rows, len_q, NSP)
                    tl.store(part_m_ptr + off, tl.full([BLOCK_M], float("-inf"), tl.float32), mask=row_ok)
                    tl.store(part_l_ptr + off, tl.zeros([BLOCK_M], tl.float32), mask=row_ok)

            if not SPLIT:
                tl.debug_barrier()  # parked stores visible to every thread of the program
                cls = tl.arange(0, NSP)
                in_tile = ((cls < NUM_CLS) & (((seen >> cls) & 1) != 0))[None, :]  # [1, NSP]
                park_off = cls[None, :] * BLOCK_M + r[:, None]  # [BM, NSP]
                m_all = tl.load(park_m + park_off, mask=in_tile, other=float("-inf"))  # [BM, NSP]
                l_all = tl.load(park_l + park_off, mask=in_tile, other=0.0)
                n_all = l_all
                if BY_CONTRIBUTION:
                    n_all = tl.load(park_n + park_off, mask=in_tile, other=0.0)
                selected = row_ok
                if HAS_QMASK:
                    selected = tl.load(qmask_ptr + b * stride_qmb + rows.to(tl.int64) * stride_qml,
                                       mask=row_ok, other=0) != 0
                mass, w = _reallocate(m_all, l_all, n_all, selected, class_bias_ptr, tau_ptr + h * stride_tau_h,
                                      c_log2, strength, threshold, NUM_BAL, NSP, BY_CONTRIBUTION)
                o = acc * _col(w, last, NSP)[:, None]  # [BM, BD]
                for c in range(NUM_CLS):
                    if (c != last) & (((seen >> c) & 1) != 0):
                        parked = tl.load(park_acc + c * (BLOCK_M * BLOCK_D) + r[:, None] * BLOCK_D + d[None, :])
                        o += _col(w, c, NSP)[:, None] * parked
                _store_output(o_ptr, masses_ptr, class_mod_ptr, o, mass, b * stride_ob + h * stride_oh,
                              b * stride_mb + h * stride_mh, rows, row_ok, d, stride_ol, stride_od, stride_ml,
                              stride_mm, HEAD_DIM, NUM_MOD, NSP, MP, RETURN_MASSES)
                tl.debug_barrier()  # every parked load done before the next tile parks again


# --------------------------------------------------------------------------------------------
# decode: classes x query heads x queries in the rows of one block
# --------------------------------------------------------------------------------------------


@triton.jit
def ar_decode_kernel(
    q_ptr, k_ptr, v_ptr, mod_ptr, class_of_mod_ptr, part_m_ptr, part_l_ptr, part_acc_ptr,
    stride_qb, stride_qh, stride_ql, stride_qd,
    stride_kb, stride_kh, stride_kl, stride_kd,
    stride_vb, stride_vh, stride_vl, stride_vd,
    stride_modb, stride_modl,
    len_q, len_k, n_q_heads, n_kv_heads, group, key_start, keys_per_split, num_splits, window, qk_scale,
    softcap, c_log2,
    HEAD_DIM: tl.constexpr, NUM_MOD: tl.constexpr, NUM_CLS: tl.constexpr, NSP: tl.constexpr,
    CAUSAL: tl.constexpr, WINDOW: tl.constexpr, SOFTCAP: tl.constexpr, NEG_SCALE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, DOT_PREC: tl.constexpr,
    DOT_UPCAST: tl.constexpr,
):
    """Grid (B * Hkv, splits). Row r of the block is (class c, query head g of the KV group, query i),
    r = (c * group + g) * Lq + i: one online-softmax state per row over the keys of class c in the
    split's key range [key_start + split * keys_per_split, ...) (key_start: the first key any query's
    window reaches). Writes the partial states for the merge."""
    pid_bkv = tl.program_id(0)
    split = tl.program_id(1)
    b = (pid_bkv // n_kv_heads).to(tl.int64)
    kvh = (pid_bkv % n_kv_heads).to(tl.int64)
    r = tl.arange(0, BLOCK_M)  # [BM]
    heads_q = group * len_q
    row_cls = r // heads_q
    g = (r % heads_q) // len_q
    qi = r % len_q
    row_ok = r < NUM_CLS * heads_q
    h = kvh * group + g  # [BM] int64
    d = tl.arange(0, BLOCK_D)
    q_mask = row_ok[:, None]
    if HEAD_DIM != BLOCK_D:
        q_mask = q_mask & (d < HEAD_DIM)[None, :]
    q = tl.load(q_ptr + b * stride_qb + h[:, None] * stride_qh + qi.to(tl.int64)[:, None] * stride_ql
                + d[None, :] * stride_qd, mask=q_mask, other=0.0)  # [BM, BD], each query once per class
    if NEG_SCALE:  # through float32: the interpreter holds bf16 as raw 16-bit integers
        q = (-q.to(tl.float32)).to(q.dtype)
    q_pos = len_k - len_q + qi  # [BM]

    k_base = k_ptr + b * stride_kb + kvh * stride_kh
    v_base = v_ptr + b * stride_vb + kvh * stride_vh
    lo = key_start + split * keys_per_split
    hi = tl.minimum(lo + keys_per_split, len_k)
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    for start in range(lo, hi, BLOCK_N):
        keys = start + tl.arange(0, BLOCK_N)  # [BN]
        key_ok = keys < hi
        keys64 = keys.to(tl.int64)
        k, v = _load_kv(k_base, v_base, keys64, key_ok, d, stride_kl, stride_kd, stride_vl, stride_vd, HEAD_DIM,
                        BLOCK_D)  # [BN, BD]
        mod = tl.load(mod_ptr + b * stride_modb + keys64 * stride_modl, mask=key_ok, other=-1)
        valid = (mod >= 0) & (mod < NUM_MOD)  # out-of-range ids are padding
        key_cls = tl.where(valid, tl.load(class_of_mod_ptr + tl.where(valid, mod, 0).to(tl.int32)), -1)
        qk = _dot(q, tl.trans(k), tl.zeros([BLOCK_M, BLOCK_N], tl.float32), DOT_PREC, DOT_UPCAST)
        if SOFTCAP:
            qk = _softcapped(qk, qk_scale, softcap)
        visible = _in_reach(key_cls[None, :] == row_cls[:, None], keys, q_pos, window, CAUSAL, WINDOW)  # [BM, BN]
        qk = tl.where(visible, qk, float("-inf"))
        m_i, l_i, acc = _online_step(m_i, l_i, acc, qk, v, c_log2, DOT_PREC, DOT_UPCAST)

    off = _part_offsets(b * n_q_heads + h, split, num_splits, row_cls, qi, len_q, NSP)  # [BM]
    tl.store(part_m_ptr + off, m_i, mask=row_ok)
    tl.store(part_l_ptr + off, l_i, mask=row_ok)
    tl.store(part_acc_ptr + off[:, None] * BLOCK_D + d[None, :], acc, mask=row_ok[:, None])


# --------------------------------------------------------------------------------------------
# split-k merge
# --------------------------------------------------------------------------------------------


@triton.jit
def ar_split_merge_kernel(
    part_m_ptr, part_l_ptr, part_acc_ptr, qmask_ptr, class_bias_ptr, tau_ptr, class_mod_ptr,
    o_ptr, masses_ptr,
    stride_qmb, stride_qml,
    stride_ob, stride_oh, stride_ol, stride_od,
    stride_mb, stride_mh, stride_ml, stride_mm, stride_tau_h,
    len_q, n_q_heads, num_splits, c_log2, strength, threshold,
    HEAD_DIM: tl.constexpr, NUM_MOD: tl.constexpr, NUM_CLS: tl.constexpr, NUM_BAL: tl.constexpr,
    NSP: tl.constexpr, MP: tl.constexpr, BY_CONTRIBUTION: tl.constexpr, HAS_QMASK: tl.constexpr,
    RETURN_MASSES: tl.constexpr, BLOCK_Q: tl.constexpr, SPLIT_BLOCK: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """Grid (cdiv(Lq, BLOCK_Q), B * Hq). Merges the partial states of every class over the splits
    exactly (max, rescaled sums and accumulators), then reallocates and writes o and the masses.
    Queries and splits are both tile dimensions ([BLOCK_Q, SPLIT_BLOCK, ...]), so the partial states
    of all splits are loaded together (decode: one round trip, not one per split)."""
    pid_q = tl.program_id(0)
    bh = tl.program_id(1)
    b = (bh // n_q_heads).to(tl.int64)
    h = (bh % n_q_heads).to(tl.int64)
    rows = pid_q * BLOCK_Q + tl.arange(0, BLOCK_Q)  # [BQ]
    row_ok = rows < len_q
    d = tl.arange(0, BLOCK_D)
    cls = tl.arange(0, NSP)
    splits = tl.arange(0, SPLIT_BLOCK)
    base = bh.to(tl.int64) * num_splits
    cls3 = cls[None, None, :]
    rows3 = rows[:, None, None]

    # Pass 1: merged max and sum of every class [BQ, NSP]; partial state (bh, split, c, row).
    m_all = tl.full([BLOCK_Q, NSP], float("-inf"), tl.float32)
    for s0 in range(0, num_splits, SPLIT_BLOCK):
        sp3 = (s0 + splits)[None, :, None]
        ok = row_ok[:, None, None] & (sp3 < num_splits) & (cls3 < NUM_CLS)  # [BQ, SB, NSP]
        off = ((base + sp3) * NSP + cls3) * len_q + rows3
        m_all = tl.maximum(m_all, tl.max(tl.load(part_m_ptr + off, mask=ok, other=float("-inf")), 1))
    m_ref = tl.where(m_all == float("-inf"), 0.0, m_all)[:, None, :]  # [BQ, 1, NSP]
    l_all = tl.zeros([BLOCK_Q, NSP], tl.float32)
    for s0 in range(0, num_splits, SPLIT_BLOCK):
        sp3 = (s0 + splits)[None, :, None]
        ok = row_ok[:, None, None] & (sp3 < num_splits) & (cls3 < NUM_CLS)
        off = ((base + sp3) * NSP + cls3) * len_q + rows3
        m_s = tl.load(part_m_ptr + off, mask=ok, other=float("-inf"))
        l_s = tl.load(part_l_ptr + off, mask=ok, other=0.0)
        l_all += tl.sum(l_s * tl.exp2((m_s - m_ref) * c_log2), 1)

    n_all = l_all
    if BY_CONTRIBUTION:  # the norm of each class's merged accumulator: one more pass over them
        n_all = tl.zeros([BLOCK_Q, NSP], tl.float32)
        for c in tl.static_range(NUM_CLS):  # static: column c is a register, not an indexed array
            acc_c = tl.zeros([BLOCK_Q, BLOCK_D], tl.float32)
            for s0 in range(0, num_splits, SPLIT_BLOCK):
                sp3 = (s0 + splits)[None, :, None]
                ok = row_ok[:, None, None] & (sp3 < num_splits) & (cls3 < NUM_CLS)
                off = ((base + sp3) * NSP + cls3) * len_q + rows3
                m_s = tl.load(part_m_ptr + off, mask=ok, other=float("-inf"))
                rescale = tl.where(m_s > float("-inf"), tl.exp2((m_s - m_ref) * c_log2), 0.0)
                f_c = tl.sum(tl.where(cls3 == c, rescale, 0.0), 2)[:, :, None]  # [BQ, SB, 1]
                acc_off = (((base + sp3) * NSP + c) * len_q + rows3) * BLOCK_D + d[None, None, :]
                acc_c += tl.sum(f_c * tl.load(part_acc_ptr + acc_off, mask=f_c != 0, other=0.0), 1)
            n_all = tl.where(cls[None, :] == c, tl.sqrt(tl.sum(acc_c * acc_c, 1))[:, None], n_all)
    selected = row_ok
    if HAS_QMASK:
        selected = tl.load(qmask_ptr + b * stride_qmb + rows.to(tl.int64) * stride_qml, mask=row_ok, other=0) != 0
    mass, w = _reallocate(m_all, l_all, n_all, selected, class_bias_ptr, tau_ptr + h * stride_tau_h, c_log2,
                          strength, threshold, NUM_BAL, NSP, BY_CONTRIBUTION)

    # Pass 2: o = sum over splits and classes of w_c * exp2(m_cs - m_c) * acc_cs.
    o = tl.zeros([BLOCK_Q, BLOCK_D], tl.float32)
    for s0 in range(0, num_splits, SPLIT_BLOCK):
        sp3 = (s0 + splits)[None, :, None]
        ok = row_ok[:, None, None] & (sp3 < num_splits) & (cls3 < NUM_CLS)
        off = ((base + sp3) * NSP + cls3) * len_q + rows3
        m_s = tl.load(part_m_ptr + off, mask=ok, other=float("-inf"))
        # 0 where a split saw no key of the class: it wrote no accumulator there, which is not read
        factor = tl.where(m_s > float("-inf"), w[:, None, :] * tl.exp2((m_s - m_ref) * c_log2), 0.0)
        for c in tl.static_range(NUM_CLS):  # static: column c is a register, not an indexed array
            f_c = tl.sum(tl.where(cls3 == c, factor, 0.0), 2)[:, :, None]  # [BQ, SB, 1]
            acc_off = (((base + sp3) * NSP + c) * len_q + rows3) * BLOCK_D + d[None, None, :]  # [BQ, SB, BD]
            acc = tl.load(part_acc_ptr + acc_off, mask=f_c != 0, other=0.0)
            o += tl.sum(f_c * acc, 1)
    _store_output(o_ptr, masses_ptr, class_mod_ptr, o, mass, b * stride_ob + h * stride_oh,
                  b * stride_mb + h * stride_mh, rows, row_ok, d, stride_ol, stride_od, stride_ml, stride_mm,
                  HEAD_DIM, NUM_MOD, NSP, MP, RETURN_MASSES)

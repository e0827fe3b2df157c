"""Triton kernels of the MoSE dispatch (no launch logic, no autograd: see launch.py and function.py).

Notation: N tokens, d_in, d_out, rank R (padded to BLOCK_R, a power of two >= 16, for tl.dot),
M modalities, E experts per modality, k = TOP_K choices per token. A *group* is ``g = m * E + e``,
``n_groups = M * E`` marking a choice without adapter (modality -1, or an id out of range: such
choices are skipped, never read out of bounds).

Row kernels walk the tokens in ``order`` (token ids sorted by (modality, expert_0[, expert_1]), see
triton_routing.py), gathering and scattering rows through the id, so x, dy and the outputs are
never permuted. A block of BLOCK_T sorted tokens holds few distinct *combos* (the group of each
choice); a kernel loops over the combos present in its block (``_next_key``: a data-dependent
``while``, outside every pipelined loop) and, for each, computes the block with that combo's weights
and then *selects* the combo's rows (``tl.where``). Rows of other combos are never multiplied by
these weights and added: a NaN or Inf in one modality's A or one expert's B stays in the rows that
use it (``0 * NaN`` would be NaN).

Streaming kernels are split along the feature dimension (split-K style) so that even a few token
blocks fill the GPU: the shrink writes one partial h per d_in split and the dy pass one partial dh per
d_out split; their consumers sum the partials in a fixed order, so results are deterministic. Weight
gradients either meet through fp32 atomics (fused into the dy and x passes: dy and x are each read
once) or, in deterministic mode, come from per-group reductions into partial buffers that are summed
in a fixed order (bit-identical runs).

Dots run in the input dtype (tensor cores) with fp32 accumulation; fp32 inputs use IEEE fp32 dots
(NUMERICS 1) to meet the float32 tolerance rather than tf32. NUMERICS 2 works around two bf16
defects of the Triton interpreter (see ``_dot`` and ``_downcast``); compiled code never uses it.
"""

from __future__ import annotations

import triton
import triton.language as tl

from .interpreter_compat import install as _install_interpreter_fix

_install_interpreter_fix()


@triton.jit
def _dot(a, b, acc, NUMERICS: tl.constexpr):
    """``acc + a @ b`` with an fp32 accumulator.

    NUMERICS 0: native dot in the operands' dtype (tensor cores for fp16/bf16); 1: IEEE fp32
    products (fp32 operands); 2: bf16 under the Triton interpreter, whose tl.dot multiplies bf16
    bit patterns as integers (triton 3.9): operands are upcast to fp32 first (bf16 products are
    exact in fp32, so this computes what the tensor cores do).
    """
    if NUMERICS == 2:
        acc = tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    elif NUMERICS == 1:
        acc = tl.dot(a, b, acc, input_precision="ieee")
    else:
        acc = tl.dot(a, b, acc)
    return acc


@triton.jit
def _downcast(x, dtype: tl.constexpr, NUMERICS: tl.constexpr):
    """fp32 -> dtype with round-to-nearest-even. The interpreter (NUMERICS 2) truncates fp32 -> bf16
    (triton 3.9), which doubles the error: there the rounding is done on the bits first."""
    if NUMERICS == 2 and dtype == tl.bfloat16:
        bits = x.to(tl.uint32, bitcast=True)
        bits = bits + (0x7FFF + ((bits >> 16) & 1))
        y = (bits & 0xFFFF0000).to(tl.float32, bitcast=True).to(dtype)
    else:
        y = x.to(dtype)
    return y


@triton.jit
def _next_key(keys, cur, n_keys):
    """The smallest key of the block above ``cur`` (``n_keys`` when none is left)."""
    return tl.min(tl.where(keys > cur, keys, n_keys), axis=0)


@triton.jit
def _load_rows(order_ptr, modality_ptr, stride_mod, N, M, pid, BLOCK_T: tl.constexpr):
    """Token ids (int64) of one block of sorted positions, their modality, which rows exist and which
    have an adapter (an out-of-range modality id counts as none)."""
    offs = pid * BLOCK_T + tl.arange(0, BLOCK_T)  # [BT] positions in sorted order
    in_range = offs < N
    tok = tl.load(order_ptr + offs, mask=in_range, other=0).to(tl.int64)  # [BT] original token ids
    mod = tl.load(modality_ptr + tok * stride_mod, mask=in_range, other=-1).to(tl.int32)  # [BT]
    adapted = in_range & (mod >= 0) & (mod < M)
    return tok, mod, in_range, adapted


@triton.jit
def _load_choice(expert_ptr, gate_ptr, tok, adapted, mod, j, E, n_groups,
                 stride_en, stride_ek, stride_gn, stride_gk):
    """Group of choice j of each row (``n_groups`` when skipped) and its gate in fp32 (0 when skipped)."""
    e = tl.load(expert_ptr + tok * stride_en + j * stride_ek, mask=adapted, other=-1).to(tl.int32)  # [BT]
    ok = adapted & (e >= 0) & (e < E)  # out-of-range expert ids are skipped
    group = tl.where(ok, mod * E + e, n_groups)  # [BT]
    gate = tl.load(gate_ptr + tok * stride_gn + j * stride_gk, mask=ok, other=0.0).to(tl.float32)  # [BT]
    return group, gate


@triton.jit
def _combo(group0, group1, n_groups, TOP_K: tl.constexpr):
    """One key per row for the groups of all its choices; ``(n_groups + 1) ** TOP_K - 1`` = no adapter."""
    if TOP_K == 2:
        combo = group0 * (n_groups + 1) + group1
    else:
        combo = group0
    return combo


@triton.jit
def _combo_groups(cur, n_groups, TOP_K: tl.constexpr):
    """The group of choice 0 and of choice 1 (choice 0 again for top-1) of combo ``cur``."""
    if TOP_K == 2:
        g0 = cur // (n_groups + 1)
        g1 = cur % (n_groups + 1)
    else:
        g0 = cur
        g1 = cur
    return g0, g1


@triton.jit
def _group_ptr(ptr, group, n_groups, E, stride_m, stride_e):
    """Base pointer of group ``m * E + e`` of a (M, E, ...) tensor; group 0 for a skipped choice
    (``group == n_groups``), whose loads and stores the caller masks off."""
    g = tl.where(group < n_groups, group, 0)
    return ptr + (g // E).to(tl.int64) * stride_m + (g % E).to(tl.int64) * stride_e


@triton.jit
def _choice_rank_mask(offs_r, r_mask, group, n_groups):
    """[BR] mask of the rank columns of one choice: all off for a skipped choice. A vector, not a
    scalar condition: the interpreter rejects a scalar inside an atomic's mask."""
    return r_mask & ((offs_r * 0 + group) < n_groups)


@triton.jit
def _sum_partials(ptr, stride_s, n_splits, offs_rows, offs_cols, mask):
    """sum over s < n_splits of ptr[s, rows, cols] (fp32), always in the order s = 0, 1, ..."""
    acc = tl.load(ptr + offs_rows + offs_cols, mask=mask, other=0.0)
    for s in range(1, n_splits):
        acc += tl.load(ptr + s * stride_s + offs_rows + offs_cols, mask=mask, other=0.0)
    return acc


# ------------------------------------------------------------------------------------------------
# Forward
# ------------------------------------------------------------------------------------------------


@triton.jit
def mose_shrink_kernel(
    x_ptr, A_ptr, hp_ptr, order_ptr, modality_ptr,
    N, D_IN, R, M, k_per_split,
    stride_mod, stride_xn, stride_xk, stride_am, stride_ar, stride_ak, stride_hs, stride_hn,
    BLOCK_T: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr, NUMERICS: tl.constexpr,
):
    """hp[s, t] = A[modality[t]][:, k-range s] @ x[t, k-range s] in fp32 (the sum over s is h[t]).

    grid (cdiv(N, BLOCK_T), n_splits): program (i, s) reads its block's rows of x over d_in columns
    [s * k_per_split, (s + 1) * k_per_split) once, looping over the modalities present in the block
    (outside the pipelined loop over d_in). Rows without adapter get 0.
    """
    pid_t = tl.program_id(0)
    pid_s = tl.program_id(1)
    tok, mod, in_range, adapted = _load_rows(order_ptr, modality_ptr, stride_mod, N, M, pid_t, BLOCK_T)
    mod_key = tl.where(adapted, mod, M)  # [BT]; M = no adapter
    offs_r = tl.arange(0, BLOCK_R)
    offs_k = tl.arange(0, BLOCK_K)
    r_mask = offs_r < R
    k_lo = pid_s * k_per_split
    k_hi = tl.minimum(k_lo + k_per_split, D_IN)

    h = tl.zeros((BLOCK_T, BLOCK_R), dtype=tl.float32)  # [BT, BR]
    cur = tl.min(mod_key, axis=0)
    while cur < M:
        sel = mod_key == cur  # [BT] rows of this modality; the others load zeros
        a_base = A_ptr + cur.to(tl.int64) * stride_am
        part = tl.zeros((BLOCK_T, BLOCK_R), dtype=tl.float32)
        for k0 in range(k_lo, k_hi, BLOCK_K):
            k = k0 + offs_k
            k_mask = k < k_hi
            xt = tl.load(x_ptr + tok[:, None] * stride_xn + k[None, :] * stride_xk,
                         mask=sel[:, None] & k_mask[None, :], other=0.0)  # [BT, BK]
            at = tl.load(a_base + offs_r[None, :] * stride_ar + k[:, None] * stride_ak,
                         mask=r_mask[None, :] & k_mask[:, None], other=0.0)  # [BK, BR] = A[m]^T tile
            part = _dot(xt, at, part, NUMERICS)
        h = tl.where(sel[:, None], part, h)  # select: other rows never see A[cur]
        cur = _next_key(mod_key, cur, M)
    tl.store(hp_ptr + pid_s * stride_hs + tok[:, None] * stride_hn + offs_r[None, :], h,
             mask=in_range[:, None] & r_mask[None, :])


@triton.jit
def mose_expand_kernel(
    hp_ptr, B_ptr, base_ptr, y_ptr, h_ptr, norm_ptr, order_ptr, modality_ptr, expert_ptr, gate_ptr, scale_ptr,
    N, D_OUT, R, M, E, n_h_splits, n_per_split,
    stride_mod, stride_en, stride_ek, stride_gn, stride_gk, stride_hps, stride_hpn,
    stride_bm, stride_be, stride_bn, stride_br, stride_on, stride_od, stride_yn, stride_yd, stride_hn,
    stride_norm_s,
    TOP_K: tl.constexpr, HAS_BASE: tl.constexpr, ONLY_ADAPTED_ROWS: tl.constexpr, WRITE_H: tl.constexpr,
    WRITE_NORM: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr, NUMERICS: tl.constexpr,
):
    """y[t] = base[t] + scale_m * u[t],  u[t] = sum_j gate[t, j] B[m, e_j] @ h[t]   (fp32 accumulation).

    grid (cdiv(N, BLOCK_T), n_splits): program (i, s) writes its block's rows over d_out columns
    [s * n_per_split, (s + 1) * n_per_split), one combo of the block at a time (a pipelined loop
    over the columns inside; each combo's rows are stored alone, so other rows never see its B).
    h is the sum of the shrink's partials (fixed order). ``base`` is ``out`` (N, d_out), a bias (row
    stride 0), or absent (0). Rows without adapter get base exactly; with ONLY_ADAPTED_ROWS (in
    place: y is base) they are not written. WRITE_H: the programs of split 0 also store h (fp32)
    for the backward. WRITE_NORM: norm[s, t] = ||u[t]||^2 over the split's columns (the update before
    scale; the caller sums the splits).
    """
    pid_t = tl.program_id(0)
    pid_s = tl.program_id(1)
    tok, mod, in_range, adapted = _load_rows(order_ptr, modality_ptr, stride_mod, N, M, pid_t, BLOCK_T)
    n_groups = M * E
    offs_r = tl.arange(0, BLOCK_R)
    r_mask = offs_r < R
    offs_nb = tl.arange(0, BLOCK_N)
    n_lo = pid_s * n_per_split
    n_hi = tl.minimum(n_lo + n_per_split, D_OUT)

    h = _sum_partials(hp_ptr, stride_hps, n_h_splits, tok[:, None] * stride_hpn, offs_r[None, :],
                      adapted[:, None] & r_mask[None, :])  # [BT, BR] fp32
    if WRITE_H:
        if pid_s == 0:
            tl.store(h_ptr + tok[:, None] * stride_hn + offs_r[None, :], h, mask=in_range[:, None] & r_mask[None, :])
    group0, gate0 = _load_choice(expert_ptr, gate_ptr, tok, adapted, mod, 0, E, n_groups,
                                 stride_en, stride_ek, stride_gn, stride_gk)
    group1, gate1 = _load_choice(expert_ptr, gate_ptr, tok, adapted, mod, TOP_K - 1, E, n_groups,
                                 stride_en, stride_ek, stride_gn, stride_gk)
    combo = _combo(group0, group1, n_groups, TOP_K)
    no_adapter = _combo(n_groups, n_groups, n_groups, TOP_K)
    scale = tl.load(scale_ptr + tl.where(adapted, mod, 0), mask=adapted, other=0.0)  # [BT] fp32
    hw0 = _downcast(h * gate0[:, None], B_ptr.dtype.element_ty, NUMERICS)  # [BT, BR] gate applied first
    hw1 = _downcast(h * gate1[:, None], B_ptr.dtype.element_ty, NUMERICS)

    sumsq = tl.zeros((BLOCK_T,), dtype=tl.float32)  # [BT]
    cur = tl.min(combo, axis=0)
    while cur < no_adapter:
        sel = combo == cur
        c0, c1 = _combo_groups(cur, n_groups, TOP_K)
        r_ok0 = _choice_rank_mask(offs_r, r_mask, c0, n_groups)
        r_ok1 = _choice_rank_mask(offs_r, r_mask, c1, n_groups)
        b0_base = _group_ptr(B_ptr, c0, n_groups, E, stride_bm, stride_be)
        b1_base = _group_ptr(B_ptr, c1, n_groups, E, stride_bm, stride_be)
        hs0 = tl.where(sel[:, None], hw0, 0.0)
        hs1 = tl.where(sel[:, None], hw1, 0.0)
        for n0 in range(n_lo, n_hi, BLOCK_N):
            offs_n = n0 + offs_nb
            n_mask = offs_n < n_hi
            bt = tl.load(b0_base + offs_r[:, None] * stride_br + offs_n[None, :] * stride_bn,
                         mask=r_ok0[:, None] & n_mask[None, :], other=0.0)  # [BR, BN] = B[m, e_0]^T tile
            u = _dot(hs0, bt, tl.zeros((BLOCK_T, BLOCK_N), dtype=tl.float32), NUMERICS)  # [BT, BN]
            if TOP_K == 2:
                bt = tl.load(b1_base + offs_r[:, None] * stride_br + offs_n[None, :] * stride_bn,
                             mask=r_ok1[:, None] & n_mask[None, :], other=0.0)
                u = _dot(hs1, bt, u, NUMERICS)
            mask = sel[:, None] & n_mask[None, :]
            if WRITE_NORM:
                sumsq += tl.sum(tl.where(mask, u * u, 0.0), axis=1)
            y = u * scale[:, None]
            if HAS_BASE:
                y += tl.load(base_ptr + tok[:, None] * stride_on + offs_n[None, :] * stride_od, mask=mask,
                             other=0.0).to(tl.float32)
            tl.store(y_ptr + tok[:, None] * stride_yn + offs_n[None, :] * stride_yd,
                     _downcast(y, y_ptr.dtype.element_ty, NUMERICS), mask=mask)  # this combo's rows only
        cur = _next_key(combo, cur, no_adapter)

    if not ONLY_ADAPTED_ROWS:  # rows without adapter: base (or 0), exactly
        plain = in_range & (combo == no_adapter)
        if tl.max(plain.to(tl.int32), axis=0) > 0:
            for n0 in range(n_lo, n_hi, BLOCK_N):
                offs_n = n0 + offs_nb
                mask = plain[:, None] & (offs_n < n_hi)[None, :]
                if HAS_BASE:
                    y = tl.load(base_ptr + tok[:, None] * stride_on + offs_n[None, :] * stride_od, mask=mask,
                                other=0.0)
                else:
                    y = tl.zeros((BLOCK_T, BLOCK_N), dtype=tl.float32)
                tl.store(y_ptr + tok[:, None] * stride_yn + offs_n[None, :] * stride_yd,
                         y.to(y_ptr.dtype.element_ty), mask=mask)
    if WRITE_NORM:
        tl.store(norm_ptr + pid_s * stride_norm_s + tok, sumsq, mask=in_range)


# ------------------------------------------------------------------------------------------------
# Backward
# ------------------------------------------------------------------------------------------------


@triton.jit
def mose_dy_kernel(
    dy_ptr, h_ptr, B_ptr, dhp_ptr, qp_ptr, dB_ptr, order_ptr, modality_ptr, expert_ptr, gate_ptr, scale_ptr,
    N, D_OUT, R, M, E, n_per_split,
    stride_mod, stride_en, stride_ek, stride_gn, stride_gk, stride_dyn, stride_dyd, stride_hn,
    stride_bm, stride_be, stride_bn, stride_br, stride_dhs, stride_dhn, stride_qs, stride_qn,
    stride_dbm, stride_dbe, stride_dbn, stride_dbr,
    TOP_K: tl.constexpr, FUSE_DB: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr, NUMERICS: tl.constexpr,
):
    """The one pass over dy: per token and choice j, g_j = B[m, e_j]^T dy over a range of d_out, then

        dhp[s, t] = sum_j gate_j g_j        (dh before scale_m; summed over s by the x pass)
        qp[s, t, j] = h[t] . g_j            (dgate_j = scale_m * sum_s qp[s, t, j])
        FUSE_DB: dB[m, e_j] += scale_m gate_j dy[t] h[t]^T   (fp32 atomics, from the same dy tile)

    grid (cdiv(N, BLOCK_T), n_splits): program (i, s) covers d_out columns
    [s * n_per_split, (s + 1) * n_per_split), looping over the combos of its block outside the
    pipelined loop over d_out, so each element of dy is loaded once.
    """
    pid_t = tl.program_id(0)
    pid_s = tl.program_id(1)
    tok, mod, in_range, adapted = _load_rows(order_ptr, modality_ptr, stride_mod, N, M, pid_t, BLOCK_T)
    n_groups = M * E
    offs_r = tl.arange(0, BLOCK_R)
    r_mask = offs_r < R
    offs_nb = tl.arange(0, BLOCK_N)
    n_lo = pid_s * n_per_split
    n_hi = tl.minimum(n_lo + n_per_split, D_OUT)

    h = tl.load(h_ptr + tok[:, None] * stride_hn + offs_r[None, :],
                mask=adapted[:, None] & r_mask[None, :], other=0.0)  # [BT, BR] fp32
    group0, gate0 = _load_choice(expert_ptr, gate_ptr, tok, adapted, mod, 0, E, n_groups,
                                 stride_en, stride_ek, stride_gn, stride_gk)
    group1, gate1 = _load_choice(expert_ptr, gate_ptr, tok, adapted, mod, TOP_K - 1, E, n_groups,
                                 stride_en, stride_ek, stride_gn, stride_gk)
    combo = _combo(group0, group1, n_groups, TOP_K)
    no_adapter = _combo(n_groups, n_groups, n_groups, TOP_K)
    if FUSE_DB:
        scale = tl.load(scale_ptr + tl.where(adapted, mod, 0), mask=adapted, other=0.0)  # [BT]
        hw0 = _downcast(h * (gate0 * scale)[:, None], dy_ptr.dtype.element_ty, NUMERICS)  # [BT, BR]
        hw1 = _downcast(h * (gate1 * scale)[:, None], dy_ptr.dtype.element_ty, NUMERICS)

    g0_all = tl.zeros((BLOCK_T, BLOCK_R), dtype=tl.float32)  # [BT, BR]
    g1_all = tl.zeros((BLOCK_T, BLOCK_R), dtype=tl.float32)
    cur = tl.min(combo, axis=0)
    while cur < no_adapter:
        sel = combo == cur
        c0, c1 = _combo_groups(cur, n_groups, TOP_K)
        # a skipped choice reads group 0 with every load and store masked off (no branch in the loop)
        r_ok0 = _choice_rank_mask(offs_r, r_mask, c0, n_groups)
        r_ok1 = _choice_rank_mask(offs_r, r_mask, c1, n_groups)
        b0_base = _group_ptr(B_ptr, c0, n_groups, E, stride_bm, stride_be)
        b1_base = _group_ptr(B_ptr, c1, n_groups, E, stride_bm, stride_be)
        if FUSE_DB:
            db0_base = _group_ptr(dB_ptr, c0, n_groups, E, stride_dbm, stride_dbe)
            db1_base = _group_ptr(dB_ptr, c1, n_groups, E, stride_dbm, stride_dbe)
            hs0 = tl.where(sel[:, None], hw0, 0.0)
            hs1 = tl.where(sel[:, None], hw1, 0.0)
        p0 = tl.zeros((BLOCK_T, BLOCK_R), dtype=tl.float32)
        p1 = tl.zeros((BLOCK_T, BLOCK_R), dtype=tl.float32)
        for n0 in range(n_lo, n_hi, BLOCK_N):
            offs_n = n0 + offs_nb
            n_mask = offs_n < n_hi
            dy = tl.load(dy_ptr + tok[:, None] * stride_dyn + offs_n[None, :] * stride_dyd,
                         mask=sel[:, None] & n_mask[None, :], other=0.0)  # [BT, BN], read once
            bn_mask0 = n_mask[:, None] & r_ok0[None, :]
            b0 = tl.load(b0_base + offs_n[:, None] * stride_bn + offs_r[None, :] * stride_br,
                         mask=bn_mask0, other=0.0)  # [BN, BR] = B[m, e_0] tile
            p0 = _dot(dy, b0, p0, NUMERICS)
            if FUSE_DB:
                db = _dot(tl.trans(dy), hs0, tl.zeros((BLOCK_N, BLOCK_R), dtype=tl.float32), NUMERICS)
                tl.atomic_add(db0_base + offs_n[:, None] * stride_dbn + offs_r[None, :] * stride_dbr, db,
                              mask=bn_mask0, sem="relaxed")
            if TOP_K == 2:
                bn_mask1 = n_mask[:, None] & r_ok1[None, :]
                b1 = tl.load(b1_base + offs_n[:, None] * stride_bn + offs_r[None, :] * stride_br,
                             mask=bn_mask1, other=0.0)
                p1 = _dot(dy, b1, p1, NUMERICS)
                if FUSE_DB:
                    db = _dot(tl.trans(dy), hs1, tl.zeros((BLOCK_N, BLOCK_R), dtype=tl.float32), NUMERICS)
                    tl.atomic_add(db1_base + offs_n[:, None] * stride_dbn + offs_r[None, :] * stride_dbr, db,
                                  mask=bn_mask1, sem="relaxed")
        g0_all = tl.where(sel[:, None] & r_ok0[None, :], p0, g0_all)  # select: other rows never see B[c0]
        g1_all = tl.where(sel[:, None] & r_ok1[None, :], p1, g1_all)
        cur = _next_key(combo, cur, no_adapter)

    rows = in_range[:, None] & r_mask[None, :]
    dhu = g0_all * gate0[:, None]
    if TOP_K == 2:
        dhu += g1_all * gate1[:, None]
    tl.store(dhp_ptr + pid_s * stride_dhs + tok[:, None] * stride_dhn + offs_r[None, :], dhu, mask=rows)
    tl.store(qp_ptr + pid_s * stride_qs + tok * stride_qn, tl.sum(h * g0_all, axis=1), mask=in_range)
    if TOP_K == 2:
        tl.store(qp_ptr + pid_s * stride_qs + tok * stride_qn + 1, tl.sum(h * g1_all, axis=1), mask=in_range)


@triton.jit
def mose_x_kernel(
    x_ptr, A_ptr, dhp_ptr, qp_ptr, dx_ptr, dA_ptr, dh_ptr, dgate_ptr, order_ptr, modality_ptr, expert_ptr,
    scale_ptr,
    N, D_IN, R, M, E, n_dh_splits, k_per_split,
    stride_mod, stride_en, stride_ek, stride_xn, stride_xk, stride_am, stride_ar, stride_ak,
    stride_dhs, stride_dhn, stride_qs, stride_qn, stride_dxn, stride_dxk, stride_dam, stride_dar, stride_dak,
    stride_hn, stride_dgn, stride_dgk,
    TOP_K: tl.constexpr, WRITE_DX: tl.constexpr, FUSE_DA: tl.constexpr, WRITE_DH: tl.constexpr,
    WRITE_DGATE: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr, NUMERICS: tl.constexpr,
):
    """The one pass over x (and dx): with dh[t] = scale_m * sum_s dhp[s, t],

        WRITE_DX: dx[t] = A[m]^T dh[t]        (0 for rows without adapter)
        FUSE_DA:  dA[m] += dh[t] x[t]^T       (fp32 atomics, x read once)

    and, by the programs of split 0, WRITE_DGATE: dgate[t, j] = scale_m * sum_s qp[s, t, j]
    (stored in dgate's dtype) and WRITE_DH: dh (fp32, for the deterministic dA reduction).

    grid (cdiv(N, BLOCK_T), n_splits): program (i, s) covers d_in columns [s * k_per_split,
    (s + 1) * k_per_split), one modality of its block at a time (a pipelined loop over the columns
    inside; each modality's rows are stored alone).
    """
    pid_t = tl.program_id(0)
    pid_s = tl.program_id(1)
    tok, mod, in_range, adapted = _load_rows(order_ptr, modality_ptr, stride_mod, N, M, pid_t, BLOCK_T)
    offs_r = tl.arange(0, BLOCK_R)
    r_mask = offs_r < R
    offs_kb = tl.arange(0, BLOCK_K)
    k_lo = pid_s * k_per_split
    k_hi = tl.minimum(k_lo + k_per_split, D_IN)

    scale = tl.load(scale_ptr + tl.where(adapted, mod, 0), mask=adapted, other=0.0)  # [BT] fp32
    dhu = _sum_partials(dhp_ptr, stride_dhs, n_dh_splits, tok[:, None] * stride_dhn, offs_r[None, :],
                        adapted[:, None] & r_mask[None, :])
    dh = dhu * scale[:, None]  # [BT, BR] fp32
    if pid_s == 0:
        if WRITE_DH:
            tl.store(dh_ptr + tok[:, None] * stride_hn + offs_r[None, :], dh, mask=in_range[:, None] & r_mask[None, :])
        if WRITE_DGATE:
            for j in tl.static_range(TOP_K):
                e = tl.load(expert_ptr + tok * stride_en + j * stride_ek, mask=adapted, other=-1).to(tl.int32)
                ok = adapted & (e >= 0) & (e < E)
                q = _sum_partials(qp_ptr, stride_qs, n_dh_splits, tok * stride_qn, j, ok)
                tl.store(dgate_ptr + tok * stride_dgn + j * stride_dgk, tl.where(ok, q * scale, 0.0), mask=in_range)

    mod_key = tl.where(adapted, mod, M)
    cur = tl.min(mod_key, axis=0)
    while cur < M:
        sel = mod_key == cur
        dhs = _downcast(tl.where(sel[:, None], dh, 0.0), x_ptr.dtype.element_ty, NUMERICS)  # [BT, BR]
        a_base = A_ptr + cur.to(tl.int64) * stride_am
        da_base = dA_ptr + cur.to(tl.int64) * stride_dam
        for k0 in range(k_lo, k_hi, BLOCK_K):
            offs_k = k0 + offs_kb
            k_mask = offs_k < k_hi
            if WRITE_DX:
                a = tl.load(a_base + offs_r[:, None] * stride_ar + offs_k[None, :] * stride_ak,
                            mask=r_mask[:, None] & k_mask[None, :], other=0.0)  # [BR, BK]
                dx = _dot(dhs, a, tl.zeros((BLOCK_T, BLOCK_K), dtype=tl.float32), NUMERICS)
                tl.store(dx_ptr + tok[:, None] * stride_dxn + offs_k[None, :] * stride_dxk,
                         _downcast(dx, dx_ptr.dtype.element_ty, NUMERICS),
                         mask=sel[:, None] & k_mask[None, :])  # this modality's rows only
            if FUSE_DA:
                xt = tl.load(x_ptr + tok[:, None] * stride_xn + offs_k[None, :] * stride_xk,
                             mask=sel[:, None] & k_mask[None, :], other=0.0)  # [BT, BK]
                da = _dot(tl.trans(dhs), xt, tl.zeros((BLOCK_R, BLOCK_K), dtype=tl.float32), NUMERICS)
                tl.atomic_add(da_base + offs_r[:, None] * stride_dar + offs_k[None, :] * stride_dak, da,
                              mask=r_mask[:, None] & k_mask[None, :], sem="relaxed")
        cur = _next_key(mod_key, cur, M)

    if WRITE_DX:  # rows without adapter: 0
        plain = in_range & (mod_key == M)
        if tl.max(plain.to(tl.int32), axis=0) > 0:
            for k0 in range(k_lo, k_hi, BLOCK_K):
                offs_k = k0 + offs_kb
                tl.store(dx_ptr + tok[:, None] * stride_dxn + offs_k[None, :] * stride_dxk,
                         tl.zeros((BLOCK_T, BLOCK_K), dtype=dx_ptr.dtype.element_ty),
                         mask=plain[:, None] & (offs_k < k_hi)[None, :])


@triton.jit
def _split_range(offsets_ptr, bucket, stride_off, split, n_splits):
    """[start, end) of this program's share of one bucket's items (a bucket's items are contiguous)."""
    lo = tl.load(offsets_ptr + bucket * stride_off)
    hi = tl.load(offsets_ptr + (bucket + 1) * stride_off)
    chunk = tl.cdiv(hi - lo, n_splits)
    start = lo + split * chunk
    end = tl.minimum(start + chunk, hi)
    return start, end


@triton.jit
def mose_wgrad_A_kernel(
    x_ptr, dh_ptr, dAp_ptr, order_ptr, offsets_ptr,
    D_IN, R, n_splits,
    stride_off, stride_xn, stride_xk, stride_hn, stride_ps, stride_pm, stride_pr, stride_pk,
    BLOCK_T: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr, NUMERICS: tl.constexpr,
):
    """Deterministic dA: dAp[s, m][:, k-tile] = sum over split s of modality m's tokens of dh[t] x[t]^T.

    grid (M, cdiv(D_IN, BLOCK_K), n_splits); modality m's tokens are ``order[offsets[m * stride_off]:
    offsets[(m + 1) * stride_off]]``. Every program stores its tile (zeros when its share is empty);
    the caller sums the splits in order.
    """
    m = tl.program_id(0)
    pid_k = tl.program_id(1)
    split = tl.program_id(2)
    start, end = _split_range(offsets_ptr, m, stride_off, split, n_splits)
    offs_r = tl.arange(0, BLOCK_R)
    r_mask = offs_r < R
    offs_k = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    k_mask = offs_k < D_IN
    offs_tb = tl.arange(0, BLOCK_T)

    acc = tl.zeros((BLOCK_R, BLOCK_K), dtype=tl.float32)  # [BR, BK]
    for p0 in range(start, end, BLOCK_T):
        p = p0 + offs_tb
        p_mask = p < end
        tok = tl.load(order_ptr + p, mask=p_mask, other=0).to(tl.int64)  # [BT]
        dh = tl.load(dh_ptr + tok[:, None] * stride_hn + offs_r[None, :],
                     mask=p_mask[:, None] & r_mask[None, :], other=0.0)  # [BT, BR] fp32
        xt = tl.load(x_ptr + tok[:, None] * stride_xn + offs_k[None, :] * stride_xk,
                     mask=p_mask[:, None] & k_mask[None, :], other=0.0)  # [BT, BK]
        acc = _dot(tl.trans(_downcast(dh, x_ptr.dtype.element_ty, NUMERICS)), xt, acc, NUMERICS)
    tl.store(dAp_ptr + split * stride_ps + m.to(tl.int64) * stride_pm + offs_r[:, None] * stride_pr
             + offs_k[None, :] * stride_pk, acc, mask=r_mask[:, None] & k_mask[None, :])


@triton.jit
def mose_wgrad_B_kernel(
    dy_ptr, h_ptr, dBp_ptr, pair_order_ptr, offsets_ptr, gate_ptr, scale_ptr,
    D_OUT, R, E, n_splits,
    stride_gn, stride_gk, stride_dyn, stride_dyd, stride_hn, stride_ps, stride_pg, stride_pn, stride_pr,
    TOP_K: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr, NUMERICS: tl.constexpr,
):
    """Deterministic dB: dBp[s, g][n-tile] = sum over split s of group g's pairs (t, j) of
    scale_m gate[t, j] dy[t] h[t]^T.

    grid (M * E, cdiv(D_OUT, BLOCK_N), n_splits); ``pair_order`` holds pair ids ``t * TOP_K + j``
    sorted by group and ``offsets`` bounds each group. The caller sums the splits in order.
    """
    group = tl.program_id(0)
    pid_n = tl.program_id(1)
    split = tl.program_id(2)
    start, end = _split_range(offsets_ptr, group, 1, split, n_splits)
    scale = tl.load(scale_ptr + group // E)
    offs_r = tl.arange(0, BLOCK_R)
    r_mask = offs_r < R
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < D_OUT
    offs_tb = tl.arange(0, BLOCK_T)

    acc = tl.zeros((BLOCK_N, BLOCK_R), dtype=tl.float32)  # [BN, BR]
    for p0 in range(start, end, BLOCK_T):
        p = p0 + offs_tb
        p_mask = p < end
        pair = tl.load(pair_order_ptr + p, mask=p_mask, other=0).to(tl.int64)  # [BT]
        tok = pair // TOP_K
        w = tl.load(gate_ptr + tok * stride_gn + (pair % TOP_K) * stride_gk, mask=p_mask, other=0.0)
        w = w.to(tl.float32) * scale  # [BT]
        dy = tl.load(dy_ptr + tok[:, None] * stride_dyn + offs_n[None, :] * stride_dyd,
                     mask=p_mask[:, None] & n_mask[None, :], other=0.0)  # [BT, BN]
        h = tl.load(h_ptr + tok[:, None] * stride_hn + offs_r[None, :],
                    mask=p_mask[:, None] & r_mask[None, :], other=0.0)  # [BT, BR] fp32
        hw = _downcast(h * w[:, None], dy_ptr.dtype.element_ty, NUMERICS)
        acc = _dot(tl.trans(dy), hw, acc, NUMERICS)
    tl.store(dBp_ptr + split * stride_ps + group.to(tl.int64) * stride_pg + offs_n[:, None] * stride_pn
             + offs_r[None, :] * stride_pr, acc, mask=n_mask[:, None] & r_mask[None, :])

"""Triton kernels of the MoSE dispatch (no launch logic, no autograd: see launch.py and function.py).

Notation: N tokens, d_in, d_out, rank R (padded to BLOCK_R, a power of two >= 16, for tl.dot),
M modalities, E experts per modality, k = TOP_K choices per token. A "key" is ``m * E + e``: the
(modality, expert) group of one (token, choice) pair; ``n_keys = M * E`` marks a pair that has no
adapter (modality -1, or an id out of range: such pairs are skipped, never read out of bounds).

Row-parallel kernels (shrink, expand, and their backward) walk the tokens in ``order``: token ids
sorted by (modality, expert_0[, expert_1]), tokens without adapter last. A block of BLOCK_T sorted
tokens therefore holds few distinct groups; each kernel loops over the groups *present* in its block
(``_next_key``: the smallest key above the current one, a data-dependent ``while`` loop, so the
grid stays fixed and the host never reads a group size) with the other rows masked out. Rows are
gathered and scattered through the token id, so x and the output are never permuted or copied, and
each output row is produced by exactly one program (both choices of a top-2 token are summed in
registers: deterministic, no atomics in the forward).

Weight-gradient kernels reduce over one group's rows (tokens of a modality for dA, pairs of a
(modality, expert) for dB) given device-side group offsets. With SPLIT > 1 the rows of each group are
split over SPLIT programs whose partial sums meet through fp32 atomic adds (fast, order not fixed);
SPLIT == 1 is the deterministic mode: one program owns each output tile and plainly stores it.

Dots run in the input dtype (tensor cores) with fp32 accumulation; fp32 inputs use IEEE fp32 dots
(NUMERICS 1) to meet the float32 tolerance rather than tf32. NUMERICS 2 works around two bf16
defects of the Triton interpreter (see ``_dot`` and ``_downcast``); compiled code never uses it.
"""

from __future__ import annotations

import triton
import triton.language as tl


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
def _load_rows(order_ptr, modality_ptr, N, M, pid, BLOCK_T: tl.constexpr):
    """Token ids of one block of sorted positions, their modality and which rows have an adapter."""
    offs = pid * BLOCK_T + tl.arange(0, BLOCK_T)  # [BT] positions in sorted order
    in_range = offs < N
    tok = tl.load(order_ptr + offs, mask=in_range, other=0)  # [BT] int64 original token ids
    mod = tl.load(modality_ptr + tok, mask=in_range, other=-1)  # [BT] int32
    adapted = in_range & (mod >= 0) & (mod < M)  # out-of-range modality ids are skipped
    return tok, mod, in_range, adapted


@triton.jit
def _load_choice(expert_ptr, gate_ptr, tok, mod, adapted, scale, j, E, n_keys, TOP_K: tl.constexpr):
    """Group key and weight ``gate * scale_m`` (fp32) of choice j of each row; n_keys / 0 when skipped."""
    e = tl.load(expert_ptr + tok * TOP_K + j, mask=adapted, other=-1)  # [BT] int32
    ok = adapted & (e >= 0) & (e < E)  # out-of-range expert ids are skipped
    key = tl.where(ok, mod * E + e, n_keys)  # [BT]
    w = tl.load(gate_ptr + tok * TOP_K + j, mask=ok, other=0.0) * scale  # [BT] fp32
    return key, w


# ------------------------------------------------------------------------------------------------
# Forward
# ------------------------------------------------------------------------------------------------


@triton.jit
def _expand_accumulate(acc, h_ptr, B_ptr, expert_ptr, gate_ptr, scale_ptr, tok, mod, adapted, offs_n, n_mask,
                       R, M, E, stride_hn, stride_bm, stride_be, stride_bn, stride_br,
                       TOP_K: tl.constexpr, BLOCK_R: tl.constexpr, NUMERICS: tl.constexpr):
    """acc[t] += sum_j gate[t, j] scale_m B[m, e_j][n-tile] @ h[t] over the groups present in the block."""
    n_keys = M * E
    offs_r = tl.arange(0, BLOCK_R)
    r_mask = offs_r < R
    scale = tl.load(scale_ptr + tl.where(adapted, mod, 0), mask=adapted, other=0.0)  # [BT] fp32
    h = tl.load(h_ptr + tok[:, None] * stride_hn + offs_r[None, :],
                mask=adapted[:, None] & r_mask[None, :], other=0.0)  # [BT, BR] fp32
    for j in tl.static_range(TOP_K):
        key, w = _load_choice(expert_ptr, gate_ptr, tok, mod, adapted, scale, j, E, n_keys, TOP_K)
        hw = h * w[:, None]  # [BT, BR] the gate and scale applied before the expand
        cur = tl.min(key, axis=0)
        while cur < n_keys:
            sel = key == cur
            hs = _downcast(tl.where(sel[:, None], hw, 0.0), B_ptr.dtype.element_ty, NUMERICS)  # [BT, BR]
            b_base = B_ptr + (cur // E).to(tl.int64) * stride_bm + (cur % E).to(tl.int64) * stride_be
            bt = tl.load(b_base + offs_r[:, None] * stride_br + offs_n[None, :] * stride_bn,
                         mask=r_mask[:, None] & n_mask[None, :], other=0.0)  # [BR, BN] = B[m, e]^T tile
            acc = _dot(hs, bt, acc, NUMERICS)
            cur = _next_key(key, cur, n_keys)
    return acc


@triton.jit
def mose_shrink_kernel(
    x_ptr, A_ptr, h_ptr, order_ptr, modality_ptr,
    N, D_IN, R, M,
    stride_xn, stride_xk, stride_am, stride_ar, stride_ak, stride_hn,
    BLOCK_T: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr, NUMERICS: tl.constexpr,
):
    """h[t] = A[modality[t]] @ x[t] in fp32, once per token (shared by all its choices).

    grid (cdiv(N, BLOCK_T),): one program per block of sorted tokens, looping over the modalities
    present in the block. Rows without adapter get h = 0.
    """
    pid = tl.program_id(0)
    tok, mod, in_range, adapted = _load_rows(order_ptr, modality_ptr, N, M, pid, BLOCK_T)
    mod_key = tl.where(adapted, mod, M)  # [BT]; M = no adapter
    offs_r = tl.arange(0, BLOCK_R)
    offs_k = tl.arange(0, BLOCK_K)
    r_mask = offs_r < R

    acc = tl.zeros((BLOCK_T, BLOCK_R), dtype=tl.float32)  # [BT, BR]
    cur = tl.min(mod_key, axis=0)
    while cur < M:
        sel = mod_key == cur  # [BT] rows of this modality; the others load zeros
        a_base = A_ptr + cur.to(tl.int64) * stride_am
        for k0 in range(0, D_IN, BLOCK_K):
            k = k0 + offs_k
            k_mask = k < D_IN
            xt = tl.load(x_ptr + tok[:, None] * stride_xn + k[None, :] * stride_xk,
                         mask=sel[:, None] & k_mask[None, :], other=0.0)  # [BT, BK]
            at = tl.load(a_base + offs_r[None, :] * stride_ar + k[:, None] * stride_ak,
                         mask=r_mask[None, :] & k_mask[:, None], other=0.0)  # [BK, BR] = A[m]^T tile
            acc = _dot(xt, at, acc, NUMERICS)
        cur = _next_key(mod_key, cur, M)
    tl.store(h_ptr + tok[:, None] * stride_hn + offs_r[None, :], acc,
             mask=in_range[:, None] & r_mask[None, :])


@triton.jit
def mose_expand_kernel(
    h_ptr, B_ptr, out_ptr, y_ptr, order_ptr, modality_ptr, expert_ptr, gate_ptr, scale_ptr,
    N, D_OUT, R, M, E,
    stride_hn, stride_bm, stride_be, stride_bn, stride_br,
    stride_on, stride_od, stride_yn, stride_yd,
    TOP_K: tl.constexpr, HAS_OUT: tl.constexpr, ONLY_ADAPTED_ROWS: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr, NUMERICS: tl.constexpr,
):
    """y[t, n-tile] = out[t] + sum_j gate[t, j] * scale_m * B[m, e_j] @ h[t]   (fp32 accumulation).

    grid (cdiv(N, BLOCK_T), cdiv(D_OUT, BLOCK_N)). Each program owns its output rows: it reads out
    and writes y once, every choice of every row summed in registers. Rows without adapter get
    y = out (zeros without out); with ONLY_ADAPTED_ROWS (in place, y is out) they are not touched.
    """
    pid_t = tl.program_id(0)
    pid_n = tl.program_id(1)
    tok, mod, in_range, adapted = _load_rows(order_ptr, modality_ptr, N, M, pid_t, BLOCK_T)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < D_OUT
    acc = tl.zeros((BLOCK_T, BLOCK_N), dtype=tl.float32)  # [BT, BN]
    acc = _expand_accumulate(acc, h_ptr, B_ptr, expert_ptr, gate_ptr, scale_ptr, tok, mod, adapted,
                             offs_n, n_mask, R, M, E, stride_hn, stride_bm, stride_be, stride_bn, stride_br,
                             TOP_K, BLOCK_R, NUMERICS)
    if ONLY_ADAPTED_ROWS:
        rows = adapted
    else:
        rows = in_range
    mask = rows[:, None] & n_mask[None, :]
    if HAS_OUT:
        o = tl.load(out_ptr + tok[:, None] * stride_on + offs_n[None, :] * stride_od, mask=mask, other=0.0)
        acc += o.to(tl.float32)
    tl.store(y_ptr + tok[:, None] * stride_yn + offs_n[None, :] * stride_yd,
             _downcast(acc, y_ptr.dtype.element_ty, NUMERICS), mask=mask)


# ------------------------------------------------------------------------------------------------
# Backward
# ------------------------------------------------------------------------------------------------


@triton.jit
def _expand_transposed(acc, dy, key, B_ptr, offs_n, n_mask, offs_r, r_mask, n_keys, E,
                       stride_bm, stride_be, stride_bn, stride_br, NUMERICS: tl.constexpr):
    """acc[t] += B[m, e_t]^T @ dy[t] for one choice over one d_out tile, looping over present groups."""
    cur = tl.min(key, axis=0)
    while cur < n_keys:
        sel = key == cur
        dys = tl.where(sel[:, None], dy, 0.0).to(dy.dtype)  # [BT, BN]
        b_base = B_ptr + (cur // E).to(tl.int64) * stride_bm + (cur % E).to(tl.int64) * stride_be
        b = tl.load(b_base + offs_n[:, None] * stride_bn + offs_r[None, :] * stride_br,
                    mask=n_mask[:, None] & r_mask[None, :], other=0.0)  # [BN, BR] = B[m, e] tile
        acc = _dot(dys, b, acc, NUMERICS)
        cur = _next_key(key, cur, n_keys)
    return acc


@triton.jit
def mose_expand_bwd_kernel(
    dy_ptr, h_ptr, B_ptr, dh_ptr, dgate_ptr, order_ptr, modality_ptr, expert_ptr, gate_ptr, scale_ptr,
    N, D_OUT, R, M, E,
    stride_dyn, stride_dyd, stride_hn, stride_bm, stride_be, stride_bn, stride_br, stride_dhn,
    TOP_K: tl.constexpr, COMPUTE_DGATE: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr, NUMERICS: tl.constexpr,
):
    """Per token: g_j = B[m, e_j]^T dy (R,), then dh = sum_j gate_j scale_m g_j and
    dgate_j = scale_m h . g_j (fp32).

    grid (cdiv(N, BLOCK_T),): a program reduces over all of d_out for its rows, so dh and dgate
    are written once per row (no atomics). Rows without adapter get dh = 0 and dgate = 0.
    """
    pid = tl.program_id(0)
    tok, mod, in_range, adapted = _load_rows(order_ptr, modality_ptr, N, M, pid, BLOCK_T)
    n_keys = M * E
    offs_r = tl.arange(0, BLOCK_R)
    r_mask = offs_r < R
    offs_nb = tl.arange(0, BLOCK_N)

    scale = tl.load(scale_ptr + tl.where(adapted, mod, 0), mask=adapted, other=0.0)  # [BT]
    key0, w0 = _load_choice(expert_ptr, gate_ptr, tok, mod, adapted, scale, 0, E, n_keys, TOP_K)
    # choice TOP_K - 1: the second choice for top-2 (unused for top-1)
    key1, w1 = _load_choice(expert_ptr, gate_ptr, tok, mod, adapted, scale, TOP_K - 1, E, n_keys, TOP_K)
    g0 = tl.zeros((BLOCK_T, BLOCK_R), dtype=tl.float32)  # [BT, BR]
    g1 = tl.zeros((BLOCK_T, BLOCK_R), dtype=tl.float32)  # [BT, BR]
    for n0 in range(0, D_OUT, BLOCK_N):
        offs_n = n0 + offs_nb
        n_mask = offs_n < D_OUT
        dy = tl.load(dy_ptr + tok[:, None] * stride_dyn + offs_n[None, :] * stride_dyd,
                     mask=adapted[:, None] & n_mask[None, :], other=0.0)  # [BT, BN], read once
        g0 = _expand_transposed(g0, dy, key0, B_ptr, offs_n, n_mask, offs_r, r_mask, n_keys, E,
                                stride_bm, stride_be, stride_bn, stride_br, NUMERICS)
        if TOP_K == 2:
            g1 = _expand_transposed(g1, dy, key1, B_ptr, offs_n, n_mask, offs_r, r_mask, n_keys, E,
                                    stride_bm, stride_be, stride_bn, stride_br, NUMERICS)

    dh = g0 * w0[:, None]
    if TOP_K == 2:
        dh += g1 * w1[:, None]
    tl.store(dh_ptr + tok[:, None] * stride_dhn + offs_r[None, :], dh,
             mask=in_range[:, None] & r_mask[None, :])
    if COMPUTE_DGATE:
        h = tl.load(h_ptr + tok[:, None] * stride_hn + offs_r[None, :],
                    mask=adapted[:, None] & r_mask[None, :], other=0.0)  # [BT, BR] fp32
        dg0 = tl.where(key0 < n_keys, tl.sum(h * g0, axis=1) * scale, 0.0)  # [BT]
        tl.store(dgate_ptr + tok * TOP_K, dg0, mask=in_range)
        if TOP_K == 2:
            dg1 = tl.where(key1 < n_keys, tl.sum(h * g1, axis=1) * scale, 0.0)
            tl.store(dgate_ptr + tok * TOP_K + 1, dg1, mask=in_range)


@triton.jit
def _shrink_transposed_accumulate(acc, dh_ptr, A_ptr, tok, mod, adapted, offs_k, k_mask, R, M,
                                  stride_dhn, stride_am, stride_ar, stride_ak,
                                  BLOCK_R: tl.constexpr, NUMERICS: tl.constexpr):
    """acc[t] += A[m][:, k-tile]^T dh[t] over the modalities present in the block."""
    mod_key = tl.where(adapted, mod, M)
    offs_r = tl.arange(0, BLOCK_R)
    r_mask = offs_r < R
    dh = tl.load(dh_ptr + tok[:, None] * stride_dhn + offs_r[None, :],
                 mask=adapted[:, None] & r_mask[None, :], other=0.0)  # [BT, BR] fp32
    cur = tl.min(mod_key, axis=0)
    while cur < M:
        sel = mod_key == cur
        dhs = _downcast(tl.where(sel[:, None], dh, 0.0), A_ptr.dtype.element_ty, NUMERICS)  # [BT, BR]
        a_base = A_ptr + cur.to(tl.int64) * stride_am
        a = tl.load(a_base + offs_r[:, None] * stride_ar + offs_k[None, :] * stride_ak,
                    mask=r_mask[:, None] & k_mask[None, :], other=0.0)  # [BR, BK]
        acc = _dot(dhs, a, acc, NUMERICS)
        cur = _next_key(mod_key, cur, M)
    return acc


@triton.jit
def mose_shrink_bwd_kernel(
    dh_ptr, A_ptr, dx_ptr, order_ptr, modality_ptr,
    N, D_IN, R, M,
    stride_dhn, stride_am, stride_ar, stride_ak, stride_dxn, stride_dxk,
    BLOCK_T: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr, NUMERICS: tl.constexpr,
):
    """dx[t, k-tile] = A[modality[t]]^T @ dh[t]; rows without adapter get 0.

    grid (cdiv(N, BLOCK_T), cdiv(D_IN, BLOCK_K)), looping over the modalities present in the block.
    """
    pid_t = tl.program_id(0)
    pid_k = tl.program_id(1)
    tok, mod, in_range, adapted = _load_rows(order_ptr, modality_ptr, N, M, pid_t, BLOCK_T)
    offs_k = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    k_mask = offs_k < D_IN
    acc = tl.zeros((BLOCK_T, BLOCK_K), dtype=tl.float32)  # [BT, BK]
    acc = _shrink_transposed_accumulate(acc, dh_ptr, A_ptr, tok, mod, adapted, offs_k, k_mask, R, M,
                                        stride_dhn, stride_am, stride_ar, stride_ak, BLOCK_R, NUMERICS)
    tl.store(dx_ptr + tok[:, None] * stride_dxn + offs_k[None, :] * stride_dxk,
             _downcast(acc, dx_ptr.dtype.element_ty, NUMERICS), mask=in_range[:, None] & k_mask[None, :])


@triton.jit
def _split_range(offsets_ptr, group, split, SPLIT: tl.constexpr):
    """[start, end) of this program's share of a group's rows (rows of a group are contiguous)."""
    lo = tl.load(offsets_ptr + group)
    hi = tl.load(offsets_ptr + group + 1)
    chunk = tl.cdiv(hi - lo, SPLIT)
    start = lo + split * chunk
    end = tl.minimum(start + chunk, hi)
    return start, end


@triton.jit
def mose_shrink_wgrad_kernel(
    x_ptr, dh_ptr, dA_ptr, order_ptr, offsets_ptr,
    D_IN, R,
    stride_xn, stride_xk, stride_dhn, stride_dam, stride_dar, stride_dak,
    SPLIT: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr, NUMERICS: tl.constexpr,
):
    """dA[m, :, k-tile] = sum over tokens t of modality m of dh[t] x[t]^T (fp32 output).

    grid (M, cdiv(D_IN, BLOCK_K), SPLIT); ``offsets`` (M + 1,) bounds each modality in ``order``.
    """
    m = tl.program_id(0)
    pid_k = tl.program_id(1)
    start, end = _split_range(offsets_ptr, m, tl.program_id(2), SPLIT)
    offs_r = tl.arange(0, BLOCK_R)
    r_mask = offs_r < R
    offs_k = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    k_mask = offs_k < D_IN
    offs_tb = tl.arange(0, BLOCK_T)

    acc = tl.zeros((BLOCK_R, BLOCK_K), dtype=tl.float32)  # [BR, BK]
    for p0 in range(start, end, BLOCK_T):
        p = p0 + offs_tb
        p_mask = p < end
        tok = tl.load(order_ptr + p, mask=p_mask, other=0)  # [BT]
        dh = tl.load(dh_ptr + tok[:, None] * stride_dhn + offs_r[None, :],
                     mask=p_mask[:, None] & r_mask[None, :], other=0.0)  # [BT, BR] fp32
        xt = tl.load(x_ptr + tok[:, None] * stride_xn + offs_k[None, :] * stride_xk,
                     mask=p_mask[:, None] & k_mask[None, :], other=0.0)  # [BT, BK]
        acc = _dot(tl.trans(_downcast(dh, x_ptr.dtype.element_ty, NUMERICS)), xt, acc, NUMERICS)
    ptrs = dA_ptr + m.to(tl.int64) * stride_dam + offs_r[:, None] * stride_dar + offs_k[None, :] * stride_dak
    mask = r_mask[:, None] & k_mask[None, :]
    if SPLIT == 1:
        tl.store(ptrs, acc, mask=mask)  # sole owner of this tile: deterministic
    else:
        if start < end:
            tl.atomic_add(ptrs, acc, mask=mask)


@triton.jit
def mose_expand_wgrad_kernel(
    dy_ptr, h_ptr, dB_ptr, pair_order_ptr, offsets_ptr, gate_ptr, scale_ptr,
    D_OUT, R, E,
    stride_dyn, stride_dyd, stride_hn, stride_dbm, stride_dbe, stride_dbn, stride_dbr,
    TOP_K: tl.constexpr, SPLIT: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr, NUMERICS: tl.constexpr,
):
    """dB[m, e, n-tile, :] = sum over pairs (t, j) of group (m, e) of gate[t, j] scale_m dy[t] h[t]^T.

    grid (M * E, cdiv(D_OUT, BLOCK_N), SPLIT); ``pair_order`` holds pair ids t * TOP_K + j sorted
    by group, ``offsets`` (M * E + 1,) bounds each group in it (empty groups store zeros).
    """
    group = tl.program_id(0)
    pid_n = tl.program_id(1)
    start, end = _split_range(offsets_ptr, group, tl.program_id(2), SPLIT)
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
        pair = tl.load(pair_order_ptr + p, mask=p_mask, other=0)  # [BT] int64
        tok = pair // TOP_K
        w = tl.load(gate_ptr + pair, mask=p_mask, other=0.0) * scale  # [BT] fp32
        dy = tl.load(dy_ptr + tok[:, None] * stride_dyn + offs_n[None, :] * stride_dyd,
                     mask=p_mask[:, None] & n_mask[None, :], other=0.0)  # [BT, BN]
        dyw = _downcast(dy.to(tl.float32) * w[:, None], dy_ptr.dtype.element_ty, NUMERICS)
        h = tl.load(h_ptr + tok[:, None] * stride_hn + offs_r[None, :],
                    mask=p_mask[:, None] & r_mask[None, :], other=0.0)  # [BT, BR] fp32
        acc = _dot(tl.trans(dyw), _downcast(h, dy_ptr.dtype.element_ty, NUMERICS), acc, NUMERICS)
    ptrs = (dB_ptr + (group // E).to(tl.int64) * stride_dbm + (group % E).to(tl.int64) * stride_dbe
            + offs_n[:, None] * stride_dbn + offs_r[None, :] * stride_dbr)
    mask = n_mask[:, None] & r_mask[None, :]
    if SPLIT == 1:
        tl.store(ptrs, acc, mask=mask)  # sole owner of this tile: deterministic
    else:
        if start < end:
            tl.atomic_add(ptrs, acc, mask=mask)

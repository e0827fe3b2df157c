"""Launchers of the MoSE Triton kernels: index preparation, block sizes, grids, allocation. No autograd.

Everything here runs without a host synchronisation: the routing is sorted on the device, group
bounds come from ``searchsorted`` on the device, grids depend on shapes only and kernels exit early
(or loop zero times) on what a block does not hold. A forward or backward call can therefore be
captured in a CUDA graph.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton

from ..alloc import empty_output
from ..target import interpreted, multiprocessor_count
from .triton_kernels import (
    mose_expand_bwd_kernel,
    mose_expand_kernel,
    mose_expand_wgrad_kernel,
    mose_shrink_bwd_kernel,
    mose_shrink_kernel,
    mose_shrink_wgrad_kernel,
)

# 8 warps: with 4, ptxas (sm_90a) spilled registers in the expand, expand-backward and fused-linear
# kernels at every rank; with 8 no kernel spills up to r = 64 at the block sizes below.
_NUM_WARPS = 8


@dataclass(frozen=True)
class MoseRouting:
    """The routing of one call in the layout the kernels read (all on x's device)."""

    order: torch.Tensor  # (N,) int64: token ids sorted by (modality, expert_0[, expert_1]); no adapter last
    modality_offsets: torch.Tensor  # (M + 1,) int64: bounds of each modality's tokens in `order`
    modality: torch.Tensor  # (N,) int32
    expert: torch.Tensor  # (N, k) int32, contiguous
    gate: torch.Tensor  # (N, k) float32, contiguous
    n_modalities: int
    n_experts: int

    @property
    def top_k(self) -> int:
        return self.expert.shape[1]


def prepare_routing(modality, expert, gate, n_modalities: int, n_experts: int) -> MoseRouting:
    """Sorts token *indices* by (modality, expert_0[, expert_1]) on the device (no data is permuted).

    Tokens whose modality is outside [0, M) sort last (key M * E**k). An out-of-range expert id only
    counts as expert 0 for the sort (so tokens stay grouped by modality); the kernels skip that pair.
    """
    top_k = expert.shape[1]
    mod = modality.long()
    has_adapter = (mod >= 0) & (mod < n_modalities)
    exp = expert.long()
    exp = torch.where((exp >= 0) & (exp < n_experts), exp, torch.zeros_like(exp))
    key = torch.where(has_adapter, mod, torch.zeros_like(mod))
    for j in range(top_k):
        key = key * n_experts + exp[:, j]
    stride = n_experts ** top_k  # keys of modality m lie in [m * stride, (m + 1) * stride)
    key = torch.where(has_adapter, key, torch.full_like(key, n_modalities * stride))
    sorted_key, order = torch.sort(key, stable=True)
    bounds = torch.arange(n_modalities + 1, device=key.device, dtype=torch.long) * stride
    modality_offsets = torch.searchsorted(sorted_key, bounds)
    return MoseRouting(
        order=order,
        modality_offsets=modality_offsets,
        modality=modality.to(torch.int32).contiguous(),
        expert=expert.to(torch.int32).contiguous(),
        gate=gate.to(torch.float32).contiguous(),
        n_modalities=n_modalities,
        n_experts=n_experts,
    )


def sort_pairs(routing: MoseRouting) -> tuple[torch.Tensor, torch.Tensor]:
    """(token, choice) pair ids ``t * k + j`` sorted by group ``m * E + e`` and the (M * E + 1,) group
    bounds; pairs without adapter (modality or expert out of range) sort last, outside every group."""
    n_keys = routing.n_modalities * routing.n_experts
    mod = routing.modality.long()[:, None]
    exp = routing.expert.long()
    valid = (mod >= 0) & (mod < routing.n_modalities) & (exp >= 0) & (exp < routing.n_experts)
    key = torch.where(valid, mod * routing.n_experts + exp, torch.full_like(exp, n_keys)).reshape(-1)
    sorted_key, pair_order = torch.sort(key, stable=True)
    bounds = torch.arange(n_keys + 1, device=key.device, dtype=torch.long)
    return pair_order, torch.searchsorted(sorted_key, bounds)


# ------------------------------------------------------------------------------------------------
# Block sizes
# ------------------------------------------------------------------------------------------------


def _pow2(n: int, low: int, high: int) -> int:
    return max(low, min(high, triton.next_power_of_2(max(n, 1))))


def rank_block(rank: int) -> int:
    """tl.dot needs every dimension >= 16: the rank is padded (and masked) to a power of two >= 16."""
    return max(16, triton.next_power_of_2(rank))


def token_block(n_tokens: int) -> int:
    return _pow2(n_tokens, 16, 64)


def feature_block(d: int, block_r: int) -> int:
    # keep the [BLOCK_T, BLOCK] and [BLOCK_R, BLOCK] fp32 tiles within register budgets at r = 64
    return _pow2(d, 16, 64 if block_r <= 32 else 32)


def numerics_mode(dtype: torch.dtype, device: torch.device) -> int:
    """The kernels' NUMERICS (see triton_kernels._dot): fp32 inputs get IEEE fp32 dots (the float32
    tolerance, 1e-5, is below tf32's precision); bf16 on the CPU (the interpreter) gets the
    interpreter work-arounds."""
    if dtype == torch.float32:
        return 1
    if dtype == torch.bfloat16 and interpreted(device):
        return 2
    return 0


def launch_kernel(kernel, grid, *args, **kwargs) -> None:
    if all(g > 0 for g in grid):  # an empty grid is not a valid launch
        kernel[grid](*args, num_warps=_NUM_WARPS, **kwargs)


def wgrad_splits(n_rows: int, n_groups: int, n_tiles: int, device: torch.device, deterministic: bool) -> int:
    """How many programs share one group's rows in a weight-gradient reduction (1 = deterministic).

    Shapes only (no look at the group sizes, which would need a sync): enough programs to fill the
    device, each still with a few blocks of rows. Under the interpreter (CPU) 2, so that the
    atomic path is what the CPU tests exercise besides the deterministic one.
    """
    if deterministic or n_rows == 0:
        return 1
    n_sm = multiprocessor_count(device)
    if n_sm is None:  # the interpreter
        return 2
    programs = 4 * n_sm
    by_fill = triton.cdiv(programs, max(1, n_groups * n_tiles))
    by_rows = max(1, n_rows // (4 * 64 * max(1, n_groups)))  # >= ~4 blocks per split on average
    return int(max(1, min(16, by_fill, by_rows)))


# ------------------------------------------------------------------------------------------------
# Forward
# ------------------------------------------------------------------------------------------------


def shrink_forward(x, routing: MoseRouting, A):
    """h (N, r) fp32 = A[modality[t]] @ x[t], once per token; 0 for rows without adapter."""
    n_tokens, d_in = x.shape
    rank = A.shape[1]
    A = A.contiguous()
    block_r, block_t = rank_block(rank), token_block(n_tokens)
    block_k = feature_block(d_in, block_r)
    h = torch.empty(n_tokens, rank, dtype=torch.float32, device=x.device)
    launch_kernel(mose_shrink_kernel, (triton.cdiv(n_tokens, block_t),),
            x, A, h, routing.order, routing.modality,
            n_tokens, d_in, rank, routing.n_modalities,
            x.stride(0), x.stride(1), A.stride(0), A.stride(1), A.stride(2), h.stride(0),
            BLOCK_T=block_t, BLOCK_K=block_k, BLOCK_R=block_r, NUMERICS=numerics_mode(x.dtype, x.device))
    return h


def mose_forward(x, routing: MoseRouting, A, B, scale_vec, out, *, inplace: bool = False):
    """Returns ``(y, h)``: y = out + update (a new tensor, or ``out`` itself when inplace) and the
    fp32 down-projection h (N, r) that the backward reuses."""
    n_tokens = x.shape[0]
    rank = A.shape[1]
    n_experts, d_out = B.shape[1], B.shape[2]
    B = B.contiguous()
    h = shrink_forward(x, routing, A)

    if inplace:
        y = out
    else:
        y = empty_output((n_tokens, d_out), dtype=out.dtype if out is not None else x.dtype, device=x.device)
    has_out = out is not None
    src = out if has_out else y  # never read without out
    block_r, block_t = rank_block(rank), token_block(n_tokens)
    block_n = feature_block(d_out, block_r)
    launch_kernel(mose_expand_kernel, (triton.cdiv(n_tokens, block_t), triton.cdiv(d_out, block_n)),
            h, B, src, y, routing.order, routing.modality, routing.expert, routing.gate, scale_vec,
            n_tokens, d_out, rank, routing.n_modalities, n_experts,
            h.stride(0), B.stride(0), B.stride(1), B.stride(2), B.stride(3),
            src.stride(0), src.stride(1), y.stride(0), y.stride(1),
            TOP_K=routing.top_k, HAS_OUT=has_out, ONLY_ADAPTED_ROWS=inplace,
            BLOCK_T=block_t, BLOCK_N=block_n, BLOCK_R=block_r, NUMERICS=numerics_mode(x.dtype, x.device))
    return y, h


# ------------------------------------------------------------------------------------------------
# Backward
# ------------------------------------------------------------------------------------------------


def expand_backward(dy, h, routing: MoseRouting, B, scale_vec, *, need_dgate: bool):
    """``(dh, dgate)``: dh (N, r) fp32 = sum_j gate_j scale_m B[m, e_j]^T dy; dgate (N, k) fp32 or None."""
    n_tokens, rank = h.shape
    n_experts, d_out = B.shape[1], B.shape[2]
    B = B.contiguous()
    block_r, block_t = rank_block(rank), token_block(n_tokens)
    block_n = feature_block(d_out, block_r)
    top_k = routing.top_k
    dh = torch.empty(n_tokens, rank, dtype=torch.float32, device=h.device)
    dgate = empty_output((n_tokens, top_k), dtype=torch.float32, device=h.device) if need_dgate else dh
    launch_kernel(mose_expand_bwd_kernel, (triton.cdiv(n_tokens, block_t),),
            dy, h, B, dh, dgate, routing.order, routing.modality, routing.expert, routing.gate, scale_vec,
            n_tokens, d_out, rank, routing.n_modalities, n_experts,
            dy.stride(0), dy.stride(1), h.stride(0), B.stride(0), B.stride(1), B.stride(2), B.stride(3),
            dh.stride(0),
            TOP_K=top_k, COMPUTE_DGATE=need_dgate,
            BLOCK_T=block_t, BLOCK_N=block_n, BLOCK_R=block_r, NUMERICS=numerics_mode(dy.dtype, dy.device))
    return dh, (dgate if need_dgate else None)


def shrink_backward(dh, routing: MoseRouting, A, dtype: torch.dtype):
    """dx (N, d_in) of ``dtype`` = A[m]^T dh; 0 for rows without adapter."""
    n_tokens, rank = dh.shape
    d_in = A.shape[2]
    A = A.contiguous()
    block_r, block_t = rank_block(rank), token_block(n_tokens)
    block_k = feature_block(d_in, block_r)
    dx = empty_output((n_tokens, d_in), dtype=dtype, device=dh.device)
    launch_kernel(mose_shrink_bwd_kernel, (triton.cdiv(n_tokens, block_t), triton.cdiv(d_in, block_k)),
            dh, A, dx, routing.order, routing.modality,
            n_tokens, d_in, rank, routing.n_modalities,
            dh.stride(0), A.stride(0), A.stride(1), A.stride(2), dx.stride(0), dx.stride(1),
            BLOCK_T=block_t, BLOCK_K=block_k, BLOCK_R=block_r, NUMERICS=numerics_mode(dtype, dh.device))
    return dx


def shrink_weight_grad(x, dh, routing: MoseRouting, *, deterministic: bool):
    """dA (M, r, d_in) fp32 = sum over the tokens of each modality of dh x^T."""
    n_tokens, d_in = x.shape
    rank, n_modalities = dh.shape[1], routing.n_modalities
    block_r, block_t = rank_block(rank), token_block(n_tokens)
    block_k = feature_block(d_in, block_r)
    n_tiles = triton.cdiv(d_in, block_k)
    split = wgrad_splits(n_tokens, n_modalities, n_tiles, x.device, deterministic)
    alloc = torch.empty if split == 1 else torch.zeros  # split partials meet through atomic adds
    dA = alloc((n_modalities, rank, d_in), dtype=torch.float32, device=x.device)
    launch_kernel(mose_shrink_wgrad_kernel, (n_modalities, n_tiles, split),
            x, dh, dA, routing.order, routing.modality_offsets,
            d_in, rank,
            x.stride(0), x.stride(1), dh.stride(0), dA.stride(0), dA.stride(1), dA.stride(2),
            SPLIT=split, BLOCK_T=block_t, BLOCK_K=block_k, BLOCK_R=block_r,
            NUMERICS=numerics_mode(x.dtype, x.device))
    return dA


def expand_weight_grad(dy, h, routing: MoseRouting, scale_vec, n_experts: int, *, deterministic: bool):
    """dB (M, E, d_out, r) fp32 = sum over the pairs of each group of gate scale_m dy h^T."""
    n_tokens, rank = h.shape
    d_out, n_modalities, top_k = dy.shape[1], routing.n_modalities, routing.top_k
    block_r, block_t = rank_block(rank), token_block(n_tokens)
    block_n = feature_block(d_out, block_r)
    pair_order, pair_offsets = sort_pairs(routing)
    n_groups = n_modalities * n_experts
    n_tiles = triton.cdiv(d_out, block_n)
    split = wgrad_splits(n_tokens * top_k, n_groups, n_tiles, dy.device, deterministic)
    alloc = torch.empty if split == 1 else torch.zeros
    dB = alloc((n_modalities, n_experts, d_out, rank), dtype=torch.float32, device=dy.device)
    launch_kernel(mose_expand_wgrad_kernel, (n_groups, n_tiles, split),
            dy, h, dB, pair_order, pair_offsets, routing.gate, scale_vec,
            d_out, rank, n_experts,
            dy.stride(0), dy.stride(1), h.stride(0), dB.stride(0), dB.stride(1), dB.stride(2), dB.stride(3),
            TOP_K=top_k, SPLIT=split, BLOCK_T=block_t, BLOCK_N=block_n, BLOCK_R=block_r,
            NUMERICS=numerics_mode(dy.dtype, dy.device))
    return dB


def mose_backward(dy, x, h, routing: MoseRouting, A, B, scale_vec, *, need_dx: bool, need_dgate: bool,
                  need_dA: bool, need_dB: bool, deterministic: bool):
    """Gradients ``(dx, dgate, dA, dB)`` (fp32 dgate; dx, dA, dB in x's dtype); None where not needed.

    Kernels: expand-backward (dh, dgate), shrink-backward (dx), and two grouped reductions
    (dA per modality, dB per (modality, expert)). ``deterministic`` makes every output element the
    sum of a fixed sequence (no atomics), so two runs are bit-identical.
    """
    dx = dgate = dA = dB = None
    if need_dx or need_dA or need_dgate:
        dh, dgate = expand_backward(dy, h, routing, B, scale_vec, need_dgate=need_dgate)
        if need_dx:
            dx = shrink_backward(dh, routing, A, x.dtype)
        if need_dA:
            dA = shrink_weight_grad(x, dh, routing, deterministic=deterministic).to(A.dtype)
    if need_dB:
        dB = expand_weight_grad(dy, h, routing, scale_vec, B.shape[1], deterministic=deterministic)
        dB = dB.to(B.dtype)
    return dx, dgate, dA, dB

"""Fused base + adapter: ``mose_linear = F.linear(x, W, bias) + MoSE update`` (W and bias frozen).

UNBENCHMARKED (written without a GPU, tested through the Triton interpreter only): whether it beats
``F.linear`` followed by ``mose_lora(..., out=base, inplace=True)`` has not been measured. It is kept
in this module, apart from the ``mose_lora`` backend, until a benchmark decides.

Design: the shrink h = A[m] x runs first (``mose_shrink_kernel``, it re-reads x once: an N x r
output). The base GEMM then runs over blocks of tokens in routing order, gathered through the index,
and the expand ``sum_j gate_j scale_m B[m, e_j] h`` is added in its epilogue, so the base output
is never written and re-read. The backward for x is the transposed GEMM ``dy W`` with
``A[m]^T dh`` added in its epilogue; dh, dgate, dA and dB reuse the ``mose_lora`` kernels.
Use only without adapter dropout (the base and the adapter must read the same x).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..alloc import empty_output
from .function import deterministic_enabled
from .launch import (
    expand_backward,
    expand_weight_grad,
    feature_block,
    launch_kernel,
    numerics_mode,
    prepare_routing,
    rank_block,
    shrink_forward,
    shrink_weight_grad,
    token_block,
)
from .triton_kernels import _dot, _downcast, _expand_accumulate, _load_rows, _shrink_transposed_accumulate


@triton.jit
def mose_linear_kernel(
    x_ptr, W_ptr, bias_ptr, h_ptr, B_ptr, y_ptr, order_ptr, modality_ptr, expert_ptr, gate_ptr, scale_ptr,
    N, D_IN, D_OUT, R, M, E,
    stride_xn, stride_xk, stride_wn, stride_wk, stride_hn, stride_bm, stride_be, stride_bn, stride_br,
    stride_yn, stride_yd,
    TOP_K: tl.constexpr, HAS_BIAS: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
    NUMERICS: tl.constexpr,
):
    """y[t, n-tile] = x[t] W[n-tile]^T + bias + sum_j gate_j scale_m B[m, e_j][n-tile] h[t].

    grid (cdiv(N, BLOCK_T), cdiv(D_OUT, BLOCK_N)), token blocks in routing order (every row gets
    the base; rows without adapter get only the base).
    """
    pid_t = tl.program_id(0)
    pid_n = tl.program_id(1)
    tok, mod, in_range, adapted = _load_rows(order_ptr, modality_ptr, N, M, pid_t, BLOCK_T)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < D_OUT
    offs_kb = tl.arange(0, BLOCK_K)

    acc = tl.zeros((BLOCK_T, BLOCK_N), dtype=tl.float32)  # [BT, BN]
    for k0 in range(0, D_IN, BLOCK_K):
        offs_k = k0 + offs_kb
        k_mask = offs_k < D_IN
        xt = tl.load(x_ptr + tok[:, None] * stride_xn + offs_k[None, :] * stride_xk,
                     mask=in_range[:, None] & k_mask[None, :], other=0.0)  # [BT, BK]
        wt = tl.load(W_ptr + offs_n[None, :] * stride_wn + offs_k[:, None] * stride_wk,
                     mask=n_mask[None, :] & k_mask[:, None], other=0.0)  # [BK, BN] = W^T tile
        acc = _dot(xt, wt, acc, NUMERICS)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)[None, :]
    # epilogue: the adapter's expand on the accumulator still in registers
    acc = _expand_accumulate(acc, h_ptr, B_ptr, expert_ptr, gate_ptr, scale_ptr, tok, mod, adapted,
                             offs_n, n_mask, R, M, E, stride_hn, stride_bm, stride_be, stride_bn, stride_br,
                             TOP_K, BLOCK_R, NUMERICS)
    tl.store(y_ptr + tok[:, None] * stride_yn + offs_n[None, :] * stride_yd,
             _downcast(acc, y_ptr.dtype.element_ty, NUMERICS), mask=in_range[:, None] & n_mask[None, :])


@triton.jit
def mose_linear_bwd_dx_kernel(
    dy_ptr, W_ptr, dh_ptr, A_ptr, dx_ptr, order_ptr, modality_ptr,
    N, D_IN, D_OUT, R, M,
    stride_dyn, stride_dyd, stride_wn, stride_wk, stride_dhn, stride_am, stride_ar, stride_ak,
    stride_dxn, stride_dxk,
    BLOCK_T: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
    NUMERICS: tl.constexpr,
):
    """dx[t, k-tile] = dy[t] W[:, k-tile] + A[m][:, k-tile]^T dh[t].

    grid (cdiv(N, BLOCK_T), cdiv(D_IN, BLOCK_K)), token blocks in routing order.
    """
    pid_t = tl.program_id(0)
    pid_k = tl.program_id(1)
    tok, mod, in_range, adapted = _load_rows(order_ptr, modality_ptr, N, M, pid_t, BLOCK_T)
    offs_k = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    k_mask = offs_k < D_IN
    offs_nb = tl.arange(0, BLOCK_N)

    acc = tl.zeros((BLOCK_T, BLOCK_K), dtype=tl.float32)  # [BT, BK]
    for n0 in range(0, D_OUT, BLOCK_N):
        offs_n = n0 + offs_nb
        n_mask = offs_n < D_OUT
        dyt = tl.load(dy_ptr + tok[:, None] * stride_dyn + offs_n[None, :] * stride_dyd,
                      mask=in_range[:, None] & n_mask[None, :], other=0.0)  # [BT, BN]
        w = tl.load(W_ptr + offs_n[:, None] * stride_wn + offs_k[None, :] * stride_wk,
                    mask=n_mask[:, None] & k_mask[None, :], other=0.0)  # [BN, BK]
        acc = _dot(dyt, w, acc, NUMERICS)
    # epilogue: the adapter's shrink transposed
    acc = _shrink_transposed_accumulate(acc, dh_ptr, A_ptr, tok, mod, adapted, offs_k, k_mask, R, M,
                                        stride_dhn, stride_am, stride_ar, stride_ak, BLOCK_R, NUMERICS)
    tl.store(dx_ptr + tok[:, None] * stride_dxn + offs_k[None, :] * stride_dxk,
             _downcast(acc, dx_ptr.dtype.element_ty, NUMERICS), mask=in_range[:, None] & k_mask[None, :])


def _blocks(n_tokens, d_in, d_out, rank):
    block_r = rank_block(rank)
    return token_block(n_tokens), feature_block(d_out, block_r), feature_block(d_in, block_r), block_r


def mose_linear_forward(x, W, bias, routing, A, B, scale_vec):
    """``(y, h)``: y = F.linear(x, W, bias) + update in x's dtype, h the fp32 down-projection."""
    n_tokens, d_in = x.shape
    d_out, rank, n_experts = W.shape[0], A.shape[1], B.shape[1]
    B = B.contiguous()
    h = shrink_forward(x, routing, A)
    y = empty_output((n_tokens, d_out), dtype=x.dtype, device=x.device)
    block_t, block_n, block_k, block_r = _blocks(n_tokens, d_in, d_out, rank)
    launch_kernel(mose_linear_kernel, (triton.cdiv(n_tokens, block_t), triton.cdiv(d_out, block_n)),
            x, W, bias if bias is not None else W, h, B, y,
            routing.order, routing.modality, routing.expert, routing.gate, scale_vec,
            n_tokens, d_in, d_out, rank, routing.n_modalities, n_experts,
            x.stride(0), x.stride(1), W.stride(0), W.stride(1), h.stride(0),
            B.stride(0), B.stride(1), B.stride(2), B.stride(3), y.stride(0), y.stride(1),
            TOP_K=routing.top_k, HAS_BIAS=bias is not None,
            BLOCK_T=block_t, BLOCK_N=block_n, BLOCK_K=block_k, BLOCK_R=block_r,
            NUMERICS=numerics_mode(x.dtype, x.device))
    return y, h


def mose_linear_dx(dy, W, dh, routing, A, dtype):
    """dx = dy W + A[m]^T dh in ``dtype``."""
    n_tokens, d_out = dy.shape
    d_in, rank = W.shape[1], A.shape[1]
    A = A.contiguous()
    block_t, block_n, block_k, block_r = _blocks(n_tokens, d_in, d_out, rank)
    dx = empty_output((n_tokens, d_in), dtype=dtype, device=dy.device)
    launch_kernel(mose_linear_bwd_dx_kernel, (triton.cdiv(n_tokens, block_t), triton.cdiv(d_in, block_k)),
            dy, W, dh, A, dx, routing.order, routing.modality,
            n_tokens, d_in, d_out, rank, routing.n_modalities,
            dy.stride(0), dy.stride(1), W.stride(0), W.stride(1), dh.stride(0),
            A.stride(0), A.stride(1), A.stride(2), dx.stride(0), dx.stride(1),
            BLOCK_T=block_t, BLOCK_N=block_n, BLOCK_K=block_k, BLOCK_R=block_r,
            NUMERICS=numerics_mode(dtype, dy.device))
    return dx


class MoseLinearFunction(torch.autograd.Function):
    """y = F.linear(x, W, bias) + MoSE update; differentiable in x, gate, A, B (W, bias frozen)."""

    @staticmethod
    def forward(ctx, x, gate, A, B, W, bias, modality, expert, scale_vec, deterministic):
        routing = prepare_routing(modality, expert, gate, A.shape[0], B.shape[1])
        y, h = mose_linear_forward(x, W, bias, routing, A, B, scale_vec)
        ctx.save_for_backward(x, A, B, W)
        ctx.h, ctx.routing, ctx.scale_vec = h, routing, scale_vec
        ctx.gate_dtype, ctx.deterministic = gate.dtype, deterministic
        return y

    @staticmethod
    def backward(ctx, dy):
        x, A, B, W = ctx.saved_tensors
        routing, h = ctx.routing, ctx.h
        need_dx, need_dgate, need_dA, need_dB = ctx.needs_input_grad[:4]
        dx = dgate = dA = dB = None
        if need_dx or need_dgate or need_dA:
            dh, dgate = expand_backward(dy, h, routing, B, ctx.scale_vec, need_dgate=need_dgate)
            if need_dx:
                dx = mose_linear_dx(dy, W, dh, routing, A, x.dtype)
            if need_dA:
                dA = shrink_weight_grad(x, dh, routing, deterministic=ctx.deterministic).to(A.dtype)
        if need_dB:
            dB = expand_weight_grad(dy, h, routing, ctx.scale_vec, B.shape[1],
                                    deterministic=ctx.deterministic).to(B.dtype)
        if dgate is not None:
            dgate = dgate.to(ctx.gate_dtype)
        return dx, dgate, dA, dB, None, None, None, None, None, None


def mose_linear(x, W, bias, modality, expert, gate, A, B, scale, *, deterministic=None) -> torch.Tensor:
    """``F.linear(x, W, bias) + mose_lora update`` (N, d_out) in x's dtype, base and adapter fused.

    Arguments as ``mosear_fast.mose_lora`` (not validated here beyond W and bias), plus the frozen
    base ``W`` (d_out, d_in) and ``bias`` (d_out,) or None of x's dtype. Gradients flow to x, gate,
    A and B; W and bias must not require grad.
    """
    d_out, d_in = B.shape[2], x.shape[1]
    if tuple(W.shape) != (d_out, d_in) or W.dtype != x.dtype or W.device != x.device:
        raise ValueError(f"W: expected a ({d_out}, {d_in}) {x.dtype} tensor on {x.device}, "
                         f"got {tuple(W.shape)} {W.dtype} on {W.device}")
    if bias is not None and (tuple(bias.shape) != (d_out,) or bias.device != x.device):
        raise ValueError(f"bias: expected None or a ({d_out},) tensor on {x.device}, got {tuple(bias.shape)}")
    frozen = (W,) if bias is None else (W, bias)
    if torch.is_grad_enabled() and any(t.requires_grad for t in frozen):
        raise ValueError("W: the fused base is frozen; detach W and bias (they must not require grad)")
    if isinstance(scale, torch.Tensor):
        scale_vec = scale.to(device=x.device, dtype=torch.float32)
    else:
        scale_vec = torch.full((A.shape[0],), float(scale), dtype=torch.float32, device=x.device)
    deterministic = deterministic_enabled(deterministic)
    if torch.is_grad_enabled() and any(t.requires_grad for t in (x, gate, A, B)):
        return MoseLinearFunction.apply(x, gate, A, B, W, bias, modality, expert, scale_vec, deterministic)
    routing = prepare_routing(modality, expert, gate, A.shape[0], B.shape[1])
    return mose_linear_forward(x, W, bias, routing, A, B, scale_vec)[0]

"""Autograd Functions and entry points of the Triton MoSE backend.

``mose_lora_triton`` (the unfused op behind ``mosear_fast.mose_lora(..., backend="triton")``):
``out + update``; ``out``'s gradient is ``dy`` passed through, so the base layer's own backward and
autograd's sum of the two dx stay outside. ``mose_linear_triton`` (behind ``mosear_fast.mose_linear``)
owns the base layer too: ``x W^T + bias + update`` with one autograd Function, so the adapter's dx is
accumulated into the base dx in place.

How the fused op uses cuBLAS (the decision of issue 12, item 4). Roofline for H100 SXM at 80% of
3.35 TB/s and 70% of 990 bf16 TFLOP/s; bf16, N = 8192, d_in = d_out = 4096, r = 16, M = 3, E = 4;
one N x d tensor (x, y, dy, dx) = 67.1 MB = 25.0 us; the base GEMM 2 N d^2 = 275 GFLOP = 396.6 us:

    forward  = route (~5 us: 265 programs read the ids from L2) + shrink (reads x: 25 us)
               + expand (writes y = bias + update: 25 us) + cuBLAS ``y.addmm_(x, W^T)`` (beta = 1:
               the GEMM reads y as C in its epilogue; it moves 168 MB in 397 us, 0.4 TB/s, so the
               67 MB of C are hidden behind its math)                 = ~452 us -> 1.14x F.linear
               (1.20x if the C read were not hidden at all)
    backward = dy pass (reads dy once: dh, dgate terms, dB by fp32 reds into L2: 25 us) + x pass
               (reads x once for dA, writes the adapter's dx: 50 us) + cuBLAS ``dx.addmm_(dy, W)``
               (beta = 1: the base dx accumulated into the adapter's, 397 us) = ~476 us
    forward + backward = 928 / 793 us (F.linear's forward and dx-only backward) -> 1.17x
               (1.23x with no C read hidden); top-2 moves the same bytes (B and dB twice, from L2;
               the dy pass's skinny dots double to 4.3 GFLOP) -> 1.17-1.19x; deterministic mode
               reads x and dy once more for the dA and dB reductions -> 1.23x (top-1).

The unfused ``F.linear`` + ``mose_lora_triton(out=base)`` costs 1.20x forward (the expand reads out
and writes y) and 1.29x forward + backward (autograd adds the base dx and the adapter's dx: 201 MB).

The alternative, a Triton GEMM with the expand in its epilogue (128x256 tiles, grouped ordering,
TMA), could save the expand's 25 us only if it ran within ~6% of cuBLAS, with rows gathered through
the routing (no TMA for them) and an epilogue looping over the groups of each tile; no static
report shows that efficiency without a GPU, while the form above has cuBLAS's by construction. A
dense cuBLAS form of the update (``H' @ B_cat^T``, H' holding zeros outside each token's group)
would also multiply every row by every expert's B, so a NaN in one expert's B would reach every row
(issue 17); the Triton expand selects rows instead. Hence the cuBLAS form; the former Triton GEMM
(kernels/mose/fused_linear.py) is deleted. The 1.10x target for the fused forward is not reached
by this roofline (1.14x): it would need the expand inside the GEMM (the Triton GEMM above).
"""

from __future__ import annotations

import os

import torch

from ..alloc import empty_output
from .launch import MoseRouting, adapter_backward, expand, route, shrink

DETERMINISTIC_ENV = "MOSEAR_DETERMINISTIC"


def deterministic_enabled(deterministic: bool | None = None) -> bool:
    """``deterministic`` if given, else ``MOSEAR_DETERMINISTIC=1`` or torch's deterministic algorithms."""
    if deterministic is not None:
        if not isinstance(deterministic, bool):
            raise TypeError(f"deterministic: expected a bool or None, got {type(deterministic).__name__}")
        return deterministic
    return os.environ.get(DETERMINISTIC_ENV, "0") == "1" or torch.are_deterministic_algorithms_enabled()


def _gemm_accumulate(out, a, b):
    """``out += a @ b`` in place (cuBLAS with beta = 1: ``out`` is read as C in the GEMM's epilogue).

    The fused op's base GEMMs go through here; the static kernel report, which runs the launchers on
    CPU tensors at full size with the Triton launches recorded, replaces it (these are not Triton
    kernels, and on its CPU they would take minutes)."""
    return out.addmm_(a, b)


def _lora_forward(x, routing: MoseRouting, gate, A, B, scale_vec, out, *, inplace: bool, save_h: bool):
    """``(out + update, h)``: a new tensor (out's dtype, x's without out), or ``out`` itself in place."""
    hp = shrink(x, routing, A)
    if inplace:
        y = out
    else:
        dtype = out.dtype if out is not None else x.dtype
        y = empty_output((x.shape[0], B.shape[2]), dtype=dtype, device=x.device)
    y, h, _ = expand(hp, routing, gate, B, scale_vec, out, y, only_adapted_rows=inplace, save_h=save_h)
    return y, h


def _linear_forward(x, weight, bias, routing: MoseRouting, gate, A, B, scale_vec, *, save_h: bool,
                    update_norm: bool):
    """``(x W^T + bias + update, h, norm)``: the expand writes ``bias + update``, then cuBLAS adds
    ``x W^T`` into it (beta = 1)."""
    hp = shrink(x, routing, A)
    y = empty_output((x.shape[0], weight.shape[0]), dtype=x.dtype, device=x.device)
    y, h, norm = expand(hp, routing, gate, B, scale_vec, bias, y, save_h=save_h, update_norm=update_norm)
    _gemm_accumulate(y, x, weight.t())
    return y, h, norm


class MoseLoraFunction(torch.autograd.Function):
    """y = out + MoSE update; differentiable in x, gate, A, B and out."""

    @staticmethod
    def forward(ctx, x, gate, A, B, out, modality, expert, scale_vec, inplace, deterministic):
        routing = route(modality, expert, A.shape[0], B.shape[1], sort_pairs=deterministic)
        y, h = _lora_forward(x, routing, gate, A, B, scale_vec, out, inplace=inplace, save_h=True)
        if inplace:
            ctx.mark_dirty(out)
        ctx.save_for_backward(x, gate, A, B, h)
        ctx.routing, ctx.scale_vec, ctx.deterministic = routing, scale_vec, deterministic
        return y

    @staticmethod
    def backward(ctx, dy):
        x, gate, A, B, h = ctx.saved_tensors
        need_dx, need_dgate, need_dA, need_dB, need_dout = ctx.needs_input_grad[:5]
        dx, dgate, dA, dB = adapter_backward(
            dy, x, h, ctx.routing, gate, A, B, ctx.scale_vec, need_dx=need_dx, need_dgate=need_dgate,
            need_dA=need_dA, need_dB=need_dB, deterministic=ctx.deterministic)
        return dx, dgate, dA, dB, (dy if need_dout else None), None, None, None, None, None


class MoseLinearFunction(torch.autograd.Function):
    """y = x W^T + bias + MoSE update (and the update norms, not differentiable); differentiable in
    x, gate, A, B, and W and bias when they require grad."""

    @staticmethod
    def forward(ctx, x, weight, bias, gate, A, B, modality, expert, scale_vec, update_norm, deterministic):
        routing = route(modality, expert, A.shape[0], B.shape[1], sort_pairs=deterministic)
        y, h, norm = _linear_forward(x, weight, bias, routing, gate, A, B, scale_vec, save_h=True,
                                     update_norm=update_norm)
        ctx.save_for_backward(x, weight, gate, A, B, h)
        ctx.routing, ctx.scale_vec, ctx.deterministic = routing, scale_vec, deterministic
        if update_norm:
            ctx.mark_non_differentiable(norm)
            return y, norm
        return y

    @staticmethod
    def backward(ctx, dy, *_norm_grad):
        x, weight, gate, A, B, h = ctx.saved_tensors
        need_dx, need_dw, need_dbias, need_dgate, need_dA, need_dB = ctx.needs_input_grad[:6]
        dx, dgate, dA, dB = adapter_backward(
            dy, x, h, ctx.routing, gate, A, B, ctx.scale_vec, need_dx=need_dx, need_dgate=need_dgate,
            need_dA=need_dA, need_dB=need_dB, deterministic=ctx.deterministic)
        if need_dx:
            _gemm_accumulate(dx, dy, weight)  # the base dx GEMM accumulates into the adapter's dx (beta = 1)
        dw = dy.t().mm(x) if need_dw else None
        dbias = dy.sum(0) if need_dbias else None
        return dx, dw, dbias, dgate, dA, dB, None, None, None, None, None


def _requires_grad(*tensors) -> bool:
    if not torch.is_grad_enabled():  # inference: no look at the tensors
        return False
    for t in tensors:
        if t is not None and t.requires_grad:
            return True
    return False


def mose_lora_triton(x, modality, expert, gate, A, B, scale_vec, out, *, inplace=False, deterministic=None):
    """``out + update`` through the Triton kernels, for arguments validated by ``mosear_fast.mose_lora``.

    ``scale_vec`` is the (M,) float32 scale on x's device. Returns a new tensor of out's dtype
    (x's without out), or ``out`` itself when ``inplace``. ``deterministic`` (None: the
    ``MOSEAR_DETERMINISTIC`` environment switch) makes the backward bit-identical across runs;
    the forward always is.
    """
    if _requires_grad(x, gate, A, B, out):
        return MoseLoraFunction.apply(x, gate, A, B, out, modality, expert, scale_vec, inplace,
                                      deterministic_enabled(deterministic))
    if deterministic is not None:  # only the backward depends on it: checked, not looked up
        deterministic_enabled(deterministic)
    routing = route(modality, expert, A.shape[0], B.shape[1], sort_pairs=False)
    return _lora_forward(x, routing, gate, A, B, scale_vec, out, inplace=inplace, save_h=False)[0]


def mose_linear_triton(x, weight, bias, modality, expert, gate, A, B, scale_vec, *, return_update_norm=False,
                       deterministic=None):
    """``x @ weight.T + bias + update`` (N, d_out) in x's dtype, for arguments validated by
    ``mosear_fast.mose_linear`` (``scale_vec``: the (M,) float32 scale on x's device; ``bias`` None or
    (d_out,)). With ``return_update_norm`` also the (N,) float32 L2 norm of each token's update before
    scale (0 without adapter; no gradient). Differentiable in x, gate, A, B, and weight and bias when
    they require grad. ``deterministic`` as in ``mose_lora_triton``.
    """
    if _requires_grad(x, weight, bias, gate, A, B):
        return MoseLinearFunction.apply(x, weight, bias, gate, A, B, modality, expert, scale_vec,
                                        return_update_norm, deterministic_enabled(deterministic))
    if deterministic is not None:
        deterministic_enabled(deterministic)
    routing = route(modality, expert, A.shape[0], B.shape[1], sort_pairs=False)
    y, _, norm = _linear_forward(x, weight, bias, routing, gate, A, B, scale_vec, save_h=False,
                                 update_norm=return_update_norm)
    return (y, norm) if return_update_norm else y

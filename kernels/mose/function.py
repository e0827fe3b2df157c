"""Autograd Function and public entry point of the Triton MoSE backend.

``mosear_fast.mose_lora(..., backend="triton")`` validates its arguments and calls
``mose_lora_triton``. The forward runs two kernels (shrink: h = A[m] x once per token; expand:
y = out + sum_j gate_j scale_m B[m, e_j] h); the backward four (dh and dgate; dx; dA per modality;
dB per (modality, expert)). ``out``'s gradient is ``dy`` passed through.
"""

from __future__ import annotations

import os

import torch

from .launch import MoseRouting, mose_backward, mose_forward, prepare_routing

DETERMINISTIC_ENV = "MOSEAR_DETERMINISTIC"


def deterministic_enabled(deterministic: bool | None = None) -> bool:
    """``deterministic`` if given, else ``MOSEAR_DETERMINISTIC=1`` or torch's deterministic algorithms."""
    if deterministic is not None:
        if not isinstance(deterministic, bool):
            raise TypeError(f"deterministic: expected a bool or None, got {type(deterministic).__name__}")
        return deterministic
    return os.environ.get(DETERMINISTIC_ENV, "0") == "1" or torch.are_deterministic_algorithms_enabled()


class MoseLoraFunction(torch.autograd.Function):
    """y = out + MoSE update; differentiable in x, gate, A, B and out."""

    @staticmethod
    def forward(ctx, x, gate, A, B, out, modality, expert, scale_vec, inplace, deterministic):
        routing = prepare_routing(modality, expert, gate, A.shape[0], B.shape[1])
        y, h = mose_forward(x, routing, A, B, scale_vec, out, inplace=inplace)
        if inplace:
            ctx.mark_dirty(out)
        ctx.save_for_backward(x, A, B)
        ctx.h, ctx.routing, ctx.scale_vec = h, routing, scale_vec
        ctx.gate_dtype, ctx.deterministic = gate.dtype, deterministic
        return y

    @staticmethod
    def backward(ctx, dy):
        x, A, B = ctx.saved_tensors
        routing: MoseRouting = ctx.routing
        need_dx, need_dgate, need_dA, need_dB, need_dout = ctx.needs_input_grad[:5]
        dx = dgate = dA = dB = None
        if need_dx or need_dgate or need_dA or need_dB:
            dx, dgate, dA, dB = mose_backward(
                dy, x, ctx.h, routing, A, B, ctx.scale_vec, need_dx=need_dx, need_dgate=need_dgate,
                need_dA=need_dA, need_dB=need_dB, deterministic=ctx.deterministic)
        if dgate is not None:
            dgate = dgate.to(ctx.gate_dtype)
        dout = dy if need_dout else None
        return dx, dgate, dA, dB, dout, None, None, None, None, None


def mose_lora_triton(x, modality, expert, gate, A, B, scale_vec, out, *, inplace=False, deterministic=None):
    """``out + update`` through the Triton kernels, for arguments validated by ``mosear_fast.mose_lora``.

    ``scale_vec`` is the (M,) float32 scale on x's device. Returns a new tensor of out's dtype
    (x's without out), or ``out`` itself when ``inplace``. ``deterministic`` (None: the
    ``MOSEAR_DETERMINISTIC`` environment switch) makes the backward bit-identical across runs;
    the forward always is.
    """
    deterministic = deterministic_enabled(deterministic)
    tensors = (x, gate, A, B) + ((out,) if out is not None else ())
    if torch.is_grad_enabled() and any(t.requires_grad for t in tensors):
        return MoseLoraFunction.apply(x, gate, A, B, out, modality, expert, scale_vec, inplace, deterministic)
    routing = prepare_routing(modality, expert, gate, A.shape[0], B.shape[1])
    y, _ = mose_forward(x, routing, A, B, scale_vec, out, inplace=inplace)
    return y


def mose_linear_triton(x, weight, bias, modality, expert, gate, A, B, scale_vec, *, return_update_norm=False,
                       deterministic=None):
    """``F.linear(x, weight, bias) + MoSE update`` on the Triton kernels, for arguments validated by
    ``mosear_fast.mose_linear`` (``scale_vec``: (M,) float32); returns y, or ``(y, norm)``.

    Interim adapter (owned by mose-kernels, who replace it with the fused kernels of issue 12): the
    fused forward of ``fused_linear.mose_linear``, or ``F.linear`` + ``mose_lora_triton`` when the
    base weight or bias requires grad; the update norm (before scale) from a second, unscaled
    ``mose_lora_triton`` call without grad.
    """
    from .fused_linear import mose_linear  # compiles the fused kernels on first use

    frozen = (weight,) if bias is None else (weight, bias)
    if torch.is_grad_enabled() and any(t.requires_grad for t in frozen):
        base = torch.nn.functional.linear(x, weight, bias)
        y = mose_lora_triton(x, modality, expert, gate, A, B, scale_vec, base, deterministic=deterministic)
    else:
        y = mose_linear(x, weight, bias, modality, expert, gate, A, B, scale_vec, deterministic=deterministic)
    if not return_update_norm:
        return y
    with torch.no_grad():
        update = mose_lora_triton(x, modality, expert, gate, A, B, torch.ones_like(scale_vec), None)
        return y, update.float().norm(dim=-1)

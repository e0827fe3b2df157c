"""PyTorch backend of ``mose_linear``: the base ``F.linear`` and the MoSE update in one autograd Function.

Forward: ``y = F.linear(x, W, bias)``, then the update is added into y in place (one addmm per
routing group, ``torch_backend.adapter_forward``), so no second (N, d_out) tensor exists.
Backward: ``dx = dy W`` and the adapter's ``A[m]^T dh`` added into that same tensor in place
(autograd never adds two (N, d_in) tensors); dy is read once per group for dh, dgate and dB; the
routing of the forward is reused. W and bias get gradients only when they require them.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .torch_backend import F32, adapter_backward, adapter_forward, cast_grads, row_bytes
from .torch_routing import prepare_torch_routing


def _forward(x, weight, bias, routing, A, B, want_norm):
    y = F.linear(x, weight, bias)  # [N, d_out]
    acc = y if y.dtype == F32 else y.to(F32)
    h, hws, norm = adapter_forward(acc, x, routing, A, B, want_norm=want_norm)
    return acc.to(x.dtype), h, hws, norm


class MoseLinearTorchFunction(torch.autograd.Function):
    """(y, update norm or None) = base linear + MoSE update; differentiable in x, weight, bias, gate, A, B."""

    @staticmethod
    def forward(ctx, x, weight, bias, gate, A, B, routing, want_norm):
        y, h, hws, norm = _forward(x, weight, bias, routing, A, B, want_norm)
        ctx.save_for_backward(x, weight, A, B, h)
        ctx.routing, ctx.hws, ctx.gate_dtype, ctx.has_bias = routing, hws, gate.dtype, bias is not None
        if norm is None:
            return y
        ctx.mark_non_differentiable(norm)
        return y, norm

    @staticmethod
    def backward(ctx, dy, *_norm_grad):
        x, weight, A, B, h = ctx.saved_tensors
        need_dx, need_dw, need_db, need_dgate, need_dA, need_dB = ctx.needs_input_grad[:6]
        dx = dw = db = None
        dx_acc = None
        if need_dx:
            dx = dy @ weight  # [N, d_in]: the base's dx; the adapter's is added into it
            dx_acc = dx if dx.dtype == F32 else dx.to(F32)
        dgate, dA, dB = adapter_backward(dy, x, ctx.routing, h, ctx.hws, A, B, dx_acc, need_dgate=need_dgate,
                                         need_dA=need_dA, need_dB=need_dB)
        if need_dx:
            dx = dx_acc.to(x.dtype)
        if need_dw:
            dw = dy.t() @ x
        if need_db and ctx.has_bias:
            db = dy.sum(0)
        return (dx, dw, db, *cast_grads(ctx, dgate, dA, dB, A, B), None, None)


def mose_linear_torch(x, weight, bias, modality, expert, gate, A, B, scale_vec, *, return_update_norm=False):
    """``F.linear(x, weight, bias) + MoSE update`` for arguments validated by ``mosear_fast.mose_linear``
    (``scale_vec``: (M,) float32). With ``return_update_norm`` also the (N,) float32 per-token norm
    of the update before scale (0 for rows without adapter), not differentiable."""
    routing = prepare_torch_routing(modality, expert, gate, scale_vec, A.shape[0], B.shape[1],
                                    row_bytes=row_bytes(x, B))
    tensors = (x, weight, gate, A, B) + ((bias,) if bias is not None else ())
    if torch.is_grad_enabled() and any(t.requires_grad for t in tensors):
        return MoseLinearTorchFunction.apply(x, weight, bias, gate, A, B, routing, return_update_norm)
    y, _, _, norm = _forward(x, weight, bias, routing, A, B, return_update_norm)
    return (y, norm) if return_update_norm else y

"""PyTorch backend of the MoSE dispatch: a real CPU path, also correct on CUDA.

The routing (``torch_routing``) groups the tokens once per call, by modality and per choice by
(modality, expert); the forward and one autograd Function's backward reuse it:

    shrink    h[t]    = A[m] x[t]                       one matmul per modality group
    expand    acc[t] += s_m g B[m, e] h[t]              one matmul per (modality, expert) group
    backward  V = dy B[m, e] (dh, dgate), dB = dy^T (s g h), dA = dh^T x, dx += dh A[m]

Groups in place read and write slices of x, acc, dy and dx (no copy); a sorted group gathers its
rows of x or dy just before its matmul and adds its result back with ``index_add_``, so the
gathered rows and the product are used while they are in cache. Unselected experts and rows without adapter
are never computed, so a NaN in a padding row's x or gate reaches no other row and no gradient.
``h`` and every accumulation are float32 whatever the input dtype (DESIGN's accumulation rule): a
float16 ``A x`` above 65504 stays finite. ``torch_linear.py`` (``mose_linear``) shares
``adapter_forward`` and ``adapter_backward``.
"""

from __future__ import annotations

import torch

from .torch_routing import Grouping, TorchRouting, prepare_torch_routing

F32 = torch.float32


def _reorder(t: torch.Tensor, src: Grouping, dst: Grouping, n_tokens: int) -> torch.Tensor:
    """``t`` (dim 0 in ``src``'s order) in ``dst``'s order."""
    return t if src.same_order(dst) else dst.gather(src.scatter(t, n_tokens))


def _matrices(W: torch.Tensor, rows: int, cols: int, *, transposed: bool = False):
    """``W`` (..., rows, cols) as a list of float32 (rows, cols) matrices, or (cols, rows) ones
    when ``transposed`` (views for float32)."""
    mats = W.to(F32).reshape(-1, rows, cols)
    return (mats.transpose(1, 2) if transposed else mats).unbind(0)


def _shrink(x32, routing: TorchRouting, A) -> torch.Tensor:
    """h (float32, in ``routing.tokens`` order): ``A[m] x[t]``; 0 for rows in no group (in place)."""
    tokens = routing.tokens
    rank, d_in = A.shape[1], A.shape[2]
    a_t = _matrices(A, rank, d_in, transposed=True)  # [d_in, r] each
    if tokens.in_place:
        h = x32.new_zeros(x32.shape[0], rank)
    else:
        h = x32.new_empty(tokens.rows.shape[0], rank)
    for m, x_part, h_part in zip(tokens.keys, tokens.takes(x32), tokens.parts(h), strict=True):
        torch.mm(x_part, a_t[m], out=h_part)
    return h


def _weighted_rows(routing: TorchRouting, h, j: int):
    """``s g h`` of choice j, in its grouping's order."""
    choice = routing.choices[j]
    return _reorder(h, routing.tokens, choice, routing.n_tokens) * choice.gather(routing.weight[:, j])[:, None]


def _update_norm(routing: TorchRouting, h, B32) -> torch.Tensor:
    """(N,) float32: ``||sum_j g_j B[m, e_j] h||`` per token (0 without adapter), from r-sized
    quantities and Gram matrices of B, so no (N, d_out) update is formed.

    Top-1: ``(g h)^T (B^T B) (g h)``. Top-2: ``sum_{j,l} (g_j h)^T C[m]_{e_j, e_l} (g_l h)`` with
    ``C[m] = Bcat^T Bcat`` and ``Bcat = [B[m, 0] | ... | B[m, E-1]]`` (d_out, E r).
    """
    n_tokens, top_k = routing.n_tokens, len(routing.choices)
    n_mod, n_exp, d_out, rank = B32.shape
    if top_k == 1:
        grams = (B32.transpose(-1, -2) @ B32).reshape(-1, rank, rank).unbind(0)  # [r, r] per (m, e)
    else:
        b_cat = B32.permute(0, 2, 1, 3).reshape(n_mod, d_out, n_exp * rank)
        c = b_cat.transpose(1, 2) @ b_cat  # [M, E r, E r]
        grams = c.reshape(n_mod * n_exp, rank, n_exp * rank).unbind(0)  # rows of block e_j: [r, E r]
    hg_tok, z_tok = [], []
    for j, choice in enumerate(routing.choices):
        hg = _reorder(h, routing.tokens, choice, n_tokens) * choice.gather(routing.gate[:, j])[:, None]
        z = hg.new_zeros(hg.shape[0], grams[0].shape[1])
        for key, hg_part, z_part in zip(choice.keys, choice.parts(hg), choice.parts(z), strict=True):
            torch.mm(hg_part, grams[key], out=z_part)
        hg_tok.append(choice.scatter(hg, n_tokens))
        z_tok.append(choice.scatter(z, n_tokens))
    if top_k == 1:
        squared = (z_tok[0] * hg_tok[0]).sum(1)
    else:
        hg_all = torch.stack(hg_tok, 1)  # [N, l, r]
        expert = torch.where(routing.adapted[:, None], routing.expert.long(), 0)
        blocks = expert[:, :, None].expand(n_tokens, top_k, rank)  # [N, l, r]: e_l
        squared = sum((z.view(n_tokens, n_exp, rank).gather(1, blocks) * hg_all).sum((1, 2)) for z in z_tok)
    return torch.where(routing.adapted, squared.clamp_min(0).sqrt(), 0.0)


def adapter_forward(acc, x, routing: TorchRouting, A, B, *, want_norm: bool = False):
    """Adds the MoSE update into ``acc`` (N, d_out) float32 in place. Returns ``(h, hw, norm)``: h
    and the per-choice ``s g h`` for the backward, and the per-token update norm before scale
    (``want_norm``) or None."""
    d_out, rank = B.shape[2], B.shape[3]
    h = _shrink(x.to(F32), routing, A)
    b_t = _matrices(B, d_out, rank, transposed=True)  # [r, d_out] per (m, e)
    hws = []
    for j, choice in enumerate(routing.choices):
        hw = _weighted_rows(routing, h, j)
        choice.add_matmuls(acc, [(hw_part, b_t[key]) for key, hw_part in zip(choice.keys, choice.parts(hw),
                                                                                strict=True)])
        hws.append(hw)
    norm = _update_norm(routing, h, B.to(F32)) if want_norm else None
    return h, tuple(hws), norm


def adapter_backward(dy, x, routing: TorchRouting, h, hws, A, B, dx_acc, *, need_dgate: bool, need_dA: bool,
                     need_dB: bool):
    """Gradients of the update for upstream ``dy`` (N, d_out), from the forward's ``h`` and ``hws``.
    Adds the adapter's dx into ``dx_acc`` (N, d_in) float32 in place when given. Returns float32
    ``(dgate (N, k), dA, dB)``, None where not needed."""
    tokens, n_tokens = routing.tokens, routing.n_tokens
    d_out, rank, d_in = B.shape[2], B.shape[3], A.shape[2]
    need_dh = dx_acc is not None or need_dA
    b_mats = _matrices(B, d_out, rank)  # [d_out, r] per (m, e)
    # dB^T (r, d_out) per (m, e): hw^T dy runs about twice as fast as dy^T hw on the CPU
    dB_t = B.new_zeros(B.shape[0] * B.shape[1], rank, d_out, dtype=F32) if need_dB else None
    db_mats = dB_t.unbind(0) if need_dB else None
    dgate = routing.gate.new_zeros(routing.gate.shape) if need_dgate else None
    dh = h.new_zeros(h.shape) if need_dh else None
    dy = dy.to(F32)

    # Choice side: one read of dy per group gives V = dy B[m, e] (for dh and dgate) and dB.
    for j, (choice, hw) in enumerate(zip(routing.choices, hws, strict=True)):
        v = hw.new_zeros(hw.shape) if (need_dh or need_dgate) else None
        v_parts = choice.parts(v) if v is not None else [None] * len(choice.keys)
        for key, dy_part, hw_part, v_part in zip(choice.keys, choice.takes(dy), choice.parts(hw), v_parts,
                                                 strict=True):
            if v_part is not None:
                torch.mm(dy_part, b_mats[key], out=v_part)
            if need_dB:
                db_mats[key].addmm_(hw_part.t(), dy_part)
        if need_dgate:
            hj = _reorder(h, tokens, choice, n_tokens)
            dgate[:, j] = choice.scatter((v * hj).sum(1), n_tokens) * routing.scale
        if need_dh:
            dv = v * choice.gather(routing.weight[:, j])[:, None]
            dh += _reorder(dv, choice, tokens, n_tokens)
    dB = dB_t.transpose(1, 2).reshape(B.shape) if need_dB else None
    if not need_dh:
        return dgate, None, dB

    # Modality side: dA = dh^T x and dx += dh A[m], per modality group.
    a_mats = _matrices(A, rank, d_in)  # [r, d_in] per modality
    dA = A.new_zeros(A.shape, dtype=F32) if need_dA else None
    dh_parts = tokens.parts(dh)
    if need_dA:
        for m, dh_part, x_part in zip(tokens.keys, dh_parts, tokens.takes(x.to(F32)), strict=True):
            dA[m].addmm_(dh_part.t(), x_part)
    if dx_acc is not None:
        tokens.add_matmuls(dx_acc, [(dh_part, a_mats[m]) for m, dh_part in zip(tokens.keys, dh_parts, strict=True)])
    return dgate, dA, dB


def row_bytes(x, B) -> int:
    """Bytes of the widest float32 row the matmuls gather or scatter (x, the output, their gradients)."""
    return 4 * max(x.shape[1], B.shape[2])


def _accumulator(out, n_tokens, d_out, device, *, inplace):
    """The float32 (N, d_out) tensor the update is added into."""
    if out is None:
        return torch.zeros(n_tokens, d_out, dtype=F32, device=device)
    if inplace and out.dtype == F32:
        return out
    return out.to(dtype=F32, memory_format=torch.contiguous_format, copy=True)


def _finish(acc, out, result_dtype, *, inplace):
    if inplace:
        return out if acc is out else out.copy_(acc)
    return acc.to(result_dtype)


def cast_grads(ctx, dgate, dA, dB, A, B):
    """The float32 adapter gradients in the dtypes of gate, A and B."""
    return (None if dgate is None else dgate.to(ctx.gate_dtype), None if dA is None else dA.to(A.dtype),
            None if dB is None else dB.to(B.dtype))


class MoseLoraTorchFunction(torch.autograd.Function):
    """y = out + MoSE update; differentiable in x, gate, A, B and out (routing computed once)."""

    @staticmethod
    def forward(ctx, x, gate, A, B, out, routing, inplace):
        result_dtype = out.dtype if out is not None else x.dtype
        acc = _accumulator(out, x.shape[0], B.shape[2], x.device, inplace=inplace)
        h, hws, _ = adapter_forward(acc, x, routing, A, B)
        y = _finish(acc, out, result_dtype, inplace=inplace)
        if inplace:
            ctx.mark_dirty(out)
        ctx.save_for_backward(x, A, B, h)
        ctx.routing, ctx.hws, ctx.gate_dtype = routing, hws, gate.dtype
        return y

    @staticmethod
    def backward(ctx, dy):
        x, A, B, h = ctx.saved_tensors
        need_dx, need_dgate, need_dA, need_dB, need_dout = ctx.needs_input_grad[:5]
        dx_acc = x.new_zeros(x.shape, dtype=F32) if need_dx else None
        dgate, dA, dB = adapter_backward(dy, x, ctx.routing, h, ctx.hws, A, B, dx_acc, need_dgate=need_dgate,
                                         need_dA=need_dA, need_dB=need_dB)
        dx = dx_acc.to(x.dtype) if need_dx else None
        return (dx, *cast_grads(ctx, dgate, dA, dB, A, B), (dy if need_dout else None), None, None)


def mose_lora_torch(x, modality, expert, gate, A, B, scale, out=None, *, inplace=False) -> torch.Tensor:
    """``out + MoSE update`` (N, d_out) for validated inputs; ``scale`` is an (M,) float32 tensor."""
    routing = prepare_torch_routing(modality, expert, gate, scale, A.shape[0], B.shape[1], row_bytes=row_bytes(x, B))
    tensors = (x, gate, A, B) + ((out,) if out is not None else ())
    if torch.is_grad_enabled() and any(t.requires_grad for t in tensors):
        return MoseLoraTorchFunction.apply(x, gate, A, B, out, routing, inplace)
    result_dtype = out.dtype if out is not None else x.dtype
    acc = _accumulator(out, x.shape[0], B.shape[2], x.device, inplace=inplace)
    adapter_forward(acc, x, routing, A, B)
    return _finish(acc, out, result_dtype, inplace=inplace)

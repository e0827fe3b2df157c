"""``torch.library`` registrations of the three ops: ``mosear::mose_lora``, ``mosear::mose_linear`` and
``mosear::ar_attention`` (plus their backward ops), so ``torch.compile`` and ``torch.export`` see each
call as one node with a fake (meta) implementation and a registered autograd formula.

Each op takes validated arguments (``mosear_fast.ops`` validates, then calls these only while a graph
is compiled, or exported inside ``custom_op_forms``) and a resolved ``backend`` ("torch" or "triton").
Optional and sequence arguments are schema types: ``Tensor?``, ``int[]``, ``float[]?``, ``int?``,
``float?``. Outputs that a call does not need are empty tensors (a custom op cannot return None).

Why the Triton path is a plain custom op and not ``torch.library.triton_op``: ``triton_op`` traces its
function with fake tensors, which needs every launch written as ``wrap_triton(kernel)[grid](...)``;
the launchers in ``kernels/`` call ``kernel[grid](...)`` and build cached device tables (the AR class
tables), so tracing them would need edits there. The op is therefore opaque to Inductor (one extern
call per op) and calls the launchers as eager code does; switching to ``triton_op`` needs only the
launchers to go through ``wrap_triton``.

Gradients are those of the eager backends: the MoSE backward op runs each backend's own adapter
backward (from the ``h`` the forward saved); the AR backward op differentiates the PyTorch backend
(as the Triton backend does today when q, k or v require grad).
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence

import torch
from torch import Tensor

from .backend import export_forms

F32 = torch.float32


def _empty(like: Tensor, dtype=None) -> Tensor:
    """The placeholder of an output a call does not need."""
    return like.new_empty((0,), dtype=dtype if dtype is not None else like.dtype)


# ------------------------------------------------------------------------------------------------
# MoSE: forward
# ------------------------------------------------------------------------------------------------


def _torch_mose_forward(x, weight, bias, modality, expert, gate, A, B, scale, out, *, want_norm, save_h):
    """PyTorch backend: ``(y, norm or None, h in token order or None)``."""
    from .kernels.mose.torch_backend import _accumulator, _finish, adapter_forward, row_bytes
    from .kernels.mose.torch_routing import prepare_torch_routing

    routing = prepare_torch_routing(modality, expert, gate, scale, A.shape[0], B.shape[1], row_bytes=row_bytes(x, B))
    if weight is not None:  # torch_linear's forward: the base output is the accumulator
        y = torch.nn.functional.linear(x, weight, bias)
        acc = y if y.dtype == F32 else y.to(F32)
        h, _, norm = adapter_forward(acc, x, routing, A, B, want_norm=want_norm)
        y = acc.to(x.dtype)
    else:
        result_dtype = out.dtype if out is not None else x.dtype
        acc = _accumulator(out, x.shape[0], B.shape[2], x.device, inplace=False)
        h, _, norm = adapter_forward(acc, x, routing, A, B)
        y = _finish(acc, out, result_dtype, inplace=False)
    return y, norm, (routing.tokens.scatter(h, x.shape[0]) if save_h else None)


def _triton_mose_forward(x, weight, bias, modality, expert, gate, A, B, scale, out, *, want_norm, save_h,
                         deterministic):
    from .kernels.mose.function import _linear_forward, _lora_forward
    from .kernels.mose.launch import route

    routing = route(modality, expert, A.shape[0], B.shape[1], sort_pairs=False)  # the backward routes again
    if weight is not None:
        y, h, norm = _linear_forward(x, weight, bias, routing, gate, A, B, scale, save_h=save_h, update_norm=want_norm)
        return y, norm, h
    y, h = _lora_forward(x, routing, gate, A, B, scale, out, inplace=False, save_h=save_h)
    return y, None, h


def _mose_forward(x, weight, bias, modality, expert, gate, A, B, scale, out, *, want_norm, save_h, backend,
                  deterministic):
    if backend == "triton":
        y, norm, h = _triton_mose_forward(x, weight, bias, modality, expert, gate, A, B, scale, out,
                                          want_norm=want_norm, save_h=save_h, deterministic=deterministic)
    else:
        y, norm, h = _torch_mose_forward(x, weight, bias, modality, expert, gate, A, B, scale, out,
                                         want_norm=want_norm, save_h=save_h)
    h = h if h is not None else x.new_empty((0, A.shape[1]), dtype=F32)
    return y, (norm if norm is not None else _empty(x, F32)), h


@torch.library.custom_op("mosear::mose_lora", mutates_args=())
def mose_lora_op(x: Tensor, modality: Tensor, expert: Tensor, gate: Tensor, A: Tensor, B: Tensor, scale: Tensor,
                 out: Tensor | None, save_h: bool, backend: str, deterministic: bool) -> tuple[Tensor, Tensor]:
    """``(out + update, h)``: h (N, r) float32 (the shrink, for the backward) when ``save_h``, else (0, r)."""
    y, _, h = _mose_forward(x, None, None, modality, expert, gate, A, B, scale, out, want_norm=False,
                            save_h=save_h, backend=backend, deterministic=deterministic)
    return y, h


@mose_lora_op.register_fake
def _(x, modality, expert, gate, A, B, scale, out, save_h, backend, deterministic):
    dtype = out.dtype if out is not None else x.dtype
    return x.new_empty((x.shape[0], B.shape[2]), dtype=dtype), x.new_empty((x.shape[0] if save_h else 0, A.shape[1]),
                                                                            dtype=F32)


@torch.library.custom_op("mosear::mose_linear", mutates_args=())
def mose_linear_op(x: Tensor, weight: Tensor, bias: Tensor | None, modality: Tensor, expert: Tensor, gate: Tensor,
                   A: Tensor, B: Tensor, scale: Tensor, return_update_norm: bool, save_h: bool, backend: str,
                   deterministic: bool) -> tuple[Tensor, Tensor, Tensor]:
    """``(x W^T + bias + update, norm, h)``: norm (N,) float32 when ``return_update_norm`` else (0,);
    h as ``mose_lora``'s."""
    return _mose_forward(x, weight, bias, modality, expert, gate, A, B, scale, None, want_norm=return_update_norm,
                         save_h=save_h, backend=backend, deterministic=deterministic)


@mose_linear_op.register_fake
def _(x, weight, bias, modality, expert, gate, A, B, scale, return_update_norm, save_h, backend, deterministic):
    n_tokens = x.shape[0]
    return (x.new_empty((n_tokens, weight.shape[0])), x.new_empty((n_tokens if return_update_norm else 0,), dtype=F32),
            x.new_empty((n_tokens if save_h else 0, A.shape[1]), dtype=F32))


# ------------------------------------------------------------------------------------------------
# MoSE: backward (one op for both: with ``weight`` the base layer's dx = dy W is in dx too)
# ------------------------------------------------------------------------------------------------


def _torch_mose_backward(dy, x, weight, modality, expert, gate, A, B, scale, h, need):
    """As ``MoseLoraTorchFunction`` / ``MoseLinearTorchFunction``'s backward, from h in token order."""
    from .kernels.mose.torch_backend import _weighted_rows, adapter_backward, row_bytes
    from .kernels.mose.torch_routing import prepare_torch_routing

    need_dx, need_dgate, need_dA, need_dB = need
    routing = prepare_torch_routing(modality, expert, gate, scale, A.shape[0], B.shape[1], row_bytes=row_bytes(x, B))
    h = routing.tokens.gather(h)  # the forward's order
    hws = tuple(_weighted_rows(routing, h, j) for j in range(len(routing.choices)))
    dx_acc = None
    if need_dx:
        if weight is not None:
            dx = dy @ weight  # [N, d_in]: the base's dx; the adapter's is added into it
            dx_acc = dx if dx.dtype == F32 else dx.to(F32)
        else:
            dx_acc = x.new_zeros(x.shape, dtype=F32)
    dgate, dA, dB = adapter_backward(dy, x, routing, h, hws, A, B, dx_acc, need_dgate=need_dgate, need_dA=need_dA,
                                     need_dB=need_dB)
    return (None if dx_acc is None else dx_acc.to(x.dtype), None if dgate is None else dgate.to(gate.dtype),
            None if dA is None else dA.to(A.dtype), None if dB is None else dB.to(B.dtype))


def _triton_mose_backward(dy, x, weight, modality, expert, gate, A, B, scale, h, need, deterministic):
    from .kernels.mose.function import _gemm_accumulate
    from .kernels.mose.launch import adapter_backward, route

    need_dx, need_dgate, need_dA, need_dB = need
    routing = route(modality, expert, A.shape[0], B.shape[1], sort_pairs=deterministic)
    dx, dgate, dA, dB = adapter_backward(dy, x, h, routing, gate, A, B, scale, need_dx=need_dx,
                                         need_dgate=need_dgate, need_dA=need_dA, need_dB=need_dB,
                                         deterministic=deterministic)
    if need_dx and weight is not None:
        _gemm_accumulate(dx, dy, weight)  # the base dx GEMM accumulates into the adapter's dx (beta = 1)
    if dA is not None and dB is not None:  # views of one buffer there; an op's outputs may not alias
        dB = dB.clone()  # adapter-sized (M E d_out r), small next to the passes over x and dy
    return dx, dgate, dA, dB


@torch.library.custom_op("mosear::mose_backward", mutates_args=())
def mose_backward_op(dy: Tensor, x: Tensor, weight: Tensor | None, modality: Tensor, expert: Tensor, gate: Tensor,
                     A: Tensor, B: Tensor, scale: Tensor, h: Tensor, need: list[bool], backend: str,
                     deterministic: bool) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``(dx, dgate, dA, dB)`` of ``mose_lora`` (``weight`` None) or ``mose_linear`` (dx with the base's
    ``dy W``); ``need`` the four flags; an unneeded gradient is an empty tensor."""
    need = tuple(bool(n) for n in need)
    if h.shape[0] != x.shape[0]:
        raise ValueError(f"h: expected the ({x.shape[0]}, r) shrink saved by the forward, got shape {tuple(h.shape)} "
                         "(the forward ran with save_h=False although a gradient is needed)")
    if backend == "triton":
        grads = _triton_mose_backward(dy.contiguous(), x, weight, modality, expert, gate, A, B, scale, h, need,
                                      deterministic)
    else:
        grads = _torch_mose_backward(dy, x, weight, modality, expert, gate, A, B, scale, h, need)
    # contiguous, as the fake ones
    return tuple(g.contiguous() if g is not None else _empty(like) for g, like in zip(grads, (x, gate, A, B),
                                                                                      strict=True))


@mose_backward_op.register_fake
def _(dy, x, weight, modality, expert, gate, A, B, scale, h, need, backend, deterministic):
    return tuple(t.new_empty(t.shape) if n else _empty(t) for t, n in zip((x, gate, A, B), need, strict=True))


def _setup_mose(ctx, x, weight, modality, expert, gate, A, B, scale, backend, deterministic, h):
    ctx.save_for_backward(x, weight, modality, expert, gate, A, B, scale, h)
    ctx.backend, ctx.deterministic = backend, deterministic


def _adapter_grads(ctx, dy):
    x, weight, modality, expert, gate, A, B, scale, h = ctx.saved_tensors
    g = ctx.needs_input_grad
    need = [g[ctx.index["x"]], g[ctx.index["gate"]], g[ctx.index["A"]], g[ctx.index["B"]]]
    if not any(need):
        return None, None, None, None
    grads = mose_backward_op(dy, x, weight, modality, expert, gate, A, B, scale, h, need, ctx.backend,
                             ctx.deterministic)
    return tuple(grad if n else None for grad, n in zip(grads, need, strict=True))


_LORA_ARGS = ("x", "modality", "expert", "gate", "A", "B", "scale", "out", "save_h", "backend", "deterministic")
_LINEAR_ARGS = ("x", "weight", "bias", "modality", "expert", "gate", "A", "B", "scale", "return_update_norm",
                "save_h", "backend", "deterministic")


def _setup_lora(ctx, inputs, output):
    x, modality, expert, gate, A, B, scale, out, _, backend, deterministic = inputs
    ctx.index = {name: i for i, name in enumerate(_LORA_ARGS)}
    _setup_mose(ctx, x, None, modality, expert, gate, A, B, scale, backend, deterministic, output[1])
    ctx.mark_non_differentiable(output[1])


def _backward_lora(ctx, dy, _dh):
    dx, dgate, dA, dB = _adapter_grads(ctx, dy)
    dout = dy if ctx.needs_input_grad[ctx.index["out"]] else None
    return dx, None, None, dgate, dA, dB, None, dout, None, None, None


def _setup_linear(ctx, inputs, output):
    x, weight, bias, modality, expert, gate, A, B, scale, _, _, backend, deterministic = inputs
    ctx.index = {name: i for i, name in enumerate(_LINEAR_ARGS)}
    _setup_mose(ctx, x, weight, modality, expert, gate, A, B, scale, backend, deterministic, output[2])
    ctx.mark_non_differentiable(output[1], output[2])


def _backward_linear(ctx, dy, _dnorm, _dh):
    g = ctx.needs_input_grad
    dx, dgate, dA, dB = _adapter_grads(ctx, dy)  # dx holds the base's dy W too
    x = ctx.saved_tensors[0]
    dw = dy.t().mm(x) if g[1] else None
    dbias = dy.sum(0) if g[2] else None
    return dx, dw, dbias, None, None, dgate, dA, dB, None, None, None, None, None


mose_lora_op.register_autograd(_backward_lora, setup_context=_setup_lora)
mose_linear_op.register_autograd(_backward_linear, setup_context=_setup_linear)


# ------------------------------------------------------------------------------------------------
# AR attention
# ------------------------------------------------------------------------------------------------


def _target_list(target) -> tuple[list[float] | None, bool]:
    """A validated target (None, |S| floats, or Hq rows of them) as (flat floats or None, per_head)."""
    if target is None:
        return None, False
    if len(target) > 0 and isinstance(target[0], Sequence):
        return [float(t) for row in target for t in row], True
    return [float(t) for t in target], False


def _target_tuple(flat, per_head: bool, n_balance: int):
    if flat is None:
        return None
    if per_head:
        return tuple(tuple(flat[i:i + n_balance]) for i in range(0, len(flat), n_balance))
    return tuple(flat)


def _ar_kwargs(num_modalities, balance, target, target_per_head, strength, threshold, modality_bias, causal, scale,
               window, softcap, balance_by) -> dict:
    """The backends' keyword arguments from the op's schema types."""
    return dict(num_modalities=num_modalities, balance=tuple(balance),
                target=_target_tuple(target, target_per_head, len(balance)), strength=strength, threshold=threshold,
                modality_bias=None if modality_bias is None else tuple(modality_bias), causal=causal, scale=scale,
                window=window, softcap=softcap, balance_by=balance_by)


def _options(**options) -> dict:
    return {name: value for name, value in options.items() if value is not None}


@torch.library.custom_op("mosear::ar_attention", mutates_args=())
def ar_attention_op(q: Tensor, k: Tensor, v: Tensor, key_modality: Tensor, query_mask: Tensor | None,
                    num_modalities: int, balance: list[int], target: list[float] | None, target_per_head: bool,
                    strength: float, threshold: float, modality_bias: list[float] | None, causal: bool, scale: float,
                    window: int | None, softcap: float | None, balance_by: str, return_masses: bool, backend: str,
                    block_m: int | None, block_n: int | None, num_splits: int | None,
                    chunk_size: int | None) -> tuple[Tensor, Tensor]:
    """``(o, masses)``: masses (B, Hq, Lq, M) float32 when ``return_masses``, else (0,)."""
    kwargs = _ar_kwargs(num_modalities, balance, target, target_per_head, strength, threshold, modality_bias, causal,
                        scale, window, softcap, balance_by)
    if backend == "triton":
        from .kernels.ar_attention.function import ar_attention_triton as run
    else:
        from .kernels.ar_attention.torch_backend import ar_attention_torch as run
    # an option the backend does not take raises there, as in eager mode
    options = _options(block_m=block_m, block_n=block_n, num_splits=num_splits, chunk_size=chunk_size)
    result = run(q, k, v, key_modality, query_mask=query_mask, return_masses=return_masses, **kwargs, **options)
    if return_masses:
        return result
    return result, _empty(q, F32)


@ar_attention_op.register_fake
def _(q, k, v, key_modality, query_mask, num_modalities, balance, target, target_per_head, strength, threshold,
      modality_bias, causal, scale, window, softcap, balance_by, return_masses, backend, block_m, block_n, num_splits,
      chunk_size):
    masses = q.new_empty((*q.shape[:3], num_modalities) if return_masses else (0,), dtype=F32)
    return torch.empty_like(q, memory_format=torch.contiguous_format), masses


_AUTOGRAD_KEYS = (torch._C.DispatchKeySet(torch._C.DispatchKey.AutogradFunctionality)
                  | torch._C.DispatchKeySet(torch._C.DispatchKey.ADInplaceOrView)
                  | torch._C.DispatchKeySet(torch._C.DispatchKey.AutogradOther)
                  | torch._C.DispatchKeySet(torch._C.DispatchKey.AutogradNestedTensor))


@contextlib.contextmanager
def _autograd_inside_op():
    """Autograd back on inside an op's implementation, which the dispatcher runs with the autograd keys
    excluded: the AR backward differentiates the PyTorch backend, whose chunk checkpoints use saved-tensor
    hooks that ``torch.func.vjp`` does not support. Only the autograd keys are re-enabled (autocast and
    the rest of the exclude set stay as they are)."""
    exclude = torch._C._dispatch_tls_local_exclude_set()
    with torch._C._ForceDispatchKeyGuard(torch._C._dispatch_tls_local_include_set(), exclude - _AUTOGRAD_KEYS), \
            torch.enable_grad():
        yield


@torch.library.custom_op("mosear::ar_attention_backward", mutates_args=())
def ar_attention_backward_op(grad_o: Tensor, q: Tensor, k: Tensor, v: Tensor, key_modality: Tensor,
                             query_mask: Tensor | None, num_modalities: int, balance: list[int],
                             target: list[float] | None, target_per_head: bool, strength: float, threshold: float,
                             modality_bias: list[float] | None, causal: bool, scale: float, window: int | None,
                             softcap: float | None, balance_by: str,
                             chunk_size: int | None) -> tuple[Tensor, Tensor, Tensor]:
    """``(dq, dk, dv)``: the PyTorch backend's gradients (its chunks recomputed, as its checkpoints do)."""
    from .kernels.ar_attention.torch_backend import ar_attention_torch

    kwargs = _ar_kwargs(num_modalities, balance, target, target_per_head, strength, threshold, modality_bias, causal,
                        scale, window, softcap, balance_by)
    with _autograd_inside_op():
        leaves = [t.detach().requires_grad_(True) for t in (q, k, v)]
        o = ar_attention_torch(*leaves, key_modality, query_mask=query_mask, return_masses=False, **kwargs,
                               **_options(chunk_size=chunk_size))
        grads = torch.autograd.grad(o, leaves, grad_o)
    return tuple(g.detach().contiguous() for g in grads)  # the fake's strides


@ar_attention_backward_op.register_fake
def _(grad_o, q, k, v, key_modality, query_mask, num_modalities, balance, target, target_per_head, strength,
      threshold, modality_bias, causal, scale, window, softcap, balance_by, chunk_size):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)  # contiguous, as the real ones


_AR_SCALARS = ("num_modalities", "balance", "target", "target_per_head", "strength", "threshold", "modality_bias",
               "causal", "scale", "window", "softcap", "balance_by")


def _setup_ar(ctx, inputs, output):
    q, k, v, key_modality, query_mask = inputs[:5]
    ctx.save_for_backward(q, k, v, key_modality, query_mask)
    ctx.scalars = inputs[5:5 + len(_AR_SCALARS)]
    ctx.chunk_size = inputs[-1]
    ctx.mark_non_differentiable(output[1])


def _backward_ar(ctx, grad_o, _grad_masses):
    need = ctx.needs_input_grad[:3]
    if not any(need):
        return (None,) * 23
    q, k, v, key_modality, query_mask = ctx.saved_tensors
    grads = ar_attention_backward_op(grad_o, q, k, v, key_modality, query_mask, *ctx.scalars, ctx.chunk_size)
    return (*(g if n else None for g, n in zip(grads, need, strict=True)),) + (None,) * 20


def _no_double_backward(ctx, *grads):
    raise NotImplementedError("mosear backward ops: double backward is not implemented")


ar_attention_op.register_autograd(_backward_ar, setup_context=_setup_ar)
# An autograd formula on the backward op itself (raising) makes the dispatcher call it through the
# autograd.Function path, not the "not implemented" fallback that excludes autograd around it.
ar_attention_backward_op.register_autograd(_no_double_backward, setup_context=lambda ctx, inputs, output: None)


# ------------------------------------------------------------------------------------------------
# Callers with the backends' signatures (ops.py under compile; export forms)
# ------------------------------------------------------------------------------------------------


def _needs_grad(*tensors) -> bool:
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def _deterministic(backend: str, deterministic) -> bool:
    if backend != "triton":
        return False
    from .kernels.mose.function import deterministic_enabled

    return deterministic_enabled(deterministic)


def mose_lora(x, modality, expert, gate, A, B, scale_vec, out=None, *, inplace=False, backend="torch",
              deterministic=None):
    """``mose_lora`` through ``mosear::mose_lora`` (validated arguments, ``scale_vec`` (M,) float32).
    ``inplace`` copies the result into ``out`` (a functional op cannot write its input)."""
    y, _ = mose_lora_op(x, modality, expert, gate, A, B, scale_vec, out, _needs_grad(x, gate, A, B), backend,
                        _deterministic(backend, deterministic))
    return out.copy_(y) if inplace else y


def mose_linear(x, weight, bias, modality, expert, gate, A, B, scale_vec, *, return_update_norm=False,
                backend="torch", deterministic=None):
    """``mose_linear`` through ``mosear::mose_linear``."""
    save_h = _needs_grad(x, gate, A, B)
    y, norm, _ = mose_linear_op(x, weight, bias, modality, expert, gate, A, B, scale_vec, return_update_norm, save_h,
                                backend, _deterministic(backend, deterministic))
    return (y, norm) if return_update_norm else y


def ar_attention(q, k, v, key_modality, *, num_modalities, balance, target, strength, threshold, modality_bias,
                 causal, scale, query_mask, return_masses, window=None, softcap=None, balance_by="mass",
                 backend="torch", block_m=None, block_n=None, num_splits=None, chunk_size=None):
    """``ar_attention`` through ``mosear::ar_attention`` (validated arguments, as the backends take them)."""
    flat, per_head = _target_list(target)
    o, masses = ar_attention_op(q, k, v, key_modality, query_mask, num_modalities, list(balance), flat, per_head,
                                float(strength), float(threshold),
                                None if modality_bias is None else [float(b) for b in modality_bias], causal,
                                float(scale), window, None if softcap is None else float(softcap), balance_by,
                                return_masses, backend, block_m, block_n, num_splits, chunk_size)
    return (o, masses) if return_masses else o


@contextlib.contextmanager
def custom_op_forms(backend: str = "torch"):
    """While open, ``torch.export`` records each op as one ``mosear::`` node instead of its static form
    (the default forms are for ONNX, which has no such op)."""
    import functools

    with export_forms(mose_lora=functools.partial(mose_lora, backend=backend),
                      mose_linear=functools.partial(mose_linear, backend=backend),
                      ar_attention=functools.partial(ar_attention, backend=backend)):
        yield

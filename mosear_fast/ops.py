"""Public functional ops: validate, then dispatch to a backend (DESIGN section 4)."""

from __future__ import annotations

import functools

import torch

from . import library
from ._validation import check_ar_args, check_mose_args, check_mose_linear_args
from .backend import implementation, resolve_backend, through_library


def mose_lora(x, modality, expert, gate, A, B, scale, out=None, *, inplace=False, backend="auto",
              validate=True, **backend_options) -> torch.Tensor:
    """``out`` plus the MoSE update of every token through its selected experts.

    x (N, d_in); modality (N,) ints in [-1, M) (-1: no adapter, the row is ``out`` exactly);
    expert (N, k) ints in [0, E), k in {1, 2}; gate (N, k) float; A (M, r, d_in);
    B (M, E, d_out, r); scale a float or an (M,) tensor (``s * w_m``); out (N, d_out) or None (zeros).

        y_t = out_t + scale[m] * sum_j gate[t, j] * B[m, expert[t, j]] @ (A[m] @ x_t),  m = modality[t]

    Returns a new tensor of ``out.dtype`` (``x.dtype`` without out), or ``out`` itself with
    ``inplace=True`` (refused when out requires grad or when out's elements share memory, as in an
    expanded view). Differentiable in x, gate, A, B and out. ``scale`` is not differentiated (it
    is ``s * w_m``, whose dynamic weights are buffers): a scale tensor that requires grad is refused
    while grad mode is on. ``backend``: "auto" (Triton on CUDA, PyTorch on CPU), "torch" or "triton".

    Validation: shapes, dtypes and devices are always checked. The value ranges of modality and expert
    need a host read, which would break a ``torch.compile`` graph, is symbolic under ``torch.export``
    and would synchronise inside CUDA-graph capture: it is skipped in those three cases (and for CUDA
    tensors with ``validate=False``); the kernels then skip out-of-range ids. Under ``torch.compile``
    the call is the registered op ``mosear::mose_lora`` (``mosear_fast.library``).
    """
    scale_vec = check_mose_args(x, modality, expert, gate, A, B, scale, out, inplace=inplace, validate=validate)
    if through_library():
        return library.mose_lora(x, modality, expert, gate, A, B, scale_vec, out, inplace=inplace,
                                 backend=resolve_backend("mose_lora", backend, x.device), **backend_options)
    run = implementation("mose_lora", backend, x.device)
    return run(x, modality, expert, gate, A, B, scale_vec, out, inplace=inplace, **backend_options)


def mose_linear(x, weight, bias, modality, expert, gate, A, B, scale, *, return_update_norm=False, backend="auto",
                validate=True, **backend_options):
    """The base linear layer and the MoSE update in one op (same x for both: no adapter dropout).

        y_t = x_t W^T + bias + scale[m] * sum_j gate[t, j] * B[m, expert[t, j]] @ (A[m] @ x_t),  m = modality[t]

    x (N, d_in); weight (d_out, d_in); bias (d_out,) or None; the other arguments as ``mose_lora``
    (rows of modality -1 get the base output exactly). x, weight, bias, A and B share one dtype.
    Returns y (N, d_out) in x's dtype; with ``return_update_norm=True`` the pair ``(y, norm)``:
    ``norm`` (N,) float32, not differentiable, is per token the L2 norm of the update *before*
    scale, ``||sum_j gate_j B[m, e_j] A[m] x_t||`` (0 for rows without adapter), what MoSELinear's
    dynamic modality weights measure (DESIGN 2.1). Differentiable in x, gate, A, B, and weight and
    bias when they require grad; ``scale`` is not differentiated (a scale that requires grad is
    refused while grad mode is on). ``backend``: "auto", "torch" or "triton", as ``mose_lora``.

    Validation: shapes, dtypes and devices are always checked. The value ranges of modality and expert
    need a host read, which would break a ``torch.compile`` graph, is symbolic under ``torch.export``
    and would synchronise inside CUDA-graph capture: it is skipped in those three cases (and for CUDA
    tensors with ``validate=False``); the kernels then skip out-of-range ids. Under ``torch.compile``
    the call is the registered op ``mosear::mose_linear`` (``mosear_fast.library``).
    """
    scale_vec = check_mose_linear_args(x, weight, bias, modality, expert, gate, A, B, scale,
                                       return_update_norm=return_update_norm, validate=validate)
    if through_library():
        return library.mose_linear(x, weight, bias, modality, expert, gate, A, B, scale_vec,
                                   return_update_norm=return_update_norm,
                                   backend=resolve_backend("mose_linear", backend, x.device), **backend_options)
    run = implementation("mose_linear", backend, x.device)
    return run(x, weight, bias, modality, expert, gate, A, B, scale_vec, return_update_norm=return_update_norm,
               **backend_options)


def ar_attention(q, k, v, key_modality, *, num_modalities, balance=(1, 2), target=None, strength=0.5,
                 threshold=0.0, modality_bias=None, causal=True, scale=None, query_mask=None, window=None,
                 softcap=None, balance_by="mass", return_masses=False, backend="auto", validate=True,
                 **backend_options):
    """Softmax attention whose per-modality mass is moved toward a balanced target (DESIGN 2.2, 2.2b).

    q (B, Hq, Lq, D); k, v (B, Hkv, Lk, D) with Hq % Hkv == 0 (query head h reads KV head
    h // (Hq / Hkv)); key_modality (B, Lk) ints in [-1, M) (-1 = padding, never attended). Query i
    sits at position pos_i = Lk - Lq + i (bottom-right alignment: prefill and decode with a KV cache
    alike). Visible keys of query i: not padding, ``j <= pos_i`` when ``causal``, and
    ``0 <= pos_i - j < window`` when ``window`` is an int >= 1 (the Mistral-family sliding window;
    needs ``causal=True``).

    Scores ``s_ij = softcap * tanh(scale * q_i.k_j / softcap) + modality_bias[mu(j)]`` (no tanh when
    ``softcap`` is None; ``scale`` None means 1/sqrt(D); ``modality_bias`` None or M finite floats).
    ``P_im`` is the softmax mass of modality m over the visible keys. For each query selected by
    ``query_mask`` (B, Lq) bool (None: all), ``S_i`` = the ``balance`` modalities with a visible key:

    - ``balance_by="mass"``: shares ``P_im / P_{i,S_i}``;
    - ``balance_by="contribution"``: shares of ``c_im = P_im * ||vbar_im||`` (``vbar_im`` the mean of
      v under modality m's own softmax); a modality with ``||vbar_im|| = 0`` is left out of S_i and
      keeps its mass.

    When ``|S_i| >= 2`` and some share exceeds its target by more than ``threshold``, the shares move
    toward the targets by ``strength``; the total mass of S_i is kept and the output is
    ``sum_m P'_im * vbar_im``. ``target``: None (uniform); |S| positive floats in ``balance`` order,
    or a (|S|,) tensor; or one target per query head, an (Hq, |S|) tensor or Hq sequences. Targets
    are normalised to sum 1 in float64 on the host before any backend sees them (a CUDA tensor
    target costs one device-to-host copy per call), so scale never matters: (1e-40, 1e-40) and
    (3e38, 3e38) are exactly (0.5, 0.5); an entry more than ~1e308 times smaller than the largest
    becomes 0; targets are renormalised over S_i, and a query whose S_i targets are all 0 is left
    unchanged. Non-finite or non-positive targets raise ValueError naming ``target``.

    Returns o (B, Hq, Lq, D) in q's dtype, or ``(o, masses)`` with ``return_masses=True``: the
    pre-reallocation masses (B, Hq, Lq, M) in float32. A query without a visible key outputs zeros.
    ``strength=0`` without bias is plain softmax attention (with the window and softcap applied).
    ``backend``: "auto" (Triton on CUDA, PyTorch on CPU), "torch" or "triton"; every backend
    implements every option.

    Validation: shapes, dtypes and devices are always checked. The value ranges of key_modality
    need a host read, which would break a ``torch.compile`` graph, is symbolic under ``torch.export``
    and would synchronise inside CUDA-graph capture: it is skipped in those three cases (and for CUDA
    tensors with ``validate=False``); the kernels then skip out-of-range ids. Under ``torch.compile``
    the call is the registered op ``mosear::ar_attention`` (``mosear_fast.library``).
    """
    args = check_ar_args(q, k, v, key_modality, num_modalities=num_modalities, balance=balance, target=target,
                         strength=strength, threshold=threshold, modality_bias=modality_bias, causal=causal,
                         scale=scale, query_mask=query_mask, validate=validate, window=window, softcap=softcap,
                         balance_by=balance_by)
    if not isinstance(return_masses, bool):
        raise TypeError(f"return_masses: expected a bool, got {type(return_masses).__name__}")
    if through_library():
        run = functools.partial(library.ar_attention, backend=resolve_backend("ar_attention", backend, q.device))
    else:
        run = implementation("ar_attention", backend, q.device)
    return run(q, k, v, key_modality, num_modalities=args.num_modalities, balance=args.balance,
               target=args.target, strength=args.strength, threshold=args.threshold,
               modality_bias=args.modality_bias, causal=args.causal, scale=args.scale,
               query_mask=query_mask, window=args.window, softcap=args.softcap, balance_by=args.balance_by,
               return_masses=return_masses, **backend_options)

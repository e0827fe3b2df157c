"""The "MoSEAR eager" variant: the same model, its two ops run the way a research codebase does.

``eager_ops()`` is a bench-only context manager: inside it, ``mosear_fast.mose_lora`` and
``mosear_fast.ar_attention`` still validate their arguments, then call the functions below instead
of the backend that ``mosear_fast.backend`` would pick. Nothing else of the model changes (routers,
dynamic weights, modality context, attention plumbing), so the fused and eager variants differ only
in how the two ops are computed. It swaps the ``implementation`` lookup that ``mosear_fast.ops``
calls at run time and restores it on exit; no user-visible behaviour of ``mosear_fast`` changes.

- MoSE: ``tests.baselines.mose_naive_group_loop``, the PEFT-style loop over (modality, expert)
  groups (index_select, both matmuls, index_add; the shrink recomputed for every expert).
- AR: ``ar_eager_model``, ``tests.baselines.ar_eager_materialised`` (full (Lq, Lk) probabilities,
  masses by a one-hot matmul, rescaled probabilities, then P @ V) extended with what a model's
  attention call passes besides: the query mask, the static modality bias and the masses output.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable

import torch

from tests.baselines import ar_eager_materialised, mose_naive_group_loop


def mose_eager(x, modality, expert, gate, A, B, scale, out=None, *, inplace=False, **_options):
    """``mose_lora``'s backend signature around ``mose_naive_group_loop``."""
    y = mose_naive_group_loop(x, modality, expert, gate, A, B, scale, out)
    if inplace and out is not None:
        out.copy_(y)
        return out
    return y


def ar_eager_model(q, k, v, key_modality, *, num_modalities, balance=(1, 2), target=None, strength=0.5,
                   threshold=0.0, modality_bias=None, causal=True, scale=None, query_mask=None,
                   return_masses=False, **_options):
    """Materialised AR with ``ar_attention``'s backend signature (DESIGN 2.2 semantics except that,
    like every eager steering code, a modality whose probabilities underflow to 0 gets no mass)."""
    if query_mask is None and modality_bias is None and not return_masses:
        return ar_eager_materialised(q, k, v, key_modality, num_modalities=num_modalities, balance=balance,
                                     target=target, strength=strength, threshold=threshold, causal=causal,
                                     scale=scale)
    len_q, len_k, head_dim = q.shape[2], k.shape[2], q.shape[3]
    group = q.shape[1] // k.shape[1]
    scale = head_dim**-0.5 if scale is None else scale
    k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
    scores = (q.float() @ k.float().transpose(-1, -2)) * scale  # [B, H, Lq, Lk]
    if modality_bias is not None:
        bias = torch.tensor([float(b) for b in modality_bias], device=q.device)
        scores = scores + bias[key_modality.clamp(min=0)][:, None, None, :]
    visible = (key_modality >= 0)[:, None, None, :]
    if causal:
        pos = torch.arange(len_q, device=q.device)[:, None] + len_k - len_q
        visible = visible & (torch.arange(len_k, device=q.device) <= pos)
    p = torch.softmax(scores.masked_fill(~visible, -float("inf")), dim=-1).nan_to_num(0.0)
    onehot = torch.nn.functional.one_hot(key_modality.clamp(min=0), num_modalities).float()
    onehot = onehot * (key_modality >= 0)[..., None]  # [B, Lk, M]
    mass = p @ onehot[:, None]  # [B, H, Lq, M]
    present = (visible.float() @ onehot[:, None]) > 0
    bal = torch.zeros(num_modalities, dtype=torch.bool, device=q.device)
    tau = torch.zeros(num_modalities, device=q.device)
    for m, t in zip(balance, target or (1.0,) * len(balance), strict=True):
        bal[m], tau[m] = True, t
    in_s = present & bal
    mass_s = (mass * in_s).sum(-1, keepdim=True)
    tau_i = tau * in_s
    tau_i = tau_i / tau_i.sum(-1, keepdim=True).clamp_min(1e-30)
    sigma = mass / mass_s.clamp_min(1e-30)
    deviation = torch.where(in_s, sigma - tau_i, -torch.inf).amax(-1)
    apply = (in_s.sum(-1) >= 2) & (mass_s[..., 0] > 0) & (deviation > threshold)
    if query_mask is not None:
        apply = apply & query_mask[:, None, :]
    new_mass = torch.where(in_s & apply[..., None], (1 - strength) * mass + strength * mass_s * tau_i, mass)
    factor = torch.where(mass > 0, new_mass / mass.clamp_min(1e-30), torch.ones_like(mass))
    p = p * (factor @ onehot[:, None].transpose(-1, -2))  # [B, H, Lq, Lk]
    o = (p @ v.float()).to(q.dtype)
    return (o, mass) if return_masses else o


EAGER_IMPLEMENTATIONS: dict[str, Callable] = {"mose_lora": mose_eager, "ar_attention": ar_eager_model}


@contextlib.contextmanager
def use_implementations(overrides: dict[str, Callable]):
    """Within the block, ``mosear_fast``'s ops dispatch ``op -> overrides[op]`` (others unchanged)."""
    import mosear_fast.ops as ops

    unknown = set(overrides) - {"mose_lora", "ar_attention"}
    if unknown:
        raise ValueError(f"overrides: unknown ops {sorted(unknown)}; expected 'mose_lora' or 'ar_attention'")
    original = ops.implementation

    def lookup(op, backend, device):
        if op in overrides:
            return overrides[op]
        return original(op, backend, device)

    ops.implementation = lookup
    try:
        yield
    finally:
        ops.implementation = original


def eager_ops():
    """Both ops through the eager baselines (see the module docstring)."""
    return use_implementations(EAGER_IMPLEMENTATIONS)

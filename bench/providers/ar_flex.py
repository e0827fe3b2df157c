"""AR providers built on FlexAttention (``torch.nn.attention.flex_attention``), compiled on CUDA.

- ``flex_static``: the *static* part of AR only: a ``score_mod`` adds a fixed logit bias per key
  modality (multiplying each modality's attention by ``exp(bias)``). No masses are measured, so it
  cannot reallocate dynamically: it is the cost of the cheapest steering a fused kernel can do.
- ``lse_merge``: *exact* dynamic AR by composition: one attention per key class (each balance
  modality, and the rest together) that also returns its log-sum-exp; the masses come from the
  LSEs, are reallocated (DESIGN 2.2 step 3), and the per-class outputs (each class's own softmax
  mean) are merged with the new masses. It reads Q, K and V once per class: the baseline that a
  one-pass kernel must beat.

Both take the causal (bottom-right) and padding mask as a block mask, so masked blocks are skipped.
On the CPU they run eagerly (materialised scores: a correctness check only, not timed).
"""

from __future__ import annotations

import torch

from mosear_fast.kernels.ar_attention.torch_backend import reallocate_masses

from ..registry import Provider, register
from ..setups import AR_OPTIONS, ar_setup, cuda_only

STATIC_BIAS = (0.0, 0.25, -0.25)  # text, visual, audio: a fixed re-weighting of the two balance modalities


def _flex():
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    return flex_attention, create_block_mask


def _compiled(fn, device):
    return torch.compile(fn, dynamic=False) if device.type == "cuda" else fn


def _visible(key_modality, len_q, len_k, *, key_class=None):
    """mask_mod: bottom-right causal, padding excluded, optionally only the keys of one class."""
    offset = len_k - len_q

    def mask_mod(b, h, q_idx, kv_idx):
        keep = (kv_idx <= q_idx + offset) & (key_modality[b, kv_idx] >= 0)
        return keep if key_class is None else keep & key_class(key_modality[b, kv_idx])
    return mask_mod


def flex_static_attention(q, k, v, key_modality, *, bias=STATIC_BIAS, attend=None):
    """Softmax attention with a static per-modality logit bias (FlexAttention score_mod)."""
    flex_attention, create_block_mask = _flex()
    batch, _, len_q, _ = q.shape
    len_k = k.shape[2]
    table = torch.tensor(bias, dtype=torch.float32, device=q.device)

    def score_mod(score, b, h, q_idx, kv_idx):
        return score + table[key_modality[b, kv_idx].clamp(min=0)]

    block_mask = create_block_mask(_visible(key_modality, len_q, len_k), batch, None, len_q, len_k, device=q.device)
    return (attend or flex_attention)(q, k, v, score_mod=score_mod, block_mask=block_mask, enable_gqa=True)


def lse_merge_attention(q, k, v, key_modality, *, num_modalities, balance=(1, 2), target=None, strength=0.5,
                        threshold=0.0, attend=None):
    """Exact AR from one attention per key class (balance modalities, then the rest) and its LSE."""
    flex_attention, create_block_mask = _flex()
    batch, _, len_q, _ = q.shape
    len_k = k.shape[2]
    rest = tuple(m for m in range(num_modalities) if m not in balance)
    classes = [lambda mod, m=m: mod == m for m in balance]
    if rest:
        rest_ids = torch.tensor(rest, device=q.device)
        classes.append(lambda mod: (mod[..., None] == rest_ids).any(-1))
    outs, lses = [], []
    for key_class in classes:
        mask = create_block_mask(_visible(key_modality, len_q, len_k, key_class=key_class), batch, None, len_q,
                                 len_k, device=q.device)
        o_c, lse_c = (attend or flex_attention)(q, k, v, block_mask=mask, enable_gqa=True, return_lse=True)
        outs.append(o_c.float())
        lses.append(lse_c.float())
    lse = torch.stack(lses, -1)  # [B, Hq, Lq, C]: -inf for a class without visible keys
    has_key = torch.isfinite(lse)
    top = lse.amax(-1, keepdim=True)
    top = torch.where(torch.isfinite(top), top, torch.zeros_like(top))
    z = torch.where(has_key, torch.exp(lse - top), torch.zeros_like(lse))
    mass = z / z.sum(-1, keepdim=True).clamp_min(1e-30)
    n_bal = len(balance)
    in_balance = torch.arange(len(classes), device=q.device) < n_bal
    tau = torch.zeros(len(classes), device=q.device)
    tau[:n_bal] = torch.tensor(target or (1.0,) * n_bal, device=q.device)
    new_mass = reallocate_masses(mass, has_key, in_balance=in_balance, tau=tau, strength=strength,
                                 threshold=threshold, selected=torch.ones((), dtype=torch.bool, device=q.device))
    o = sum(new_mass[..., c, None] * outs[c] for c in range(len(classes)))
    return o.to(q.dtype)


def _flex_setup(run):
    def setup(case):
        attend = _compiled(_flex()[0], case["device"])
        return ar_setup(lambda q, k, v, mod: run(q, k, v, mod, attend=attend))(case)
    return setup


def _unavailable(case):
    try:
        _flex()
    except ImportError:
        return "this torch has no FlexAttention"
    return cuda_only(case)


register(Provider("ar", "flex_static", _flex_setup(flex_static_attention), unavailable=_unavailable,
                  description="FlexAttention + static per-modality logit bias (score_mod); no dynamic AR"))
register(Provider("ar", "lse_merge",
                  _flex_setup(lambda q, k, v, mod, attend: lse_merge_attention(q, k, v, mod, attend=attend,
                                                                               **AR_OPTIONS)),
                  unavailable=_unavailable,
                  description="exact AR by composition: one FlexAttention per class with its LSE, then merge"))

"""Random inputs for the two ops, shared by the tests and the benchmarks (never zeros)."""

from __future__ import annotations

import torch


def make_mose_inputs(n_tokens, d_in, d_out, *, n_modalities=3, n_experts=4, rank=8, top_k=1,
                     dtype=torch.float32, device="cpu", with_out=True, pad_fraction=0.1,
                     tensor_scale=True, unused_experts=(), seed=0, weight_std=None):
    """Inputs of ``mose_lora``: a dict with x, modality, expert, gate, A, B, scale, out.

    ``pad_fraction`` of tokens get modality -1; experts in ``unused_experts`` are never selected
    (empty groups). B is random (not the zero init), so the update is non-trivial.
    """
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n_tokens, d_in, generator=g)
    modality = torch.randint(0, n_modalities, (n_tokens,), generator=g)
    modality[torch.rand(n_tokens, generator=g) < pad_fraction] = -1
    allowed = torch.tensor([e for e in range(n_experts) if e not in set(unused_experts)])
    # distinct experts per token for top-2 (as a top-k router picks them)
    scores = torch.rand(n_tokens, allowed.numel(), generator=g)
    expert = allowed[scores.topk(min(top_k, allowed.numel()), dim=1).indices]
    if expert.shape[1] < top_k:  # only one allowed expert: repeat it
        expert = expert.repeat(1, top_k)
    gate = torch.rand(n_tokens, top_k, generator=g) + 0.1
    std_a = weight_std or d_in ** -0.5
    A = torch.randn(n_modalities, rank, d_in, generator=g) * std_a
    B = torch.randn(n_modalities, n_experts, d_out, rank, generator=g) * (weight_std or rank ** -0.5)
    scale = (torch.rand(n_modalities, generator=g) + 0.5) if tensor_scale else 0.75
    out = torch.randn(n_tokens, d_out, generator=g) if with_out else None
    to = dict(device=device)
    return dict(
        x=x.to(dtype=dtype, **to), modality=modality.to(**to), expert=expert.to(**to),
        gate=gate.to(**to), A=A.to(dtype=dtype, **to), B=B.to(dtype=dtype, **to),
        scale=scale.to(**to) if isinstance(scale, torch.Tensor) else scale,
        out=None if out is None else out.to(dtype=dtype, **to),
    )


def av_layout(length, *, n_modalities=3, left_pad=0):
    """Modality ids of an audio-visual prompt: text, a long visual span, a short audio span, text."""
    ids = torch.zeros(length, dtype=torch.long)
    body = length - left_pad
    vis_start = left_pad + max(1, body // 8)
    vis_stop = vis_start + max(1, body // 2)
    aud_stop = min(length, vis_stop + max(1, body // 8))
    if n_modalities > 1:
        ids[vis_start:vis_stop] = 1
    if n_modalities > 2:
        ids[vis_stop:aud_stop] = 2
    ids[:left_pad] = -1
    return ids


def make_ar_inputs(batch, n_q_heads, n_kv_heads, len_q, len_k, head_dim, *, n_modalities=3,
                   dtype=torch.float32, device="cpu", layout="random", left_pad=0, seed=0, score_scale=1.0):
    """Inputs of ``ar_attention``: a dict with q, k, v, key_modality.

    layout "random": i.i.d. ids in [-1, M) (padding included); "av": ``av_layout`` per sample with
    ``left_pad`` padding keys on the left. ``score_scale`` scales q to reach extreme logits.
    """
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, n_q_heads, len_q, head_dim, generator=g) * score_scale
    k = torch.randn(batch, n_kv_heads, len_k, head_dim, generator=g)
    v = torch.randn(batch, n_kv_heads, len_k, head_dim, generator=g)
    if layout == "random":
        key_modality = torch.randint(-1, n_modalities, (batch, len_k), generator=g)
    elif layout == "av":
        key_modality = av_layout(len_k, n_modalities=n_modalities, left_pad=left_pad).expand(batch, len_k).clone()
    else:
        raise ValueError(f"layout: expected 'random' or 'av', got {layout!r}")
    to = dict(dtype=dtype, device=device)
    return dict(q=q.to(**to), k=k.to(**to), v=v.to(**to), key_modality=key_modality.to(device))

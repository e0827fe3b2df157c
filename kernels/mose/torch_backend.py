"""PyTorch backend of the MoSE dispatch: a real CPU path, also correct on CUDA.

Tokens are grouped through a sort of *indices* (by modality for the shared down-projection, by
(modality, expert) for the up-projections); one matmul runs per non-empty group. Unselected experts
are never computed and no Python loop touches single tokens. Plain autograd provides the gradients
for x, gate, A, B and out.

The group sizes are read on the host (``tolist``): fine on the CPU, a synchronisation on CUDA,
which is why CUDA tensors go to the Triton backend by default.
"""

from __future__ import annotations

import torch


def _group_bounds(sorted_keys: torch.Tensor, n_groups: int) -> list[int]:
    """Start offsets (length n_groups + 1) of each key value in an ascending key tensor."""
    counts = torch.bincount(sorted_keys, minlength=n_groups)
    return [0] + torch.cumsum(counts, 0).tolist()


# Up to this many (token, choice) pairs (decode steps), each token's own A and B are gathered
# and applied with batched matmuls: no sort, no host sync, a handful of ops instead of a group loop.
GATHER_MAX_PAIRS = 16


def _gathered_update(acc, x, modality, expert, gate, A, B, scale):
    """``acc`` (float32) plus the update, computing only each token's selected experts."""
    adapted = modality >= 0
    m = modality.clamp(min=0).long()
    e = torch.where(adapted[:, None], expert.long(), 0)  # ids of rows without adapter are not read
    h = torch.bmm(A[m], x.unsqueeze(-1))  # [N, r, 1]: the shared down-projection, once per token
    update = torch.matmul(B[m[:, None], e], h.unsqueeze(1)).squeeze(-1)  # [N, k, d_out]
    weight = gate.float() * scale[m][:, None]  # [N, k]
    update = (update.float() * weight[..., None]).sum(1)
    return torch.where(adapted[:, None], acc + update, acc)  # rows without adapter: exactly acc


def mose_lora_torch(x, modality, expert, gate, A, B, scale, out=None, *, inplace=False) -> torch.Tensor:
    """``out + MoSE update`` (N, d_out) for validated inputs; ``scale`` is an (M,) float32 tensor."""
    n_tokens = x.shape[0]
    n_modalities, n_experts, d_out = A.shape[0], B.shape[1], B.shape[2]
    top_k = expert.shape[1]
    result_dtype = out.dtype if out is not None else x.dtype
    acc = out.float() if out is not None else x.new_zeros(n_tokens, d_out, dtype=torch.float32)

    if n_tokens * top_k <= GATHER_MAX_PAIRS:
        acc = _gathered_update(acc, x, modality, expert, gate, A, B, scale)
        result = acc.to(result_dtype)
        return out.copy_(result) if inplace else result

    adapted = (modality >= 0).nonzero().squeeze(1)  # [Na] tokens with an adapter
    if adapted.numel() > 0:
        # Shrink: h = A[m] x, once per token, one matmul per modality.
        tok_mod = modality[adapted].long()
        by_mod = torch.argsort(tok_mod, stable=True)
        tokens_by_mod = adapted[by_mod]  # [Na] token ids grouped by modality
        bounds = _group_bounds(tok_mod[by_mod], n_modalities)
        h_parts = [
            x[tokens_by_mod[lo:hi]] @ A[m].t()  # [n_m, r]
            for m, (lo, hi) in enumerate(zip(bounds[:-1], bounds[1:]))
            if hi > lo
        ]
        h = torch.cat(h_parts)  # [Na, r], rows in tokens_by_mod order
        row_of_token = torch.empty(n_tokens, dtype=torch.long, device=x.device)
        row_of_token[tokens_by_mod] = torch.arange(tokens_by_mod.numel(), device=x.device)

        # Expand: one matmul per non-empty (modality, expert) group of (token, choice) pairs.
        pair_token = adapted.repeat_interleave(top_k)  # [Na*k]
        pair_choice = torch.arange(top_k, device=x.device).repeat(adapted.numel())
        pair_expert = expert[pair_token, pair_choice].long()
        pair_key = modality[pair_token].long() * n_experts + pair_expert
        by_key = torch.argsort(pair_key, stable=True)
        pair_token, pair_choice, pair_key = pair_token[by_key], pair_choice[by_key], pair_key[by_key]
        # gate and scale are used in float32 (DESIGN 4)
        pair_weight = gate[pair_token, pair_choice].float() * scale[pair_key // n_experts]
        bounds = _group_bounds(pair_key, n_modalities * n_experts)
        contributions = []
        for key, (lo, hi) in enumerate(zip(bounds[:-1], bounds[1:])):
            if hi == lo:
                continue
            m, e = divmod(key, n_experts)
            rows = h[row_of_token[pair_token[lo:hi]]]  # [n_g, r]
            contributions.append((rows @ B[m, e].t()).float() * pair_weight[lo:hi, None])  # [n_g, d_out]
        acc = acc.index_add(0, pair_token, torch.cat(contributions))

    result = acc.to(result_dtype)
    if inplace:
        return out.copy_(result)
    return result

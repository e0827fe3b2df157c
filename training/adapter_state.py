"""The MoSE adapter's own state: what a checkpoint holds, and keeping it identical across ranks.

The adapter state is every tensor under a ``.mose_adapter.`` module: ``A``, ``B``, the routers and
the dynamic-weight buffers (``update_norm_ema``, ``modality_weight``). The buffers are part of it
because evaluation uses the weights frozen at the end of training (DESIGN 2.1); a resumed run that
lost them would compute a different function from the first step on.
"""

from __future__ import annotations

import os

import torch

from mosear_fast.atomic import atomic_save_tensors

# The adapter file's name, its tensors and its reader are shared with export (mosear_fast.trained).
from mosear_fast.trained import (
    ADAPTER_FILE,
    ADAPTER_MARK,
    adapted_prefix,
    adapter_state_dict,
    load_adapter,
    to_peft_keys,
)

__all__ = ["ADAPTER_FILE", "ADAPTER_MARK", "adapted_prefix", "adapter_state_dict", "load_adapter", "mose_adapters",
           "save_adapter", "sync_dynamic_weights"]


def mose_adapters(model) -> list:
    """Every ``MoSEAdapter`` of ``model``, in module order (the same order on every rank)."""
    from mosear_fast.mose_layer import MoSEAdapter

    return [m for m in model.modules() if isinstance(m, MoSEAdapter)]


def save_adapter(path: str | os.PathLike, model_or_state, metadata: dict[str, str] | None = None, *,
                 prefix: str | None = None) -> None:
    """Write the adapter tensors to a safetensors file under PEFT's names, atomically. ``prefix``: the
    state-dict prefix of the module MoSE was applied to (needed for a state dict; for a model, default:
    the module ``apply_mosear`` prepared)."""
    if prefix is None:
        if isinstance(model_or_state, dict):
            raise TypeError("prefix: required with a state dict (the name of the module MoSE was applied to)")
        prefix = adapted_prefix(model_or_state)
    atomic_save_tensors(path, to_peft_keys(adapter_state_dict(model_or_state), prefix),
                        metadata={"format": "pt", **(metadata or {})})


@torch.no_grad()
def sync_dynamic_weights(model) -> None:
    """Average the update-norm EMAs over the ranks of a distributed run, then recompute ``w_m``.

    Each rank measures the update norms of its own part of the batch. When every rank sees the same
    number of tokens per modality (a fixed prompt layout), the mean of the ranks' EMAs is exactly the
    EMA one process would compute on the whole global batch, so 1 and N processes train the same
    adapter. No-op outside ``torch.distributed``.
    """
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return
    adapters = [a for a in mose_adapters(model) if a.dynamic_weights]
    if not adapters:
        return
    flat = torch.cat([a.update_norm_ema for a in adapters])
    dist.all_reduce(flat, op=dist.ReduceOp.SUM)
    flat /= dist.get_world_size()
    offset = 0
    for a in adapters:
        n = a.update_norm_ema.numel()
        a.update_norm_ema.copy_(flat[offset:offset + n])
        a.refresh_modality_weights()
        offset += n

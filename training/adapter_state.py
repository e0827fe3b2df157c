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

ADAPTER_MARK = ".mose_adapter."
ADAPTER_FILE = "adapter.safetensors"


def mose_adapters(model) -> list:
    """Every ``MoSEAdapter`` of ``model``, in module order (the same order on every rank)."""
    from mosear_fast.mose_linear import MoSEAdapter

    return [m for m in model.modules() if isinstance(m, MoSEAdapter)]


def adapter_state_dict(model_or_state) -> dict[str, torch.Tensor]:
    """The adapter tensors (detached, CPU, contiguous) of a model or of a full state dict."""
    state = model_or_state if isinstance(model_or_state, dict) else model_or_state.state_dict()
    out = {name: t.detach().cpu().contiguous() for name, t in state.items() if ADAPTER_MARK in f".{name}"}
    if not out:
        raise ValueError("model: has no MoSE adapter tensors (names containing '.mose_adapter.'); prepare it "
                         "with apply_mosear(model, mose=MoSEConfig(...)) first")
    return out


def save_adapter(path: str | os.PathLike, model_or_state, metadata: dict[str, str] | None = None) -> None:
    """Write the adapter tensors to a safetensors file, atomically."""
    atomic_save_tensors(path, adapter_state_dict(model_or_state), metadata=metadata)


def load_adapter(model, path: str | os.PathLike) -> None:
    """Load an adapter file into ``model`` (in place). Every adapter tensor of the model must be in the
    file with its shape, and the file must hold nothing else: a mismatch is a ValueError naming it."""
    from safetensors.torch import load_file

    tensors = load_file(str(path))
    expected = adapter_state_dict(model)
    missing, unexpected = sorted(set(expected) - set(tensors)), sorted(set(tensors) - set(expected))
    if missing or unexpected:
        raise ValueError(f"{path}: adapter tensors do not match the model (missing {missing[:5]}, unexpected "
                         f"{unexpected[:5]}); was it trained with the same backbone and MoSE config?")
    for name, t in tensors.items():
        if tuple(t.shape) != tuple(expected[name].shape):
            raise ValueError(f"{path}: {name} has shape {tuple(t.shape)}, the model expects "
                             f"{tuple(expected[name].shape)}")
    model.load_state_dict(tensors, strict=False)


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

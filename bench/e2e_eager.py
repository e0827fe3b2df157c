"""The "MoSEAR eager" variant: the same model, its two ops run the way a research codebase does.

``eager_ops()`` is a bench-only context manager: inside it, ``mosear_fast.mose_lora`` and
``mosear_fast.ar_attention`` still validate their arguments, then call the functions below instead
of the backend that ``mosear_fast.backend`` would pick. Nothing else of the model changes (routers,
dynamic weights, modality context, attention plumbing), so the fused and eager variants differ only
in how the two ops are computed. It swaps the ``implementation`` lookup that ``mosear_fast.ops``
calls at run time and restores it on exit; no user-visible behaviour of ``mosear_fast`` changes.

- MoSE: ``tests.baselines.mose_naive_group_loop``, the PEFT-style loop over (modality, expert)
  groups (index_select, both matmuls, index_add; the shrink recomputed for every expert).
- AR: ``tests.baselines.ar_eager_materialised`` (full (Lq, Lk) probabilities, masses by a one-hot
  matmul, rescaled probabilities, then P @ V), with the query mask, static modality bias and masses
  output that a model's attention call passes.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable

from tests.baselines import ar_eager_materialised, mose_naive_group_loop


def mose_eager(x, modality, expert, gate, A, B, scale, out=None, *, inplace=False, **_options):
    """``mose_lora``'s backend signature around ``mose_naive_group_loop``."""
    y = mose_naive_group_loop(x, modality, expert, gate, A, B, scale, out)
    if inplace and out is not None:
        out.copy_(y)
        return out
    return y


EAGER_IMPLEMENTATIONS: dict[str, Callable] = {"mose_lora": mose_eager, "ar_attention": ar_eager_materialised}


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

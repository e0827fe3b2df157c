"""The demo's model configuration, one set of values for ``mosear-demo`` (which trains the model,
``mosear_fast.training.demo``) and ``mosear-export demo`` (which exports it, ``mosear_fast.export``).

The backbone is the built-in audio-visual LM (``mosear_fast.av_model.build_demo_model``) with
``backbone_sizes()``; MoSE on q/v (``mose_config()``) and AR (``ar_config()``) as below.
"""

from __future__ import annotations

SEED = 0
N_VISUAL = 32  # visual tokens per prompt
HIDDEN = 64  # hidden size; the MLP is 2x that
MOSE_RANK = 8
MOSE_EXPERTS = 4
MOSE_TARGETS = ("q_proj", "v_proj")
AR_STRENGTH = 0.5


def backbone_sizes(n_visual: int = N_VISUAL, hidden: int = HIDDEN) -> dict[str, int]:
    """``AVSizes`` fields of the demo's backbone (the other fields keep their defaults)."""
    return {"n_visual": n_visual, "hidden": hidden, "intermediate": 2 * hidden}


def mose_config(rank: int = MOSE_RANK, experts: int = MOSE_EXPERTS, targets=MOSE_TARGETS, **overrides):
    """The demo's ``MoSEConfig`` (other fields at their defaults; ``overrides`` for e.g. ``init_weights``)."""
    from .mose_config import MoSEConfig

    return MoSEConfig(r=rank, num_experts=experts, target_modules=list(targets), **overrides)


def ar_config(strength: float = AR_STRENGTH):
    """The demo's ``ARConfig`` for inference."""
    from .ar_config import ARConfig

    return ARConfig(strength=strength)

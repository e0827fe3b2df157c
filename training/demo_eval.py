"""CA-MER evaluation of the audio-visual LM: accuracy per subset, conflict gap, attention shares.

One forward per subset (the prompts share one layout), so AR's mean attention shares are the
subset's own. Predictions are the argmax over the emotion tokens at the answer position.
"""

from __future__ import annotations

import torch

from .av_batches import AVCollator
from .camer import SUBSETS, CamerAccumulator
from .labels import EMOTIONS

EVAL_BATCH = 256


@torch.no_grad()
def evaluate_camer(model, dataset, indices, *, modalities=("text", "visual", "audio")) -> dict:
    """The ``CamerAccumulator`` report of ``model`` on ``dataset[indices]``; ``attention_share`` per
    subset holds the shares the model actually used (after reallocation when it runs AR)."""
    from mosear_fast import attention_shares

    model.eval()
    collate = AVCollator(with_answers=False)
    context = getattr(model.llm, "_mosear_context", None)
    has_ar = context is not None and context.ar is not None
    acc = CamerAccumulator()
    for subset in SUBSETS:
        members = [i for i in indices if dataset.subsets[i] == subset]
        for start in range(0, len(members), EVAL_BATCH):
            items = [dataset[i] for i in members[start:start + EVAL_BATCH]]
            out = model(**collate(items))
            predicted = model.class_logits(out.logits).argmax(-1).tolist()
            shares = None
            if has_ar:
                per_layer = attention_shares(model.llm, reallocated=True)
                mean = torch.stack(list(per_layer.values())).mean(0)
                shares = {name: float(mean[m]) for m, name in enumerate(modalities)}
            for item, p in zip(items, predicted, strict=True):
                acc.add(subset, {EMOTIONS[p]}, {EMOTIONS[item["label"]]}, attention=shares)
    return acc.result()

"""CA-MER evaluation of the audio-visual LM: accuracy per subset, conflict gap, attention shares.

One forward per subset batch (the prompts share one layout), so AR's mean attention shares are the
subset's own. Predictions are the argmax over the emotion tokens at the answer position. An
``EvalSet`` collates its prompts once: the demo evaluates the same validation split dozens of
times (every AR option and strength, every epoch of every fit).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .av_batches import AVCollator
from .camer import SUBSETS, CamerAccumulator
from .labels import EMOTIONS

EVAL_BATCH = 256


class EvalSet:
    """The samples ``indices`` of ``dataset`` as collated prompt batches per CA-MER subset."""

    def __init__(self, dataset, indices: Sequence[int], *, batch_size: int = EVAL_BATCH):
        collate = AVCollator(with_answers=False)
        self.dataset, self.indices = dataset, list(indices)
        self.batches: list[tuple[str, dict, list[int]]] = []  # (subset, model inputs, truth labels)
        for subset in SUBSETS:
            members = [i for i in self.indices if dataset.subsets[i] == subset]
            for start in range(0, len(members), batch_size):
                items = [dataset[i] for i in members[start:start + batch_size]]
                self.batches.append((subset, collate(items), [item["label"] for item in items]))

    def __len__(self) -> int:
        return len(self.indices)

    def subset_batches(self, subset: str) -> list[dict]:
        """The model inputs of one subset's batches (e.g. consistent samples for AR calibration)."""
        return [inputs for s, inputs, _ in self.batches if s == subset]

    def score(self, predicted: torch.Tensor) -> dict:
        """The ``CamerAccumulator`` report of predictions (N,) given in this set's batch order."""
        acc, start = CamerAccumulator(), 0
        for subset, _, labels in self.batches:
            for p, truth in zip(predicted[start:start + len(labels)].tolist(), labels, strict=True):
                acc.add(subset, {EMOTIONS[p]}, {EMOTIONS[truth]})
            start += len(labels)
        return acc.result()

    def ordered(self, values: torch.Tensor) -> torch.Tensor:
        """Per-sample ``values`` indexed like ``dataset`` rearranged into this set's batch order."""
        order = [i for subset in SUBSETS for i in self.indices if self.dataset.subsets[i] == subset]
        return values[order]


@torch.no_grad()
def evaluate_camer(model, evalset: EvalSet, *, modalities=("text", "visual", "audio")) -> dict:
    """The ``CamerAccumulator`` report of ``model`` on ``evalset``; ``attention_share`` per subset holds
    the shares the model actually used (after reallocation) when it runs AR and records them."""
    from mosear_fast import attention_shares

    model.eval()
    context = getattr(model.llm, "_mosear_context", None)
    record = context is not None and context.ar is not None and context.ar["record_shares"]
    acc = CamerAccumulator()
    for subset, inputs, labels in evalset.batches:
        predicted = model.class_logits(model(**inputs).logits).argmax(-1).tolist()
        shares = None
        if record:
            mean = torch.stack(list(attention_shares(model.llm, reallocated=True).values())).mean(0)
            shares = {name: float(mean[m]) for m, name in enumerate(modalities)}
        for p, truth in zip(predicted, labels, strict=True):
            acc.add(subset, {EMOTIONS[p]}, {EMOTIONS[truth]}, attention=shares)
    return acc.result()


def evaluate_bayes(evalset: EvalSet, proportions: dict[str, float]) -> dict:
    """The report of the Bayes-optimal classifier (``synthetic.bayes_optimal_predictions``) on ``evalset``,
    with the subset prior ``proportions`` (the split's own)."""
    from .synthetic import bayes_optimal_predictions

    return evalset.score(evalset.ordered(bayes_optimal_predictions(evalset.dataset, proportions)))


__all__ = ["EVAL_BATCH", "EvalSet", "evaluate_bayes", "evaluate_camer"]

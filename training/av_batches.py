"""Data-set items -> keyword arguments of the built-in audio-visual LM (``mosear_fast.av_model``).

Items are those of ``ManifestDataset`` and ``SyntheticCamer``: ``{"inputs": {"visual": (Nv, dv),
"audio": (Na, da), ...}, "label": class index, ...}``. The prompt is the model's fixed template with
one placeholder per feature token; the answer (the multimodal truth ``label``) is the only target.
Text features, when a sample has them, are not used: the prompt's text is the template's tokens.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch.utils.data import Dataset


class AVCollator:
    """``collate(items) -> {input_ids, visual, audio, attention_mask, modality_ids, labels}``;
    ``with_answers=False`` gives prompts only (for evaluation)."""

    def __init__(self, with_answers: bool = True):
        self.with_answers = with_answers

    def __call__(self, items: Sequence[dict]) -> dict[str, torch.Tensor]:
        from mosear_fast.av_model import build_prompts

        for item in items:
            missing = [m for m in ("visual", "audio") if m not in item["inputs"]]
            if missing:
                raise ValueError(f"sample {item.get('id')!r}: has no {missing} features; the audio-visual model "
                                 "needs visual and audio (tokens, dim) tensors")
        answers = [item["label"] for item in items] if self.with_answers else None
        return build_prompts([item["inputs"]["visual"].float() for item in items],
                             [item["inputs"]["audio"].float() for item in items], answers)


class Subset(Dataset):
    """Items ``indices`` of ``dataset`` (a thin, picklable view for DataLoader workers)."""

    def __init__(self, dataset, indices: Sequence[int]):
        self.dataset, self.indices = dataset, [int(i) for i in indices]

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> dict:
        return self.dataset[self.indices[i]]

    @property
    def subsets(self) -> list:
        return [self.dataset[i].get("subset") for i in self.indices] if not hasattr(self.dataset, "subsets") \
            else [self.dataset.subsets[i] for i in self.indices]


def pick_by_subset(subsets: Sequence[str | None], counts: dict[str, int], *, taken: set[int]) -> list[int]:
    """The first ``counts[s]`` indices of each subset ``s`` not yet in ``taken`` (which grows), in
    index order; ValueError when a subset has too few samples left."""
    chosen = []
    for subset, n in counts.items():
        free = [i for i, s in enumerate(subsets) if s == subset and i not in taken][:n]
        if len(free) < n:
            raise ValueError(f"counts[{subset!r}]: asked for {n} samples, only {len(free)} are left")
        taken.update(free)
        chosen.extend(free)
    return sorted(chosen)

"""A deterministic synthetic CA-MER: audio-visual samples whose token imbalance invites audio bias.

Why it looks like this. In Emotion-LLaMA-style prompts the video arrives as many tokens (256
patches and more) and the audio as one or two pooled tokens. Here each visual token carries only a
weak, noisy trace of the video label, so the video emotion is recoverable only by pooling many of
them; each audio token carries a strong trace of the audio label, so a model can read the audio
emotion from one token. A learner that takes the easy path follows audio, which is right on the
audio-aligned and consistent subsets and wrong on the video-aligned one: the conflict gap the
paper measures. MoSE and AR have to close it.

Generation (all draws from one ``torch.Generator`` seeded with ``config.seed``, so the same
config gives identical tensors):

- a unit prototype vector per emotion class and modality (``visual_dim`` / ``audio_dim``);
- subsets in the requested proportions (exact counts by largest remainder, then shuffled):
  video-aligned (truth = video label != audio label), audio-aligned (truth = audio label != video
  label), consistent (all equal), all-different (three distinct labels; the protocol excludes them);
- visual token = ``visual_signal`` * prototype(video label) + ``noise`` * N(0, I), ``n_visual_tokens``
  of them;
- audio token = ``audio_signal`` * prototype(audio label) + ``noise`` * N(0, I), ``n_audio_tokens`` of them;
- optional text tokens: ``noise`` * N(0, I), no emotion signal (stand-ins for the prompt).

Along the prototype direction a single visual token has signal-to-noise ``visual_signal / noise``
(0.4 by default, barely above chance over 9 classes); the mean of 32 has ``0.4 * sqrt(32) ~ 2.3``;
an audio token has 3.0.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch.utils.data import Dataset

from .camer import AUDIO_ALIGNED, CONSISTENT, VIDEO_ALIGNED
from .data import ManifestWriter
from .labels import EMOTIONS

ALL_DIFFERENT = "all_different"
GENERATED_SUBSETS: tuple[str, ...] = (VIDEO_ALIGNED, AUDIO_ALIGNED, CONSISTENT, ALL_DIFFERENT)


def _default_proportions() -> dict[str, float]:
    return {VIDEO_ALIGNED: 1.0, AUDIO_ALIGNED: 1.0, CONSISTENT: 1.0, ALL_DIFFERENT: 0.0}


@dataclass(frozen=True)
class SyntheticCamerConfig:
    """What :func:`generate_camer` draws. ``proportions``: subset name -> weight (normalised;
    names from :data:`GENERATED_SUBSETS`, missing names weigh 0)."""

    n_samples: int = 600
    proportions: dict[str, float] = field(default_factory=_default_proportions)
    n_visual_tokens: int = 32
    n_audio_tokens: int = 1
    n_text_tokens: int = 0
    visual_dim: int = 64
    audio_dim: int = 64
    text_dim: int = 64
    visual_signal: float = 0.4
    audio_signal: float = 3.0
    noise: float = 1.0
    seed: int = 0

    def __post_init__(self):
        for name in ("n_samples", "n_visual_tokens", "n_audio_tokens", "visual_dim", "audio_dim", "text_dim"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name}: expected an integer >= 1, got {value!r}")
        if not isinstance(self.n_text_tokens, int) or self.n_text_tokens < 0:
            raise ValueError(f"n_text_tokens: expected an integer >= 0, got {self.n_text_tokens!r}")
        for name in ("visual_signal", "audio_signal", "noise"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
                raise ValueError(f"{name}: expected a finite number >= 0, got {value!r}")
        if not isinstance(self.proportions, dict) or set(self.proportions) - set(GENERATED_SUBSETS):
            raise ValueError(
                f"proportions: expected a dict with keys from {GENERATED_SUBSETS}, got {self.proportions!r}"
            )
        weights = list(self.proportions.values())
        if (
            any(not isinstance(w, (int, float)) or not math.isfinite(w) or w < 0 for w in weights)
            or sum(weights) <= 0
        ):
            raise ValueError(
                f"proportions: expected finite weights >= 0 with a positive sum, got {self.proportions!r}"
            )

    def subset_counts(self) -> dict[str, int]:
        """Exact sample count per subset: proportional, rounded by largest remainder (sums to n_samples)."""
        total = sum(self.proportions.values())
        exact = {s: self.n_samples * self.proportions.get(s, 0.0) / total for s in GENERATED_SUBSETS}
        counts = {s: math.floor(v) for s, v in exact.items()}
        # Ties go to the earlier subset in GENERATED_SUBSETS, so the rounding is deterministic.
        by_remainder = sorted(GENERATED_SUBSETS, key=lambda s: -(exact[s] - counts[s]))
        for s in by_remainder[: self.n_samples - sum(counts.values())]:
            counts[s] += 1
        return counts


class SyntheticCamer(Dataset):
    """Generated samples in memory; items have the same form as ``ManifestDataset`` items.

    Tensors: ``visual (N, Tv, dv)``, ``audio (N, Ta, da)``, ``text (N, Tt, dt)`` or None;
    ``label``, ``audio_label``, ``video_label`` ``(N,)`` class indices into ``EMOTIONS``;
    ``subsets``: the generated subset of each sample (``all_different`` included).
    """

    def __init__(
        self, config, ids, subsets, label, audio_label, video_label, visual, audio, text, prototypes
    ):
        self.config, self.ids, self.subsets = config, ids, subsets
        self.label, self.audio_label, self.video_label = label, audio_label, video_label
        self.visual, self.audio, self.text = visual, audio, text
        self.prototypes = prototypes  # {"visual": (C, dv), "audio": (C, da)}

    def __len__(self) -> int:
        return len(self.ids)

    def inputs(self, index: int) -> dict[str, torch.Tensor]:
        out = {} if self.text is None else {"text": self.text[index]}
        return {**out, "visual": self.visual[index], "audio": self.audio[index]}

    def __getitem__(self, index: int) -> dict:
        return {
            "id": self.ids[index],
            "inputs": self.inputs(index),
            "label": int(self.label[index]),
            "audio_label": int(self.audio_label[index]),
            "video_label": int(self.video_label[index]),
            "subset": self.subsets[index],
        }

    def label_rows(self) -> list[dict]:
        """Rows of a ``mosear-eval`` label file: id and the three labels as names."""
        return [
            {
                "id": self.ids[i],
                "label": EMOTIONS[self.label[i]],
                "audio_label": EMOTIONS[self.audio_label[i]],
                "video_label": EMOTIONS[self.video_label[i]],
            }
            for i in range(len(self))
        ]

    def write(self, root: str | os.PathLike) -> Path:
        """Write the manifest + safetensors format (see ``data``) under ``root``; returns the manifest."""
        with ManifestWriter(root) as writer:
            for i, row in enumerate(self.label_rows()):
                writer.add(row.pop("id"), self.inputs(i), subset=self.subsets[i], **row)
        return writer.manifest_path


def _unit_prototypes(n_classes: int, dim: int, g: torch.Generator) -> torch.Tensor:
    p = torch.randn(n_classes, dim, generator=g)
    return p / p.norm(dim=1, keepdim=True)


def generate_camer(config: SyntheticCamerConfig | None = None, **overrides) -> SyntheticCamer:
    """Draw a synthetic CA-MER data set; ``overrides`` replace config fields (e.g. ``seed=3``)."""
    if config is None:
        config = SyntheticCamerConfig(**overrides)
    elif overrides:
        config = SyntheticCamerConfig(**{**config.__dict__, **overrides})
    if not isinstance(config, SyntheticCamerConfig):
        raise TypeError(f"config: expected a SyntheticCamerConfig, got {type(config).__name__}")
    c, n = config, config.n_samples
    n_classes = len(EMOTIONS)
    g = torch.Generator().manual_seed(c.seed)
    prototypes = {
        "visual": _unit_prototypes(n_classes, c.visual_dim, g),
        "audio": _unit_prototypes(n_classes, c.audio_dim, g),
    }

    counts = c.subset_counts()
    subset_code = torch.cat([torch.full((counts[s],), k) for k, s in enumerate(GENERATED_SUBSETS)])
    subset_code = subset_code[torch.randperm(n, generator=g)]

    truth = torch.randint(0, n_classes, (n,), generator=g)
    # Offsets in [1, C) give a label different from the truth, uniform over the others; the
    # second offset skips the first so all-different samples get three distinct labels.
    off1 = torch.randint(1, n_classes, (n,), generator=g)
    off2 = torch.randint(1, n_classes - 1, (n,), generator=g)
    off2 = off2 + (off2 >= off1).long()
    other1, other2 = (truth + off1) % n_classes, (truth + off2) % n_classes
    code = {s: subset_code == k for k, s in enumerate(GENERATED_SUBSETS)}
    audio_label = torch.where(code[VIDEO_ALIGNED] | code[ALL_DIFFERENT], other1, truth)
    video_label = torch.where(code[AUDIO_ALIGNED], other1, torch.where(code[ALL_DIFFERENT], other2, truth))

    visual = c.visual_signal * prototypes["visual"][video_label][:, None, :] + c.noise * torch.randn(
        n, c.n_visual_tokens, c.visual_dim, generator=g
    )
    audio = c.audio_signal * prototypes["audio"][audio_label][:, None, :] + c.noise * torch.randn(
        n, c.n_audio_tokens, c.audio_dim, generator=g
    )
    text = c.noise * torch.randn(n, c.n_text_tokens, c.text_dim, generator=g) if c.n_text_tokens else None

    ids = [f"syn-{i:06d}" for i in range(n)]
    subsets = [GENERATED_SUBSETS[k] for k in subset_code.tolist()]
    return SyntheticCamer(c, ids, subsets, truth, audio_label, video_label, visual, audio, text, prototypes)

"""A deterministic synthetic CA-MER: audio-visual samples whose token imbalance invites audio bias.

Why it looks like this. In Emotion-LLaMA-style prompts the video arrives as many tokens (256
patches and more) and the audio as one or two pooled tokens. Here each visual token carries only a
weak, noisy trace of the video label, so the video emotion is recoverable only by pooling many of
them; each audio token carries a strong trace of the audio label, so a model can read the audio
emotion from one token. A learner that takes the easy path follows audio, which is right on the
audio-aligned and consistent subsets and wrong on the video-aligned one: the conflict gap the
paper measures. MoSE and AR have to close it.

The generative story (all draws from one ``torch.Generator`` seeded with ``config.seed``, so the
same config gives identical tensors):

1. a unit prototype vector ``mu_v[c]`` / ``mu_a[c]`` per emotion class c and modality;
2. the subset of each sample, in the requested proportions (exact counts by largest remainder, then
   shuffled); the truth ``y`` uniform over the C = 9 classes;
3. the modality labels: consistent ``v = a = y``; video-aligned ``v = y``, ``a`` uniform over the
   other classes; audio-aligned ``a = y``, ``v`` uniform over the others; all-different (excluded by
   the protocol) ``v`` and ``a`` two distinct other classes;
4. amplitudes: a modality whose label is the truth shows it at full strength (``visual_signal``,
   ``audio_signal``); a *misleading* one (its label differs from the truth) at ``distractor_scale``
   times that. With ``distractor_scale = 1`` (the default) nothing in one sample tells a conflict's
   true modality from the misleading one, so for any model VA + AA accuracy is at most about 100:
   balancing can only trade one subset for the other. Below 1, the true modality is the more
   evident one, and a model that weighs both can win on every subset;
5. features: visual token ``t`` = ``amp_v * mu_v[v] + noise * N(0, I)``, ``n_visual_tokens`` of
   them; audio token = ``amp_a * mu_a[a] + noise * N(0, I)``, ``n_audio_tokens`` of them; optional
   text tokens ``noise * N(0, I)``, no emotion signal (stand-ins for the prompt).

Along the prototype direction a single visual token has signal-to-noise ``visual_signal / noise``
(0.4 by default, barely above chance over 9 classes); the mean of 32 has ``0.4 * sqrt(32) ~ 2.3``;
an audio token has 3.0.

:func:`class_log_posterior` inverts this story exactly (the generator's own likelihoods), and
:func:`bayes_optimal_predictions` is the Bayes-optimal classifier: on data drawn this way no model
has a higher expected accuracy under the same subset proportions.
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
    """What :func:`generate_camer` draws (the story in the module docstring). ``proportions``: subset
    name -> weight (normalised; names from :data:`GENERATED_SUBSETS`, missing names weigh 0);
    ``distractor_scale``: the amplitude of a misleading modality relative to its full signal."""

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
    distractor_scale: float = 1.0
    seed: int = 0

    def __post_init__(self):
        for name in ("n_samples", "n_visual_tokens", "n_audio_tokens", "visual_dim", "audio_dim", "text_dim"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name}: expected an integer >= 1, got {value!r}")
        if not isinstance(self.n_text_tokens, int) or self.n_text_tokens < 0:
            raise ValueError(f"n_text_tokens: expected an integer >= 0, got {self.n_text_tokens!r}")
        for name in ("visual_signal", "audio_signal", "noise", "distractor_scale"):
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


def _amplitude(signal: float, distractor_scale: float, misleading: torch.Tensor) -> torch.Tensor:
    """(N, 1, 1) float32 amplitude per sample: ``signal``, times ``distractor_scale`` where misleading
    (a float32 multiply by exactly 1.0 elsewhere, so ``distractor_scale = 1`` reproduces the old data)."""
    scale = torch.where(misleading, torch.tensor(float(distractor_scale)), torch.tensor(1.0))
    return (torch.tensor(float(signal)) * scale)[:, None, None]


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

    amp_v = _amplitude(c.visual_signal, c.distractor_scale, video_label != truth)  # [N, 1, 1]
    amp_a = _amplitude(c.audio_signal, c.distractor_scale, audio_label != truth)
    visual = amp_v * prototypes["visual"][video_label][:, None, :] + c.noise * torch.randn(
        n, c.n_visual_tokens, c.visual_dim, generator=g
    )
    audio = amp_a * prototypes["audio"][audio_label][:, None, :] + c.noise * torch.randn(
        n, c.n_audio_tokens, c.audio_dim, generator=g
    )
    text = c.noise * torch.randn(n, c.n_text_tokens, c.text_dim, generator=g) if c.n_text_tokens else None

    ids = [f"syn-{i:06d}" for i in range(n)]
    subsets = [GENERATED_SUBSETS[k] for k in subset_code.tolist()]
    return SyntheticCamer(c, ids, subsets, truth, audio_label, video_label, visual, audio, text, prototypes)


# ------------------------------------------------------------------ the Bayes-optimal reference


def _log_likelihoods(token_sum: torch.Tensor, n_tokens: int, prototypes: torch.Tensor, amplitude: float,
                     noise: float) -> torch.Tensor:
    """(N, C) log p(tokens | class c shown at ``amplitude``), up to a term that depends on neither c nor
    the amplitude: ``n_tokens`` independent tokens ``amplitude * mu_c + noise * N(0, I)`` whose sum is
    ``token_sum (N, d)``."""
    mu = prototypes.double()  # [C, d]
    return (amplitude * (token_sum @ mu.T) - 0.5 * n_tokens * amplitude ** 2 * (mu * mu).sum(1)) / noise ** 2


def _logsumexp_other(values: torch.Tensor) -> torch.Tensor:
    """(N, C): for each class y, logsumexp of ``values (N, C)`` over the classes c != y."""
    n_classes = values.shape[1]
    off_diagonal = ~torch.eye(n_classes, dtype=torch.bool)
    return values[:, None, :].expand(-1, n_classes, -1).masked_fill(~off_diagonal, -math.inf).logsumexp(-1)


def class_log_posterior(dataset: SyntheticCamer, proportions: dict[str, float] | None = None) -> torch.Tensor:
    """(N, C) float64 log p(truth = c | visual, audio) of every sample under the generative story (module
    docstring), with the subset prior ``proportions`` (default: the data set's own; e.g. a balanced
    test split passes ``{"video_aligned": 1, "audio_aligned": 1, "consistent": 1}``). The truth is
    uniform; the hidden subset and the hidden modality labels are summed out."""
    c = dataset.config
    if c.noise <= 0:
        raise ValueError(f"dataset: the posterior needs noise > 0, got noise={c.noise}")
    prior = dict(c.proportions if proportions is None else proportions)
    if not prior or set(prior) - set(GENERATED_SUBSETS) or any(w < 0 for w in prior.values()) \
            or sum(prior.values()) <= 0:
        raise ValueError(f"proportions: expected weights >= 0 over {GENERATED_SUBSETS} with a positive sum, "
                         f"got {proportions!r}")
    total = sum(prior.values())
    log_prior = {s: math.log(prior[s] / total) if prior.get(s, 0) > 0 else -math.inf for s in GENERATED_SUBSETS}
    n_classes = len(EMOTIONS)
    ds = c.distractor_scale
    sums = {"visual": dataset.visual.sum(1).double(), "audio": dataset.audio.sum(1).double()}  # [N, d] each

    def log_lik(modality, amplitude):
        return _log_likelihoods(sums[modality], getattr(dataset, modality).shape[1], dataset.prototypes[modality],
                                amplitude, c.noise)

    lv, la = log_lik("visual", c.visual_signal), log_lik("audio", c.audio_signal)  # shown as the truth
    lv_d, la_d = log_lik("visual", ds * c.visual_signal), log_lik("audio", ds * c.audio_signal)  # misleading
    log_other = math.log(n_classes - 1)
    per_subset = [
        log_prior[VIDEO_ALIGNED] + lv + _logsumexp_other(la_d) - log_other,
        log_prior[AUDIO_ALIGNED] + la + _logsumexp_other(lv_d) - log_other,
        log_prior[CONSISTENT] + lv + la,
    ]
    if log_prior[ALL_DIFFERENT] > -math.inf:  # v != y, a != y, a != v, uniform over the (C-1)(C-2) pairs
        y, v, a = torch.meshgrid(*(torch.arange(n_classes),) * 3, indexing="ij")
        allowed = (v != y) & (a != y) & (a != v)  # [C(y), C(v), C(a)]
        pairs = lv_d[:, None, :, None] + la_d[:, None, None, :]  # [N, 1, C(v), C(a)]
        per_subset.append(log_prior[ALL_DIFFERENT] - math.log((n_classes - 1) * (n_classes - 2))
                          + pairs.masked_fill(~allowed, -math.inf).flatten(2).logsumexp(-1))
    per_subset = torch.stack(per_subset)  # [subsets, N, C]
    joint = per_subset.logsumexp(0)
    return joint - joint.logsumexp(-1, keepdim=True)


def bayes_optimal_predictions(dataset: SyntheticCamer, proportions: dict[str, float] | None = None) -> torch.Tensor:
    """(N,) the most probable truth of every sample (``class_log_posterior``'s argmax): the classifier
    with the highest expected accuracy on data drawn with these subset proportions."""
    return class_log_posterior(dataset, proportions).argmax(-1)

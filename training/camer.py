"""The CA-MER protocol (DESIGN 2.3): conflict subsets and label-set metrics.

Each sample has three labels: ``audio`` (q_a), ``video`` (q_v) and the multimodal truth ``label``
(q_av). A label may be a single name or a set of names (open-vocabulary truth); equality compares
sets.

- video-aligned: q_v == q_av != q_a   (the truth follows the video; audio misleads)
- audio-aligned: q_a == q_av != q_v   (the truth follows the audio; video misleads)
- consistent:    q_a == q_v == q_av
- anything else (all three different, or q_a == q_v != q_av) is excluded from every subset.

Per sample, with P the predicted label set and G the truth set: accuracy = |P ∩ G| / |P| and
recall = |P ∩ G| / |G|. A sample with no prediction (missing or unparsable) scores 0 on both: a
model must not gain by failing to answer. Per subset: the means over its samples and their mean
("mean"). The conflict gap is audio-aligned minus video-aligned accuracy: positive means the
model follows audio when the two disagree. Where a model reports attention shares per modality,
their mean per subset is reported too. An empty subset has n = 0 and null metrics.
"""

from __future__ import annotations

import math
from collections.abc import Collection, Mapping

VIDEO_ALIGNED = "video_aligned"
AUDIO_ALIGNED = "audio_aligned"
CONSISTENT = "consistent"
SUBSETS: tuple[str, ...] = (VIDEO_ALIGNED, AUDIO_ALIGNED, CONSISTENT)


def _as_set(value, name: str) -> frozenset:
    if isinstance(value, str):
        return frozenset((value,))
    if isinstance(value, Collection) and value:
        return frozenset(value)
    raise TypeError(f"{name}: expected a label or a non-empty collection of labels, got {value!r}")


def assign_subset(audio_label, video_label, label) -> str | None:
    """The CA-MER subset of a sample, or None when the protocol excludes it.

    Labels are names (or collections of names, compared as sets) already normalised by the caller
    (see :func:`mosear_fast.training.labels.normalize_label`).
    """
    a, v, av = (
        _as_set(audio_label, "audio_label"),
        _as_set(video_label, "video_label"),
        _as_set(label, "label"),
    )
    if a == v == av:
        return CONSISTENT
    if v == av:  # and a != av, since not all equal
        return VIDEO_ALIGNED
    if a == av:
        return AUDIO_ALIGNED
    return None


def score_label_sets(predicted: Collection, truth: Collection) -> tuple[float, float]:
    """(accuracy, recall) of one sample: |P ∩ G| / |P| and |P ∩ G| / |G|; (0, 0) for an empty P."""
    p, g = frozenset(predicted), frozenset(truth)
    if not g:
        raise ValueError("truth: expected a non-empty label set")
    if not p:
        return 0.0, 0.0
    hits = len(p & g)
    return hits / len(p), hits / len(g)


class CamerAccumulator:
    """Streams scored samples into per-subset sums; :meth:`result` gives the report fields.

    Usable inside a training loop's evaluation as well as by ``mosear-eval``.
    """

    def __init__(self):
        self._n = dict.fromkeys(SUBSETS, 0)
        self._acc = dict.fromkeys(SUBSETS, 0.0)
        self._rec = dict.fromkeys(SUBSETS, 0.0)
        self._att_sum: dict[str, dict[str, float]] = {s: {} for s in SUBSETS}
        self._att_n: dict[str, dict[str, int]] = {s: {} for s in SUBSETS}
        self.excluded = 0

    def add(
        self,
        subset: str | None,
        predicted: Collection,
        truth: Collection,
        attention: Mapping[str, float] | None = None,
    ) -> None:
        """Add one sample; ``subset=None`` counts it as excluded (its scores are not used)."""
        if subset is None:
            self.excluded += 1
            return
        if subset not in SUBSETS:
            raise ValueError(f"subset: expected one of {SUBSETS} or None, got {subset!r}")
        acc, rec = score_label_sets(predicted, truth)
        self._n[subset] += 1
        self._acc[subset] += acc
        self._rec[subset] += rec
        if attention:
            for modality, share in check_attention(attention).items():
                self._att_sum[subset][modality] = self._att_sum[subset].get(modality, 0.0) + share
                self._att_n[subset][modality] = self._att_n[subset].get(modality, 0) + 1

    def subset_metrics(self, subset: str) -> dict:
        """``{"n", "accuracy", "recall", "mean"}``; metrics are None for an empty subset."""
        n = self._n[subset]
        if n == 0:
            return {"n": 0, "accuracy": None, "recall": None, "mean": None}
        acc, rec = self._acc[subset] / n, self._rec[subset] / n
        return {"n": n, "accuracy": acc, "recall": rec, "mean": (acc + rec) / 2}

    def result(self) -> dict:
        """The protocol's numbers: subsets, conflict_gap, excluded and (when any) attention_share."""
        subsets = {s: self.subset_metrics(s) for s in SUBSETS}
        audio_acc, video_acc = subsets[AUDIO_ALIGNED]["accuracy"], subsets[VIDEO_ALIGNED]["accuracy"]
        gap = None if audio_acc is None or video_acc is None else audio_acc - video_acc
        out = {"subsets": subsets, "conflict_gap": gap, "excluded": self.excluded}
        if any(self._att_n[s] for s in SUBSETS):
            out["attention_share"] = {
                s: {m: self._att_sum[s][m] / self._att_n[s][m] for m in sorted(self._att_n[s])} or None
                for s in SUBSETS
            }
        return out


def check_attention(attention: Mapping[str, float]) -> dict[str, float]:
    """Validate attention shares: modality name -> number in [0, 1]; returns a float dict.

    A share is a fraction of one query's attention mass, so anything outside [0, 1] (a percentage,
    a raw score, 1e308) is an error naming the field, never averaged into the report.
    """
    if not isinstance(attention, Mapping):
        raise TypeError(
            f"attention: expected an object of modality name -> share, got {type(attention).__name__}"
        )
    out = {}
    for modality, share in attention.items():
        if not isinstance(modality, str):
            raise ValueError(f"attention: expected modality names (strings) as keys, got {modality!r}")
        is_number = isinstance(share, (int, float)) and not isinstance(share, bool)
        if not is_number or not math.isfinite(share) or not 0.0 <= share <= 1.0:
            raise ValueError(f"attention.{modality}: expected a share in [0, 1], got {share!r}")
        out[modality] = float(share)
    return out

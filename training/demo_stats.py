"""Seed statistics of the demo: per-seed metrics, means, 95% intervals and paired differences.

Every number is a percentage (accuracy) or percentage points (gap, differences). With n seeds the
95% interval of a mean is ``mean +- t(0.975, n - 1) * sd / sqrt(n)`` (Student t, sample standard
deviation): with 3 seeds t = 4.30, so the intervals are wide, as they should be. A difference
against the baseline is paired: computed within each seed (same data, same backbone), then
averaged, which removes the seed-to-seed spread that both share.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

from .camer import AUDIO_ALIGNED, CONSISTENT, VIDEO_ALIGNED

METRICS = (VIDEO_ALIGNED, AUDIO_ALIGNED, CONSISTENT, "gap", "mean3")

# Student t quantiles t(0.975, df) for df = 1..30; beyond, the normal 1.96 is within 2 %.
_T975 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145,
         2.131, 2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048,
         2.045, 2.042)


def t975(df: int) -> float:
    """The 0.975 quantile of Student's t with ``df`` >= 1 degrees of freedom."""
    if df < 1:
        raise ValueError(f"df: expected >= 1 degrees of freedom, got {df}")
    return _T975[df - 1] if df <= len(_T975) else 1.96


def camer_metrics(report: Mapping) -> dict[str, float]:
    """VA, AA and C accuracy (%), gap (AA - VA, points) and mean3 (mean of the three) of a
    ``CamerAccumulator`` report."""
    acc = {s: 100.0 * report["subsets"][s]["accuracy"] for s in (VIDEO_ALIGNED, AUDIO_ALIGNED, CONSISTENT)}
    return {**acc, "gap": acc[AUDIO_ALIGNED] - acc[VIDEO_ALIGNED], "mean3": sum(acc.values()) / 3}


def interval(values: Sequence[float]) -> dict:
    """``{"mean", "ci95": [low, high]}``; ``ci95`` only with two or more values."""
    values = [float(v) for v in values]
    if not values:
        raise ValueError("values: expected at least one value")
    mean = sum(values) / len(values)
    out = {"mean": mean}
    if len(values) > 1:
        sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))
        half = t975(len(values) - 1) * sd / math.sqrt(len(values))
        out["ci95"] = [mean - half, mean + half]
    return out


def summarize(per_seed: Sequence[Mapping[str, float]], baseline: Sequence[Mapping[str, float]] | None = None) -> dict:
    """Mean of every metric over seeds (top-level keys), ``ci95`` {metric: [low, high]} (seeds > 1),
    ``per_seed`` (the inputs) and, given the same seeds' ``baseline`` metrics, ``vs_baseline``
    {metric: {"mean", "ci95", "per_seed"}}: the paired per-seed differences."""
    if baseline is not None and len(baseline) != len(per_seed):
        raise ValueError(f"baseline: expected one entry per seed ({len(per_seed)}), got {len(baseline)}")
    out: dict = {}
    ci = {}
    for metric in METRICS:
        stats = interval([m[metric] for m in per_seed])
        out[metric] = stats["mean"]
        if "ci95" in stats:
            ci[metric] = stats["ci95"]
    if ci:
        out["ci95"] = ci
    out["per_seed"] = [dict(m) for m in per_seed]
    if baseline is not None:
        diffs = {}
        for metric in METRICS:
            d = [m[metric] - b[metric] for m, b in zip(per_seed, baseline, strict=True)]
            diffs[metric] = {**interval(d), "per_seed": d}
        out["vs_baseline"] = diffs
    return out


__all__ = ["METRICS", "camer_metrics", "interval", "summarize", "t975"]

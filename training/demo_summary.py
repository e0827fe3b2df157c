"""The demo's per-seed results folded into ``results.json``'s summary (means, intervals, choices).

- ``variants.<name>``: ``demo_stats.summarize`` of the test metrics over seeds (mean per metric,
  ``ci95`` with more than one seed, ``per_seed``, ``vs_baseline``: paired differences), plus the
  mean attention shares where the variant records them;
- ``references.<name>``: the same for ``bayes_optimal``, ``full_finetune`` and ``lora``;
- ``choices``: what validation chose in each seed;
- ``tradeoff``: the validation curves (mean over seeds) for the trade-off chart;
- ``per_seed``: everything each seed returned.
"""

from __future__ import annotations

from .demo_stats import METRICS, summarize


def _mean(values):
    return sum(values) / len(values)


def _mean_shares(entries):
    shares = [e["attention_share"] for e in entries if e["attention_share"]]
    if len(shares) != len(entries):
        return None
    return {m: _mean([s[m] for s in shares]) for m in shares[0]}


def _group(per_seed, key):
    names = list(per_seed[0][key])
    baseline = [s["variants"]["baseline"]["metrics"] for s in per_seed]
    out = {}
    for name in names:
        entries = [s[key][name] for s in per_seed]
        out[name] = {**summarize([e["metrics"] for e in entries], baseline), "attention_share": _mean_shares(entries)}
    return out


def _mean_curve(points_per_seed):
    """[strength][seed] metrics -> {metric: [mean over seeds per strength]}."""
    return {m: [_mean([seed[i][m] for seed in points_per_seed]) for i in range(len(points_per_seed[0]))]
            for m in METRICS}


def summarize_seeds(per_seed: list[dict]) -> dict:
    curves = {}
    for model in per_seed[0]["validation"]["ar_curves"]:
        curves[model] = {option: _mean_curve([s["validation"]["ar_curves"][model][option] for s in per_seed])
                         for option in per_seed[0]["validation"]["ar_curves"][model]}
    references = {name: {m: _mean([s["validation"]["references"][name][m] for s in per_seed]) for m in METRICS}
                  for name in per_seed[0]["validation"]["references"]}
    weights = {m: _mean([s["mose_modality_weights"][m] for s in per_seed])
               for m in per_seed[0]["mose_modality_weights"]}
    return {
        "variants": _group(per_seed, "variants"),
        "references": _group(per_seed, "references"),
        "choices": [{"seed": s["seed"], **s["choices"]} for s in per_seed],
        "tradeoff": {"split": "validation", "curves": curves, "references": references},
        "mose_modality_weights": weights,
        "per_seed": per_seed,
    }


__all__ = ["summarize_seeds"]

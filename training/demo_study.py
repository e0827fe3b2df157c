"""One seed of the demo's protocol: data, backbone, every choice on validation, one test evaluation.

1. One synthetic CA-MER draw (``settings.distractor_scale``: a misleading modality shows its emotion
   weaker than the true one), split into four disjoint parts: backbone training data where audio is
   the more reliable cue, a balanced fitting set, a balanced validation split and a balanced test
   split.
2. The backbone (all weights) learns the audio shortcut on the first part.
3. On validation: AR's option and strength on the backbone (``demo_ar``); MoSE's size (rank,
   experts) and epochs; AR on top of the chosen MoSE; the epochs of the references.
4. On test, once: baseline, + AR, + MoSE, + MoSE + AR with the validation choices, and the
   references: the Bayes-optimal classifier (the generator's own posterior), full fine-tuning and a
   plain LoRA with as many trainable parameters as MoSE, fitted on the same set.
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import torch

from .camer import AUDIO_ALIGNED, CONSISTENT, SUBSETS, VIDEO_ALIGNED
from .demo_stats import camer_metrics

VARIANTS = ("baseline", "+ AR", "+ MoSE", "+ MoSE + AR")
REFERENCES = ("bayes_optimal", "full_finetune", "lora")
BALANCED = {VIDEO_ALIGNED: 1.0, AUDIO_ALIGNED: 1.0, CONSISTENT: 1.0}


def build_splits(settings, seed: int):
    """(dataset, {part: indices}) for the parts backbone, fit, validation, test: disjoint, drawn at once."""
    from .av_batches import pick_by_subset
    from .synthetic import generate_camer

    parts = {"backbone": settings.backbone_counts, "fit": settings.fit_counts,
             "validation": settings.validation_counts, "test": settings.test_counts}
    need = {s: sum(c.get(s, 0) for c in parts.values()) for s in SUBSETS}
    data = generate_camer(n_samples=sum(need.values()), seed=seed, n_visual_tokens=settings.n_visual,
                          distractor_scale=settings.distractor_scale, proportions=need)
    taken: set[int] = set()
    return data, {name: pick_by_subset(data.subsets, counts, taken=taken) for name, counts in parts.items()}


def _modality_weights(model) -> dict[str, float]:
    from .adapter_state import mose_adapters

    weights = torch.stack([a.modality_weight.float().cpu() for a in mose_adapters(model)]).mean(0)
    return {name: round(float(weights[m]), 4) for m, name in enumerate(("text", "visual", "audio"))}


def _mean_shares(report: dict) -> dict | None:
    shares = [s for s in (report.get("attention_share") or {}).values() if s]
    return {m: sum(s[m] for s in shares) / len(shares) for m in shares[0]} if shares else None


def _test_entry(report: dict) -> dict:
    return {"metrics": camer_metrics(report), "attention_share": _mean_shares(report)}


def run_seed(settings, seed: int, out_dir: Path, *, keep_mose: bool, progress: bool, log) -> dict:
    """The protocol for one seed; ``keep_mose``: leave the chosen MoSE as ``out_dir/mose``."""
    from transformers import set_seed

    from mosear_fast import ARConfig
    from mosear_fast.atomic import atomic_write_json
    from mosear_fast.av_model import build_demo_model

    from . import demo_ar
    from .demo_eval import EvalSet, evaluate_bayes, evaluate_camer
    from .demo_fit import fit_full, fit_lora, fit_mose, lora_rank_for, train_backbone
    from .trained_folder import AR_CONFIG_FILE, ar_config_fields

    wall, cpu = time.perf_counter(), time.process_time()
    stages: dict[str, float] = {}  # CPU seconds per stage

    def stage(name: str, message: str) -> None:
        stages[name] = round(time.process_time() - cpu - sum(stages.values()), 1)
        log(f"[seed {seed}] {message} ({time.perf_counter() - wall:.0f} s, {time.process_time() - cpu:.0f} s CPU "
            "so far)")

    work = out_dir / ".work" / f"seed-{seed}"
    set_seed(seed)
    data, idx = build_splits(settings, seed)
    validation, test = EvalSet(data, idx["validation"]), EvalSet(data, idx["test"])
    consistent_fit = [i for i in idx["fit"] if data.subsets[i] == CONSISTENT][:settings.calibration_samples]
    calibration = EvalSet(data, consistent_fit).subset_batches(CONSISTENT)
    stage("data", f"data: {len(idx['backbone'])} backbone (audio-biased), {len(idx['fit'])} fitting, "
        f"{len(idx['validation'])} validation, {len(idx['test'])} test samples (balanced); distractor scale "
        f"{settings.distractor_scale}")

    model, _ = build_demo_model(seed, **_sizes(settings))
    stage("model", f"training the backbone (all weights, {settings.backbone_epochs:g} epochs) ...")
    backbone = train_backbone(model, data, idx["backbone"], settings, seed, work, progress)

    stage("backbone", f"AR on the backbone: {len(settings.ar_options)} options x {len(settings.ar_strengths)} "
          "strengths on validation ...")
    configs = demo_ar.option_configs(settings.ar_options, backbone, calibration)
    curves = {"backbone": demo_ar.sweep(backbone, validation, configs, settings.ar_strengths)}
    ar_choice = demo_ar.choose(curves["backbone"], settings.ar_strengths)

    fits, sizes = {}, {}
    for k, size in enumerate(settings.mose_sizes):
        stage("ar_backbone" if k == 0 else f"mose_{k - 1}", f"fitting MoSE r={size[0]} E={size[1]} (backbone "
              f"frozen, best of {settings.adapter_epochs} epochs on validation) ...")
        fits[size] = fit_mose(backbone, data, idx["fit"], validation, settings, seed,
                              work / f"mose-r{size[0]}-e{size[1]}", progress, size=tuple(size))
        sizes[f"r{size[0]}-e{size[1]}"] = {"epoch": fits[size].epoch, "validation": fits[size].best,
                                           "trainable_params": fits[size].trainable_params}
    size = max(settings.mose_sizes, key=lambda s: fits[s].best["mean3"])  # first size wins a tie
    mose = fits[size]
    stage(f"mose_{len(settings.mose_sizes) - 1}", "AR on MoSE: the same options on validation ...")
    mose_configs = demo_ar.option_configs(settings.ar_options, mose.model, calibration)
    curves["mose"] = demo_ar.sweep(mose.model, validation, mose_configs, settings.ar_strengths)
    mose_ar_choice = demo_ar.choose(curves["mose"], settings.ar_strengths)

    rank = lora_rank_for(backbone, settings.mose_targets, mose.trainable_params)
    stage("ar_mose", f"references on the same fitting set: full fine-tuning, LoRA r={rank} ...")
    full = fit_full(backbone, data, idx["fit"], validation, settings, seed, work, progress)
    lora = fit_lora(backbone, data, idx["fit"], validation, settings, seed, work, progress, rank=rank)

    def chosen(model, configs, choice):
        option, strength = choice
        return demo_ar.with_ar(model, ARConfig(strength=0.0) if option == demo_ar.NO_AR
                               else _at_strength(configs[option], strength))

    stage("references", "test ...")
    variants = {
        "baseline": evaluate_camer(demo_ar.with_ar(backbone, ARConfig(strength=0.0)), test),
        "+ AR": evaluate_camer(chosen(backbone, configs, ar_choice), test),
        "+ MoSE": evaluate_camer(demo_ar.with_ar(mose.model, ARConfig(strength=0.0)), test),
        "+ MoSE + AR": evaluate_camer(chosen(mose.model, mose_configs, mose_ar_choice), test),
    }
    references = {"bayes_optimal": evaluate_bayes(test, BALANCED), "full_finetune": evaluate_camer(full.model, test),
                  "lora": evaluate_camer(lora.model, test)}

    mose_folder = work / f"mose-r{size[0]}-e{size[1]}"
    option, strength = mose_ar_choice
    atomic_write_json(mose_folder / AR_CONFIG_FILE, None if option == demo_ar.NO_AR
                      else ar_config_fields(_at_strength(mose_configs[option], strength)))
    if keep_mose:
        shutil.rmtree(out_dir / "mose", ignore_errors=True)
        mose_folder.rename(out_dir / "mose")
    shutil.rmtree(work, ignore_errors=True)
    stage("test", "done")
    return {
        "seed": seed,
        "variants": {name: _test_entry(report) for name, report in variants.items()},
        "references": {name: _test_entry(report) for name, report in references.items()},
        "choices": {"ar": _choice(ar_choice), "mose_ar": _choice(mose_ar_choice), "mose_size": list(size),
                    "mose_epoch": mose.epoch, "full_finetune_epoch": full.epoch, "lora_epoch": lora.epoch,
                    "lora_rank": rank, "trainable_params": {"mose": mose.trainable_params,
                                                            "lora": lora.trainable_params,
                                                            "full_finetune": full.trainable_params}},
        "validation": {"ar_curves": curves, "mose_sizes": sizes,
                       "references": {"bayes_optimal": camer_metrics(evaluate_bayes(validation, BALANCED)),
                                      "full_finetune": full.best, "lora": lora.best}},
        "mose_modality_weights": _modality_weights(mose.model),
        "runtime_s": round(time.perf_counter() - wall, 1),
        "cpu_s": round(time.process_time() - cpu, 1),
        "stage_cpu_s": stages,
    }


def _at_strength(config, strength):
    from dataclasses import replace

    return replace(config, strength=strength)


def _choice(choice) -> dict:
    return {"option": choice[0], "strength": choice[1]}


def _sizes(settings) -> dict:
    from mosear_fast import demo_config

    return demo_config.backbone_sizes(settings.n_visual, settings.hidden)


__all__ = ["BALANCED", "REFERENCES", "VARIANTS", "build_splits", "run_seed"]

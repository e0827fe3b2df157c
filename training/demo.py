"""``mosear-demo``: MoSE and AR against an audio-biased audio-visual LM, on a synthetic CA-MER.

1. Data: one synthetic CA-MER draw (``generate_camer``: weak, many visual tokens; one strong audio
   token), split into disjoint parts: backbone training data where audio is the more reliable cue
   (consistent 50 %, audio-aligned 35 %, video-aligned 15 %: audio is right 85 % of the time, video
   65 %), a balanced MoSE fitting set and a balanced test set.
2. Backbone: the built-in audio-visual LM (``mosear_fast.av_model``) trained on the first part with
   transformers' Trainer, all weights: it learns the audio bias.
3. Four variants on the test set: baseline, + AR (inference only), + MoSE (adapters fitted with
   ``MoSETrainer`` on the balanced set, backbone frozen), + MoSE + AR.
4. Output folder: ``results.json``, ``results.md``, ``demo.png`` (accuracy per subset, conflict gap,
   attention shares) and ``mose/``, the fitted adapter as a ``mosear-train`` output folder.

Deterministic by ``--seed``; ``--quick`` runs a reduced version (seconds) for CI.
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from mosear_fast import demo_config

PROG = "mosear-demo"
VARIANTS = ("baseline", "+ AR", "+ MoSE", "+ MoSE + AR")


def _counts(consistent, audio, video):
    return {"consistent": consistent, "audio_aligned": audio, "video_aligned": video}


@dataclass(frozen=True)
class DemoSettings:
    """Everything the demo draws and trains; ``DEFAULT`` and ``QUICK`` below."""

    seed: int = demo_config.SEED
    n_visual: int = demo_config.N_VISUAL
    hidden: int = demo_config.HIDDEN
    backbone_counts: dict = field(default_factory=lambda: _counts(1000, 700, 300))
    fit_counts: dict = field(default_factory=lambda: _counts(400, 400, 400))
    test_counts: dict = field(default_factory=lambda: _counts(200, 200, 200))
    backbone_epochs: float = 4.0
    backbone_lr: float = 3e-3
    mose_epochs: float = 6.0
    mose_lr: float = 3e-3
    batch_size: int = 32
    mose_rank: int = demo_config.MOSE_RANK
    mose_experts: int = demo_config.MOSE_EXPERTS
    mose_targets: tuple = demo_config.MOSE_TARGETS
    ar_strength: float = demo_config.AR_STRENGTH


DEFAULT = DemoSettings()
QUICK = DemoSettings(n_visual=8, hidden=32, backbone_counts=_counts(120, 84, 36), fit_counts=_counts(40, 40, 40),
                     test_counts=_counts(30, 30, 30), backbone_epochs=2.0, mose_epochs=1.0, mose_experts=2)


def build_splits(settings: DemoSettings):
    """(dataset, backbone indices, fit indices, test indices): disjoint parts of one draw."""
    from .av_batches import pick_by_subset
    from .synthetic import generate_camer

    per_subset = {s: sum(c[s] for c in (settings.backbone_counts, settings.fit_counts, settings.test_counts))
                  for s in settings.test_counts}
    n = 3 * max(per_subset.values())
    data = generate_camer(n_samples=n, seed=settings.seed, n_visual_tokens=settings.n_visual,
                          proportions={"video_aligned": 1.0, "audio_aligned": 1.0, "consistent": 1.0})
    taken: set[int] = set()
    parts = [pick_by_subset(data.subsets, c, taken=taken)
             for c in (settings.backbone_counts, settings.fit_counts, settings.test_counts)]
    return (data, *parts)


def train_backbone(model, data, indices, settings, out_dir, progress):
    """All weights of the backbone, with the plain transformers Trainer (no checkpoints)."""
    from transformers import Trainer

    from .av_batches import AVCollator, Subset
    from .fit import default_training_arguments

    args = default_training_arguments(out_dir / "backbone-run", num_train_epochs=settings.backbone_epochs,
                                      per_device_train_batch_size=settings.batch_size,
                                      learning_rate=settings.backbone_lr, seed=settings.seed,
                                      disable_tqdm=not progress, logging_steps=10 ** 6, warmup_steps=0)
    model.train()
    Trainer(model=model, args=args, train_dataset=Subset(data, indices), data_collator=AVCollator()).train()
    return model.eval()


def fit_adapters(backbone, data, indices, settings, out_dir, progress):
    from .av_batches import Subset
    from .fit import default_training_arguments, fit_mose, prepare_mose
    from .trained_folder import backbone_reference, write_backbone_weights

    mose = demo_config.mose_config(settings.mose_rank, settings.mose_experts, settings.mose_targets)
    folder = out_dir / "mose"
    weights = write_backbone_weights(folder, backbone)
    reference = backbone_reference(settings.seed, demo_config.backbone_sizes(settings.n_visual, settings.hidden),
                                   weights)
    model = prepare_mose(copy.deepcopy(backbone), mose, seed=settings.seed)
    args = default_training_arguments(folder, num_train_epochs=settings.mose_epochs,
                                      per_device_train_batch_size=settings.batch_size,
                                      learning_rate=settings.mose_lr, seed=settings.seed,
                                      disable_tqdm=not progress, logging_steps=10, warmup_steps=0)
    trainer = fit_mose(model, Subset(data, indices), args, mose=mose, ar=demo_config.ar_config(settings.ar_strength),
                       backbone=reference, quiet_logs=True)
    return trainer.state.log_history


def with_ar(model, strength):
    """A copy of ``model`` running AR (strength 0 = plain attention, used to measure the shares)."""
    from mosear_fast import ARConfig, apply_mosear

    model = copy.deepcopy(model)
    apply_mosear(model.llm, ar=ARConfig(strength=strength))
    return model.eval()


def run_demo(settings: DemoSettings, out_dir: Path, *, progress: bool = True, log=print) -> dict:
    """The whole demo; returns (and writes) the results."""
    import torch
    from transformers import set_seed

    from mosear_fast.av_model import build_demo_model

    from .demo_eval import evaluate_camer
    from .demo_report import write_results
    from .trained_folder import load_trained

    start = time.perf_counter()
    set_seed(settings.seed)
    data, backbone_idx, fit_idx, test_idx = build_splits(settings)
    log(f"data: {len(backbone_idx)} backbone-training samples (audio right 85%), {len(fit_idx)} MoSE-fitting "
        f"samples (balanced), {len(test_idx)} test samples (balanced); {settings.n_visual} visual tokens + 1 "
        "audio token per prompt")
    model, _ = build_demo_model(settings.seed, **demo_config.backbone_sizes(settings.n_visual, settings.hidden))
    log("training the backbone (all weights) ...")
    backbone = train_backbone(model, data, backbone_idx, settings, out_dir, progress)
    reports = {}
    reports["baseline"] = evaluate_camer(with_ar(backbone, 0.0), data, test_idx)
    reports["+ AR"] = evaluate_camer(with_ar(backbone, settings.ar_strength), data, test_idx)
    log("fitting MoSE (backbone frozen) ...")
    history = fit_adapters(backbone, data, fit_idx, settings, out_dir, progress)
    # Reloaded from the output folder (which checks it): MoSE alone, and with the folder's AR config.
    reports["+ MoSE"] = evaluate_camer(with_ar(load_trained(out_dir / "mose", ar=False), 0.0), data, test_idx)
    reports["+ MoSE + AR"] = evaluate_camer(load_trained(out_dir / "mose"), data, test_idx)
    logged = [h for h in history if any(k.startswith("modality_weight/") for k in h)]
    final_weights = {k.split("/", 1)[1]: v for k, v in (logged[-1] if logged else {}).items()
                     if k.startswith("modality_weight/")}
    results = {"settings": asdict(settings), "variants": reports, "mose_modality_weights": final_weights,
               "runtime_s": round(time.perf_counter() - start, 1), "torch": torch.__version__}
    write_results(out_dir, results)
    return results


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=PROG, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=Path("demo-output"), metavar="DIR",
                   help="output folder (default ./demo-output): results.json, results.md, demo.png, mose/")
    p.add_argument("--seed", type=int, default=0, help="seed of the data, the backbone and the adapters (default 0)")
    p.add_argument("--quick", action="store_true", help="a reduced run (tiny model and data, seconds) for CI")
    p.add_argument("--ar-strength", type=float, default=None, metavar="S",
                   help="AR strength in [0, 1] (default 0.5)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    settings = replace(QUICK if args.quick else DEFAULT, seed=args.seed)
    if args.ar_strength is not None:
        if not 0.0 <= args.ar_strength <= 1.0:
            print(f"{PROG}: error: --ar-strength: expected a number in [0, 1], got {args.ar_strength}",
                  file=sys.stderr)
            return 2
        settings = replace(settings, ar_strength=args.ar_strength)
    if args.out.exists() and not args.out.is_dir():
        print(f"{PROG}: error: --out {args.out}: exists and is not a folder", file=sys.stderr)
        return 2
    try:
        results = run_demo(settings, args.out, progress=not args.no_progress)
    except OSError as e:
        print(f"{PROG}: error: cannot write to --out {args.out}: {e.strerror or e}", file=sys.stderr)
        return 2
    from .demo_report import render_table

    print(render_table(results))
    print(f"wrote {args.out / 'results.json'}, {args.out / 'results.md'}, {args.out / 'demo.png'}, "
          f"{args.out / 'mose'}/ ({results['runtime_s']} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())


__all__ = ["DEFAULT", "QUICK", "VARIANTS", "DemoSettings", "build_splits", "main", "run_demo"]

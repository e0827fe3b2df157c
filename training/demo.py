"""``mosear-demo``: MoSE and AR against an audio-biased audio-visual LM, on a synthetic CA-MER, as an
experiment: every choice on a validation split, one test evaluation, several seeds, reference rows.

Per seed (``demo_study``): one synthetic CA-MER draw where, in a conflict, the misleading modality
shows its emotion at half strength (so a model that weighs both modalities *can* win on every
subset; the Bayes-optimal classifier shows how much), split into backbone training data where
audio is the more reliable cue (consistent 50 %, audio-aligned 35 %, video-aligned 15 %), a
balanced fitting set, a balanced validation split and a balanced test split. The built-in
audio-visual LM (``mosear_fast.av_model``) learns the audio shortcut (all weights). Then, each
chosen on validation: AR's option and strength (``demo_ar``); MoSE's size and epochs, fitted with
the backbone frozen; AR on top of MoSE. Test: baseline, + AR, + MoSE, + MoSE + AR, and the
references: Bayes-optimal, full fine-tuning and a plain LoRA with as many trainable parameters as
MoSE, on the same fitting set.

Over seeds (``--seeds N``): the mean and 95% interval of video-aligned (VA), audio-aligned (AA) and
consistent (C) accuracy, the conflict gap (AA - VA) and mean3 (the mean of VA, AA and C), and per
variant the paired per-seed differences against the same seed's baseline (``demo_stats``).

Output folder: ``results.json``, ``results.md``, ``demo.png`` (accuracy per subset with intervals,
attention shares), ``tradeoff.png`` (VA against AA accuracy as AR strength goes 0 -> 1, per AR option,
with and without MoSE, on validation) and ``mose/``, the first seed's fitted adapter as a
``mosear-train`` output folder (with its chosen AR config). ``--quick`` runs a reduced version
(seconds) for CI.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from mosear_fast import demo_config

from .demo_ar import AR_OPTIONS
from .demo_study import REFERENCES, VARIANTS

PROG = "mosear-demo"


def _counts(consistent, audio, video):
    return {"consistent": consistent, "audio_aligned": audio, "video_aligned": video}


@dataclass(frozen=True)
class DemoSettings:
    """Everything the demo draws, trains and chooses among; ``DEFAULT`` and ``QUICK`` below.

    ``mose_rank``/``mose_experts`` are the demo model's MoSE size (``demo_config``, what
    ``mosear-export demo`` builds); ``mose_sizes`` the (rank, experts) candidates validation chooses
    among. ``adapter_epochs`` is the most epochs of every fit after the backbone (the kept epoch is
    chosen on validation). ``ar_strength`` is the demo model's default AR strength (``demo_config``);
    the demo itself evaluates ``ar_strengths`` x ``ar_options`` and keeps the best on validation.
    """

    seed: int = demo_config.SEED
    seeds: int = 1
    n_visual: int = demo_config.N_VISUAL
    hidden: int = demo_config.HIDDEN
    distractor_scale: float = 0.5
    backbone_counts: dict = field(default_factory=lambda: _counts(2500, 1750, 750))
    fit_counts: dict = field(default_factory=lambda: _counts(2000, 2000, 2000))
    validation_counts: dict = field(default_factory=lambda: _counts(300, 300, 300))
    test_counts: dict = field(default_factory=lambda: _counts(500, 500, 500))
    backbone_epochs: float = 4.0
    backbone_lr: float = 3e-3
    adapter_epochs: int = 4
    adapter_lr: float = 3e-3
    full_lr: float = 1e-3
    batch_size: int = 32
    mose_rank: int = demo_config.MOSE_RANK
    mose_experts: int = demo_config.MOSE_EXPERTS
    mose_sizes: tuple = ((4, 2), (demo_config.MOSE_RANK, demo_config.MOSE_EXPERTS))
    mose_targets: tuple = demo_config.MOSE_TARGETS
    ar_strength: float = demo_config.AR_STRENGTH
    ar_strengths: tuple = (0.0, 0.25, 0.5, 0.75, 1.0)
    ar_options: tuple = AR_OPTIONS
    calibration_samples: int = 512


DEFAULT = DemoSettings()
QUICK = DemoSettings(n_visual=8, hidden=32, backbone_counts=_counts(120, 84, 36), fit_counts=_counts(40, 40, 40),
                     validation_counts=_counts(20, 20, 20), test_counts=_counts(30, 30, 30), backbone_epochs=2.0,
                     adapter_epochs=2, mose_sizes=((2, 2), (4, 2)), ar_strengths=(0.0, 1.0),
                     calibration_samples=16)


def run_demo(settings: DemoSettings, out_dir: Path, *, progress: bool = True, log=print) -> dict:
    """Every seed of the protocol, then the summary; returns (and writes) the results."""
    import torch

    from .demo_report import write_results
    from .demo_study import run_seed
    from .demo_summary import summarize_seeds

    wall, cpu = time.perf_counter(), time.process_time()
    seeds = [settings.seed + k for k in range(settings.seeds)]
    per_seed = []
    for k, seed in enumerate(seeds):
        per_seed.append(run_seed(settings, seed, Path(out_dir), keep_mose=k == 0, progress=progress, log=log))
    shutil.rmtree(Path(out_dir) / ".work", ignore_errors=True)  # the fits' scratch folders
    results = {**summarize_seeds(per_seed), "settings": asdict(settings),
               "runtime_s": round(time.perf_counter() - wall, 1), "cpu_s": round(time.process_time() - cpu, 1),
               "threads": torch.get_num_threads(), "torch": torch.__version__}
    write_results(Path(out_dir), results)
    return results


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=PROG, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=Path("demo-output"), metavar="DIR",
                   help="output folder (default ./demo-output): results.json, results.md, demo.png, tradeoff.png, "
                        "mose/")
    p.add_argument("--seed", type=int, default=0, help="the first seed (data, backbone, adapters; default 0)")
    p.add_argument("--seeds", type=int, default=1, metavar="N",
                   help="run seeds seed .. seed+N-1 and report means with 95%% intervals (default 1; each seed "
                        "takes a few minutes of CPU)")
    p.add_argument("--threads", type=int, default=1, metavar="T",
                   help="torch CPU threads (default 1: the model is tiny, so more threads mostly add "
                        "synchronisation, and on a busy machine they wait on each other)")
    p.add_argument("--quick", action="store_true", help="a reduced run (tiny model and data, seconds) for CI")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    return p


def _error(message: str) -> int:
    print(f"{PROG}: error: {message}", file=sys.stderr)
    return 2


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    if args.seeds < 1:
        return _error(f"--seeds: expected an integer >= 1, got {args.seeds}")
    if args.threads < 1:
        return _error(f"--threads: expected an integer >= 1, got {args.threads}")
    if args.out.exists() and not args.out.is_dir():
        return _error(f"--out {args.out}: exists and is not a folder")
    import torch

    torch.set_num_threads(args.threads)
    settings = replace(QUICK if args.quick else DEFAULT, seed=args.seed, seeds=args.seeds)
    try:
        results = run_demo(settings, args.out, progress=not args.no_progress)
    except OSError as e:
        return _error(f"cannot write to --out {args.out}: {e.strerror or e}")
    from .demo_report import render_table

    print(render_table(results))
    print(f"wrote {args.out / 'results.json'}, results.md, demo.png, tradeoff.png, mose/ ({results['runtime_s']} s, "
          f"{results['cpu_s']} s CPU)")
    return 0


if __name__ == "__main__":
    sys.exit(main())


__all__ = ["DEFAULT", "QUICK", "REFERENCES", "VARIANTS", "DemoSettings", "main", "run_demo"]

"""``mosear-train``: fit MoSE adapters on the frozen built-in audio-visual LM.

    mosear-train --config train.yaml [--field value ...]
    torchrun --nproc_per_node 2 -m mosear_fast.training.train_cli --config train.yaml

Settings come from the YAML file and flags (flags win); every field is listed below. The output
folder (format: ``mosear_fast.training.trained_folder``) reloads with ``load_trained(folder)``.
Exit status: 0 done; 2 bad settings or unusable input/output (one-line message, no traceback).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .train_config import FIELDS, resolve_settings

PROG = "mosear-train"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=PROG, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                argument_default=argparse.SUPPRESS)
    p.add_argument("--config", type=Path, metavar="YAML", help="YAML file of fields (keys as below, with '_')")
    for f in FIELDS:
        extra = f" (one of {', '.join(map(str, f.choices))})" if f.choices else ""
        p.add_argument(f"--{f.name.replace('_', '-')}", dest=f.name, metavar=f.kind.upper(),
                       help=f"{f.help}{extra}; default {f.default!r}")
    return p


def read_yaml(path: Path) -> dict:
    import yaml

    try:
        values = yaml.safe_load(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ValueError(f"--config {path}: no such file") from None
    except (OSError, UnicodeDecodeError) as e:
        raise ValueError(f"--config {path}: cannot read ({e})") from None
    except yaml.YAMLError as e:
        raise ValueError(f"--config {path}: not valid YAML ({str(e).splitlines()[0]})") from None
    if values is None:
        return {}
    if not isinstance(values, dict):
        raise ValueError(f"--config {path}: expected a mapping of fields, got {type(values).__name__}")
    return values


def training_data(s: dict):
    from .data import ManifestDataset
    from .synthetic import generate_camer

    if s["train_data"] == "synthetic":
        n_visual = int(s["backbone_sizes"].get("n_visual", 32))
        return generate_camer(n_samples=s["synthetic_samples"], seed=s["data_seed"], n_visual_tokens=n_visual,
                              proportions={"video_aligned": 1.0, "audio_aligned": 1.0, "consistent": 1.0})
    path = Path(s["train_data"])
    if not path.is_file():
        raise ValueError(f"train_data: {path} is not a file; expected a manifest.jsonl or 'synthetic'")
    return ManifestDataset(path, modalities=("visual", "audio"))


def run(s: dict) -> Path:
    from mosear_fast import ARConfig, MoSEConfig
    from mosear_fast.av_model import build_demo_model

    from .fit import default_training_arguments, fit_mose, prepare_mose
    from .trained_folder import backbone_reference, load_backbone, write_backbone_weights
    from .trainer import is_main_process

    out = Path(s["output_dir"])
    dataset = training_data(s)
    reference = backbone_reference(s["backbone_seed"], s["backbone_sizes"], None)
    try:
        build_demo_model(0, **s["backbone_sizes"])  # checks the sizes before anything is written
    except (TypeError, ValueError) as e:
        raise ValueError(f"backbone_sizes: {e}") from None
    if s["backbone_weights"]:
        weights = Path(s["backbone_weights"]).resolve()
        if not weights.is_file():
            raise ValueError(f"backbone_weights: {weights} is not a file")
        reference = {**reference, "weights": str(weights)}
    model = load_backbone(out, reference)  # absolute weights path: resolved as is
    if s["backbone_weights"]:
        if is_main_process():
            write_backbone_weights(out, model)
        reference["weights"] = "backbone.safetensors"
    mose = MoSEConfig(r=s["rank"], alpha=s["alpha"], num_experts=s["num_experts"], top_k=s["top_k"],
                      routing=s["routing"], target_modules=s["target_modules"], dropout=s["dropout"],
                      load_balance_coef=s["load_balance_coef"], z_loss_coef=s["z_loss_coef"],
                      dynamic_weights=s["dynamic_weights"], beta=s["beta"], gamma=s["gamma"],
                      weight_clip=s["weight_clip"])
    ar = ARConfig(strength=s["ar_strength"]) if s["ar"] else None
    prepare_mose(model, mose, seed=s["seed"])
    args = default_training_arguments(
        out, num_train_epochs=s["epochs"], max_steps=s["max_steps"], per_device_train_batch_size=s["batch_size"],
        gradient_accumulation_steps=s["grad_accum"], learning_rate=s["learning_rate"],
        weight_decay=s["weight_decay"], warmup_steps=s["warmup_steps"], lr_scheduler_type=s["lr_scheduler"],
        bf16=s["precision"] == "bf16", fp16=s["precision"] == "fp16", seed=s["seed"],
        logging_steps=s["logging_steps"], save_strategy="steps" if s["save_steps"] else "no",
        save_steps=s["save_steps"] or 500, save_total_limit=s["save_total_limit"],
        dataloader_num_workers=s["num_workers"], disable_tqdm=not s["progress"])
    resume = s["resume"]
    if resume == "last":
        resume = True
    elif resume is not None and not Path(resume).is_dir():
        raise ValueError(f"resume: {resume} is not a checkpoint folder (or 'last')")
    fit_mose(model, dataset, args, mose=mose, ar=ar, backbone=reference, resume_from_checkpoint=resume)
    return out


def main(argv=None) -> int:
    parsed = vars(build_parser().parse_args(argv))
    config = parsed.pop("config", None)
    try:
        settings = resolve_settings(read_yaml(config) if config else {}, parsed)
        out = run(settings)
    except ValueError as e:
        print(f"{PROG}: error: {str(e).splitlines()[0]}", file=sys.stderr)
        return 2
    except OSError as e:
        print(f"{PROG}: error: {e.filename or ''}: {e.strerror or e}", file=sys.stderr)
        return 2
    from .trainer import is_main_process

    if is_main_process():
        print(f"wrote {out} (load it with mosear_fast.training.load_trained)")
    return 0


if __name__ == "__main__":
    sys.exit(main())

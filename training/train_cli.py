"""``mosear-train``: fit MoSE adapters on a frozen model: a Hugging Face model folder, or the built-in
audio-visual LM.

    mosear-train --model MODEL_DIR --train-data rows.jsonl --output-dir OUT [--field value ...]
    mosear-train --config train.yaml [--field value ...]
    torchrun --nproc_per_node 2 -m mosear_fast.training.train_cli --config train.yaml

Settings come from the YAML file and flags (flags win); every field is listed below. The output
folder is a PEFT adapter folder plus the base model's reference and the AR config (format:
``mosear_fast.trained``): ``load_trained(OUT)``, ``PeftModel.from_pretrained(base, OUT)`` (after
``import mosear_fast``), ``mosear-predict OUT`` and ``mosear-export OUT`` read it. Mixed precision
through ``--precision bf16|fp16`` (the Trainer's flags); DDP/FSDP through torchrun or accelerate.

The run writes into a staging folder beside the output folder, ``.<name>.partial``, and moves its
files into the output folder only when training has finished: a failed run leaves nothing in the
output folder (a previous result there stays as it was). When a failed run had written checkpoints,
its staging folder is kept and ``--resume last`` continues from the newest one; otherwise it is
removed. A run killed outright leaves its staging folder for ``--resume last``; the next run without
``--resume`` starts a fresh one.
Exit status: 0 done; 2 bad settings or unusable input/output (one-line message, no traceback).
"""

from __future__ import annotations

import argparse
import contextlib
import re
import shutil
import sys
from pathlib import Path

from .train_config import FIELDS, resolve_settings

PROG = "mosear-train"
CHECKPOINT_PATTERN = "checkpoint-*"


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
    for key in values:
        if not isinstance(key, str):
            raise ValueError(f"--config {path}: field names must be text, got the {type(key).__name__} {key!r}")
    return values


def staging_folder(out: Path) -> Path:
    """Where a run writes before its output is published: ``.<name>.partial`` beside ``out``."""
    resolved = out.resolve()
    if not resolved.name:
        raise ValueError(f"output_dir: expected a folder below the file-system root, got {out}")
    return resolved.parent / f".{resolved.name}.partial"


def has_checkpoint(folder: Path) -> bool:
    try:
        return any(p.is_dir() for p in folder.glob(CHECKPOINT_PATTERN))
    except FileNotFoundError:  # removed while listed: rank 0 discards a failed run's staging folder as others look
        return False


def resolve_resume(resume: str | None, out: Path, staging: Path) -> str | None:
    """The checkpoint folder to resume from: 'last' is the newest in the staging folder (a failed or
    killed run's), else in the output folder (a finished run's)."""
    from transformers.trainer_utils import get_last_checkpoint

    if resume is None:
        return None
    if resume == "last":
        for folder in (staging, out):
            last = get_last_checkpoint(str(folder)) if folder.is_dir() else None
            if last is not None:
                return last
        raise ValueError(f"resume: no {CHECKPOINT_PATTERN} folder in {out} or {staging} to continue from")
    if not Path(resume).is_dir():
        raise ValueError(f"resume: {resume} is not a checkpoint folder (or 'last')")
    return resume


def builtin_setup(s: dict):
    """The built-in audio-visual LM: ``(model, dataset, collator, backbone.json content, weights to copy)``."""
    from safetensors import SafetensorError

    from mosear_fast.av_model import build_demo_model

    from .av_batches import AVCollator
    from .data import ManifestDataset
    from .synthetic import generate_camer
    from .trained_folder import BACKBONE_WEIGHTS_FILE, backbone_reference, load_backbone

    if s["train_data"] == "synthetic":
        n_visual = int(s["backbone_sizes"].get("n_visual", 32))
        dataset = generate_camer(n_samples=s["synthetic_samples"], seed=s["data_seed"], n_visual_tokens=n_visual,
                                 proportions={"video_aligned": 1.0, "audio_aligned": 1.0, "consistent": 1.0})
    else:
        path = Path(s["train_data"])
        if not path.is_file():
            raise ValueError(f"train_data: {path} is not a file; expected a manifest.jsonl or 'synthetic'")
        dataset = ManifestDataset(path, modalities=("visual", "audio"))
    reference = backbone_reference(s["backbone_seed"], s["backbone_sizes"], None)
    try:
        build_demo_model(0, **s["backbone_sizes"])  # checks the sizes before anything is written
    except (TypeError, ValueError) as e:
        raise ValueError(f"backbone_sizes: {e}") from None
    weights = None
    if s["backbone_weights"]:
        weights = Path(s["backbone_weights"]).resolve()
        if not weights.is_file():
            raise ValueError(f"backbone_weights: {weights} is not a file")
        reference = {**reference, "weights": str(weights)}
    try:
        model = load_backbone(Path("."), reference)  # absolute weights path: resolved as is
    except (ValueError, RuntimeError, SafetensorError) as e:  # not safetensors, or tensors of another backbone
        raise ValueError(f"backbone_weights: {s['backbone_weights']}: not this backbone's weights "
                         f"({str(e).splitlines()[0]})") from None
    if weights is not None:  # the file is copied beside the adapter; backbone.json names the copy
        reference = {**reference, "weights": BACKBONE_WEIGHTS_FILE}
    return model, dataset, AVCollator(), reference, weights


def hf_setup(s: dict, mose):
    """A Hugging Face model folder: ``(model, dataset, collator, backbone.json content, None)``. The rows
    are checked before the weights load."""
    from mosear_fast.base_model import base_reference, has_tokenizer, load_base_model, load_text_config, load_tokenizer

    from .token_rows import TokenRows, TokenRowsCollator, forward_arguments

    builtin_only = [f.name for f in FIELDS if f.name.startswith(("backbone_", "synthetic_", "data_seed"))
                    and s[f.name] != f.default]
    if builtin_only:
        raise ValueError(f"{builtin_only[0]}: applies to the built-in model only, not to --model {s['model']}")
    folder = Path(s["model"])
    reference = base_reference(folder, name="model")
    if s["train_data"] == "synthetic":
        raise ValueError("train_data: with --model, expected a JSONL file of rows ({id, input_ids, labels} or "
                         "{id, prompt, answer}); 'synthetic' is the built-in model's data")
    path = Path(s["train_data"])
    if not path.is_file():
        raise ValueError(f"train_data: {path} is not a file; expected a JSONL file of training rows")
    text_config = load_text_config(reference, name="model")
    tokenizer = load_tokenizer(folder) if has_tokenizer(folder) else None
    dataset = TokenRows(path, tokenizer=tokenizer, vocab_size=int(text_config.vocab_size),
                        num_modalities=len(mose.modalities),
                        max_length=getattr(text_config, "max_position_embeddings", None))
    model = load_base_model(reference, name="model")
    pad_id = next((v for v in (getattr(tokenizer, "pad_token_id", None), getattr(text_config, "pad_token_id", None))
                   if isinstance(v, int) and v >= 0), 0)
    collator = TokenRowsCollator(pad_id=pad_id, forward_arguments=forward_arguments(model))
    return model, dataset, collator, reference, None


def run(s: dict) -> Path:
    from mosear_fast import ARConfig, MoSEConfig, apply_mosear
    from mosear_fast.atomic import staged_folder

    from .fit import adapted_module, default_training_arguments, fit_mose, prepare_mose
    from .trained_folder import BACKBONE_FILE, BACKBONE_WEIGHTS_FILE
    from .trainer import barrier, is_main_process

    out = Path(s["output_dir"])
    if out.exists() and not out.is_dir():
        raise ValueError(f"output_dir: {out} exists and is not a folder")
    staging = staging_folder(out)
    try:
        mose = MoSEConfig(r=s["rank"], alpha=s["alpha"], num_experts=s["num_experts"], top_k=s["top_k"],
                          routing=s["routing"], target_modules=s["target_modules"], dropout=s["dropout"],
                          load_balance_coef=s["load_balance_coef"], z_loss_coef=s["z_loss_coef"],
                          dynamic_weights=s["dynamic_weights"], beta=s["beta"], gamma=s["gamma"],
                          weight_clip=s["weight_clip"])
        ar = ARConfig(strength=s["ar_strength"]) if s["ar"] else None
    except (TypeError, ValueError) as e:  # a combination the field checks alone cannot see
        raise ValueError(str(e)) from None
    if s["ar_training"] and ar is None:
        raise ValueError("ar_training: needs ar true (the AR config to train with)")
    model, dataset, collator, reference, weights = hf_setup(s, mose) if s["model"] else builtin_setup(s)
    prepare_mose(model, mose, seed=s["seed"])
    if s["ar_training"]:
        apply_mosear(adapted_module(model), ar=ar)
    if s["model"]:  # rows without modality_ids: the model's placeholder tokens give them
        collator.placeholders = dict(model._mosear_context.placeholder_tokens)
    resume = resolve_resume(s["resume"], out, staging)
    parallel = {"fsdp": True, "fsdp_config": {}} if s["fsdp"] else {}
    args = default_training_arguments(
        staging, num_train_epochs=s["epochs"], max_steps=s["max_steps"], per_device_train_batch_size=s["batch_size"],
        gradient_accumulation_steps=s["grad_accum"], learning_rate=s["learning_rate"],
        weight_decay=s["weight_decay"], warmup_steps=s["warmup_steps"], lr_scheduler_type=s["lr_scheduler"],
        bf16=s["precision"] == "bf16", fp16=s["precision"] == "fp16", seed=s["seed"],
        logging_steps=s["logging_steps"], save_strategy="steps" if s["save_steps"] else "no",
        save_steps=s["save_steps"] or 500, save_total_limit=s["save_total_limit"],
        dataloader_num_workers=s["num_workers"], disable_tqdm=not s["progress"], **parallel)
    _ = args.device  # starts torch.distributed under torchrun: the ranks agree from here on
    main_process = is_main_process()
    resuming_inside = resume is not None and Path(resume).resolve().is_relative_to(staging)
    if main_process and not resuming_inside:
        shutil.rmtree(staging, ignore_errors=True)  # a killed run's leftovers: this run starts afresh
    # Rank 0 alone creates, publishes and removes the staging folder; the other ranks write into it
    # only through the Trainer (their RNG states in checkpoints), between the two barriers.
    with (staged_folder(out, staging=staging, last=(BACKBONE_FILE,), keep_on_error=has_checkpoint)
          if main_process else contextlib.nullcontext(staging)):
        barrier()  # the staging folder exists
        if weights is not None and main_process:  # the file loaded (strictly) above, beside the adapter
            shutil.copyfile(weights, staging / BACKBONE_WEIGHTS_FILE)
        fit_mose(model, dataset, args, mose=mose, ar=ar, backbone=reference, data_collator=collator,
                 resume_from_checkpoint=resume)
        barrier()  # every rank's last write is done before rank 0 publishes
    return out


def describe(error: BaseException) -> str:
    """One line for the terminal. An error raised in a DataLoader worker arrives as 'Caught ValueError in
    DataLoader worker process 0' plus the worker's traceback: its last line carries the message."""
    text = str(error) if not isinstance(error, OSError) or error.strerror is None else (
        f"{error.filename}: {error.strerror}" if error.filename else error.strerror)
    lines = [line for line in text.splitlines() if line.strip()]
    if len(lines) > 1 and lines[0].startswith("Caught ") and "Traceback" in text:
        return re.sub(r"^[\w.]+: ", "", lines[-1].strip())
    return lines[0] if lines else type(error).__name__


def main(argv=None) -> int:
    parsed = vars(build_parser().parse_args(argv))
    config = parsed.pop("config", None)
    settings = None
    try:
        settings = resolve_settings(read_yaml(config) if config else {}, parsed)
        from mosear_fast.base_model import transformers_progress

        with transformers_progress(settings["progress"]):
            out = run(settings)
    except (ValueError, OSError) as e:
        note = ""
        with contextlib.suppress(ValueError):  # (no staging folder for a bad output_dir)
            staging = staging_folder(Path(settings["output_dir"])) if settings is not None else None
            if staging is not None and has_checkpoint(staging):
                note = f" (checkpoints kept in {staging}; --resume last continues from the newest)"
        print(f"{PROG}: error: {describe(e)}{note}", file=sys.stderr)
        return 2
    from .trainer import is_main_process

    if is_main_process():
        print(f"wrote {out} (load it with mosear_fast.training.load_trained)")
    return 0


if __name__ == "__main__":
    sys.exit(main())

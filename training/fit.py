"""Fitting MoSE on a frozen backbone: the steps ``mosear-train`` and the demo share.

``prepare_mose`` installs the adapters (seeded, so every rank and every rerun starts from the same
adapter) and freezes everything else; ``fit_mose`` runs ``MoSETrainer`` and writes the output
folder (format: ``trained_folder``). The model is a Hugging Face model (MoSE goes on it) or the
built-in audio-visual LM (MoSE goes on its ``llm``).
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from transformers.trainer_callback import PrinterCallback, ProgressCallback

from mosear_fast.atomic import atomic_write_json

from .av_batches import AVCollator
from .trained_folder import BACKBONE_FILE, folder_files
from .trainer import MoSETrainer, freeze_all_but_adapters


def adapted_module(model):
    """The module MoSE goes on: the built-in audio-visual LM's ``llm``, else the model itself."""
    from mosear_fast.av_model import AudioVisualLM

    return model.llm if isinstance(model, AudioVisualLM) else model


def prepare_mose(model, mose, *, seed: int = 0):
    """``apply_mosear(adapted_module(model), mose=mose)`` with adapter initialisation drawn from ``seed``;
    only the adapters train. Returns the model (in place)."""
    from mosear_fast import apply_mosear

    with torch.random.fork_rng():
        torch.manual_seed(seed)
        apply_mosear(adapted_module(model), mose=mose)
    freeze_all_but_adapters(model)
    return model


def fit_mose(model, train_dataset, args, *, mose, ar=None, backbone: dict, eval_dataset=None,
             data_collator=None, resume_from_checkpoint: str | bool | None = None, callbacks=None,
             quiet_logs: bool = False) -> MoSETrainer:
    """Train the adapters of a ``prepare_mose``'d model with ``args`` (transformers TrainingArguments),
    then write the output folder ``args.output_dir``. ``backbone``: the reference written as
    ``backbone.json`` (for the built-in model, a weights path relative to the output folder; checkpoints
    get it relative to theirs). ``data_collator``: items -> model kwargs (default: the built-in model's
    ``AVCollator``). Returns the trainer (its ``state.log_history`` has the logs). ``quiet_logs``: keep
    the progress bar (if any) but print no logged dict."""
    checkpoint_backbone = dict(backbone)
    if backbone.get("weights"):
        checkpoint_backbone["weights"] = f"../{backbone['weights']}"
    trainer = MoSETrainer(model=model, args=args, train_dataset=train_dataset, eval_dataset=eval_dataset,
                          data_collator=data_collator or AVCollator(), modalities=mose.modalities,
                          llm=adapted_module(model),
                          folder_files=folder_files(mose, ar, checkpoint_backbone), callbacks=callbacks)
    if quiet_logs:  # no dict of logs printed: under the bar, or (without a bar) by the PrinterCallback
        trainer.pop_callback(PrinterCallback)
        if trainer.pop_callback(ProgressCallback) is not None:
            trainer.add_callback(BarOnlyProgress())
    trainer.train(resume_from_checkpoint=resume_from_checkpoint)
    trainer.save_model(args.output_dir)
    if trainer.args.should_save:
        atomic_write_json(Path(args.output_dir) / BACKBONE_FILE, backbone)
        trainer.save_state()
    return trainer


def default_training_arguments(output_dir: str | os.PathLike, **overrides):
    """TrainingArguments with this project's defaults: no external loggers, no pickled extras, the
    seedable sampler (same data order for 1 and N processes), CPU when there is no GPU."""
    from transformers import TrainingArguments

    settings = dict(output_dir=str(output_dir), report_to="none", remove_unused_columns=False,
                    save_strategy="no", logging_steps=10, dataloader_pin_memory=False,
                    use_cpu=not torch.cuda.is_available(), disable_tqdm=True, ddp_find_unused_parameters=False)
    settings.update(overrides)
    return TrainingArguments(**settings)


class BarOnlyProgress(ProgressCallback):
    """The training progress bar without the dict of logs printed at every logging step."""

    def on_log(self, args, state, control, logs=None, **kwargs):
        return None

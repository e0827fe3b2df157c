"""The fits of the demo: the audio-biased backbone, then, on the same balanced fitting set with the
backbone as the starting point, MoSE, plain LoRA and full fine-tuning.

Each fit after the backbone scores the validation split at the end of every epoch and keeps the
weights of its best epoch (``BestEpoch``): the number of epochs is chosen on validation, never on
test. The backbone itself is the given model under study, trained for a fixed number of epochs.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from transformers import Trainer, TrainerCallback
from transformers.trainer_callback import PrinterCallback, ProgressCallback

from .av_batches import AVCollator, Subset
from .demo_eval import EvalSet, evaluate_camer
from .demo_stats import camer_metrics
from .fit import BarOnlyProgress, default_training_arguments


@dataclass
class FitResult:
    """A fitted model and what validation said about it."""

    model: torch.nn.Module
    epoch: int  # the kept epoch (1-based)
    validation: list[dict] = field(default_factory=list)  # camer_metrics per epoch
    trainable_params: int = 0

    @property
    def best(self) -> dict:
        return self.validation[self.epoch - 1]


class BestEpoch(TrainerCallback):
    """Scores ``score(model)`` (validation metrics) after every epoch; restores the best epoch's
    weights (by ``mean3``) when training ends."""

    def __init__(self, model, score: Callable[[torch.nn.Module], dict]):
        self.model, self.score = model, score
        self.history: list[dict] = []
        self.best_epoch, self._best_state = 0, None

    def on_epoch_end(self, args, state, control, **kwargs):
        metrics = self.score(self.model)  # the Trainer puts the model back in train mode at the next step
        self.history.append(metrics)
        if self._best_state is None or metrics["mean3"] > self.history[self.best_epoch - 1]["mean3"]:
            self.best_epoch = len(self.history)
            self._best_state = {k: v.detach().clone() for k, v in self.model.state_dict().items()}

    def on_train_end(self, args, state, control, **kwargs):
        if self._best_state is not None:
            self.model.load_state_dict(self._best_state)
        self.model.eval()


def _arguments(folder: Path, settings, seed: int, *, epochs: float, lr: float, progress: bool, **extra):
    return default_training_arguments(folder, num_train_epochs=epochs, per_device_train_batch_size=settings.batch_size,
                                      learning_rate=lr, seed=seed, disable_tqdm=not progress,
                                      logging_steps=10 ** 6, warmup_steps=0, **extra)


def _train(model, data, indices, args, callbacks=()):
    trainer = Trainer(model=model, args=args, train_dataset=Subset(data, indices), data_collator=AVCollator(),
                      callbacks=list(callbacks))
    trainer.pop_callback(PrinterCallback)  # no dict of logs printed after the fit
    if trainer.pop_callback(ProgressCallback) is not None:
        trainer.add_callback(BarOnlyProgress())
    model.train()
    trainer.train()
    return trainer


def _validation_score(validation: EvalSet):
    return lambda model: camer_metrics(evaluate_camer(model, validation))


def _count_trainable(model) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def train_backbone(model, data, indices, settings, seed: int, work: Path, progress: bool):
    """All weights of the backbone, with the plain transformers Trainer (no checkpoints)."""
    args = _arguments(work / "backbone-run", settings, seed, epochs=settings.backbone_epochs,
                      lr=settings.backbone_lr, progress=progress)
    _train(model, data, indices, args)
    return model.eval()


def fit_full(backbone, data, indices, validation: EvalSet, settings, seed: int, work: Path,
             progress: bool) -> FitResult:
    """Full fine-tuning: every weight of a copy of the backbone (projectors included)."""
    model = copy.deepcopy(backbone)
    model.requires_grad_(True)
    keep = BestEpoch(model, _validation_score(validation))
    args = _arguments(work / "full-run", settings, seed, epochs=settings.adapter_epochs, lr=settings.full_lr,
                      progress=progress)
    _train(model, data, indices, args, [keep])
    return FitResult(model, keep.best_epoch, keep.history, _count_trainable(model))


def lora_rank_for(backbone, targets, n_params: int) -> int:
    """The LoRA rank whose trainable parameter count on ``targets`` is closest to ``n_params``."""
    per_rank = sum(m.in_features + m.out_features for name, m in backbone.llm.named_modules()
                   if isinstance(m, torch.nn.Linear) and name.rsplit(".", 1)[-1] in targets)
    return max(1, round(n_params / per_rank))


def fit_lora(backbone, data, indices, validation: EvalSet, settings, seed: int, work: Path, progress: bool, *,
             rank: int) -> FitResult:
    """Plain LoRA (peft) of ``rank`` on MoSE's target modules, backbone frozen; its scale lora_alpha / rank
    is the demo model's MoSE scale (alpha / r at ``settings.mose_rank``)."""
    from peft import LoraConfig, inject_adapter_in_model

    model = copy.deepcopy(backbone)
    model.requires_grad_(False)
    reference = demo_mose_config(settings)
    alpha = reference.alpha / reference.r * rank
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        inject_adapter_in_model(LoraConfig(r=rank, lora_alpha=alpha, target_modules=list(settings.mose_targets)),
                                model.llm)
    for name, p in model.named_parameters():
        p.requires_grad_("lora_" in name)
    keep = BestEpoch(model, _validation_score(validation))
    args = _arguments(work / "lora-run", settings, seed, epochs=settings.adapter_epochs, lr=settings.adapter_lr,
                      progress=progress)
    _train(model, data, indices, args, [keep])
    return FitResult(model, keep.best_epoch, keep.history, _count_trainable(model))


def demo_mose_config(settings, size: tuple[int, int] | None = None):
    """The demo's MoSEConfig for ``size`` = (rank, experts) (default: the settings' own)."""
    from mosear_fast import demo_config

    rank, experts = size if size is not None else (settings.mose_rank, settings.mose_experts)
    return demo_config.mose_config(rank, experts, settings.mose_targets)


def fit_mose(backbone, data, indices, validation: EvalSet, settings, seed: int, folder: Path, progress: bool, *,
             size: tuple[int, int]) -> FitResult:
    """MoSE of ``size`` = (rank, experts) with ``MoSETrainer`` (backbone frozen), written as a
    ``mosear-train`` output folder ``folder`` (the kept epoch's adapter)."""
    from mosear_fast import demo_config

    from .fit import fit_mose as fit_folder
    from .fit import prepare_mose
    from .trained_folder import backbone_reference, write_backbone_weights

    mose = demo_mose_config(settings, size)
    weights = write_backbone_weights(folder, backbone)
    reference = backbone_reference(seed, demo_config.backbone_sizes(settings.n_visual, settings.hidden), weights)
    model = prepare_mose(copy.deepcopy(backbone), mose, seed=seed)
    keep = BestEpoch(model, _validation_score(validation))
    args = default_training_arguments(folder, num_train_epochs=settings.adapter_epochs,
                                      per_device_train_batch_size=settings.batch_size,
                                      learning_rate=settings.adapter_lr, seed=seed, disable_tqdm=not progress,
                                      logging_steps=10 ** 6, warmup_steps=0)
    fit_folder(model, Subset(data, indices), args, mose=mose, backbone=reference, quiet_logs=True, callbacks=[keep])
    return FitResult(model.eval(), keep.best_epoch, keep.history, _count_trainable(model))


__all__ = ["BestEpoch", "FitResult", "demo_mose_config", "fit_full", "fit_lora", "fit_mose", "lora_rank_for",
           "train_backbone"]

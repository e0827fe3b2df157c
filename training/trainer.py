"""``MoSETrainer``: transformers' Trainer fitting MoSE adapters on a frozen backbone.

What it adds to ``transformers.Trainer`` (everything else -- mixed precision, gradient
accumulation, schedulers, checkpoint rotation, resume, DDP/FSDP through accelerate and torchrun --
is the Trainer's own):

- the loss is the model's task loss plus ``aux_loss`` (load balance + router z-loss, DESIGN 2.1);
  the dynamic modality weights update inside each training forward (the adapters do it); in a
  distributed run the router statistics of the regularizers are the global batch's (all-reduced in
  ``MoSEAdapter._regularizers``, gradients scaled so DDP/FSDP averaging gives one process's gradient);
- in a distributed run the update-norm EMAs are averaged over ranks after every micro-step, so all
  ranks use the same ``w_m`` (``adapter_state.sync_dynamic_weights``);
- ``fsdp`` that accelerate silently dropped (a CPU or one-process run) is refused, not run as DDP;
- logs: ``task_loss``, ``aux_loss``, per-modality weights, expert load and (with AR) attention shares;
- checkpoints hold the adapter only, as a PEFT adapter (``adapter_model.safetensors`` under PEFT's names,
  dynamic-weight buffers included; ``adapter_config.json`` among the JSON files given as
  ``folder_files``: configs, base reference), ``training_args.json`` and the
  Trainer's own resume state (``trainer_state.json``, ``optimizer.pt``, ``scheduler.pt``,
  ``rng_state.pth``: written by the Trainer with ``torch.save`` of tensors and plain values, read back
  with ``torch.load(weights_only=True)``). No pickled model, no pickled ``TrainingArguments``.

The model is any ``nn.Module`` whose forward returns an output with ``loss`` and whose MoSE layers
come from ``apply_mosear``; only adapter parameters should require grad (``freeze_all_but_adapters``).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Mapping

from transformers import Trainer

from mosear_fast.atomic import atomic_write_json, atomic_write_text

from .adapter_state import (
    ADAPTER_FILE,
    ADAPTER_MARK,
    adapted_prefix,
    load_adapter,
    save_adapter,
    sync_dynamic_weights,
)
from .mose_stats import MoSEStats, mean_attention_shares

TRAINING_ARGS_FILE = "training_args.json"


def freeze_all_but_adapters(model) -> int:
    """Set ``requires_grad`` on the MoSE adapter parameters only; returns how many tensors train."""
    n = 0
    for name, p in model.named_parameters():
        trainable = ADAPTER_MARK in f".{name}"
        p.requires_grad_(trainable)
        n += trainable
    if n == 0:
        raise ValueError("model: no MoSE adapter parameters to train; call apply_mosear(model, "
                         "mose=MoSEConfig(...)) on its transformers decoder first")
    return n


class MoSETrainer(Trainer):
    """``Trainer`` + MoSE auxiliary loss, dynamic-weight sync, MoSE logging, adapter-only checkpoints.

    Extra keyword arguments: ``modalities`` (names, ids by position; for the logs), ``llm`` (the
    transformers module MoSE/AR were applied to, for attention shares; default: the model),
    ``folder_files`` ({file name: JSON-able dict} written into every checkpoint and the final save).
    """

    def __init__(self, *args, modalities=("text", "visual", "audio"), llm=None,
                 folder_files: Mapping[str, dict] | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        if self.args.fsdp and not self.is_fsdp_enabled:
            # accelerate drops the FSDP plugin without a word when the run is not a multi-process run on
            # accelerators (accelerate 1.15 enables FSDP for MULTI_GPU/XPU/NPU/..., never MULTI_CPU).
            raise ValueError(f"fsdp: accelerate did not enable FSDP for this run "
                             f"({self.accelerator.distributed_type.value}); FSDP needs a multi-process launch "
                             "(torchrun --nproc_per_node N) on GPUs or other accelerators")
        self.modalities = tuple(modalities)
        self._llm = llm
        self.folder_files = dict(folder_files or {})
        self._adapter_prefix = adapted_prefix(self.model)  # PEFT names are relative to the adapted module
        self._stats = MoSEStats(self.model, self.modalities)
        self._sums = {"task_loss": 0.0, "aux_loss": 0.0}
        self._n_sums = 0

    # ---- loss ------------------------------------------------------------------------------------

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        from mosear_fast import aux_loss

        task, outputs = super().compute_loss(model, inputs, return_outputs=True,
                                             num_items_in_batch=num_items_in_batch)
        if not model.training:  # evaluation: the task loss alone
            return (task, outputs) if return_outputs else task
        aux = aux_loss(self.accelerator.unwrap_model(model))
        self._sums["task_loss"] += float(task.detach())
        self._sums["aux_loss"] += float(aux.detach())
        self._n_sums += 1
        loss = task + aux.to(task.dtype)
        return (loss, outputs) if return_outputs else loss

    def training_step(self, model, inputs, num_items_in_batch=None):
        loss = super().training_step(model, inputs, num_items_in_batch)
        sync_dynamic_weights(self.accelerator.unwrap_model(model))  # before the next forward uses w_m
        return loss

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if "loss" in logs and self._n_sums:  # a training log: add what this window saw
            for key, total in self._sums.items():
                logs[key] = round(total / self._n_sums, 6)
            self._sums = dict.fromkeys(self._sums, 0.0)
            self._n_sums = 0
            llm = self._llm if self._llm is not None else self.model
            logs.update(self._stats.pop_logs(mean_attention_shares(llm, self.modalities)))
        super().log(logs, start_time)

    # ---- checkpoints: the adapter only -----------------------------------------------------------

    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        output_dir = output_dir if output_dir is not None else self.args.output_dir
        if not self.args.should_save:
            return
        os.makedirs(output_dir, exist_ok=True)
        # FSDP passes the gathered full state dict; otherwise the (unwrapped) model has it.
        source = state_dict if state_dict is not None else self.accelerator.unwrap_model(self.model)
        save_adapter(os.path.join(output_dir, ADAPTER_FILE), source, prefix=self._adapter_prefix)
        for name, content in self.folder_files.items():
            atomic_write_json(os.path.join(output_dir, name), content)
        atomic_write_text(os.path.join(output_dir, TRAINING_ARGS_FILE), self.args.to_json_string() + "\n")

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model=None) -> None:
        path = os.path.join(resume_from_checkpoint, ADAPTER_FILE)
        if not os.path.isfile(path):
            raise ValueError(f"resume_from_checkpoint: {resume_from_checkpoint} has no {ADAPTER_FILE}; expected "
                             "a checkpoint folder written by MoSETrainer")
        target = self.accelerator.unwrap_model(model if model is not None else self.model)
        with full_tensors_into_shards(target) if self.is_fsdp_enabled else contextlib.nullcontext():
            load_adapter(target, path)

    def _load_best_model(self) -> None:
        self._load_from_checkpoint(self.state.best_model_checkpoint)


@contextlib.contextmanager
def full_tensors_into_shards(model):
    """While active, ``model.load_state_dict`` takes full tensors for FSDP2's sharded (DTensor) parameters:
    each is distributed with its parameter's mesh and placements (a checkpoint holds full tensors)."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    sharded = {name: p for name, p in model.named_parameters() if isinstance(p, DTensor)}

    def shard(module, state_dict, prefix, *args):
        for name, tensor in list(state_dict.items()):
            param = sharded.get(name[len(prefix):]) if name.startswith(prefix) else None
            if param is not None and not isinstance(tensor, DTensor):
                state_dict[name] = distribute_tensor(tensor.to(param.dtype), param.device_mesh, param.placements)

    handle = model.register_load_state_dict_pre_hook(shard)
    try:
        yield
    finally:
        handle.remove()


def barrier() -> None:
    """Wait for every rank of a torch.distributed run; no-op outside one."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def is_main_process() -> bool:
    """True outside torch.distributed, and on rank 0 inside it."""
    import torch.distributed as dist

    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


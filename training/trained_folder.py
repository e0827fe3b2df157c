"""The folder ``mosear-train`` writes: the writing side of the format.

The format (files, ``backbone.json``) and its reading side, ``load_trained(folder) -> model`` and
``load_backbone``, live in ``mosear_fast.trained``, shared with ``mosear_fast.export``; they are
re-exported here so ``mosear_fast.training.load_trained`` keeps working.
"""

from __future__ import annotations

import os
from dataclasses import asdict
from pathlib import Path

from mosear_fast.atomic import atomic_save_tensors
from mosear_fast.trained import (
    ADAPTER_CONFIG_FILE,
    ADAPTER_FILE,
    AR_CONFIG_FILE,
    BACKBONE_FILE,
    BACKBONE_FORMAT,
    BACKBONE_WEIGHTS_FILE,
    BUILDER,
    load_backbone,
    load_trained,
)

PEFT_TASK_TYPE = "CAUSAL_LM"  # PeftModel.from_pretrained wraps the base in PeftModelForCausalLM


def adapter_config_fields(config, base_folder: str | None) -> dict:
    """The ``adapter_config.json`` content of a MoSEConfig, as ``PeftConfig.save_pretrained`` writes it:
    every field, ``base_model_name_or_path`` the base folder (None for the built-in model)."""
    import peft

    fields = config.to_dict()
    fields.update(base_model_name_or_path=base_folder, task_type=PEFT_TASK_TYPE, inference_mode=True,
                  peft_version=peft.__version__)
    return {k: (list(v) if isinstance(v, (tuple, set)) else v) for k, v in sorted(fields.items())}


def ar_config_fields(config) -> dict | None:
    """The JSON form of an ARConfig (tuples as lists), or None."""
    if config is None:
        return None
    out = {}
    for key, value in asdict(config).items():
        out[key] = list(value) if isinstance(value, tuple) else value
    return out


def backbone_reference(seed: int, sizes: dict, weights: str | None) -> dict:
    """``backbone.json`` of the built-in audio-visual LM."""
    return {"format": BACKBONE_FORMAT, "builder": BUILDER, "seed": int(seed), "sizes": dict(sizes),
            "weights": weights}


def folder_files(mose, ar, backbone: dict) -> dict[str, object]:
    """{file name: JSON content} of the configs and base reference (what every save writes)."""
    base_folder = backbone.get("path") if backbone.get("format") != BACKBONE_FORMAT else None
    return {ADAPTER_CONFIG_FILE: adapter_config_fields(mose, base_folder), AR_CONFIG_FILE: ar_config_fields(ar),
            BACKBONE_FILE: backbone}


def write_backbone_weights(folder: str | os.PathLike, model) -> str:
    """Save the backbone's full state dict (taken before MoSE is applied) beside the outputs."""
    atomic_save_tensors(Path(folder) / BACKBONE_WEIGHTS_FILE,
                        {k: v.detach().cpu() for k, v in model.state_dict().items()}, metadata={"format": "pt"})
    return BACKBONE_WEIGHTS_FILE


__all__ = [
    "ADAPTER_CONFIG_FILE", "ADAPTER_FILE", "AR_CONFIG_FILE", "BACKBONE_FILE", "BACKBONE_FORMAT",
    "BACKBONE_WEIGHTS_FILE", "BUILDER", "adapter_config_fields", "ar_config_fields", "backbone_reference",
    "folder_files", "load_backbone", "load_trained", "write_backbone_weights",
]

"""The folder ``mosear-train`` writes: the writing side of the format.

The format (files, ``backbone.json``) and its reading side, ``load_trained(folder) -> model`` and
``load_backbone``, live in ``mosear_fast.trained``, shared with ``mosear_fast.export``; they are
re-exported here so ``mosear_fast.training.load_trained`` keeps working.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, fields
from pathlib import Path

from mosear_fast.atomic import atomic_save_tensors, atomic_write_text
from mosear_fast.trained import (
    AR_CONFIG_FILE,
    BACKBONE_FILE,
    BACKBONE_FORMAT,
    BACKBONE_WEIGHTS_FILE,
    BUILDER,
    MOSE_CONFIG_FILE,
    load_backbone,
    load_trained,
)


def mose_config_fields(config) -> dict:
    """The JSON form of a MoSEConfig."""
    keep = {f.name for f in fields(config) if f.init}
    return {k: v for k, v in config.to_dict().items() if k in keep}


def ar_config_fields(config) -> dict | None:
    """The JSON form of an ARConfig (tuples as lists), or None."""
    if config is None:
        return None
    out = {}
    for key, value in asdict(config).items():
        out[key] = list(value) if isinstance(value, tuple) else value
    return out


def backbone_reference(seed: int, sizes: dict, weights: str | None) -> dict:
    return {"format": BACKBONE_FORMAT, "builder": BUILDER, "seed": int(seed), "sizes": dict(sizes),
            "weights": weights}


def folder_files(mose, ar, backbone: dict) -> dict[str, object]:
    """{file name: JSON content} of the configs and backbone reference (what every save writes)."""
    return {MOSE_CONFIG_FILE: mose_config_fields(mose), AR_CONFIG_FILE: ar_config_fields(ar),
            BACKBONE_FILE: backbone}


def write_backbone_weights(folder: str | os.PathLike, model) -> str:
    """Save the backbone's full state dict (taken before MoSE is applied) beside the outputs."""
    atomic_save_tensors(Path(folder) / BACKBONE_WEIGHTS_FILE,
                        {k: v.detach().cpu() for k, v in model.state_dict().items()}, metadata={"format": "pt"})
    return BACKBONE_WEIGHTS_FILE


def write_json(path: str | os.PathLike, content) -> None:
    atomic_write_text(path, json.dumps(content, indent=2) + "\n")


__all__ = [
    "AR_CONFIG_FILE", "BACKBONE_FILE", "BACKBONE_FORMAT", "BACKBONE_WEIGHTS_FILE", "BUILDER", "MOSE_CONFIG_FILE",
    "ar_config_fields", "backbone_reference", "folder_files", "load_backbone", "load_trained", "mose_config_fields",
    "write_backbone_weights", "write_json",
]

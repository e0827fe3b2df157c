"""The folder ``mosear-train`` writes, and ``load_trained(folder) -> model`` that rebuilds it.

Format (every file written atomically; JSON is UTF-8)::

    OUT/
      adapter.safetensors    MoSE adapter tensors keyed as in the model's state dict (A, B,
                             router_weight, router_bias, update_norm_ema, modality_weight): the
                             dynamic modality weights are frozen in it as training ended
      mose_config.json       MoSEConfig fields (``MoSEConfig(**fields)``)
      ar_config.json         ARConfig fields for inference, or JSON ``null`` (no AR)
      backbone.json          how to rebuild the frozen backbone, see below
      backbone.safetensors   the backbone's full weights, when they are not those its seed gives
      training_args.json     the transformers TrainingArguments used
      trainer_state.json     the Trainer's final state, with ``log_history`` (losses, weights, loads)
      checkpoint-<step>/     Trainer checkpoints: the files above except the backbone weights
                             (``backbone.json`` there points to ``../backbone.safetensors``), plus the
                             Trainer's resume state (optimizer.pt, scheduler.pt, rng_state.pth)

``backbone.json``: ``{"format": "mosear-av-lm/1", "builder": "mosear_fast.av_model.build_demo_model",
"seed": int, "sizes": {AVSizes fields}, "weights": path relative to this folder or null}``. With
``weights`` null the backbone is exactly ``build_demo_model(seed, **sizes)``. Only the project's
built-in audio-visual LM is a supported backbone so far.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, fields
from pathlib import Path

from mosear_fast.atomic import atomic_save_tensors, atomic_write_text

from .adapter_state import ADAPTER_FILE, load_adapter

MOSE_CONFIG_FILE, AR_CONFIG_FILE = "mose_config.json", "ar_config.json"
BACKBONE_FILE, BACKBONE_WEIGHTS_FILE = "backbone.json", "backbone.safetensors"
BACKBONE_FORMAT = "mosear-av-lm/1"
BUILDER = "mosear_fast.av_model.build_demo_model"


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


def _read_json(folder: Path, name: str, *, required: bool = True):
    path = folder / name
    if not path.is_file():
        if required:
            raise ValueError(f"folder: {folder} has no {name}; expected an output folder of mosear-train")
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from None


def load_backbone(folder: str | os.PathLike, reference: dict | None = None):
    """The frozen backbone (an ``AudioVisualLM``, eval mode) described by ``folder/backbone.json``."""
    from safetensors.torch import load_file

    from mosear_fast.av_model import build_demo_model

    folder = Path(folder)
    ref = reference if reference is not None else _read_json(folder, BACKBONE_FILE)
    if not isinstance(ref, dict) or ref.get("format") != BACKBONE_FORMAT or ref.get("builder") != BUILDER:
        raise ValueError(f"{folder / BACKBONE_FILE}: expected {{'format': {BACKBONE_FORMAT!r}, 'builder': "
                         f"{BUILDER!r}, 'seed', 'sizes', 'weights'}}, got {ref!r}")
    model, _ = build_demo_model(int(ref.get("seed", 0)), **dict(ref.get("sizes") or {}))
    if ref.get("weights"):
        path = folder / ref["weights"]
        if not path.is_file():
            raise ValueError(f"{folder / BACKBONE_FILE}: weights file {path} does not exist")
        model.load_state_dict(load_file(str(path)), strict=True)
    return model.eval()


def load_trained(folder: str | os.PathLike, *, ar: bool = True):
    """The trained model of a ``mosear-train`` output folder (or one of its checkpoints), eval mode:
    the backbone with MoSE applied, the adapter loaded (dynamic weights as trained) and, when the
    folder has an AR config and ``ar`` is True, AR installed. Pure inference from here."""
    from mosear_fast import ARConfig, MoSEConfig, apply_mosear

    folder = Path(folder)
    if not folder.is_dir():
        raise ValueError(f"folder: {folder} is not a folder; expected an output folder of mosear-train")
    mose_fields = _read_json(folder, MOSE_CONFIG_FILE)
    ar_fields = _read_json(folder, AR_CONFIG_FILE, required=False)
    model = load_backbone(folder)
    mose = MoSEConfig(**mose_fields)
    ar_config = ARConfig(**ar_fields) if (ar and ar_fields) else None
    apply_mosear(model.llm, mose=mose, ar=ar_config)
    if not (folder / ADAPTER_FILE).is_file():
        raise ValueError(f"folder: {folder} has no {ADAPTER_FILE}")
    load_adapter(model, folder / ADAPTER_FILE)
    return model.eval()

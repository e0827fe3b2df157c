"""Reading a ``mosear-train`` output folder: ``load_trained(folder) -> model``.

One implementation of the folder format's reading side, for every reader: ``mosear_fast.training``
(which writes the folders, ``training/trained_folder.py``, and reloads them) and
``mosear_fast.export`` (which exports them). Format (every file written atomically; JSON is UTF-8)::

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
"seed": int, "sizes": {AVSizes fields}, "weights": path relative to this folder (or absolute) or null}``.
With ``weights`` null the backbone is exactly ``build_demo_model(seed, **sizes)``. Only the project's
built-in audio-visual LM (``mosear_fast.av_model``) is a supported backbone so far.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

ADAPTER_MARK = ".mose_adapter."  # every adapter tensor's state-dict name contains it
ADAPTER_FILE = "adapter.safetensors"
MOSE_CONFIG_FILE, AR_CONFIG_FILE = "mose_config.json", "ar_config.json"
BACKBONE_FILE, BACKBONE_WEIGHTS_FILE = "backbone.json", "backbone.safetensors"
BACKBONE_FORMAT = "mosear-av-lm/1"
BUILDER = "mosear_fast.av_model.build_demo_model"


def is_trained_folder(folder: str | os.PathLike) -> bool:
    """Whether ``folder`` looks like a ``mosear-train`` output (or checkpoint) folder: it has ``backbone.json``."""
    return (Path(folder) / BACKBONE_FILE).is_file()


def adapter_state_dict(model_or_state) -> dict[str, torch.Tensor]:
    """The adapter tensors (detached, CPU, contiguous) of a model or of a full state dict."""
    state = model_or_state if isinstance(model_or_state, dict) else model_or_state.state_dict()
    out = {name: t.detach().cpu().contiguous() for name, t in state.items() if ADAPTER_MARK in f".{name}"}
    if not out:
        raise ValueError("model: has no MoSE adapter tensors (names containing '.mose_adapter.'); prepare it "
                         "with apply_mosear(model, mose=MoSEConfig(...)) first")
    return out


def read_safetensors(path: str | os.PathLike, what: str) -> dict[str, torch.Tensor]:
    """The tensors of a safetensors file; a file that is not one (truncated, another format) is a
    ValueError naming it and ``what`` it should be, not the library's own error."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(str(path))
    except (SafetensorError, OSError) as err:
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ValueError(f"{path}: not a readable safetensors file ({what}): {reason}") from None


def load_adapter(model, path: str | os.PathLike) -> None:
    """Load an adapter file into ``model`` (in place). Every adapter tensor of the model must be in the
    file with its shape, and the file must hold nothing else: a mismatch, or a file that is not
    safetensors, is a ValueError naming it."""
    tensors = read_safetensors(path, "the MoSE adapter tensors")
    expected = adapter_state_dict(model)
    missing, unexpected = sorted(set(expected) - set(tensors)), sorted(set(tensors) - set(expected))
    if missing or unexpected:
        raise ValueError(f"{path}: adapter tensors do not match the model (missing {missing[:5]}, unexpected "
                         f"{unexpected[:5]}); was it trained with the same backbone and MoSE config?")
    for name, t in tensors.items():
        if tuple(t.shape) != tuple(expected[name].shape):
            raise ValueError(f"{path}: {name} has shape {tuple(t.shape)}, the model expects "
                             f"{tuple(expected[name].shape)}")
    model.load_state_dict(tensors, strict=False)


def read_json(folder: str | os.PathLike, name: str, *, required: bool = True):
    """The JSON content of ``folder/name``; None when it is missing and not ``required`` (else ValueError)."""
    folder = Path(folder)
    path = folder / name
    if not path.is_file():
        if required:
            raise ValueError(f"folder: {folder} has no {name}; expected an output folder of mosear-train")
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from None


def read_configs(folder: str | os.PathLike):
    """``(MoSEConfig, ARConfig or None)`` of an output folder (``mose_config.json``, ``ar_config.json``)."""
    from .ar_config import ARConfig
    from .mose_config import MoSEConfig

    folder = Path(folder)
    mose_fields = read_json(folder, MOSE_CONFIG_FILE)
    ar_fields = read_json(folder, AR_CONFIG_FILE, required=False)
    for name, content in ((MOSE_CONFIG_FILE, mose_fields), (AR_CONFIG_FILE, ar_fields)):
        if content is not None and not isinstance(content, dict):
            raise ValueError(f"{folder / name}: expected a JSON object of config fields, got {content!r}")
    try:
        mose = MoSEConfig(**mose_fields)
        ar = ARConfig(**ar_fields) if ar_fields else None
    except TypeError as e:
        raise ValueError(f"{folder}: config fields do not match MoSEConfig/ARConfig ({e})") from None
    return mose, ar


def load_backbone(folder: str | os.PathLike, reference: dict | None = None):
    """The frozen backbone (an ``AudioVisualLM``, eval mode) described by ``folder/backbone.json``
    (or by ``reference``, its content)."""
    from .av_model import build_demo_model

    folder = Path(folder)
    ref = reference if reference is not None else read_json(folder, BACKBONE_FILE)
    if not isinstance(ref, dict) or ref.get("format") != BACKBONE_FORMAT or ref.get("builder") != BUILDER:
        raise ValueError(f"{folder / BACKBONE_FILE}: expected {{'format': {BACKBONE_FORMAT!r}, 'builder': "
                         f"{BUILDER!r}, 'seed', 'sizes', 'weights'}}, got {ref!r}")
    model, _ = build_demo_model(int(ref.get("seed", 0)), **dict(ref.get("sizes") or {}))
    if ref.get("weights"):
        path = folder / ref["weights"]
        if not path.is_file():
            raise ValueError(f"{folder / BACKBONE_FILE}: weights file {path} does not exist")
        state = read_safetensors(path, "the backbone weights backbone.json names")
        try:
            model.load_state_dict(state, strict=True)
        except RuntimeError as err:  # missing/unexpected keys or shapes: another backbone's weights
            raise ValueError(f"{path}: the weights do not fit the backbone of {folder / BACKBONE_FILE} "
                             f"({str(err).strip().splitlines()[0]})") from None
    return model.eval()


def load_trained(folder: str | os.PathLike, *, ar: bool = True):
    """The trained model of a ``mosear-train`` output folder (or one of its checkpoints), eval mode:
    the backbone with MoSE applied, the adapter loaded (dynamic weights as trained) and, when the
    folder has an AR config and ``ar`` is True, AR installed. Pure inference from here. A folder that
    is not such an output raises ValueError naming what is wrong."""
    from .apply import apply_mosear

    folder = Path(folder)
    if not folder.is_dir():
        raise ValueError(f"folder: {folder} is not a folder; expected an output folder of mosear-train")
    mose, ar_config = read_configs(folder)
    model = load_backbone(folder)
    apply_mosear(model.llm, mose=mose, ar=ar_config if ar else None)
    if not (folder / ADAPTER_FILE).is_file():
        raise ValueError(f"folder: {folder} has no {ADAPTER_FILE}")
    load_adapter(model, folder / ADAPTER_FILE)
    return model.eval()


__all__ = [
    "ADAPTER_FILE", "ADAPTER_MARK", "AR_CONFIG_FILE", "BACKBONE_FILE", "BACKBONE_FORMAT", "BACKBONE_WEIGHTS_FILE",
    "BUILDER", "MOSE_CONFIG_FILE", "adapter_state_dict", "is_trained_folder", "load_adapter", "load_backbone",
    "load_trained", "read_configs", "read_json", "read_safetensors",
]

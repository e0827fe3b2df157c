"""Reading a ``mosear-train`` output folder: ``load_trained(folder) -> model``.

One implementation of the folder format's reading side, for every reader: ``mosear_fast.training``
(which writes the folders, ``training/trained_folder.py``, and reloads them) and
``mosear_fast.export`` (which exports them). Format (every file written atomically; JSON is UTF-8)::

    OUT/
      adapter_config.json        PEFT's adapter config: the MoSEConfig fields, ``peft_type`` "MOSE",
                                 ``task_type`` "CAUSAL_LM", ``base_model_name_or_path`` (the base folder,
                                 absolute; null for the built-in model)
      adapter_model.safetensors  the MoSE adapter tensors under PEFT's names,
                                 ``base_model.model.<module>.mose_adapter.<tensor>`` (A, B, router_weight,
                                 router_bias, update_norm_ema, modality_weight): the dynamic modality
                                 weights are frozen in it as training ended
      ar_config.json             ARConfig fields for inference, or JSON ``null`` (no AR)
      backbone.json              the frozen base model, see below
      backbone.safetensors       the built-in model's weights, when they are not those its seed gives
      training_args.json         the transformers TrainingArguments used
      trainer_state.json         the Trainer's final state, with ``log_history`` (losses, weights, loads)
      checkpoint-<step>/         Trainer checkpoints: the files above except the backbone weights
                                 (``backbone.json`` there points to ``../backbone.safetensors``), plus the
                                 Trainer's resume state (optimizer.pt, scheduler.pt, rng_state.pth)

So the folder is a PEFT adapter folder: ``PeftModel.from_pretrained(base, OUT)`` loads MoSE onto the
base (after ``import mosear_fast``, which registers the MoSE method with PEFT); AR is not a PEFT
concept: ``load_trained`` adds it from ``ar_config.json``.

``backbone.json``, one of:

- a Hugging Face model folder: ``{"format": "transformers-folder/1", "path": absolute folder,
  "class": transformers class name}`` (``mosear_fast.base_model``); MoSE sits on that model;
- the built-in audio-visual LM: ``{"format": "mosear-av-lm/1", "builder":
  "mosear_fast.av_model.build_demo_model", "seed": int, "sizes": {AVSizes fields}, "weights": path
  relative to this folder (or absolute) or null}``; with ``weights`` null the model is exactly
  ``build_demo_model(seed, **sizes)``. MoSE sits on its language model ``model.llm`` (the PEFT base
  is ``load_base(OUT)[1]``).

Folders of the first format (before the PEFT layout: ``mose_config.json`` + ``adapter.safetensors``
keyed by the model's own state-dict names) still load.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

ADAPTER_MARK = ".mose_adapter."  # every adapter tensor's state-dict name contains it
ADAPTER_FILE, ADAPTER_CONFIG_FILE = "adapter_model.safetensors", "adapter_config.json"  # PEFT's names
AR_CONFIG_FILE = "ar_config.json"
BACKBONE_FILE, BACKBONE_WEIGHTS_FILE = "backbone.json", "backbone.safetensors"
BACKBONE_FORMAT = "mosear-av-lm/1"
BUILDER = "mosear_fast.av_model.build_demo_model"
PEFT_PREFIX = "base_model.model."  # PEFT's key prefix in adapter_model.safetensors
DEFAULT_ADAPTER = "default"
# The first format (before the PEFT layout): still read.
LEGACY_ADAPTER_FILE, MOSE_CONFIG_FILE = "adapter.safetensors", "mose_config.json"


def is_trained_folder(folder: str | os.PathLike) -> bool:
    """Whether ``folder`` looks like a ``mosear-train`` output (or checkpoint) folder: it has ``backbone.json``."""
    return (Path(folder) / BACKBONE_FILE).is_file()


def adapter_state_dict(model_or_state) -> dict[str, torch.Tensor]:
    """The adapter tensors (detached, CPU, contiguous) of a model or of a full state dict, under the
    model's own state-dict names (adapter name included)."""
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


def adapted_prefix(model) -> str:
    """The state-dict prefix of the module ``apply_mosear`` was given ("" for the model itself, "llm." for
    the built-in audio-visual LM): the outermost module that holds the modality context."""
    for name, module in model.named_modules():
        if getattr(module, "_mosear_context", None) is not None:
            return f"{name}." if name else ""
    raise ValueError(f"model: {type(model).__name__} has no module prepared with apply_mosear")


def to_peft_keys(adapter_state: dict, prefix: str, adapter_name: str = DEFAULT_ADAPTER) -> dict:
    """Model state-dict names -> PEFT's saved names: relative to the adapted module (``prefix``), the adapter
    name dropped, ``base_model.model.`` in front (what ``PeftModel.save_pretrained`` writes)."""
    out = {}
    for name, tensor in adapter_state.items():
        if not name.startswith(prefix):
            raise ValueError(f"model: adapter tensor {name} is outside the adapted module {prefix[:-1]!r}")
        out[PEFT_PREFIX + name[len(prefix):].replace(f"{ADAPTER_MARK}{adapter_name}.", ADAPTER_MARK)] = tensor
    return out


def from_peft_keys(peft_state: dict, prefix: str, adapter_name: str = DEFAULT_ADAPTER) -> dict:
    """The inverse of ``to_peft_keys``."""
    out = {}
    for name, tensor in peft_state.items():
        if not name.startswith(PEFT_PREFIX) or ADAPTER_MARK not in name:
            raise ValueError(f"adapter: {name} is not a PEFT MoSE tensor name ({PEFT_PREFIX}<module>"
                             f"{ADAPTER_MARK}<tensor>)")
        out[prefix + name[len(PEFT_PREFIX):].replace(ADAPTER_MARK, f"{ADAPTER_MARK}{adapter_name}.")] = tensor
    return out


def load_adapter(model, path: str | os.PathLike, *, prefix: str | None = None) -> None:
    """Load an adapter file into ``model`` (in place): PEFT's names (``adapter_model.safetensors``, mapped
    onto the module at ``prefix``, default: the one ``apply_mosear`` prepared) or the first format's
    state-dict names. Every adapter tensor of the model must be in the file with its shape, and the file
    must hold nothing else: a mismatch, or a file that is not safetensors, is a ValueError naming it."""
    tensors = read_safetensors(path, "the MoSE adapter tensors")
    if any(name.startswith(PEFT_PREFIX) for name in tensors):
        tensors = from_peft_keys(tensors, adapted_prefix(model) if prefix is None else prefix)
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


def mose_config_from_dict(fields: dict):
    """A MoSEConfig from ``adapter_config.json`` content: PEFT's bookkeeping keys (``peft_type``,
    ``base_model_name_or_path``, ``peft_version``, ...) are set by PEFT, not passed."""
    from dataclasses import fields as dataclass_fields

    from .mose_config import MoSEConfig

    bookkeeping = {"peft_type", "peft_version", "auto_mapping", "base_model_name_or_path", "revision",
                   "inference_mode", "task_type"}
    known = {f.name for f in dataclass_fields(MoSEConfig) if f.init} - bookkeeping
    unknown = sorted(set(fields) - known - bookkeeping)
    if unknown:
        raise TypeError(f"unexpected keyword arguments {unknown}")
    return MoSEConfig(**{k: v for k, v in fields.items() if k in known})


def read_configs(folder: str | os.PathLike):
    """``(MoSEConfig, ARConfig or None)`` of an output folder (``adapter_config.json``, or the first
    format's ``mose_config.json``; ``ar_config.json``)."""
    from .ar_config import ARConfig

    folder = Path(folder)
    name = ADAPTER_CONFIG_FILE if (folder / ADAPTER_CONFIG_FILE).is_file() else MOSE_CONFIG_FILE
    if not (folder / name).is_file():
        raise ValueError(f"folder: {folder} has no {ADAPTER_CONFIG_FILE} (nor the {MOSE_CONFIG_FILE} of a folder "
                         "of the first format); expected an output folder of mosear-train")
    mose_fields = read_json(folder, name)
    ar_fields = read_json(folder, AR_CONFIG_FILE, required=False)
    for file, content in ((name, mose_fields), (AR_CONFIG_FILE, ar_fields)):
        if content is not None and not isinstance(content, dict):
            raise ValueError(f"{folder / file}: expected a JSON object of config fields, got {content!r}")
    try:
        mose = mose_config_from_dict(mose_fields)
        ar = ARConfig(**ar_fields) if ar_fields else None
    except TypeError as e:
        raise ValueError(f"{folder}: config fields do not match MoSEConfig/ARConfig ({e})") from None
    return mose, ar


def load_backbone(folder: str | os.PathLike, reference: dict | None = None):
    """The frozen built-in backbone (an ``AudioVisualLM``, eval mode) described by ``folder/backbone.json``
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


def load_base(folder: str | os.PathLike):
    """``(model, adapted module)`` of ``folder/backbone.json``, without MoSE: a Hugging Face model (both are
    the model) or the built-in audio-visual LM (the adapted module is its ``llm``)."""
    from .base_model import HF_FORMAT, load_base_model

    folder = Path(folder)
    ref = read_json(folder, BACKBONE_FILE)
    if isinstance(ref, dict) and ref.get("format") == HF_FORMAT:
        model = load_base_model(ref, name=str(folder / BACKBONE_FILE))
        return model, model
    model = load_backbone(folder, ref)
    return model, model.llm


def load_trained(folder: str | os.PathLike, *, ar: bool = True):
    """The trained model of a ``mosear-train`` output folder (or one of its checkpoints), eval mode:
    the base with MoSE applied, the adapter loaded (dynamic weights as trained) and, when the
    folder has an AR config and ``ar`` is True, AR installed. Pure inference from here. A folder that
    is not such an output raises ValueError naming what is wrong."""
    from .apply import apply_mosear

    folder = Path(folder)
    if not folder.is_dir():
        raise ValueError(f"folder: {folder} is not a folder; expected an output folder of mosear-train")
    mose, ar_config = read_configs(folder)
    adapter = next((folder / name for name in (ADAPTER_FILE, LEGACY_ADAPTER_FILE) if (folder / name).is_file()),
                   None)
    if adapter is None:
        raise ValueError(f"folder: {folder} has no {ADAPTER_FILE}")
    model, adapted = load_base(folder)
    apply_mosear(adapted, mose=mose, ar=ar_config if ar else None)
    load_adapter(model, adapter)
    return model.eval()


__all__ = [
    "ADAPTER_CONFIG_FILE", "ADAPTER_FILE", "ADAPTER_MARK", "AR_CONFIG_FILE", "BACKBONE_FILE", "BACKBONE_FORMAT",
    "BACKBONE_WEIGHTS_FILE", "BUILDER", "LEGACY_ADAPTER_FILE", "MOSE_CONFIG_FILE", "PEFT_PREFIX",
    "adapted_prefix", "adapter_state_dict", "from_peft_keys", "is_trained_folder", "load_adapter", "load_backbone",
    "load_base", "load_trained", "mose_config_from_dict", "read_configs", "read_json", "read_safetensors",
    "to_peft_keys",
]

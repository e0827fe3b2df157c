"""``mosear-train``'s settings: one table of fields, read from a YAML file and/or flags (flags win).

Every field is a flag ``--name-with-dashes`` and a YAML key ``name_with_underscores``; the table's
help text is what ``--help`` prints. Validation turns every bad value into a ValueError naming the
field and the expected form.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass

SCHEDULERS = ("linear", "cosine", "constant", "constant_with_warmup")
PRECISIONS = ("fp32", "bf16", "fp16")
ROUTINGS = ("token", "sequence")


@dataclass(frozen=True)
class Field:
    name: str
    kind: str  # "str", "int", "float", "bool", "list", "dict", "path"
    default: object
    help: str
    choices: tuple | None = None
    low: float | None = None
    item: str | None = None  # kind of a list's elements ("str", "float", ...)
    length: int | None = None  # a list's exact length


FIELDS = (
    Field("output_dir", "path", None, "output folder (required): a PEFT adapter folder (adapter_config.json, "
          "adapter_model.safetensors), ar_config.json, backbone.json (the base model), checkpoints"),
    Field("model", "path", None, "a Hugging Face model folder (save_pretrained: LLaMA, Qwen2, Mistral, ..., the "
          "Qwen2.5-Omni thinker) to fit MoSE on, loaded with its own class; default: the built-in audio-visual "
          "LM (the backbone_* fields)"),
    Field("train_data", "str", "synthetic", "training data. With --model: a JSONL file of rows {id, input_ids, "
          "labels, modality_ids?} or {id, prompt, answer} (+ features: a safetensors file of the model's "
          "multimodal inputs), see mosear_fast.training.token_rows. Built-in model: a manifest.jsonl (mosear "
          "data format) or 'synthetic' (a balanced synthetic CA-MER draw)"),
    Field("synthetic_samples", "int", 1200, "samples of the 'synthetic' training data", low=3),
    Field("data_seed", "int", 0, "seed of the 'synthetic' training data"),
    Field("backbone_seed", "int", 0, "seed of the built-in audio-visual LM (mosear_fast.av_model)"),
    Field("backbone_sizes", "dict", {}, "AVSizes fields of the backbone, e.g. {n_visual: 32, hidden: 64}"),
    Field("backbone_weights", "path", None, "safetensors file of trained backbone weights (e.g. a demo's "
          "mose/backbone.safetensors); default: the seed's random weights"),
    Field("rank", "int", 8, "MoSE LoRA rank r", low=1),
    Field("alpha", "float", 16.0, "MoSE scale numerator: s = alpha / r"),
    Field("num_experts", "int", 4, "expert up-projections per modality", low=1),
    Field("top_k", "int", 1, "experts per routing unit (1 or 2)", choices=(1, 2)),
    Field("routing", "str", "token", "router granularity", choices=ROUTINGS),
    Field("target_modules", "list", ["q_proj", "v_proj"], "linear layers that get adapters (names)", item="str"),
    Field("dropout", "float", 0.0, "dropout on the adapter input", low=0.0),
    Field("load_balance_coef", "float", 0.01, "weight of the load-balance loss", low=0.0),
    Field("z_loss_coef", "float", 0.001, "weight of the router z-loss", low=0.0),
    Field("dynamic_weights", "bool", True, "balance the visual/audio adapter updates with dynamic weights"),
    Field("beta", "float", 0.9, "EMA decay of the update norms", low=0.0),
    Field("gamma", "float", 1.0, "exponent of the dynamic weights", low=0.0),
    Field("weight_clip", "list", [0.5, 2.0], "(w_min, w_max) of the dynamic weights", item="float", length=2),
    Field("ar", "bool", True, "store an AR config for inference in the output folder"),
    Field("ar_strength", "float", 0.5, "AR strength in [0, 1] for inference", low=0.0),
    Field("ar_training", "bool", False, "also run AR while training (the adapters then learn under the attention "
          "the model uses at inference; the logs get attention shares)"),
    Field("epochs", "float", 3.0, "training epochs", low=0.0),
    Field("max_steps", "int", -1, "stop after this many optimizer steps (-1: run the epochs)"),
    Field("batch_size", "int", 32, "samples per device per micro-step", low=1),
    Field("grad_accum", "int", 1, "micro-steps per optimizer step", low=1),
    Field("learning_rate", "float", 3e-3, "peak learning rate (AdamW)", low=0.0),
    Field("weight_decay", "float", 0.0, "AdamW weight decay", low=0.0),
    Field("warmup_steps", "int", 0, "linear warm-up steps", low=0),
    Field("lr_scheduler", "str", "linear", "learning-rate schedule", choices=SCHEDULERS),
    Field("precision", "str", "fp32", "mixed precision of the forward (bf16/fp16 need hardware support)",
          choices=PRECISIONS),
    Field("seed", "int", 0, "seed of the adapters' initialisation and of the data order"),
    Field("logging_steps", "int", 10, "log every this many optimizer steps", low=1),
    Field("save_steps", "int", 0, "checkpoint every this many steps (0: no checkpoints)", low=0),
    Field("save_total_limit", "int", 2, "checkpoints kept (oldest deleted first)", low=1),
    Field("resume", "str", None, "a checkpoint folder to resume from, or 'last' (the latest in output_dir)"),
    Field("num_workers", "int", 0, "DataLoader worker processes", low=0),
    Field("fsdp", "bool", False, "shard parameters, gradients and optimizer state with FSDP2 (the Trainer's, "
          "through accelerate); needs a multi-process launch (torchrun) on GPUs"),
    Field("progress", "bool", True, "show progress bars"),
)
BY_NAME = {f.name: f for f in FIELDS}


_FORMS = {"str": "a non-empty string", "path": "a path", "int": "an integer", "float": "a finite number",
          "bool": "true or false", "list": "a list (YAML list, JSON list or comma-separated)",
          "dict": "a mapping (YAML mapping or JSON object) with string keys"}
_ITEM_FORMS = {"str": "non-empty strings", "float": "finite numbers", "int": "integers"}


def check_value(field: Field, value):
    """``value`` converted to the field's kind, or ValueError naming the field."""
    name = field.name
    if value is None and (field.default is None or field.kind == "path"):
        return None
    try:
        out = _convert(field.kind, value)
    except (TypeError, ValueError):
        raise ValueError(f"{name}: expected {_FORMS[field.kind]}, got {value!r}") from None
    if field.kind == "list" and field.item is not None:
        if field.length is not None and len(out) != field.length:
            raise ValueError(f"{name}: expected a list of {field.length} items, got {value!r}")
        try:
            out = [_convert(field.item, v) for v in out]
        except (TypeError, ValueError):
            raise ValueError(f"{name}: expected a list of {_ITEM_FORMS[field.item]}, got {value!r}") from None
    if field.choices is not None and out not in field.choices:
        raise ValueError(f"{name}: expected one of {list(field.choices)}, got {out!r}")
    if field.low is not None and out < field.low:
        raise ValueError(f"{name}: expected a value >= {field.low}, got {out!r}")
    return out


def _convert(kind: str, value):
    """``value`` as ``kind``; TypeError or ValueError when it is not one."""
    if kind in ("str", "path"):
        if not isinstance(value, str) or not value:
            raise TypeError
        return value
    if kind == "int":
        if isinstance(value, bool) or not (isinstance(value, int) or (isinstance(value, str) and
                                                                     value.lstrip("-").isdigit())):
            raise TypeError
        return int(value)
    if kind == "float":
        if isinstance(value, bool):
            raise TypeError
        out = float(value)
        if not math.isfinite(out):
            raise ValueError
        return out
    if kind == "bool":
        if isinstance(value, str) and value.lower() in ("true", "false", "yes", "no", "1", "0"):
            return value.lower() in ("true", "yes", "1")
        if isinstance(value, bool):
            return value
        raise TypeError
    if kind == "list":
        out = json.loads(value) if isinstance(value, str) and value.startswith("[") else value
        if isinstance(out, str):
            out = [v for v in out.split(",") if v]
        if not isinstance(out, list) or not out:
            raise TypeError
        return out
    out = json.loads(value) if isinstance(value, str) else value  # dict
    if not isinstance(out, dict) or not all(isinstance(k, str) for k in out):
        raise TypeError
    return out


def resolve_settings(yaml_values: dict, flag_values: dict) -> dict:
    """Defaults <- YAML <- flags, every value checked; ValueError for unknown keys or bad values."""
    unknown = sorted(set(yaml_values) - set(BY_NAME))
    if unknown:
        raise ValueError(f"config: unknown fields {unknown}; see mosear-train --help for the fields")
    settings = {f.name: f.default for f in FIELDS}
    for source in (yaml_values, flag_values):
        for key, value in source.items():
            settings[key] = check_value(BY_NAME[key], value)
    if settings["output_dir"] is None:
        raise ValueError("output_dir: required (--output-dir DIR or output_dir: in the YAML config)")
    if not 0.0 <= settings["ar_strength"] <= 1.0:
        raise ValueError(f"ar_strength: expected a number in [0, 1], got {settings['ar_strength']}")
    if settings["top_k"] > settings["num_experts"]:
        raise ValueError(f"top_k: expected <= num_experts={settings['num_experts']}, got {settings['top_k']}")
    return settings

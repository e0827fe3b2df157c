"""Hugging Face model folders as frozen bases for MoSE: loading one with its own class, and its tokenizer.

A base is a local folder written by ``save_pretrained`` (``config.json`` + weights, and for text
models the tokenizer files). The model class is the one the folder's config names
(``config.architectures[0]``: ``LlamaForCausalLM``, ``Qwen2ForCausalLM``, the Qwen2.5-Omni thinker
``Qwen2_5OmniThinkerForConditionalGeneration``, ...; for a whole Qwen2.5-Omni checkpoint, its
thinker), else ``AutoModelForCausalLM``'s choice for the config type. Models load in float32 with
``attn_implementation="sdpa"`` (what AR replaces), in eval mode, offline (``local_files_only``).
Every problem is a ValueError naming the folder.

``base_reference`` is what a ``mosear-train`` output folder stores about such a base (its
``backbone.json``, format ``transformers-folder/1``); ``mosear_fast.trained`` reads it back.
"""

from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path

HF_FORMAT = "transformers-folder/1"


def _config_dict(folder: Path, name: str) -> dict:
    path = folder / "config.json"
    if not folder.is_dir():
        raise ValueError(f"{name}: {folder} is not a folder; expected a Hugging Face model folder (save_pretrained)")
    if not path.is_file():
        raise ValueError(f"{name}: {folder} has no config.json; expected a Hugging Face model folder "
                         "(save_pretrained)")
    try:
        content = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{name}: {path} is not readable JSON ({e})") from None
    if not isinstance(content, dict):
        raise ValueError(f"{name}: {path} holds {type(content).__name__}, expected a JSON object")
    return content


# Composite checkpoints whose MoSE-relevant part is one model of its own: an Omni model's thinker reads
# the audio, video and text and writes the answer (its talker only speaks the answer), and the thinker
# class loads its weights straight from the full checkpoint.
TRAINED_PART = {
    "Qwen2_5OmniForConditionalGeneration": "Qwen2_5OmniThinkerForConditionalGeneration",
    "Qwen3OmniMoeForConditionalGeneration": "Qwen3OmniMoeThinkerForConditionalGeneration",
}


def model_class_name(folder: str | os.PathLike, *, name: str = "model") -> str:
    """The transformers class that loads ``folder``: ``config.architectures[0]`` when transformers has it
    (an Omni checkpoint's thinker class, see ``TRAINED_PART``), else ``AutoModelForCausalLM``'s class for
    the config's ``model_type``."""
    import transformers
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    folder = Path(folder)
    config = _config_dict(folder, name)
    for architecture in config.get("architectures") or ():
        architecture = TRAINED_PART.get(architecture, architecture) if isinstance(architecture, str) else None
        if architecture is not None and hasattr(transformers, architecture):
            return architecture
    model_type = config.get("model_type")
    causal = MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.get(model_type) if isinstance(model_type, str) else None
    if causal is None:
        raise ValueError(f"{name}: {folder}/config.json names no model class this transformers "
                         f"{transformers.__version__} has (architectures {config.get('architectures')!r}, "
                         f"model_type {model_type!r})")
    return causal


def base_reference(folder: str | os.PathLike, *, name: str = "model") -> dict:
    """``{"format", "path" (absolute), "class"}``: how ``load_base_model`` finds this base again."""
    folder = Path(folder)
    return {"format": HF_FORMAT, "path": str(folder.resolve()), "class": model_class_name(folder, name=name)}


def load_text_config(reference: dict, *, name: str = "model"):
    """The base's configuration of its language model (``get_text_config()``: vocabulary size, positions),
    read without loading weights."""
    from transformers import AutoConfig

    folder = Path(str(reference.get("path")))
    _config_dict(folder, name)
    try:
        config = AutoConfig.from_pretrained(str(folder), local_files_only=True)
    except (OSError, ValueError, KeyError, TypeError) as e:
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ValueError(f"{name}: {folder}/config.json does not load ({reason})") from None
    return config.get_text_config() if hasattr(config, "get_text_config") else config


def load_base_model(reference: dict, *, name: str = "model"):
    """The model of a ``base_reference``: its class, float32, sdpa attention, eval mode, every parameter frozen."""
    import torch
    import transformers

    folder, class_name = Path(str(reference.get("path"))), reference.get("class")
    _config_dict(folder, name)
    model_class = getattr(transformers, class_name, None) if isinstance(class_name, str) else None
    if model_class is None or not hasattr(model_class, "from_pretrained"):
        raise ValueError(f"{name}: {class_name!r} is not a model class of transformers {transformers.__version__}")
    try:
        model = model_class.from_pretrained(str(folder), dtype=torch.float32, attn_implementation="sdpa",
                                            local_files_only=True)
    except (OSError, ValueError, KeyError, TypeError, RuntimeError) as e:
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ValueError(f"{name}: {folder} does not load as {class_name} ({reason})") from None
    model.requires_grad_(False)
    return model.eval()


def has_tokenizer(folder: str | os.PathLike) -> bool:
    """Whether the folder holds tokenizer files (``tokenizer.json`` or ``tokenizer_config.json``)."""
    return any((Path(folder) / file).is_file() for file in ("tokenizer.json", "tokenizer_config.json"))


def load_tokenizer(folder: str | os.PathLike, *, name: str = "model"):
    """The tokenizer saved in a model folder (``AutoTokenizer``, offline). Right padding is set; callers
    that generate switch to left padding."""
    from transformers import AutoTokenizer

    folder = Path(folder)
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    except (OSError, ValueError, KeyError, TypeError) as e:
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ValueError(f"{name}: {folder} has no tokenizer that loads ({reason}); rows of the "
                         "prompt/answer form need the model folder's tokenizer files") from None
    if isinstance(tokenizer, bool) or not callable(tokenizer):
        raise ValueError(f"{name}: {folder} has no tokenizer")
    return tokenizer


@contextlib.contextmanager
def transformers_progress(enabled: bool):
    """transformers' own progress bars (loading weights, writing shards) on or off while the block runs."""
    from transformers.utils import logging

    before = logging.is_progress_bar_enabled()
    (logging.enable_progress_bar if enabled else logging.disable_progress_bar)()
    try:
        yield
    finally:
        (logging.enable_progress_bar if before else logging.disable_progress_bar)()


__all__ = ["HF_FORMAT", "TRAINED_PART", "base_reference", "has_tokenizer", "load_base_model", "load_text_config",
           "load_tokenizer", "model_class_name", "transformers_progress"]

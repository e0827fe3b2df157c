"""What can be exported, and the exact module that is: ``load_source(source) -> (module, example_inputs)``.

Sources:

- ``"demo"``: the built-in default model (``build_demo_model``): a tiny LLaMA with MoSE adapters on
  q/v and AR on every layer, seeded, B drawn non-zero so the adapters change the output. The
  training demo builds its starting point with the same function.
- a Hugging Face model folder (``config.json``) plus ``adapter=DIR``, a PEFT MoSE adapter folder
  (``adapter_config.json``, as ``save_pretrained`` writes it); an optional ``ar_config.json``
  (ARConfig fields) in the adapter folder turns AR on.
- a PEFT MoSE adapter folder whose ``adapter_config.json`` names a local base model folder
  (``base_model_name_or_path``), with the same optional ``ar_config.json``. The ``mosear-train``
  folder format (``backbone.json``, training/trained_folder.py) is recognised and refused with a
  clear error for now: its audio-visual backbone needs feature inputs in the graph.
- an ``nn.Module`` already prepared with ``apply_mosear`` (Python API only).

The exported module is always ``ExportModule``: ``(input_ids, attention_mask, modality_ids) -> logits``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

DEMO_SEED = 0
DEMO_VOCAB = 128
DEMO_EXAMPLE_SHAPE = (2, 16)
AR_CONFIG_FILE = "ar_config.json"


class SourceError(ValueError):
    """The source cannot be loaded (unknown name, missing folder or file, unreadable config)."""


class ExportModule(torch.nn.Module):
    """The graph's signature around a prepared causal LM: three (B, T) int64 inputs, logits out."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model

    def forward(self, input_ids, attention_mask, modality_ids):
        return self.model(input_ids=input_ids, attention_mask=attention_mask, modality_ids=modality_ids,
                          use_cache=False).logits


@dataclass(frozen=True)
class InputSpec:
    """One integer input of the graph: valid values are [low, high)."""

    name: str
    low: int
    high: int


def input_specs(module: ExportModule) -> list[InputSpec]:
    """The graph's inputs with their valid ranges, read from the model's config and modality context."""
    model = module.model
    vocab = int(model.config.get_text_config().vocab_size if hasattr(model.config, "get_text_config")
                else model.config.vocab_size)
    context = getattr(model, "_mosear_context", None)
    n_mod = context.num_modalities if context is not None else 1
    return [InputSpec("input_ids", 0, vocab), InputSpec("attention_mask", 0, 2),
            InputSpec("modality_ids", -1, n_mod)]


def build_demo_model(seed: int = DEMO_SEED) -> torch.nn.Module:
    """The built-in default model: tiny LLaMA (hidden 64, 2 layers, 4 heads, 2 KV heads, vocab 128)
    with MoSE (r 4, 4 experts, top-2, on q_proj/v_proj, B non-zero) and AR (strength 0.5), eval mode.
    Deterministic for a given seed (the global RNG is left untouched)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from mosear_fast import ARConfig, MoSEConfig, apply_mosear

    config = LlamaConfig(vocab_size=DEMO_VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                         pad_token_id=0, bos_token_id=1, eos_token_id=2, tie_word_embeddings=False)
    config._attn_implementation = "sdpa"
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
        apply_mosear(model, mose=MoSEConfig(r=4, num_experts=4, top_k=2, init_weights=False),
                     ar=ARConfig(strength=0.5))
    return model.eval()


def example_inputs(module: ExportModule, batch: int, length: int, *, seed: int = 0):
    """Random valid inputs (input_ids, attention_mask, modality_ids), each (batch, length) int64.

    Ids are uniform in their range; the mask pads a random prefix of each row (left padding, at
    least one real token) and the padded positions get modality -1, as a tokenizer would give them.
    """
    g = torch.Generator().manual_seed(seed)
    specs = {s.name: s for s in input_specs(module)}
    ids = torch.randint(specs["input_ids"].low, specs["input_ids"].high, (batch, length), generator=g)
    modality = torch.randint(0, specs["modality_ids"].high, (batch, length), generator=g)
    pad = torch.randint(0, max(1, length // 3), (batch,), generator=g)
    mask = (torch.arange(length) >= pad[:, None]).long()
    modality = modality.masked_fill(mask == 0, -1)
    return ids, mask, modality


def load_source(source, *, adapter=None):
    """``(module, example_inputs)``: the ``ExportModule`` that is exported and a tuple of example inputs."""
    if isinstance(source, torch.nn.Module):
        model = source.get_base_model() if hasattr(source, "get_base_model") else source
    elif source == "demo":
        model = build_demo_model()
    else:
        model = _load_folder(source, adapter)
    module = ExportModule(model.eval()).eval()
    return module, example_inputs(module, *DEMO_EXAMPLE_SHAPE)


def _load_folder(source, adapter):
    path = Path(str(source))
    if not path.is_dir():
        raise SourceError(f"SOURCE: expected 'demo', a mosear-train output folder or a Hugging Face model folder, "
                          f"got {str(source)!r} (not a folder)")
    if (path / "backbone.json").is_file():
        # training/trained_folder.py's format (backbone.json + adapter.safetensors + mose/ar configs): its
        # audio-visual backbone takes feature inputs, a graph signature this exporter does not write yet.
        raise SourceError(f"SOURCE: {path} is a mosear-train output folder (backbone.json); exporting its "
                          "audio-visual backbone is not supported yet; export 'demo' or a Hugging Face model "
                          "folder with --adapter")
    if (path / "config.json").is_file():
        if adapter is None:
            raise SourceError(f"--adapter: {path} is a Hugging Face model folder; pass --adapter DIR, the MoSE "
                              "adapter folder to export with it")
        return _load_with_adapter(path, Path(str(adapter)))
    if (path / "adapter_config.json").is_file():
        base = _read_json(path / "adapter_config.json").get("base_model_name_or_path")
        if not base or not (Path(base) / "config.json").is_file():
            raise SourceError(f"SOURCE: {path}/adapter_config.json names base model {base!r}, which is not a local "
                              "Hugging Face model folder; pass the base folder as SOURCE and --adapter "
                              f"{path}")
        return _load_with_adapter(Path(base), path)
    raise SourceError(f"SOURCE: {path} holds neither config.json (a Hugging Face model) nor adapter_config.json "
                      "(a mosear-train output)")


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise SourceError(f"{path}: unreadable JSON ({err})") from None


def _load_with_adapter(base: Path, adapter: Path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from mosear_fast import ARConfig, apply_mosear
    from mosear_fast.mose_config import PEFT_TYPE

    if not (adapter / "adapter_config.json").is_file():
        raise SourceError(f"--adapter: expected a MoSE adapter folder with adapter_config.json, got {str(adapter)!r}")
    if _read_json(adapter / "adapter_config.json").get("peft_type") != PEFT_TYPE:
        raise SourceError(f"--adapter: {adapter} is not a MoSE adapter (peft_type must be {PEFT_TYPE!r})")
    model = AutoModelForCausalLM.from_pretrained(base, attn_implementation="sdpa", dtype=torch.float32)
    model = PeftModel.from_pretrained(model, adapter).get_base_model()
    if (adapter / AR_CONFIG_FILE).is_file():
        fields = _read_json(adapter / AR_CONFIG_FILE)
        try:
            ar = ARConfig(**fields)
        except TypeError as err:
            raise SourceError(f"{adapter / AR_CONFIG_FILE}: {err}") from None
        apply_mosear(model, ar=ar)
    return model.eval()

"""What can be exported, and the exact module that is: ``load_source(source) -> (module, example_inputs)``.

Sources:

- ``"demo"``: the built-in default model, the one ``mosear-demo`` trains (``build_demo_model``): the
  audio-visual LM of ``mosear_fast.av_model`` with the demo's sizes, MoSE adapters and AR
  (``mosear_fast.demo_config``, the values the demo reads too). Weights are drawn from a seed, MoSE's
  B included (non-zero, so the adapters change the output); to export the demo's *trained* model, pass
  its output folder ``demo-output/mose/`` (a ``mosear-train`` folder).
- a ``mosear-train`` output folder (or one of its ``checkpoint-<step>`` folders): ``backbone.json``,
  ``adapter.safetensors``, ``mose_config.json``, ``ar_config.json``, read by ``mosear_fast.trained``
  (``load_trained``, the reader ``mosear_fast.training`` uses too); AR as the folder's config says.
- a Hugging Face causal-LM folder (``config.json``) plus ``adapter=DIR``, a PEFT MoSE adapter folder
  (``adapter_config.json``, as ``save_pretrained`` writes it); an optional ``ar_config.json``
  (ARConfig fields) in the adapter folder turns AR on.
- a PEFT MoSE adapter folder whose ``adapter_config.json`` names a local base model folder
  (``base_model_name_or_path``), with the same optional ``ar_config.json``.
- an ``nn.Module`` already prepared with ``apply_mosear``: an ``AudioVisualLM`` (``load_trained``'s
  result) or a transformers causal LM (Python API only).

The exported module is an ``ExportModule``, one of two signatures:

- ``AudioVisualExport`` (the audio-visual LM: ``"demo"``, ``mosear-train`` folders):
  ``(input_ids (B, T) int64, visual (B, Nv, Fv) float32, audio (B, Na, Fa) float32,
  attention_mask (B, T) int64) -> logits (B, T, V)``. ``Nv``, ``Na`` (the placeholder counts) and the
  feature widths are fixed by the model's config; B and T are dynamic, T from ``Nv + Na`` (the
  placeholders alone) up to the model's ``max_positions``: the text around the placeholders, and the
  left padding, may vary. The modality ids are not an input: the graph derives them from the
  placeholders exactly as the model does in training (``av_model.placeholder_modality_ids``), so
  they cannot disagree with ``input_ids``. Feature inputs are float32 for every export dtype (cast
  in the graph).
- ``CausalLMExport`` (a Hugging Face causal LM): ``(input_ids, attention_mask, modality_ids)``, each
  (B, T) int64, ``-> logits (B, T, V)``; B and T dynamic.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

DEMO_SEED = 0
DEMO_EXAMPLE_BATCH = 2
CAUSAL_LM_SEQ = "1:32:128"  # the default --seq of a causal LM: any length
AR_CONFIG_FILE = "ar_config.json"


class SourceError(ValueError):
    """The source cannot be loaded (unknown name, missing folder or file, unreadable config)."""


@dataclass(frozen=True)
class InputSpec:
    """One input of the graph. ``shape``: ints (fixed sizes) and axis names ("batch", "seq", the dynamic
    axes); ``dtype`` as numpy/ONNX name it; integer inputs have valid values [low, high)."""

    name: str
    dtype: str
    shape: tuple
    low: int | None = None
    high: int | None = None
    note: str | None = None


class ExportModule(torch.nn.Module):
    """The graph's signature around a prepared model (``self.model``): its inputs (``input_specs``),
    random valid inputs of any (batch, seq) (``example_inputs``), the sequence lengths it accepts
    (``seq_limits``, ``default_seq``) and what a deployer must know (``interface``)."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model

    def input_specs(self) -> list[InputSpec]:
        raise NotImplementedError

    def example_inputs(self, batch: int, length: int, *, seed: int = 0) -> tuple:
        raise NotImplementedError

    def seq_limits(self) -> tuple[int, int | None, str]:
        """(shortest, longest or None, why) sequence length the graph can serve."""
        return 1, None, ""

    def default_seq(self) -> str:
        return CAUSAL_LM_SEQ

    def interface(self) -> dict:
        """Facts for ``export_config.json`` beyond the inputs' shapes and ranges."""
        return {}

    def output_names(self) -> list[str]:
        return ["logits"]

    def output_masks(self, inputs) -> dict:
        """Per output name, a bool tensor broadcastable to it: the elements that carry meaning (validation
        compares only those). Logits of padding positions mean nothing."""
        named = dict(zip((s.name for s in self.input_specs()), inputs))
        return {"logits": named["attention_mask"].bool()[:, :, None]}


def _num_modalities(model) -> int:
    context = getattr(model, "_mosear_context", None)
    return context.num_modalities if context is not None else 1


class CausalLMExport(ExportModule):
    """A prepared causal LM: three (B, T) int64 inputs, logits out."""

    def forward(self, input_ids, attention_mask, modality_ids):
        return self.model(input_ids=input_ids, attention_mask=attention_mask, modality_ids=modality_ids,
                          use_cache=False).logits

    def _vocab(self) -> int:
        config = self.model.config
        return int(config.get_text_config().vocab_size if hasattr(config, "get_text_config") else config.vocab_size)

    def input_specs(self) -> list[InputSpec]:
        return [InputSpec("input_ids", "int64", ("batch", "seq"), 0, self._vocab()),
                InputSpec("attention_mask", "int64", ("batch", "seq"), 0, 2, "1 = token, 0 = padding"),
                InputSpec("modality_ids", "int64", ("batch", "seq"), -1, _num_modalities(self.model),
                          "per-token modality (0 text, 1 visual, 2 audio); -1 = padding / no adapter")]

    def example_inputs(self, batch: int, length: int, *, seed: int = 0):
        """Random valid (input_ids, attention_mask, modality_ids), each (batch, length) int64: ids uniform in
        their range; the mask pads a random prefix of each row (left padding, at least one real token)
        and the padded positions get modality -1, as a tokenizer would give them."""
        g = torch.Generator().manual_seed(seed)
        specs = {s.name: s for s in self.input_specs()}
        ids = torch.randint(specs["input_ids"].low, specs["input_ids"].high, (batch, length), generator=g)
        modality = torch.randint(0, specs["modality_ids"].high, (batch, length), generator=g)
        pad = torch.randint(0, max(1, length // 3), (batch,), generator=g)
        mask = (torch.arange(length) >= pad[:, None]).long()
        modality = modality.masked_fill(mask == 0, -1)
        return ids, mask, modality

    def interface(self) -> dict:
        return {"model": f"causal LM ({type(self.model).__name__})",
                "modality_ids": "an input: one id per token, -1 at padding"}


class AudioVisualExport(ExportModule):
    """The audio-visual LM (``mosear_fast.av_model.AudioVisualLM``): token ids with visual/audio
    placeholders, the features that replace them and the attention mask; logits out. The modality ids
    are derived in the graph from the placeholders (text 0, visual 1, audio 2, padding -1)."""

    def forward(self, input_ids, visual, audio, attention_mask):
        return self.model(input_ids, visual, audio, attention_mask=attention_mask).logits

    def _fixed_tokens(self) -> int:
        return self.model.sizes.n_visual + self.model.sizes.n_audio

    def input_specs(self) -> list[InputSpec]:
        from mosear_fast import av_model as av

        s = self.model.sizes
        layout = (f"each row's real tokens (attention_mask 1) hold exactly {s.n_visual} visual placeholders "
                  f"(id {av.VISUAL_ID}) and {s.n_audio} audio placeholder(s) (id {av.AUDIO_ID}); padding on the "
                  f"left (id {av.PAD_ID})")
        return [
            InputSpec("input_ids", "int64", ("batch", "seq"), 0, self.model.config.vocab_size, layout),
            InputSpec("visual", "float32", ("batch", s.n_visual, s.visual_dim), note=(
                "visual features; the i-th visual placeholder of a row takes visual[row, i] (cast to the "
                "model dtype in the graph)")),
            InputSpec("audio", "float32", ("batch", s.n_audio, s.audio_dim), note=(
                "audio features; the i-th audio placeholder of a row takes audio[row, i]")),
            InputSpec("attention_mask", "int64", ("batch", "seq"), 0, 2, "1 = real token, 0 = left padding"),
        ]

    def example_inputs(self, batch: int, length: int, *, seed: int = 0):
        """Random valid (input_ids, visual, audio, attention_mask) of ``length`` tokens: row 0 fills the
        length, the others have a random number of real tokens (left padding); each row's real tokens
        are random text ids (never a placeholder id) around one block of the visual placeholders
        followed by the audio placeholders, at a random place; features are standard normal."""
        from mosear_fast import av_model as av

        s = self.model.sizes
        fixed = self._fixed_tokens()
        if length < fixed:
            raise ValueError(f"length: the audio-visual model needs at least {fixed} tokens "
                             f"({s.n_visual} visual + {s.n_audio} audio placeholders), got {length}")
        g = torch.Generator().manual_seed(seed)
        input_ids = torch.full((batch, length), av.PAD_ID, dtype=torch.long)
        mask = torch.zeros(batch, length, dtype=torch.long)
        placeholders = torch.tensor([av.VISUAL_ID] * s.n_visual + [av.AUDIO_ID] * s.n_audio)
        vocab = self.model.config.vocab_size
        for b in range(batch):
            real = length if b == 0 else int(torch.randint(fixed, length + 1, (), generator=g))
            text = torch.randint(0, vocab - 2, (real - fixed,), generator=g)
            text = text + 2 * (text >= min(av.VISUAL_ID, av.AUDIO_ID))  # skip the two placeholder ids
            cut = int(torch.randint(0, real - fixed + 1, (), generator=g))
            input_ids[b, length - real:] = torch.cat([text[:cut], placeholders, text[cut:]])
            mask[b, length - real:] = 1
        visual = torch.randn(batch, s.n_visual, s.visual_dim, generator=g)
        audio = torch.randn(batch, s.n_audio, s.audio_dim, generator=g)
        return input_ids, visual, audio, mask

    def seq_limits(self) -> tuple[int, int | None, str]:
        s = self.model.sizes
        return (self._fixed_tokens(), s.max_positions,
                f"{s.n_visual} visual + {s.n_audio} audio placeholders, at most max_positions {s.max_positions}")

    def prompt_length(self) -> int:
        """The length of the model's standard prompt (``av_model.build_prompts``, without the answer)."""
        from mosear_fast import av_model as av

        return 1 + len(av.PREFIX_IDS) + self._fixed_tokens() + len(av.QUESTION_IDS)

    def default_seq(self) -> str:
        """``MIN:OPT:MAX``: one text token more than the placeholders, the standard prompt, and at least
        128 tokens (twice the prompt for long ones; at most max_positions)."""
        low, high, _ = self.seq_limits()
        opt = self.prompt_length()
        return f"{low + 1}:{opt}:{min(high, max(128, 2 * opt))}"

    def interface(self) -> dict:
        from mosear_fast import av_model as av
        from mosear_fast.trained import ADAPTER_MARK

        s = self.model.sizes
        context = getattr(self.model.llm, "_mosear_context", None)
        prompt = [av.BOS_ID, *av.PREFIX_IDS, *[av.VISUAL_ID] * s.n_visual, *[av.AUDIO_ID] * s.n_audio,
                  *av.QUESTION_IDS]
        return {
            "model": "audio-visual LM (mosear_fast.av_model.AudioVisualLM)",
            "modality_ids": ("not an input: derived in the graph from input_ids and attention_mask as the model "
                             f"does in training: visual placeholder (id {av.VISUAL_ID}) -> 1, audio placeholder "
                             f"(id {av.AUDIO_ID}) -> 2, other real tokens -> 0 (text), padding -> -1"),
            "prompt": {
                "visual_token_id": av.VISUAL_ID, "audio_token_id": av.AUDIO_ID, "pad_token_id": av.PAD_ID,
                "n_visual": s.n_visual, "n_audio": s.n_audio, "padding": "left",
                "seq_note": ("seq may vary with the text around the placeholders (and the padding) within the "
                             "graph's range, dynamic_axes.seq of this file (min and max inclusive); the "
                             "placeholder counts are fixed"),
                "standard_prompt_ids": prompt,
                "class_token_ids": list(av.EMOTION_TOKENS),
                "class_scores": (f"logits[:, -1, {av.FIRST_EMOTION_ID}:{av.FIRST_EMOTION_ID + av.NUM_EMOTIONS}] "
                                 "(one per emotion class) at the last prompt position"),
            },
            "sizes": {k: getattr(s, k) for k in s.__dataclass_fields__},
            "mose": any(ADAPTER_MARK in f".{name}" for name in self.model.state_dict()),
            "ar": context is not None and getattr(context, "ar", None) is not None,
        }


def input_specs(module: ExportModule) -> list[InputSpec]:
    """The graph's inputs with their shapes and valid ranges."""
    return module.input_specs()


def example_inputs(module: ExportModule, batch: int, length: int, *, seed: int = 0, past: int | None = None) -> tuple:
    """Random valid inputs of the graph for (batch, length), in ``input_specs`` order; ``past`` cached
    tokens for a with-past decoder (``with_past.py``)."""
    if past is None:
        return module.example_inputs(batch, length, seed=seed)
    return module.example_inputs(batch, length, seed=seed, past=past)


def build_demo_model(seed: int = DEMO_SEED) -> torch.nn.Module:
    """The built-in default model, the one ``mosear-demo`` trains: ``mosear_fast.av_model``'s audio-visual
    LM with the demo's sizes, MoSE (the demo's MoSEConfig, but B drawn non-zero) and AR (the demo's
    ARConfig), all from ``mosear_fast.demo_config``; eval mode. Deterministic for a given seed (the
    global RNG is left untouched)."""
    from mosear_fast import apply_mosear, demo_config
    from mosear_fast.av_model import build_demo_model as build_backbone

    model, _ = build_backbone(seed, **demo_config.backbone_sizes())
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        apply_mosear(model.llm, mose=demo_config.mose_config(init_weights=False), ar=demo_config.ar_config())
    return model.eval()


def wrap(model: torch.nn.Module) -> ExportModule:
    """The ExportModule of a prepared model: ``AudioVisualExport`` for the audio-visual LM, else
    ``CausalLMExport`` (a PEFT model is unwrapped to its base model)."""
    from mosear_fast.av_model import AudioVisualLM

    if hasattr(model, "get_base_model"):
        model = model.get_base_model()
    cls = AudioVisualExport if isinstance(model, AudioVisualLM) else CausalLMExport
    return cls(model.eval()).eval()


def load_source(source, *, adapter=None):
    """``(module, example_inputs)``: the ``ExportModule`` that is exported and a tuple of example inputs
    (batch 2, the default sequence length of the source)."""
    if isinstance(source, torch.nn.Module):
        model = source
    elif source == "demo":
        if adapter is not None:
            raise SourceError("--adapter: the demo model carries its own MoSE adapters (mosear_fast.demo_config); "
                              "--adapter goes with a Hugging Face model folder as SOURCE")
        model = build_demo_model()
    else:
        model = _load_folder(source, adapter)
    module = wrap(model)
    opt = int(module.default_seq().split(":")[1])
    return module, module.example_inputs(DEMO_EXAMPLE_BATCH, opt)


def source_folders(source, adapter=None) -> list[Path]:
    """The folders a folder source reads (adapter first, then the base model): where tokenizer and
    processor files may be found. Empty for "demo" and modules."""
    if isinstance(source, torch.nn.Module) or source == "demo":
        return []
    path = Path(str(source))
    folders = [Path(str(adapter))] if adapter is not None else []
    if (path / "adapter_config.json").is_file() and not (path / "config.json").is_file():
        base = _read_json(path / "adapter_config.json").get("base_model_name_or_path")
        return [*folders, path, *([Path(base)] if base else [])]
    return [*folders, path]


def _load_folder(source, adapter):
    from mosear_fast.trained import is_trained_folder, load_trained

    path = Path(str(source))
    if not path.is_dir():
        raise SourceError(f"SOURCE: expected 'demo', a mosear-train output folder or a Hugging Face model folder, "
                          f"got {str(source)!r} (not a folder)")
    if is_trained_folder(path):
        if adapter is not None:
            raise SourceError(f"--adapter: {path} is a mosear-train output folder, which holds its adapter; "
                              "--adapter goes with a Hugging Face model folder only")
        try:
            return load_trained(path)
        except (ValueError, TypeError, OSError) as err:
            raise SourceError(f"SOURCE: {path} (a mosear-train output folder) cannot be loaded: "
                              f"{str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__}"
                              ) from None
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
    raise SourceError(f"SOURCE: {path} holds neither backbone.json (a mosear-train output), config.json (a Hugging "
                      "Face model) nor adapter_config.json (a PEFT MoSE adapter)")


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
    from safetensors import SafetensorError

    model = AutoModelForCausalLM.from_pretrained(base, attn_implementation="sdpa", dtype=torch.float32)
    try:
        model = PeftModel.from_pretrained(model, adapter).get_base_model()
    except SafetensorError as err:
        raise SourceError(f"--adapter: {adapter} holds an adapter weights file that is not readable safetensors "
                          f"({str(err).strip().splitlines()[0] if str(err).strip() else 'corrupt'})") from None
    if (adapter / AR_CONFIG_FILE).is_file():
        fields = _read_json(adapter / AR_CONFIG_FILE)
        try:
            ar = ARConfig(**fields)
        except TypeError as err:
            raise SourceError(f"{adapter / AR_CONFIG_FILE}: {err}") from None
        apply_mosear(model, ar=ar)
    return model.eval()

"""A tiny audio-visual LM laid out like the paper's backbone: the built-in default model.

``AudioVisualLM`` = a LLaMA-style decoder (a transformers ``LlamaForCausalLM``, so ``apply_mosear``
installs MoSE and AR on it exactly as on a real checkpoint) + two linear projectors that turn
visual and audio features into token embeddings, placed in the prompt the way Emotion-LLaMA does
(placeholder tokens replaced by projected features)::

    [BOS] [INST] <video> | <visual> x n_visual | <audio> x n_audio | what emotion ? [/INST] -> <emotion>

The answer is one token per emotion class (``EMOTION_TOKENS``); the class scores are the logits of
those tokens at the last prompt position. ``build_demo_model`` builds the model the demo trains
(and the export tool exports) from a seed and sizes alone.

The forward is export-friendly: features are placed with ``cumsum``/``gather``/``where`` on the
placeholder positions (no data-dependent Python branch, no data-dependent shape), and it accepts
``attention_mask`` and ``modality_ids`` like an ``apply_mosear``'d Hugging Face model (modality ids
default to those implied by the placeholders: text 0, visual 1, audio 2, padding -1).
"""

from __future__ import annotations

import numbers
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import torch
from torch import nn

# Vocabulary: special tokens, a few prompt words, then one answer token per emotion class.
PAD_ID, BOS_ID, EOS_ID, VISUAL_ID, AUDIO_ID = 0, 1, 2, 3, 4
PREFIX_IDS = (5, 6)  # "[INST] <video>"
QUESTION_IDS = (7, 8, 9, 10)  # "what emotion ? [/INST]"
FIRST_EMOTION_ID = 11
NUM_EMOTIONS = 9  # the CA-MER / MER label vocabulary (mosear_fast.training.labels.EMOTIONS)
EMOTION_TOKENS = tuple(range(FIRST_EMOTION_ID, FIRST_EMOTION_ID + NUM_EMOTIONS))
VOCAB_SIZE = FIRST_EMOTION_ID + NUM_EMOTIONS
IGNORE_INDEX = -100  # labels that do not count in the loss (transformers' convention)
TEXT, VISUAL, AUDIO = 0, 1, 2  # modality ids (DESIGN: 0 text, 1 visual, 2 audio)


@dataclass(frozen=True)
class AVSizes:
    """Sizes of the built-in audio-visual LM (defaults: the demo's model)."""

    hidden: int = 64
    layers: int = 2
    heads: int = 4
    kv_heads: int = 2
    intermediate: int = 128
    visual_dim: int = 64  # feature width of a visual token (synthetic CA-MER default)
    audio_dim: int = 64
    n_visual: int = 32  # visual tokens per prompt in the example inputs
    n_audio: int = 1  # audio tokens per prompt (Emotion-LLaMA: one pooled HuBERT token)
    max_positions: int = 512

    def __post_init__(self):
        for name, value in asdict(self).items():
            if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
                raise ValueError(f"AVSizes.{name}: expected a positive int, got {value!r}")
        if self.hidden % self.heads or self.heads % self.kv_heads:
            raise ValueError(f"AVSizes: hidden={self.hidden} must divide by heads={self.heads}, and heads by "
                             f"kv_heads={self.kv_heads}")


class AudioVisualLM(nn.Module):
    """Projectors + LLaMA decoder. ``llm`` is the transformers model to give ``apply_mosear``."""

    accepts_loss_kwargs = False  # the loss is a per-batch mean (transformers' Trainer reads this)

    def __init__(self, sizes: AVSizes):
        super().__init__()
        from transformers import LlamaConfig, LlamaForCausalLM

        self.sizes = sizes
        config = LlamaConfig(
            vocab_size=VOCAB_SIZE, hidden_size=sizes.hidden, intermediate_size=sizes.intermediate,
            num_hidden_layers=sizes.layers, num_attention_heads=sizes.heads,
            num_key_value_heads=sizes.kv_heads, max_position_embeddings=sizes.max_positions,
            pad_token_id=PAD_ID, bos_token_id=BOS_ID, eos_token_id=EOS_ID, tie_word_embeddings=False,
            attention_dropout=0.0)
        config._attn_implementation = "sdpa"  # AR replaces sdpa or eager
        self.llm = LlamaForCausalLM(config)
        self.visual_proj = nn.Linear(sizes.visual_dim, sizes.hidden)
        self.audio_proj = nn.Linear(sizes.audio_dim, sizes.hidden)

    @property
    def config(self):
        return self.llm.config

    def forward(self, input_ids: torch.Tensor, visual: torch.Tensor, audio: torch.Tensor,
                attention_mask: torch.Tensor | None = None, modality_ids: torch.Tensor | None = None,
                position_ids: torch.Tensor | None = None, labels: torch.Tensor | None = None):
        """``input_ids (B, T)`` with ``VISUAL_ID`` / ``AUDIO_ID`` placeholders; ``visual (B, Nv, dv)`` and
        ``audio (B, Na, da)`` features, the i-th placeholder of a sample taking its i-th feature;
        ``labels (B, T)`` next-token targets (``IGNORE_INDEX`` = not counted). Returns the
        transformers ``CausalLMOutputWithPast`` (``logits``, and ``loss`` with labels)."""
        embeds = self.embed_inputs(input_ids, visual, audio)
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        if position_ids is None:  # positions that skip left padding (what generate computes)
            position_ids = (attention_mask.long().cumsum(-1) - 1).clamp_min(0)
        extra = {}
        if getattr(self.llm, "_mosear_context", None) is not None:  # MoSE/AR installed (static check)
            extra["modality_ids"] = modality_ids if modality_ids is not None else \
                placeholder_modality_ids(input_ids, attention_mask)
        return self.llm(inputs_embeds=embeds, attention_mask=attention_mask, position_ids=position_ids,
                        labels=labels, use_cache=False, **extra)

    def embed_inputs(self, input_ids: torch.Tensor, visual: torch.Tensor, audio: torch.Tensor) -> torch.Tensor:
        """(B, T, hidden) input embeddings: token embeddings with each placeholder replaced by its projected
        feature (what the decoder reads; also the ``inputs_embeds`` of ``self.llm.generate``)."""
        embeds = self.llm.get_input_embeddings()(input_ids)
        embeds = _place(embeds, input_ids == VISUAL_ID, self.visual_proj(visual.to(embeds.dtype)))
        return _place(embeds, input_ids == AUDIO_ID, self.audio_proj(audio.to(embeds.dtype)))

    def build_inputs(self, visual: Sequence[torch.Tensor], audio: Sequence[torch.Tensor],
                     answers: Sequence[int] | torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """Left-padded prompts for a batch of per-sample features (``visual[i] (Nv_i, dv)``,
        ``audio[i] (Na_i, da)``); with ``answers`` (class indices), the answer token is appended and
        ``labels`` mark it as the only target. Keys: the forward's arguments."""
        return build_prompts(visual, audio, answers)

    @staticmethod
    def class_logits(logits: torch.Tensor) -> torch.Tensor:
        """(B, NUM_EMOTIONS) scores of the emotion tokens at the last position of prompt logits (B, T, V)."""
        return logits[:, -1, FIRST_EMOTION_ID:FIRST_EMOTION_ID + NUM_EMOTIONS]


def _place(embeds: torch.Tensor, is_slot: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
    """``embeds`` with the k-th True position of ``is_slot`` in each row replaced by ``features[:, k]``."""
    rank = (is_slot.long().cumsum(-1) - 1).clamp(0, features.shape[1] - 1)  # [B, T]
    gathered = features.gather(1, rank.unsqueeze(-1).expand(-1, -1, features.shape[-1]))
    return torch.where(is_slot.unsqueeze(-1), gathered, embeds)


def placeholder_modality_ids(input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    """(B, T) modality ids implied by the placeholders: visual 1, audio 2, other tokens text 0, padding -1."""
    ids = torch.where(input_ids == VISUAL_ID, VISUAL, torch.where(input_ids == AUDIO_ID, AUDIO, TEXT))
    if attention_mask is not None:
        ids = ids.masked_fill(attention_mask == 0, -1)
    return ids


def build_prompts(visual, audio, answers=None) -> dict[str, torch.Tensor]:
    """See ``AudioVisualLM.build_inputs``."""
    if len(visual) != len(audio) or not len(visual):
        raise ValueError(f"visual, audio: expected one feature tensor per sample in each, got {len(visual)} "
                         f"and {len(audio)}")
    rows = []
    for i, (v, a) in enumerate(zip(visual, audio, strict=True)):
        if not (isinstance(v, torch.Tensor) and v.dim() == 2 and isinstance(a, torch.Tensor) and a.dim() == 2):
            raise ValueError(f"visual[{i}], audio[{i}]: expected (tokens, dim) feature tensors")
        ids = [BOS_ID, *PREFIX_IDS, *[VISUAL_ID] * v.shape[0], *[AUDIO_ID] * a.shape[0], *QUESTION_IDS]
        if answers is not None:
            ids.append(FIRST_EMOTION_ID + int(answers[i]))
        rows.append(ids)
    width = max(len(r) for r in rows)
    input_ids = torch.full((len(rows), width), PAD_ID, dtype=torch.long)
    attention_mask = torch.zeros(len(rows), width, dtype=torch.long)
    for b, ids in enumerate(rows):  # left padding: every prompt ends at the last position
        input_ids[b, width - len(ids):] = torch.tensor(ids)
        attention_mask[b, width - len(ids):] = 1
    out = {
        "input_ids": input_ids,
        "visual": torch.nn.utils.rnn.pad_sequence(list(visual), batch_first=True),
        "audio": torch.nn.utils.rnn.pad_sequence(list(audio), batch_first=True),
        "attention_mask": attention_mask,
        "modality_ids": placeholder_modality_ids(input_ids, attention_mask),
    }
    if answers is not None:
        labels = torch.full_like(input_ids, IGNORE_INDEX)
        labels[:, -1] = input_ids[:, -1]  # transformers shifts: the last prompt position predicts it
        out["labels"] = labels
    return out


def build_demo_model(seed: int = 0, **sizes):
    """The built-in default model: ``(model, example_inputs)``, random weights drawn from ``seed``.

    ``sizes``: ``AVSizes`` fields. ``example_inputs(batch=2, seed=0, answers=False)`` returns the
    forward's keyword arguments for random features of the model's default prompt layout (fp32).
    The model is in eval mode; the same seed and sizes always give the same weights.
    """
    unknown = set(sizes) - set(AVSizes.__dataclass_fields__)
    if unknown:
        raise ValueError(f"sizes: unknown fields {sorted(unknown)}; expected some of "
                         f"{sorted(AVSizes.__dataclass_fields__)}")
    config = AVSizes(**sizes)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = AudioVisualLM(config)

    def example_inputs(batch: int = 2, seed: int = 0, answers: bool = False) -> dict[str, torch.Tensor]:
        g = torch.Generator().manual_seed(seed)
        visual = torch.randn(batch, config.n_visual, config.visual_dim, generator=g)
        audio = torch.randn(batch, config.n_audio, config.audio_dim, generator=g)
        labels = torch.randint(0, NUM_EMOTIONS, (batch,), generator=g) if answers else None
        return build_prompts(list(visual), list(audio), labels)

    return model.eval(), example_inputs

"""Modality names and per-token modality ids (DESIGN 2: ids in [-1, M), -1 = no modality / padding).

Modalities are named in configs (default ``("text", "visual", "audio")``: ids 0, 1, 2) and referred
to by name or id. The helpers here build the ``(B, T)`` id tensors that models take as
``modality_ids``, from spans of positions or from placeholder token ids.
"""

from __future__ import annotations

import numbers
from collections.abc import Mapping, Sequence

import torch

from ._validation import MAX_MODALITIES
from .backend import host_reads_allowed

DEFAULT_MODALITIES = ("text", "visual", "audio")


def check_modality_names(name: str, modalities) -> tuple[str, ...]:
    """``modalities`` as a tuple of distinct non-empty strings (1 to MAX_MODALITIES of them)."""
    if isinstance(modalities, (str, bytes)) or not isinstance(modalities, Sequence):
        raise TypeError(f"{name}: expected a sequence of modality names, got {type(modalities).__name__}")
    names = tuple(modalities)
    if not all(isinstance(n, str) and n for n in names):
        raise TypeError(f"{name}: expected non-empty strings, got {names!r}")
    if len(set(names)) != len(names) or not 1 <= len(names) <= MAX_MODALITIES:
        raise ValueError(f"{name}: expected 1 to {MAX_MODALITIES} distinct names, got {names!r}")
    return names


def modality_index(name: str, value, modalities: Sequence[str]) -> int:
    """The id of one modality given by name or id, checked against ``modalities``."""
    if isinstance(value, str):
        if value not in modalities:
            raise ValueError(f"{name}: unknown modality {value!r}; expected one of {tuple(modalities)} or "
                             "an id")
        return list(modalities).index(value)
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name}: expected a modality name or int id, got {type(value).__name__}")
    if not 0 <= int(value) < len(modalities):
        raise ValueError(f"{name}: expected a modality id in [0, {len(modalities)}), got {int(value)}")
    return int(value)


def modality_indices(name: str, values, modalities: Sequence[str]) -> tuple[int, ...]:
    """Distinct modality ids from a sequence of names or ids."""
    if isinstance(values, (str, bytes)) or not isinstance(values, Sequence):
        raise TypeError(f"{name}: expected a sequence of modality names or ids, got {type(values).__name__}")
    ids = tuple(modality_index(f"{name}[{i}]", v, modalities) for i, v in enumerate(values))
    if len(set(ids)) != len(ids):
        raise ValueError(f"{name}: expected distinct modalities, got {tuple(values)!r}")
    return ids


def check_modality_ids(modality_ids, *, batch: int, num_modalities: int,
                       name: str = "modality_ids") -> torch.Tensor:
    """Validates a user-given ``(B, T)`` integer tensor of ids in [-1, M); returns it as int64."""
    if not isinstance(modality_ids, torch.Tensor):
        raise TypeError(f"{name}: expected a (B, T) integer torch.Tensor, got {type(modality_ids).__name__}")
    if modality_ids.is_floating_point() or modality_ids.is_complex() or modality_ids.dtype == torch.bool:
        raise ValueError(f"{name}: expected an integer tensor, got dtype {modality_ids.dtype}")
    if modality_ids.dim() != 2 or modality_ids.shape[0] != batch:
        raise ValueError(f"{name}: expected shape (B={batch}, T) like input_ids / inputs_embeds[..., 0], "
                         f"got {tuple(modality_ids.shape)}")
    check_modality_range(modality_ids, num_modalities, name=name)
    return modality_ids.long()


def check_modality_range(modality_ids: torch.Tensor, num_modalities: int, *, name: str = "modality_ids") -> None:
    """Ids in [-1, M). Reads the values (a host sync on CUDA): done once per model call, skipped
    while a graph is exported or compiled and during CUDA-graph capture."""
    if modality_ids.numel() > 0 and host_reads_allowed(modality_ids.device):
        lo, hi = int(modality_ids.min()), int(modality_ids.max())
        if lo < -1 or hi >= num_modalities:
            raise ValueError(f"{name}: expected ids in [-1, {num_modalities}) (modalities of the config), "
                             f"got values in [{lo}, {hi}]")


def modality_ids_from_spans(spans, length: int, *, modalities: Sequence[str] = DEFAULT_MODALITIES,
                            default="text", attention_mask: torch.Tensor | None = None,
                            device=None) -> torch.Tensor:
    """A ``(B, length)`` int64 id tensor from spans of positions.

    ``spans``: one sequence per sample of ``(start, stop, modality)`` triples (``stop`` exclusive,
    ``modality`` a name or id); positions outside every span get ``default``. With
    ``attention_mask`` (B, length), padding positions (mask 0) get -1.

    Example, an Emotion-LLaMA-like prompt with 256 visual patches, a face, a video and an audio
    token after 5 text tokens::

        ids = modality_ids_from_spans([[(5, 263, "visual"), (263, 264, "audio")]], length=300)
    """
    if isinstance(length, bool) or not isinstance(length, numbers.Integral) or length < 0:
        raise TypeError(f"length: expected a non-negative int, got {length!r}")
    if isinstance(spans, (str, bytes)) or not isinstance(spans, Sequence):
        raise TypeError("spans: expected one sequence of (start, stop, modality) per sample, got "
                        f"{type(spans).__name__}")
    names = check_modality_names("modalities", modalities)
    fill = modality_index("default", default, names)
    ids = torch.full((len(spans), int(length)), fill, dtype=torch.long)
    for b, sample in enumerate(spans):
        if isinstance(sample, (str, bytes)) or not isinstance(sample, Sequence):
            raise TypeError(f"spans[{b}]: expected a sequence of (start, stop, modality) triples, got "
                            f"{type(sample).__name__}")
        for i, span in enumerate(sample):
            if not isinstance(span, Sequence) or len(span) != 3:
                raise ValueError(f"spans[{b}][{i}]: expected a (start, stop, modality) triple, got {span!r}")
            start, stop, modality = span
            if not all(isinstance(v, numbers.Integral) and not isinstance(v, bool) for v in (start, stop)) \
                    or not 0 <= start <= stop <= length:
                raise ValueError(f"spans[{b}][{i}]: expected 0 <= start <= stop <= length={length}, got "
                                 f"{span!r}")
            ids[b, start:stop] = modality_index(f"spans[{b}][{i}][2]", modality, names)
    ids = _apply_padding(ids, attention_mask)
    return ids if device is None else ids.to(device)


def modality_ids_from_token_ids(input_ids: torch.Tensor, token_ids: Mapping, *,
                                modalities: Sequence[str] = DEFAULT_MODALITIES, default="text",
                                attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    """A ``(B, T)`` int64 id tensor from placeholder tokens: ``{modality: [token ids]}``.

    Tokens whose id is listed under a modality get that modality; all others get ``default``; with
    ``attention_mask``, padding positions (mask 0) get -1. For prompts whose feature tokens are
    marked by special tokens (e.g. ``<ImageHere>`` / ``<AudioHere>`` placeholders).
    """
    if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2 or input_ids.is_floating_point():
        got = tuple(input_ids.shape) if isinstance(input_ids, torch.Tensor) else type(input_ids).__name__
        raise ValueError(f"input_ids: expected a (B, T) integer tensor, got {got}")
    if not isinstance(token_ids, Mapping):
        raise TypeError("token_ids: expected a mapping {modality: [token ids]}, got "
                        f"{type(token_ids).__name__}")
    names = check_modality_names("modalities", modalities)
    placeholders, claimed = {}, set()
    for modality, tokens in token_ids.items():
        m = modality_index(f"token_ids[{modality!r}]", modality, names)
        tokens = [tokens] if isinstance(tokens, numbers.Integral) else list(tokens)
        if claimed & set(tokens):
            raise ValueError(f"token_ids[{modality!r}]: token ids {sorted(claimed & set(tokens))} are "
                             "listed under two modalities")
        claimed |= set(tokens)
        placeholders[m] = placeholders.get(m, ()) + tuple(tokens)
    ids = modality_ids_from_placeholders(input_ids, placeholders, default=modality_index("default", default, names))
    return _apply_padding(ids, attention_mask)


def _apply_padding(ids: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
    if attention_mask is None:
        return ids
    if not isinstance(attention_mask, torch.Tensor) or tuple(attention_mask.shape) != tuple(ids.shape):
        got = (tuple(attention_mask.shape) if isinstance(attention_mask, torch.Tensor)
               else type(attention_mask).__name__)
        raise ValueError(f"attention_mask: expected shape {tuple(ids.shape)} (B, T), got {got}")
    return ids.masked_fill(attention_mask.to(ids.device) == 0, -1)


# Config attributes naming the placeholder token of each kind of input (transformers' names; a config's
# attribute_map makes either spelling readable).
PLACEHOLDER_ATTRIBUTES = {
    "image": ("image_token_id", "image_token_index"),
    "video": ("video_token_id", "video_token_index"),
    "audio": ("audio_token_id", "audio_token_index"),
}
# Which kinds of placeholder a modality name stands for.
PLACEHOLDER_KINDS = {"visual": ("image", "video"), "vision": ("image", "video"), "image": ("image",),
                     "video": ("video",), "audio": ("audio",)}


def placeholder_token_ids(config, modalities: Sequence[str]) -> dict[int, tuple[int, ...]]:
    """``{modality id: placeholder token ids}`` read from a model config: the image and video tokens for
    a modality named "visual" (or "vision"), "image" or "video"; the audio token for "audio". Empty when
    the config names none (a text-only model) or no modality has one of these names."""
    found = {}
    for m, name in enumerate(modalities):
        tokens = []
        for kind in PLACEHOLDER_KINDS.get(name, ()):
            for attribute in PLACEHOLDER_ATTRIBUTES[kind]:
                value = getattr(config, attribute, None)
                if isinstance(value, numbers.Integral) and not isinstance(value, bool) and value >= 0:
                    tokens.append(int(value))
                    break
        if tokens:
            found[m] = tuple(dict.fromkeys(tokens))
    return found


def modality_ids_from_placeholders(input_ids: torch.Tensor, placeholders: Mapping[int, Sequence[int]],
                                   default: int = 0) -> torch.Tensor:
    """(B, T) int64 ids: ``placeholders[m]`` tokens get m, all others ``default``. A broadcast compare,
    not ``torch.isin``, so the ONNX exporter can translate it."""
    ids = torch.full(input_ids.shape, default, dtype=torch.long, device=input_ids.device)
    for m, tokens in placeholders.items():
        marker = torch.tensor(list(tokens), dtype=input_ids.dtype, device=input_ids.device)
        ids = ids.masked_fill((input_ids[..., None] == marker).any(-1), m)
    return ids

"""Training and prediction rows for a Hugging Face model: JSONL, one example per line, in either form

    {"id": "s1", "input_ids": [1, 57, 9, ...], "labels": [-100, -100, 9, ...], "modality_ids": [0, 1, 1, ...]}
    {"id": "s2", "prompt": "What emotion ...?", "answer": "happy"}

- ``id``: a string or integer, unique in the file (``mosear-predict`` copies it to its output, where
  ``mosear-eval`` matches it).
- input_ids form: token ids of the whole sequence; ``labels`` aligned with them, -100 where the loss is
  off (transformers' convention: the model shifts them); ``modality_ids`` optional, one id per token in
  [-1, M) (M the modalities of the MoSE config; -1 = no adapter). Without them the ids come from the
  model's placeholder tokens (``audio_token_index``, ``video_token_index``, ... in its config: those
  tokens get their modality, every other token is text), and are all text for a model without any.
- prompt/answer form: the prompt is tokenised with the model folder's tokenizer (through its chat
  template, as one user turn with the generation prompt, when it has one; else plainly, special tokens
  included), the answer without special tokens and followed by the EOS token; the loss is on the answer
  tokens (and EOS) only.
- ``features`` (either form, optional): a safetensors file of the model's multimodal inputs, relative
  to the JSONL file's folder (or absolute), the convention of ``data.py``'s manifests. Its tensors are
  keyed by the model's forward argument names (e.g. ``input_features``, ``feature_attention_mask``,
  ``pixel_values_videos``, ``video_grid_thw`` for the Qwen2.5-Omni thinker), each as the model's
  processor returns it for this one sample; a batch concatenates them along dim 0, so they must agree
  in their other dimensions (pad when preparing, or use batch size 1). The prompt must already hold the
  placeholder tokens the processor expands (write such rows in the input_ids form from the processor).

For prediction the prompt is the prompt form's ``prompt``, or the input_ids form's tokens before the
first label that is not -100 (all of them without ``labels``); answers are ignored.

Rows are read and checked when the data set is built (a bad row is a ValueError naming the file, the
line and the field); feature files are read when a batch is made (a missing or unreadable one is a
ValueError naming its row).
"""

from __future__ import annotations

import numbers
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.utils.data import Dataset

from .jsonl import read_jsonl

IGNORE_INDEX = -100


@dataclass(frozen=True)
class Example:
    """One checked row: ``input_ids`` of the whole sequence, ``labels`` (None: a prompt without answer),
    ``modality_ids`` (None: derived from placeholders), ``prompt_length`` (the tokens before the answer)."""

    id: str | int
    source: Path  # the JSONL file
    line: int
    input_ids: tuple[int, ...]
    labels: tuple[int, ...] | None
    modality_ids: tuple[int, ...] | None
    prompt_length: int
    features: Path | None

    @property
    def where(self) -> str:
        return f"{self.source}: line {self.line}"


def encode_prompt(tokenizer, prompt: str) -> list[int]:
    """The prompt's token ids: through the chat template (one user turn, generation prompt) when the
    tokenizer has one, else plain tokenisation with the tokenizer's special tokens."""
    if getattr(tokenizer, "chat_template", None):
        text = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                             tokenize=False)
        return list(tokenizer(text, add_special_tokens=False)["input_ids"])
    return list(tokenizer(prompt)["input_ids"])


def encode_answer(tokenizer, answer: str) -> list[int]:
    """The answer's token ids (no special tokens), then EOS when the tokenizer has one: what the loss
    covers, and what ``mosear-predict --labels`` scores."""
    ids = list(tokenizer(answer, add_special_tokens=False)["input_ids"])
    eos = getattr(tokenizer, "eos_token_id", None)
    return ids + ([int(eos)] if eos is not None else [])


def _int_list(value, field: str, *, low: int, high: int | None, allow: tuple[int, ...] = ()) -> tuple[int, ...]:
    if not isinstance(value, list) or not value:
        raise ValueError(f"{field}: expected a non-empty list of integers, got {type(value).__name__}")
    for i, v in enumerate(value):
        if isinstance(v, bool) or not isinstance(v, numbers.Integral):
            raise ValueError(f"{field}[{i}]: expected an integer, got {v!r}")
        if v in allow:
            continue
        if v < low or (high is not None and v >= high):
            span = f"[{low}, {high})" if high is not None else f">= {low}"
            extra = f" or {allow[0]}" if allow else ""
            raise ValueError(f"{field}[{i}]: expected an id in {span}{extra}, got {v}")
    return tuple(int(v) for v in value)


class TokenRows(Dataset):
    """The checked rows of a JSONL file (see the module docstring); item i is ``Example`` i.

    ``tokenizer``: needed for prompt/answer rows (None: such a row is an error). ``vocab_size``,
    ``num_modalities``: ranges of the ids; ``max_length``: the longest sequence the model takes (None: no
    limit); ``training``: rows must have an answer (``labels`` with a token that is not -100, or ``answer``).
    """

    def __init__(self, path: str | os.PathLike, *, tokenizer=None, vocab_size: int, num_modalities: int,
                 max_length: int | None = None, training: bool = True):
        self.path = Path(path)
        self.examples: list[Example] = []
        seen: dict[str, int] = {}
        for line, row in read_jsonl(self.path):
            where = f"{self.path}: line {line}"
            try:
                example = self._example(line, row, tokenizer, vocab_size, num_modalities, training)
            except (TypeError, ValueError) as e:
                raise ValueError(f"{where}: {e}") from None
            key = str(example.id)
            if key in seen:
                raise ValueError(f"{where}: duplicate id {example.id!r} (first on line {seen[key]})")
            seen[key] = line
            length = len(example.input_ids) if training else example.prompt_length
            if max_length is not None and length > max_length:
                raise ValueError(f"{where}: {length} tokens, more than the model's {max_length} positions")
            self.examples.append(example)
        if not self.examples:
            raise ValueError(f"{self.path}: no rows")

    def _example(self, line, row, tokenizer, vocab_size, num_modalities, training) -> Example:
        if not isinstance(row, dict):
            raise ValueError(f"expected a JSON object, got {type(row).__name__}")
        sample_id = row.get("id")
        if isinstance(sample_id, bool) or not isinstance(sample_id, (str, int)) or sample_id == "":
            raise ValueError(f"id: expected a non-empty string or an integer, got {sample_id!r}")
        features = self._features(row.get("features"))
        if "input_ids" in row and "prompt" in row:
            raise ValueError("expected either input_ids (with labels) or prompt (with answer), got both")
        if "input_ids" in row:
            ids = _int_list(row["input_ids"], "input_ids", low=0, high=vocab_size)
            labels = None
            if row.get("labels") is not None:
                labels = _int_list(row["labels"], "labels", low=0, high=vocab_size, allow=(IGNORE_INDEX,))
                if len(labels) != len(ids):
                    raise ValueError(f"labels: expected {len(ids)} values like input_ids, got {len(labels)}")
            if training and (labels is None or all(v == IGNORE_INDEX for v in labels)):
                raise ValueError("labels: a training row needs labels with at least one token that is not -100 "
                                 "(the tokens the loss is on)")
            modality = None
            if row.get("modality_ids") is not None:
                modality = _int_list(row["modality_ids"], "modality_ids", low=-1, high=num_modalities)
                if len(modality) != len(ids):
                    raise ValueError(f"modality_ids: expected {len(ids)} values like input_ids, got {len(modality)}")
            prompt_length = next((i for i, v in enumerate(labels) if v != IGNORE_INDEX), len(ids)) \
                if labels is not None else len(ids)
            if not training and prompt_length == 0:
                raise ValueError("labels: the first token is already a label, so the prompt (the tokens before the "
                                 "first label that is not -100) is empty")
            return Example(sample_id, self.path, line, ids, labels, modality, prompt_length, features)
        if "prompt" in row:
            if tokenizer is None:
                raise ValueError("prompt: rows of the prompt/answer form need the model folder's tokenizer, and "
                                 "it has none; write input_ids rows")
            prompt, answer = row["prompt"], row.get("answer")
            if not isinstance(prompt, str) or not prompt.strip():
                raise ValueError(f"prompt: expected non-empty text, got {prompt!r}")
            if answer is not None and (not isinstance(answer, str) or not answer.strip()):
                raise ValueError(f"answer: expected non-empty text, got {answer!r}")
            if training and answer is None:
                raise ValueError("answer: a training row of the prompt form needs an answer")
            prompt_ids = encode_prompt(tokenizer, prompt)
            answer_ids = encode_answer(tokenizer, answer) if answer is not None else []
            ids = tuple(prompt_ids + answer_ids)
            labels = tuple([IGNORE_INDEX] * len(prompt_ids) + answer_ids) if answer is not None else None
            return Example(sample_id, self.path, line, ids, labels, None, len(prompt_ids), features)
        raise ValueError(f"expected input_ids (with labels) or prompt (with answer), got the keys {sorted(row)}")

    def _features(self, value) -> Path | None:
        if value is None:
            return None
        if not isinstance(value, str) or not value:
            raise ValueError(f"features: expected the path of a safetensors file, got {value!r}")
        path = Path(value) if Path(value).is_absolute() else self.path.parent / value
        if not path.is_file():
            raise ValueError(f"features: {path} is not a file")
        return path

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, index: int) -> Example:
        return self.examples[index]


class TokenRowsCollator:
    """``collate(examples) -> model kwargs``: ``input_ids``, ``attention_mask``, ``modality_ids`` (-1 at
    padding), ``labels`` (-100 at padding; ``training`` only) and the feature tensors.

    ``training=True`` batches whole sequences with their labels, right-padded; False batches the
    prompts, left-padded (for generation). ``placeholders``: ``{modality id: token ids}`` that give rows
    without ``modality_ids`` their ids; ``forward_arguments``: the names feature tensors may have.
    """

    def __init__(self, *, pad_id: int, placeholders: Mapping[int, Sequence[int]] | None = None,
                 forward_arguments: Sequence[str] = (), training: bool = True):
        self.pad_id = int(pad_id)
        self.placeholders = {int(m): tuple(int(t) for t in tokens) for m, tokens in (placeholders or {}).items()}
        self.forward_arguments = frozenset(forward_arguments)
        self.training = training

    def modality_ids(self, example: Example, length: int) -> torch.Tensor:
        """(length,) ids of the first ``length`` tokens: the row's own, else from the placeholders (text 0)."""
        if example.modality_ids is not None:
            return torch.tensor(example.modality_ids[:length], dtype=torch.long)
        from mosear_fast.modality import modality_ids_from_placeholders

        ids = torch.tensor([example.input_ids[:length]], dtype=torch.long)
        return modality_ids_from_placeholders(ids, self.placeholders)[0]

    def __call__(self, examples: Sequence[Example]) -> dict[str, torch.Tensor]:
        return self.collate(examples, whole=self.training, left=not self.training)

    def collate(self, examples: Sequence[Example], *, whole: bool, left: bool) -> dict[str, torch.Tensor]:
        """``whole``: the whole sequences, with ``labels``; else the prompts. ``left``: pad on the left."""
        lengths = [len(e.input_ids) if whole else e.prompt_length for e in examples]
        width, batch = max(lengths), len(examples)
        input_ids = torch.full((batch, width), self.pad_id, dtype=torch.long)
        attention_mask = torch.zeros(batch, width, dtype=torch.long)
        modality_ids = torch.full((batch, width), -1, dtype=torch.long)
        labels = torch.full((batch, width), IGNORE_INDEX, dtype=torch.long)
        for b, (example, n) in enumerate(zip(examples, lengths, strict=True)):
            span = slice(width - n, width) if left else slice(0, n)
            input_ids[b, span] = torch.tensor(example.input_ids[:n])
            attention_mask[b, span] = 1
            modality_ids[b, span] = self.modality_ids(example, n)
            if whole:
                labels[b, span] = torch.tensor(example.labels)
        out = {"input_ids": input_ids, "attention_mask": attention_mask, "modality_ids": modality_ids}
        if whole:
            out["labels"] = labels
        out.update(self.features(examples))
        return out

    def features(self, examples: Sequence[Example]) -> dict[str, torch.Tensor]:
        """The rows' feature tensors, concatenated along dim 0 per name (every row of a batch needs the same)."""
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        with_files = [e for e in examples if e.features is not None]
        if not with_files:
            return {}
        if len(with_files) != len(examples):
            other = next(e for e in examples if e.features is None)
            raise ValueError(f"{other.where}: row {other.id!r} has no features while others of its batch have "
                             f"them (line {with_files[0].line}); give every row features, or none")
        parts: dict[str, list[torch.Tensor]] = {}
        names = None
        for e in examples:
            try:
                tensors = load_file(str(e.features))
            except FileNotFoundError:
                raise ValueError(f"{e.where}: features: {e.features}: no such file") from None
            except (OSError, SafetensorError) as err:
                raise ValueError(f"{e.where}: features: {e.features}: not a readable safetensors file "
                                 f"({str(err).strip().splitlines()[0] if str(err).strip() else 'corrupt'})") from None
            unknown = sorted(set(tensors) - self.forward_arguments)
            if unknown:
                raise ValueError(f"{e.where}: features: {e.features} holds {unknown}, which are not arguments "
                                 f"of the model's forward ({sorted(self.forward_arguments)})")
            if names is not None and set(tensors) != names:
                raise ValueError(f"{e.where}: features: {e.features} holds {sorted(tensors)}, other rows of its "
                                 f"batch {sorted(names)}")
            names = set(tensors)
            for name, t in tensors.items():
                if t.dim() == 0:
                    raise ValueError(f"{e.where}: features: {name} is a scalar; expected a leading dimension "
                                     "(as the processor returns it for one sample)")
                parts.setdefault(name, []).append(t)
        out = {}
        for name, tensors in parts.items():
            shapes = {tuple(t.shape[1:]) for t in tensors}
            if len(shapes) > 1:
                raise ValueError(f"{examples[0].source}: features: {name} has shapes "
                                 f"{sorted(tuple(t.shape) for t in tensors)} in one batch (lines "
                                 f"{[e.line for e in examples]}); beyond dim 0 they must agree: pad "
                                 "them when preparing the rows, or use batch size 1")
            out[name] = torch.cat(tensors, dim=0)
        return out


def forward_arguments(model) -> tuple[str, ...]:
    """The keyword arguments of ``model``'s forward (what feature files may hold)."""
    import inspect

    parameters = inspect.signature(type(model).forward).parameters
    return tuple(name for name, p in parameters.items()
                 if name != "self" and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY))


__all__ = ["IGNORE_INDEX", "Example", "TokenRows", "TokenRowsCollator", "encode_answer", "encode_prompt",
           "forward_arguments"]

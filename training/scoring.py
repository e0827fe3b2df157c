"""Answers of a trained Hugging Face model to prompt rows: label scores and greedy generation
(``mosear-predict``).

Label scores: a label's answer (its tokens, then EOS: ``token_rows.encode_answer``) is appended to
each prompt and scored by the log-probabilities the model gives its tokens, summed (the answer's
log-likelihood) or averaged per token. Sequences are left-padded so every answer ends at the last
position, and only the last ``longest answer + 1`` positions' logits are computed where the model
takes ``logits_to_keep``. Left padding leaves rotary-position models exact (scores depend on relative
positions only; multimodal rope models compute their positions from the attention mask).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import torch

from .token_rows import IGNORE_INDEX, Example, TokenRowsCollator, forward_arguments

REDUCTIONS = ("sum", "mean")


def with_answer(example: Example, answer: Sequence[int]) -> Example:
    """The example's prompt followed by ``answer`` (labels on the answer, its modality ids text)."""
    n = example.prompt_length
    modality = None if example.modality_ids is None else (*example.modality_ids[:n], *[0] * len(answer))
    return dataclasses.replace(example, input_ids=(*example.input_ids[:n], *answer),
                               labels=(*[IGNORE_INDEX] * n, *answer), modality_ids=modality)


def _to(batch: dict, device) -> dict:
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


@torch.no_grad()
def score_labels(model, collator: TokenRowsCollator, examples: Sequence[Example], answers: Sequence[Sequence[int]],
                 *, reduce: str = "sum", device=None) -> torch.Tensor:
    """(len(examples), len(answers)) float32 scores: the sum (or mean) over each answer's tokens of their
    log-probabilities after the example's prompt."""
    if reduce not in REDUCTIONS:
        raise ValueError(f"reduce: expected one of {REDUCTIONS}, got {reduce!r}")
    if not answers or any(len(a) == 0 for a in answers):
        raise ValueError("answers: expected one or more non-empty token lists")
    pairs = [with_answer(e, a) for e in examples for a in answers]  # row-major: example, then answer
    batch = collator.collate(pairs, whole=True, left=True)
    labels = batch.pop("labels")
    keep = max(len(a) for a in answers) + 1
    extra = {"logits_to_keep": keep} if "logits_to_keep" in forward_arguments(model) else {}
    logits = model(**_to(batch, device), **extra).logits[:, -keep:].float()  # [N, keep, V]
    targets = labels[:, -keep:].to(logits.device)  # [N, keep]
    # logits at position j predict the token at j + 1
    log_probs = logits[:, :-1].log_softmax(-1).gather(-1, targets[:, 1:].clamp_min(0).unsqueeze(-1)).squeeze(-1)
    counted = targets[:, 1:] != IGNORE_INDEX
    total = (log_probs * counted).sum(1)
    scores = total if reduce == "sum" else total / counted.sum(1)
    return scores.view(len(examples), len(answers)).cpu()


@torch.no_grad()
def generate_answers(model, tokenizer, collator: TokenRowsCollator, examples: Sequence[Example], *,
                     max_new_tokens: int, device=None) -> list[str]:
    """Greedy continuations of the examples' prompts (left-padded), decoded without special tokens."""
    batch = _to(collator.collate(examples, whole=False, left=True), device)
    modality_ids = batch.pop("modality_ids")
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else collator.pad_id
    tokens = model.generate(**batch, modality_ids=modality_ids, max_new_tokens=max_new_tokens, do_sample=False,
                            pad_token_id=pad_id, eos_token_id=tokenizer.eos_token_id)
    new = tokens[:, batch["input_ids"].shape[1]:]
    return [text.strip() for text in tokenizer.batch_decode(new, skip_special_tokens=True)]


__all__ = ["REDUCTIONS", "generate_answers", "score_labels", "with_answer"]

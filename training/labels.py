"""The emotion label vocabulary (Emotion-LLaMA / MER) and label parsing with synonyms.

Two entry points:

- :func:`normalize_label` for ground truth: one label name, matched exactly (case and surrounding
  space ignored) against the vocabulary and its synonyms; anything else is an error.
- :func:`parse_labels` for model output: free text (or a list of strings) that may name several
  emotions; every word that is a label or a synonym counts, in order of first appearance.
  Negations ("not happy") are not understood: the parser is a word matcher, like the open
  vocabulary matching of the CA-MER protocol it serves.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

# Canonical names, in class-index order (a label's index is its position here).
EMOTIONS: tuple[str, ...] = (
    "happy",
    "sad",
    "neutral",
    "angry",
    "worried",
    "surprise",
    "fear",
    "contempt",
    "doubt",
)

# Word -> canonical label. Each canonical name maps to itself (added below).
SYNONYMS: dict[str, str] = {
    "happiness": "happy",
    "joy": "happy",
    "joyful": "happy",
    "glad": "happy",
    "sadness": "sad",
    "unhappy": "sad",
    "calm": "neutral",
    "neutrality": "neutral",
    "anger": "angry",
    "mad": "angry",
    "furious": "angry",
    "annoyed": "angry",
    "worry": "worried",
    "anxious": "worried",
    "anxiety": "worried",
    "nervous": "worried",
    "surprised": "surprise",
    "surprising": "surprise",
    "astonished": "surprise",
    "afraid": "fear",
    "scared": "fear",
    "fearful": "fear",
    "frightened": "fear",
    "contemptuous": "contempt",
    "disdain": "contempt",
    "doubtful": "doubt",
    "doubting": "doubt",
}
SYNONYMS.update({name: name for name in EMOTIONS})

_WORD = re.compile(r"[a-z]+")


def label_index(name: str) -> int:
    """Class index of a label name (synonyms allowed), e.g. ``label_index("anger") == 3``."""
    return EMOTIONS.index(normalize_label(name))


def normalize_label(name: str) -> str:
    """The canonical label for one label name or synonym; ValueError for anything else."""
    if not isinstance(name, str):
        raise TypeError(
            f"label: expected a string naming one of {', '.join(EMOTIONS)}, got {type(name).__name__}"
        )
    key = name.strip().lower()
    if key not in SYNONYMS:
        raise ValueError(f"label: {name!r} is not one of {', '.join(EMOTIONS)} (or a known synonym)")
    return SYNONYMS[key]


def normalize_label_set(value: str | Sequence[str]) -> frozenset[str]:
    """A ground-truth label set: one label name, or a non-empty list of label names."""
    if isinstance(value, str):
        return frozenset((normalize_label(value),))
    if isinstance(value, Sequence) and value:
        return frozenset(normalize_label(v) for v in value)
    raise TypeError(f"label: expected a label name or a non-empty list of label names, got {value!r}")


def parse_labels(prediction: str | Sequence[str]) -> tuple[str, ...]:
    """Canonical labels named in ``prediction`` (free text or a list of strings), first-seen order.

    An empty tuple means nothing recognisable: the caller reports the prediction as unparsable.
    """
    if isinstance(prediction, str):
        texts: Sequence[str] = (prediction,)
    elif isinstance(prediction, Sequence) and all(isinstance(p, str) for p in prediction):
        texts = prediction
    else:
        raise TypeError(
            f"prediction: expected a string or a list of strings, got {type(prediction).__name__}"
        )
    found: dict[str, None] = {}  # ordered set
    for text in texts:
        for word in _WORD.findall(text.lower()):
            label = SYNONYMS.get(word)
            if label is not None:
                found.setdefault(label)
    return tuple(found)

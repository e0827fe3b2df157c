"""Training side of mosear-fast: data sets, the CA-MER protocol and its metrics, ``mosear-eval``.

Importable without transformers (the model-facing modules import it themselves).
"""

from .camer import (
    AUDIO_ALIGNED,
    CONSISTENT,
    SUBSETS,
    VIDEO_ALIGNED,
    CamerAccumulator,
    assign_subset,
    score_label_sets,
)
from .camer_rows import evaluate_rows
from .data import MODALITIES, ManifestDataset, ManifestWriter, collate_samples, read_manifest, to_sequence
from .labels import EMOTIONS, SYNONYMS, label_index, normalize_label, parse_labels
from .synthetic import ALL_DIFFERENT, SyntheticCamer, SyntheticCamerConfig, generate_camer

__all__ = [
    "ALL_DIFFERENT",
    "AUDIO_ALIGNED",
    "CONSISTENT",
    "EMOTIONS",
    "MODALITIES",
    "SUBSETS",
    "SYNONYMS",
    "VIDEO_ALIGNED",
    "CamerAccumulator",
    "ManifestDataset",
    "ManifestWriter",
    "SyntheticCamer",
    "SyntheticCamerConfig",
    "assign_subset",
    "collate_samples",
    "evaluate_rows",
    "generate_camer",
    "label_index",
    "normalize_label",
    "parse_labels",
    "read_manifest",
    "score_label_sets",
    "to_sequence",
]

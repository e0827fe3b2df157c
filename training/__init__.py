"""Training side of mosear-fast: data sets, the CA-MER protocol and its metrics, ``mosear-eval``,
MoSE fitting (``MoSETrainer``, ``mosear-train``), ``load_trained`` and the demo.

Importable without transformers: the fitting names below are imported on first use.
"""

from mosear_fast._lazy import lazy_attributes

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
    *(_LAZY := {
        "MoSETrainer": "trainer",
        "freeze_all_but_adapters": "trainer",
        "fit_mose": "fit",
        "prepare_mose": "fit",
        "default_training_arguments": "fit",
        "load_trained": "trained_folder",
        "load_backbone": "trained_folder",
        "AVCollator": "av_batches",
    }),
]

__getattr__, __dir__ = lazy_attributes(__name__, _LAZY)

"""Audio-visual samples on disk: a JSONL manifest plus one safetensors file per sample.

Format (``manifest.jsonl``, one JSON object per line)::

    {"id": "camer-000007", "path": "samples/camer-000007.safetensors",
     "label": "happy", "audio_label": "sad", "video_label": "happy", "subset": "video_aligned"}

- ``id``: unique; letters, digits, ``.``, ``_``, ``-`` (it also names the tensor file).
- ``path``: the sample's safetensors file, relative to the manifest's folder (or absolute).
- ``label`` (multimodal truth), ``audio_label``, ``video_label``: vocabulary names or synonyms
  (:data:`~mosear_fast.training.labels.EMOTIONS`). Other keys (``subset``, ...) are kept as is.

Each safetensors file holds one tensor per modality, keyed by modality name
(:data:`MODALITIES`: ``text``, ``visual``, ``audio``; a sample may have any of them):
floating-point features ``(tokens, dim)`` or integer token ids ``(tokens,)``.

The manifest is read and checked when the dataset is built (a bad row is an error naming its
line); tensors are read lazily, one file per ``__getitem__``, so a data set larger than memory
works with a DataLoader's workers. The manifest doubles as a label file for ``mosear-eval``.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
from torch.utils.data import Dataset

from mosear_fast.atomic import atomic_save_tensors

from .jsonl import read_jsonl, write_jsonl
from .labels import EMOTIONS, normalize_label

# Modality names in id order: the project's convention is 0 = text, 1 = visual, 2 = audio.
MODALITIES: tuple[str, ...] = ("text", "visual", "audio")
LABEL_KEYS: tuple[str, ...] = ("label", "audio_label", "video_label")
_SAFE_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")


def check_sample_id(sample_id) -> str:
    """The id itself when it is safe as a file name; ValueError otherwise."""
    if not isinstance(sample_id, str) or not _SAFE_ID.fullmatch(sample_id):
        raise ValueError(
            f"id: expected letters, digits, '.', '_' or '-' (not starting with '.', '_' or '-'), "
            f"got {sample_id!r}"
        )
    return sample_id


def check_modality_tensors(inputs: Mapping[str, torch.Tensor]) -> None:
    """ValueError/TypeError unless ``inputs`` maps modality names to (T, d) floats or (T,) ints."""
    if not isinstance(inputs, Mapping) or not inputs:
        raise TypeError(
            f"inputs: expected a non-empty dict of modality name -> tensor, got {type(inputs).__name__}"
        )
    for name, t in inputs.items():
        if name not in MODALITIES:
            raise ValueError(f"inputs: modality {name!r} is not one of {MODALITIES}")
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"inputs[{name!r}]: expected a tensor, got {type(t).__name__}")
        if t.is_floating_point() and t.dim() != 2:
            raise ValueError(f"inputs[{name!r}]: features must be (tokens, dim), got shape {tuple(t.shape)}")
        if not t.is_floating_point() and (t.dtype == torch.bool or t.is_complex() or t.dim() != 1):
            raise ValueError(
                f"inputs[{name!r}]: token ids must be a 1-D integer tensor, "
                f"got {t.dtype} of shape {tuple(t.shape)}"
            )


class ManifestWriter:
    """Writes samples into ``root``: tensors to ``root/samples/<id>.safetensors`` as they come, the
    manifest at :meth:`close` (each file atomically). A ``with`` block that raises writes no manifest.
    """

    def __init__(
        self, root: str | os.PathLike, *, manifest_name: str = "manifest.jsonl", samples_dir: str = "samples"
    ):
        self.root = Path(root)
        self.manifest_path = self.root / manifest_name
        self.samples_dir = samples_dir
        self.rows: list[dict] = []
        self._ids: set[str] = set()

    def add(
        self,
        sample_id: str,
        inputs: Mapping[str, torch.Tensor],
        *,
        label: str,
        audio_label: str,
        video_label: str,
        **extra,
    ) -> dict:
        """Write one sample's tensors and queue its manifest row (returned)."""
        check_sample_id(sample_id)
        if sample_id in self._ids:
            raise ValueError(f"id: {sample_id!r} was already added")
        check_modality_tensors(inputs)
        labels = {
            k: normalize_label(v) for k, v in zip(LABEL_KEYS, (label, audio_label, video_label), strict=True)
        }
        rel = f"{self.samples_dir}/{sample_id}.safetensors"
        atomic_save_tensors(self.root / rel, {name: t.detach().cpu() for name, t in inputs.items()})
        row = {"id": sample_id, "path": rel, **labels, **extra}
        self.rows.append(row)
        self._ids.add(sample_id)
        return row

    def close(self) -> Path:
        """Write the manifest (atomically) and return its path."""
        write_jsonl(self.manifest_path, self.rows)
        return self.manifest_path

    def __enter__(self) -> ManifestWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()


def read_manifest(path: str | os.PathLike) -> list[dict]:
    """The manifest's rows, checked: object, safe unique id, ``path`` string, known labels.

    Labels are returned normalised to canonical names. ValueError names the line of a bad row.
    """
    return [row for _, row in _numbered_manifest(path)]


def _numbered_manifest(path: str | os.PathLike) -> list[tuple[int, dict]]:
    """:func:`read_manifest` with the line number of every row."""
    rows, seen = [], {}
    for line, row in read_jsonl(path):
        where = f"{path}: line {line}"
        if not isinstance(row, dict):
            raise ValueError(f"{where}: expected a JSON object, got {type(row).__name__}")
        try:
            check_sample_id(row.get("id"))
            if not isinstance(row.get("path"), str) or not row["path"]:
                raise ValueError(f"path: expected the sample's safetensors file, got {row.get('path')!r}")
            labels = {k: normalize_label(row.get(k)) for k in LABEL_KEYS}
        except (TypeError, ValueError) as e:
            raise ValueError(f"{where}: {e}") from None
        if row["id"] in seen:
            raise ValueError(f"{where}: duplicate id {row['id']!r} (first on line {seen[row['id']]})")
        seen[row["id"]] = line
        rows.append((line, {**row, **labels}))
    return rows


class MissingSampleError(FileNotFoundError, ValueError):
    """A manifest row whose tensor file does not exist: a FileNotFoundError that is also the ValueError
    every other unusable sample raises, with a message naming the manifest line and the file."""


class ManifestDataset(Dataset):
    """A torch Dataset over a manifest; item i reads sample i's safetensors file on access.

    Item: ``{"id": str, "inputs": {modality: tensor}, "label": int, "audio_label": int,
    "video_label": int, "subset": str | None}``; labels are class indices into ``EMOTIONS``.
    ``modalities`` restricts which tensors are read (all in the file by default).
    """

    def __init__(self, manifest: str | os.PathLike, *, modalities: Sequence[str] | None = None):
        self.manifest = Path(manifest)
        self.root = self.manifest.parent
        if modalities is not None:
            unknown = [m for m in modalities if m not in MODALITIES]
            if unknown or not modalities:
                raise ValueError(
                    f"modalities: expected a non-empty subset of {MODALITIES}, got {modalities!r}"
                )
        self.modalities = None if modalities is None else tuple(modalities)
        numbered = _numbered_manifest(self.manifest)
        self.rows = [row for _, row in numbered]
        self.lines = [line for line, _ in numbered]

    def __len__(self) -> int:
        return len(self.rows)

    def tensor_path(self, index: int) -> Path:
        p = Path(self.rows[index]["path"])
        return p if p.is_absolute() else self.root / p

    def __getitem__(self, index: int) -> dict:
        """Read sample ``index``. A file that is missing (:class:`MissingSampleError`), unreadable or not
        safetensors, or lacks a modality, is a ValueError naming the manifest line and the file (files
        are read only here, so such an error comes during training, not when the dataset is built)."""
        from safetensors import SafetensorError, safe_open

        row = self.rows[index]
        path = self.tensor_path(index)
        where = f"{self.manifest}: line {self.lines[index]}: {path}"
        try:
            with safe_open(str(path), framework="pt") as f:
                names = self.modalities or tuple(m for m in MODALITIES if m in f.keys())
                missing = [m for m in names if m not in f.keys()]
                if missing:
                    raise ValueError(f"{where}: sample {row['id']!r} has no tensor for modality {missing}")
                inputs = {m: f.get_tensor(m) for m in names}
        except FileNotFoundError:
            raise MissingSampleError(f"{where}: no such file") from None
        except OSError as e:  # safetensors gives no filename; errno text only
            raise ValueError(f"{where}: cannot read ({e.strerror or e})") from None
        except SafetensorError as e:
            raise ValueError(f"{where}: not a safetensors file ({e})") from None
        return {
            "id": row["id"],
            "inputs": inputs,
            **{k: EMOTIONS.index(row[k]) for k in LABEL_KEYS},
            "subset": row.get("subset"),
        }


def collate_samples(batch: Sequence[Mapping]) -> dict:
    """Batch dataset items: per modality, tensors padded to the longest and a True-is-token mask.

    Returns ``{"ids", "label", "audio_label", "video_label", "inputs": {m: (B, T, d) or (B, T)},
    "masks": {m: (B, T) bool}}``; features pad with 0, token ids with 0 (masked out either way).
    Every item must have the same modalities.
    """
    if not batch:
        raise ValueError("batch: expected at least one item")
    names = tuple(batch[0]["inputs"])
    inputs, masks = {}, {}
    for m in names:
        tensors = []
        for item in batch:
            if tuple(item["inputs"]) != names:
                raise ValueError(
                    f"batch: item {item['id']!r} has modalities {tuple(item['inputs'])}, expected {names}"
                )
            tensors.append(item["inputs"][m])
        inputs[m] = torch.nn.utils.rnn.pad_sequence(tensors, batch_first=True)
        lengths = torch.tensor([t.shape[0] for t in tensors])
        masks[m] = torch.arange(inputs[m].shape[1]) < lengths[:, None]
    out = {"ids": [item["id"] for item in batch], "inputs": inputs, "masks": masks}
    out.update({k: torch.tensor([item[k] for item in batch], dtype=torch.long) for k in LABEL_KEYS})
    return out


def to_sequence(
    inputs: Mapping[str, torch.Tensor], masks: Mapping[str, torch.Tensor], order: Sequence[str] = MODALITIES
) -> tuple[torch.Tensor, torch.Tensor]:
    """Pack a collated batch's feature segments into one sequence per sample, in ``order``.

    Returns ``x (B, L, d)`` and ``modality (B, L)`` (ids = positions in :data:`MODALITIES`,
    -1 for padding at the end), the layout the MoSE layers and AR attention take. All present
    modalities must be features of the same dim (project them first otherwise).
    """
    names = [m for m in order if m in inputs]
    if not names:
        raise ValueError(f"inputs: none of the modalities {tuple(order)} is present")
    dims = {m: inputs[m].shape[-1] for m in names if inputs[m].is_floating_point() and inputs[m].dim() == 3}
    if len(dims) != len(names) or len(set(dims.values())) != 1:
        raise ValueError(
            f"inputs: expected (B, T, d) features of one dim for {names}, got "
            f"{ {m: (tuple(inputs[m].shape), str(inputs[m].dtype)) for m in names} }"
        )
    x_cat = torch.cat([inputs[m] for m in names], dim=1)
    mask_cat = torch.cat([masks[m] for m in names], dim=1)
    ids_cat = torch.cat(
        [torch.full(masks[m].shape, MODALITIES.index(m), dtype=torch.long) for m in names], dim=1
    )
    # Stable sort moves real tokens to the front, keeping their order; padding goes to the end.
    perm = torch.argsort((~mask_cat).to(torch.int8), dim=1, stable=True)
    x = torch.gather(x_cat, 1, perm[..., None].expand_as(x_cat))
    keep = torch.gather(mask_cat, 1, perm)
    modality = torch.where(keep, torch.gather(ids_cat, 1, perm), -1)
    x = x * keep[..., None]
    length = int(keep.sum(1).max())
    return x[:, :length], modality[:, :length]

"""Atomic file writes: write a temporary file beside the target, then ``os.replace`` it.

A reader (or a crashed run) never sees a half-written report, manifest or tensor file: the target
either keeps its old content or holds the complete new one. The temporary file lives in the same
folder because ``os.replace`` is atomic only within one file system.

Files that belong together (a report and its chart, a trained folder) are written into a staging
folder first and published as one unit (:func:`staged_folder`, :func:`publish_folder`).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path to write; on success it replaces ``path``, on error it is removed.

    The parent folder is created when missing. The temporary name keeps the target's suffix,
    because some writers (matplotlib) pick the file format from it.
    """
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(
        dir=target.parent, prefix=f".{target.name}.", suffix=f".tmp{target.suffix}"
    )
    os.close(fd)
    tmp = Path(tmp_name)
    tmp.chmod(0o666 & ~_umask())  # mkstemp makes the file private; the result is an ordinary file
    try:
        yield tmp
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        raise


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write ``text`` (UTF-8) to ``path`` atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def atomic_write_json(path: str | os.PathLike, data) -> None:
    """Write ``data`` as indented JSON, with a final newline, to ``path`` atomically."""
    atomic_write_text(path, json.dumps(data, indent=2) + "\n")


def atomic_save_tensors(
    path: str | os.PathLike, tensors: dict, metadata: dict[str, str] | None = None
) -> None:
    """Save a dict of tensors as one safetensors file, atomically.

    Tensors are made contiguous first (safetensors refuses views with gaps).
    """
    from safetensors.torch import save_file

    contiguous = {name: t.contiguous() for name, t in tensors.items()}
    with atomic_path(path) as tmp:
        save_file(contiguous, str(tmp), metadata=metadata)


def atomic_save_figure(fig, path: str | os.PathLike, **savefig_kwargs) -> None:
    """Save a matplotlib figure to ``path`` atomically (format from the suffix), then close it."""
    import matplotlib.pyplot as plt

    try:
        with atomic_path(path) as tmp:
            fig.savefig(tmp, format=Path(path).suffix.lstrip(".") or "png", **savefig_kwargs)
    finally:
        plt.close(fig)


def publish_folder(staging: str | os.PathLike, target: str | os.PathLike, *, last: tuple[str, ...] = ()) -> None:
    """Move everything in ``staging`` into ``target``, then remove ``staging`` (both on one file system).

    A missing ``target`` is created by renaming ``staging`` itself: one atomic step. An existing
    ``target`` keeps the entries the staging folder does not have (``--out`` may be a folder the user
    keeps other things in); each staged entry replaces the entry of the same name. ``last`` names a
    completion marker (e.g. ``report.json``): its old copy is removed before the first entry moves
    and the new one moves last, so a crash in the middle of the moves leaves no marker, never an old
    marker beside new files.
    """
    staging, target = Path(staging), Path(target)
    staging.chmod(0o777 & ~_umask())  # mkdtemp makes the folder private; the result is an ordinary folder
    if not target.exists() and not target.is_symlink():
        os.replace(staging, target)
        return
    for name in last:
        if (staging / name).exists():
            _remove(target / name)
    entries = sorted(staging.iterdir(), key=lambda entry: entry.name in last)
    for entry in entries:
        destination = target / entry.name
        if destination.is_dir() and not destination.is_symlink():
            # os.replace cannot replace a folder that has content: move the old one aside first.
            old = Path(tempfile.mkdtemp(dir=target, prefix=f".{entry.name}.old-"))
            os.replace(destination, old / entry.name)
            os.replace(entry, destination)
            shutil.rmtree(old, ignore_errors=True)
        else:
            if entry.is_dir():
                _remove(destination)
            os.replace(entry, destination)
    staging.rmdir()


@contextlib.contextmanager
def staged_folder(target: str | os.PathLike, *, last: tuple[str, ...] = (), staging: str | os.PathLike | None = None,
                  keep_on_error: Callable[[Path], bool] | None = None) -> Iterator[Path]:
    """Yield a staging folder beside ``target``; write the files of one unit into it.

    When the block succeeds, :func:`publish_folder` moves them into ``target``. When it raises, the
    staging folder is removed and ``target`` is left exactly as it was (a previous good result
    survives a failed run); folders created only to hold ``target`` are removed again.

    ``staging``: a fixed staging folder (created when missing; what it holds is kept), for a run that
    other processes share or that a later run resumes; default: a new, empty, uniquely named one.
    ``keep_on_error(staging)``: True keeps the staging folder after a failure (e.g. it holds
    checkpoints to resume from).
    """
    target = Path(target)
    missing = [p for p in (target.parent, *target.parent.parents) if not p.exists()]
    target.parent.mkdir(parents=True, exist_ok=True)
    if staging is None:
        staging = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}.staging-"))
    else:
        staging = Path(staging)
        staging.mkdir(exist_ok=True)
    try:
        yield staging
        publish_folder(staging, target, last=last)
    except BaseException:
        if keep_on_error is None or not keep_on_error(staging):
            shutil.rmtree(staging, ignore_errors=True)
            for folder in missing:  # innermost first
                with contextlib.suppress(OSError):
                    folder.rmdir()
        raise


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()

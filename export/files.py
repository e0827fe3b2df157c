"""The output folder, written all at once: everything goes to a temporary sibling folder that replaces
``out_dir`` only when the export has succeeded, so a failure leaves no half-written output.

A killed export (SIGKILL, power loss) cannot delete its staging folder, so every later export to the
same ``out_dir`` removes the staging folders left beside it, safely: only folders named like ours
(``.<out name>.partial-*`` / ``.old-*``) that hold our marker file with the process id and host of
the export that made them, whose process is gone (same host) or which are older than a day (another
host: its process cannot be checked). A running export's folder is never touched."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import tempfile
import time
from pathlib import Path


class OutputError(ValueError):
    """The output folder cannot be used (exists without overwrite, not writable)."""


def check_output_dir(out_dir, *, overwrite: bool) -> Path:
    """``out_dir`` as a Path after checking it can be (re)placed; creates missing parent folders."""
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise OutputError(f"--out: {out_dir} exists and is not a folder")
    if out_dir.exists() and not overwrite:
        raise OutputError(f"--out: {out_dir} already exists; pass --overwrite to replace it")
    try:
        out_dir.parent.mkdir(parents=True, exist_ok=True)
        probe = tempfile.NamedTemporaryFile(dir=out_dir.parent, prefix=".mosear-export-probe-")
        probe.close()
    except OSError as err:
        raise OutputError(f"--out: cannot write into {out_dir.parent} ({err.strerror or err})") from None
    return out_dir


MARKER = ".mosear-export-staging"  # in every staging folder: {"pid", "host", "created"}
STALE_FOREIGN_SECONDS = 24 * 3600


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def is_stale_staging(folder: Path, *, now: float | None = None, host: str | None = None) -> bool:
    """Whether ``folder`` is a staging folder of an export that can no longer finish (see the module
    docstring). Folders without our marker are never stale: they are not ours."""
    try:
        info = json.loads((folder / MARKER).read_text())
        pid, owner, created = int(info["pid"]), str(info["host"]), float(info["created"])
    except (OSError, ValueError, KeyError, TypeError):
        return False
    if owner == (host or socket.gethostname()):
        return not _process_alive(pid)
    return (now or time.time()) - created > STALE_FOREIGN_SECONDS


def remove_stale_staging(out_dir: Path) -> list[str]:
    """Deletes the stale staging folders of ``out_dir`` (ours only); returns their names."""
    removed = []
    for prefix in (f".{out_dir.name}.partial-", f".{out_dir.name}.old-"):
        for folder in out_dir.parent.glob(prefix + "*"):
            if folder.is_dir() and not folder.is_symlink() and is_stale_staging(folder):
                shutil.rmtree(folder, ignore_errors=True)
                removed.append(folder.name)
    return removed


def _make_staging(out_dir: Path, kind: str) -> Path:
    folder = Path(tempfile.mkdtemp(dir=out_dir.parent, prefix=f".{out_dir.name}.{kind}-"))
    (folder / MARKER).write_text(json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                                             "created": time.time()}))
    return folder


@contextlib.contextmanager
def staged_output(out_dir: Path, *, overwrite: bool):
    """Yields a temporary folder beside ``out_dir``; on success it becomes ``out_dir`` (replacing the old
    one when ``overwrite``), on any exception it is deleted and ``out_dir`` is left as it was. Stale
    staging folders of earlier, killed exports to ``out_dir`` are removed first."""
    out_dir = check_output_dir(out_dir, overwrite=overwrite)
    remove_stale_staging(out_dir)
    staging = _make_staging(out_dir, "partial")
    umask = os.umask(0)
    os.umask(umask)
    staging.chmod(0o777 & ~umask)  # mkdtemp makes it private; the result is an ordinary folder
    try:
        yield staging
        (staging / MARKER).unlink()
        if out_dir.exists():
            retired = _make_staging(out_dir, "old")
            out_dir.rename(retired / out_dir.name)
            staging.rename(out_dir)
            shutil.rmtree(retired, ignore_errors=True)
        else:
            staging.rename(out_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def staged_files(stage: Path) -> list[str]:
    """The names of the files written into a staging folder so far (our marker excluded)."""
    return sorted(p.name for p in stage.iterdir() if p.name != MARKER)


def write_json(path: Path, data) -> None:
    path.write_text(json.dumps(data, indent=2, sort_keys=False, default=str) + "\n")


# Files of a Hugging Face model folder that a deployer needs beside the graph to build inputs and
# read outputs (tokenizer, multimodal processor, chat template, generation defaults).
TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json", "tokenizer.model",
    "vocab.json", "vocab.txt", "merges.txt", "spiece.model", "chat_template.jinja", "chat_template.json",
    "preprocessor_config.json", "processor_config.json", "video_preprocessor_config.json", "generation_config.json",
)


def copy_tokenizer_files(folders, stage: Path) -> list[str]:
    """Copies the tokenizer/processor files found in ``folders`` (the first folder having a file wins)
    into ``stage``; returns the copied names."""
    copied = []
    for name in TOKENIZER_FILES:
        for folder in folders:
            path = Path(folder) / name
            if path.is_file():
                shutil.copyfile(path, stage / name)
                copied.append(name)
                break
    return copied

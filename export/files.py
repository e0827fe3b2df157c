"""The output folder, written all at once: everything goes to a temporary sibling folder that replaces
``out_dir`` only when the export has succeeded, so a failure leaves no half-written output."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
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


@contextlib.contextmanager
def staged_output(out_dir: Path, *, overwrite: bool):
    """Yields a temporary folder beside ``out_dir``; on success it becomes ``out_dir`` (replacing the old
    one when ``overwrite``), on any exception it is deleted and ``out_dir`` is left as it was."""
    out_dir = check_output_dir(out_dir, overwrite=overwrite)
    staging = Path(tempfile.mkdtemp(dir=out_dir.parent, prefix=f".{out_dir.name}.partial-"))
    umask = os.umask(0)
    os.umask(umask)
    staging.chmod(0o777 & ~umask)  # mkdtemp makes it private; the result is an ordinary folder
    try:
        yield staging
        if out_dir.exists():
            retired = Path(tempfile.mkdtemp(dir=out_dir.parent, prefix=f".{out_dir.name}.old-"))
            out_dir.rename(retired / out_dir.name)
            staging.rename(out_dir)
            shutil.rmtree(retired, ignore_errors=True)
        else:
            staging.rename(out_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def write_json(path: Path, data) -> None:
    path.write_text(json.dumps(data, indent=2, sort_keys=False, default=str) + "\n")

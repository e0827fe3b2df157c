"""Where a benchmark ran: device, library versions and commit, written beside every number."""

from __future__ import annotations

import datetime
import os
import platform
import subprocess

import torch


def _commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=5,
                             cwd=os.path.dirname(__file__))
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True,
                               text=True, timeout=5, cwd=os.path.dirname(__file__)).stdout.strip()
        return out.stdout.strip() + ("+dirty" if dirty else "") if out.returncode == 0 else None
    except (OSError, subprocess.SubprocessError):
        return None


def describe(device: torch.device) -> dict:
    try:
        import triton
        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
    else:
        name = f"CPU: {platform.processor() or platform.machine()}, {os.cpu_count()} cores"
    env = dict(device=name, device_type=device.type, torch=torch.__version__, triton=triton_version,
               cuda=torch.version.cuda, python=platform.python_version(), commit=_commit(),
               date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"))
    if device.type == "cpu":
        env["threads"] = torch.get_num_threads()  # CPU timings depend on it (OMP_NUM_THREADS)
    return env

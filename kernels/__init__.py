"""Kernels of mosear-fast, one sub-package per op.

Each op folder holds a naive float64 reference (``reference.py``, for tests), the PyTorch
backend (``torch_backend.py``, a real CPU path) and the Triton kernels with their launchers and
autograd Function. Nothing here validates arguments: ``mosear_fast`` does that before calling in.
"""

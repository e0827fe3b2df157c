"""Work-around for Triton 3.6's interpreter under NumPy >= 2.4 (the GPU image's Triton is 3.6).

The interpreter stores every scalar as a one-element 1-D NumPy array and converts it to a Python
int with ``int(array)``, which NumPy 2.4 refuses ("only 0-dimensional arrays can be converted to
Python scalars"). Every ``range(lo, hi)`` whose bounds are kernel arguments or computed scalars goes
through that conversion, so under 3.6 the interpreter fails on any data-dependent loop. Triton 3.7+
converts ``data.squeeze()`` instead; this module installs the same conversion into 3.6's interpreter.

Only the interpreter's patch of ``tl.tensor.__index__`` changes (compiled kernels are untouched), and
only on Triton releases whose interpreter still has the failing conversion.
"""

from __future__ import annotations

import numpy as np


def _needs_fix(interpreter) -> bool:
    try:
        int(np.zeros(1, dtype=np.int32))
    except TypeError:
        pass
    else:
        return False  # this NumPy still converts one-element arrays
    patch = getattr(interpreter, "_patch_lang_tensor", None)
    if patch is None or getattr(patch, "_squeezes_index", False):
        return False
    import inspect

    return "int(self.handle.data)" in inspect.getsource(patch)


def fix_interpreter_index() -> None:
    """Makes the interpreter convert scalar tensors with ``int(data.squeeze())``; idempotent."""
    from triton.runtime import interpreter

    if not _needs_fix(interpreter):
        return
    original = interpreter._patch_lang_tensor

    def patched(tensor, scope):
        original(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.squeeze()))

    patched._squeezes_index = True
    interpreter._patch_lang_tensor = patched

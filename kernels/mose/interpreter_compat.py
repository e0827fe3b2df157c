"""Back-port of one Triton interpreter fix, so the MoSE kernels run under Triton 3.6's interpreter too.

Under ``TRITON_INTERPRET=1`` every scalar (a kernel's int argument, a loaded scalar) is a one-element
NumPy array of shape (1,), and ``range(lo, hi, BLOCK)`` in a kernel calls ``int()`` on it. Triton
3.6's interpreter does ``int(self.handle.data)``, which NumPy >= 2.4 refuses for arrays of ndim > 0
("only 0-dimensional arrays can be converted to Python scalars"); newer Triton (3.9) squeezes the
array first. Rewriting the kernels' loops as ``while`` loops would avoid it, but compiled Triton does
not software-pipeline a ``while`` loop, so the fix is applied to the interpreter instead: the same
one-line change as upstream, installed only when the interpreter still has the old line. Compiled
kernels are not affected (this only patches the interpreter's tensor patching).
"""

from __future__ import annotations

import inspect

_OLD_INDEX = "int(self.handle.data))"  # the Triton 3.6 line: scope.set_attr(tensor, "__index__", lambda ...)


def _scalar_index(self) -> int:
    return int(self.handle.data.item())  # .item(): any one-element array, whatever its ndim


def install() -> bool:
    """Patches the interpreter if it needs it; returns whether it did (idempotent)."""
    try:
        from triton.runtime import interpreter
    except ImportError:  # a Triton without the interpreter: nothing to fix
        return False
    patch_tensor = getattr(interpreter, "_patch_lang_tensor", None)
    if patch_tensor is None or getattr(patch_tensor, "mosear_scalar_index", False):
        return False
    try:
        source = inspect.getsource(patch_tensor)
        n_params = len(inspect.signature(patch_tensor).parameters)
    except (OSError, TypeError, ValueError):
        return False
    if _OLD_INDEX not in source or n_params != 2:  # fixed upstream, or a layout this patch does not know
        return False

    def patched(tensor, scope):
        patch_tensor(tensor, scope)
        scope.set_attr(tensor, "__index__", _scalar_index)  # restored with the others after the launch

    patched.mosear_scalar_index = True
    interpreter._patch_lang_tensor = patched
    return True

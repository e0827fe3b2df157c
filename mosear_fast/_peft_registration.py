"""Registers MoSE with PEFT as soon as both are imported, in either order.

``PeftModel.from_pretrained(base, folder)`` looks the folder's ``peft_type`` ("MOSE") up in PEFT's
registries, which ``mosear_fast.peft_method`` fills. ``import mosear_fast`` does not import peft (nor
transformers): when peft is already imported the method is registered at once, otherwise a finder
on ``sys.meta_path`` waits for the first ``import peft`` and registers it right after peft's own
module has run. So ``import mosear_fast`` is all a user needs before ``PeftModel.from_pretrained``.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys


def _register() -> None:
    # mose_config imports peft_method at its end, which fills PEFT's registries. When mose_config is
    # what is importing peft right now, it is in sys.modules half-run and registers when it finishes.
    if f"{__package__}.mose_config" not in sys.modules:
        importlib.import_module(f"{__package__}.mose_config")


class _AfterPeftImport(importlib.abc.MetaPathFinder):
    """Finds nothing itself; when ``peft`` is about to be imported, wraps its loader so that the MoSE
    method is registered once peft's module has run, then steps aside."""

    def find_spec(self, name, path=None, target=None):
        if name != "peft":
            return None
        sys.meta_path.remove(self)  # one shot; the other finders locate peft itself
        spec = importlib.util.find_spec(name)
        if spec is None or spec.loader is None:
            return spec
        exec_module = spec.loader.exec_module

        def exec_then_register(module):
            exec_module(module)
            _register()

        spec.loader.exec_module = exec_then_register
        return spec


def install() -> None:
    if "peft" in sys.modules:
        _register()
    elif not any(isinstance(finder, _AfterPeftImport) for finder in sys.meta_path):
        sys.meta_path.insert(0, _AfterPeftImport())

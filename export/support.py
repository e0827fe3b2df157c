"""Which prepared models can be exported as a static-shape graph.

The ops switch to static-shape forms by themselves while exporting (``mosear_fast.backend``) and the
module code skips its value checks and monitoring read-outs then; what remains data-dependent is
refused here with an error that says what to change.
"""

from __future__ import annotations

import torch


class UnsupportedModelError(ValueError):
    """The model holds a module whose computation cannot be written as a static-shape graph."""


def check_exportable(model: torch.nn.Module) -> None:
    """Raises UnsupportedModelError for modules the exporter cannot turn into a static graph."""
    from mosear_fast.mose_layer import MoSELinear

    for name, module in model.named_modules():
        if isinstance(module, MoSELinear):
            adapter = module.active_mose_adapter()
            if adapter is not None and adapter.routing != "token":
                raise UnsupportedModelError(
                    f"model: {name} uses routing={adapter.routing!r}; export supports routing='token' only "
                    "(sequence routing groups tokens by data-dependent counts)")
            if adapter is not None and module.training:
                raise UnsupportedModelError(f"model: {name} is in training mode; call model.eval() before export")

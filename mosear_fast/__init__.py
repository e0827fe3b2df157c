"""mosear-fast: fused kernels, drop-in modules and export for MoSEAR.

Functional ops: :func:`mose_lora` (MoSE dispatch), :func:`mose_linear` (base linear + MoSE update,
fused) and :func:`ar_attention` (attention reallocation), each with ``backend="auto" | "torch" | "triton"``.

Drop-in modules (imported on first use, so ``import mosear_fast`` needs neither transformers nor
peft): ``MoSEConfig``, ``ARConfig``, ``apply_mosear``, ``aux_loss``, ``attention_shares``,
``MoSELinear``, ``modality_ids_from_spans``, ``modality_ids_from_token_ids``.
"""

from . import _peft_registration
from ._lazy import lazy_attributes
from .ops import ar_attention, mose_linear, mose_lora

__version__ = "0.1.0"

# public name -> module (relative to this package) that defines it
_LAZY = {
    "MoSEConfig": "mose_config",
    "ARConfig": "ar_config",
    "apply_mosear": "apply",
    "aux_loss": "apply",
    "attention_shares": "apply",
    "MoSELinear": "mose_layer",
    "MoSEAdapter": "mose_layer",
    "modality_ids_from_spans": "modality",
    "modality_ids_from_token_ids": "modality",
    "DEFAULT_MODALITIES": "modality",
    "load_trained": "trained",
}

__all__ = ["ar_attention", "mose_linear", "mose_lora", "__version__", *_LAZY]

__getattr__, __dir__ = lazy_attributes(__name__, _LAZY)
_peft_registration.install()  # PeftModel.from_pretrained finds saved MoSE adapters after `import mosear_fast`

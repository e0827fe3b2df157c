"""AR attention: softmax attention whose per-modality mass is reallocated toward a balanced target."""

from .reference import ar_attention_reference
from .torch_backend import ar_attention_torch

__all__ = ["ar_attention_reference", "ar_attention_torch"]

"""AR provider: ``ar_attention`` on the Triton backend (fused single pass; split-k for decode).

AR with balance (1, 2) and strength 0.5 on the audio-visual layout (``tests.cases``, layout "av"),
inputs without grad (the inference path). Range validation is off (``validate=False``), so the
timed call is the sync-free kernel path. CUDA only: the Triton interpreter is not timed.
"""

from __future__ import annotations

from mosear_fast import ar_attention

from ..registry import Provider, register
from ..setups import AR_OPTIONS, ar_setup, cuda_only


def _attend(q, k, v, key_modality):
    return ar_attention(q, k, v, key_modality, backend="triton", validate=False, **AR_OPTIONS)


register(Provider(
    op="ar",
    name="mosear_triton",
    setup=ar_setup(_attend),
    unavailable=cuda_only,
    description="ar_attention, Triton backend (one pass, |S|+1 online-softmax states, split-k decode)",
))

"""AR providers that run anywhere: the SDPA floor, the PyTorch backend and eager materialised AR."""

import torch.nn.functional as F

from mosear_fast import ar_attention
from tests.baselines import ar_eager_materialised

from ..registry import Provider, register
from ..setups import AR_OPTIONS, ar_inputs, ar_setup


def sdpa_floor(case):
    """scaled_dot_product_attention without AR: the flash backend on CUDA, GQA without repeating K/V."""
    inputs = ar_inputs(case)
    q, k, v = inputs["q"], inputs["k"], inputs["v"]
    len_q, len_k = case["len_q"], case["len_k"]
    causal = len_q == len_k  # decode (Lq = 1) sees every cached key
    if case["device"].type == "cuda":
        from torch.nn.attention import SDPBackend, sdpa_kernel

        def run():
            with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
                return F.scaled_dot_product_attention(q, k, v, is_causal=causal, enable_gqa=True)
        return run
    return lambda: F.scaled_dot_product_attention(q, k, v, is_causal=causal, enable_gqa=True)


register(Provider("ar", "sdpa", sdpa_floor, description="SDPA without AR (floor)"))
register(Provider("ar", "mosear_torch",
                  ar_setup(lambda q, k, v, mod: ar_attention(q, k, v, mod, backend="torch", **AR_OPTIONS)),
                  description="ar_attention, PyTorch backend (chunked queries)"))
register(Provider("ar", "eager_ar",
                  ar_setup(lambda q, k, v, mod: ar_eager_materialised(q, k, v, mod, **AR_OPTIONS)),
                  unavailable=lambda case: ("(Lq, Lk) probabilities above 8 GiB" if
                                            case["batch"] * case["n_q_heads"] * case["len_q"] * case["len_k"] * 4
                                            > 8 * 2**30 else None),
                  description="materialised probabilities, one-hot masses, rescaled P @ V"))
